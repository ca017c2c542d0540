//! train.json: the training arguments plus the DeepSpeed section, resolved for a world
//! size: train.json, command-line overrides and `rsdeep check-config`. The engine keys
//! are listed in `docs/zero-engine.md`; DeepSpeed's keys, defaults and batch rule and
//! Hugging Face's "auto" filling follow the upstream code.
//!
//! `load` runs, in order: JSON parse (syntax errors as file:line:column) → command-line
//! overrides → typed training arguments (unknown keys with did-you-mean, wrong types) →
//! the DeepSpeed section (inline object, or a path relative to train.json's folder, or
//! ZeRO-0 with "auto" everywhere when absent), typed once to report wrong types → Hugging
//! Face's "auto" filling with every mismatch listed → the batch decision (an enabled
//! `elasticity` block, or the kept global batch of `load_keeping_batch`) → DeepSpeed's batch
//! rule for the world size → semantic validation. Model-dependent "auto"s stay
//! `AutoOr::Auto` until the worker calls `TrainConfig::fill_model_autos(hidden_size,
//! total_steps)`.
//!
//! The launcher ships the resolved `TrainConfig` to workers as JSON (`to_pretty_json`,
//! `from_json`).

mod auto;
mod batch;
mod deepspeed;
mod ds_compat;
mod elasticity;
mod error;
mod json_errors;
mod lr_schedule;
mod overrides;
mod train_args;
mod validate;
mod zero_stage;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use auto::AutoFiller;
pub use batch::{BatchSizes, resolve_batch};
pub use deepspeed::{
    ActivationCheckpointingConfig, AutoOr, Bf16Config, CheckpointConfig, CommsLoggerConfig,
    DeepSpeedConfig, FlopsProfilerConfig, Fp16Config, MonitorBlock, OffloadConfig, OffloadDevice,
    OptimizerConfig, OptimizerKind, OptimizerParams, SchedulerConfig, SchedulerKind,
    SchedulerParams, WarmupType, ZeroConfig,
};
pub use error::ConfigError;
pub use json_errors::did_you_mean;
pub use lr_schedule::{HfSchedule, LrSchedulerType, WsdShape, resolve_hf_schedule};
pub use overrides::{Override, parse_overrides};
pub use train_args::{
    CommBackend, IntervalStrategy, ResumeFrom, SamplingStrategy, Task, TrainingArgs,
};
pub use zero_stage::{NotAZeroStage, ZeroStage};

/// Where the DeepSpeed section came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "path")]
pub enum DeepSpeedSource {
    /// An object under train.json's `deepspeed` key.
    Inline,
    /// A DeepSpeed JSON file (path resolved against train.json's folder).
    File(PathBuf),
    /// No `deepspeed` key: ZeRO stage 0 with every argument-derived key on "auto".
    Default,
}

/// Numeric precision of the model states and compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

/// The optimizer the engine builds, whichever section it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResolvedOptimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW-style decoupled weight decay (DeepSpeed's `Adam` defaults to it too).
    pub decoupled_weight_decay: bool,
}

/// The fully resolved configuration of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The train.json it was loaded from.
    pub source: PathBuf,
    /// Data-parallel world size the batch rule was applied for.
    pub world_size: usize,
    pub args: TrainingArgs,
    pub deepspeed_source: DeepSpeedSource,
    pub deepspeed: DeepSpeedConfig,
    /// The batch rule's result (also written back into `deepspeed` and `args`).
    pub batch: BatchSizes,
    /// Settings accepted without effect; the launcher prints them.
    pub warnings: Vec<String>,
}

/// The global batch an elastic job keeps when its world size changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepGlobalBatch {
    pub train_batch_size: u64,
    pub micro_batch_per_gpu: u64,
}

