//! `rsdeep consolidate checkpoint-N OUT` (DeepSpeed's `zero_to_fp32.py`): Hugging Face
//! safetensors (fp32, bf16 or fp16; sharded with `model.safetensors.index.json` above
//! the shard size) plus `config.json` and the tokenizer files, built from the ZeRO
//! partitions of a checkpoint. Streaming: one parameter is assembled at a time from the
//! partitions (positioned reads, nothing mapped) and written straight into its shard, so
//! peak memory is a small multiple of the largest tensor, not of the model. Contract:
//! `docs/checkpoints.md`.

use super::FROZEN_FILE;
use super::manifest::{FileEntry, Manifest, write_synced};
use super::resume::PartitionReader;
use super::tensor_file::{TensorBytes, TensorFile, TensorSpec, write_streaming};
use crate::model::{INDEX_FILE, SINGLE_FILE};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Tokenizer files copied next to the weights when the checkpoint has them.
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Where an output tensor comes from.
enum Source {
    Partition,
    Frozen,
}

struct OutputTensor {
    spec: TensorSpec,
    source: Source,
}

/// Writes HF weights of `checkpoint_dir` into `out_dir` as `dtype`, sharded above
/// `max_shard_bytes`. Every partition file is verified against the manifest first.
pub fn consolidate(
    checkpoint_dir: &Path,
    out_dir: &Path,
    dtype: Kind,
    max_shard_bytes: u64,
) -> Result<()> {
    let _span = tracing::info_span!("consolidate", dir = %checkpoint_dir.display()).entered();
    if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(Error::Checkpoint(format!(
            "consolidate writes fp32, bf16 or fp16, not {dtype:?}"
        )));
    }
    let manifest = Manifest::read(checkpoint_dir)?;
    let reader = PartitionReader::open(checkpoint_dir, &manifest)?;
    if reader
        .meta()
        .frozen
        .iter()
        .any(|n| n.ends_with(".weight.absmax"))
    {
        return Err(Error::Checkpoint(format!(
            "{}: a QLoRA checkpoint holds its base in 4 bits, not as model weights; use its \
             adapter (adapter_model.safetensors) with the original base, e.g. `rsdeep \
             merge-lora`",
            checkpoint_dir.display()
        )));
    }
    let frozen = if reader.meta().frozen.is_empty() {
        None
    } else {
        manifest.verify_file(checkpoint_dir, FROZEN_FILE)?;
        Some(TensorFile::open(&checkpoint_dir.join(FROZEN_FILE))?)
    };
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    write_weights(&reader, frozen.as_ref(), out_dir, dtype, max_shard_bytes)?;
    copy_config(checkpoint_dir, out_dir, dtype)?;
    for name in TOKENIZER_FILES {
        let source = checkpoint_dir.join(name);
        if source.is_file() {
            std::fs::copy(&source, out_dir.join(name))
                .map_err(|e| Error::io(format!("copying {}", source.display()), e))?;
        }
    }
    Ok(())
}

/// Writes the HF weights held by `reader`'s partitions (masters, in saved order) and
/// `frozen` (parameters outside the optimizer) into `out_dir` as `dtype`:
/// `model.safetensors`, or shards of at most `max_shard_bytes` plus the index. One
/// parameter at a time is in memory. Returns every written file (name in `out_dir`) with
/// its size and sha256; each is fsynced.
pub(super) fn write_weights(
    reader: &PartitionReader,
    frozen: Option<&TensorFile>,
    out_dir: &Path,
    dtype: Kind,
    max_shard_bytes: u64,
) -> Result<Vec<(String, FileEntry)>> {
    if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(Error::Checkpoint(format!(
            "weights are written as fp32, bf16 or fp16, not {dtype:?}"
        )));
    }
    let tensors = output_tensors(reader, frozen, dtype)?;
    let shards = plan_shards(&tensors, max_shard_bytes.max(1));
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut written = Vec::with_capacity(count + 1);
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let specs: Vec<TensorSpec> = shard.iter().map(|t| t.spec.clone()).collect();
        let entry = write_streaming(&out_dir.join(&file), &specs, |j| {
            source_bytes(reader, frozen, shard[j], dtype)
        })?;
        for t in shard {
            weight_map.insert(t.spec.name.clone(), file.clone());
        }
        written.push((file, entry));
    }
    if count > 1 {
        let total_size: u64 = tensors.iter().map(|t| t.spec.byte_len()).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::Checkpoint(format!("{INDEX_FILE}: {e}")))?;
        let entry = write_synced(&out_dir.join(INDEX_FILE), (text + "\n").as_bytes())?;
        written.push((INDEX_FILE.to_string(), entry));
    }
    Ok(written)
}

