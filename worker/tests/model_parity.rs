//! Parity of rsdeep's Qwen2 / Qwen3 / Llama / Mistral (`rsdeep_worker::model`) with Python
//! transformers, the reference. `fixtures/make_hf_model.py` builds random tiny models with
//! transformers,
//! saves them with `save_pretrained` and records logits, loss and every gradient for one
//! batch; rsdeep loads those folders and must match (logits 1e-4 absolute in fp32, loss
//! and gradients 1e-3 relative). `fixtures/load_rsdeep_model.py` then loads folders saved
//! by rsdeep (single-file and sharded) with `AutoModelForCausalLM.from_pretrained` and must
//! reproduce rsdeep's logits. Needs `RSDEEP_PYTHON` (set by `scripts/env.sh`) with torch
//! and transformers; without it these tests fail, they never skip.

use rsdeep_worker::model::{CausalLm, ForwardCtx, causal_lm_loss};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const BATCH: usize = 2;
const SEQ: usize = 16;
const LOGITS_ATOL: f64 = 1e-4;
const RELATIVE_TOL: f64 = 1e-3;

/// One model shape plus one batch, shared by the Python reference and rsdeep.
struct Case {
    name: &'static str,
    config: Value,
    input_ids: Vec<Vec<i64>>,
    labels: Vec<Vec<i64>>,
    /// (B, T) 1 = real token, for HF's `attention_mask` and rsdeep's padding mask.
    attention_mask: Option<Vec<Vec<i64>>>,
    /// Packed-sequence segment ids for rsdeep; HF gets the equivalent restarting
    /// `position_ids` (it infers packing from them).
    segments: Option<Vec<Vec<i64>>>,
    /// transformers' `max_shard_size` for the reference folder, to exercise index loading.
    hf_shard_size: Option<&'static str>,
    /// `max_shard_bytes` when rsdeep saves the model back.
    rsdeep_shard_bytes: u64,
}

fn tiny_config(model_type: &str, vocab: i64, kv_heads: i64, tied: bool) -> Value {
    json!({
        "model_type": model_type, "vocab_size": vocab, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": kv_heads, "tie_word_embeddings": tied,
        "initializer_range": 0.1, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
    })
}

fn with(mut config: Value, extra: Value) -> Value {
    let (Some(map), Value::Object(extra)) = (config.as_object_mut(), extra) else {
        panic!("configs are JSON objects");
    };
    map.extend(extra);
    config
}

