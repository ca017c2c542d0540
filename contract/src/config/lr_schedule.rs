//! The Trainer's learning-rate schedule when the DeepSpeed section has none:
//! `lr_scheduler_type` with its `lr_scheduler_kwargs` (transformers 5 `get_scheduler`
//! names, keyword arguments and defaults), typed and checked once at load. The formulas
//! live with the engine's scheduler; this file only says which schedule and its values.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Hugging Face `lr_scheduler_type`, used when the DeepSpeed config has no `scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    #[default]
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    Constant,
    ConstantWithWarmup,
    InverseSqrt,
    CosineWithMinLr,
    WarmupStableDecay,
}

/// The shape of a warmup-stable-decay phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsdShape {
    Linear,
    Cosine,
    OneMinusSqrt,
}

/// A Hugging Face schedule with its keyword arguments resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HfSchedule {
    Linear,
    Cosine {
        num_cycles: f64,
    },
    CosineWithRestarts {
        num_cycles: f64,
    },
    Polynomial {
        lr_end: f64,
        power: f64,
    },
    Constant,
    ConstantWithWarmup,
    InverseSqrt {
        /// `None`: the warmup steps, or 10 000 without warmup.
        timescale: Option<f64>,
    },
    CosineWithMinLr {
        num_cycles: f64,
        min_lr_rate: f64,
    },
    WarmupStableDecay {
        /// `None`: total − warmup − decay.
        num_stable_steps: Option<u64>,
        num_decay_steps: u64,
        warmup_type: WsdShape,
        decay_type: WsdShape,
        min_lr_ratio: f64,
        num_cycles: f64,
    },
}

/// Reads `kwargs` for `kind`; an error names the keyword and what to do.
pub fn resolve_hf_schedule(
    kind: LrSchedulerType,
    kwargs: &Map<String, Value>,
    learning_rate: f64,
) -> Result<HfSchedule, String> {
    let reader = Kwargs { kwargs };
    let schedule = match kind {
        LrSchedulerType::Linear => reader.only(&[], HfSchedule::Linear)?,
        LrSchedulerType::Constant => reader.only(&[], HfSchedule::Constant)?,
        LrSchedulerType::ConstantWithWarmup => reader.only(&[], HfSchedule::ConstantWithWarmup)?,
        LrSchedulerType::Cosine => reader.only(
            &["num_cycles"],
            HfSchedule::Cosine {
                num_cycles: reader.number("num_cycles")?.unwrap_or(0.5),
            },
        )?,
        LrSchedulerType::CosineWithRestarts => reader.only(
            &["num_cycles"],
            HfSchedule::CosineWithRestarts {
                num_cycles: reader.number("num_cycles")?.unwrap_or(1.0),
            },
        )?,
        LrSchedulerType::Polynomial => {
            let lr_end = reader.number("lr_end")?.unwrap_or(1e-7);
            if lr_end > learning_rate {
                return Err(format!(
                    "lr_end ({lr_end}) must not exceed learning_rate ({learning_rate})"
                ));
            }
            reader.only(
                &["lr_end", "power"],
                HfSchedule::Polynomial {
                    lr_end,
                    power: reader.number("power")?.unwrap_or(1.0),
                },
            )?
        }
        LrSchedulerType::InverseSqrt => reader.only(
            &["timescale"],
            HfSchedule::InverseSqrt {
                timescale: reader.number("timescale")?,
            },
        )?,
        LrSchedulerType::CosineWithMinLr => cosine_with_min_lr(&reader, learning_rate)?,
        LrSchedulerType::WarmupStableDecay => warmup_stable_decay(&reader)?,
    };
    Ok(schedule)
}

fn cosine_with_min_lr(reader: &Kwargs, learning_rate: f64) -> Result<HfSchedule, String> {
    let min_lr_rate = match (reader.number("min_lr")?, reader.number("min_lr_rate")?) {
        (Some(_), Some(_)) => return Err("set only one of min_lr and min_lr_rate".into()),
        (Some(min_lr), None) => min_lr / learning_rate,
        (None, Some(rate)) => rate,
        (None, None) => {
            return Err(
                "cosine_with_min_lr needs min_lr or min_lr_rate in lr_scheduler_kwargs".into(),
            );
        }
    };
    reader.only(
        &["num_cycles", "min_lr", "min_lr_rate"],
        HfSchedule::CosineWithMinLr {
            num_cycles: reader.number("num_cycles")?.unwrap_or(0.5),
            min_lr_rate,
        },
    )
}

