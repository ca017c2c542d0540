//! The engine's own configuration: every DeepSpeed key the ZeRO engine honours, already
//! resolved (batch arithmetic done, "auto" filled). The engine core depends only on this
//! type; `from_ds_json` adapts a DeepSpeed JSON section (see `docs/zero-engine.md` for
//! the keys; their defaults are DeepSpeed's documented ones).

use crate::{Error, Result};
pub use rsdeep_contract::config::ZeroStage;
pub use rsdeep_contract::config::{HfSchedule, WsdShape};
use tch::{Device, Kind};

/// Compute precision of the flat parameter buffers (masters are always fp32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Precision {
    Fp32,
    Bf16,
    /// fp16 with a loss scaler.
    Fp16(LossScaleConfig),
}

impl Precision {
    /// The tch kind of the compute (and gradient) buffers.
    pub fn kind(&self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16(_) => Kind::Half,
        }
    }
}

/// DeepSpeed's `fp16` section: `loss_scale` 0 means dynamic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleConfig {
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: u64,
    pub hysteresis: u32,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
        }
    }
}

/// Adam flavour: DeepSpeed's `adam` is decoupled (AdamW) unless `adam_w_mode` is false.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// true: decoupled weight decay (AdamW); false: L2 added to the gradient (Adam).
    pub decoupled_weight_decay: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: true,
        }
    }
}

/// Warmup curve shape of the DeepSpeed schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupType {
    Log,
    Linear,
}

/// Learning-rate schedules: DeepSpeed's three, plus Hugging Face's two used when the
/// DeepSpeed config has no scheduler (the HF Trainer then builds its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SchedulerConfig {
    Constant,
    WarmupLr {
        warmup_min_lr: f64,
        warmup_max_lr: f64,
        warmup_num_steps: u64,
        warmup_type: WarmupType,
    },
    WarmupDecayLr {
        warmup_min_lr: f64,
        warmup_max_lr: f64,
        warmup_num_steps: u64,
        total_num_steps: u64,
        warmup_type: WarmupType,
    },
    WarmupCosineLr {
        warmup_min_ratio: f64,
        cos_min_ratio: f64,
        warmup_num_steps: u64,
        total_num_steps: u64,
        warmup_type: WarmupType,
    },
    /// DeepSpeed's OneCycle, learning rate only (cycle_momentum false).
    OneCycle(OneCycle),
    /// DeepSpeed's LRRangeTest: min_lr · (1 + step_rate · k / step_size), k/step_size
    /// floored with a staircase.
    LrRangeTest {
        min_lr: f64,
        step_size: u64,
        step_rate: f64,
        staircase: bool,
    },
    /// The Trainer's `lr_scheduler_type` (no DeepSpeed scheduler).
    Hf {
        schedule: HfSchedule,
        warmup_steps: u64,
        total_steps: u64,
    },
}

/// DeepSpeed's OneCycle: up from `min_lr` to `max_lr` over `first_step_size` iterations,
/// down over `second_step_size`, in stairs when the counts are non-zero, then decayed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneCycle {
    pub min_lr: f64,
    pub max_lr: f64,
    pub first_step_size: f64,
    pub second_step_size: f64,
    pub first_stair_count: u64,
    pub second_stair_count: u64,
    pub decay_step_size: f64,
    pub decay_lr_rate: f64,
}