/// Reads, overrides, fills and validates train.json for `world_size` data-parallel ranks.
///
/// With an enabled DeepSpeed `elasticity` block (version 0.1), that block decides the
/// global and micro batch (`elasticity.rs`); the batch values Hugging Face fills from the
/// training arguments ("auto") are replaced by its result, and the world size must be one
/// the block allows.
pub fn load(
    path: &Path,
    overrides: &[String],
    world_size: usize,
) -> Result<TrainConfig, ConfigError> {
    resolve(path, overrides, world_size, None)
}

/// `load` for a job continuing at `world_size` ranks that keeps `keep`'s global batch:
/// the micro batch stays, gradient accumulation becomes the one that gives the global batch
/// exactly, or the closest (never below 1) with a warning naming both batches. With an
/// enabled `elasticity` block, that block's rule decides instead (as `load`).
///
/// The batch keys of the DeepSpeed config and the training arguments' batch values are
/// replaced by the kept batch, so values that no longer divide at the new world size are
/// not an error. Halfway between two accumulations, the smaller one is taken (the global
/// batch never grows past a tie).
pub fn load_keeping_batch(
    path: &Path,
    overrides: &[String],
    world_size: usize,
    keep: KeepGlobalBatch,
) -> Result<TrainConfig, ConfigError> {
    resolve(path, overrides, world_size, Some(keep))
}

/// The pipeline of `load` and `load_keeping_batch`.
fn resolve(
    path: &Path,
    overrides: &[String],
    world_size: usize,
    keep: Option<KeepGlobalBatch>,
) -> Result<TrainConfig, ConfigError> {
    let mut raw = top_level_object(json_errors::read_json_file(path)?, path)?;
    overrides::canonicalize_keys(&mut raw);
    let parsed_overrides = parse_overrides(overrides)?;
    overrides::apply_to_training_args(&mut raw, &parsed_overrides)?;
    let deepspeed_on_command_line = parsed_overrides.iter().any(|o| o.key == "deepspeed");
    let (deepspeed_source, mut ds_raw) =
        take_deepspeed_section(&mut raw, path, deepspeed_on_command_line)?;
    overrides::apply_to_deepspeed(&mut ds_raw, &parsed_overrides)?;

    let mut args: TrainingArgs = json_errors::typed_from_value(Value::Object(raw), path, "")?;
    let mut warnings = validate::validate_training_args(&args, path)?;

    let (ds_file, prefix) = deepspeed_location(&deepspeed_source, path);
    let elastic = elasticity::take_block(&mut ds_raw, &ds_file, prefix)?;
    warnings.extend(ds_compat::make_loadable(
        &mut ds_raw,
        &ds_file,
        prefix,
        args.strict_config,
    )?);
    // Typed once before filling: a wrong type is reported as such, not as a mismatch.
    let _: DeepSpeedConfig =
        json_errors::typed_from_value(ds_raw.clone(), &ds_file, prefix_key(prefix))?;
    warnings.extend(precision_section_warnings(&ds_raw, &args));
    let decision = BatchDecision::new(elastic, keep);
    let ignored_keys = decision.take_batch_keys(&mut ds_raw, prefix)?;

    let mut filler = AutoFiller::new(&mut ds_raw);
    filler.fill_from_training_args(&args, world_size.max(1));
    if !filler.mismatches.is_empty() {
        return Err(ConfigError::AutoMismatch {
            mismatches: filler.mismatches,
        });
    }
    let mut deepspeed: DeepSpeedConfig =
        json_errors::typed_from_value(ds_raw, &ds_file, prefix_key(prefix))?;
    let world = world_size.max(1) as u64;
    warnings.extend(decision.set_batch(&mut deepspeed, world, &ignored_keys)?);
    let batch = apply_batch_rule(&mut deepspeed, &mut args, world_size)?;
    deepspeed.zero_optimization.overlap_comm =
        Some(deepspeed.zero_optimization.overlap_comm_resolved());
    validate::validate_deepspeed(&deepspeed, &ds_file, prefix)?;
    warnings.extend(validate::memory_notices(&deepspeed));
    Ok(TrainConfig {
        source: path.to_path_buf(),
        world_size: world_size.max(1),
        args,
        deepspeed_source,
        deepspeed,
        batch,
        warnings,
    })
}

