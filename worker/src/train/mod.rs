//! The training loop for pretrain and SFT: builds tokenizer, data, model and ZeRO engine
//! from the resolved `TrainConfig`, runs epochs/max_steps with gradient accumulation,
//! evaluates, logs (progress bar, metrics.jsonl, TensorBoard, loss.png) and saves an
//! HF-loadable model at the end. Entry point: `run::train`.

pub mod data_source;
pub mod ds_monitor;
pub mod entry;
pub mod flops_profile;
pub mod outputs;
pub mod phase;
pub mod plot;
pub mod progress;
pub mod run;
pub mod tensorboard;
pub mod trackers;

pub use entry::train_from_launcher;
pub use run::{StepProgress, TrainSummary, TrainWorld, train};