fn warmup_stable_decay(reader: &Kwargs) -> Result<HfSchedule, String> {
    let num_decay_steps = reader
        .number("num_decay_steps")?
        .ok_or("warmup_stable_decay needs num_decay_steps in lr_scheduler_kwargs".to_string())?;
    let shape = |key: &str, default: WsdShape| -> Result<WsdShape, String> {
        match reader.kwargs.get(key) {
            None => Ok(default),
            Some(Value::String(s)) if s == "linear" => Ok(WsdShape::Linear),
            Some(Value::String(s)) if s == "cosine" => Ok(WsdShape::Cosine),
            Some(Value::String(s)) if s == "1-sqrt" => Ok(WsdShape::OneMinusSqrt),
            Some(other) => Err(format!(
                "{key} is {other}: use \"linear\", \"cosine\" or \"1-sqrt\""
            )),
        }
    };
    reader.only(
        &[
            "num_decay_steps",
            "num_stable_steps",
            "warmup_type",
            "decay_type",
            "min_lr_ratio",
            "num_cycles",
        ],
        HfSchedule::WarmupStableDecay {
            num_stable_steps: reader.number("num_stable_steps")?.map(|v| v as u64),
            num_decay_steps: num_decay_steps as u64,
            warmup_type: shape("warmup_type", WsdShape::Linear)?,
            decay_type: shape("decay_type", WsdShape::Cosine)?,
            min_lr_ratio: reader.number("min_lr_ratio")?.unwrap_or(0.0),
            num_cycles: reader.number("num_cycles")?.unwrap_or(0.5),
        },
    )
}

struct Kwargs<'a> {
    kwargs: &'a Map<String, Value>,
}

impl Kwargs<'_> {
    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        match self.kwargs.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(format!("{key} is {other}, expected a number")),
        }
    }

    /// `schedule`, unless a keyword outside `known` is given (transformers would raise a
    /// TypeError for it).
    fn only(&self, known: &[&str], schedule: HfSchedule) -> Result<HfSchedule, String> {
        match self.kwargs.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(schedule),
            Some(unknown) if known.is_empty() => Err(format!(
                "\"{unknown}\" is not a keyword of this schedule, which takes none"
            )),
            Some(unknown) => Err(format!(
                "\"{unknown}\" is not a keyword of this schedule (it takes {})",
                known.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kwargs(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn defaults_and_given_keywords_resolve() {
        let resolve = |kind, value| resolve_hf_schedule(kind, &kwargs(value), 1e-3);
        assert_eq!(
            resolve(LrSchedulerType::Cosine, json!({})),
            Ok(HfSchedule::Cosine { num_cycles: 0.5 })
        );
        assert_eq!(
            resolve(LrSchedulerType::CosineWithMinLr, json!({"min_lr": 1e-4})),
            Ok(HfSchedule::CosineWithMinLr {
                num_cycles: 0.5,
                min_lr_rate: 0.1
            })
        );
        let wsd = resolve(
            LrSchedulerType::WarmupStableDecay,
            json!({"num_decay_steps": 5, "decay_type": "1-sqrt"}),
        );
        assert!(matches!(
            wsd,
            Ok(HfSchedule::WarmupStableDecay {
                num_decay_steps: 5,
                decay_type: WsdShape::OneMinusSqrt,
                warmup_type: WsdShape::Linear,
                ..
            })
        ));
    }

    #[test]
    fn missing_and_unknown_keywords_are_named() {
        let resolve = |kind, value| resolve_hf_schedule(kind, &kwargs(value), 1e-3);
        let err = resolve(LrSchedulerType::WarmupStableDecay, json!({})).unwrap_err();
        assert!(err.contains("num_decay_steps"), "{err}");
        let err = resolve(LrSchedulerType::Linear, json!({"num_cycles": 2})).unwrap_err();
        assert!(err.contains("\"num_cycles\""), "{err}");
        let err = resolve(LrSchedulerType::Polynomial, json!({"lr_end": 1.0})).unwrap_err();
        assert!(err.contains("lr_end"), "{err}");
    }
}
