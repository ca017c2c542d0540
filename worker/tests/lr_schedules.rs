//! Every learning-rate schedule rsdeep builds, against the rates the real transformers
//! (`get_scheduler`, every `lr_scheduler_type` with keyword arguments, with and without
//! warmup) and DeepSpeed (WarmupLR, WarmupDecayLR, WarmupCosineLR) give at every step,
//! past the end included (`tests/fixtures/lr_schedules/`, recorded from the packages).

use std::path::Path;

use rsdeep_contract::config::{LrSchedulerType, resolve_hf_schedule};
use rsdeep_worker::zero::config::{SchedulerConfig, WarmupType};
use rsdeep_worker::zero::scheduler::LrSchedule;
use serde_json::Value;

fn recorded() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lr_schedules/schedules.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    value["cases"].as_array().unwrap().clone()
}

/// rsdeep's schedule for a recorded case.
fn schedule_of(case: &Value) -> LrSchedule {
    let base_lr = case["base_lr"].as_f64().unwrap();
    let number = |v: &Value, key: &str| v[key].as_f64().unwrap();
    let config = match case["source"].as_str().unwrap() {
        "transformers" => {
            let kind: LrSchedulerType = serde_json::from_value(case["name"].clone()).unwrap();
            let kwargs = case["kwargs"].as_object().unwrap();
            SchedulerConfig::Hf {
                schedule: resolve_hf_schedule(kind, kwargs, base_lr).unwrap(),
                warmup_steps: case["warmup_steps"].as_u64().unwrap(),
                total_steps: case["total_steps"].as_u64().unwrap(),
            }
        }
        _ => {
            let p = &case["params"];
            let warmup_type = match p["warmup_type"].as_str() {
                Some("linear") => WarmupType::Linear,
                _ => WarmupType::Log,
            };
            let warmup_num_steps = p["warmup_num_steps"].as_u64().unwrap();
            match case["name"].as_str().unwrap() {
                "WarmupLR" => SchedulerConfig::WarmupLr {
                    warmup_min_lr: number(p, "warmup_min_lr"),
                    warmup_max_lr: number(p, "warmup_max_lr"),
                    warmup_num_steps,
                    warmup_type,
                },
                "WarmupDecayLR" => SchedulerConfig::WarmupDecayLr {
                    warmup_min_lr: number(p, "warmup_min_lr"),
                    warmup_max_lr: number(p, "warmup_max_lr"),
                    warmup_num_steps,
                    total_num_steps: p["total_num_steps"].as_u64().unwrap(),
                    warmup_type,
                },
                "WarmupCosineLR" => SchedulerConfig::WarmupCosineLr {
                    warmup_min_ratio: number(p, "warmup_min_ratio"),
                    cos_min_ratio: number(p, "cos_min_ratio"),
                    warmup_num_steps,
                    total_num_steps: p["total_num_steps"].as_u64().unwrap(),
                    warmup_type,
                },
                other => panic!("unexpected DeepSpeed scheduler {other}"),
            }
        }
    };
    LrSchedule::new(config, base_lr)
}

#[test]
fn every_schedule_gives_the_rate_transformers_and_deepspeed_give_at_every_step() {
    let cases = recorded();
    assert!(cases.len() >= 38, "{} cases", cases.len());
    for case in &cases {
        let schedule = schedule_of(case);
        for (step, expected) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let expected = expected.as_f64().unwrap();
            let got = schedule.lr_for_step(step as u64);
            assert!(
                (got - expected).abs() <= 1e-12 + 1e-9 * expected.abs(),
                "{} {} step {step}: rsdeep {got} vs {expected}\n{case}",
                case["source"],
                case["name"]
            );
        }
    }
}
