//! Bottleneck adapters in the format of AdapterHub's `adapters` library (1.x), which
//! supports Llama-architecture models: Houlsby's `double_seq_bn` (an adapter after the
//! attention and one after the MLP, SiLU) and Pfeiffer's `seq_bn` (one after the MLP,
//! ReLU). An adapter maps h (B, T, H) to up(act(down(h))) with down (H/f, H) and up
//! (H, H/f), both with bias, f the reduction factor; the library's "bert" init draws
//! both weights from N(0, 0.02) with zero biases. Where it sits in a decoder layer
//! (`model/bottleneck.rs`): with a = attention output and m = MLP output
//! of the residual stream x,
//! - `double_seq_bn`: x1 = x + a + A(a), out = x1 + m + M(m);
//! - `seq_bn`: x1 = x + a, out = x1 + m + M(m + x1).
//!
//! Saved as the library's `adapter_config.json` (its whole `BnConfig`, `model_type`
//! llama, the adapter name) and `adapter.safetensors` with its keys
//! (`model.layers.{i}.attention_adapters.adapters.{name}.adapter_down.0.weight`, ...),
//! which are also the parameter names here. Contract: `lora/mod.rs`; parity with the
//! library in `worker/tests/bottleneck_parity.rs`.

use crate::model::{BottleneckStyle, BottleneckTensors};
use crate::{Error, Result};
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tch::{Kind, Tensor};

/// The weights file `adapters` writes with `use_safetensors=True` and reads.
pub const BOTTLENECK_WEIGHTS: &str = "adapter.safetensors";
/// The adapter name rsdeep trains under (the library keys carry it).
pub const BOTTLENECK_NAME: &str = "bottleneck";
/// `adapters`' version written into the config (the format this follows).
const LIBRARY_VERSION: &str = "adapters.1.3.0";
/// The "bert" init's standard deviation.
const INIT_STD: f64 = 0.02;

/// `double_seq_bn` / `houlsby` or `seq_bn` / `pfeiffer`.
pub fn parse_style(name: &str) -> Result<BottleneckStyle> {
    match name {
        "double_seq_bn" | "houlsby" => Ok(BottleneckStyle::DoubleSeq),
        "seq_bn" | "pfeiffer" => Ok(BottleneckStyle::Seq),
        other => Err(Error::Config(format!(
            "bottleneck adapter {other:?} is not built: use \"double_seq_bn\" (Houlsby) or \
             \"seq_bn\" (Pfeiffer)"
        ))),
    }
}

/// A bottleneck adapter setup for a model of `hidden_size`.
#[derive(Clone, Debug, PartialEq)]
pub struct Bottleneck {
    pub style: BottleneckStyle,
    pub reduction_factor: usize,
    pub hidden_size: usize,
}

impl Bottleneck {
    /// The bottleneck width: H / f (at least 1), as the library computes it.
    pub fn width(&self) -> i64 {
        (self.hidden_size / self.reduction_factor.max(1)).max(1) as i64
    }

    /// Fresh adapter tensors (the "bert" init) in fp32, drawn from `rng`.
    pub fn fresh(&self, rng: &mut StdRng) -> Result<BottleneckTensors> {
        let (hidden, width) = (self.hidden_size as i64, self.width());
        Ok(BottleneckTensors {
            down_weight: normal(rng, &[width, hidden])?,
            down_bias: Tensor::f_zeros([width], (Kind::Float, tch::Device::Cpu))?,
            up_weight: normal(rng, &[hidden, width])?,
            up_bias: Tensor::f_zeros([hidden], (Kind::Float, tch::Device::Cpu))?,
        })
    }