/// Deterministic token ids in 1..vocab (0 is kept free for padding).
fn token_ids(seed: u64, vocab: i64) -> Vec<Vec<i64>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..BATCH)
        .map(|_| {
            (0..SEQ)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    1 + ((state >> 33) as i64 % (vocab - 1))
                })
                .collect()
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let plain = |name, config: Value, seed, hf_shard_size, rsdeep_shard_bytes| {
        let vocab = config["vocab_size"].as_i64().unwrap_or(128);
        let ids = token_ids(seed, vocab);
        let mut labels = ids.clone();
        labels[1][5] = -100;
        Case {
            name,
            config,
            input_ids: ids,
            labels,
            attention_mask: None,
            segments: None,
            hf_shard_size,
            rsdeep_shard_bytes,
        }
    };
    let llama3 = json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "attention_bias": true});
    let linear =
        json!({"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500000.0});
    let mut all = vec![
        plain(
            "qwen2_gqa_untied",
            tiny_config("qwen2", 256, 2, false),
            1,
            Some("40KB"),
            1 << 30,
        ),
        plain(
            "qwen2_mha_tied",
            tiny_config("qwen2", 128, 4, true),
            2,
            None,
            48 * 1024,
        ),
        plain(
            "llama_gqa_llama3",
            with(tiny_config("llama", 200, 1, false), llama3),
            3,
            None,
            64 * 1024,
        ),
        plain(
            "llama_mha_linear_tied",
            with(tiny_config("llama", 160, 4, true), linear),
            4,
            None,
            1 << 30,
        ),
        // A window exactly as long as the batch's sequences: sliding-window attention is
        // then causal attention, to the last position.
        plain(
            "mistral_gqa_window",
            with(
                tiny_config("mistral", 144, 2, false),
                json!({"sliding_window": SEQ, "rope_theta": 1000000.0}),
            ),
            8,
            None,
            1 << 30,
        ),
        // Heads wider than hidden / heads (as Qwen3-0.6B's 16 x 128 over 1024), with the
        // per-head query/key norms and o_proj bias of `attention_bias`.
        plain(
            "qwen3_gqa_wide_heads",
            with(
                tiny_config("qwen3", 192, 2, false),
                json!({"head_dim": 32, "attention_bias": true}),
            ),
            7,
            None,
            1 << 30,
        ),
    ];

    // Left padding in row 0, right padding in row 1; pad id 0 (its embedding row gets no
    // gradient in HF, nor in rsdeep).
    let mut padded = plain(
        "qwen2_gqa_padding",
        with(
            tiny_config("qwen2", 128, 2, false),
            json!({"pad_token_id": 0}),
        ),
        5,
        None,
        1 << 30,
    );
    let mask: Vec<Vec<i64>> = vec![
        (0..SEQ).map(|t| (t >= 4) as i64).collect(),
        (0..SEQ).map(|t| (t < 11) as i64).collect(),
    ];
    for (row, mask_row) in mask.iter().enumerate() {
        for (t, &keep) in mask_row.iter().enumerate() {
            if keep == 0 {
                padded.input_ids[row][t] = 0;
                padded.labels[row][t] = -100;
            } else {
                padded.labels[row][t] = padded.input_ids[row][t];
            }
        }
    }
    padded.attention_mask = Some(mask);
    all.push(padded);

    let mut packed = plain(
        "llama_gqa_packed",
        tiny_config("llama", 128, 2, false),
        6,
        None,
        1 << 30,
    );
    packed.segments = Some(vec![
        (0..SEQ as i64)
            .map(|t| (t >= 5) as i64 + (t >= 12) as i64)
            .collect(),
        (0..SEQ as i64).map(|t| (t >= 9) as i64).collect(),
    ]);
    all.push(packed);
    all
}

/// HF position ids equivalent to `segments`: restart at 0 at every segment change.
fn packed_positions(segments: &[Vec<i64>]) -> Vec<Vec<i64>> {
    segments
        .iter()
        .map(|row| {
            let mut start = 0;
            (0..row.len())
                .map(|t| {
                    if t > 0 && row[t] != row[t - 1] {
                        start = t;
                    }
                    (t - start) as i64
                })
                .collect()
        })
        .collect()
}

fn python() -> String {
    match std::env::var("RSDEEP_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!(
            "RSDEEP_PYTHON is not set: these parity tests need the reference Python \
             (torch + transformers). Run `source scripts/env.sh` first."
        ),
    }
}

fn fixture(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script)
}

/// Runs a fixture script on a JSON list of specs; panics with its output on failure.
fn run_script(script: &str, specs: &Value, work: &Path) {
    let spec_path = work.join(format!("{script}.json"));
    std::fs::write(&spec_path, serde_json::to_string(specs).unwrap()).unwrap();
    let python = python();
    let output = Command::new(&python)
        .arg(fixture(script))
        .arg(&spec_path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} ({e}); is RSDEEP_PYTHON a python with transformers?")
        });
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn batch_spec(case: &Case) -> Value {
    json!({
        "input_ids": case.input_ids,
        "labels": case.labels,
        "attention_mask": case.attention_mask,
        "position_ids": case.segments.as_deref().map(packed_positions),
    })
}

