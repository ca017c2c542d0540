//! The rsdeep launcher library: everything `rsdeep` does before and around the workers.
//! Pure Rust (no libtorch, no CUDA at build time) so the launcher builds and starts fast.
//! The worker crate depends on this library only for the validated configuration types
//! (`config`) and the environment contract (`env_contract`).

pub mod cli;
pub mod config;
pub mod coordination;
pub mod env_contract;
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
