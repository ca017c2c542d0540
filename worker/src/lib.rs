//! The rsdeep worker library: one process per device. It joins the rendezvous, builds a
//! communicator, loads tokenizer, data and model, and runs the ZeRO engine.
//!
//! Module map (each module's own `//!` says where its contract lives), top to bottom of
//! the data path rendezvous → train → engine → comm → checkpoint:
//! - `rendezvous`: the environment contract read once, the gRPC Join, heartbeats.
//! - `train`: the Trainer in named steps (setup, optimizer step, log, evaluate, save,
//!   finish), the data source, progress and loss plot.
//! - `assemble`: an engine from train.json plus a model (LoRA included), block by block.
//! - `zero`: the ZeRO engine (stages 0-3) over the model's blocks.
//! - `comm`: the `Communicator` trait and its TCP-ring and NCCL backends, bucketing.
//! - `checkpoint`: crash-safe checkpoints, resume and resharding, consolidation, export.
//! - `model`: Hugging Face-exact Qwen2/Llama as an ordered list of blocks.
//! - `lora`: PEFT-format LoRA adapters (DoRA, modules_to_save), prefix tuning, merge;
//!   AdapterHub-format bottleneck adapters.
//! - `quant`: bitsandbytes' 4-bit format (NF4/FP4, double quantization) for QLoRA bases.
//! - `tokenizer`, `data`: tokenizer.json + chat templates; pretrain and SFT datasets.
//! - `generate`: greedy and sampled generation for `rsdeep generate` and the demo chat.
//! - `convert`: a llama.cpp GGUF model as a Hugging Face folder (`rsdeep convert gguf`).
//! - `kernels`: fused fp32 CPU kernels of the training hot path (norm, rotary, SwiGLU,
//!   AdamW).

pub mod assemble;
pub mod checkpoint;
pub mod comm;
pub mod convert;
pub mod data;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod quant;
pub mod rendezvous;
pub mod tokenizer;
pub mod train;
pub mod zero;

pub use error::{Error, Result};
