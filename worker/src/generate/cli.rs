//! `rsdeep generate --model DIR [--adapter DIR [--base_4bit nf4|fp4 [--double_quant]]]
//! --prompt TEXT [--chat] [--system TEXT] [--max_new_tokens N] [--temperature T]
//! [--top_p P] [--top_k K] [--seed S] [--device cpu|cuda]`: loads the model (with its
//! linears in 4 bits for a QLoRA adapter, and a PEFT adapter), encodes the prompt (with
//! the chat template in chat mode) and streams the generated text to stdout.
//! Contract: `generate/mod.rs`.

use super::{GenerateOptions, TextStreamer, generate, model_eos_ids};
use crate::lora::load_adapter;
use crate::model::CausalLm;
use crate::quant::QuantConfig;
use crate::tokenizer::{ChatMessage, Tokenizer};
use anyhow::{Context, bail};
use clap::Parser;
use std::path::PathBuf;
use tch::{Device, Kind};

#[derive(Parser, Debug)]
#[command(name = "rsdeep generate", about = "Generate text with a KV cache")]
struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Hold the base's linears in 4 bits (nf4 or fp4), as a QLoRA adapter was trained.
    #[arg(long = "base_4bit")]
    base_4bit: Option<String>,
    /// With --base_4bit: double quantization (bnb_4bit_use_double_quant).
    #[arg(long = "double_quant")]
    double_quant: bool,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the tokenizer's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (chat mode).
    #[arg(long)]
    system: Option<String>,
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 128
    )]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 1.0)]
    top_p: f64,
    /// 0 = off.
    #[arg(long = "top_k", alias = "top-k", default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or cuda (cuda:N for a given GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Ok(Device::Cuda(index)),
            _ => bail!("unknown device {other:?} (cpu, cuda or cuda:N)"),
        },
    }
}

/// CLI entry: `args` are the words after `generate`.
pub fn generate_cli(args: &[String]) -> anyhow::Result<()> {
    let args = GenerateArgs::try_parse_from(
        std::iter::once("generate".to_string()).chain(args.iter().cloned()),
    )?;
    if !(args.top_p > 0.0 && args.top_p <= 1.0) || args.temperature < 0.0 {
        bail!("need 0 < top_p <= 1 and temperature >= 0");
    }
    let device = parse_device(&args.device)?;
    let config = crate::model::ModelConfig::from_file(&args.model.join("config.json"))
        .with_context(|| format!("reading {}/config.json", args.model.display()))?;
    let kind = match device {
        Device::Cpu => Kind::Float,
        _ => config.declared_kind()?.unwrap_or(Kind::Float),
    };
    let mut model = CausalLm::from_pretrained(&args.model, device, kind)
        .with_context(|| format!("loading {}", args.model.display()))?;
    if let Some(quant) = QuantConfig::from_flags(args.base_4bit.as_deref(), args.double_quant)? {
        model
            .quantize_linears(quant)
            .context("storing the base in 4 bits")?;
    }
    if let Some(adapter) = &args.adapter {
        load_adapter(&mut model, adapter)
            .with_context(|| format!("loading adapter {}", adapter.display()))?;
    }
    let tokenizer = Tokenizer::from_dir(&args.model)
        .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
    let prompt_ids = encode_prompt(&tokenizer, &args)?;
    let mut eos_ids = model_eos_ids(&args.model, &model.config)?;
    eos_ids.extend(tokenizer.eos_id());
    if args.chat {
        // A chat turn ends with the template's end-of-turn token (Qwen's generation
        // config lists <|im_end|> as an eos id for the same reason).
        eos_ids.extend(
            ["<|im_end|>", "<|eot_id|>"]
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t)),
        );
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        eos_ids: eos_ids.clone(),
    };
    let mut streamer = TextStreamer::new(&tokenizer, std::io::stdout().lock());
    let started = std::time::Instant::now();
    let produced = generate(
        &model,
        Some(&tokenizer),
        &prompt_ids,
        &opts,
        |id| match eos_ids.contains(&id) {
            true => Ok(()),
            false => streamer.push(id),
        },
    )?;
    streamer.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "\n[{} prompt tokens, {} new tokens in {seconds:.2}s, {:.1} tokens/s]",
        prompt_ids.len(),
        produced.len(),
        produced.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

fn encode_prompt(tokenizer: &Tokenizer, args: &GenerateArgs) -> anyhow::Result<Vec<u32>> {
    if !args.chat {
        return Ok(tokenizer.encode(&args.prompt, true)?);
    }
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.as_str()));
    }
    messages.push(ChatMessage::new("user", args.prompt.as_str()));
    let text = tokenizer.apply_chat_template(&messages, true)?;
    Ok(tokenizer.encode(&text, false)?)
}
