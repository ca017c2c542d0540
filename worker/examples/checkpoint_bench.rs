//! The checkpoint benchmark (run through `benches/checkpoint/run.sh`; figures recorded in
//! `docs/checkpoints.md`): synchronous save and verified load throughput of a single-rank
//! checkpoint (GB/s of optimizer partition + weights), consolidation throughput, and the
//! training stall of an asynchronous save against the synchronous save time: the save
//! call + the wait for the background copy before the next optimizer step (after a real
//! forward/backward) + `finish`, and the same with the step right after the save call
//! (no overlap: the worst case). Prints one `key<TAB>value` line per figure and leaves the checkpoint in
//! OUT_DIR so the Python side can `torch.save`/`torch.load` the very same tensors.
//! `--make-only` just saves one checkpoint of `--model-config` on `--world` in-process
//! ranks at `--stage` (no weights under stage 3) for the consolidate memory bench
//! (`benches/checkpoint/consolidate_memory.py`).
//!
//! Usage: checkpoint_bench OUT_DIR [--hidden 512] [--layers 4] [--vocab 8192] [--repeats 3]
//!        checkpoint_bench OUT_DIR --make-only --model-config FILE [--world 2] [--stage 3]

use anyhow::{Context, Result, bail};
use rsdeep_worker::checkpoint::{
    SaveRequest, TrainerState, consolidate, load_checkpoint, save_checkpoint, save_checkpoint_async,
};
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::model::{CausalLm, ForwardCtx, ModelConfig, ModelType, causal_lm_loss};
use rsdeep_worker::zero::ZeroStage;
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

struct Args {
    out: PathBuf,
    hidden: usize,
    layers: usize,
    vocab: usize,
    repeats: usize,
    make_only: bool,
    model_config: Option<PathBuf>,
    world: usize,
    stage: u8,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: PathBuf::new(),
        hidden: 512,
        layers: 4,
        vocab: 8192,
        repeats: 3,
        make_only: false,
        model_config: None,
        world: 2,
        stage: 3,
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
            "--world" => args.world = value()?,
            "--stage" => args.stage = value()? as u8,
            "--make-only" => args.make_only = true,
            "--model-config" => {
                args.model_config = Some(PathBuf::from(iter.next().context("missing value")?))
            }
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
        run: None,
    }
}

fn median(mut values: Vec<Duration>) -> f64 {
    values.sort();
    values[values.len() / 2].as_secs_f64()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.make_only {
        return make_checkpoint(&args);
    }
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
        stage: ZeroStage::One,
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
    let mut stalls_no_overlap = Vec::new();
    let mut forward_backward_times = Vec::new();
    let ids = Tensor::randint(args.vocab as i64, [1, 128], (Kind::Int64, Device::Cpu)); // (B, T)
    let ctx = ForwardCtx::causal(&ids)?;
    let mut load_times = Vec::new();
    let mut consolidate_times = Vec::new();
    let checkpoint = args.out.join("checkpoint-1");
    for round in 0..args.repeats {
        let started = Instant::now();
        save_checkpoint(request(
            &args.out,
            &mut engine,
            &comm,
            &config_json,
            &state,
            round,
        ))?;
        save_times.push(started.elapsed());

        // Asynchronous save inside a training step: the save call, then the next
        // forward/backward (not a stall), the wait for the background copy before the
        // optimizer step, and the finish once the files are out.
        let started = Instant::now();
        let pending = save_checkpoint_async(request(
            &args.out,
            &mut engine,
            &comm,
            &config_json,
            &state,
            round,
        ))?;
        let call = started.elapsed();
        let started = Instant::now();
        engine.forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))?;
        forward_backward_times.push(started.elapsed());
        let started = Instant::now();
        pending.wait_for_snapshot()?;
        let wait = started.elapsed();
        engine.step()?;
        while !pending.is_written() {
            std::thread::sleep(Duration::from_millis(5)); // training would go on here
        }
        let started = Instant::now();
        pending.finish(&*comm)?;
        stalls.push(call + wait + started.elapsed());
        snapshots.push(call);

        // The worst case: the step comes right after the save call (no overlap).
        let started = Instant::now();
        let pending = save_checkpoint_async(request(
            &args.out,
            &mut engine,
            &comm,
            &config_json,
            &state,
            round,
        ))?;
        pending.wait_for_snapshot()?;
        let no_overlap = started.elapsed();
        while !pending.is_written() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        pending.finish(&*comm)?;
        stalls_no_overlap.push(no_overlap + started.elapsed());

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
    let stall = median(stalls.clone());
    let consolidated = folder_bytes(&args.out.join("consolidated")) as f64;
    println!("checkpoint_bytes\t{bytes}");
    println!("save_seconds\t{save:.4}");
    println!("save_gbps\t{:.3}", bytes / save / 1e9);
    println!("load_seconds\t{load:.4}");
    println!("load_gbps\t{:.3}", bytes / load / 1e9);
    println!("async_stall_seconds\t{stall:.4}");
    println!("async_save_call_seconds\t{:.4}", median(snapshots));
    println!(
        "async_overlapped_forward_backward_seconds\t{:.4}",
        median(forward_backward_times)
    );
    let no_overlap = median(stalls_no_overlap);
    println!("async_stall_no_overlap_seconds\t{no_overlap:.4}");
    println!("async_stall_no_overlap_fraction\t{:.3}", no_overlap / save);
    println!("async_stall_fraction\t{:.3}", stall / save);
    let rounds: Vec<String> = stalls
        .iter()
        .map(|d| format!("{:.3}", d.as_secs_f64()))
        .collect();
    println!("async_stall_each_round\t{}", rounds.join(","));
    println!(
        "consolidate_gbps\t{:.3}",
        consolidated / median(consolidate_times) / 1e9
    );
    Ok(())
}

/// `--make-only`: one checkpoint of `--model-config` saved by `--world` in-process ranks.
fn make_checkpoint(args: &Args) -> Result<()> {
    let path = args
        .model_config
        .as_ref()
        .context("--make-only needs --model-config")?;
    let config = ModelConfig::from_file(path)?;
    let config_json = config.to_json_string()?;
    let state = TrainerState::default();
    std::fs::create_dir_all(&args.out)?;
    let stage = args.stage;
    let ranks: Vec<_> = LocalCommunicator::world(args.world)
        .into_iter()
        .map(|comm| {
            let (config, config_json, state, out) = (
                config.clone(),
                config_json.clone(),
                state.clone(),
                args.out.clone(),
            );
            std::thread::spawn(move || -> Result<()> {
                let comm = Arc::new(comm);
                let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 1)?;
                let engine_model = EngineModel {
                    head_tied_to_embedding: model.tied_to_embedding(),
                    blocks: model.blocks,
                    frozen: Default::default(),
                };
                let engine_config = EngineConfig {
                    stage: stage.try_into().expect("a ZeRO stage"),
                    train_micro_batch_size_per_gpu: 1,
                    train_batch_size: comm.world_size(),
                    ..Default::default()
                };
                let mut engine = ZeroEngine::new(engine_model, comm.clone(), engine_config)?;
                let mut req = request(&out, &mut engine, &comm, &config_json, &state, 0);
                req.write_model_weights = stage < 3;
                save_checkpoint(req)?;
                Ok(())
            })
        })
        .collect();
    for rank in ranks {
        rank.join()
            .map_err(|_| anyhow::anyhow!("a rank panicked"))??;
    }
    println!("checkpoint\t{}", args.out.join("checkpoint-1").display());
    Ok(())
}
