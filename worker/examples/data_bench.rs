//! The data benchmark (run through benches/data/run.sh; figures recorded in docs/data.md):
//! tokenization throughput of rsdeep against Python `tokenizers` on the same corpus, and
//! the time the data pipeline adds to one training step.
//!
//! Usage: data_bench --tokenizer DIR --corpus PRETRAIN.jsonl --sft SFT.jsonl
//!        [--block_size 1024] [--micro_batch 8] [--steps 200] [--step_ms 160]
//! `--step_ms` is the training step the pipeline is compared with (default: Qwen2-0.5B,
//! 8 x 1024 tokens at ~50k tokens/s/GPU on an H100, see docs/data.md).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rsdeep_worker::data::{
    OrderConfig, PretrainConfig, PretrainDataset, SftConfig, SftDataset, Strategy, TrainOrder,
    collate_blocks, collate_sft,
};
use rsdeep_worker::tokenizer::Tokenizer;
use tch::Device;

struct Args {
    tokenizer: PathBuf,
    corpus: PathBuf,
    sft: PathBuf,
    block_size: usize,
    micro_batch: usize,
    steps: usize,
    step_ms: f64,
    repeats: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        tokenizer: PathBuf::new(),
        corpus: PathBuf::new(),
        sft: PathBuf::new(),
        block_size: 1024,
        micro_batch: 8,
        steps: 200,
        step_ms: 160.0,
        repeats: 3,
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.chunks(2) {
        let [flag, value] = pair else {
            bail!("flags come in pairs: {pair:?}")
        };
        match flag.as_str() {
            "--tokenizer" => args.tokenizer = value.into(),
            "--corpus" => args.corpus = value.into(),
            "--sft" => args.sft = value.into(),
            "--block_size" => args.block_size = value.parse()?,
            "--micro_batch" => args.micro_batch = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--step_ms" => args.step_ms = value.parse()?,
            "--repeats" => args.repeats = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn corpus_texts(path: &PathBuf) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["text"].as_str().context("text field")?.to_string())
        })
        .collect()
}

/// Best-of-`repeats` wall time of Rust batch encoding, and the total id count.
fn rust_throughput(
    tokenizer: &Tokenizer,
    texts: &[String],
    repeats: usize,
) -> Result<(f64, usize)> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut best = f64::INFINITY;
    let mut tokens = 0;
    for _ in 0..repeats {
        let start = Instant::now();
        let ids = tokenizer.encode_batch(&refs, false)?;
        best = best.min(start.elapsed().as_secs_f64());
        tokens = ids.iter().map(Vec::len).sum();
    }
    Ok((best, tokens))
}

