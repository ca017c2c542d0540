//! The bridge from the launcher's resolved `TrainConfig` (DeepSpeed keys, HF training
//! arguments, "auto" already filled) to the engine's own `EngineConfig`. Every key the
//! engine honours is mapped here; keys it cannot honour were refused by the config loader.

use crate::zero::{
    EngineConfig, LossScaleConfig, OptimizerConfig, Precision, SchedulerConfig, WarmupType,
};
use crate::{Error, Result};
use rsdeep::config::{self as cfg, TrainConfig};
use tch::Device;

/// Maps `config` (after `fill_model_autos`) to the engine's configuration on `device`.
pub fn engine_config(
    config: &TrainConfig,
    total_steps: u64,
    device: Device,
) -> Result<EngineConfig> {
    let pending = config.unresolved_autos();
    if !pending.is_empty() {
        return Err(Error::Config(format!(
            "still \"auto\" after model autos: {}",
            pending.join(", ")
        )));
    }
    let ds = &config.deepspeed;
    let zero = &ds.zero_optimization;
    let batch = &config.batch;
    let value = |v: cfg::AutoOr<u64>, key: &str| {
        v.value()
            .ok_or_else(|| Error::Config(format!("{key} is still \"auto\"")))
    };
    Ok(EngineConfig {
        stage: zero.stage,
        reduce_bucket_size: value(zero.reduce_bucket_size, "reduce_bucket_size")? as usize,
        allgather_bucket_size: zero.allgather_bucket_size as usize,
        overlap_comm: zero.overlap_comm_resolved(),
        contiguous_gradients: zero.contiguous_gradients,
        reduce_scatter: zero.reduce_scatter,
        stage3_prefetch_bucket_size: value(
            zero.stage3_prefetch_bucket_size,
            "stage3_prefetch_bucket_size",
        )? as usize,
        stage3_param_persistence_threshold: value(
            zero.stage3_param_persistence_threshold,
            "stage3_param_persistence_threshold",
        )? as usize,
        stage3_max_live_parameters: zero.stage3_max_live_parameters as usize,
        stage3_gather_16bit_weights_on_model_save: zero.gather_16bit_weights_on_model_save(),
        gradient_clipping: config.gradient_clipping(),
        gradient_accumulation_steps: batch.gradient_accumulation_steps as usize,
        train_micro_batch_size_per_gpu: batch.train_micro_batch_size_per_gpu as usize,
        train_batch_size: batch.train_batch_size as usize,
        precision: precision(config),
        optimizer: optimizer(config),
        scheduler: scheduler(config, total_steps)?,
        activation_checkpointing: config.activation_checkpointing(),
        steps_per_print: ds.steps_per_print.unwrap_or(0),
        offload_optimizer_cpu: zero.offload_optimizer_to_cpu(),
        device,
    })
}

fn precision(config: &TrainConfig) -> Precision {
    match config.precision() {
        cfg::Precision::Fp32 => Precision::Fp32,
        cfg::Precision::Bf16 => Precision::Bf16,
        cfg::Precision::Fp16 => {
            let fp16 = &config.deepspeed.fp16;
            Precision::Fp16(LossScaleConfig {
                loss_scale: fp16.loss_scale,
                initial_scale_power: fp16.initial_scale_power,
                loss_scale_window: fp16.loss_scale_window,
                hysteresis: fp16.hysteresis,
                consecutive_hysteresis: fp16.consecutive_hysteresis,
                min_loss_scale: fp16.min_loss_scale,
            })
        }
    }
}

fn optimizer(config: &TrainConfig) -> OptimizerConfig {
    let resolved = config.optimizer();
    OptimizerConfig {
        lr: resolved.lr,
        beta1: resolved.betas[0],
        beta2: resolved.betas[1],
        eps: resolved.eps,
        weight_decay: resolved.weight_decay,
        decoupled_weight_decay: resolved.decoupled_weight_decay,
    }
}

/// The DeepSpeed scheduler when the config has one, else HF's `lr_scheduler_type` with
/// its warmup (what the HF Trainer builds when DeepSpeed has no scheduler section).
fn scheduler(config: &TrainConfig, total_steps: u64) -> Result<SchedulerConfig> {
    let Some(ds) = &config.deepspeed.scheduler else {
        return Ok(hf_scheduler(config, total_steps));
    };
    let p = &ds.params;
    let auto_f64 =
        |v: Option<cfg::AutoOr<f64>>, default: f64| v.and_then(|a| a.value()).unwrap_or(default);
    let auto_u64 =
        |v: Option<cfg::AutoOr<u64>>, default: u64| v.and_then(|a| a.value()).unwrap_or(default);
    let warmup_type = match p.warmup_type {
        Some(cfg::WarmupType::Linear) => WarmupType::Linear,
        _ => WarmupType::Log,
    };
    let warmup_num_steps = auto_u64(p.warmup_num_steps, 1000);
    Ok(match ds.kind {
        cfg::SchedulerKind::WarmupLR => SchedulerConfig::WarmupLr {
            warmup_min_lr: auto_f64(p.warmup_min_lr, 0.0),
            warmup_max_lr: auto_f64(p.warmup_max_lr, 0.001),
            warmup_num_steps,
            warmup_type,
        },
        cfg::SchedulerKind::WarmupDecayLR => SchedulerConfig::WarmupDecayLr {
            warmup_min_lr: auto_f64(p.warmup_min_lr, 0.0),
            warmup_max_lr: auto_f64(p.warmup_max_lr, 0.001),
            warmup_num_steps,
            total_num_steps: p.total_num_steps.and_then(|a| a.value()).ok_or_else(|| {
                Error::Config("scheduler WarmupDecayLR needs params.total_num_steps".into())
            })?,
            warmup_type,
        },
        cfg::SchedulerKind::WarmupCosineLR => SchedulerConfig::WarmupCosineLr {
            warmup_min_ratio: p.warmup_min_ratio.unwrap_or(0.0),
            cos_min_ratio: p.cos_min_ratio.unwrap_or(1e-4),
            warmup_num_steps,
            total_num_steps: p.total_num_steps.and_then(|a| a.value()).ok_or_else(|| {
                Error::Config("scheduler WarmupCosineLR needs params.total_num_steps".into())
            })?,
            warmup_type,
        },
    })
}

fn hf_scheduler(config: &TrainConfig, total_steps: u64) -> SchedulerConfig {
    let warmup_steps = config.args.warmup_steps_for(total_steps);
    match config.args.lr_scheduler_type {
        cfg::LrSchedulerType::Linear => SchedulerConfig::HfLinear {
            warmup_steps,
            total_steps,
        },
        cfg::LrSchedulerType::Cosine => SchedulerConfig::HfCosine {
            warmup_steps,
            total_steps,
        },
        cfg::LrSchedulerType::Constant => SchedulerConfig::Constant,
        cfg::LrSchedulerType::ConstantWithWarmup => SchedulerConfig::WarmupLr {
            warmup_min_lr: 0.0,
            warmup_max_lr: config.optimizer().lr,
            warmup_num_steps: warmup_steps,
            warmup_type: WarmupType::Linear,
        },
    }
}
