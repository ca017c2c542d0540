//! Where the training loop's micro-batches come from: the pretraining block cache or the
//! SFT examples, fed through this rank's `DistributedSampler` so that the union of all
//! ranks' micro-batch k at a step is the same global batch at any world size (the
//! sampler interleaves ranks), and so that the position can be saved and restored.

use crate::data::batch::{Batch, collate_blocks, collate_sft};
use crate::data::expand_files;
use crate::data::pretrain::{PretrainConfig, PretrainDataset, check_block_size, poll_wait};
use crate::data::sampler::{DistributedSampler, SamplerState};
use crate::data::sft::{SftConfig, SftDataset};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use rsdeep_contract::config::{Task, TrainConfig};
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;

/// The examples of one split.
pub enum Examples {
    Pretrain(PretrainDataset),
    Sft { dataset: SftDataset, pad_id: u32 },
}

impl Examples {
    /// Number of examples (blocks or conversations/packed blocks).
    pub fn len(&self) -> usize {
        match self {
            Examples::Pretrain(d) => d.len(),
            Examples::Sft { dataset, .. } => dataset.examples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Collates the examples at `indices` into one micro-batch on `device`.
    pub fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        match self {
            Examples::Pretrain(d) => {
                let blocks = indices
                    .iter()
                    .map(|&i| d.block(i))
                    .collect::<Result<Vec<_>>>()?;
                collate_blocks(&blocks, device)
            }
            Examples::Sft { dataset, pad_id } => {
                let picked: Vec<_> = indices.iter().map(|&i| &dataset.examples[i]).collect();
                collate_sft(&picked, *pad_id, device)
            }
        }
    }
}

/// Everything needed to load a split the same way on every rank.
pub struct DataPlan<'a> {
    pub config: &'a TrainConfig,
    pub tokenizer: &'a Tokenizer,
    pub max_position_embeddings: usize,
    /// This node's data-building rank (local rank 0) builds caches; the others wait.
    pub is_builder: bool,
}

impl DataPlan<'_> {
    /// The block size: `block_size`, or HF run_clm's default min(1024, max positions).
    pub fn block_size(&self) -> usize {
        let args = &self.config.args;
        match args.task {
            Task::Pretrain => args
                .block_size
                .unwrap_or(self.max_position_embeddings.min(1024)),
            _ => args.max_seq_length,
        }
    }

    /// Loads `files` (train or eval split) for the configured task.
    pub fn load(&self, files: &[String]) -> Result<Examples> {
        let args = &self.config.args;
        if files.is_empty() {
            return Err(Error::Config(
                "no data files given (train_files / eval_files is empty)".into(),
            ));
        }
        let paths = expand_files(files)?;
        check_block_size(self.block_size(), self.max_position_embeddings)?;
        match args.task {
            Task::Pretrain => {
                let config = PretrainConfig {
                    files: paths,
                    text_field: args.text_field.clone(),
                    block_size: self.block_size(),
                    skip_bad_lines: args.skip_bad_lines,
                    cache_dir: cache_dir(),
                };
                let wait = poll_wait(Duration::from_millis(200), Duration::from_secs(3600));
                let dataset =
                    PretrainDataset::load_or_build(&config, self.tokenizer, self.is_builder, wait)?;
                Ok(Examples::Pretrain(dataset))
            }
            _ => {
                let config = SftConfig {
                    max_seq_length: args.max_seq_length,
                    packing: args.packing,
                    skip_bad_lines: args.skip_bad_lines,
                };
                let dataset = SftDataset::load(&paths, self.tokenizer, &config)?;
                let pad_id = self
                    .tokenizer
                    .pad_id()
                    .or(self.tokenizer.eos_id())
                    .ok_or_else(|| {
                        Error::Tokenizer("the tokenizer has neither a pad nor an eos token".into())
                    })?;
                Ok(Examples::Sft { dataset, pad_id })
            }
        }
    }
}

/// Where token caches live: `$RSDEEP_CACHE_DIR`, else `$RSDEEP_HOME/cache`, else
/// `~/.cache/rsdeep/cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(rsdeep_contract::env::CACHE_DIR) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os(rsdeep_contract::env::HOME)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rsdeep")))
        .unwrap_or_else(|| PathBuf::from(".rsdeep"));
    home.join("cache")
}

/// This rank's stream of micro-batches over epochs.
pub struct BatchStream {
    sampler: DistributedSampler,
    micro_batch: usize,
}

impl BatchStream {
    /// A shuffled, drop-last stream (so every rank takes the same number of steps).
    pub fn new(
        len: usize,
        world_size: usize,
        rank: usize,
        seed: u64,
        micro_batch: usize,
    ) -> Result<Self> {
        let sampler = DistributedSampler::new(len, world_size, rank, true, seed, true)?;
        if sampler.per_rank_len() < micro_batch {
            return Err(Error::Data(format!(
                "{len} examples give each of {world_size} ranks {} per epoch, fewer than one micro-batch of {micro_batch}: add data or lower per_device_train_batch_size",
                sampler.per_rank_len()
            )));
        }
        Ok(BatchStream {
            sampler,
            micro_batch,
        })
    }

    /// Micro-batches per epoch on this rank.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.sampler.per_rank_len() / self.micro_batch
    }

    /// The next micro-batch's indices, moving to the next epoch when this one cannot fill
    /// a whole micro-batch.
    pub fn next_indices(&mut self) -> Vec<usize> {
        let state = self.sampler.state();
        if state.position + self.micro_batch > self.micro_batches_per_epoch() * self.micro_batch {
            self.sampler.set_epoch(state.epoch + 1);
        }
        self.sampler.next_indices(self.micro_batch)
    }

    /// Fractional epoch for logs: epoch + position within it.
    pub fn epoch_progress(&self) -> f64 {
        let state = self.sampler.state();
        let per_epoch = (self.micro_batches_per_epoch() * self.micro_batch).max(1);
        state.epoch as f64 + state.position as f64 / per_epoch as f64
    }

    pub fn state(&self) -> SamplerState {
        self.sampler.state()
    }

    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        self.sampler.restore(state)
    }

    /// Positions the stream after `micro_batches` micro-batches from the start (used when
    /// resuming at another world size, where per-rank positions do not carry over).
    pub fn skip_micro_batches(&mut self, micro_batches: u64) -> Result<()> {
        let per_epoch = self.micro_batches_per_epoch().max(1) as u64;
        let state = SamplerState {
            epoch: micro_batches / per_epoch,
            position: ((micro_batches % per_epoch) as usize) * self.micro_batch,
        };
        self.sampler.restore(state)
    }
}