    /// The saved tensors of layer `layer` at `location`, checked against this setup.
    pub fn saved(
        &self,
        saved: &mut std::collections::BTreeMap<String, Tensor>,
        layer: usize,
        location: &str,
    ) -> Result<BottleneckTensors> {
        let (hidden, width) = (self.hidden_size as i64, self.width());
        let mut take = |suffix: &str, shape: &[i64]| -> Result<Tensor> {
            let key = key_of(layer, location, suffix);
            let tensor = saved
                .remove(&key)
                .ok_or_else(|| Error::Model(format!("no tensor {key}")))?;
            if tensor.size() != shape {
                return Err(Error::Model(format!(
                    "{key} is {:?}, this model needs {shape:?}",
                    tensor.size()
                )));
            }
            Ok(tensor.f_to_kind(Kind::Float)?)
        };
        Ok(BottleneckTensors {
            down_weight: take("adapter_down.0.weight", &[width, hidden])?,
            down_bias: take("adapter_down.0.bias", &[width])?,
            up_weight: take("adapter_up.weight", &[hidden, width])?,
            up_bias: take("adapter_up.bias", &[hidden])?,
        })
    }

    /// The library's `adapter_config.json` for a Llama model's adapter.
    pub fn config_json(&self) -> Value {
        let double = self.style == BottleneckStyle::DoubleSeq;
        json!({
            "config": {
                "adapter_residual_before_ln": false,
                "cross_adapter": false,
                "dropout": 0.0,
                "factorized_phm_W": true,
                "factorized_phm_rule": false,
                "hypercomplex_nonlinearity": "glorot-uniform",
                "init_weights": "bert",
                "init_weights_seed": null,
                "inv_adapter": null,
                "inv_adapter_reduction_factor": null,
                "is_parallel": false,
                "learn_phm": true,
                "leave_out": [],
                "ln_after": false,
                "ln_before": false,
                "mh_adapter": double,
                "non_linearity": if double { "swish" } else { "relu" },
                "original_ln_after": true,
                "original_ln_before": !double,
                "output_adapter": true,
                "phm_bias": true,
                "phm_c_init": "normal",
                "phm_dim": 4,
                "phm_init_range": 0.0001,
                "phm_layer": false,
                "phm_rank": 1,
                "reduction_factor": self.reduction_factor,
                "residual_before_ln": true,
                "scaling": 1.0,
                "shared_W_phm": false,
                "shared_phm_rule": true,
                "stochastic_depth": 0.0,
                "use_gating": false
            },
            "hidden_size": self.hidden_size,
            "model_class": "LlamaForCausalLM",
            "model_name": "",
            "model_type": "llama",
            "name": BOTTLENECK_NAME,
            "version": LIBRARY_VERSION
        })
    }

