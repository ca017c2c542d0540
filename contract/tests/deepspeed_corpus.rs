//! The published DeepSpeed configs of `tests/fixtures/ds_configs/` against DeepSpeed
//! itself: every file DeepSpeed 0.19.8 (with the Hugging Face Trainer's "auto" filling)
//! accepts loads in rsdeep with a train.json whose values agree, and resolves to the
//! same batch sizes, precision, ZeRO stage, bucket sizes, offload, clipping, optimizer and
//! scheduler. DeepSpeed's answers are `deepspeed_resolved.json`, written by
//! `resolve_with_deepspeed.py` from the same training values (`training_values` there
//! and here must stay identical). The only files DeepSpeed accepts and rsdeep refuses are
//! those whose feature would change the math or the parallel layout (`CHANGES_THE_MATH`).

use std::path::{Path, PathBuf};

use rsdeep_contract::config::{self, Precision, TrainConfig};
use serde_json::{Map, Value, json};

/// Accepted by DeepSpeed, refused by rsdeep on purpose: (file name, words of the reason).
const CHANGES_THE_MATH: [(&str, &str); 6] = [
    (
        "microsoft__DeepSpeedExamples__training__data_efficiency__gpt_finetuning__config__ds_config_gpt_base_random_ltd.json",
        "data efficiency",
    ),
    (
        "hiyouga__LLaMA-Factory__examples__deepspeed__ds_z2_autotp_config.json",
        "tensor parallelism",
    ),
    (
        "OpenGVLab__InternVL__segmentation__zero_configs__adam_zero3_fp16.json",
        "\"ZeroOneAdam\" is not supported",
    ),
    (
        "microsoft__DeepSpeedExamples__training__bing_bert__01_adam__nccl__deepspeed_bsz4k_01adam_config_seq128_nccl.json",
        "\"ZeroOneAdam\" is not supported",
    ),
    (
        "microsoft__DeepSpeedExamples__training__bing_bert__1-bit_adam__nccl__deepspeed_bsz4k_onebitadam_config_seq128_nccl.json",
        "\"OneBitAdam\" is not supported",
    ),
    (
        "microsoft__DeepSpeedExamples__training__bing_bert__1-bit_lamb__nccl__deepspeed_bsz64k_onebitlamb_config_seq128_nccl.json",
        "\"OneBitLamb\" is not supported",
    ),
];

/// The model-dependent "auto"s are filled for this hidden size (as the reference does).
const HIDDEN_SIZE: usize = 64;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ds_configs")
}

fn num(value: Option<&Value>) -> Option<f64> {
    value.filter(|v| v.is_number()).and_then(Value::as_f64)
}

/// The training arguments that agree with `ds`, and the world size (the reference
/// script's `training_values`, line for line).
fn training_values(ds: &Value) -> (Map<String, Value>, usize) {
    let (mbs, gas, tbs) = (
        num(ds.get("train_micro_batch_size_per_gpu")),
        num(ds.get("gradient_accumulation_steps")),
        num(ds.get("train_batch_size")),
    );
    let (mut m, mut g, mut world) = (mbs.unwrap_or(2.0), gas.unwrap_or(1.0), 1.0f64);
    if let Some(tbs) = tbs {
        match (mbs, gas) {
            (Some(_), Some(_)) => world = (tbs / (m * g)).floor().max(1.0),
            (Some(_), None) => g = (tbs / m).floor().max(1.0),
            (None, Some(_)) => m = (tbs / g).floor().max(1.0),
            (None, None) => (m, g) = (tbs.floor(), 1.0),
        }
    }
    let mut values = json!({
        "per_device_train_batch_size": m as u64, "gradient_accumulation_steps": g as u64,
        "learning_rate": 5e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_epsilon": 1e-8, "warmup_steps": 0, "max_steps": 100, "max_grad_norm": 1.0,
    });
    let optimizer = ds.pointer("/optimizer/params");
    let scheduler = ds.pointer("/scheduler/params");
    let copies = [
        (optimizer, "lr", "learning_rate", false),
        (optimizer, "weight_decay", "weight_decay", false),
        (optimizer, "eps", "adam_epsilon", false),
        (scheduler, "warmup_num_steps", "warmup_steps", true),
        (scheduler, "warmup_max_lr", "learning_rate", false),
        (scheduler, "total_num_steps", "max_steps", true),
    ];
    for (section, key, arg, integer) in copies {
        if let Some(v) = num(section.and_then(|s| s.get(key))) {
            values[arg] = if integer { json!(v as i64) } else { json!(v) };
        }
    }
    if let Some([b1, b2]) = optimizer
        .and_then(|o| o.get("betas"))
        .and_then(Value::as_array)
        .and_then(|b| <[Value; 2]>::try_from(b.clone()).ok())
        && let (Some(b1), Some(b2)) = (b1.as_f64(), b2.as_f64())
    {
        (values["adam_beta1"], values["adam_beta2"]) = (json!(b1), json!(b2));
    }
    if let Some(clip) = num(ds.get("gradient_clipping")) {
        values["max_grad_norm"] = json!(clip);
    }
    let enabled = |block: &str| ds.pointer(&format!("/{block}/enabled")) == Some(&json!(true));
    if enabled("fp16") {
        values["fp16"] = json!(true);
    }
    if enabled("bf16") || enabled("bfloat16") {
        values["bf16"] = json!(true);
    }
    let Value::Object(values) = values else {
        unreachable!("built as an object")
    };
    (values, world as usize)
}

