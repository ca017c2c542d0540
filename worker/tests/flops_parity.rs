//! Parity of rsdeep's analytic forward counts (`rsdeep_worker::model::flops`, what the
//! `flops_profiler` report of `train/flops_profile.rs` prints) with DeepSpeed 0.19.8's
//! flops profiler. `fixtures/flops_reference.py` runs one forward of tiny transformers
//! models (Qwen2, Llama, Qwen3, Mistral; PEFT LoRA and DoRA) under DeepSpeed's
//! `FlopsProfiler` and reports every module's class and its subtree's parameters, MACs
//! and FLOPs; rsdeep's tree for the same config, adapters (found in the parameters of
//! rsdeep's own model with `apply_lora`) and batch shape must have the same modules with
//! the same classes and equal counts. DeepSpeed patches `F.scaled_dot_product_attention`
//! in this version, so the attention products are compared too: nothing is left out.
//! Needs `RSDEEP_PYTHON` with torch, transformers, peft and deepspeed; without it the
//! test fails, it never skips. A second test checks that a profiled micro-step through
//! the ZeRO engine times every module the report shows a latency for, on the fused /
//! manual path, the generic autograd path and with activation checkpointing.

use crate::support::python;
use rsdeep_worker::comm::Communicator;
use rsdeep_worker::lora::{LoraConfig, apply_lora};
use rsdeep_worker::model::flops::{Adapters, ForwardShape, ModuleNode, model_tree};
use rsdeep_worker::model::{CausalLm, ForwardCtx, ModelConfig, ModelType};
use rsdeep_worker::train::flops_profile::measure_micro_step;
use rsdeep_worker::zero::{EngineConfig, EngineModel, LocalCommunicator, ZeroEngine};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One model, adapters and forward shape, shared by DeepSpeed and rsdeep.
struct Case {
    name: &'static str,
    config: Value,
    /// PEFT `LoraConfig` keywords (r, lora_alpha, lora_dropout, target_modules, use_dora).
    lora: Option<Value>,
    shape: ForwardShape,
    /// Training mode (LoRA dropout on; DoRA then reruns the base product).
    train: bool,
}

fn tiny(model_type: &str, layers: usize, tied: bool, extra: Value) -> Value {
    let mut config = json!({
        "model_type": model_type, "vocab_size": 96, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256,
    });
    if let (Some(map), Value::Object(extra)) = (config.as_object_mut(), extra) {
        map.extend(extra);
    }
    config
}

fn cases() -> Vec<Case> {
    let shape = ForwardShape { batch: 2, seq: 16 };
    let odd = ForwardShape { batch: 3, seq: 7 };
    let plain = |name, config, shape| Case {
        name,
        config,
        lora: None,
        shape,
        train: true,
    };
    vec![
        plain(
            "qwen2 untied GQA",
            tiny("qwen2", 2, false, json!({})),
            shape,
        ),
        plain(
            "llama tied, biases, padding",
            tiny(
                "llama",
                2,
                true,
                json!({"attention_bias": true, "mlp_bias": true, "pad_token_id": 0}),
            ),
            odd,
        ),
        plain(
            "qwen3 head_dim 32",
            tiny("qwen3", 1, true, json!({"head_dim": 32})),
            shape,
        ),
        plain(
            "mistral",
            tiny("mistral", 1, false, json!({"sliding_window": null})),
            odd,
        ),
        Case {
            name: "qwen2 LoRA eval",
            config: tiny("qwen2", 2, true, json!({})),
            lora: Some(json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                              "target_modules": ["q_proj", "v_proj"], "use_dora": false})),
            shape,
            train: false,
        },
        Case {
            name: "llama DoRA training with dropout",
            config: tiny("llama", 1, false, json!({})),
            lora: Some(json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                              "target_modules": ["q_proj", "down_proj"], "use_dora": true})),
            shape: odd,
            train: true,
        },
    ]
}

/// DeepSpeed's answer per case: module name -> (class, params, MACs, FLOPs).
fn deepspeed_counts(cases: &[Case]) -> Vec<BTreeMap<String, (String, i64, i64, i64)>> {
    let specs: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"config": c.config, "batch": c.shape.batch, "seq": c.shape.seq,
                   "train": c.train, "lora": c.lora})
        })
        .collect();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flops_reference.py");
    let mut child = Command::new(python())
        .arg(&script)
        .env("DS_ACCELERATOR", "cpu")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting flops_reference.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::from(specs).to_string().as_bytes())
        .expect("writing the specs");
    let output = child
        .wait_with_output()
        .expect("running flops_reference.py");
    assert!(
        output.status.success(),
        "flops_reference.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<Value> =
        serde_json::from_slice(&output.stdout).expect("flops_reference.py answers JSON");
    answers.iter().map(module_counts).collect()
}

fn module_counts(answer: &Value) -> BTreeMap<String, (String, i64, i64, i64)> {
    let modules = answer["modules"].as_object().expect("modules");
    modules
        .iter()
        .map(|(name, counts)| {
            let count = |i: usize| counts[i].as_i64().expect("an integer count");
            let class = answer["classes"][name]
                .as_str()
                .expect("a class")
                .to_string();
            (name.clone(), (class, count(0), count(1), count(2)))
        })
        .collect()
}

