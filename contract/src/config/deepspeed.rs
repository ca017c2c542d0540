//! The DeepSpeed JSON section as typed structs: every key rsdeep honours or accepts,
//! with DeepSpeed's documented defaults (the honoured keys are listed in
//! `docs/zero-engine.md` "Keys"). Unknown fields fail typing; before that,
//! `ds_compat::make_loadable` rewrites DeepSpeed's older spellings, judges the DeepSpeed
//! features rsdeep does not implement, and drops keys nobody reads with a warning, so no
//! key is ever silently ignored.
//!
//! Values Hugging Face may fill from the training arguments are `AutoOr<T>`: `"auto"`
//! until filled. After `config::load` only the model-dependent ones can still be `Auto`
//! (reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold,
//! scheduler total_num_steps / warmup_num_steps); `TrainConfig::fill_model_autos` fills them.

use super::ZeroStage;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// A value that may be the string `"auto"` (to be filled from the training arguments or
/// from the model) or an explicit `T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AutoOr<T> {
    Auto,
    Value(T),
}

impl<T: Copy> AutoOr<T> {
    /// The explicit value, or `None` while still `"auto"`.
    pub fn value(&self) -> Option<T> {
        match self {
            AutoOr::Auto => None,
            AutoOr::Value(v) => Some(*v),
        }
    }

    pub fn is_auto(&self) -> bool {
        matches!(self, AutoOr::Auto)
    }
}

impl<T: Serialize> Serialize for AutoOr<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AutoOr::Auto => serializer.serialize_str("auto"),
            AutoOr::Value(v) => v.serialize(serializer),
        }
    }
}

impl<'de, T: de::DeserializeOwned> Deserialize<'de> for AutoOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(deserializer)?;
        if raw.as_str() == Some("auto") {
            return Ok(AutoOr::Auto);
        }
        T::deserialize(integral_floats_as_integers(raw))
            .map(AutoOr::Value)
            .map_err(|e| de::Error::custom(format!("{e} (or \"auto\")")))
    }
}

/// DeepSpeed users write sizes as `2e8`, which JSON parses as a float: turn integral
/// floats into integers so integer fields accept them (float fields accept both anyway).
fn integral_floats_as_integers(value: Value) -> Value {
    match &value {
        Value::Number(n) if n.is_f64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f >= 0.0 && f <= u64::MAX as f64 => {
                Value::from(f as u64)
            }
            _ => value,
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .cloned()
                .map(integral_floats_as_integers)
                .collect(),
        ),
        _ => value,
    }
}

/// `deserialize_with` for plain integer keys that DeepSpeed users write as `5e8`.
pub fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let raw = Value::deserialize(deserializer)?;
    u64::deserialize(integral_floats_as_integers(raw)).map_err(de::Error::custom)
}

/// `deserialize_with` for the keys whose `"auto"` means DeepSpeed's default of 1e9
/// (`sub_group_size`, `stage3_max_live_parameters`, `stage3_max_reuse_distance`).
pub fn billion_unless_given<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let raw = Value::deserialize(deserializer)?;
    if raw.as_str() == Some("auto") {
        return Ok(default_sub_group());
    }
    u64::deserialize(integral_floats_as_integers(raw)).map_err(de::Error::custom)
}

/// `deserialize_with` for optional integer keys written as `1e9`.
pub fn lenient_opt_u64<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    let raw = Value::deserialize(deserializer)?;
    if raw.is_null() {
        return Ok(None);
    }
    u64::deserialize(integral_floats_as_integers(raw))
        .map(Some)
        .map_err(de::Error::custom)
}

