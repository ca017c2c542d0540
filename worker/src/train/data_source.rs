//! Where the training loop's micro-batches come from: the pretraining block cache or the
//! SFT examples, in Hugging Face Trainer's order (`data/sampler.rs`), where the global
//! step alone fixes every rank's next micro-batches, so a resume computes its position.

use crate::data::batch::{Batch, collate_blocks, collate_sft};
use crate::data::expand_files;
use crate::data::pretrain::{PretrainConfig, PretrainDataset, check_block_size, poll_wait};
use crate::data::sampler::{OrderConfig, Strategy, TrainOrder, Window};
use crate::data::sft::{IGNORE_INDEX, SftConfig, SftDataset};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use rsdeep_contract::config::{SamplingStrategy, Task, TrainConfig};
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
                    group_documents: args.group_texts_batch_size,
                    shards: args.preprocessing_num_workers.unwrap_or(1),
                    append_eos: args.append_eos,
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
                    assistant_only_loss: args.assistant_only_loss,
                    completion_only_loss: args.completion_only_loss.unwrap_or(true),
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

/// The Trainer's data order over the training split (`data/sampler.rs`), with what HF's
/// loss averaging needs: the label tokens of every rank's micro-batches.
pub struct TrainStream {
    order: TrainOrder,
}

impl TrainStream {
    /// The order `train_sampling_strategy`, `data_seed` (else `seed`) and
    /// `dataloader_drop_last` give for this world size, batch and accumulation.
    pub fn new(config: &TrainConfig, examples: &Examples, world_size: usize) -> Result<Self> {
        let args = &config.args;
        let strategy = match args.train_sampling_strategy {
            SamplingStrategy::Random => Strategy::Random,
            SamplingStrategy::Sequential => Strategy::Sequential,
            SamplingStrategy::GroupByLength => Strategy::GroupByLength,
            SamplingStrategy::BatchRebalance => {
                return Err(Error::Config(
                    "train_sampling_strategy \"batch_rebalance\" is not built in rsdeep".into(),
                ));
            }
        };
        let lengths = match strategy {
            Strategy::GroupByLength => examples.lengths(),
            _ => Vec::new(),
        };
        let order = TrainOrder::new(
            OrderConfig {
                len: examples.len(),
                world_size,
                batch: config.batch.train_micro_batch_size_per_gpu as usize,
                grad_accum: config.batch.gradient_accumulation_steps as usize,
                strategy,
                seed: args.data_seed.unwrap_or(args.seed),
                drop_last: args.dataloader_drop_last,
            },
            lengths,
        )?;
        Ok(TrainStream { order })
    }

    /// Optimizer updates per epoch.
    pub fn updates_per_epoch(&self) -> u64 {
        self.order.updates_per_epoch()
    }

    /// The micro-batches of the `step`-th optimizer step (0-based) on every rank.
    pub fn window(&mut self, step: u64) -> Window {
        self.order.window(step)
    }
}

impl Examples {
    /// Tokens per example (for length grouping).
    pub fn lengths(&self) -> Vec<usize> {
        match self {
            Examples::Pretrain(d) => vec![d.block_size(); d.len()],
            Examples::Sft { dataset, .. } => dataset.examples.iter().map(|e| e.len()).collect(),
        }
    }

    /// Label tokens the loss counts in the examples at `indices`: per row, the labels
    /// after the first that are not ignored (HF's `num_items_in_batch`).
    pub fn label_tokens(&self, indices: &[usize]) -> usize {
        match self {
            Examples::Pretrain(d) => indices.len() * d.block_size().saturating_sub(1),
            Examples::Sft { dataset, .. } => indices
                .iter()
                .map(|&i| {
                    let labels = &dataset.examples[i].labels;
                    labels
                        .iter()
                        .skip(1)
                        .filter(|&&l| l != IGNORE_INDEX)
                        .count()
                })
                .sum(),
        }
    }
}
