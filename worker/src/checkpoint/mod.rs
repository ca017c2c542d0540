//! Training checkpoints: `output_dir/checkpoint-N/` folders that resume exactly,
//! reshard to any world size and ZeRO stage, are never visible half-written, and that the
//! Hugging Face ecosystem can read. Contract and layout: `docs/checkpoints.md`.
//!
//! Layout: `trainer_state.rs` (HF `trainer_state.json`), `manifest.rs` (every file's size
//! and sha256, the engine's layout; verification), `tensor_file.rs` (streaming
//! safetensors writer, positioned-read partition reader), `save.rs` (the collective,
//! crash-safe save protocol, rotation, asynchronous saves), `resume.rs` (choosing a
//! checkpoint, loading and resharding optimizer state), `consolidate.rs` (DeepSpeed's
//! `zero_to_fp32`: HF safetensors from the partitions with bounded memory), `export.rs`
//! (a run's final HF weights streamed from the engine block by block), `crash.rs`
//! (kill -9 injection points for the crash-safety tests).

pub mod consolidate;
pub mod crash;
pub mod export;
pub mod manifest;
pub mod resume;
pub mod save;
pub mod tensor_file;
pub mod trainer_state;

pub use consolidate::{consolidate, consolidate_cli};
pub use manifest::{EngineMeta, Manifest, RunRecord};
pub use resume::{
    FullOptimizerState, ResumeState, load_checkpoint, read_full_optimizer_state,
    resolve_resume_path,
};
pub use save::{
    PendingSave, SaveRequest, release_snapshot_buffers, save_checkpoint, save_checkpoint_async,
};
pub use trainer_state::TrainerState;

/// The folder rules the launcher shares (`rsdeep_contract::checkpoint_dir`): folder names,
/// `manifest.json` (written last: its presence marks a complete checkpoint),
/// `output_dir/latest` (the newest complete checkpoint's name) and the saving marker.
pub use rsdeep_contract::checkpoint_dir::{
    LATEST_FILE, MANIFEST_FILE, SAVING_MARKER, checkpoint_dir_name,
};
/// Folder of the ZeRO partitions inside a checkpoint.
pub const ZERO_DIR: &str = "zero";
/// HF's trainer state file.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// `zero/optim_states_rank_{r}.safetensors`: partition `r`'s fp32 master and moments.
pub fn partition_file(partition_rank: usize) -> String {
    format!("{ZERO_DIR}/optim_states_rank_{partition_rank:05}.safetensors")
}

/// Tensor names of block `b`'s partition in an optimizer file.
pub fn partition_tensor_name(block: usize, which: &str) -> String {
    format!("block_{block}.{which}")
}

/// The three optimizer tensors of each block, in file order.
pub const OPTIMIZER_TENSORS: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// `rng_state_{r}.json`: rank `r`'s RNG metadata and position.
pub fn rank_state_file(rank: usize) -> String {
    format!("rng_state_{rank}.json")
}

/// `zero/frozen_params.safetensors`: parameters outside the optimizer (rank 0).
pub const FROZEN_FILE: &str = "zero/frozen_params.safetensors";