/// `zero_optimization` plus the engine-wide keys, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub stage: ZeroStage,
    /// Elements per gradient-reduction collective.
    pub reduce_bucket_size: usize,
    /// Elements per parameter all-gather collective.
    pub allgather_bucket_size: usize,
    pub overlap_comm: bool,
    /// Always true in this engine (gradients live in flat buffers); kept to log it.
    pub contiguous_gradients: bool,
    /// false: stages 2/3 all-reduce each bucket and keep their slice.
    pub reduce_scatter: bool,
    pub stage3_prefetch_bucket_size: usize,
    pub stage3_param_persistence_threshold: usize,
    pub stage3_max_live_parameters: usize,
    pub stage3_gather_16bit_weights_on_model_save: bool,
    /// 0 disables clipping.
    pub gradient_clipping: f64,
    pub gradient_accumulation_steps: usize,
    pub train_micro_batch_size_per_gpu: usize,
    pub train_batch_size: usize,
    pub precision: Precision,
    pub optimizer: OptimizerConfig,
    pub scheduler: SchedulerConfig,
    pub activation_checkpointing: bool,
    /// 0 disables the periodic log line.
    pub steps_per_print: u64,
    /// DeepSpeed's `wall_clock_breakdown`: print per-phase step times every
    /// `steps_per_print` steps (`zero/profile.rs`).
    pub wall_clock_breakdown: bool,
    /// `offload_optimizer.device == "cpu"`: fp32 masters and moments live on the CPU.
    pub offload_optimizer_cpu: bool,
    /// `offload_optimizer.device == "nvme"`: `nvme_path`, where each owned slice's masters
    /// and moments live in a file between uses (`swap.rs`; the step runs on the CPU).
    pub optimizer_swap_dir: Option<std::path::PathBuf>,
    /// Where the compute buffers live.
    pub device: Device,
    /// Decoder layers that can train through the hand-written forward/backward
    /// (`model/manual_layer.rs`) do so; false keeps autograd everywhere (the reference
    /// the tests compare against; `RSDEEP_MANUAL_LAYERS=0` for A/B benchmarks).
    pub manual_layers: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            stage: ZeroStage::Zero,
            reduce_bucket_size: 500_000_000,
            allgather_bucket_size: 500_000_000,
            overlap_comm: false,
            contiguous_gradients: true,
            reduce_scatter: true,
            stage3_prefetch_bucket_size: 50_000_000,
            stage3_param_persistence_threshold: 100_000,
            stage3_max_live_parameters: 1_000_000_000,
            stage3_gather_16bit_weights_on_model_save: false,
            gradient_clipping: 0.0,
            gradient_accumulation_steps: 1,
            train_micro_batch_size_per_gpu: 1,
            train_batch_size: 1,
            precision: Precision::Fp32,
            optimizer: OptimizerConfig::default(),
            scheduler: SchedulerConfig::Constant,
            activation_checkpointing: false,
            steps_per_print: 0,
            wall_clock_breakdown: false,
            offload_optimizer_cpu: false,
            optimizer_swap_dir: None,
            device: Device::Cpu,
            manual_layers: true,
        }
    }
}

impl EngineConfig {
    /// Checks the values the engine relies on; `world_size` is the data-parallel size.
    pub fn validate(&self, world_size: usize) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        if self.reduce_bucket_size == 0 || self.allgather_bucket_size == 0 {
            return fail("reduce_bucket_size and allgather_bucket_size must be > 0".into());
        }
        if self.gradient_accumulation_steps == 0 || self.train_micro_batch_size_per_gpu == 0 {
            return fail(
                "gradient_accumulation_steps and train_micro_batch_size_per_gpu must be > 0".into(),
            );
        }
        let product =
            self.train_micro_batch_size_per_gpu * self.gradient_accumulation_steps * world_size;
        if self.train_batch_size != product {
            return fail(format!(
                "Check batch related parameters. train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size {} != {} * {} * {}",
                self.train_batch_size,
                self.train_micro_batch_size_per_gpu,
                self.gradient_accumulation_steps,
                world_size
            ));
        }
        if self.gradient_clipping < 0.0 {
            return fail("gradient_clipping must be >= 0".into());
        }
        if let Precision::Fp16(scale) = self.precision
            && (scale.min_loss_scale <= 0.0
                || scale.loss_scale_window == 0
                || scale.hysteresis == 0)
        {
            return fail(
                "fp16: min_loss_scale, loss_scale_window and hysteresis must be > 0".into(),
            );
        }
        Ok(())
    }
}