fn top_level_object(value: Value, path: &Path) -> Result<Map<String, Value>, ConfigError> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ConfigError::WrongType {
            file: path.to_path_buf(),
            key: "(top level)".to_string(),
            message: format!("expected a JSON object of training arguments, found {other}"),
        }),
    }
}

/// Removes `deepspeed` from the raw train.json and returns the DeepSpeed JSON it names.
/// A relative path is resolved against train.json's folder, or against the current
/// directory when it was given on the command line (`--deepspeed path`).
fn take_deepspeed_section(
    raw: &mut Map<String, Value>,
    train_json: &Path,
    from_command_line: bool,
) -> Result<(DeepSpeedSource, Value), ConfigError> {
    match raw.get("deepspeed").cloned() {
        None | Some(Value::Null) => Ok((DeepSpeedSource::Default, auto::default_deepspeed_value())),
        Some(Value::Object(inline)) => {
            raw.remove("deepspeed");
            Ok((DeepSpeedSource::Inline, Value::Object(inline)))
        }
        Some(Value::String(relative)) => {
            let folder = match train_json.parent() {
                Some(parent) if !from_command_line => parent,
                _ => Path::new(""),
            };
            let file = folder.join(&relative);
            if !file.is_file() {
                let base = if from_command_line {
                    "the current directory"
                } else {
                    "the folder of train.json"
                };
                return Err(ConfigError::Invalid {
                    file: train_json.to_path_buf(),
                    key: "deepspeed".to_string(),
                    message: format!(
                        "DeepSpeed config {} not found (a relative path is resolved against {base})",
                        file.display()
                    ),
                });
            }
            let value = json_errors::read_json_file(&file)?;
            if !value.is_object() {
                return Err(ConfigError::WrongType {
                    file,
                    key: "(top level)".to_string(),
                    message: "a DeepSpeed config must be a JSON object".to_string(),
                });
            }
            Ok((DeepSpeedSource::File(file), value))
        }
        Some(other) => Err(ConfigError::WrongType {
            file: train_json.to_path_buf(),
            key: "deepspeed".to_string(),
            message: format!(
                "expected a DeepSpeed config object or the path of a DeepSpeed JSON file, found {other}"
            ),
        }),
    }
}

/// The file errors in the DeepSpeed section point at, and the key prefix they carry.
fn deepspeed_location(source: &DeepSpeedSource, train_json: &Path) -> (PathBuf, &'static str) {
    match source {
        DeepSpeedSource::File(file) => (file.clone(), ""),
        DeepSpeedSource::Inline | DeepSpeedSource::Default => {
            (train_json.to_path_buf(), "deepspeed.")
        }
    }
}

fn prefix_key(prefix: &str) -> &str {
    prefix.trim_end_matches('.')
}

/// Hugging Face fills fp16/bf16 only inside an existing section: say so when the
/// training arguments ask for a precision the DeepSpeed file will not enable.
fn precision_section_warnings(ds: &Value, args: &TrainingArgs) -> Vec<String> {
    [("bf16", args.bf16), ("fp16", args.fp16)]
        .into_iter()
        .filter(|(section, wanted)| *wanted && ds.get(section).is_none())
        .map(|(section, _)| {
            format!(
                "{section} is true in the training arguments but the DeepSpeed config has no \
                 \"{section}\" section, so (as with DeepSpeed) training runs without it; add \
                 \"{section}\": {{\"enabled\": \"auto\"}}"
            )
        })
        .collect()
}

/// What decides the batch sizes before DeepSpeed's batch rule checks them.
enum BatchDecision {
    /// The DeepSpeed config's values (after "auto" filling).
    Rule,
    /// An enabled `elasticity` block.
    Elastic(elasticity::Elasticity),
    /// The global batch of the job before its world size changed.
    Keep(KeepGlobalBatch),
}

