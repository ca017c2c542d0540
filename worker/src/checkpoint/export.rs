//! A run's final Hugging Face weights written straight from the ZeRO engine, one block at
//! a time: every rank takes part in each block's gather (a collective when the masters
//! are partitioned), rank 0 streams that block's tensors into the safetensors file and
//! drops them before the next block is gathered. So no rank holds the whole model in full
//! (ZeRO-3) or a second full copy of it (stages 0-2) at the end of a run, the moment that
//! used to set rank 0's peak RSS. Layout as transformers' `save_pretrained`:
//! `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
//! `max_shard_bytes` plus `model.safetensors.index.json`; each file written to a temp
//! name, fsynced and renamed. Tensors appear in model order. Called by `train/run.rs`.

use super::tensor_file::{TensorBytes, TensorSpec, write_streaming};
use crate::model::{INDEX_FILE, SINGLE_FILE};
use crate::zero::ZeroEngine;
use crate::{Error, Result};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use tch::{Kind, Tensor};

/// Writes the engine's trainable weights as `dtype` into `dir` (rank 0 when `writer`;
/// every rank must call it). The model must have no frozen parameters (a LoRA run saves
/// its adapters instead).
pub fn write_final_weights(
    engine: &mut ZeroEngine,
    dir: &Path,
    dtype: Kind,
    max_shard_bytes: u64,
    writer: bool,
) -> Result<()> {
    let _span = tracing::info_span!("write_final_weights", rank = engine.rank()).entered();
    if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(Error::Checkpoint(format!(
            "weights are written as fp32, bf16 or fp16, not {dtype:?}"
        )));
    }
    if engine.memory_report().frozen_bytes > 0 {
        return Err(Error::Checkpoint(
            "the final export streams trainable weights only; this model has frozen parameters"
                .into(),
        ));
    }
    let mut blocks = BlockWeights {
        engine,
        next_block: 0,
        pending: VecDeque::new(),
        keep: writer,
    };
    let written = match writer {
        true => write_files(&mut blocks, dir, dtype, max_shard_bytes),
        false => Ok(()),
    };
    // Every block's gather runs on every rank, also when the writer failed part way (the
    // other ranks would otherwise wait in the next gather).
    let finished = blocks.finish();
    written.and(finished)
}

/// Rank 0's part: plans the shards and writes each, pulling tensors block by block.
fn write_files(
    blocks: &mut BlockWeights<'_>,
    dir: &Path,
    dtype: Kind,
    max_shard_bytes: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let specs: Vec<TensorSpec> = (0..blocks.engine.block_count())
        .flat_map(|b| blocks.engine.block_weight_specs(b))
        .map(|(name, shape)| TensorSpec {
            name,
            kind: dtype,
            shape,
        })
        .collect();
    let shards = plan_shards(&specs, max_shard_bytes.max(1));
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = match count {
            1 => SINGLE_FILE.to_string(),
            _ => format!("model-{:05}-of-{count:05}.safetensors", i + 1),
        };
        let temp = dir.join(format!(".{file}.tmp"));
        write_streaming(&temp, shard, |j| {
            let (name, tensor) = blocks.next()?;
            if name != shard[j].name {
                return Err(Error::Checkpoint(format!(
                    "export order: expected {}, the engine gave {name}",
                    shard[j].name
                )));
            }
            TensorBytes::of(&tensor.f_to_kind(dtype)?)
        })?;
        rename(&temp, &dir.join(&file))?;
        for spec in shard {
            weight_map.insert(spec.name.clone(), file.clone());
        }
    }
    if count == 1 {
        return remove_if_present(&dir.join(INDEX_FILE));
    }
    let total_size: u64 = specs.iter().map(TensorSpec::byte_len).sum();
    let index =
        serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::Checkpoint(format!("{INDEX_FILE}: {e}")))?;
    let temp = dir.join(format!(".{INDEX_FILE}.tmp"));
    std::fs::write(&temp, text + "\n")
        .map_err(|e| Error::io(format!("writing {}", temp.display()), e))?;
    rename(&temp, &dir.join(INDEX_FILE))?;
    remove_if_present(&dir.join(SINGLE_FILE))
}

/// The engine's trainable weights, gathered one block at a time as they are consumed.
struct BlockWeights<'e> {
    engine: &'e mut ZeroEngine,
    next_block: usize,
    pending: VecDeque<(String, Tensor)>,
    /// Whether this rank keeps the gathered tensors (the writer) or only takes part.
    keep: bool,
}

impl BlockWeights<'_> {
    /// The next weight in model order, gathering the next block when needed.
    fn next(&mut self) -> Result<(String, Tensor)> {
        while self.pending.is_empty() {
            if self.next_block >= self.engine.block_count() {
                return Err(Error::Checkpoint(
                    "export asked for more weights than the model has".into(),
                ));
            }
            let weights = self
                .engine
                .gather_block_weights(self.next_block, self.keep)?;
            self.next_block += 1;
            self.pending.extend(weights);
        }
        self.pending
            .pop_front()
            .ok_or_else(|| Error::Checkpoint("export: no weight left".into()))
    }

    /// Takes part in the gathers of the blocks not consumed yet.
    fn finish(&mut self) -> Result<()> {
        while self.next_block < self.engine.block_count() {
            self.engine.gather_block_weights(self.next_block, false)?;
            self.next_block += 1;
        }
        Ok(())
    }
}

/// Groups tensors in order into shards of at most `max_bytes` (a larger tensor gets its
/// own shard), as transformers does.
fn plan_shards(specs: &[TensorSpec], max_bytes: u64) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut current = 0u64;
    for spec in specs {
        let size = spec.byte_len();
        if shards.last().is_some_and(|s| !s.is_empty()) && current + size > max_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(spec.clone());
        }
        current += size;
    }
    shards
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", from.display(), to.display()),
            e,
        )
    })
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing stale {}", path.display()), e)),
    }
}
