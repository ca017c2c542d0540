//! LoRA parity with Python `peft` (the reference): `fixtures/lora_generate_reference.py`
//! builds a random tiny Qwen2 base with transformers and a peft adapter on it (lora_A
//! and lora_B perturbed so the adapter is not the identity). rsdeep must reproduce the
//! adapted logits after `load_adapter` (1e-4), peft must reproduce rsdeep's logits after
//! loading an adapter written by `save_adapter`, and `merge_lora_cli`'s plain model must
//! give the unmerged adapter's logits. Needs `RSDEEP_PYTHON` with torch, transformers and
//! peft (set by `scripts/env.sh`); without it these tests fail, they never skip.

use rsdeep_worker::lora::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraConfig, apply_lora, load_adapter, lora_state,
    merge_lora_cli, save_adapter, trainable_parameters_line,
};
use rsdeep_worker::model::{CausalLm, ForwardCtx, causal_lm_loss};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const LOGITS_ATOL: f64 = 1e-4;
const VOCAB: i64 = 96;

fn python() -> String {
    match std::env::var("RSDEEP_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!(
            "RSDEEP_PYTHON is not set: the LoRA parity tests need the reference Python \
             (torch + transformers + peft). Run `source scripts/env.sh` first."
        ),
    }
}

/// Runs the reference script on `jobs`; panics with its output on failure.
fn run_jobs(jobs: &Value, work: &Path, tag: &str) {
    let spec = work.join(format!("{tag}.json"));
    std::fs::write(&spec, serde_json::to_string(jobs).unwrap()).unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_generate_reference.py");
    let python = python();
    let output = Command::new(&python)
        .arg(&script)
        .arg(&spec)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e})"));
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
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == "logits")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("{} has no logits", path.display()))
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
    let named: Vec<(String, Tensor)> = model
        .params()
        .map(|p| (p.name.clone(), p.tensor.detach()))
        .collect();
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
