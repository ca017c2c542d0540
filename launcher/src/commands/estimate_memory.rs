//! `rsdeep estimate-memory`: per-GPU memory for ZeRO stages 0-3 from a Hugging Face
//! config.json (Qwen2 / Llama), before anything is launched. Model-state formulas from
//! the ZeRO paper (arXiv:1910.02054), activations from Korthikanti et al. (2022,
//! "Reducing Activation Recomputation in Large Transformer Models").
//!
//! Model states, bytes per parameter Ψ with N data-parallel ranks (mixed precision: 2-byte
//! weights and gradients, fp32 master + Adam m + v = K = 12 bytes):
//!   stage 0 (DDP) 2Ψ + 2Ψ + 12Ψ = 16Ψ;  stage 1  2Ψ + 2Ψ + 12Ψ/N;
//!   stage 2 2Ψ + 2Ψ/N + 12Ψ/N;          stage 3  (2Ψ + 2Ψ + 12Ψ)/N.
//! fp32 training: 4-byte weights and gradients, K = 8 (Adam m + v, no master copy).
//!
//! Activations per GPU (not partitioned by ZeRO), s = seq_len, b = micro batch, h = hidden,
//! a = heads, L = layers, V = vocab, bytes for 16-bit activations (×2 for fp32):
//!   without checkpointing: L · s·b·h·(34 + 5·a·s/h)
//!   with full checkpointing: L · 2·s·b·h (each layer's input) + one layer's s·b·h·(34 + 5·a·s/h)
//!   plus the logits in both cases: s·b·V·(2 + 4) (16-bit logits and their fp32 upcast for
//!   the loss).
//! Not included: the CUDA context (~0.5-1 GiB), allocator fragmentation, communication
//! buckets and ZeRO-3's gathered-parameter working set. Treat the total as a lower bound.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

const GIB: f64 = (1u64 << 30) as f64;

/// Largest accepted config dimension (keeps the exact u64 parameter count from overflowing).
const MAX_DIMENSION: u64 = 1 << 20;

/// Precision of the weights, gradients and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    Fp16,
    Fp32,
}

impl Dtype {
    /// (weight bytes, gradient bytes, optimizer-state bytes K) per parameter.
    fn bytes_per_parameter(self) -> (u64, u64, u64) {
        match self {
            Dtype::Bf16 | Dtype::Fp16 => (2, 2, 12),
            Dtype::Fp32 => (4, 4, 8),
        }
    }

    fn activation_scale(self) -> u64 {
        match self {
            Dtype::Bf16 | Dtype::Fp16 => 1,
            Dtype::Fp32 => 2,
        }
    }
}

/// The command-line arguments of `rsdeep estimate-memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct EstimateArgs {
    /// Hugging Face config.json of the model (or the folder holding it).
    #[arg(long = "model")]
    pub model_config: PathBuf,
    /// GPUs per node.
    #[arg(long = "num_gpus", default_value_t = 1)]
    pub num_gpus: usize,
    #[arg(long = "num_nodes", default_value_t = 1)]
    pub num_nodes: usize,
    /// Micro batch per GPU (train_micro_batch_size_per_gpu).
    #[arg(long = "micro_batch", default_value_t = 1)]
    pub micro_batch: usize,
    /// Sequence length in tokens (block_size).
    #[arg(long = "seq_len", default_value_t = 1024)]
    pub seq_len: usize,
    #[arg(long = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// GPU memory in GiB; configurations above it are flagged "DOES NOT FIT".
    #[arg(long = "gpu_memory")]
    pub gpu_memory: Option<f64>,
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    pub dtype: Dtype,
}

/// The architecture numbers the estimate needs, read from a Qwen2/Qwen3/Llama/Mistral
/// config.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub model_type: String,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama and Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama and Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// Biases in the MLP (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorms of queries and keys (Qwen3).
    pub qk_norm: bool,
}

