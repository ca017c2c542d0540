//! `rsdeep convert gguf FILE OUT_DIR [--dtype f32|bf16]`: a llama.cpp GGUF model as a
//! Hugging Face folder that transformers and rsdeep load (`to_hf.rs` holds the contract:
//! names, Q/K rows, config, tokenizer), read by `gguf.rs` and decoded by `dequant.rs`.

pub mod dequant;
pub mod gguf;
pub mod to_hf;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use tch::Kind;

const USAGE: &str = "usage: rsdeep convert gguf FILE.gguf OUT_DIR [--dtype f32|bf16]";

/// The `convert` command.
pub fn convert_cli(args: &[String]) -> anyhow::Result<()> {
    let Some((format, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    if format == "--help" || format == "-h" {
        println!(
            "{USAGE}\n\nWrites config.json, model.safetensors, tokenizer.json, tokenizer_config.json and\ngeneration_config.json (weights dequantized to f32, or bf16 with --dtype bf16)."
        );
        return Ok(());
    }
    if format != "gguf" {
        bail!("unknown format \"{format}\": only gguf is converted\n{USAGE}");
    }
    let (mut positional, mut dtype) = (Vec::new(), Kind::Float);
    let mut iter = rest.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--dtype" => {
                dtype = match iter.next().map(String::as_str) {
                    Some("f32" | "float32") => Kind::Float,
                    Some("bf16" | "bfloat16") => Kind::BFloat16,
                    other => bail!("--dtype {other:?}: use f32 or bf16\n{USAGE}"),
                }
            }
            flag if flag.starts_with("--") => bail!("unknown flag {flag}\n{USAGE}"),
            path => positional.push(PathBuf::from(path)),
        }
    }
    let [file, out] = positional.as_slice() else {
        bail!("{USAGE}");
    };
    let started = Instant::now();
    let gguf = gguf::GgufFile::open(file)?;
    let count = to_hf::convert(&gguf, out, dtype)
        .with_context(|| format!("converting {} into {}", file.display(), out.display()))?;
    println!(
        "converted {} (GGUF v{}, {}) into {}: {count} tensors as {}, tokenizer and configs, in {:.1} s",
        file.display(),
        gguf.version,
        gguf.get_str("general.architecture").unwrap_or("?"),
        out.display(),
        if dtype == Kind::BFloat16 {
            "bf16"
        } else {
            "f32"
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