/// The whole DeepSpeed config (inline `deepspeed` object or a ds_config*.json file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepSpeedConfig {
    /// Global batch: micro batch × accumulation × data-parallel world size.
    #[serde(default)]
    pub train_batch_size: Option<AutoOr<u64>>,
    #[serde(default)]
    pub train_micro_batch_size_per_gpu: Option<AutoOr<u64>>,
    #[serde(default)]
    pub gradient_accumulation_steps: Option<AutoOr<u64>>,
    /// Global gradient-norm clipping across all partitions; 0 disables. DeepSpeed default 1.0.
    #[serde(default = "default_gradient_clipping")]
    pub gradient_clipping: AutoOr<f64>,
    /// DeepSpeed reads `10.0` as 10 too.
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub steps_per_print: Option<u64>,
    /// Rank 0 prints DeepSpeed's per-phase time line every `steps_per_print` steps.
    #[serde(default)]
    pub wall_clock_breakdown: bool,
    /// DeepSpeed's CSV monitor: rank 0 writes the engine's events as CSV files.
    #[serde(default)]
    pub csv_monitor: MonitorBlock,
    /// DeepSpeed's TensorBoard monitor: the same events as TensorBoard scalars.
    #[serde(default)]
    pub tensorboard: MonitorBlock,
    /// DeepSpeed's per-collective communication log (the worker's `comm/logger.rs`).
    #[serde(default)]
    pub comms_logger: CommsLoggerConfig,
    /// DeepSpeed's FLOPs profiler: rank 0 prints the model's profile at one step (the
    /// worker's `train/flops_profile.rs`).
    #[serde(default)]
    pub flops_profiler: FlopsProfilerConfig,
    #[serde(default)]
    pub zero_optimization: ZeroConfig,
    #[serde(default)]
    pub fp16: Fp16Config,
    /// `bfloat16` is DeepSpeed's older name of this block (transformers' own test configs
    /// still use it).
    #[serde(default, alias = "bfloat16")]
    pub bf16: Bf16Config,
    /// `None`: the training arguments' AdamW (what Hugging Face does without this section).
    #[serde(default)]
    pub optimizer: Option<OptimizerConfig>,
    /// `None`: the training arguments' `lr_scheduler_type` (Hugging Face's scheduler).
    #[serde(default)]
    pub scheduler: Option<SchedulerConfig>,
    #[serde(default)]
    pub activation_checkpointing: Option<ActivationCheckpointingConfig>,
    /// Accepted for compatibility: rsdeep runs Adam/AdamW only, which ZeRO supports.
    #[serde(default)]
    pub zero_allow_untested_optimizer: bool,
    /// Accepted: DeepSpeed uses it to insist on its own CPU Adam with offload; rsdeep
    /// always steps with its own fused AdamW.
    #[serde(default)]
    pub zero_force_ds_cpu_optimizer: bool,
    /// A free-form note some published configs carry; ignored.
    #[serde(default, rename = "_comment", skip_serializing_if = "Option::is_none")]
    pub comment: Option<Value>,
    /// Gradients are averaged (`mean`); `sum` is refused.
    #[serde(default)]
    pub gradient_allreduce_op: Option<String>,
    #[serde(default)]
    pub prescale_gradients: bool,
    #[serde(default = "one_f64")]
    pub gradient_predivide_factor: f64,
    /// Must match the precision in use (fp32/bf16/fp16) when given.
    #[serde(default)]
    pub communication_data_type: Option<String>,
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
}

impl Default for DeepSpeedConfig {
    fn default() -> Self {
        match serde_json::from_value(Value::Object(Default::default())) {
            Ok(config) => config,
            Err(e) => panic!("DeepSpeedConfig: every field has a serde default: {e}"),
        }
    }
}

/// A DeepSpeed monitor block (`csv_monitor`, `tensorboard`): events go under
/// `output_path/job_name` (a relative `output_path`, DeepSpeed's default "", is taken from
/// the working directory, as DeepSpeed does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorBlock {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub output_path: String,
    #[serde(default = "default_job_name")]
    pub job_name: String,
}

impl Default for MonitorBlock {
    fn default() -> Self {
        MonitorBlock {
            enabled: false,
            output_path: String::new(),
            job_name: default_job_name(),
        }
    }
}

impl MonitorBlock {
    /// The folder events go to, when enabled.
    pub fn folder(&self) -> Option<std::path::PathBuf> {
        self.enabled
            .then(|| std::path::Path::new(&self.output_path).join(&self.job_name))
    }
}