/// Every output tensor: the partitions' parameters in saved order, then the frozen ones.
fn output_tensors(
    reader: &PartitionReader,
    frozen: Option<&TensorFile>,
    dtype: Kind,
) -> Result<Vec<OutputTensor>> {
    let mut tensors: Vec<OutputTensor> = reader
        .params()
        .map(|(name, shape)| OutputTensor {
            spec: TensorSpec {
                name: name.to_string(),
                kind: dtype,
                shape: shape.to_vec(),
            },
            source: Source::Partition,
        })
        .collect();
    if let Some(file) = frozen {
        for name in &reader.meta().frozen {
            tensors.push(OutputTensor {
                spec: TensorSpec {
                    name: name.clone(),
                    kind: dtype,
                    shape: file.location(name)?.shape.clone(),
                },
                source: Source::Frozen,
            });
        }
    }
    Ok(tensors)
}

/// One output tensor's bytes in `dtype`: the fp32 master bytes as read when no cast is
/// needed (one copy of the tensor in memory), else read, cast and handed over.
fn source_bytes<'a>(
    reader: &PartitionReader,
    frozen: Option<&TensorFile>,
    tensor: &OutputTensor,
    dtype: Kind,
) -> Result<TensorBytes<'a>> {
    let name = &tensor.spec.name;
    let stored = match tensor.source {
        Source::Partition => {
            let (bytes, shape) = reader.read_param_bytes(name, "master")?;
            if dtype == Kind::Float {
                return Ok(TensorBytes::Owned(bytes));
            }
            Tensor::f_from_data_size(&bytes, &shape, Kind::Float)?
        }
        Source::Frozen => frozen
            .ok_or_else(|| Error::Checkpoint("frozen parameters file missing".into()))?
            .tensor(name)?,
    };
    TensorBytes::of(&stored.f_to_kind(dtype)?)
}

/// Groups tensors in order into shards of at most `max_bytes` (a larger tensor gets its
/// own shard), as transformers does.
fn plan_shards(tensors: &[OutputTensor], max_bytes: u64) -> Vec<Vec<&OutputTensor>> {
    let mut shards: Vec<Vec<&OutputTensor>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let size = t.spec.byte_len();
        if shards.last().is_some_and(|s| !s.is_empty()) && current + size > max_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
        current += size;
    }
    shards
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Copies `config.json`, declaring the output dtype (`torch_dtype` and `dtype`).
fn copy_config(checkpoint_dir: &Path, out_dir: &Path, dtype: Kind) -> Result<()> {
    let source = checkpoint_dir.join("config.json");
    let text = std::fs::read_to_string(&source).map_err(|e| {
        Error::Checkpoint(format!(
            "{} is missing ({e}); the checkpoint is incomplete",
            source.display()
        ))
    })?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{} is damaged: {e}", source.display())))?;
    let name = match dtype {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    if let Some(object) = config.as_object_mut() {
        object.insert("torch_dtype".into(), name.into());
        if object.contains_key("dtype") {
            object.insert("dtype".into(), name.into());
        }
    }
    write_json(&out_dir.join("config.json"), &config)
}

/// Parses `5GB`, `500MB`, `10KiB`, `1234` (bytes), as transformers' `max_shard_size`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * scale) as u64)
}

/// `consolidate CHECKPOINT_DIR OUT_DIR [--dtype fp32|bf16|fp16] [--max_shard_size 5GB]`
/// (the arguments after the subcommand name).
pub fn consolidate_cli(args: &[String]) -> anyhow::Result<()> {
    use anyhow::{Context, bail};
    const USAGE: &str =
        "usage: consolidate CHECKPOINT_DIR OUT_DIR [--dtype fp32|bf16|fp16] [--max_shard_size 5GB]";
    let mut positional = Vec::new();
    let (mut dtype, mut max_shard) = (Kind::Float, 5_000_000_000u64);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--dtype" => {
                dtype = match iter.next().map(String::as_str) {
                    Some("fp32" | "float32") => Kind::Float,
                    Some("bf16" | "bfloat16") => Kind::BFloat16,
                    Some("fp16" | "float16") => Kind::Half,
                    other => bail!("--dtype {other:?}: expected fp32, bf16 or fp16\n{USAGE}"),
                }
            }
            "--max_shard_size" => {
                let value = iter.next().context(USAGE)?;
                max_shard = parse_size(value)
                    .with_context(|| format!("--max_shard_size {value}: expected e.g. 5GB"))?;
            }
            other if other.starts_with("--") => bail!("unknown option {other}\n{USAGE}"),
            other => positional.push(other.to_string()),
        }
    }
    let [checkpoint, out] = positional.as_slice() else {
        bail!(USAGE)
    };
    consolidate(Path::new(checkpoint), Path::new(out), dtype, max_shard)
        .with_context(|| format!("consolidating {checkpoint} into {out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("2KiB"), Some(2048));
        assert_eq!(parse_size("1234"), Some(1234));
        assert_eq!(parse_size("5XB"), None);
    }

    #[test]
    fn cli_rejects_bad_arguments_with_usage() {
        let err = consolidate_cli(&["only-one".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("usage"), "{err}");
        let err = consolidate_cli(&["a".into(), "b".into(), "--dtype".into(), "int8".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dtype"), "{err}");
    }
}
