//! LoRA parity with Python `peft` (the reference): `fixtures/lora_generate_reference.py`
//! builds a random tiny Qwen2 base with transformers and a peft adapter on it (lora_A
//! and lora_B perturbed so the adapter is not the identity). rsdeep must reproduce the
//! adapted logits after `load_adapter` (1e-4), peft must reproduce rsdeep's logits after
//! loading an adapter written by `save_adapter`, and `merge_lora_cli`'s plain model must
//! give the unmerged adapter's logits. The same for a DoRA adapter with rsLoRA scaling and
//! a trained `lm_head` (`modules_to_save`), whose loss and every trained tensor's
//! gradient must also equal peft's; and QLoRA: a peft adapter trained on a base loaded
//! through bitsandbytes in 4 bits (NF4) gives peft's logits, loss and gradients on
//! rsdeep's 4-bit base, and rsdeep's adapter on an FP4 base gives
//! rsdeep's logits in peft on bitsandbytes' FP4 base; prefix tuning: peft's prefix gives
//! peft's logits, loss and gradient in rsdeep, rsdeep's loads in peft, and greedy
//! decoding through the KV cache equals decoding without it. Needs `RSDEEP_PYTHON` with torch, transformers and
//! peft (set by `scripts/env.sh`); without it these tests fail, they never skip.

use rsdeep_worker::lora::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraConfig, PrefixTuning, apply_lora, load_adapter,
    lora_state, merge_lora_cli, save_adapter, trainable_parameters_line,
};
use rsdeep_worker::model::{CausalLm, ForwardCtx, KvCache, causal_lm_loss};
use rsdeep_worker::quant::{QuantConfig, QuantType};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const LOGITS_ATOL: f64 = 1e-4;
const VOCAB: i64 = 96;

/// Runs the reference script on `jobs`; panics with its output on failure.
fn run_jobs(jobs: &Value, work: &Path, tag: &str) {
    let spec = work.join(format!("{tag}.json"));
    std::fs::write(&spec, serde_json::to_string(jobs).unwrap()).unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_generate_reference.py");
    let python = crate::support::python();
    let output = Command::new(&python)
        .arg(&script)
        .arg(&spec)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", python.display()));
    assert!(
        output.status.success(),
        "reference script failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn input_ids() -> Vec<Vec<i64>> {
    (0..2)
        .map(|row| (0..12).map(|t| (row * 37 + t * 11 + 3) % VOCAB).collect())
        .collect()
}

fn ids_tensor() -> Tensor {
    let flat: Vec<i64> = input_ids().concat();
    Tensor::from_slice(&flat).reshape([2, 12])
}

/// The base model and a peft-made adapter with its logits, built once.
struct Reference {
    dir: tempfile::TempDir,
}

impl Reference {
    fn base(&self) -> PathBuf {
        self.dir.path().join("base")
    }
    fn peft_adapter(&self) -> PathBuf {
        self.dir.path().join("peft_adapter")
    }
    fn peft_dora_adapter(&self) -> PathBuf {
        self.dir.path().join("peft_dora_adapter")
    }
    fn peft_prefix_adapter(&self) -> PathBuf {
        self.dir.path().join("peft_prefix_adapter")
    }
    fn peft_qlora_adapter(&self) -> PathBuf {
        self.dir.path().join("peft_qlora_adapter")
    }
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({
            "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": false,
            "initializer_range": 0.1, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
        });
        let jobs = json!([
            {"op": "make_model", "config": config, "seed": 1, "perturb": 0.05,
             "out_dir": dir.path().join("base")},
            {"op": "make_peft_adapter", "base_dir": dir.path().join("base"), "r": 4,
             "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
             "seed": 2, "perturb": 0.1, "input_ids": input_ids(),
             "out_dir": dir.path().join("peft_adapter")},
            {"op": "make_peft_adapter", "base_dir": dir.path().join("base"), "r": 4,
             "alpha": 8, "target_modules": "all-linear", "use_dora": true,
             "use_rslora": true, "modules_to_save": ["lm_head"],
             "seed": 3, "perturb": 0.1, "input_ids": input_ids(),
             "out_dir": dir.path().join("peft_dora_adapter")},
            {"op": "make_peft_adapter", "base_dir": dir.path().join("base"), "r": 4,
             "alpha": 8, "target_modules": "all-linear",
             "load_in_4bit": {"quant_type": "nf4", "double_quant": false},
             "seed": 4, "perturb": 0.1, "input_ids": input_ids(),
             "out_dir": dir.path().join("peft_qlora_adapter")},
            {"op": "make_peft_adapter", "base_dir": dir.path().join("base"),
             "num_virtual_tokens": 3, "seed": 5, "perturb": 0.1, "input_ids": input_ids(),
             "out_dir": dir.path().join("peft_prefix_adapter")},
        ]);
        run_jobs(&jobs, dir.path(), "reference");
        Reference { dir }
    })
}

