//! Training data: the pretraining block dataset with its on-disk cache, the SFT chat
//! dataset, the distributed sampler and micro-batch collation.
//!
//! Contracts live in each module's `//!`: `pretrain` (JSONL -> EOS per document ->
//! group_texts blocks, cache keyed by inputs), `sft` (three chat shapes, assistant-only
//! labels, packing), `sampler` (seeded shuffle, disjoint shards, exact resume), `batch`
//! ((B, T) int64 tensors). docs/data.md describes the user-facing side.

pub mod batch;
pub mod pretrain;
pub mod sampler;
pub mod sft;

pub use batch::{Batch, collate_blocks, collate_sft};
pub use pretrain::{PretrainConfig, PretrainDataset, check_block_size, poll_wait};
pub use sampler::{DistributedSampler, SamplerState};
pub use sft::{IGNORE_INDEX, SftConfig, SftDataset, SftExample};
