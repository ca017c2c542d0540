//! The rsdeep worker library: one process per device. It joins the rendezvous, builds a
//! communicator, loads tokenizer, data and model, and runs the ZeRO engine.
//!
//! Module map (each module's own `//!` says where its contract lives):
//! - `comm`: the `Communicator` trait and its TCP-ring and NCCL backends, bucketing.
//! - `model`: Hugging Face-exact Qwen2/Llama as an ordered list of blocks.
//! - `tokenizer`, `data`: tokenizer.json + chat templates; pretrain and SFT datasets.
//! - `zero`: the ZeRO engine (stages 0-3) over the model's blocks.
//! - `kernels`: fused fp32 CPU kernels of the training hot path (norm, rotary, SwiGLU,
//!   AdamW).

pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod rendezvous;
pub mod tokenizer;
pub mod train;
pub mod zero;

pub use error::{Error, Result};