impl ModelShape {
    /// Reads config.json (a file, or a folder containing one).
    pub fn from_config_path(path: &Path) -> anyhow::Result<ModelShape> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read model config {}", file.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", file.display()))?;
        ModelShape::from_config_value(&value)
            .with_context(|| format!("model config {}", file.display()))
    }

    /// Reads the shape from a parsed config.json.
    pub fn from_config_value(config: &Value) -> anyhow::Result<ModelShape> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !matches!(model_type.as_str(), "qwen2" | "qwen3" | "llama" | "mistral") {
            anyhow::bail!(
                "model_type \"{model_type}\" is not supported: rsdeep implements \"qwen2\", \"qwen3\", \"llama\" and \"mistral\""
            );
        }
        let (is_qwen2, is_llama, is_qwen3, is_mistral) = (
            model_type == "qwen2",
            model_type == "llama",
            model_type == "qwen3",
            model_type == "mistral",
        );
        let number = |key: &str| -> anyhow::Result<u64> {
            config
                .get(key)
                .and_then(Value::as_u64)
                .filter(|n| (1..=MAX_DIMENSION).contains(n))
                .with_context(|| {
                    format!("\"{key}\" must be an integer between 1 and {MAX_DIMENSION}")
                })
        };
        let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
        let hidden_size = number("hidden_size")?;
        let num_heads = number("num_attention_heads")?;
        let num_kv_heads = match config.get("num_key_value_heads") {
            Some(Value::Null) | None => num_heads,
            Some(_) => number("num_key_value_heads")?,
        };
        let head_dim = match config.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_heads,
            Some(_) => number("head_dim")?,
        };
        Ok(ModelShape {
            model_type,
            hidden_size,
            intermediate_size: number("intermediate_size")?,
            num_layers: number("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: number("vocab_size")?,
            tie_word_embeddings: flag("tie_word_embeddings"),
            qkv_bias: is_qwen2 || (!is_mistral && flag("attention_bias")),
            o_bias: !is_qwen2 && !is_mistral && flag("attention_bias"),
            mlp_bias: is_llama && flag("mlp_bias"),
            qk_norm: is_qwen3,
        })
    }

    /// Parameters of one decoder layer: attention (GQA), MLP, two RMSNorms (four with
    /// Qwen3's per-head query/key norms).
    pub fn layer_parameters(&self) -> u64 {
        let h = self.hidden_size;
        let q_out = self.num_heads * self.head_dim;
        let kv_out = self.num_kv_heads * self.head_dim;
        let qkv = h * (q_out + 2 * kv_out) + if self.qkv_bias { q_out + 2 * kv_out } else { 0 };
        let o = q_out * h + if self.o_bias { h } else { 0 };
        let i = self.intermediate_size;
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let head_norms = if self.qk_norm { 2 * self.head_dim } else { 0 };
        qkv + o + mlp + 2 * h + head_norms
    }

    /// All parameters: embeddings, layers, final norm, and the LM head when untied.
    pub fn parameter_count(&self) -> u64 {
        let embedding = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        embedding + self.num_layers * self.layer_parameters() + self.hidden_size + head
    }

    /// Activation bytes of one layer without checkpointing, 16-bit (Korthikanti et al.):
    /// s·b·h·(34 + 5·a·s/h) = 34·sbh + 5·a·s²·b (in f64: user sizes may be huge).
    fn layer_activation_bytes(&self, micro_batch: f64, seq_len: f64) -> f64 {
        let sbh = seq_len * micro_batch * self.hidden_size as f64;
        34.0 * sbh + 5.0 * self.num_heads as f64 * seq_len * seq_len * micro_batch
    }
}

/// One ZeRO stage's per-GPU bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StageEstimate {
    pub stage: u8,
    pub parameter_bytes: f64,
    pub gradient_bytes: f64,
    pub optimizer_bytes: f64,
    pub activation_bytes: f64,
}

impl StageEstimate {
    pub fn model_state_bytes(&self) -> f64 {
        self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes
    }

    pub fn total_bytes(&self) -> f64 {
        self.model_state_bytes() + self.activation_bytes
    }
}

/// The estimate for all four stages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub parameters: u64,
    pub data_parallel_ranks: u64,
    pub activation_bytes: f64,
    pub stages: [StageEstimate; 4],
}

/// Pure computation: per-GPU bytes for stages 0-3 (see the module comment for formulas).
pub fn estimate(
    shape: &ModelShape,
    data_parallel_ranks: usize,
    micro_batch: usize,
    seq_len: usize,
    gradient_checkpointing: bool,
    dtype: Dtype,
) -> MemoryEstimate {
    let psi = shape.parameter_count() as f64;
    let n = data_parallel_ranks.max(1) as f64;
    let (weight, grad, optim) = dtype.bytes_per_parameter();
    let (weight, grad, optim) = (weight as f64 * psi, grad as f64 * psi, optim as f64 * psi);
    let activation_bytes = activation_bytes(
        shape,
        micro_batch as u64,
        seq_len as u64,
        gradient_checkpointing,
        dtype,
    );
    let stage = |stage: u8, p_split: bool, g_split: bool, o_split: bool| StageEstimate {
        stage,
        parameter_bytes: if p_split { weight / n } else { weight },
        gradient_bytes: if g_split { grad / n } else { grad },
        optimizer_bytes: if o_split { optim / n } else { optim },
        activation_bytes,
    };
    MemoryEstimate {
        parameters: shape.parameter_count(),
        data_parallel_ranks: n as u64,
        activation_bytes,
        stages: [
            stage(0, false, false, false),
            stage(1, false, false, true),
            stage(2, false, true, true),
            stage(3, true, true, true),
        ],
    }
}

