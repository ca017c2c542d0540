//! Measurement for docs/benchmarks.md §1b: CPU seconds per optimizer step of the ZeRO
//! engine on the benchmark's tiny Qwen2 (configs/models/qwen2-tiny.json, micro batch
//! 4 x 256, gradient accumulation 2, fp32, AdamW), one process, one thread, world size
//! 1, ZeRO-1, with the generic loss path (`forward_backward` + `causal_lm_loss` on the
//! logits, what `train/run.rs` calls today) and the fused head path
//! (`forward_backward_causal_lm`), interleaved step by step so the host's load hits both
//! alike. Prints the median thread-CPU and wall seconds per step of each path.
//!
//! Usage: cargo run --release -p rsdeep-worker --example fused_head_bench [steps]

use anyhow::{Context, Result};
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::model::{CausalLm, ForwardCtx, ModelConfig, causal_lm_loss};
use rsdeep_worker::zero::ZeroStage;
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const MICRO_BATCH: i64 = 4;
const BLOCK: i64 = 256;
const ACCUMULATION: usize = 2;

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn engine(config_path: &Path) -> Result<ZeroEngine> {
    let model_config = ModelConfig::from_file(config_path)?;
    let model = CausalLm::from_config(model_config, Device::Cpu, Kind::Float, 12)?;
    let tied = model.tied_to_embedding();
    let comm: Arc<dyn Communicator> = Arc::new(
        LocalCommunicator::world(1)
            .pop()
            .context("one local rank")?,
    );
    let mut config = EngineConfig {
        stage: ZeroStage::One,
        gradient_accumulation_steps: ACCUMULATION,
        train_micro_batch_size_per_gpu: MICRO_BATCH as usize,
        train_batch_size: MICRO_BATCH as usize * ACCUMULATION,
        gradient_clipping: 1.0,
        ..EngineConfig::default()
    };
    config.optimizer.lr = 1e-3;
    config.optimizer.weight_decay = 0.01;
    let blocks = EngineModel {
        blocks: model.blocks,
        head_tied_to_embedding: tied,
        frozen: HashSet::new(),
    };
    Ok(ZeroEngine::new(blocks, comm, config)?)
}

/// One optimizer step; returns (thread CPU s, wall s, loss).
fn step(engine: &mut ZeroEngine, vocab: i64, fused: bool) -> Result<(f64, f64, f64)> {
    let (cpu, wall) = (thread_cpu_s(), Instant::now());
    for _ in 0..ACCUMULATION {
        let ids = Tensor::randint(vocab, [MICRO_BATCH, BLOCK], (Kind::Int64, Device::Cpu));
        let ctx = ForwardCtx::causal(&ids)?;
        if fused {
            engine.forward_backward_causal_lm(&ids, &ctx, &ids)?;
        } else {
            engine.forward_backward(&ids, &ctx, &mut |logits| causal_lm_loss(logits, &ids))?;
        }
    }
    let loss = engine.step()?.loss;
    Ok((thread_cpu_s() - cpu, wall.elapsed().as_secs_f64(), loss))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    tch::set_num_threads(1);
    let steps: usize = std::env::args().nth(1).map_or(Ok(8), |s| s.parse())?;
    let config_path = Path::new("configs/models/qwen2-tiny.json");
    let vocab = ModelConfig::from_file(config_path)?.vocab_size as i64;
    let mut engines = [engine(config_path)?, engine(config_path)?];
    let mut results: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for i in 0..steps + 1 {
        for (path, engine) in engines.iter_mut().enumerate() {
            let (cpu, wall, loss) = step(engine, vocab, path == 1)?;
            anyhow::ensure!(loss.is_finite(), "loss {loss}");
            if i > 0 {
                results[path].push((cpu, wall)); // step 0 warms the allocator up
            }
        }
    }
    let tokens = (MICRO_BATCH * BLOCK) as f64 * ACCUMULATION as f64;
    for (name, rows) in ["generic", "fused"].iter().zip(&results) {
        let cpu = median(rows.iter().map(|r| r.0).collect());
        let wall = median(rows.iter().map(|r| r.1).collect());
        println!(
            "{name:8} cpu {cpu:.3} s/step  wall {wall:.3} s/step  {:.0} tokens per CPU-second",
            tokens / cpu
        );
    }
    Ok(())
}
