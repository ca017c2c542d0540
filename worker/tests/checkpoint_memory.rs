//! `consolidate` streams: its peak memory is a small multiple of the largest tensor, not
//! of the model. Two checkpoints are saved by two in-process ranks under ZeRO-3: a tiny
//! one (the process baseline: libtorch, the binary, the allocator) and a deep, narrow
//! one whose fp32 weights are about 100 times its largest tensor. The real
//! `rsdeep-worker consolidate` runs on each as a child process whose peak RSS (VmHWM) is
//! polled until it exits; the deep model may add at most 4 largest tensors + 8 MiB to
//! the baseline, far below its 25 MiB of weights (a memory-mapped or whole-model reader
//! adds all of them). Measured here: +1.7 MB over a 491 MB baseline.
//! Contract: `docs/checkpoints.md`.

use rsdeep_worker::checkpoint::{SaveRequest, TrainerState, save_checkpoint};
use rsdeep_worker::model::{CausalLm, ModelConfig, ModelType};
use rsdeep_worker::zero::ZeroStage;
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tch::{Device, Kind};

/// Saves `checkpoint-1` of `config` from `world` in-process ranks under ZeRO-3.
fn save(config: &ModelConfig, world: usize, out: &Path) {
    let config_json = config.to_json_string().unwrap();
    let ranks: Vec<_> = LocalCommunicator::world(world)
        .into_iter()
        .map(|comm| {
            let (config, config_json, out) = (config.clone(), config_json.clone(), out.to_owned());
            std::thread::spawn(move || {
                let comm = Arc::new(comm);
                let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 1).unwrap();
                let engine_model = EngineModel {
                    head_tied_to_embedding: model.tied_to_embedding(),
                    blocks: model.blocks,
                    frozen: Default::default(),
                };
                let engine_config = EngineConfig {
                    stage: ZeroStage::Three,
                    train_micro_batch_size_per_gpu: 1,
                    train_batch_size: world,
                    ..Default::default()
                };
                let mut engine =
                    ZeroEngine::new(engine_model, comm.clone(), engine_config).unwrap();
                save_checkpoint(SaveRequest {
                    output_dir: &out,
                    step: 1,
                    engine: &mut engine,
                    comm: &*comm,
                    model_config_json: &config_json,
                    tokenizer: None,
                    trainer_state: &TrainerState::default(),
                    per_rank_extra: serde_json::json!({}),
                    save_total_limit: None,
                    max_shard_bytes: 1 << 30,
                    write_model_weights: false,
                    weights_dtype: Kind::Float,
                    run: None,
                })
                .unwrap();
            })
        })
        .collect();
    for rank in ranks {
        rank.join().expect("a saving rank panicked");
    }
}

/// The peak resident memory (VmHWM) of live process `pid` once it runs `exe`, if it is
/// still readable. Before its exec the forked child still carries this test process's
/// memory figures (a copy of the parent's address space and high-water mark), which
/// would read as the child's peak.
fn vm_hwm_bytes(pid: u32, exe: &Path) -> Option<u64> {
    let running = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    if running != exe {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs `rsdeep-worker consolidate CHECKPOINT OUT` and returns its peak RSS in bytes,
/// polling its high-water mark every 2 ms until it exits (a high-water mark, so a poll
/// sees every earlier peak; `getrusage` cannot be used: a child's ru_maxrss starts at
/// the RSS of this big test process it was forked from).
fn consolidate_peak_rss(checkpoint: &Path, out: &Path) -> u64 {
    let exe = Path::new(env!("CARGO_BIN_EXE_rsdeep-worker"))
        .canonicalize()
        .expect("the rsdeep-worker binary");
    let mut child = Command::new(&exe)
        .arg("consolidate")
        .arg(checkpoint)
        .arg(out)
        .spawn()
        .expect("starting rsdeep-worker consolidate");
    let mut peak = 0;
    let status = loop {
        peak = peak.max(vm_hwm_bytes(child.id(), &exe).unwrap_or(0));
        if let Some(status) = child.try_wait().expect("waiting for consolidate") {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(
        status.success(),
        "consolidate of {} failed: {status}",
        checkpoint.display()
    );
    assert!(
        out.join("model.safetensors").is_file(),
        "no weights written"
    );
    assert!(peak > 0, "the consolidate process's memory was never read");
    peak
}

fn config(hidden: usize, layers: usize, vocab: usize) -> ModelConfig {
    let mut config = ModelConfig::new(ModelType::Qwen2, vocab, hidden, hidden * 3, layers, 4, 2);
    config.tie_word_embeddings = false;
    config
}

#[test]
fn consolidate_peak_memory_is_bounded_by_the_largest_tensor_not_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = config(32, 1, 64);
    let deep = config(128, 32, 512);
    save(&tiny, 2, &tmp.path().join("tiny"));
    save(&deep, 2, &tmp.path().join("deep"));
    let checkpoint = |name: &str| tmp.path().join(name).join("checkpoint-1");
    let baseline = consolidate_peak_rss(&checkpoint("tiny"), &tmp.path().join("tiny-out"));
    let peak = consolidate_peak_rss(&checkpoint("deep"), &tmp.path().join("deep-out"));

    let largest = (deep.vocab_size * deep.hidden_size * 4) as u64; // embedding, fp32
    let model = std::fs::metadata(tmp.path().join("deep-out/model.safetensors"))
        .unwrap()
        .len();
    assert!(model > 90 * largest, "the deep model is not deep enough");
    let allowed = baseline + 4 * largest + (8 << 20);
    println!(
        "baseline {baseline} B, deep {peak} B (+{} B), largest tensor {largest} B, model {model} B",
        peak.saturating_sub(baseline)
    );
    assert!(
        peak <= allowed,
        "consolidate peaked at {peak} B: more than the baseline {baseline} B + 4 x the largest \
         tensor ({largest} B) + 8 MiB; the model is {model} B"
    );
}