impl BatchDecision {
    /// An enabled `elasticity` block wins over a kept batch.
    fn new(elastic: Option<elasticity::Elasticity>, keep: Option<KeepGlobalBatch>) -> Self {
        match (elastic, keep) {
            (Some(block), _) => BatchDecision::Elastic(block),
            (None, Some(keep)) => BatchDecision::Keep(keep),
            (None, None) => BatchDecision::Rule,
        }
    }

    /// Before "auto" filling: the batch keys a decision replaces are removed from the raw
    /// DeepSpeed JSON (never filled nor compared with the training arguments). Returns the
    /// explicit keys an elastic block ignores; refuses them where DeepSpeed did.
    fn take_batch_keys(
        &self,
        ds_raw: &mut Value,
        prefix: &str,
    ) -> Result<Vec<&'static str>, ConfigError> {
        let ignored = match self {
            BatchDecision::Rule => return Ok(Vec::new()),
            BatchDecision::Elastic(block) => block.explicit_batch_keys(ds_raw, prefix)?,
            BatchDecision::Keep(_) => Vec::new(),
        };
        elasticity::remove_batch_keys(ds_raw);
        Ok(ignored)
    }

    /// Writes the decided batch keys into `ds` for the batch rule; the notice to print.
    fn set_batch(
        &self,
        ds: &mut DeepSpeedConfig,
        world: u64,
        ignored: &[&str],
    ) -> Result<Option<String>, ConfigError> {
        match self {
            BatchDecision::Rule => Ok(None),
            BatchDecision::Elastic(block) => {
                let batch = block.batch_for(world)?;
                set_batch_keys(ds, batch.train_batch_size, batch.micro_batch_per_gpu, None);
                Ok(Some(elasticity::batch_notice(world, &batch, ignored)))
            }
            BatchDecision::Keep(keep) => {
                let accumulation = kept_accumulation(keep, world);
                let micro = keep.micro_batch_per_gpu;
                let global = micro.saturating_mul(accumulation).saturating_mul(world);
                set_batch_keys(ds, global, micro, Some(accumulation));
                Ok(kept_batch_notice(keep, world, accumulation, global))
            }
        }
    }
}

fn set_batch_keys(ds: &mut DeepSpeedConfig, global: u64, micro: u64, accumulation: Option<u64>) {
    ds.train_batch_size = Some(AutoOr::Value(global));
    ds.train_micro_batch_size_per_gpu = Some(AutoOr::Value(micro));
    ds.gradient_accumulation_steps = accumulation.map(AutoOr::Value);
}

/// The accumulation closest to `keep`'s global batch at `world` ranks, at least 1; a tie
/// goes to the smaller one.
fn kept_accumulation(keep: &KeepGlobalBatch, world: u64) -> u64 {
    let per_step = keep.micro_batch_per_gpu.saturating_mul(world).max(1);
    let (whole, rest) = (
        keep.train_batch_size / per_step,
        keep.train_batch_size % per_step,
    );
    let closest = if rest > per_step - rest {
        whole + 1
    } else {
        whole
    };
    closest.max(1)
}

/// A warning when the kept global batch cannot be met exactly at `world` ranks.
fn kept_batch_notice(
    keep: &KeepGlobalBatch,
    world: u64,
    accumulation: u64,
    global: u64,
) -> Option<String> {
    (global != keep.train_batch_size).then(|| {
        format!(
            "the job's global batch {} cannot be kept at world size {world}: train_batch_size \
             is now {global} = micro batch {} x accumulation {accumulation} x {world} ranks \
             (the closest)",
            keep.train_batch_size, keep.micro_batch_per_gpu
        )
    })
}