/// Loads `name` through a train.json in `dir` holding the agreeing values.
fn load(dir: &Path, name: &str, ds: &Value) -> (Result<TrainConfig, String>, u64) {
    let (mut values, world) = training_values(ds);
    let max_steps = values["max_steps"].as_u64().unwrap_or(100);
    values.extend([
        ("task".into(), json!("pretrain")),
        ("config_name".into(), json!("model.json")),
        ("tokenizer_name".into(), json!("tok")),
        ("train_files".into(), json!(["c.jsonl"])),
        ("output_dir".into(), json!("out")),
        ("deepspeed".into(), json!(corpus().join(name))),
    ]);
    let path = dir.join(format!("{name}.train.json"));
    std::fs::write(&path, Value::Object(values).to_string()).unwrap();
    let loaded = config::load(&path, &[], world).map_err(|e| e.to_string());
    (loaded, max_steps)
}

/// rsdeep's resolved values under the reference's names.
fn resolved(config: &TrainConfig) -> Value {
    let ds = serde_json::to_value(&config.deepspeed).unwrap();
    let zero = &ds["zero_optimization"];
    let device = |key: &str| zero[key]["device"].as_str().unwrap_or("none").to_string();
    let precision = match config.precision() {
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
        Precision::Fp32 => "fp32",
    };
    let batch = &config.batch;
    json!({
        "world_size": batch.world_size, "train_batch_size": batch.train_batch_size,
        "train_micro_batch_size_per_gpu": batch.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "precision": precision, "zero_stage": zero["stage"],
        "reduce_bucket_size": zero["reduce_bucket_size"],
        "allgather_bucket_size": zero["allgather_bucket_size"],
        "stage3_prefetch_bucket_size": zero["stage3_prefetch_bucket_size"],
        "stage3_param_persistence_threshold": zero["stage3_param_persistence_threshold"],
        "stage3_max_live_parameters": zero["stage3_max_live_parameters"],
        "stage3_max_reuse_distance": zero["stage3_max_reuse_distance"],
        "sub_group_size": zero["sub_group_size"], "overlap_comm": zero["overlap_comm"],
        "contiguous_gradients": zero["contiguous_gradients"],
        "offload_optimizer_device": device("offload_optimizer"),
        "offload_param_device": device("offload_param"),
        "gradient_clipping": ds["gradient_clipping"],
        "optimizer_type": ds["optimizer"]["type"], "optimizer_params": ds["optimizer"]["params"],
        "scheduler_type": ds["scheduler"]["type"], "scheduler_params": ds["scheduler"]["params"],
        "wall_clock_breakdown": ds["wall_clock_breakdown"],
    })
}

/// Equal as DeepSpeed means them: numbers by value, names case-insensitively, and only the
/// parameters the reference lists.
fn same(expected: &Value, ours: &Value) -> bool {
    match (expected, ours) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
        }
        (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
        (Value::Object(a), Value::Object(b)) => {
            a.iter().all(|(k, v)| b.get(k).is_some_and(|o| same(v, o)))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        (Value::Null, Value::Null) => true,
        (a, b) => a == b,
    }
}

#[test]
fn every_config_deepspeed_accepts_loads_with_deepspeeds_values() {
    let text = std::fs::read_to_string(corpus().join("deepspeed_resolved.json")).unwrap();
    let reference: Map<String, Value> = serde_json::from_str(&text).unwrap();
    assert!(
        reference.len() >= 90,
        "the corpus reference lists every file"
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut loaded, mut differences) = (0, Vec::new());
    for (name, expected) in &reference {
        let ds: Value =
            serde_json::from_str(&std::fs::read_to_string(corpus().join(name)).unwrap()).unwrap();
        let (result, max_steps) = load(dir.path(), name, &ds);
        let refused_on_purpose = CHANGES_THE_MATH.iter().find(|(file, _)| file == name);
        match (expected["accepted"].as_bool(), result, refused_on_purpose) {
            (Some(true), Err(err), Some((_, why))) => {
                assert!(
                    err.contains(why),
                    "{name} is refused for another reason: {err}"
                );
            }
            (Some(true), Err(err), None) => differences.push(format!("{name}: refused: {err}")),
            (Some(true), Ok(_), Some(_)) => {
                differences.push(format!("{name}: loads, but is listed as changing the math"))
            }
            (Some(true), Ok(mut config), None) => {
                loaded += 1;
                config.fill_model_autos(HIDDEN_SIZE, max_steps).unwrap();
                let ours = resolved(&config);
                for (key, want) in expected.as_object().unwrap() {
                    let Some(have) = ours.get(key) else { continue };
                    let comparable = !(want.is_null() && key.starts_with("optimizer"));
                    if comparable && !same(want, have) {
                        differences.push(format!("{name}: {key}: DeepSpeed {want}, rsdeep {have}"));
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        differences.is_empty(),
        "{} difference(s):\n{}",
        differences.len(),
        differences.join("\n")
    );
    let accepted = reference.values().filter(|v| v["accepted"] == true).count();
    assert_eq!(loaded + CHANGES_THE_MATH.len(), accepted);
}
