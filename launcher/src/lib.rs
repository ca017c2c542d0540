//! The rsdeep launcher library: everything `rsdeep` does before and around the workers.
//! Pure Rust (no libtorch, no CUDA at build time) so the launcher builds and starts fast.
//! What the launcher shares with the worker (the train.json types, the environment names,
//! the checkpoint folder rules) lives in `rsdeep-contract`; the worker does not link this
//! crate.

pub mod cli;
pub mod coordination;
pub mod envfile;
pub mod hostfile;
pub mod hostlist;
mod lines;
pub mod memory;
pub mod output_dir;
pub mod plan;
pub mod rendezvous;
pub mod resources;
pub mod slurm;
pub mod ssh;
pub mod supervisor;