/// rsdeep's model for `case` with its LoRA adapters applied by rsdeep: the adapters as
/// its parameters show them.
fn rsdeep_adapters(case: &Case, config: &ModelConfig) -> Adapters {
    let mut model = CausalLm::from_config(config.clone(), Device::Cpu, Kind::Float, 1)
        .expect("rsdeep builds the model");
    let mut dropout = 0.0;
    if let Some(lora) = &case.lora {
        let targets = lora["target_modules"].as_array().expect("targets");
        dropout = lora["lora_dropout"].as_f64().unwrap_or(0.0);
        let cfg = LoraConfig {
            r: lora["r"].as_u64().expect("r") as usize,
            alpha: lora["lora_alpha"].as_f64().expect("alpha"),
            dropout,
            target_modules: targets
                .iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect(),
            use_rslora: false,
            use_dora: lora["use_dora"].as_bool().unwrap_or(false),
            ..LoraConfig::method_only()
        };
        apply_lora(&mut model, &cfg, 3).expect("rsdeep applies LoRA");
    }
    let params: Vec<(String, Vec<i64>)> = model
        .params()
        .map(|p| (p.name.clone(), p.tensor.size()))
        .collect();
    Adapters::from_params(&params, dropout)
}

/// `node` and its descendants by dotted module path (the root as "").
fn flatten(node: &ModuleNode, path: &str, out: &mut BTreeMap<String, (String, i64, i64, i64)>) {
    let counts = (
        node.class.clone(),
        node.params,
        node.total_macs(),
        node.total_flops(),
    );
    out.insert(path.to_string(), counts);
    for child in &node.children {
        let child_path = match path.is_empty() {
            true => child.key.clone(),
            false => format!("{path}.{}", child.key),
        };
        flatten(child, &child_path, out);
    }
}

#[test]
fn every_modules_params_macs_and_flops_equal_deepspeeds_profiler() {
    let cases = cases();
    let reference = deepspeed_counts(&cases);
    for (case, expected) in cases.iter().zip(&reference) {
        let config = ModelConfig::from_json_str(&case.config.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let adapters = rsdeep_adapters(case, &config);
        let tree = model_tree(&config, &adapters, case.shape, case.train);
        let mut ours = BTreeMap::new();
        flatten(&tree, "", &mut ours);
        let names = |m: &BTreeMap<String, _>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&ours), names(expected), "{}: module names", case.name);
        for (name, counts) in expected {
            assert_eq!(&ours[name], counts, "{}: module {name:?}", case.name);
        }
        assert!(expected[""].2 > 0, "{}: DeepSpeed counted MACs", case.name);
    }
}

/// The module paths the tree shows a latency for (its timed modules).
fn timed_paths(node: &ModuleNode, out: &mut BTreeSet<String>) {
    out.extend(node.timed_as.clone());
    for child in &node.children {
        timed_paths(child, out);
    }
}

/// One micro-step of a 2-layer Qwen2 (tied or not) through a world-1 ZeRO engine, measured
/// as the training loop measures the profiled one: the module times recorded.
fn profiled_micro_step(tied: bool, config: EngineConfig) -> (ModelConfig, BTreeMap<String, f64>) {
    let mut model_config = ModelConfig::new(ModelType::Qwen2, 64, 32, 48, 2, 4, 2);
    model_config.tie_word_embeddings = tied;
    let model = CausalLm::from_config(model_config.clone(), Device::Cpu, Kind::Float, 5)
        .expect("tiny model");
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        blocks: model.blocks,
        frozen: HashSet::new(),
    };
    let comm: Arc<dyn Communicator> = Arc::new(LocalCommunicator::world(1).remove(0));
    let mut engine = ZeroEngine::new(engine_model, comm, config).expect("engine");
    let ids = Tensor::arange(2 * 8, (Kind::Int64, Device::Cpu)).remainder(63) + 1;
    let ids = ids.reshape([2, 8]); // (B, T)
    let ctx = ForwardCtx::causal(&ids).expect("ctx");
    let micro_step = || engine.forward_backward_causal_lm(&ids, &ctx, &ids);
    let (loss, times) = measure_micro_step(Device::Cpu, &ids, micro_step).expect("micro-step");
    assert!(loss.is_finite());
    assert_eq!(times.shape, ForwardShape { batch: 2, seq: 8 });
    let top: f64 = ["model.embed_tokens", "model.norm", "lm_head"]
        .iter()
        .chain(&["model.layers.0", "model.layers.1"])
        .map(|m| times.modules.get(*m).copied().unwrap_or(0.0))
        .sum();
    assert!(times.wall_s > top, "the micro-step contains the forwards");
    (model_config, times.modules)
}

#[test]
fn a_profiled_micro_step_times_every_module_the_report_times() {
    let base = EngineConfig {
        train_micro_batch_size_per_gpu: 2,
        train_batch_size: 2,
        ..EngineConfig::default()
    };
    let variants = [
        ("fused head, manual layers", false, base.clone()),
        (
            "tied head, autograd layers",
            true,
            EngineConfig {
                manual_layers: false,
                ..base.clone()
            },
        ),
        (
            "activation checkpointing",
            false,
            EngineConfig {
                activation_checkpointing: true,
                ..base
            },
        ),
    ];
    for (label, tied, config) in variants {
        let (model_config, times) = profiled_micro_step(tied, config);
        let shape = ForwardShape { batch: 2, seq: 8 };
        let tree = model_tree(&model_config, &Adapters::default(), shape, true);
        let mut expected = BTreeSet::new();
        timed_paths(&tree, &mut expected);
        let recorded: BTreeSet<String> = times.keys().cloned().collect();
        assert_eq!(recorded, expected, "{label}");
        assert!(times.values().all(|s| *s > 0.0), "{label}: {times:?}");
        let parts: f64 = [
            "input_layernorm",
            "self_attn",
            "post_attention_layernorm",
            "mlp",
        ]
        .iter()
        .map(|p| times[&format!("model.layers.0.{p}")])
        .sum();
        assert!(
            parts <= times["model.layers.0"],
            "{label}: a layer's parts run inside it (a recompute keeps the forward's times)"
        );
    }
}