/// The reference folders and tensors, built once for all tests in one Python run.
struct Reference {
    dir: tempfile::TempDir,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let specs: Vec<Value> = cases()
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let mut spec = batch_spec(case);
                let extra = json!({
                    "config": case.config, "seed": i, "perturb": 0.05,
                    "max_shard_size": case.hf_shard_size,
                    "out_dir": dir.path().join(case.name),
                });
                spec.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                spec
            })
            .collect();
        run_script("make_hf_model.py", &Value::Array(specs), dir.path());
        Reference { dir }
    })
}

fn case_named(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).unwrap()
}

fn to_tensor(rows: &[Vec<i64>]) -> Tensor {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).reshape([rows.len() as i64, rows[0].len() as i64])
}

fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Logits with padded query positions zeroed (HF and rsdeep may differ only there).
fn real_positions(logits: &Tensor, case: &Case) -> Tensor {
    match &case.attention_mask {
        Some(mask) => logits * to_tensor(mask).to_kind(Kind::Float).unsqueeze(-1),
        None => logits.shallow_clone(),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let scale = expected.abs().max().double_value(&[]).max(1e-12);
    max_abs_diff(actual, expected) / scale
}

fn rsdeep_ctx(case: &Case, ids: &Tensor) -> ForwardCtx {
    let mask = case.attention_mask.as_deref().map(to_tensor);
    let segments = case.segments.as_deref().map(to_tensor);
    ForwardCtx::build(ids, mask.as_ref(), segments.as_ref()).unwrap()
}

/// Loads the HF-saved case into rsdeep and checks logits, loss and every gradient.
fn check_against_transformers(name: &str) {
    let case = case_named(name);
    let dir = reference().dir.path().join(name);
    let expected = read_tensors(&dir.join("reference.safetensors"));
    let model = CausalLm::from_pretrained(&dir.join("hf_model"), Device::Cpu, Kind::Float).unwrap();

    let ids = to_tensor(&case.input_ids);
    let logits = model.forward(&ids, &rsdeep_ctx(&case, &ids)).unwrap();
    let logit_err = max_abs_diff(
        &real_positions(&logits, &case),
        &real_positions(&expected["logits"], &case),
    );
    assert!(
        logit_err < LOGITS_ATOL,
        "{name}: logits differ by {logit_err:e}"
    );

    let loss = causal_lm_loss(&logits, &to_tensor(&case.labels)).unwrap();
    let loss_err = relative_error(&loss, &expected["loss"]);
    assert!(
        loss_err < RELATIVE_TOL,
        "{name}: loss {loss:?} vs {:?}",
        expected["loss"]
    );
    loss.backward();

    let hf_names: BTreeSet<String> = expected
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .map(String::from)
        .collect();
    let ours: BTreeSet<String> = model.params().map(|p| p.name.clone()).collect();
    assert_eq!(
        ours, hf_names,
        "{name}: parameter names differ from transformers"
    );
    let mut worst_grad = 0f64;
    for param in model.params() {
        let err = relative_error(
            &param.tensor.grad(),
            &expected[&format!("grad.{}", param.name)],
        );
        worst_grad = worst_grad.max(err);
        assert!(
            err < RELATIVE_TOL,
            "{name}: gradient of {} off by {err:e} (relative)",
            param.name
        );
    }
    eprintln!(
        "{name}: max |logits diff| {logit_err:.2e}, loss rel {loss_err:.2e}, worst grad rel {worst_grad:.2e}"
    );
}

#[test]
fn qwen2_gqa_untied_matches_transformers() {
    check_against_transformers("qwen2_gqa_untied");
}

#[test]
fn qwen2_mha_tied_matches_transformers() {
    check_against_transformers("qwen2_mha_tied");
}

#[test]
fn llama_gqa_llama3_rope_matches_transformers() {
    check_against_transformers("llama_gqa_llama3");
}

#[test]
fn llama_linear_rope_tied_matches_transformers() {
    check_against_transformers("llama_mha_linear_tied");
}

#[test]
fn mistral_within_its_window_matches_transformers() {
    check_against_transformers("mistral_gqa_window");
}

/// A sequence longer than Mistral's window is refused, naming the key, instead of being
/// attended to causally (which would differ from transformers).
#[test]
fn mistral_beyond_its_window_is_refused() {
    use rsdeep_worker::model::{ModelConfig, ModelType};
    let mut config = ModelConfig::new(ModelType::Mistral, 64, 32, 48, 1, 4, 2);
    config.extra.insert("sliding_window".into(), json!(8));
    let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 5).unwrap();
    let ids = Tensor::arange(9, (Kind::Int64, Device::Cpu)).reshape([1, 9]);
    let ctx = ForwardCtx::causal(&ids).unwrap();
    let err = model
        .forward(&ids, &ctx)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`sliding_window`") && err.contains("9 positions"),
        "{err}"
    );
    let within = ids.narrow(1, 0, 8);
    let ctx = ForwardCtx::causal(&within).unwrap();
    assert!(model.forward(&within, &ctx).is_ok());
}

