//! LoRA against full fine-tuning on the same model and data through the ZeRO engine
//! (stage 0, one rank, CPU): peak resident memory growth (VmHWM after resetting it via
//! `/proc/self/clear_refs`) and tokens/s. LoRA must need clearly less memory (no
//! gradients, fp32 masters or Adam moments for the frozen base). The measuring runs in a
//! child (this test binary re-run alone with `RSDEEP_LORA_MEMORY_CHILD` set) so no other
//! test shares the process while it measures. Prints the figures.

use crate::support::{printed_value, rerun_alone};
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::lora::{LoraConfig, apply_lora};
use rsdeep_worker::model::{CausalLm, ForwardCtx, ModelConfig, ModelType, causal_lm_loss};
use rsdeep_worker::zero::ZeroStage;
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 4;
const BATCH: i64 = 4;
const SEQ: i64 = 64;
const VOCAB: usize = 4096;
const CHILD_ENV: &str = "RSDEEP_LORA_MEMORY_CHILD";
const TEST_PATH: &str = "lora_memory::lora_needs_clearly_less_memory_than_full_training";

fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets the peak RSS to the current RSS (Linux >= 4.0).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("writing /proc/self/clear_refs");
}

/// (peak RSS growth in MiB, tokens/s) of STEPS training steps.
fn measure(lora: bool) -> (f64, f64) {
    reset_peak_rss();
    let before = proc_status_kib("VmRSS:");
    let config = ModelConfig::new(ModelType::Qwen2, VOCAB, 512, 1376, 4, 8, 2);
    let mut model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 1).unwrap();
    let frozen = match lora {
        true => {
            let cfg = LoraConfig {
                r: 8,
                alpha: 16.0,
                dropout: 0.0,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                use_rslora: false,
                use_dora: false,
                modules_to_save: Vec::new(),
                prefix_tuning: None,
                bottleneck: None,
            };
            let info = apply_lora(&mut model, &cfg, 1).unwrap();
            println!("{}", info.summary);
            info.frozen
        }
        false => HashSet::new(),
    };
    let comm = LocalCommunicator::world(1).remove(0);
    assert_eq!(comm.rank(), 0);
    let engine_model = EngineModel {
        blocks: model.blocks,
        head_tied_to_embedding: false,
        frozen,
    };
    let engine_config = EngineConfig {
        stage: ZeroStage::Zero,
        gradient_accumulation_steps: 1,
        train_micro_batch_size_per_gpu: BATCH as usize,
        train_batch_size: BATCH as usize,
        ..EngineConfig::default()
    };
    let mut engine = ZeroEngine::new(engine_model, Arc::new(comm), engine_config).unwrap();
    let ids = Tensor::randint(VOCAB as i64, [BATCH, SEQ], (Kind::Int64, Device::Cpu));
    let ctx = ForwardCtx::causal(&ids).unwrap();
    let started = Instant::now();
    for _ in 0..STEPS {
        engine
            .forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))
            .unwrap();
        engine.step().unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak = proc_status_kib("VmHWM:");
    drop(engine);
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    let tokens_per_s = (STEPS as i64 * BATCH * SEQ) as f64 / seconds;
    (growth_mib, tokens_per_s)
}

/// In the child: measures both ways and prints the figures for the parent to parse.
fn measure_in_child() {
    tch::set_num_threads(1);
    let _warm_up = measure(true); // libtorch's one-time allocations land here
    let (lora_mib, lora_tps) = measure(true);
    let (full_mib, full_tps) = measure(false);
    println!("LORA_MIB={lora_mib} FULL_MIB={full_mib} LORA_TPS={lora_tps} FULL_TPS={full_tps}");
}

#[test]
fn lora_needs_clearly_less_memory_than_full_training() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return measure_in_child();
    }
    let output = rerun_alone(TEST_PATH, &[(CHILD_ENV, "1")], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the measuring child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value = |key: &str| -> f64 { printed_value(&stdout, key) };
    let (lora_mib, full_mib) = (value("LORA_MIB="), value("FULL_MIB="));
    println!(
        "peak RSS growth: LoRA {lora_mib:.1} MiB vs full {full_mib:.1} MiB; \
         tokens/s: LoRA {:.0} vs full {:.0}",
        value("LORA_TPS="),
        value("FULL_TPS=")
    );
    assert!(
        lora_mib < 0.6 * full_mib,
        "LoRA {lora_mib:.1} MiB is not clearly below full {full_mib:.1} MiB"
    );
}
