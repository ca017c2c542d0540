//! `rsdeep merge-lora --base DIR --adapter DIR --out DIR`: folds a PEFT adapter into its
//! base (W' = W + scaling * B A) and writes a plain Hugging Face model (config.json,
//! safetensors, tokenizer files copied when present). For a QLoRA adapter,
//! `--base_4bit nf4|fp4 [--double_quant]` first stores the base in 4 bits as training
//! did, and the merge writes dequantize(W) + scaling * B A in the base's dtype: the
//! model the adapter was trained with, unquantized. Contract: `lora/mod.rs`.

use super::load_adapter;
use crate::Result;
use crate::model::CausalLm;
use crate::quant::QuantConfig;
use anyhow::Context;
use clap::Parser;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Tokenizer and generation files copied from the base (or adapter) folder to the output.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Shard size of the written model (transformers' default, 5 GB).
const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Folds every adapter of `model` into its base weights and removes the adapter params.
pub fn merge_lora(model: &mut CausalLm) -> Result<()> {
    for layer in model.decoder_layers_mut() {
        layer.merge_lora()?;
    }
    for p in model.params() {
        let _ = p.tensor.f_set_requires_grad(true)?;
    }
    Ok(())
}

#[derive(Parser, Debug)]
#[command(
    name = "rsdeep merge-lora",
    about = "Merge a PEFT LoRA adapter into its base model"
)]
struct MergeArgs {
    /// Base Hugging Face model folder.
    #[arg(long)]
    base: PathBuf,
    /// Adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder for the merged model.
    #[arg(long)]
    out: PathBuf,
    /// Hold the base's linears in 4 bits (nf4 or fp4), as a QLoRA adapter was trained.
    #[arg(long = "base_4bit")]
    base_4bit: Option<String>,
    /// With --base_4bit: double quantization (bnb_4bit_use_double_quant).
    #[arg(long = "double_quant")]
    double_quant: bool,
}

/// CLI entry: `args` are the words after `merge-lora`.
pub fn merge_lora_cli(args: &[String]) -> anyhow::Result<()> {
    let args = MergeArgs::try_parse_from(
        std::iter::once("merge-lora".to_string()).chain(args.iter().cloned()),
    )?;
    let mut model = CausalLm::from_pretrained(&args.base, Device::Cpu, Kind::Float)
        .with_context(|| format!("loading base model {}", args.base.display()))?;
    if let Some(quant) = QuantConfig::from_flags(args.base_4bit.as_deref(), args.double_quant)? {
        model
            .quantize_linears(quant)
            .context("storing the base in 4 bits")?;
    }
    let method = super::read_adapter_config(&args.adapter)?;
    let unmergeable = match (&method.prefix_tuning, &method.bottleneck) {
        (Some(_), _) => Some("a prefix-tuning adapter has no weights to merge"),
        (_, Some(_)) => Some("a bottleneck adapter adds layers of its own, it cannot merge"),
        _ => None,
    };
    if let Some(why) = unmergeable {
        anyhow::bail!(
            "{}: {why}; use it with `rsdeep generate --adapter`",
            args.adapter.display()
        );
    }
    let info = load_adapter(&mut model, &args.adapter)
        .with_context(|| format!("loading adapter {}", args.adapter.display()))?;
    merge_lora(&mut model).context("merging")?;
    let dtype = model.config.declared_kind()?.unwrap_or(Kind::Float);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    model
        .save_pretrained(&args.out, MAX_SHARD_BYTES, dtype)
        .with_context(|| format!("writing {}", args.out.display()))?;
    copy_side_files(&args.base, &args.adapter, &args.out)?;
    println!(
        "merged {} adapter tensors into {} -> {}",
        info.adapter_names.len(),
        args.base.display(),
        args.out.display()
    );
    Ok(())
}

/// Copies tokenizer/generation files, preferring the adapter folder's copy.
fn copy_side_files(base: &Path, adapter: &Path, out: &Path) -> anyhow::Result<()> {
    for name in SIDE_FILES {
        let source = [adapter.join(name), base.join(name)]
            .into_iter()
            .find(|p| p.is_file());
        if let Some(source) = source {
            std::fs::copy(&source, out.join(name))
                .with_context(|| format!("copying {}", source.display()))?;
        }
    }
    Ok(())
}