/// Per-GPU activation bytes (module comment: Korthikanti et al. + logits).
pub fn activation_bytes(
    shape: &ModelShape,
    micro_batch: u64,
    seq_len: u64,
    gradient_checkpointing: bool,
    dtype: Dtype,
) -> f64 {
    let (b, t) = (micro_batch as f64, seq_len as f64);
    let one_layer = shape.layer_activation_bytes(b, t);
    let layers = shape.num_layers as f64;
    let layer_bytes = if gradient_checkpointing {
        layers * 2.0 * t * b * shape.hidden_size as f64 + one_layer
    } else {
        layers * one_layer
    };
    let logits = t * b * shape.vocab_size as f64 * (2.0 + 4.0);
    layer_bytes * dtype.activation_scale() as f64 + logits
}

/// `rsdeep estimate-memory ...`: the table to print.
pub fn estimate_memory_cli(args: EstimateArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        args.num_gpus >= 1 && args.num_nodes >= 1,
        "--num_gpus and --num_nodes must be at least 1"
    );
    anyhow::ensure!(
        args.micro_batch >= 1 && args.seq_len >= 1,
        "--micro_batch and --seq_len must be at least 1"
    );
    if let Some(limit) = args.gpu_memory {
        anyhow::ensure!(
            limit > 0.0 && limit.is_finite(),
            "--gpu_memory must be a positive number of GiB"
        );
    }
    let shape = ModelShape::from_config_path(&args.model_config)?;
    let ranks = args.num_gpus * args.num_nodes;
    let result = estimate(
        &shape,
        ranks,
        args.micro_batch,
        args.seq_len,
        args.gradient_checkpointing,
        args.dtype,
    );
    Ok(render_table(&args, &shape, &result))
}

fn render_table(args: &EstimateArgs, shape: &ModelShape, result: &MemoryEstimate) -> String {
    let mut out = format!(
        "model {} ({}): {} parameters ({:.3} B), hidden {}, {} layers, vocab {}{}\n",
        shape.model_type,
        args.model_config.display(),
        result.parameters,
        result.parameters as f64 / 1e9,
        shape.hidden_size,
        shape.num_layers,
        shape.vocab_size,
        if shape.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        },
    );
    out.push_str(&format!(
        "{} data-parallel ranks ({} GPUs x {} nodes); micro batch {}, seq len {}, gradient checkpointing {}, {:?}\n",
        result.data_parallel_ranks,
        args.num_gpus,
        args.num_nodes,
        args.micro_batch,
        args.seq_len,
        if args.gradient_checkpointing { "on" } else { "off" },
        args.dtype,
    ));
    out.push_str(
        "per-GPU GiB:\nstage   params    grads  optimizer  model states  activations     total\n",
    );
    for stage in &result.stages {
        let verdict = fit_verdict(stage.total_bytes(), args.gpu_memory);
        out.push_str(&format!(
            "ZeRO-{} {:>7.2} {:>8.2} {:>10.2} {:>13.2} {:>12.2} {:>9.2}{verdict}\n",
            stage.stage,
            stage.parameter_bytes / GIB,
            stage.gradient_bytes / GIB,
            stage.optimizer_bytes / GIB,
            stage.model_state_bytes() / GIB,
            stage.activation_bytes / GIB,
            stage.total_bytes() / GIB,
        ));
    }
    out.push_str(
        "not included: CUDA context (~0.5-1 GiB), fragmentation, communication buckets, ZeRO-3 gathered parameters\n",
    );
    out
}

