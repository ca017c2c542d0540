//! What a DeepSpeed config published by another project needs before rsdeep types it:
//! DeepSpeed's older spellings rewritten to the current ones, DeepSpeed features rsdeep
//! lacks judged by one rule, and keys nobody reads dropped with a warning.
//!
//! The rule for a feature rsdeep does not have: refused (naming the feature and what to
//! do) only when running without it would change the math or the parallel layout (sparse
//! attention, tensor/sequence/pipeline parallelism, compression, curriculum data,
//! quantized training, 1-bit optimizers, apex AMP); otherwise the run goes on with one
//! notice saying what rsdeep does instead; a block that DeepSpeed itself disables
//! (`enabled: false`, `device: "none"`, a size of 1) loads silently. Keys DeepSpeed does
//! not know either (typos included) are warnings with a did-you-mean, or errors with
//! `strict_config`.
//!
//! The `elasticity` block is not judged here: `elasticity.rs` takes it out of the DeepSpeed
//! JSON before this runs and applies it.

use std::path::Path;

use serde_json::{Map, Value};

use super::deepspeed::DeepSpeedConfig;
use super::error::ConfigError;
use super::json_errors;

/// The warnings and notices produced while making `ds` loadable.
pub type Notices = Vec<String>;

/// Rewrites legacy keys, judges unsupported features and (unless `strict`) drops keys
/// rsdeep's schema does not know, so that `ds` types as `DeepSpeedConfig`. `file` and
/// `prefix` (`"deepspeed."` for an inline section) only name keys in messages.
pub fn make_loadable(
    ds: &mut Value,
    file: &Path,
    prefix: &str,
    strict: bool,
) -> Result<Notices, ConfigError> {
    let mut notices = Notices::new();
    let Some(map) = ds.as_object_mut() else {
        return Ok(notices);
    };
    rewrite_legacy_keys(map, &mut notices);
    judge_features(map, file, prefix, &mut notices)?;
    notices.extend(drop_unknown_keys(ds, file, prefix, strict)?);
    Ok(notices)
}

/// Older DeepSpeed spellings that mean exactly what a current key means.
fn rewrite_legacy_keys(ds: &mut Map<String, Value>, notices: &mut Notices) {
    let Some(zero) = ds
        .get_mut("zero_optimization")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if zero.remove("cpu_offload") == Some(Value::Bool(true))
        && !zero.contains_key("offload_optimizer")
    {
        zero.insert(
            "offload_optimizer".into(),
            serde_json::json!({"device": "cpu"}),
        );
        notices.push(
            "zero_optimization.cpu_offload: true is DeepSpeed's older spelling of offload_optimizer {\"device\": \"cpu\"}; read as that".into(),
        );
    }
    if zero.remove("cpu_offload_params") == Some(Value::Bool(true))
        && !zero.contains_key("offload_param")
    {
        zero.insert("offload_param".into(), serde_json::json!({"device": "cpu"}));
    }
    zero.remove("cpu_offload_use_pin_memory");
    // Accelerate fills this "auto" from its own plugin (default false); DeepSpeed's
    // default is false as well.
    for key in [
        "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
        "gather_16bit_weights_on_model_save",
    ] {
        if zero.get(key).is_some_and(|v| v == "auto") {
            zero.insert(key.into(), Value::Bool(false));
        }
    }
}