fn load_base(dir: &Path) -> CausalLm {
    CausalLm::from_pretrained(dir, Device::Cpu, Kind::Float).unwrap()
}

fn logits(model: &CausalLm) -> Tensor {
    let ids = ids_tensor();
    tch::no_grad(|| {
        model
            .forward(&ids, &ForwardCtx::causal(&ids).unwrap())
            .unwrap()
    })
}

fn read_logits(path: &Path) -> Tensor {
    read_named(path, "logits")
}

fn read_named(path: &Path, key: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == key)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("{} has no {key}", path.display()))
}

fn dora_config(modules_to_save: &[&str]) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: true,
        use_dora: true,
        modules_to_save: modules_to_save.iter().map(|m| m.to_string()).collect(),
        prefix_tuning: None,
        bottleneck: None,
    }
}

/// Every parameter of `model` by name, detached (what `saved_tensors` and `lora_state` read).
fn named_tensors(model: &CausalLm) -> Vec<(String, Tensor)> {
    model
        .params()
        .map(|p| (p.name.clone(), p.tensor.detach()))
        .collect()
}

/// Adds N(0, 0.1) noise (torch seed `seed`) to the parameters named in `adapter_names`, so
/// a fresh adapter is no longer the identity.
fn perturb_adapter(model: &CausalLm, adapter_names: &[String], seed: i64) {
    tch::manual_seed(seed);
    for p in model.params().filter(|p| adapter_names.contains(&p.name)) {
        let mut t = p.tensor.shallow_clone();
        tch::no_grad(|| t.copy_(&(&t + Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1)));
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn peft_created_adapter_loads_in_rsdeep() {
    let reference = reference();
    let expected = read_logits(&reference.peft_adapter().join("reference.safetensors"));
    let base = load_base(&reference.base());
    let plain = logits(&base);
    assert!(
        max_abs_diff(&plain, &expected) > 1e-2,
        "the peft adapter must change the logits for this test to mean anything"
    );
    let mut model = load_base(&reference.base());
    let info = load_adapter(&mut model, &reference.peft_adapter()).unwrap();
    assert_eq!(
        info.adapter_names.len(),
        2 * 5 * 2,
        "2 layers x 5 modules x (A, B)"
    );
    let err = max_abs_diff(&logits(&model), &expected);
    assert!(
        err < LOGITS_ATOL,
        "rsdeep with the peft adapter differs by {err}"
    );
}

#[test]
fn rsdeep_adapter_loads_in_peft() {
    let reference = reference();
    let mut model = load_base(&reference.base());
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        prefix_tuning: None,
        bottleneck: None,
    };
    let info = apply_lora(&mut model, &cfg, 42).unwrap();
    tch::manual_seed(3);
    for p in model.params().filter(|p| p.name.contains("lora_B")) {
        let mut t = p.tensor.shallow_clone();
        tch::no_grad(|| t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1)));
    }
    for layer in model.decoder_layers_mut() {
        layer.set_lora_training(false);
    }
    let ours = logits(&model);
    let named = named_tensors(&model);
    let state = lora_state(&named);
    assert_eq!(state.len(), info.adapter_names.len());
    let adapter_dir = reference.dir.path().join("rsdeep_adapter");
    save_adapter(&adapter_dir, &cfg, "base", &state).unwrap();
    assert!(
        adapter_dir.join(ADAPTER_CONFIG).is_file() && adapter_dir.join(ADAPTER_WEIGHTS).is_file()
    );
    let out = reference.dir.path().join("peft_on_rsdeep.safetensors");
    let jobs = json!([{"op": "peft_logits", "base_dir": reference.base(),
        "adapter_dir": adapter_dir, "input_ids": input_ids(), "out_path": out}]);
    run_jobs(&jobs, reference.dir.path(), "peft_logits");
    let err = max_abs_diff(&read_logits(&out), &ours);
    assert!(
        err < LOGITS_ATOL,
        "peft with rsdeep's adapter differs by {err}"
    );
}

