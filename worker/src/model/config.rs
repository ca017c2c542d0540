//! `ModelConfig`: a serde mirror of a Hugging Face Qwen2 / Qwen3 / Llama / Mistral
//! `config.json`.
//!
//! It reads both the transformers 4.x layout (`rope_theta` + `rope_scaling`) and the 5.x
//! layout (`rope_parameters`), tolerates and keeps unknown keys (they are written back on
//! save), and writes a `config.json` that `AutoConfig.from_pretrained` loads. The RoPE
//! semantics it resolves to (`RopeSpec`) follow transformers' `modeling_rope_utils`.
//! `validate` rejects what the model cannot run and names the offending key.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;
use tch::Kind;

/// Which Hugging Face architecture a config describes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Qwen2,
    /// Qwen2's layout with an RMSNorm over each head of the queries and keys (`q_norm`,
    /// `k_norm`) and Llama's `attention_bias` rule.
    Qwen3,
    Llama,
    /// Llama's layout without biases; its `sliding_window` equals causal attention on
    /// sequences no longer than the window, the only ones rsdeep runs it on.
    Mistral,
}

impl ModelType {
    /// The `architectures` entry transformers uses for the causal LM.
    pub fn causal_lm_architecture(self) -> &'static str {
        match self {
            ModelType::Qwen2 => "Qwen2ForCausalLM",
            ModelType::Qwen3 => "Qwen3ForCausalLM",
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Mistral => "MistralForCausalLM",
        }
    }
}

/// The `rope_scaling` (4.x) or `rope_parameters` (5.x) object of a config.json.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RopeScaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Older configs spell `rope_type` as `type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    /// Only present in the 5.x `rope_parameters` layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RopeScaling {
    /// `rope_type`, falling back to the legacy `type`, then "default".
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }
}

/// The resolved rotary-embedding recipe (transformers' `ROPE_INIT_FUNCTIONS`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeSpec {
    Default {
        theta: f64,
    },
    Linear {
        theta: f64,
        factor: f64,
    },
    Llama3 {
        theta: f64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_max_position_embeddings() -> usize {
    2048
}

/// A Hugging Face `config.json` for Qwen2 or Llama. Unknown keys land in `extra` and are
/// written back unchanged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// 4.x layout; 5.x keeps it inside `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama and Qwen3: bias on q/k/v/o projections. Qwen2 always has q/k/v bias, no o
    /// bias.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama only: bias on gate/up/down projections.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// transformers 5.x name for `torch_dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn config_error(key: &str, detail: impl std::fmt::Display) -> Error {
    Error::Config(format!("model config.json key `{key}`: {detail}"))
}

