//! Bottleneck adapters against AdapterHub's `adapters` library itself (1.3, with its
//! transformers 4.57 from `$RSDEEP_ADAPTERS_PYTHONPATH`, which `scripts/setup.sh`
//! installs; without it these tests fail, they never skip), on a Llama model rsdeep
//! built and saved: for Houlsby's `double_seq_bn` and Pfeiffer's `seq_bn`, an adapter
//! the library made (under another name than rsdeep's) loads in rsdeep with the
//! library's logits, loss and gradient of every adapter weight; an adapter rsdeep made
//! loads in the library with rsdeep's logits. Contract: `lora/bottleneck.rs`.

use crate::support::python;
use rsdeep_worker::lora::{
    BOTTLENECK_WEIGHTS, Bottleneck, LoraConfig, apply_lora, load_adapter, save_adapter,
};
use rsdeep_worker::model::{
    BottleneckStyle, CausalLm, ForwardCtx, ModelConfig, ModelType, causal_lm_loss,
};
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const REDUCTION: usize = 8;
const LOGITS_ATOL: f64 = 1e-4;

/// Two rows of 12 token ids.
fn ids() -> Vec<Vec<i64>> {
    (0..2i64)
        .map(|row| {
            (0..12)
                .map(|t| (row * 37 + t * 11 + 3) % VOCAB as i64)
                .collect()
        })
        .collect()
}

fn ids_tensor() -> Tensor {
    Tensor::from_slice(&ids().concat()).reshape([2, 12])
}

/// A Llama with random weights, saved in HF's layout to `dir`.
fn save_llama(dir: &Path) {
    let mut config = ModelConfig::new(ModelType::Llama, VOCAB, HIDDEN, 128, 2, 4, 2);
    config.initializer_range = 0.1;
    let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 7).unwrap();
    model.save_pretrained(dir, 1 << 30, Kind::Float).unwrap();
}