#[test]
fn merged_model_matches_unmerged_adapter() {
    let reference = reference();
    let expected = read_logits(&reference.peft_adapter().join("reference.safetensors"));
    let out = reference.dir.path().join("merged");
    let args: Vec<String> = [
        "--base".into(),
        reference.base().display().to_string(),
        "--adapter".into(),
        reference.peft_adapter().display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ]
    .to_vec();
    merge_lora_cli(&args).unwrap();
    let merged = load_base(&out);
    assert!(merged.params().all(|p| !p.name.contains("lora")));
    let err = max_abs_diff(&logits(&merged), &expected);
    assert!(
        err < LOGITS_ATOL,
        "merged model differs from the adapter by {err}"
    );
}

#[test]
fn lora_training_reaches_only_adapters() {
    let reference = reference();
    let mut model = load_base(&reference.base());
    let base_total = model.num_parameters();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        use_rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        prefix_tuning: None,
        bottleneck: None,
    };
    let info = apply_lora(&mut model, &cfg, 1).unwrap();
    // q: A (4, 64) + B (64, 4); v: A (4, 64) + B (32, 4); two layers.
    assert_eq!(info.trainable, 2 * (256 + 256 + 256 + 128));
    assert_eq!(info.total, base_total + info.trainable);
    assert_eq!(
        info.summary,
        trainable_parameters_line(info.trainable, info.total)
    );
    assert!(
        info.summary
            .starts_with("trainable params: 1,792 || all params: ")
    );
    let ids = ids_tensor();
    let out = model
        .forward(&ids, &ForwardCtx::causal(&ids).unwrap())
        .unwrap();
    causal_lm_loss(&out, &ids).unwrap().backward();
    for p in model.params() {
        let adapter = p.name.contains(".lora_");
        assert_eq!(info.frozen.contains(&p.name), !adapter, "{}", p.name);
        assert_eq!(p.tensor.requires_grad(), adapter, "{}", p.name);
        assert_eq!(p.tensor.grad().defined(), adapter, "{}", p.name);
    }
    let grad_a = model
        .params()
        .find(|p| p.name == "model.layers.0.self_attn.q_proj.lora_B.weight")
        .unwrap()
        .tensor
        .grad();
    assert!(
        grad_a.abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "B gets a gradient at init"
    );
}

#[test]
fn peft_dora_adapter_with_a_saved_head_gives_peft_logits_loss_and_gradients() {
    let reference = reference();
    let expected = reference.peft_dora_adapter().join("reference.safetensors");
    let mut model = load_base(&reference.base());
    let info = load_adapter(&mut model, &reference.peft_dora_adapter()).unwrap();
    assert_eq!(
        info.adapter_names.len(),
        2 * 7 * 3 + 1,
        "2 layers x 7 linears x (A, B, magnitude) + lm_head"
    );
    let err = max_abs_diff(&logits(&model), &read_logits(&expected));
    assert!(
        err < LOGITS_ATOL,
        "rsdeep with peft's DoRA adapter differs by {err}"
    );

    backward_with_peft_loss(&model, &expected);
    let trained = model
        .params()
        .filter(|p| info.adapter_names.contains(&p.name))
        .count();
    assert_eq!(trained, info.adapter_names.len());
    assert_gradients_match(&model, &info.adapter_names, &expected);
    for p in model
        .params()
        .filter(|p| !info.adapter_names.contains(&p.name))
    {
        assert!(
            !p.tensor.grad().defined(),
            "{} is frozen but got a gradient",
            p.name
        );
    }
}