impl ModelConfig {
    /// A minimal config of the given architecture; everything else at HF defaults.
    pub fn new(
        model_type: ModelType,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        ModelConfig {
            model_type,
            architectures: Some(vec![model_type.causal_lm_architecture().to_string()]),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            hidden_act: default_hidden_act(),
            max_position_embeddings: default_max_position_embeddings(),
            rms_norm_eps: default_rms_norm_eps(),
            rope_theta: Some(10000.0),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            initializer_range: default_initializer_range(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            torch_dtype: None,
            dtype: None,
            extra: Map::new(),
        }
    }

    /// Parses and validates config.json text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let config: ModelConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("model config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates `path` (a config.json).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::from_json_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Pretty JSON in transformers' style (sorted is not required; keys keep their order).
    pub fn to_json_string(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("serialising model config: {e}")))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type {
            ModelType::Qwen2 => true,
            ModelType::Qwen3 | ModelType::Llama => self.attention_bias,
            ModelType::Mistral => false,
        }
    }

    /// Whether the output projection carries a bias (Llama's and Qwen3's
    /// `attention_bias`).
    pub fn o_bias(&self) -> bool {
        matches!(self.model_type, ModelType::Qwen3 | ModelType::Llama) && self.attention_bias
    }

    /// Whether queries and keys are RMS-normalised per head before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.model_type == ModelType::Qwen3
    }

    /// Mistral's attention window (`sliding_window`, null: none): a query sees the keys
    /// of at most this many positions, its own included.
    pub fn sliding_window(&self) -> Option<usize> {
        match self.model_type {
            ModelType::Mistral => self
                .extra
                .get("sliding_window")
                .and_then(Value::as_u64)
                .map(|w| w as usize),
            _ => None,
        }
    }

    /// Whether gate/up/down projections carry a bias.
    pub fn mlp_has_bias(&self) -> bool {
        self.model_type == ModelType::Llama && self.mlp_bias
    }

    /// The declared parameter dtype (`dtype`, then `torch_dtype`), if any.
    pub fn declared_kind(&self) -> Result<Option<Kind>> {
        let (key, name) = match (&self.dtype, &self.torch_dtype) {
            (Some(name), _) => ("dtype", name),
            (None, Some(name)) => ("torch_dtype", name),
            (None, None) => return Ok(None),
        };
        kind_from_name(name)
            .map(Some)
            .ok_or_else(|| config_error(key, format!("unsupported dtype {name:?}")))
    }

    /// Records `kind` as the checkpoint dtype under both spellings.
    pub fn set_declared_kind(&mut self, kind: Kind) -> Result<()> {
        let name = kind_name(kind)
            .ok_or_else(|| Error::Config(format!("cannot save parameters as {kind:?}")))?;
        self.torch_dtype = Some(name.to_string());
        self.dtype = Some(name.to_string());
        Ok(())
    }

    /// Resolves the rotary embedding recipe from either config layout.
    pub fn rope_spec(&self) -> Result<RopeSpec> {
        let (key, params) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, Some(s)) => ("rope_scaling", Some(s)),
            (None, None) => ("rope_scaling", None),
        };
        let theta = params
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(config_error(
                "rope_theta",
                format!("must be > 0, got {theta}"),
            ));
        }
        let Some(params) = params else {
            return Ok(RopeSpec::Default { theta });
        };
        let need = |value: Option<f64>, field: &str| {
            value.ok_or_else(|| config_error(&format!("{key}.{field}"), "missing"))
        };
        match params.kind() {
            "default" => Ok(RopeSpec::Default { theta }),
            "linear" => Ok(RopeSpec::Linear {
                theta,
                factor: positive(need(params.factor, "factor")?, key, "factor")?,
            }),
            "llama3" => {
                let low = need(params.low_freq_factor, "low_freq_factor")?;
                let high = need(params.high_freq_factor, "high_freq_factor")?;
                if high <= low {
                    return Err(config_error(
                        &format!("{key}.high_freq_factor"),
                        format!("must exceed low_freq_factor ({high} <= {low})"),
                    ));
                }
                let original = params
                    .original_max_position_embeddings
                    .unwrap_or(self.max_position_embeddings);
                Ok(RopeSpec::Llama3 {
                    theta,
                    factor: positive(need(params.factor, "factor")?, key, "factor")?,
                    low_freq_factor: positive(low, key, "low_freq_factor")?,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                })
            }
            other => Err(config_error(
                &format!("{key}.rope_type"),
                format!("unsupported RoPE type {other:?} (supported: default, linear, llama3)"),
            )),
        }
    }

    /// Checks everything the model relies on; errors name the key.
    pub fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(config_error(key, "must be > 0"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(config_error(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads (set head_dim)",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(config_error(
                "head_dim",
                format!("must be even and > 0, got {head_dim}"),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(config_error(
                "num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(config_error(
                "hidden_act",
                format!("only \"silu\" is supported, got {:?}", self.hidden_act),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(config_error("rms_norm_eps", "must be > 0"));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(config_error("initializer_range", "must be >= 0"));
        }
        if let Some(pad) = self.pad_token_id
            && (pad < 0 || pad as usize >= self.vocab_size)
        {
            return Err(config_error(
                "pad_token_id",
                format!("{pad} is outside the vocabulary"),
            ));
        }
        if let Some(window) = self.extra.get("sliding_window")
            && self.model_type == ModelType::Mistral
            && !(window.is_null() || window.as_u64().is_some_and(|w| w > 0))
        {
            return Err(config_error(
                "sliding_window",
                format!("{window} is not a positive number of positions or null"),
            ));
        }
        if self.extra.get("use_sliding_window") == Some(&Value::Bool(true)) {
            return Err(config_error(
                "use_sliding_window",
                "sliding-window attention is not supported",
            ));
        }
        if self
            .extra
            .get("pretraining_tp")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            != 1
        {
            return Err(config_error("pretraining_tp", "only 1 is supported"));
        }
        self.declared_kind()?;
        self.rope_spec()?;
        Ok(())
    }
}

fn positive(value: f64, key: &str, field: &str) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(config_error(
            &format!("{key}.{field}"),
            format!("must be > 0, got {value}"),
        ))
    }
}

/// transformers' dtype name for a tch kind ("float32", "bfloat16", "float16").
pub fn kind_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Float => Some("float32"),
        Kind::BFloat16 => Some("bfloat16"),
        Kind::Half => Some("float16"),
        _ => None,
    }
}