fn fit_verdict(total_bytes: f64, gpu_memory_gib: Option<f64>) -> String {
    match gpu_memory_gib {
        Some(limit) if total_bytes / GIB > limit => format!("  DOES NOT FIT ({limit} GiB)"),
        Some(limit) if total_bytes / GIB > 0.9 * limit => format!("  tight (>90% of {limit} GiB)"),
        Some(_) => "  fits".to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models")
    }

    fn shape(name: &str) -> ModelShape {
        ModelShape::from_config_path(&configs_dir().join(name)).unwrap()
    }

    // Reference counts: transformers 5 `Qwen2ForCausalLM(config)` / `LlamaForCausalLM`
    // on the meta device, sum of numel (computed once with the venv's transformers).
    #[test]
    fn parameter_counts_match_transformers() {
        assert_eq!(shape("qwen2.5-0.5b.json").parameter_count(), 494_032_768);
        assert_eq!(shape("qwen2-tiny.json").parameter_count(), 7_147_776);
        assert_eq!(shape("qwen2-50m.json").parameter_count(), 50_881_024);
        // Qwen3-0.6B's shape: `Qwen3ForCausalLM(Qwen3Config(...))` counts 596,049,920.
        let qwen3 = serde_json::json!({
            "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
            "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": true,
            "attention_bias": false
        });
        let qwen3 = ModelShape::from_config_value(&qwen3).unwrap();
        assert_eq!(qwen3.parameter_count(), 596_049_920);
    }

    #[test]
    fn llama_has_no_qkv_bias() {
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 8192, "tie_word_embeddings": false
        });
        let llama = ModelShape::from_config_value(&config).unwrap();
        assert_eq!(llama.parameter_count(), 7_145_728);
    }

    #[test]
    fn model_states_match_the_reference_table_for_qwen2_0_5b_at_8_ranks() {
        let result = estimate(&shape("qwen2.5-0.5b.json"), 8, 1, 1, false, Dtype::Bf16);
        let gb: Vec<f64> = result
            .stages
            .iter()
            .map(|s| s.model_state_bytes() / 1e9)
            .collect();
        // ZeRO paper rules, 8 ranks: 7.9 / 2.7 / 1.85 / 0.99 GB (DDP / Z1 / Z2 / Z3).
        for (got, want) in gb.iter().zip([7.9, 2.7, 1.85, 0.99]) {
            assert!((got - want).abs() < 0.02, "{gb:?}");
        }
    }

    #[test]
    fn stage_formulas_per_parameter() {
        let s = shape("qwen2-tiny.json");
        let psi = s.parameter_count() as f64;
        let r = estimate(&s, 4, 1, 8, false, Dtype::Bf16);
        let per_param: Vec<f64> = r
            .stages
            .iter()
            .map(|st| st.model_state_bytes() / psi)
            .collect();
        let want = [16.0, 4.0 + 12.0 / 4.0, 2.0 + 14.0 / 4.0, 16.0 / 4.0];
        for (got, want) in per_param.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{per_param:?}");
        }
    }

    #[test]
    fn activation_formula_and_checkpointing_reduce_memory() {
        let s = shape("qwen2-tiny.json");
        let (b, t) = (2u64, 128u64);
        let layer = t * b * 256 * 34 + 5 * 4 * t * t * b;
        let logits = t * b * 8192 * 6;
        assert_eq!(
            activation_bytes(&s, b, t, false, Dtype::Bf16),
            (4 * layer + logits) as f64
        );
        let ckpt = 4 * 2 * t * b * 256 + layer + logits;
        assert_eq!(activation_bytes(&s, b, t, true, Dtype::Bf16), ckpt as f64);
    }

    #[test]
    fn cli_flags_configurations_that_do_not_fit() {
        let args = EstimateArgs {
            model_config: configs_dir().join("qwen2.5-0.5b.json"),
            num_gpus: 2,
            num_nodes: 1,
            micro_batch: 16,
            seq_len: 2048,
            gradient_checkpointing: false,
            gpu_memory: Some(24.0),
            dtype: Dtype::Bf16,
        };
        let text = estimate_memory_cli(args.clone()).unwrap();
        assert_eq!(text.matches("DOES NOT FIT").count(), 4, "{text}");
        let small = EstimateArgs {
            micro_batch: 1,
            seq_len: 256,
            gpu_memory: Some(80.0),
            ..args
        };
        let text = estimate_memory_cli(small).unwrap();
        assert_eq!(text.matches("DOES NOT FIT").count(), 0, "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("ZeRO-")).count(),
            4,
            "{text}"
        );
    }

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: EstimateArgs,
    }

    #[test]
    fn flags_use_the_deepspeed_underscore_spelling() {
        use clap::Parser;
        let argv = [
            "estimate-memory",
            "--model",
            "m.json",
            "--num_gpus",
            "8",
            "--num_nodes",
            "2",
            "--micro_batch",
            "4",
            "--seq_len",
            "512",
            "--gradient_checkpointing",
            "--gpu_memory",
            "80",
            "--dtype",
            "fp32",
        ];
        let args = Command::try_parse_from(argv).unwrap().args;
        assert_eq!(
            (
                args.num_gpus,
                args.num_nodes,
                args.micro_batch,
                args.seq_len
            ),
            (8, 2, 4, 512)
        );
        assert!(args.gradient_checkpointing);
        assert_eq!((args.gpu_memory, args.dtype), (Some(80.0), Dtype::Fp32));
    }

    #[test]
    fn unsupported_model_type_is_refused() {
        let config = serde_json::json!({"model_type": "gpt2", "hidden_size": 8});
        let err = ModelShape::from_config_value(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"gpt2\" is not supported"), "{err}");
    }
}