/// What rsdeep does with a DeepSpeed feature it does not implement.
enum Verdict {
    /// Running without it would change the math or the layout: refuse, saying this.
    Refuse(&'static str),
    /// Run without it and say so once.
    Notice(&'static str),
    /// Disabled or without effect: nothing to say.
    Silent,
}

/// Top-level sections of DeepSpeed features rsdeep has no mechanism for.
const SECTIONS_WITHOUT_MECHANISM: [&str; 16] = [
    "aio",
    "amp",
    "sparse_attention",
    "compression_training",
    "data_efficiency",
    "curriculum_learning",
    "quantize_training",
    "tensor_parallel",
    "sequence_parallel_size",
    "pipeline",
    "autotuning",
    "nebula",
    "compile",
    "monitor_config",
    "wandb",
    "comet",
];

/// Top-level sections of features rsdeep does not implement, judged by their content:
/// disabled or without effect when no guard above matches (`aio` only matters for NVMe
/// offload, which is announced separately).
fn verdict(key: &str, value: &Value) -> Option<Verdict> {
    let enabled = || {
        value
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let more_than_one = |field: &str| value.get(field).and_then(Value::as_f64).unwrap_or(1.0) > 1.0;
    let verdict = match key {
        "amp" if enabled() => {
            Verdict::Refuse("NVIDIA apex AMP is not supported: use \"bf16\" or \"fp16\" instead")
        }
        "sparse_attention" => Verdict::Refuse(
            "sparse attention is not implemented (it changes the model's attention)",
        ),
        "compression_training" => {
            Verdict::Refuse("compression training is not implemented (it changes the model)")
        }
        "data_efficiency" | "curriculum_learning" if enabled() => Verdict::Refuse(
            "curriculum learning / data efficiency is not implemented (it changes which data each step sees): set enabled false",
        ),
        "quantize_training" if enabled() => {
            Verdict::Refuse("quantized training (MoQ) is not implemented")
        }
        "tensor_parallel" if more_than_one("autotp_size") || more_than_one("tp_size") => {
            Verdict::Refuse(
                "tensor parallelism is not implemented (ZeRO data parallel only): set autotp_size 1",
            )
        }
        "sequence_parallel_size" if value.as_f64().unwrap_or(1.0) > 1.0 => {
            Verdict::Refuse("sequence parallelism is not implemented: set it to 1")
        }
        "pipeline" if more_than_one("stages") => {
            Verdict::Refuse("pipeline parallelism is not implemented (ZeRO data parallel only)")
        }
        "autotuning" if enabled() => {
            Verdict::Notice("autotuning: only DeepSpeed's autotuner reads this block; ignored")
        }
        "nebula" if enabled() => Verdict::Notice(
            "nebula: Nebula checkpointing is not built; rsdeep writes its own crash-safe checkpoints",
        ),
        "compile" if enabled() => Verdict::Notice(
            "compile: rsdeep does not use torch.compile (its training step is compiled Rust over libtorch); ignored",
        ),
        "monitor_config" | "wandb" | "comet" if enabled() => Verdict::Notice(
            "wandb / comet monitor blocks: use report_to (wandb is a tracker there; comet is not built); this block is ignored",
        ),
        _ if SECTIONS_WITHOUT_MECHANISM.contains(&key) => Verdict::Silent,
        _ => return None,
    };
    Some(verdict)
}

/// Applies `verdict` to every top-level section, and the rules for single keys inside the
/// sections rsdeep does read.
fn judge_features(
    ds: &mut Map<String, Value>,
    file: &Path,
    prefix: &str,
    notices: &mut Notices,
) -> Result<(), ConfigError> {
    let refuse = |key: &str, why: &str| ConfigError::UnknownKey {
        file: file.to_path_buf(),
        key: format!("{prefix}{key}"),
        suggestion: None,
        note: Some(format!(
            "a DeepSpeed feature rsdeep does not support: {why}"
        )),
    };
    // DeepSpeed turns the wall-clock breakdown on with the FLOPs profiler.
    if ds
        .get("flops_profiler")
        .is_some_and(|p| p.get("enabled") == Some(&Value::Bool(true)))
    {
        ds.insert("wall_clock_breakdown".into(), Value::Bool(true));
    }
    if ds.get("wall_clock_breakdown") == Some(&Value::Bool(true)) {
        notices.push(
            "wall_clock_breakdown: rank 0 prints DeepSpeed's `time (ms) | fwd | bwd | bwd_allreduce | step` line every steps_per_print steps (mean per optimizer step)".into(),
        );
    }
    notices.extend(comms_logger_notice(ds));
    notices.extend(flops_profiler_notice(ds));
    let keys: Vec<String> = ds.keys().cloned().collect();
    for key in keys {
        match verdict(&key, &ds[&key]) {
            Some(Verdict::Refuse(why)) => return Err(refuse(&key, why)),
            Some(Verdict::Notice(what)) => notices.push(what.to_string()),
            Some(Verdict::Silent) => {}
            None => continue,
        }
        ds.remove(&key);
    }
    if ds
        .get("fp16")
        .and_then(|f| f.get("fp16_master_weights_and_grads"))
        .is_some_and(|v| v == &Value::Bool(true))
    {
        return Err(refuse(
            "fp16.fp16_master_weights_and_grads",
            "fp16 master weights change the update (rsdeep keeps fp32 masters): set it false",
        ));
    }
    let adam = ds
        .get("optimizer")
        .and_then(|o| o.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| matches!(t.to_ascii_lowercase().as_str(), "adam" | "adamw"));
    if let Some(params) = ds
        .get_mut("optimizer")
        .and_then(|o| o.get_mut("params"))
        .and_then(Value::as_object_mut)
    {
        // Other optimizer types are refused by name when the config is validated.
        if adam && params.get("bias_correction") == Some(&Value::Bool(false)) {
            return Err(refuse(
                "optimizer.params.bias_correction",
                "Adam without bias correction is not implemented: remove it or set true",
            ));
        }
        params.remove("bias_correction");
        if params.remove("max_grad_norm").is_some() {
            notices.push(
                "optimizer.params.max_grad_norm: ignored; gradient clipping is the top-level gradient_clipping".into(),
            );
        }
    }
    Ok(())
}

/// What an enabled `comms_logger` block does in rsdeep (and that `debug` splits nothing).
fn comms_logger_notice(ds: &Map<String, Value>) -> Option<String> {
    let block = ds.get("comms_logger")?;
    let flag = |key: &str| block.get(key) == Some(&Value::Bool(true));
    if !flag("enabled") {
        return None;
    }
    let mut notice = "comms_logger: every profiled collective is timed from issue to completion; rank 0 prints DeepSpeed's log_summary table at the end of training".to_string();
    if flag("debug") {
        notice.push_str(" (debug: rows are per op, not split by calling function)");
    }
    Some(notice)
}

/// What an enabled `flops_profiler` block does in rsdeep: which step is profiled and
/// where the report goes.
fn flops_profiler_notice(ds: &Map<String, Value>) -> Option<String> {
    let block = ds.get("flops_profiler")?;
    if block.get("enabled") != Some(&Value::Bool(true)) {
        return None;
    }
    let step = block
        .get("profile_step")
        .map_or_else(|| "1".to_string(), Value::to_string);
    let target = match block.get("output_file").and_then(Value::as_str) {
        Some(file) if !file.is_empty() => format!("into {file}"),
        _ => "to stdout".to_string(),
    };
    Some(format!(
        "flops_profiler: rank 0 prints DeepSpeed's model profile (params, MACs and FLOPs per module, counted from the model's shapes; the step's latencies) of training step {step} (counted from 1) {target}"
    ))
}

/// Types `ds`; each key the schema does not know is dropped with a warning (with a
/// did-you-mean) and typing is tried again, or, when `strict`, the first one is an error.
fn drop_unknown_keys(
    ds: &mut Value,
    file: &Path,
    prefix: &str,
    strict: bool,
) -> Result<Notices, ConfigError> {
    let mut warnings = Notices::new();
    let root = prefix.trim_end_matches('.');
    loop {
        match json_errors::typed_from_value::<DeepSpeedConfig>(ds.clone(), file, root) {
            Err(ConfigError::UnknownKey {
                key, suggestion, ..
            }) if !strict => {
                let inner = key.strip_prefix(prefix).unwrap_or(&key).to_string();
                if !remove_dotted(ds, &inner) {
                    return Err(ConfigError::UnknownKey {
                        file: file.to_path_buf(),
                        key,
                        suggestion,
                        note: None,
                    });
                }
                let hint = suggestion
                    .map(|s| format!(" (did you mean \"{s}\"?)"))
                    .unwrap_or_default();
                warnings.push(format!(
                    "{}: unknown DeepSpeed key \"{key}\"{hint} is ignored (DeepSpeed ignores it too; strict_config true makes this an error)",
                    file.display()
                ));
            }
            Err(err) if matches!(err, ConfigError::UnknownKey { .. }) => return Err(err),
            _ => return Ok(warnings),
        }
    }
}

/// Removes `a.b.c` from `root`; false when it is not there.
fn remove_dotted(root: &mut Value, path: &str) -> bool {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(leaf) = parts.pop() else {
        return false;
    };
    let mut node = root;
    for part in parts {
        match node.get_mut(part) {
            Some(next) => node = next,
            None => return false,
        }
    }
    node.as_object_mut()
        .is_some_and(|map| map.remove(leaf).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(mut ds: Value, strict: bool) -> Result<(Value, Notices), ConfigError> {
        let notices = make_loadable(&mut ds, Path::new("ds.json"), "", strict)?;
        Ok((ds, notices))
    }

    #[test]
    fn legacy_spellings_are_read_as_the_current_keys() {
        let (ds, notices) = load(
            json!({"zero_optimization": {"stage": 2, "cpu_offload": true,
                "stage3_gather_16bit_weights_on_model_save": "auto"}}),
            false,
        )
        .unwrap();
        assert_eq!(
            ds["zero_optimization"]["offload_optimizer"]["device"],
            "cpu"
        );
        assert_eq!(
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"],
            false
        );
        assert!(notices[0].contains("cpu_offload"), "{notices:?}");
    }

    #[test]
    fn features_that_change_the_math_are_refused_and_others_noticed_or_silent() {
        let refused = load(json!({"sparse_attention": {"mode": "fixed"}}), false).unwrap_err();
        assert!(
            refused.to_string().contains("sparse attention"),
            "{refused}"
        );
        let tp = load(json!({"tensor_parallel": {"autotp_size": 2}}), false).unwrap_err();
        assert!(tp.to_string().contains("tensor parallelism"), "{tp}");
        let (ds, notices) = load(
            json!({"tensor_parallel": {"autotp_size": 1}, "flops_profiler": {"enabled": true},
                   "comms_logger": {"enabled": false}, "amp": {"enabled": false}}),
            false,
        )
        .unwrap();
        // As in DeepSpeed, the FLOPs profiler turns the wall-clock breakdown on; the
        // profiler and a disabled comms_logger (blocks rsdeep builds) stay, only the
        // enabled one with a notice.
        assert_eq!(
            ds,
            json!({"wall_clock_breakdown": true, "flops_profiler": {"enabled": true},
                   "comms_logger": {"enabled": false}})
        );
        assert_eq!(notices.len(), 2, "{notices:?}");
        let profiler = notices.iter().find(|n| n.starts_with("flops_profiler: "));
        assert!(
            profiler.is_some_and(|n| n.contains("training step 1 ") && n.ends_with("to stdout")),
            "{notices:?}"
        );
        let master = load(
            json!({"fp16": {"fp16_master_weights_and_grads": true}}),
            false,
        );
        assert!(master.is_err());
        let no_bias = json!({"optimizer": {"type": "Adam", "params": {"bias_correction": false}}});
        assert!(load(no_bias, false).is_err());
    }

    #[test]
    fn an_enabled_comms_logger_is_kept_and_announced() {
        let block = json!({"comms_logger": {"enabled": true, "verbose": false, "prof_all": true,
                                            "debug": true}});
        let (ds, notices) = load(block.clone(), true).unwrap();
        assert_eq!(ds, block);
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].starts_with("comms_logger: "), "{notices:?}");
        assert!(notices[0].contains("debug: rows are per op"), "{notices:?}");
    }

    #[test]
    fn unknown_keys_are_warnings_with_did_you_mean_or_errors_when_strict() {
        let typo = json!({"zero_optimization": {"stage": 3, "stage3_param_persitance_threshold": 10},
                          "cuda_visible_devices": 0});
        let (ds, warnings) = load(typo.clone(), false).unwrap();
        assert_eq!(ds, json!({"zero_optimization": {"stage": 3}}));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("did you mean \"stage3_param_persistence_threshold\"")),
            "{warnings:?}"
        );
        let strict = load(typo, true).unwrap_err();
        assert!(matches!(strict, ConfigError::UnknownKey { .. }), "{strict}");
    }
}
