//! Every learning-rate schedule rsdeep builds, against the rates the real transformers
//! (`get_scheduler`, every `lr_scheduler_type` with keyword arguments, with and without
//! warmup) and DeepSpeed (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
//! give at every step, past the end included (`tests/fixtures/lr_schedules/`, recorded
//! from the packages). OneCycle with `cycle_momentum` (which cycles Adam's beta1) is
//! refused by name instead.

use std::path::Path;

use rsdeep_contract::config::{LrSchedulerType, resolve_hf_schedule};
use rsdeep_worker::zero::config::{OneCycle, SchedulerConfig, WarmupType};
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
            let warmup_num_steps = p["warmup_num_steps"].as_u64().unwrap_or(0);
            let optional = |key: &str| p[key].as_f64();
            match case["name"].as_str().unwrap() {
                "OneCycle" => SchedulerConfig::OneCycle(OneCycle {
                    min_lr: number(p, "cycle_min_lr"),
                    max_lr: number(p, "cycle_max_lr"),
                    first_step_size: number(p, "cycle_first_step_size"),
                    second_step_size: optional("cycle_second_step_size")
                        .unwrap_or(number(p, "cycle_first_step_size")),
                    first_stair_count: p["cycle_first_stair_count"].as_u64().unwrap_or(0),
                    second_stair_count: p["cycle_second_stair_count"]
                        .as_u64()
                        .or(p["cycle_first_stair_count"].as_u64())
                        .unwrap_or(0),
                    decay_step_size: optional("decay_step_size").unwrap_or(0.0),
                    decay_lr_rate: optional("decay_lr_rate").unwrap_or(0.0),
                }),
                "LRRangeTest" => SchedulerConfig::LrRangeTest {
                    min_lr: number(p, "lr_range_test_min_lr"),
                    step_size: p["lr_range_test_step_size"].as_u64().unwrap(),
                    step_rate: number(p, "lr_range_test_step_rate"),
                    staircase: p["lr_range_test_staircase"].as_bool().unwrap(),
                },
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

/// OneCycle cycling Adam's beta1 (DeepSpeed's default).
fn cycles_momentum(case: &Value) -> bool {
    case["name"] == "OneCycle" && case["params"]["cycle_momentum"] != false
}

#[test]
fn every_schedule_gives_the_rate_transformers_and_deepspeed_give_at_every_step() {
    let cases = recorded();
    assert!(cases.len() >= 45, "{} cases", cases.len());
    let names: std::collections::BTreeSet<&str> =
        cases.iter().filter_map(|c| c["name"].as_str()).collect();
    for name in [
        "OneCycle",
        "LRRangeTest",
        "WarmupCosineLR",
        "warmup_stable_decay",
    ] {
        assert!(names.contains(name), "no recorded {name}");
    }
    for case in cases.iter().filter(|c| !cycles_momentum(c)) {
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

#[test]
fn one_cycle_that_cycles_momentum_is_refused_by_name() {
    let case = recorded()
        .into_iter()
        .find(cycles_momentum)
        .expect("a recorded momentum case");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.json");
    let train = serde_json::json!({
        "model_name_or_path": "m", "train_files": ["t.jsonl"], "output_dir": "out",
        "deepspeed": {"train_micro_batch_size_per_gpu": "auto",
            "scheduler": {"type": "OneCycle", "params": case["params"]}},
    });
    std::fs::write(&path, train.to_string()).unwrap();
    let err = rsdeep_contract::config::load(&path, &[], 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scheduler.params.cycle_momentum") && err.contains("false"),
        "{err}"
    );
}