/// `comms_logger`: time every profiled collective from issue to completion and print
/// DeepSpeed's summary table at the end of training (rank 0). Defaults are DeepSpeed's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommsLoggerConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Rank 0 prints one line per profiled collective as it completes.
    #[serde(default)]
    pub verbose: bool,
    /// Profile every collective; when false only those named in `prof_ops`.
    #[serde(default = "true_bool")]
    pub prof_all: bool,
    /// DeepSpeed op names to profile when `prof_all` is false (e.g. "all_reduce").
    #[serde(default)]
    pub prof_ops: Vec<String>,
    /// DeepSpeed splits rows by calling function; accepted, rsdeep's rows are per op.
    #[serde(default)]
    pub debug: bool,
}

impl Default for CommsLoggerConfig {
    fn default() -> Self {
        CommsLoggerConfig {
            enabled: false,
            verbose: false,
            prof_all: true,
            prof_ops: Vec::new(),
            debug: false,
        }
    }
}

/// `flops_profiler`: at training step `profile_step` (1-based) rank 0 prints DeepSpeed's
/// `print_model_profile` report of the model rsdeep runs (parameters, MACs and FLOPs per
/// module, the step's latencies), to stdout or to `output_file`. Keys and defaults are
/// DeepSpeed 0.19.8's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlopsProfilerConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Forwards recomputed per backward (activation checkpointing): the backward counts
    /// as `2 + recompute_fwd_factor` forwards in the FLOPS lines.
    #[serde(default)]
    pub recompute_fwd_factor: f64,
    /// The optimizer step to profile, counted from 1.
    #[serde(default = "one_u64", deserialize_with = "lenient_u64")]
    pub profile_step: u64,
    /// Depths of the aggregated profile (-1: every depth).
    #[serde(default = "minus_one")]
    pub module_depth: i64,
    /// Module classes listed per depth in the aggregated profile.
    #[serde(default = "one_u64", deserialize_with = "lenient_u64")]
    pub top_modules: u64,
    /// Print the per-module tree after the aggregated profile.
    #[serde(default = "true_bool")]
    pub detailed: bool,
    /// Write the report to this file (its folder is created) instead of stdout.
    #[serde(default)]
    pub output_file: Option<String>,
}

impl Default for FlopsProfilerConfig {
    fn default() -> Self {
        FlopsProfilerConfig {
            enabled: false,
            recompute_fwd_factor: 0.0,
            profile_step: 1,
            module_depth: -1,
            top_modules: 1,
            detailed: true,
            output_file: None,
        }
    }
}

fn one_u64() -> u64 {
    1
}

fn minus_one() -> i64 {
    -1
}

/// DeepSpeed's default monitor job name.
fn default_job_name() -> String {
    "DeepSpeedJobName".to_string()
}

fn default_gradient_clipping() -> AutoOr<f64> {
    AutoOr::Value(1.0)
}

fn one_f64() -> f64 {
    1.0
}

fn true_bool() -> bool {
    true
}

