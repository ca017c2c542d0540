//! The rsdeep launcher library: everything `rsdeep` does before and around the workers.
//! Pure Rust (no libtorch, no CUDA at build time) so the launcher builds and starts fast.
//! The worker crate depends on this library only for the validated configuration types
//! (`config`) and the environment contract (`env_contract`).

pub mod config;
