//! Adapter from the launcher's resolved `rsdeep_contract::config::TrainConfig` (train.json with
//! its DeepSpeed section, "auto" filled) to the engine's own `EngineConfig`. It is the only
//! place the engine meets the launcher's types. HF's rule applies when the DeepSpeed
//! section has no scheduler: the Trainer's `lr_scheduler_type` with its
//! `lr_scheduler_kwargs` and warmup. Keys the engine cannot honour are refused here
//! with a message naming them (the launcher's validation refuses most of them earlier).

use crate::zero::config::{
    EngineConfig, LossScaleConfig, OneCycle, OptimizerConfig, Precision, SchedulerConfig,
    WarmupType,
};
use crate::{Error, Result};
use rsdeep_contract::config::{self as launcher_config, OffloadDevice, SchedulerKind, TrainConfig};
use tch::Device;

impl EngineConfig {
    /// The engine configuration for `config` after `fill_model_autos(hidden, total_steps)`;
    /// `total_steps` is the number of optimizer steps of the run.
    pub fn from_train_config(
        config: &TrainConfig,
        total_steps: u64,
        device: Device,
    ) -> Result<EngineConfig> {
        let pending = config.unresolved_autos();
        if !pending.is_empty() {
            return Err(Error::Config(format!(
                "still \"auto\" (fill_model_autos not run?): {}",
                pending.join(", ")
            )));
        }
        let ds = &config.deepspeed;
        let zero = &ds.zero_optimization;
        // Offload as the loader's notices describe it: parameter partitions stay where the
        // rank computes (host memory already on CPU ranks); the optimizer state goes to host
        // memory ("cpu") or to files under nvme_path ("nvme", stepped on the CPU).
        let offload = zero.offload_optimizer.as_ref();
        let offload_optimizer_cpu = offload.is_some_and(|o| o.device == OffloadDevice::Cpu);
        let optimizer_swap_dir = offload
            .filter(|o| o.device == OffloadDevice::Nvme)
            .and_then(|o| o.nvme_path.as_ref())
            .map(std::path::PathBuf::from);
        let resolved = |v: launcher_config::AutoOr<u64>, key: &str| {
            v.value()
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config(format!("{key} is still \"auto\"")))
        };
        let optimizer = config.optimizer();
        let engine = EngineConfig {
            stage: zero.stage,
            reduce_bucket_size: resolved(zero.reduce_bucket_size, "reduce_bucket_size")?,
            allgather_bucket_size: zero.allgather_bucket_size as usize,
            overlap_comm: zero.overlap_comm_resolved(),
            contiguous_gradients: zero.contiguous_gradients,
            reduce_scatter: zero.reduce_scatter,
            stage3_prefetch_bucket_size: resolved(
                zero.stage3_prefetch_bucket_size,
                "stage3_prefetch_bucket_size",
            )?,
            stage3_param_persistence_threshold: resolved(
                zero.stage3_param_persistence_threshold,
                "stage3_param_persistence_threshold",
            )?,
            stage3_max_live_parameters: zero.stage3_max_live_parameters as usize,
            stage3_gather_16bit_weights_on_model_save: zero
                .stage3_gather_16bit_weights_on_model_save
                || zero.stage3_gather_fp16_weights_on_model_save,
            gradient_clipping: config.gradient_clipping(),
            gradient_accumulation_steps: config.batch.gradient_accumulation_steps as usize,
            train_micro_batch_size_per_gpu: config.batch.train_micro_batch_size_per_gpu as usize,
            train_batch_size: config.batch.train_batch_size as usize,
            precision: precision(config),
            optimizer: OptimizerConfig {
                lr: optimizer.lr,
                beta1: optimizer.betas[0],
                beta2: optimizer.betas[1],
                eps: optimizer.eps,
                weight_decay: optimizer.weight_decay,
                decoupled_weight_decay: optimizer.decoupled_weight_decay,
            },
            scheduler: scheduler(config, optimizer.lr, total_steps)?,
            activation_checkpointing: config.activation_checkpointing(),
            steps_per_print: ds.steps_per_print.unwrap_or(0),
            wall_clock_breakdown: ds.wall_clock_breakdown,
            offload_optimizer_cpu,
            optimizer_swap_dir,
            device,
            // An A/B switch for benchmarks, not a training option: the two paths agree.
            manual_layers: std::env::var(rsdeep_contract::env::MANUAL_LAYERS)
                .map_or(true, |v| v != "0"),
        };
        engine.validate(config.batch.world_size as usize)?;
        Ok(engine)
    }
}