#[test]
fn rsdeep_dora_adapter_with_a_saved_head_loads_in_peft() {
    let reference = reference();
    let mut model = load_base(&reference.base());
    let cfg = dora_config(&["lm_head"]);
    let info = apply_lora(&mut model, &cfg, 5).unwrap();
    let unchanged = logits(&load_base(&reference.base()));
    let err = max_abs_diff(&logits(&model), &unchanged);
    assert!(
        err < 1e-5,
        "a fresh DoRA adapter must not change the logits ({err})"
    );
    perturb_adapter(&model, &info.adapter_names, 4);
    let ours = logits(&model);
    let named = named_tensors(&model);
    let saved = info.saved_tensors(&named).unwrap();
    assert_eq!(saved.len(), 2 * 7 * 3 + 1);
    assert!(
        saved
            .iter()
            .any(|(k, _)| k == "base_model.model.lm_head.weight")
    );
    assert!(
        saved
            .iter()
            .any(|(k, _)| k.ends_with("q_proj.lora_magnitude_vector"))
    );
    let adapter_dir = reference.dir.path().join("rsdeep_dora_adapter");
    save_adapter(&adapter_dir, &cfg, "base", &saved).unwrap();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir.join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(written["use_dora"], json!(true));
    assert_eq!(written["use_rslora"], json!(true));
    assert_eq!(written["modules_to_save"], json!(["lm_head"]));
    let out = reference.dir.path().join("peft_on_rsdeep_dora.safetensors");
    let jobs = json!([{"op": "peft_logits", "base_dir": reference.base(),
        "adapter_dir": adapter_dir, "input_ids": input_ids(), "out_path": out}]);
    run_jobs(&jobs, reference.dir.path(), "peft_dora_logits");
    let err = max_abs_diff(&read_logits(&out), &ours);
    assert!(
        err < LOGITS_ATOL,
        "peft with rsdeep's DoRA adapter differs by {err}"
    );
}