/// Runs the reference script under the library's folder; panics with its output.
fn run_library(args: &[&str]) {
    let folder = std::env::var(rsdeep_contract::env::ADAPTERS_PYTHONPATH).unwrap_or_else(|_| {
        panic!(
            "{} is not set: `source scripts/env.sh` (scripts/setup.sh installs AdapterHub's \
             adapters there)",
            rsdeep_contract::env::ADAPTERS_PYTHONPATH
        )
    });
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bottleneck_reference.py");
    let output = Command::new(python())
        .arg(&script)
        .args(args)
        .env("PYTHONPATH", &folder)
        .output()
        .expect("run the reference script");
    assert!(
        output.status.success(),
        "bottleneck_reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read_named(path: &Path, key: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == key)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("{} has no {key}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn library_name(style: BottleneckStyle) -> &'static str {
    match style {
        BottleneckStyle::DoubleSeq => "double_seq_bn",
        BottleneckStyle::Seq => "seq_bn",
    }
}

/// The library makes an adapter; rsdeep loads it: equal logits, loss and gradients.
fn library_adapter_gives_library_logits_loss_and_gradients(style: BottleneckStyle) {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = (dir.path().join("base"), dir.path().join("adapter"));
    let expected = dir.path().join("expected.safetensors");
    save_llama(&base);
    let ids_json = serde_json::to_string(&ids()).unwrap();
    run_library(&[
        "make",
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        library_name(style),
        &REDUCTION.to_string(),
        &ids_json,
        expected.to_str().unwrap(),
    ]);
    assert!(
        adapter.join(BOTTLENECK_WEIGHTS).is_file(),
        "the library saved no safetensors"
    );
    let mut model = CausalLm::from_pretrained(&base, Device::Cpu, Kind::Float).unwrap();
    let info = load_adapter(&mut model, &adapter).unwrap();
    let per_layer = match style {
        BottleneckStyle::DoubleSeq => 8,
        BottleneckStyle::Seq => 4,
    };
    assert_eq!(
        info.adapter_names.len(),
        2 * per_layer,
        "{:?}",
        info.adapter_names
    );
    let ids = ids_tensor();
    let logits = model
        .forward(&ids, &ForwardCtx::causal(&ids).unwrap())
        .unwrap();
    let err = max_abs_diff(&logits, &read_named(&expected, "logits"));
    assert!(err < LOGITS_ATOL, "{style:?}: logits differ by {err}");
    let loss = causal_lm_loss(&logits, &ids).unwrap();
    let loss_err =
        (loss.double_value(&[]) - read_named(&expected, "loss").double_value(&[0])).abs();
    assert!(loss_err < 1e-5, "{style:?}: loss differs by {loss_err}");
    loss.backward();
    for p in model
        .params()
        .filter(|p| info.adapter_names.contains(&p.name))
    {
        // The library's key carries its adapter name ("mine"), rsdeep's "bottleneck".
        let key = format!("grad.{}", p.name.replace(".bottleneck.", ".mine."));
        let theirs = read_named(&expected, &key);
        let scale = theirs.abs().max().double_value(&[]).max(1e-3);
        let err = max_abs_diff(&p.tensor.grad(), &theirs) / scale;
        assert!(
            err < 1e-4,
            "{}: gradient differs by {err} (relative)",
            p.name
        );
    }
}

/// rsdeep makes an adapter (moved away from its init); the library loads it: equal logits.
fn rsdeep_adapter_gives_rsdeep_logits_in_the_library(style: BottleneckStyle) {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = (dir.path().join("base"), dir.path().join("adapter"));
    let theirs = dir.path().join("theirs.safetensors");
    save_llama(&base);
    let mut model = CausalLm::from_pretrained(&base, Device::Cpu, Kind::Float).unwrap();
    let cfg = LoraConfig {
        bottleneck: Some(Bottleneck {
            style,
            reduction_factor: REDUCTION,
            hidden_size: HIDDEN,
        }),
        ..LoraConfig::method_only()
    };
    let info = apply_lora(&mut model, &cfg, 11).unwrap();
    tch::no_grad(|| {
        for p in model
            .params()
            .filter(|p| info.adapter_names.contains(&p.name))
        {
            let mut t = p.tensor.shallow_clone();
            let _ = t.f_add_(&(t.randn_like() * 0.1)).unwrap();
        }
    });
    let weights: Vec<(String, Tensor)> = model
        .params()
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect();
    save_adapter(
        &adapter,
        &cfg,
        "base",
        &info.saved_tensors(&weights).unwrap(),
    )
    .unwrap();
    let input = ids_tensor();
    let ours = tch::no_grad(|| {
        model
            .forward(&input, &ForwardCtx::causal(&input).unwrap())
            .unwrap()
    });
    let ids_json = serde_json::to_string(&ids()).unwrap();
    run_library(&[
        "load",
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        &ids_json,
        theirs.to_str().unwrap(),
    ]);
    let err = max_abs_diff(&ours, &read_named(&theirs, "logits"));
    assert!(
        err < LOGITS_ATOL,
        "{style:?}: the library's logits differ by {err}"
    );
    let base_only = CausalLm::from_pretrained(&base, Device::Cpu, Kind::Float).unwrap();
    let plain = tch::no_grad(|| {
        base_only
            .forward(&input, &ForwardCtx::causal(&input).unwrap())
            .unwrap()
    });
    assert!(
        max_abs_diff(&ours, &plain) > 1e-2,
        "the adapter changes nothing"
    );
}

#[test]
fn houlsby_adapter_from_the_library_gives_its_logits_loss_and_gradients() {
    library_adapter_gives_library_logits_loss_and_gradients(BottleneckStyle::DoubleSeq);
}

#[test]
fn pfeiffer_adapter_from_the_library_gives_its_logits_loss_and_gradients() {
    library_adapter_gives_library_logits_loss_and_gradients(BottleneckStyle::Seq);
}

#[test]
fn houlsby_adapter_from_rsdeep_loads_in_the_library_with_the_same_logits() {
    rsdeep_adapter_gives_rsdeep_logits_in_the_library(BottleneckStyle::DoubleSeq);
}

#[test]
fn pfeiffer_adapter_from_rsdeep_loads_in_the_library_with_the_same_logits() {
    rsdeep_adapter_gives_rsdeep_logits_in_the_library(BottleneckStyle::Seq);
}