fn python_throughput(args: &Args) -> Result<serde_json::Value> {
    let python = std::env::var("RSDEEP_PYTHON").context("RSDEEP_PYTHON (source scripts/env.sh)")?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/data/python_encode.py");
    let output = Command::new(python)
        .arg(script)
        .arg(args.tokenizer.join("tokenizer.json"))
        .arg(&args.corpus)
        .arg("text")
        .arg(args.repeats.to_string())
        .output()
        .context("running python_encode.py")?;
    if !output.status.success() {
        bail!(
            "python_encode.py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn mean_ms(total: Duration, steps: usize) -> f64 {
    total.as_secs_f64() * 1e3 / steps as f64
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let tokenizer = Tokenizer::from_dir(&args.tokenizer)?;
    let texts = corpus_texts(&args.corpus)?;
    let bytes: usize = texts.iter().map(String::len).sum();
    println!(
        "corpus: {} documents, {:.2} MB, threads: {}",
        texts.len(),
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );

    let (rust_s, rust_tokens) = rust_throughput(&tokenizer, &texts, args.repeats)?;
    let python = python_throughput(&args)?;
    let py_tokens = python["tokens"].as_u64().context("python tokens")? as usize;
    if py_tokens != rust_tokens {
        bail!("token counts differ: rsdeep {rust_tokens}, python {py_tokens}");
    }
    println!(
        "rsdeep  encode_batch:            {:>8.3} s  {:>10.0} tokens/s  {:>6.2} MB/s",
        rust_s,
        rust_tokens as f64 / rust_s,
        bytes as f64 / 1e6 / rust_s
    );
    for name in ["encode_batch", "encode_batch_fast"] {
        let s = python["seconds"][name].as_f64().context("python seconds")?;
        println!(
            "python  {name:<24} {:>8.3} s  {:>10.0} tokens/s  {:>6.2} MB/s  ratio rsdeep/python = {:.2}",
            s,
            py_tokens as f64 / s,
            bytes as f64 / 1e6 / s,
            s / rust_s
        );
    }

    let cache = tempfile::tempdir()?;
    let config = PretrainConfig {
        files: vec![args.corpus.clone()],
        text_field: "text".into(),
        block_size: args.block_size,
        skip_bad_lines: false,
        cache_dir: cache.path().to_path_buf(),
        group_documents: Some(1000),
        shards: 1,
        append_eos: false,
    };
    let start = Instant::now();
    let dataset = PretrainDataset::load_or_build(&config, &tokenizer, true, || Ok(()))?;
    let build_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let reopened = PretrainDataset::load_or_build(&config, &tokenizer, true, || Ok(()))?;
    println!(
        "pretrain cache: {} blocks of {} built in {:.2} s; reopened (hit={}) in {:.1} ms",
        dataset.len(),
        args.block_size,
        build_s,
        reopened.cache_hit(),
        start.elapsed().as_secs_f64() * 1e3
    );

    let mut order = one_rank_order(dataset.len(), args.micro_batch)?;
    let start = Instant::now();
    for step in 0..args.steps {
        let blocks: Vec<Vec<u32>> = order.window(step as u64).ranks[0][0]
            .iter()
            .map(|&i| dataset.block(i))
            .collect::<rsdeep_worker::Result<_>>()?;
        let batch = collate_blocks(&blocks, Device::Cpu)?;
        std::hint::black_box(&batch);
    }
    let pretrain_ms = mean_ms(start.elapsed(), args.steps);

    let sft_config = SftConfig {
        max_seq_length: args.block_size,
        packing: true,
        skip_bad_lines: false,
        assistant_only_loss: true,
        completion_only_loss: true,
    };
    let start = Instant::now();
    let sft = SftDataset::load(&[&args.sft], &tokenizer, &sft_config)?;
    let sft_load_s = start.elapsed().as_secs_f64();
    let mut sft_order = one_rank_order(sft.examples.len(), args.micro_batch)?;
    let pad = tokenizer.pad_id().context("pad id")?;
    let start = Instant::now();
    for step in 0..args.steps {
        let picked: Vec<_> = sft_order.window(step as u64).ranks[0][0]
            .iter()
            .map(|&i| &sft.examples[i])
            .collect();
        let batch = collate_sft(&picked, pad, Device::Cpu)?;
        std::hint::black_box(&batch);
    }
    let sft_ms = mean_ms(start.elapsed(), args.steps);
    println!(
        "sft: {} packed blocks loaded (rendered, tokenized, masked) in {:.2} s",
        sft.examples.len(),
        sft_load_s
    );
    for (name, ms) in [("pretrain", pretrain_ms), ("sft", sft_ms)] {
        println!(
            "data time per step ({name}, micro-batch {} x {}): {:.3} ms = {:.2}% of a {:.0} ms step",
            args.micro_batch,
            args.block_size,
            ms,
            100.0 * ms / args.step_ms,
            args.step_ms
        );
    }
    Ok(())
}

/// Hugging Face Trainer's random order for one rank, one micro-batch per step.
fn one_rank_order(len: usize, micro_batch: usize) -> anyhow::Result<TrainOrder> {
    let config = OrderConfig {
        len,
        world_size: 1,
        batch: micro_batch,
        grad_accum: 1,
        strategy: Strategy::Random,
        seed: 0,
        drop_last: true,
    };
    Ok(TrainOrder::new(config, Vec::new())?)
}