#[test]
fn qwen3_gqa_wide_heads_matches_transformers() {
    check_against_transformers("qwen3_gqa_wide_heads");
}

#[test]
fn left_and_right_padding_match_transformers() {
    check_against_transformers("qwen2_gqa_padding");
}

#[test]
fn packed_sequences_match_transformers() {
    check_against_transformers("llama_gqa_packed");
}

/// Every case: rsdeep loads the HF folder, saves it (sharded where the case says so) and
/// transformers loads that folder strictly and reproduces rsdeep's logits and loss.
#[test]
fn rsdeep_saved_models_load_in_transformers() {
    let work = tempfile::tempdir().unwrap();
    let mut specs = Vec::new();
    let mut ours = Vec::new();
    for case in cases() {
        let source = reference().dir.path().join(case.name).join("hf_model");
        let model = CausalLm::from_pretrained(&source, Device::Cpu, Kind::Float).unwrap();
        let saved = work.path().join(case.name);
        model
            .save_pretrained(&saved, case.rsdeep_shard_bytes, Kind::Float)
            .unwrap();
        let sharded = saved.join("model.safetensors.index.json").is_file();
        assert_eq!(
            sharded,
            case.rsdeep_shard_bytes < 1 << 20,
            "{}: sharding",
            case.name
        );

        let ids = to_tensor(&case.input_ids);
        let logits = tch::no_grad(|| model.forward(&ids, &rsdeep_ctx(&case, &ids))).unwrap();
        let loss = causal_lm_loss(&logits, &to_tensor(&case.labels)).unwrap();
        let mut spec = batch_spec(&case);
        let out_file = work
            .path()
            .join(format!("{}.logits.safetensors", case.name));
        let extra = json!({"model_dir": saved, "out_file": out_file});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        specs.push(spec);
        ours.push((case, logits, loss, out_file));
    }
    run_script("load_rsdeep_model.py", &Value::Array(specs), work.path());
    for (case, logits, loss, out_file) in ours {
        let theirs = read_tensors(&out_file);
        let err = max_abs_diff(
            &real_positions(&logits, &case),
            &real_positions(&theirs["logits"], &case),
        );
        assert!(
            err < LOGITS_ATOL,
            "{}: transformers' logits differ by {err:e}",
            case.name
        );
        let loss_err = relative_error(&loss, &theirs["loss"]);
        assert!(
            loss_err < RELATIVE_TOL,
            "{}: loss differs by {loss_err:e}",
            case.name
        );
    }
}

