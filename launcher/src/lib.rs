//! The rsdeep launcher library: everything `rsdeep` does before and around the workers.
//! Pure Rust (no libtorch, no CUDA at build time) so the launcher builds and starts fast.
//! What the launcher shares with the worker (the train.json types, the environment names,
//! the checkpoint folder rules) lives in `rsdeep-contract`; the worker does not link this
//! crate.
//!
//! Folders by role, each importing only those below it:
//! `commands` and `launch` (one launch: output folder, rendezvous, node roles) →
//! `nodes` (`ssh`: the ssh runner; `coordinate`: restarts decided by node 0 across nodes) →
//! `supervise` (spawn, output forwarding, failure report, hang classification, attempts) →
//! `rendezvous` (the gRPC server node 0 hosts) and `plan` (pure: command line, hostfile,
//! resources, SLURM environment → `LaunchPlan`).

pub mod commands;
pub mod launch;
pub mod nodes;
pub mod plan;
pub mod rendezvous;
pub mod supervise;
