//! What the rsdeep launcher and worker must agree on, read once and passed typed: the
//! train.json + DeepSpeed configuration (`config`: types, loading, "auto" filling,
//! validation), every environment variable the project reads (`env`), and the checkpoint
//! folder rules (`checkpoint_dir`; `process` for leftovers named by a pid). No tokio,
//! tonic or tch: both binaries link it, and neither links the other.

pub mod checkpoint_dir;
pub mod config;
pub mod env;
pub mod process;