/// `zero_optimization`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroConfig {
    /// 0 (DDP), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
    #[serde(default)]
    pub stage: ZeroStage,
    #[serde(default = "true_bool")]
    pub contiguous_gradients: bool,
    #[serde(default = "true_bool")]
    pub reduce_scatter: bool,
    /// Elements per gradient-reduction bucket (DeepSpeed counts elements). Default 5e8.
    #[serde(default = "default_bucket")]
    pub reduce_bucket_size: AutoOr<u64>,
    /// Elements per all-gather bucket; must be even. Default 5e8.
    #[serde(default = "default_bucket_u64", deserialize_with = "lenient_u64")]
    pub allgather_bucket_size: u64,
    /// Accepted; must be true (rsdeep always all-gathers updated partitions).
    #[serde(default = "true_bool")]
    pub allgather_partitions: bool,
    /// `None` in the file means DeepSpeed's default: true for stage 3, false otherwise;
    /// `load` resolves it to `Some(_)`.
    #[serde(default)]
    pub overlap_comm: Option<bool>,
    #[serde(default = "true_bool")]
    pub load_from_fp32_weights: bool,
    #[serde(default = "true_bool")]
    pub use_multi_rank_bucket_allreduce: bool,
    #[serde(default)]
    pub round_robin_gradients: bool,
    #[serde(
        default = "default_sub_group",
        deserialize_with = "billion_unless_given"
    )]
    pub sub_group_size: u64,
    #[serde(default)]
    pub offload_optimizer: Option<OffloadConfig>,
    #[serde(default)]
    pub offload_param: Option<OffloadConfig>,
    // DeepSpeed's field names for the stage-3 keys are the unprefixed ones, with the
    // `stage3_` spellings as aliases: both load.
    #[serde(default = "default_prefetch", alias = "prefetch_bucket_size")]
    pub stage3_prefetch_bucket_size: AutoOr<u64>,
    #[serde(default = "default_persistence", alias = "param_persistence_threshold")]
    pub stage3_param_persistence_threshold: AutoOr<u64>,
    #[serde(
        default = "default_model_persistence",
        deserialize_with = "lenient_u64",
        alias = "model_persistence_threshold"
    )]
    pub stage3_model_persistence_threshold: u64,
    #[serde(
        default = "default_sub_group",
        deserialize_with = "billion_unless_given",
        alias = "max_live_parameters"
    )]
    pub stage3_max_live_parameters: u64,
    #[serde(
        default = "default_sub_group",
        deserialize_with = "billion_unless_given",
        alias = "max_reuse_distance"
    )]
    pub stage3_max_reuse_distance: u64,
    /// Save a gathered 16-bit `model.safetensors` with each ZeRO-3 checkpoint.
    #[serde(default, alias = "gather_16bit_weights_on_model_save")]
    pub stage3_gather_16bit_weights_on_model_save: bool,
    /// Older spelling of the key above (DeepSpeed still reads it).
    #[serde(default)]
    pub stage3_gather_fp16_weights_on_model_save: bool,
    #[serde(default)]
    pub memory_efficient_linear: Option<bool>,
    #[serde(default)]
    pub zero_quantized_weights: bool,
    #[serde(default)]
    pub zero_quantized_gradients: bool,
    #[serde(default)]
    pub zero_hpz_partition_size: Option<u64>,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        match serde_json::from_value(Value::Object(Default::default())) {
            Ok(zero) => zero,
            Err(e) => panic!("ZeroConfig: every field has a serde default: {e}"),
        }
    }
}

fn default_bucket() -> AutoOr<u64> {
    AutoOr::Value(500_000_000)
}
fn default_bucket_u64() -> u64 {
    500_000_000
}
fn default_sub_group() -> u64 {
    1_000_000_000
}
fn default_prefetch() -> AutoOr<u64> {
    AutoOr::Value(50_000_000)
}
fn default_persistence() -> AutoOr<u64> {
    AutoOr::Value(100_000)
}
fn default_model_persistence() -> u64 {
    i64::MAX as u64
}

impl ZeroConfig {
    /// DeepSpeed's rule for an absent `overlap_comm`: on for stage 3 only.
    pub fn overlap_comm_resolved(&self) -> bool {
        self.overlap_comm
            .unwrap_or(self.stage.partitions_parameters())
    }

    /// Either spelling of the 16-bit-save key.
    pub fn gather_16bit_weights_on_model_save(&self) -> bool {
        self.stage3_gather_16bit_weights_on_model_save
            || self.stage3_gather_fp16_weights_on_model_save
    }

    /// True when the optimizer step runs on the CPU (`offload_optimizer.device == cpu`).
    pub fn offload_optimizer_to_cpu(&self) -> bool {
        self.offload_optimizer
            .as_ref()
            .is_some_and(|o| o.device == OffloadDevice::Cpu)
    }
}

/// Where `offload_optimizer` / `offload_param` put their tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadDevice {
    None,
    Cpu,
    Nvme,
}

/// `offload_optimizer` / `offload_param`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadConfig {
    pub device: OffloadDevice,
    #[serde(default)]
    pub nvme_path: Option<String>,
    #[serde(default = "true_bool")]
    pub pin_memory: bool,
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub buffer_count: Option<u64>,
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub buffer_size: Option<u64>,
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub max_in_cpu: Option<u64>,
    #[serde(default)]
    pub ratio: Option<f64>,
    #[serde(default)]
    pub fast_init: bool,
}

