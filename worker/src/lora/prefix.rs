//! PEFT's prefix tuning (`PrefixTuningConfig` without projection) for decoder-only
//! models: N trained virtual positions of keys and values per decoder layer, attended to
//! before every sequence (`DecoderLayer::attach_prefix`). PEFT saves them as one tensor,
//! `prompt_embeddings` (N, layers * 2 * KV * D), whose row reshapes to
//! (2 * layers, KV, D) with index 2l layer l's keys and 2l + 1 its values: each layer's
//! (N, 2 * KV * D) slice is one contiguous column block, in layer order. Contract:
//! `lora/mod.rs`; parity with peft in `worker/tests/lora_parity.rs`.

use crate::{Error, Result};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tch::{Kind, Tensor};

/// The key PEFT saves prefix tuning's tensor under.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Prefix tuning's settings and the model dimensions its tensor depends on.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PrefixTuning {
    pub num_virtual_tokens: usize,
    /// Decoder layers, KV heads and head dim of the model (0 until known).
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl PrefixTuning {
    /// One layer's columns: 2 * KV * D.
    pub fn layer_width(&self) -> i64 {
        (2 * self.num_kv_heads * self.head_dim) as i64
    }

    /// PEFT's `adapter_config.json` object (GQA models: `token_dim` is KV * D and
    /// `num_attention_heads` the KV heads, as peft records them).
    pub fn config_json(&self, base_model_name_or_path: &str) -> Value {
        let token_dim = self.num_kv_heads * self.head_dim;
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "encoder_hidden_size": token_dim,
            "inference_mode": true,
            "num_attention_heads": self.num_kv_heads,
            "num_layers": self.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": false,
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": token_dim,
        })
    }

    /// From PEFT's `adapter_config.json` fields (`field(key)`); a projection is read as
    /// its saved output, which is all inference needs.
    pub fn from_config_json(field: &dyn Fn(&str) -> Value, file: &str) -> Result<Self> {
        let number = |key: &str| {
            field(key)
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::Config(format!("{file}: {key} is not a whole number")))
        };
        let (token_dim, heads) = (number("token_dim")?, number("num_attention_heads")?);
        if heads == 0 || token_dim % heads != 0 {
            return Err(Error::Config(format!(
                "{file}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}"
            )));
        }
        Ok(PrefixTuning {
            num_virtual_tokens: number("num_virtual_tokens")?,
            num_layers: number("num_layers")?,
            num_kv_heads: heads,
            head_dim: token_dim / heads,
        })
    }

    /// A fresh layer prefix: N(0, 1) values (torch's `nn.Embedding` init), (N, 2 KV D) fp32.
    pub fn fresh_layer(&self, rng: &mut StdRng) -> Result<Tensor> {
        let count = self.num_virtual_tokens * self.layer_width() as usize;
        let values: Vec<f32> = (0..count).map(|_| standard_normal(rng)).collect();
        Ok(Tensor::from_slice(&values)
            .f_reshape([self.num_virtual_tokens as i64, self.layer_width()])?)
    }

    /// Layer `layer`'s slice of a saved `prompt_embeddings` (N, layers * 2 KV D), checked.
    pub fn layer_of(&self, prompt_embeddings: &Tensor, layer: usize) -> Result<Tensor> {
        let expected = [
            self.num_virtual_tokens as i64,
            self.num_layers as i64 * self.layer_width(),
        ];
        if prompt_embeddings.size() != expected {
            return Err(Error::Model(format!(
                "{PROMPT_EMBEDDINGS} is {:?}, this model needs {expected:?}",
                prompt_embeddings.size()
            )));
        }
        let width = self.layer_width();
        Ok(prompt_embeddings
            .f_narrow(1, layer as i64 * width, width)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?)
    }
}

/// The layers' (N, 2 KV D) prefixes, in layer order, as PEFT's one saved tensor.
pub fn join_layers(layers: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::f_cat(layers, 1)?)
}

/// A standard normal draw (Box-Muller) as fp32.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