#[test]
fn merged_dora_model_matches_unmerged_adapter() {
    let reference = reference();
    let expected = read_logits(&reference.peft_dora_adapter().join("reference.safetensors"));
    let out = reference.dir.path().join("merged_dora");
    let args: Vec<String> = vec![
        "--base".into(),
        reference.base().display().to_string(),
        "--adapter".into(),
        reference.peft_dora_adapter().display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    merge_lora_cli(&args).unwrap();
    let merged = load_base(&out);
    assert!(merged.params().all(|p| !p.name.contains("lora")));
    let err = max_abs_diff(&logits(&merged), &expected);
    assert!(
        err < LOGITS_ATOL,
        "merged DoRA model differs from the adapter by {err}"
    );
}

#[test]
fn a_save_target_that_matches_nothing_is_refused_by_name() {
    let reference = reference();
    let mut model = load_base(&reference.base());
    let err = apply_lora(&mut model, &dora_config(&["lm_hed"]), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("modules_to_save entry \"lm_hed\""), "{err}");
}

/// Runs the training loss (labels = inputs) backward and checks it equals peft's.
fn backward_with_peft_loss(model: &CausalLm, expected: &Path) {
    let ids = ids_tensor();
    let out = model
        .forward(&ids, &ForwardCtx::causal(&ids).unwrap())
        .unwrap();
    let loss = causal_lm_loss(&out, &ids).unwrap();
    loss.backward();
    let loss_err = (loss.double_value(&[]) - read_named(expected, "loss").double_value(&[0])).abs();
    assert!(loss_err < 1e-5, "loss differs from peft's by {loss_err}");
}

/// Checks every trained tensor's gradient (after `loss.backward()`) against peft's.
fn assert_gradients_match(model: &CausalLm, trained: &[String], expected: &Path) {
    for p in model.params().filter(|p| trained.contains(&p.name)) {
        let key = format!("grad:base_model.model.{}", p.name);
        let theirs = read_named(expected, &key);
        let scale = theirs.abs().max().double_value(&[]).max(1e-3);
        let err = max_abs_diff(&p.tensor.grad(), &theirs) / scale;
        assert!(
            err < 1e-4,
            "{}: gradient differs from peft's by {err} (relative)",
            p.name
        );
    }
}

#[test]
fn peft_qlora_adapter_gives_peft_logits_loss_and_gradients_on_the_4bit_base() {
    let reference = reference();
    let expected = reference.peft_qlora_adapter().join("reference.safetensors");
    let mut model = load_base(&reference.base());
    let unquantized = logits(&model);
    model
        .quantize_linears(QuantConfig {
            quant_type: QuantType::Nf4,
            double_quant: false,
        })
        .unwrap();
    let info = load_adapter(&mut model, &reference.peft_qlora_adapter()).unwrap();
    assert_eq!(info.adapter_names.len(), 2 * 7 * 2);
    let ours = logits(&model);
    let err = max_abs_diff(&ours, &read_logits(&expected));
    assert!(
        err < LOGITS_ATOL,
        "rsdeep on its 4-bit base differs from peft + bitsandbytes by {err}"
    );
    assert!(
        max_abs_diff(&ours, &unquantized) > 1e-2,
        "the 4-bit base must change the logits for this test to mean anything"
    );
    backward_with_peft_loss(&model, &expected);
    assert_gradients_match(&model, &info.adapter_names, &expected);
}

#[test]
fn rsdeep_adapter_on_an_fp4_base_loads_in_peft_on_bitsandbytes_fp4() {
    let reference = reference();
    let mut model = load_base(&reference.base());
    let quant = QuantConfig {
        quant_type: QuantType::Fp4,
        double_quant: false,
    };
    model.quantize_linears(quant).unwrap();
    let cfg = dora_config(&[]);
    let info = apply_lora(&mut model, &cfg, 6).unwrap();
    assert_eq!(
        info.total,
        load_base(&reference.base()).num_parameters() + info.trainable,
        "a 4-bit weight counts as its full shape"
    );
    perturb_adapter(&model, &info.adapter_names, 5);
    let ours = logits(&model);
    let named = named_tensors(&model);
    let adapter_dir = reference.dir.path().join("rsdeep_qdora_adapter");
    save_adapter(
        &adapter_dir,
        &cfg,
        "base",
        &info.saved_tensors(&named).unwrap(),
    )
    .unwrap();
    let out = reference
        .dir
        .path()
        .join("peft_on_rsdeep_qdora.safetensors");
    let jobs = json!([{"op": "peft_logits", "base_dir": reference.base(),
        "adapter_dir": adapter_dir, "input_ids": input_ids(), "out_path": out,
        "load_in_4bit": {"quant_type": "fp4", "double_quant": false}}]);
    run_jobs(&jobs, reference.dir.path(), "peft_qdora_logits");
    let err = max_abs_diff(&read_logits(&out), &ours);
    assert!(
        err < LOGITS_ATOL,
        "peft on bitsandbytes' FP4 base with rsdeep's DoRA adapter differs by {err}"
    );
}

#[test]
fn qlora_merge_writes_the_dequantized_base_plus_adapter() {
    let reference = reference();
    let expected = read_logits(&reference.peft_qlora_adapter().join("reference.safetensors"));
    let out = reference.dir.path().join("merged_qlora");
    let args: Vec<String> = [
        "--base",
        &reference.base().display().to_string(),
        "--adapter",
        &reference.peft_qlora_adapter().display().to_string(),
        "--out",
        &out.display().to_string(),
        "--base_4bit",
        "nf4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    merge_lora_cli(&args).unwrap();
    let merged = load_base(&out);
    assert!(
        merged
            .params()
            .all(|p| !p.name.contains("lora") && !p.name.contains("absmax"))
    );
    let err = max_abs_diff(&logits(&merged), &expected);
    assert!(
        err < LOGITS_ATOL,
        "merged QLoRA model differs from peft on the 4-bit base by {err}"
    );
}

fn prefix_config(model: &CausalLm, tokens: usize) -> LoraConfig {
    LoraConfig {
        prefix_tuning: Some(PrefixTuning {
            num_virtual_tokens: tokens,
            num_layers: model.config.num_hidden_layers,
            num_kv_heads: model.config.num_kv_heads(),
            head_dim: model.config.head_dim(),
        }),
        ..dora_config(&[])
    }
}

#[test]
fn peft_prefix_adapter_gives_peft_logits_loss_and_gradient() {
    let reference = reference();
    let expected = reference
        .peft_prefix_adapter()
        .join("reference.safetensors");
    let mut model = load_base(&reference.base());
    let info = load_adapter(&mut model, &reference.peft_prefix_adapter()).unwrap();
    assert_eq!(info.adapter_names.len(), 2, "one prefix per layer");
    let err = max_abs_diff(&logits(&model), &read_logits(&expected));
    assert!(
        err < LOGITS_ATOL,
        "rsdeep with peft's prefix differs by {err}"
    );
    backward_with_peft_loss(&model, &expected);
    // peft trains one (N, layers * 2 KV D) embedding: the layers' gradients side by side.
    let grads: Vec<Tensor> = model
        .params()
        .filter(|p| info.adapter_names.contains(&p.name))
        .map(|p| p.tensor.grad())
        .collect();
    let ours = Tensor::cat(&grads, 1);
    let theirs = read_named(&expected, "grad:prompt_encoder.embedding.weight");
    let err = max_abs_diff(&ours, &theirs) / theirs.abs().max().double_value(&[]);
    assert!(
        err < 1e-4,
        "prefix gradient differs from peft's by {err} (relative)"
    );
}

#[test]
fn rsdeep_prefix_adapter_loads_in_peft_and_decodes_the_same_with_the_cache() {
    let reference = reference();
    let mut model = load_base(&reference.base());
    let cfg = prefix_config(&model, 4);
    let info = apply_lora(&mut model, &cfg, 8).unwrap();
    let ours = logits(&model);
    assert!(
        max_abs_diff(&ours, &logits(&load_base(&reference.base()))) > 1e-2,
        "the prefix must change the logits for this test to mean anything"
    );
    let named = named_tensors(&model);
    let saved = info.saved_tensors(&named).unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].0, "prompt_embeddings");
    assert_eq!(saved[0].1.size(), [4, 2 * 2 * 2 * 16]);
    let adapter_dir = reference.dir.path().join("rsdeep_prefix_adapter");
    save_adapter(&adapter_dir, &cfg, "base", &saved).unwrap();
    let out = reference
        .dir
        .path()
        .join("peft_on_rsdeep_prefix.safetensors");
    let jobs = json!([{"op": "peft_logits", "base_dir": reference.base(),
        "adapter_dir": adapter_dir, "input_ids": input_ids(), "out_path": out}]);
    run_jobs(&jobs, reference.dir.path(), "peft_prefix_logits");
    let err = max_abs_diff(&read_logits(&out), &ours);
    assert!(
        err < LOGITS_ATOL,
        "peft with rsdeep's prefix differs by {err}"
    );

    // The last position's logits, decoded one token at a time through the cache (seeded
    // with the prefix), equal the full forward's.
    let ids = ids_tensor().narrow(0, 0, 1); // (1, 12)
    let full = tch::no_grad(|| {
        model
            .forward(&ids, &ForwardCtx::causal(&ids).unwrap())
            .unwrap()
    });
    let mut cache = KvCache::new(&model);
    let mut last = Tensor::new();
    for t in 0..12 {
        let token = ids.narrow(1, t, 1);
        last = tch::no_grad(|| model.forward_cached(&token, &mut cache).unwrap());
    }
    let err = max_abs_diff(&last.select(1, 0), &full.select(1, 11));
    assert!(
        err < LOGITS_ATOL,
        "cached decoding with the prefix differs by {err}"
    );
}

#[test]
fn a_prefix_adapter_is_not_merged() {
    let reference = reference();
    let args: Vec<String> = [
        "--base",
        &reference.base().display().to_string(),
        "--adapter",
        &reference.peft_prefix_adapter().display().to_string(),
        "--out",
        &reference
            .dir
            .path()
            .join("merged_prefix")
            .display()
            .to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let err = merge_lora_cli(&args).unwrap_err().to_string();
    assert!(err.contains("no weights to merge"), "{err}");
}