    /// From the library's `adapter_config.json` (`file` names it in errors): one of the
    /// two styles exactly as the library defines them, without the options rsdeep does
    /// not build (layer norms, gating, PHM, scaling, parallel, left-out layers).
    pub fn from_config_json(value: &Value, file: &str) -> Result<Self> {
        let config = &value["config"];
        let style = match (
            config["mh_adapter"].as_bool(),
            config["non_linearity"].as_str(),
        ) {
            (Some(true), Some("swish" | "silu")) => BottleneckStyle::DoubleSeq,
            (Some(false), Some("relu")) => BottleneckStyle::Seq,
            _ => {
                return Err(Error::Config(format!(
                    "{file}: only double_seq_bn (mh_adapter, swish) and seq_bn (relu) bottleneck \
                     adapters are built"
                )));
            }
        };
        let expected = [
            ("ln_before", json!(false)),
            ("ln_after", json!(false)),
            ("use_gating", json!(false)),
            ("phm_layer", json!(false)),
            ("is_parallel", json!(false)),
            ("scaling", json!(1.0)),
            ("output_adapter", json!(true)),
            ("residual_before_ln", json!(true)),
            ("original_ln_after", json!(true)),
            ("original_ln_before", json!(style == BottleneckStyle::Seq)),
            ("adapter_residual_before_ln", json!(false)),
        ];
        for (key, want) in expected {
            let got = &config[key];
            let same = got == &want || (got.as_f64().is_some() && got.as_f64() == want.as_f64());
            if !same {
                return Err(Error::Config(format!(
                    "{file}: config.{key} is {got}; rsdeep builds {want} only"
                )));
            }
        }
        if config["leave_out"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
        {
            return Err(Error::Config(format!(
                "{file}: config.leave_out is not built (every layer carries adapters)"
            )));
        }
        let whole = |v: &Value| v.as_u64().map(|n| n as usize);
        let reduction_factor = whole(&config["reduction_factor"]).ok_or_else(|| {
            Error::Config(format!(
                "{file}: config.reduction_factor must be a whole number (got {})",
                config["reduction_factor"]
            ))
        })?;
        let hidden_size = whole(&value["hidden_size"])
            .ok_or_else(|| Error::Config(format!("{file}: hidden_size is missing")))?;
        Ok(Bottleneck {
            style,
            reduction_factor,
            hidden_size,
        })
    }
}

/// The library's key of one tensor: `model.layers.{i}.{location}.adapters.{name}.{suffix}`.
pub fn key_of(layer: usize, location: &str, suffix: &str) -> String {
    format!("model.layers.{layer}.{location}.adapters.{BOTTLENECK_NAME}.{suffix}")
}

/// A saved key under rsdeep's adapter name: `model.layers.{i}.{location}.adapters.{any
/// name}.{suffix}` -> the same key with `BOTTLENECK_NAME`; None for any other key.
pub fn canonical_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (location, rest) = rest.split_once(".adapters.")?;
    let (_, suffix) = rest.split_once('.')?;
    let known_location = ["attention_adapters", "output_adapters"].contains(&location);
    let known_suffix = [
        "adapter_down.0.weight",
        "adapter_down.0.bias",
        "adapter_up.weight",
        "adapter_up.bias",
    ]
    .contains(&suffix);
    (known_location && known_suffix).then(|| key_of(layer, location, suffix))
}

/// Whether a parameter name is a bottleneck adapter's.
pub fn is_bottleneck_name(name: &str) -> bool {
    name.contains(".attention_adapters.adapters.") || name.contains(".output_adapters.adapters.")
}

/// Whether `adapter_config.json` contents are the `adapters` library's (not PEFT's).
pub fn is_library_config(value: &Value) -> bool {
    value["config"].is_object()
        && value["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("adapters."))
}

/// N(0, INIT_STD) values of `shape` in fp32 (Box-Muller).
fn normal(rng: &mut StdRng, shape: &[i64]) -> Result<Tensor> {
    use rand::Rng;
    let count: i64 = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (z * INIT_STD) as f32
        })
        .collect();
    Ok(Tensor::from_slice(&values).f_reshape(shape)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_config_reads_back_and_foreign_options_are_refused() {
        for style in [BottleneckStyle::DoubleSeq, BottleneckStyle::Seq] {
            let setup = Bottleneck {
                style,
                reduction_factor: 16,
                hidden_size: 64,
            };
            let value = setup.config_json();
            assert!(is_library_config(&value));
            assert_eq!(Bottleneck::from_config_json(&value, "f").unwrap(), setup);
            assert_eq!(setup.width(), 4);
        }
        let mut gated = Bottleneck {
            style: BottleneckStyle::DoubleSeq,
            reduction_factor: 16,
            hidden_size: 64,
        }
        .config_json();
        gated["config"]["use_gating"] = json!(true);
        let err = Bottleneck::from_config_json(&gated, "a/adapter_config.json").unwrap_err();
        assert!(
            err.to_string()
                .contains("a/adapter_config.json: config.use_gating"),
            "{err}"
        );
        assert!(parse_style("parallel").is_err());
        assert_eq!(
            canonical_key("model.layers.3.output_adapters.adapters.mine.adapter_up.bias")
                .as_deref(),
            Some("model.layers.3.output_adapters.adapters.bottleneck.adapter_up.bias")
        );
        assert_eq!(canonical_key("model.layers.3.mlp.up_proj.weight"), None);
    }
}