fn precision(config: &TrainConfig) -> Precision {
    let fp16 = &config.deepspeed.fp16;
    match config.precision() {
        launcher_config::Precision::Fp32 => Precision::Fp32,
        launcher_config::Precision::Bf16 => Precision::Bf16,
        launcher_config::Precision::Fp16 => Precision::Fp16(LossScaleConfig {
            loss_scale: fp16.loss_scale,
            initial_scale_power: fp16.initial_scale_power,
            loss_scale_window: fp16.loss_scale_window,
            hysteresis: fp16.hysteresis,
            consecutive_hysteresis: fp16.consecutive_hysteresis,
            min_loss_scale: fp16.min_loss_scale,
        }),
    }
}

fn scheduler(config: &TrainConfig, lr: f64, total_steps: u64) -> Result<SchedulerConfig> {
    let warmup = config.args.warmup_steps_for(total_steps);
    let Some(section) = &config.deepspeed.scheduler else {
        let schedule = config
            .args
            .hf_schedule()
            .map_err(|e| Error::Config(format!("lr_scheduler_kwargs: {e}")))?;
        return Ok(SchedulerConfig::Hf {
            schedule,
            warmup_steps: warmup,
            total_steps,
        });
    };
    let p = &section.params;
    let f = |v: Option<launcher_config::AutoOr<f64>>, default: f64| {
        v.and_then(|a| a.value()).unwrap_or(default)
    };
    let u = |v: Option<launcher_config::AutoOr<u64>>, default: u64| {
        v.and_then(|a| a.value()).unwrap_or(default)
    };
    let warmup_type = match p.warmup_type {
        Some(launcher_config::WarmupType::Linear) => WarmupType::Linear,
        _ => WarmupType::Log,
    };
    Ok(match section.kind {
        SchedulerKind::WarmupLR => SchedulerConfig::WarmupLr {
            warmup_min_lr: f(p.warmup_min_lr, 0.0),
            warmup_max_lr: f(p.warmup_max_lr, lr),
            warmup_num_steps: u(p.warmup_num_steps, 1000),
            warmup_type,
        },
        SchedulerKind::WarmupDecayLR => SchedulerConfig::WarmupDecayLr {
            warmup_min_lr: f(p.warmup_min_lr, 0.0),
            warmup_max_lr: f(p.warmup_max_lr, 0.001),
            warmup_num_steps: u(p.warmup_num_steps, 1000),
            total_num_steps: p.total_num_steps.and_then(|v| v.value()).ok_or_else(|| {
                Error::Config("scheduler WarmupDecayLR needs params.total_num_steps".into())
            })?,
            warmup_type,
        },
        SchedulerKind::WarmupCosineLR => SchedulerConfig::WarmupCosineLr {
            warmup_min_ratio: p.warmup_min_ratio.unwrap_or(0.0),
            cos_min_ratio: p.cos_min_ratio.unwrap_or(1e-4),
            warmup_num_steps: u(p.warmup_num_steps, 1000),
            total_num_steps: p.total_num_steps.and_then(|v| v.value()).ok_or_else(|| {
                Error::Config("scheduler WarmupCosineLR needs params.total_num_steps".into())
            })?,
            warmup_type,
        },
        SchedulerKind::OneCycle => SchedulerConfig::OneCycle(OneCycle {
            min_lr: p.cycle_min_lr.unwrap_or(lr),
            max_lr: p.cycle_max_lr.unwrap_or(lr),
            first_step_size: p.cycle_first_step_size.unwrap_or(2000.0),
            second_step_size: p
                .cycle_second_step_size
                .or(p.cycle_first_step_size)
                .unwrap_or(2000.0),
            first_stair_count: p.cycle_first_stair_count.unwrap_or(0),
            second_stair_count: p
                .cycle_second_stair_count
                .or(p.cycle_first_stair_count)
                .unwrap_or(0),
            decay_step_size: p.decay_step_size.unwrap_or(0.0),
            decay_lr_rate: p.decay_lr_rate.unwrap_or(0.0),
        }),
        SchedulerKind::LRRangeTest => SchedulerConfig::LrRangeTest {
            min_lr: p.lr_range_test_min_lr.unwrap_or(1e-3),
            step_size: p.lr_range_test_step_size.unwrap_or(2000),
            step_rate: p.lr_range_test_step_rate.unwrap_or(1.0),
            staircase: p.lr_range_test_staircase.unwrap_or(false),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::ZeroStage;

    fn train_config(ds: serde_json::Value, world: usize) -> TrainConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.json");
        let text = serde_json::json!({
            "model_name_or_path": "m", "train_files": ["t.jsonl"], "output_dir": "out",
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
            "learning_rate": 3e-4, "weight_decay": 0.1, "bf16": true, "warmup_steps": 10, "max_grad_norm": 0.5,
            "deepspeed": ds,
        });
        std::fs::write(&path, text.to_string()).unwrap();
        let mut config =
            rsdeep_contract::config::load(&path, &[], world).expect("train.json loads");
        config.fill_model_autos(64, 100).expect("autos");
        config
    }

    #[test]
    fn hf_autos_and_deepspeed_keys_reach_the_engine() {
        let config = train_config(
            serde_json::json!({
                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                    "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                    "offload_optimizer": {"device": "cpu"}},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
                "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}}
            }),
            2,
        );
        let engine = EngineConfig::from_train_config(&config, 100, Device::Cpu).expect("adapter");
        assert_eq!(engine.stage, ZeroStage::Three);
        assert_eq!(engine.reduce_bucket_size, 64 * 64);
        assert_eq!(engine.stage3_prefetch_bucket_size, (0.9 * 4096.0) as usize);
        assert_eq!(engine.stage3_param_persistence_threshold, 640);
        assert!(engine.overlap_comm, "stage 3 overlaps by default");
        assert!(engine.offload_optimizer_cpu);
        assert_eq!(engine.optimizer_swap_dir, None);
        assert_eq!(engine.precision, Precision::Bf16);
        assert_eq!(engine.gradient_clipping, 0.5);
        assert_eq!(
            (
                engine.train_micro_batch_size_per_gpu,
                engine.gradient_accumulation_steps,
                engine.train_batch_size
            ),
            (2, 2, 8)
        );
        assert_eq!(engine.optimizer.lr, 3e-4);
        assert_eq!(engine.optimizer.weight_decay, 0.1);
        assert!(matches!(
            engine.scheduler,
            SchedulerConfig::WarmupCosineLr {
                warmup_num_steps: 10,
                total_num_steps: 100,
                ..
            }
        ));
    }

    #[test]
    fn without_a_deepspeed_scheduler_the_trainer_schedule_applies() {
        let config = train_config(
            serde_json::json!({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}),
            1,
        );
        let engine = EngineConfig::from_train_config(&config, 100, Device::Cpu).expect("adapter");
        assert_eq!(
            engine.scheduler,
            SchedulerConfig::Hf {
                schedule: rsdeep_contract::config::HfSchedule::Linear,
                warmup_steps: 10,
                total_steps: 100
            }
        );
        assert!(!engine.overlap_comm);
    }
}
