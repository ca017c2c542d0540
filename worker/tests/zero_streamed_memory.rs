//! Peak resident memory of building a LoRA model into a ZeRO-3 engine on 4 in-process
//! ranks: block by block (`assemble::build_causal_lm_engine`, what training uses) against the
//! whole model first (`CausalLm::from_config` + `apply_lora` + `ZeroEngine::new`). Each
//! way is measured in a fresh child process (this test binary re-run with
//! `RSDEEP_STREAMED_MEMORY_CHILD` set), as VmHWM growth after resetting it through
//! `/proc/self/clear_refs`. Streamed, the four ranks together hold one model's worth of
//! slices plus a block or so in flight; whole, every rank first holds the whole model.

use crate::support::{printed_value, rerun_alone};
use rsdeep_worker::assemble::{LoraSpec, ModelSource, build_causal_lm_engine};
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::lora::{LoraConfig, apply_lora};
use rsdeep_worker::model::{CausalLm, ModelConfig, ModelType};
use rsdeep_worker::zero::ZeroStage;
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::sync::Arc;
use tch::{Device, Kind};

const WORLD: usize = 4;
const CHILD_ENV: &str = "RSDEEP_STREAMED_MEMORY_CHILD";
const TEST_PATH: &str =
    "zero_streamed_memory::zero3_streamed_build_peaks_far_below_whole_model_per_rank";

fn model_config() -> ModelConfig {
    // ~45 MB of fp32 parameters, the embedding and the head ~17 MB each.
    ModelConfig::new(ModelType::Qwen2, 16384, 256, 688, 4, 4, 2)
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        use_rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        prefix_tuning: None,
        bottleneck: None,
    }
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        stage: ZeroStage::Three,
        gradient_accumulation_steps: 1,
        train_micro_batch_size_per_gpu: 1,
        train_batch_size: WORLD,
        ..EngineConfig::default()
    }
}

fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn build_rank(comm: LocalCommunicator, streamed: bool) -> ZeroEngine {
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let lora = lora_config();
    if streamed {
        let source = ModelSource::Init {
            config: model_config(),
            seed: 3,
        };
        let spec = LoraSpec::Fresh {
            config: &lora,
            seed: 3,
            base_4bit: None,
        };
        return build_causal_lm_engine(
            source,
            Device::Cpu,
            Kind::Float,
            Some(spec),
            comm,
            engine_config(),
        )
        .unwrap()
        .engine;
    }
    let mut model = CausalLm::from_config(model_config(), Device::Cpu, Kind::Float, 3).unwrap();
    let info = apply_lora(&mut model, &lora, 3).unwrap();
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        blocks: model.blocks,
        frozen: info.frozen,
    };
    ZeroEngine::new(engine_model, comm, engine_config()).unwrap()
}

/// In the child: builds all ranks' engines and prints the peak growth in bytes.
fn measure_in_child(streamed: bool) {
    tch::set_num_threads(1);
    // libtorch's one-time setup (allocator, thread pool) before the baseline.
    drop(CausalLm::from_config(
        ModelConfig::new(ModelType::Qwen2, 64, 32, 48, 1, 4, 2),
        Device::Cpu,
        Kind::Float,
        1,
    ));
    std::fs::write("/proc/self/clear_refs", "5").expect("writing /proc/self/clear_refs");
    let before = proc_status_kib("VmRSS:");
    let handles: Vec<_> = LocalCommunicator::world(WORLD)
        .into_iter()
        .map(|comm| std::thread::spawn(move || build_rank(comm, streamed)))
        .collect();
    let engines: Vec<ZeroEngine> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let growth = (proc_status_kib("VmHWM:") - before) * 1024;
    let frozen: usize = engines.iter().map(|e| e.memory_report().frozen_bytes).sum();
    println!("GROWTH_BYTES={growth} FROZEN_BYTES_ALL_RANKS={frozen}");
}

/// Runs this test binary again as a child measuring one way; returns (growth, frozen).
fn measure(streamed: bool) -> (u64, u64) {
    let mode = if streamed { "streamed" } else { "whole" };
    let output = rerun_alone(TEST_PATH, &[(CHILD_ENV, mode)], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{mode} child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        printed_value(&stdout, "GROWTH_BYTES="),
        printed_value(&stdout, "FROZEN_BYTES_ALL_RANKS="),
    )
}

#[test]
fn zero3_streamed_build_peaks_far_below_whole_model_per_rank() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        return measure_in_child(mode == "streamed");
    }
    let config = model_config();
    let probe = CausalLm::from_config(config, Device::Cpu, Kind::Float, 1).unwrap();
    let model_bytes = probe.num_parameters() as u64 * 4;
    let largest_block = probe
        .blocks
        .iter()
        .map(|b| {
            b.params()
                .iter()
                .map(|p| p.tensor.numel() as u64 * 4)
                .sum::<u64>()
        })
        .max()
        .unwrap();
    drop(probe);
    let (streamed, frozen_streamed) = measure(true);
    let (whole, frozen_whole) = measure(false);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "model {:.1} MiB (largest block {:.1} MiB), {WORLD} ranks, ZeRO-3 LoRA build: peak growth \
         streamed {:.1} MiB, whole model first {:.1} MiB",
        mib(model_bytes),
        mib(largest_block),
        mib(streamed),
        mib(whole)
    );
    // Both end with the same partitioned base: 1/WORLD of it per rank.
    assert_eq!(frozen_streamed, frozen_whole);
    assert!(frozen_streamed <= model_bytes + 64 * 1024);
    // Streamed: the slices of all ranks (one model) plus one block in flight (its
    // tensors, the flat copy, the owned slice). The old way breaks that bound: each rank
    // held its whole model before partitioning it.
    let bound = model_bytes + 3 * largest_block;
    assert!(
        streamed <= bound,
        "streamed build grew {:.1} MiB, more than the model's {:.1} MiB of slices + 3 blocks",
        mib(streamed),
        mib(model_bytes)
    );
    assert!(
        whole > bound,
        "control: building whole models first grew only {:.1} MiB (bound {:.1} MiB)",
        mib(whole),
        mib(bound)
    );
}