/// DeepSpeed's batch rule on the filled values; writes the result back everywhere.
fn apply_batch_rule(
    ds: &mut DeepSpeedConfig,
    args: &mut TrainingArgs,
    world_size: usize,
) -> Result<BatchSizes, ConfigError> {
    let explicit = |v: Option<AutoOr<u64>>| v.and_then(|a| a.value());
    let batch = resolve_batch(
        explicit(ds.train_batch_size),
        explicit(ds.train_micro_batch_size_per_gpu),
        explicit(ds.gradient_accumulation_steps),
        world_size.max(1) as u64,
    )?;
    ds.train_batch_size = Some(AutoOr::Value(batch.train_batch_size));
    ds.train_micro_batch_size_per_gpu = Some(AutoOr::Value(batch.train_micro_batch_size_per_gpu));
    ds.gradient_accumulation_steps = Some(AutoOr::Value(batch.gradient_accumulation_steps));
    args.per_device_train_batch_size = batch.train_micro_batch_size_per_gpu;
    args.gradient_accumulation_steps = batch.gradient_accumulation_steps;
    Ok(batch)
}

impl TrainConfig {
    /// Hugging Face's `trainer_config_finalize`: fills the keys that need the model's
    /// hidden size and the total optimizer steps (reduce_bucket_size = h², ZeRO-3
    /// stage3_prefetch_bucket_size = int(0.9·h²) and stage3_param_persistence_threshold =
    /// 10·h, scheduler total_num_steps and warmup_num_steps = max(1, warmup)). Below ZeRO-3
    /// the stage-3 keys left on "auto" take DeepSpeed's defaults (they are unused there).
    /// Explicit scheduler step counts that differ are listed as mismatches.
    pub fn fill_model_autos(
        &mut self,
        hidden_size: usize,
        total_steps: u64,
    ) -> Result<(), ConfigError> {
        let h = hidden_size as u64;
        let zero = &mut self.deepspeed.zero_optimization;
        let h_squared = h.saturating_mul(h);
        fill_only(&mut zero.reduce_bucket_size, h_squared);
        let stage3 = zero.stage.partitions_parameters();
        let prefetch = if stage3 {
            (0.9 * h_squared as f64) as u64
        } else {
            50_000_000
        };
        let persistence = if stage3 {
            h.saturating_mul(10)
        } else {
            100_000
        };
        fill_only(&mut zero.stage3_prefetch_bucket_size, prefetch);
        fill_only(&mut zero.stage3_param_persistence_threshold, persistence);
        let warmup = self.args.warmup_steps_for(total_steps).max(1);
        let mut mismatches = Vec::new();
        if let Some(scheduler) = &mut self.deepspeed.scheduler {
            let params = &mut scheduler.params;
            let total_key = (
                "scheduler.params.total_num_steps",
                "num_training_steps (calculated)",
            );
            fill_match(
                &mut params.total_num_steps,
                total_steps,
                total_key,
                &mut mismatches,
            );
            let warmup_key = ("scheduler.params.warmup_num_steps", "warmup_steps");
            fill_match(
                &mut params.warmup_num_steps,
                warmup,
                warmup_key,
                &mut mismatches,
            );
        }
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::AutoMismatch { mismatches })
        }
    }

    /// The DeepSpeed keys still on "auto" (empty after `fill_model_autos`).
    pub fn unresolved_autos(&self) -> Vec<&'static str> {
        let zero = &self.deepspeed.zero_optimization;
        let mut pending = Vec::new();
        let checks = [
            (
                "zero_optimization.reduce_bucket_size",
                zero.reduce_bucket_size.is_auto(),
            ),
            (
                "zero_optimization.stage3_prefetch_bucket_size",
                zero.stage3_prefetch_bucket_size.is_auto(),
            ),
            (
                "zero_optimization.stage3_param_persistence_threshold",
                zero.stage3_param_persistence_threshold.is_auto(),
            ),
        ];
        pending.extend(checks.iter().filter(|(_, auto)| *auto).map(|(k, _)| *k));
        if let Some(scheduler) = &self.deepspeed.scheduler {
            let params = &scheduler.params;
            if params.total_num_steps.is_some_and(|v| v.is_auto()) {
                pending.push("scheduler.params.total_num_steps");
            }
            if params.warmup_num_steps.is_some_and(|v| v.is_auto()) {
                pending.push("scheduler.params.warmup_num_steps");
            }
        }
        pending
    }

    pub fn zero_stage(&self) -> ZeroStage {
        self.deepspeed.zero_optimization.stage
    }

    /// bf16 / fp16 / fp32, from the DeepSpeed section (after "auto" filling).
    pub fn precision(&self) -> Precision {
        if self.deepspeed.bf16.enabled.value() == Some(true) {
            Precision::Bf16
        } else if self.deepspeed.fp16.enabled.value() == Some(true) {
            Precision::Fp16
        } else {
            Precision::Fp32
        }
    }

    /// Global gradient-norm clipping threshold (0 = off).
    pub fn gradient_clipping(&self) -> f64 {
        self.deepspeed
            .gradient_clipping
            .value()
            .unwrap_or(self.args.max_grad_norm)
    }

    /// Recompute each decoder layer in backward: `gradient_checkpointing` in the training
    /// arguments or an `activation_checkpointing` section in the DeepSpeed config.
    pub fn activation_checkpointing(&self) -> bool {
        self.args.gradient_checkpointing || self.deepspeed.activation_checkpointing.is_some()
    }

    /// The optimizer to build: the DeepSpeed `optimizer` section (absent params take
    /// torch's defaults) or, without one, Hugging Face's AdamW from the training arguments.
    pub fn optimizer(&self) -> ResolvedOptimizer {
        let args = &self.args;
        match &self.deepspeed.optimizer {
            Some(section) => {
                let p = &section.params;
                let get = |v: Option<AutoOr<f64>>, d: f64| v.and_then(|a| a.value()).unwrap_or(d);
                ResolvedOptimizer {
                    kind: section.kind,
                    lr: get(p.lr, 1e-3),
                    betas: p.betas.and_then(|b| b.value()).unwrap_or([0.9, 0.999]),
                    eps: get(p.eps, 1e-8),
                    weight_decay: get(p.weight_decay, 0.0),
                    decoupled_weight_decay: section.decoupled_weight_decay(),
                }
            }
            None => ResolvedOptimizer {
                kind: OptimizerKind::AdamW,
                lr: args.learning_rate,
                betas: [args.adam_beta1, args.adam_beta2],
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
                decoupled_weight_decay: true,
            },
        }
    }

    /// The resolved configuration as pretty JSON (what the launcher ships to workers).
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialize TrainConfig: {e}\"}}"))
    }

    /// Reads back what `to_pretty_json` wrote (the worker side).
    pub fn from_json(text: &str) -> Result<TrainConfig, ConfigError> {
        let path = Path::new("<resolved config>");
        let value = json_errors::parse_json_text(path, text)?;
        json_errors::typed_from_value(value, path, "")
    }

    /// One line of batch math and the main choices, for `check-config` and logs.
    pub fn summary(&self) -> String {
        let b = &self.batch;
        let pending = self.unresolved_autos();
        let pending_text = if pending.is_empty() {
            String::new()
        } else {
            format!("; filled once the model is loaded: {}", pending.join(", "))
        };
        format!(
            "world size {}: train_batch_size {} = {} micro batch x {} accumulation x {} ranks; \
             ZeRO stage {}; {:?}; {} lr {}{}",
            self.world_size,
            b.train_batch_size,
            b.train_micro_batch_size_per_gpu,
            b.gradient_accumulation_steps,
            b.world_size,
            self.zero_stage(),
            self.precision(),
            self.optimizer().kind,
            self.optimizer().lr,
            pending_text
        )
    }
}

fn fill_only(slot: &mut AutoOr<u64>, value: u64) {
    if slot.is_auto() {
        *slot = AutoOr::Value(value);
    }
}

fn fill_match(
    slot: &mut Option<AutoOr<u64>>,
    hf_value: u64,
    (ds_key, hf_key): (&str, &str),
    mismatches: &mut Vec<String>,
) {
    match slot {
        Some(AutoOr::Auto) => *slot = Some(AutoOr::Value(hf_value)),
        Some(AutoOr::Value(v)) if *v != hf_value => {
            mismatches.push(format!("- ds {ds_key}={v} vs hf {hf_key}={hf_value}"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