/// The tch kind for a transformers dtype name (with or without a `torch.` prefix).
pub fn kind_from_name(name: &str) -> Option<Kind> {
    match name.trim_start_matches("torch.") {
        "float32" | "float" => Some(Kind::Float),
        "bfloat16" => Some(Kind::BFloat16),
        "float16" | "half" => Some(Kind::Half),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN_LIKE: &str = r#"{
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": null,
        "max_position_embeddings": 32768, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "use_sliding_window": false, "sliding_window": 32768,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu"
    }"#;

    #[test]
    fn parses_a_mistral_config_and_its_window() {
        // The keys of Mistral-7B-v0.1's config.json.
        let text = r#"{
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2
        }"#;
        let config = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(config.model_type, ModelType::Mistral);
        assert_eq!(config.sliding_window(), Some(4096));
        assert!(!config.qkv_bias() && !config.o_bias() && !config.mlp_has_bias());
        let unbounded = text.replace("\"sliding_window\": 4096", "\"sliding_window\": null");
        let config = ModelConfig::from_json_str(&unbounded).unwrap();
        assert_eq!(config.sliding_window(), None);
        let bad = text.replace("\"sliding_window\": 4096", "\"sliding_window\": -3");
        let err = ModelConfig::from_json_str(&bad).unwrap_err().to_string();
        assert!(err.contains("`sliding_window`"), "{err}");
    }

    #[test]
    fn parses_a_qwen3_config_with_wide_heads_and_head_norms() {
        // The keys of Qwen3-0.6B's config.json as transformers 5 writes it.
        let text = r#"{
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "attention_bias": false, "attention_dropout": 0.0,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": null,
            "max_position_embeddings": 40960, "max_window_layers": 28,
            "use_sliding_window": false, "sliding_window": null,
            "layer_types": ["full_attention"], "tie_word_embeddings": true,
            "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645
        }"#;
        let config = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(config.model_type, ModelType::Qwen3);
        assert_eq!((config.head_dim(), config.num_kv_heads()), (128, 8));
        assert!(config.qk_norm());
        assert!(!config.qkv_bias() && !config.o_bias() && !config.mlp_has_bias());
        let biased = ModelConfig {
            attention_bias: true,
            ..config.clone()
        };
        assert!(biased.qkv_bias() && biased.o_bias());
        let again = ModelConfig::from_json_str(&config.to_json_string().unwrap()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn parses_a_qwen2_config_and_keeps_unknown_keys() {
        let config = ModelConfig::from_json_str(QWEN_LIKE).unwrap();
        assert_eq!(config.model_type, ModelType::Qwen2);
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.num_kv_heads(), 2);
        assert!(config.qkv_bias() && !config.o_bias());
        assert_eq!(config.declared_kind().unwrap(), Some(Kind::BFloat16));
        assert_eq!(
            config.rope_spec().unwrap(),
            RopeSpec::Default { theta: 1e6 }
        );
        assert_eq!(
            config.extra.get("sliding_window"),
            Some(&Value::from(32768))
        );
        let again = ModelConfig::from_json_str(&config.to_json_string().unwrap()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = r#"{"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}}"#;
        let config = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(config.num_kv_heads(), 4);
        assert_eq!(
            config.rope_spec().unwrap(),
            RopeSpec::Llama3 {
                theta: 500000.0,
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
    }

    #[test]
    fn reads_legacy_linear_scaling_spelled_type() {
        let mut config = ModelConfig::new(ModelType::Llama, 128, 64, 128, 2, 4, 2);
        config.rope_scaling = Some(RopeScaling {
            legacy_type: Some("linear".into()),
            factor: Some(2.0),
            ..Default::default()
        });
        let parsed = ModelConfig::from_json_str(&config.to_json_string().unwrap()).unwrap();
        assert_eq!(
            parsed.rope_spec().unwrap(),
            RopeSpec::Linear {
                theta: 10000.0,
                factor: 2.0
            }
        );
    }

    fn error_of(edit: impl FnOnce(&mut ModelConfig)) -> String {
        let mut config = ModelConfig::new(ModelType::Llama, 128, 64, 128, 2, 4, 2);
        edit(&mut config);
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn validation_errors_name_the_key() {
        assert!(error_of(|c| c.num_key_value_heads = Some(3)).contains("`num_key_value_heads`"));
        assert!(error_of(|c| c.num_attention_heads = 5).contains("`num_attention_heads`"));
        assert!(error_of(|c| c.hidden_act = "gelu".into()).contains("`hidden_act`"));
        assert!(error_of(|c| c.vocab_size = 0).contains("`vocab_size`"));
        assert!(error_of(|c| c.torch_dtype = Some("int8".into())).contains("`torch_dtype`"));
        assert!(error_of(|c| c.pad_token_id = Some(999)).contains("`pad_token_id`"));
        let llama3_missing = error_of(|c| {
            c.rope_scaling = Some(RopeScaling {
                rope_type: Some("llama3".into()),
                factor: Some(8.0),
                ..Default::default()
            })
        });
        assert!(
            llama3_missing.contains("`rope_scaling.low_freq_factor`"),
            "{llama3_missing}"
        );
        let yarn = error_of(|c| {
            c.rope_scaling = Some(RopeScaling {
                rope_type: Some("yarn".into()),
                ..Default::default()
            })
        });
        assert!(yarn.contains("`rope_scaling.rope_type`"), "{yarn}");
    }

    #[test]
    fn missing_required_key_is_reported() {
        let err = ModelConfig::from_json_str(r#"{"model_type": "qwen2", "vocab_size": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_size"), "{err}");
        let err = ModelConfig::from_json_str(r#"{"model_type": "gpt2"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpt2"), "{err}");
    }
}
