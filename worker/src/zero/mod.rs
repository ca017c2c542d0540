//! The ZeRO engine, stages 0-3 as DeepSpeed defines them, over the model's blocks: one
//! flat buffer per block padded to the world size, rank r owning slice r (fp32 masters
//! and Adam moments for stage >= 1, gradients for stage >= 2, parameters for stage 3),
//! bucketed and overlappable gradient reduction, stage-3 gather/prefetch/free, fp16
//! dynamic loss scaling, gradient clipping, DeepSpeed LR schedules, activation
//! checkpointing, memory accounting and checkpoint state. Design: `docs/zero-engine.md`.
//!
//! Layout: `config.rs` (the keys honoured), `partition.rs` (flat-buffer arithmetic),
//! `from_train_config.rs` (adapter from the launcher's TrainConfig), `build.rs`
//! (construction block by block), `causal_lm.rs` (a Qwen2/Llama model, LoRA included,
//! built straight into an engine),
//! `engine.rs` (block-wise forward/backward), `reduce.rs` (gradient buckets),
//! `gather.rs` (parameter all-gathers), `step.rs` (optimizer step), `state.rs` (memory
//! report, checkpoint state), `adamw.rs`, `scheduler.rs`, `loss_scaler.rs`,
//! `local_comm.rs` (in-process communicator for tests and simulations).

pub mod adamw;
pub mod build;
pub mod causal_lm;
pub mod config;
pub mod engine;
pub mod from_train_config;
mod gather;
pub mod local_comm;
pub mod loss_scaler;
pub mod partition;
mod profile;
mod reduce;
pub mod scheduler;
pub mod state;
pub mod step;

pub use build::EngineBuilder;
pub use causal_lm::{CausalLmEngine, LoraSpec, ModelSource, build_causal_lm_engine};
pub use config::{
    EngineConfig, LossScaleConfig, OptimizerConfig, Precision, SchedulerConfig, WarmupType,
    ZeroStage,
};
pub use engine::{EngineModel, Stage3Stats, ZeroEngine};
pub use local_comm::LocalCommunicator;
pub use state::{BlockOwnedState, MemoryReport, OwnedState};
pub use step::StepReport;