/// `fp16`: dynamic loss scaling when `loss_scale` is 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp16Config {
    #[serde(default = "false_auto")]
    pub enabled: AutoOr<bool>,
    #[serde(default)]
    pub auto_cast: bool,
    /// 0 = dynamic loss scaling; otherwise a static scale.
    #[serde(default)]
    pub loss_scale: f64,
    #[serde(default = "default_initial_scale_power")]
    pub initial_scale_power: u32,
    #[serde(
        default = "default_loss_scale_window",
        deserialize_with = "lenient_u64"
    )]
    pub loss_scale_window: u64,
    #[serde(default = "default_hysteresis")]
    pub hysteresis: u32,
    #[serde(default)]
    pub consecutive_hysteresis: bool,
    #[serde(default = "one_f64")]
    pub min_loss_scale: f64,
}

impl Default for Fp16Config {
    fn default() -> Self {
        Fp16Config {
            enabled: false_auto(),
            auto_cast: false,
            loss_scale: 0.0,
            initial_scale_power: default_initial_scale_power(),
            loss_scale_window: default_loss_scale_window(),
            hysteresis: default_hysteresis(),
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
        }
    }
}

fn false_auto() -> AutoOr<bool> {
    AutoOr::Value(false)
}
fn default_initial_scale_power() -> u32 {
    16
}
fn default_loss_scale_window() -> u64 {
    1000
}
fn default_hysteresis() -> u32 {
    2
}

/// `bf16`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bf16Config {
    #[serde(default = "false_auto")]
    pub enabled: AutoOr<bool>,
    #[serde(default = "true_bool")]
    pub immediate_grad_update: bool,
    #[serde(default)]
    pub check_overflow: bool,
}

impl Default for Bf16Config {
    fn default() -> Self {
        Bf16Config {
            enabled: false_auto(),
            immediate_grad_update: true,
            check_overflow: false,
        }
    }
}

/// Optimizers rsdeep implements. DeepSpeed matches type names case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OptimizerKind {
    Adam,
    AdamW,
}

impl<'de> Deserialize<'de> for OptimizerKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.to_lowercase().as_str() {
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::AdamW),
            _ => Err(de::Error::custom(format!(
                "optimizer \"{name}\" is not supported: rsdeep implements \"Adam\" and \"AdamW\" \
                 (remove the \"optimizer\" section to use the training arguments' AdamW)"
            ))),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Adam => "Adam",
            OptimizerKind::AdamW => "AdamW",
        })
    }
}

/// `optimizer: {"type", "params"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(rename = "type")]
    pub kind: OptimizerKind,
    #[serde(default)]
    pub params: OptimizerParams,
}

impl OptimizerConfig {
    /// DeepSpeed's `Adam` runs in AdamW mode (decoupled weight decay) unless
    /// `adam_w_mode: false`; `AdamW` always does.
    pub fn decoupled_weight_decay(&self) -> bool {
        match self.kind {
            OptimizerKind::AdamW => true,
            OptimizerKind::Adam => self.params.adam_w_mode.unwrap_or(true),
        }
    }
}

/// `optimizer.params`. Absent values take torch's Adam defaults at use time
/// (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerParams {
    #[serde(default)]
    pub lr: Option<AutoOr<f64>>,
    #[serde(default)]
    pub betas: Option<AutoOr<[f64; 2]>>,
    #[serde(default)]
    pub eps: Option<AutoOr<f64>>,
    #[serde(default)]
    pub weight_decay: Option<AutoOr<f64>>,
    #[serde(default)]
    pub adam_w_mode: Option<bool>,
    /// Accepted: rsdeep has one Adam implementation.
    #[serde(default)]
    pub torch_adam: Option<bool>,
    #[serde(default)]
    pub amsgrad: Option<bool>,
}

/// DeepSpeed schedulers rsdeep implements (DeepSpeed's formulas: `docs/zero-engine.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SchedulerKind {
    WarmupLR,
    WarmupDecayLR,
    WarmupCosineLR,
    OneCycle,
    LRRangeTest,
}

