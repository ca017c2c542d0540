//! The checkpoint benchmark (run through `benches/checkpoint/run.sh`; figures recorded in
//! `docs/checkpoints.md`): synchronous save and verified load throughput of a single-rank
//! checkpoint (GB/s of optimizer partition + weights), consolidation throughput, and the
//! training stall of an asynchronous save (snapshot + commit) against the synchronous
//! save time. Prints one `key<TAB>value` line per figure and leaves the checkpoint in
//! OUT_DIR so the Python side can `torch.save`/`torch.load` the very same tensors.
//!
//! Usage: checkpoint_bench OUT_DIR [--hidden 512] [--layers 4] [--vocab 8192] [--repeats 3]

use anyhow::{Context, Result, bail};
use rsdeep_worker::checkpoint::{
    SaveRequest, TrainerState, consolidate, load_checkpoint, save_checkpoint, save_checkpoint_async,
};
use rsdeep_worker::model::{CausalLm, ModelConfig, ModelType};
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind};

struct Args {
    out: PathBuf,
    hidden: usize,
    layers: usize,
    vocab: usize,
    repeats: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: PathBuf::new(),
        hidden: 512,
        layers: 4,
        vocab: 8192,
        repeats: 3,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut value = || -> Result<usize> {
            iter.next()
                .context("missing value")?
                .parse()
                .with_context(|| format!("{arg} wants a number"))
        };
        match arg.as_str() {
            "--hidden" => args.hidden = value()?,
            "--layers" => args.layers = value()?,
            "--vocab" => args.vocab = value()?,
            "--repeats" => args.repeats = value()?,
            other if other.starts_with("--") => bail!("unknown option {other}"),
            other => args.out = PathBuf::from(other),
        }
    }
    if args.out.as_os_str().is_empty() {
        bail!(
            "usage: checkpoint_bench OUT_DIR [--hidden N] [--layers N] [--vocab N] [--repeats N]"
        );
    }
    Ok(args)
}

fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                folder_bytes(&e.path())
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

fn request<'a>(
    out: &'a Path,
    engine: &'a mut ZeroEngine,
    comm: &'a LocalCommunicator,
    config_json: &'a str,
    state: &'a TrainerState,
    round: usize,
) -> SaveRequest<'a> {
    SaveRequest {
        output_dir: out,
        step: 1,
        engine,
        comm,
        model_config_json: config_json,
        tokenizer: None,
        trainer_state: state,
        per_rank_extra: serde_json::json!({"round": round}),
        save_total_limit: Some(1),
        max_shard_bytes: 5_000_000_000,
        write_model_weights: true,
        weights_dtype: Kind::Float,
    }
}

fn median(mut values: Vec<Duration>) -> f64 {
    values.sort();
    values[values.len() / 2].as_secs_f64()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let mut config = ModelConfig::new(
        ModelType::Qwen2,
        args.vocab,
        args.hidden,
        args.hidden * 3,
        args.layers,
        8,
        4,
    );
    config.tie_word_embeddings = false;
    let config_json = config.to_json_string()?;
    let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 1)?;
    let comm = Arc::new(LocalCommunicator::world(1).pop().context("one rank")?);
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        blocks: model.blocks,
        frozen: Default::default(),
    };
    let engine_config = EngineConfig {
        stage: 1,
        train_micro_batch_size_per_gpu: 1,
        train_batch_size: 1,
        ..Default::default()
    };
    let mut engine = ZeroEngine::new(engine_model, comm.clone(), engine_config)?;
    let state = TrainerState::default();
    std::fs::create_dir_all(&args.out)?;

    let mut save_times = Vec::new();
    let mut stalls = Vec::new();
    let mut snapshots = Vec::new();
    let mut load_times = Vec::new();
    let mut consolidate_times = Vec::new();
    let checkpoint = args.out.join("checkpoint-1");
    for round in 0..args.repeats {
        let started = Instant::now();
        save_checkpoint(request(
            &args.out,
            &mut engine,
            &*comm,
            &config_json,
            &state,
            round,
        ))?;
        save_times.push(started.elapsed());

        let started = Instant::now();
        let pending = save_checkpoint_async(request(
            &args.out,
            &mut engine,
            &*comm,
            &config_json,
            &state,
            round,
        ))?;
        let snapshot = started.elapsed();
        let mut stall = snapshot;
        while !pending.is_written() {
            std::thread::sleep(Duration::from_millis(5)); // training would run here
        }
        let started = Instant::now();
        pending.finish(&*comm)?;
        stall += started.elapsed();
        stalls.push(stall);
        snapshots.push(snapshot);

        let started = Instant::now();
        load_checkpoint(&checkpoint, &mut engine, 0, 1)?;
        load_times.push(started.elapsed());

        let consolidated = args.out.join("consolidated");
        let started = Instant::now();
        consolidate(&checkpoint, &consolidated, Kind::Float, 5_000_000_000)?;
        consolidate_times.push(started.elapsed());
    }
    let bytes = folder_bytes(&checkpoint) as f64;
    let (save, load) = (median(save_times), median(load_times));
    let stall = median(stalls);
    let consolidated = folder_bytes(&args.out.join("consolidated")) as f64;
    println!("checkpoint_bytes\t{bytes}");
    println!("save_seconds\t{save:.4}");
    println!("save_gbps\t{:.3}", bytes / save / 1e9);
    println!("load_seconds\t{load:.4}");
    println!("load_gbps\t{:.3}", bytes / load / 1e9);
    println!("async_stall_seconds\t{stall:.4}");
    println!("async_snapshot_seconds\t{:.4}", median(snapshots));
    println!("async_stall_fraction\t{:.3}", stall / save);
    println!(
        "consolidate_gbps\t{:.3}",
        consolidated / median(consolidate_times) / 1e9
    );
    Ok(())
}
