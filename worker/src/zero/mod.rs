//! The ZeRO engine, stages 0-3 as DeepSpeed defines them, over the model's blocks: one
//! flat buffer per block padded to the world size, rank r owning slice r (fp32 masters
//! and Adam moments for stage >= 1, gradients for stage >= 2, parameters for stage 3),
//! bucketed and overlappable gradient reduction, stage-3 gather/prefetch/free, fp16
//! dynamic loss scaling, gradient clipping, DeepSpeed LR schedules, activation
//! checkpointing, memory accounting and checkpoint state. Design: `docs/zero-engine.md`.
//!
//! Layout: `config.rs` (the keys honoured), `partition.rs` (flat-buffer arithmetic),
//! `build.rs` (construction block by block), `engine.rs` (block-wise forward/backward),
//! `in_flight.rs` (collectives the engine holds between issue and completion),
//! `reduce.rs` (gradient buckets), `gather.rs` (parameter all-gathers), `step.rs`
//! (optimizer step), `state.rs` (memory report, checkpoint state), `adamw.rs`,
//! `swap.rs` (optimizer state in files under `nvme_path`), `scheduler.rs`, `loss_scaler.rs`, `local_comm.rs` (in-process communicator for tests
//! and simulations). Building an engine from train.json and a model is `crate::assemble`.

pub mod adamw;
pub mod build;
pub mod config;
pub mod engine;
mod gather;
mod in_flight;
pub mod local_comm;
pub mod loss_scaler;
pub mod partition;
mod profile;
mod reduce;
pub mod scheduler;
pub mod state;
pub mod step;
pub mod swap;

pub use build::EngineBuilder;
pub use config::{
    EngineConfig, LossScaleConfig, OptimizerConfig, Precision, SchedulerConfig, WarmupType,
    ZeroStage,
};
pub use engine::{EngineModel, Stage3Stats, ZeroEngine};
pub use local_comm::LocalCommunicator;
pub use state::{BlockOwnedState, MemoryReport, OwnedState};
pub use step::StepReport;