impl<'de> Deserialize<'de> for SchedulerKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "WarmupLR" => Ok(SchedulerKind::WarmupLR),
            "WarmupDecayLR" => Ok(SchedulerKind::WarmupDecayLR),
            "WarmupCosineLR" => Ok(SchedulerKind::WarmupCosineLR),
            "OneCycle" => Ok(SchedulerKind::OneCycle),
            "LRRangeTest" => Ok(SchedulerKind::LRRangeTest),
            _ => Err(de::Error::custom(format!(
                "scheduler \"{name}\" is not supported: rsdeep implements \"WarmupLR\", \
                 \"WarmupDecayLR\", \"WarmupCosineLR\", \"OneCycle\" and \"LRRangeTest\" (or \
                 remove the \"scheduler\" section to use the training arguments' lr_scheduler_type)"
            ))),
        }
    }
}

/// `scheduler: {"type", "params"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    #[serde(rename = "type")]
    pub kind: SchedulerKind,
    #[serde(default)]
    pub params: SchedulerParams,
}

/// `log` (DeepSpeed's default: ln(step+1)/ln(N)) or `linear` (step/N) warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupType {
    Log,
    Linear,
}

/// `scheduler.params`; `None` means DeepSpeed's default for the scheduler type
/// (WarmupLR: min 0, max 0.001, 1000 steps, log; WarmupCosineLR: ratios 0 and 1e-4).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerParams {
    #[serde(default)]
    pub warmup_min_lr: Option<AutoOr<f64>>,
    #[serde(default)]
    pub warmup_max_lr: Option<AutoOr<f64>>,
    #[serde(default)]
    pub warmup_num_steps: Option<AutoOr<u64>>,
    #[serde(default)]
    pub warmup_type: Option<WarmupType>,
    #[serde(default)]
    pub total_num_steps: Option<AutoOr<u64>>,
    #[serde(default)]
    pub warmup_min_ratio: Option<f64>,
    #[serde(default)]
    pub cos_min_ratio: Option<f64>,
    #[serde(default)]
    pub last_batch_iteration: Option<i64>,
    // OneCycle (DeepSpeed's defaults: second step size = first, second stair count =
    // first, no decay, cycle_momentum true — which rsdeep refuses, it does not cycle
    // Adam's beta1).
    #[serde(default)]
    pub cycle_min_lr: Option<f64>,
    #[serde(default)]
    pub cycle_max_lr: Option<f64>,
    #[serde(default)]
    pub cycle_first_step_size: Option<f64>,
    #[serde(default)]
    pub cycle_second_step_size: Option<f64>,
    #[serde(default)]
    pub cycle_first_stair_count: Option<u64>,
    #[serde(default)]
    pub cycle_second_stair_count: Option<u64>,
    #[serde(default)]
    pub decay_step_size: Option<f64>,
    #[serde(default)]
    pub decay_lr_rate: Option<f64>,
    #[serde(default)]
    pub cycle_momentum: Option<bool>,
    #[serde(default)]
    pub cycle_min_mom: Option<f64>,
    #[serde(default)]
    pub cycle_max_mom: Option<f64>,
    #[serde(default)]
    pub decay_mom_rate: Option<f64>,
    // LRRangeTest (DeepSpeed's defaults: min 1e-3, step size 2000, rate 1, no staircase).
    #[serde(default)]
    pub lr_range_test_min_lr: Option<f64>,
    #[serde(default)]
    pub lr_range_test_step_size: Option<u64>,
    #[serde(default)]
    pub lr_range_test_step_rate: Option<f64>,
    #[serde(default)]
    pub lr_range_test_staircase: Option<bool>,
}

/// `activation_checkpointing`: rsdeep recomputes whole decoder layers; the partitioning
/// and CPU options are refused when set to true (see validation).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationCheckpointingConfig {
    #[serde(default)]
    pub partition_activations: bool,
    #[serde(default)]
    pub cpu_checkpointing: bool,
    #[serde(default)]
    pub contiguous_memory_optimization: bool,
    #[serde(default)]
    pub number_checkpoints: Option<u64>,
    #[serde(default)]
    pub synchronize_checkpoint_boundary: bool,
    #[serde(default)]
    pub profile: bool,
}

/// `checkpoint`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    #[serde(default)]
    pub tag_validation: Option<String>,
    #[serde(default)]
    pub load_universal: bool,
    #[serde(default)]
    pub use_node_local_storage: bool,
}
