//! The worker's integration tests as one test binary (one link against libtorch instead
//! of one per area), a module per area. Shared helpers: `support` (reference venv and
//! data), `checkpoint_support` (two-rank training runs that save and resume),
//! `zero_support` (tiny models trained on in-process ranks). Tests that measure the
//! process's own memory or are killed on purpose re-run this binary on themselves alone
//! (`support::rerun_alone`), so no other test shares the process they measure.

mod checkpoint_support;
mod support;
mod zero_support;

mod bottleneck_parity;
mod checkpoint_crash;
mod checkpoint_files;
mod checkpoint_memory;
mod checkpoint_resume;
mod data_pipeline;
mod flops_parity;
mod generate_cli;
mod generate_parity;
mod lora_memory;
mod lora_parity;
mod lora_zero;
mod lr_schedules;
mod model_parity;
mod qlora_parity;
mod tokenizer_parity;
mod zero_behaviour;
mod zero_equivalence;
mod zero_qwen2;
mod zero_streamed_build;
mod zero_streamed_memory;