/// bf16 end to end: rsdeep loads the HF fp32 folder as bf16, saves it as bf16 (config
/// declares bfloat16), transformers loads that in bf16 and its logits track rsdeep's.
/// Both run the same libtorch bf16 kernels, so the bound is loose only for op ordering.
#[test]
fn bf16_saved_model_matches_transformers_in_bf16() {
    let case = case_named("qwen2_gqa_untied");
    let work = tempfile::tempdir().unwrap();
    let source = reference().dir.path().join(case.name).join("hf_model");
    let model = CausalLm::from_pretrained(&source, Device::Cpu, Kind::BFloat16).unwrap();
    assert!(model.params().all(|p| p.tensor.kind() == Kind::BFloat16));
    let saved = work.path().join("bf16");
    model
        .save_pretrained(&saved, 1 << 30, Kind::BFloat16)
        .unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    let ids = to_tensor(&case.input_ids);
    let logits = tch::no_grad(|| model.forward(&ids, &rsdeep_ctx(&case, &ids))).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    let out_file = work.path().join("bf16.logits.safetensors");
    let mut spec = batch_spec(&case);
    let extra = json!({"model_dir": saved, "out_file": out_file, "dtype": "bfloat16"});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    run_script(
        "load_rsdeep_model.py",
        &Value::Array(vec![spec]),
        work.path(),
    );
    let theirs = read_tensors(&out_file)["logits"].to_kind(Kind::Float);
    let err = relative_error(&logits.to_kind(Kind::Float), &theirs);
    eprintln!("bf16: max |logits diff| / max |logits| = {err:.2e}");
    assert!(
        err < 1e-2,
        "bf16 logits differ by {err:e} (relative to max)"
    );
}

/// Models initialised by rsdeep from a config alone (legacy `rope_theta` + `rope_scaling`
/// keys, as rsdeep writes them) load strictly in transformers with the same RoPE: logits
/// and loss match rsdeep's.
#[test]
fn from_config_models_load_in_transformers() {
    use rsdeep_worker::model::{ModelConfig, ModelType, RopeScaling};
    let mut llama = ModelConfig::new(ModelType::Llama, 192, 64, 96, 2, 4, 2);
    llama.initializer_range = 0.2;
    llama.rope_theta = Some(50000.0);
    llama.rope_scaling = Some(RopeScaling {
        rope_type: Some("llama3".into()),
        factor: Some(4.0),
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(32),
        ..Default::default()
    });
    let mut qwen = ModelConfig::new(ModelType::Qwen2, 128, 64, 128, 2, 4, 4);
    qwen.tie_word_embeddings = true;
    qwen.initializer_range = 0.2;
    let mut qwen3 = ModelConfig::new(ModelType::Qwen3, 96, 64, 128, 2, 4, 2);
    qwen3.head_dim = Some(24);
    qwen3.initializer_range = 0.2;

    let work = tempfile::tempdir().unwrap();
    let mut specs = Vec::new();
    let mut ours = Vec::new();
    for (i, config) in [llama, qwen, qwen3].into_iter().enumerate() {
        let ids = token_ids(40 + i as u64, config.vocab_size as i64);
        let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 11 + i as u64).unwrap();
        let saved = work.path().join(format!("model{i}"));
        model.save_pretrained(&saved, 1 << 30, Kind::Float).unwrap();
        let ids_tensor = to_tensor(&ids);
        let ctx = ForwardCtx::causal(&ids_tensor).unwrap();
        let logits = tch::no_grad(|| model.forward(&ids_tensor, &ctx)).unwrap();
        let loss = causal_lm_loss(&logits, &ids_tensor).unwrap();
        let out_file = work.path().join(format!("model{i}.logits.safetensors"));
        specs.push(
            json!({"model_dir": saved, "out_file": out_file, "input_ids": ids,
            "labels": ids, "attention_mask": null, "position_ids": null}),
        );
        ours.push((logits, loss, out_file));
    }
    run_script("load_rsdeep_model.py", &Value::Array(specs), work.path());
    for (i, (logits, loss, out_file)) in ours.into_iter().enumerate() {
        let theirs = read_tensors(&out_file);
        let err = max_abs_diff(&logits, &theirs["logits"]);
        assert!(
            err < LOGITS_ATOL,
            "model {i}: transformers' logits differ by {err:e}"
        );
        let loss_err = relative_error(&loss, &theirs["loss"]);
        assert!(
            loss_err < RELATIVE_TOL,
            "model {i}: loss differs by {loss_err:e}"
        );
    }
}
