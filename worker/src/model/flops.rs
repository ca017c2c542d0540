//! The forward pass of the model rsdeep runs, counted the way DeepSpeed's flops profiler
//! counts the same Hugging Face module tree, as pure functions of the model config, its
//! adapters and the batch shape. `train/flops_profile.rs` prints the result in DeepSpeed's
//! `print_model_profile` layout for the `flops_profiler` block of the DeepSpeed config
//! (`rsdeep_contract::config::FlopsProfilerConfig`).
//!
//! Counting rules (DeepSpeed 0.19.8's profiler patches these functionals and nothing else
//! that the model calls): `F.linear` counts input elements x out_features MACs and twice
//! that in FLOPs (the bias is free); `F.scaled_dot_product_attention` counts Q K^T plus
//! A V over the whole (T, T_k) grid, causal or not, and twice that in FLOPs; `F.silu`
//! counts one FLOP per element and no MAC; `F.embedding` counts nothing. The RMSNorms, the
//! rotary embedding, the residual adds and the SwiGLU product are Python operators
//! (`*`, `+`, `@` on tensors) it does not see: 0. Parameters are `module.parameters()`,
//! a tied `lm_head` counted once in the model and again in the `lm_head` module.
//! `worker/tests/flops_parity.rs` runs DeepSpeed's `get_model_profile` on transformers
//! (and PEFT LoRA / DoRA) models and checks these totals against it.
//!
//! The tree mirrors transformers 5.x's modules (`Qwen2ForCausalLM` > `Qwen2Model` >
//! `embed_tokens`, `layers`, `norm`, `rotary_emb`; `lm_head`), PEFT's `lora.Linear` for
//! a LoRA linear and `PeftModelForCausalLM` around the model; prefix tuning and bottleneck
//! adapters are shown with their parameters and counts in a simplified wrapper.

use super::config::{ModelConfig, ModelType};
use std::collections::BTreeMap;

/// The shape of one forward: `batch` sequences of `seq` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardShape {
    pub batch: i64,
    pub seq: i64,
}

impl ForwardShape {
    fn tokens(self) -> i64 {
        self.batch * self.seq
    }
}

/// A LoRA adapter on one decoder linear: its rank, and whether it is DoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    pub rank: i64,
    pub dora: bool,
}

/// A bottleneck adapter of a decoder layer: `attention_adapters` or `output_adapters`,
/// its name and width.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BottleneckShape {
    pub location: String,
    pub name: String,
    pub width: i64,
}

/// What one decoder layer carries besides its base weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerAdapters {
    /// By linear (`self_attn.q_proj`, ...).
    pub lora: BTreeMap<String, LoraShape>,
    /// Prefix tuning's virtual positions.
    pub prefix: Option<i64>,
    pub bottleneck: Vec<BottleneckShape>,
}

/// Every layer's adapters (absent layers carry none) and PEFT's LoRA dropout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Adapters {
    pub layers: BTreeMap<usize, LayerAdapters>,
    pub lora_dropout: f64,
}

impl Adapters {
    /// The adapters found among named parameter shapes (rsdeep's names:
    /// `model.layers.{i}.{linear}.lora_A.weight` (r, in), `...lora_magnitude_vector`,
    /// `model.layers.{i}.prefix_key_values` (N, ·),
    /// `model.layers.{i}.{location}.adapters.{name}.adapter_down.0.weight` (W, H)); other
    /// names are base weights and ignored.
    pub fn from_params(params: &[(String, Vec<i64>)], lora_dropout: f64) -> Adapters {
        let mut adapters = Adapters {
            layers: BTreeMap::new(),
            lora_dropout,
        };
        for (name, shape) in params {
            let Some((index, rest)) = layer_param(name) else {
                continue;
            };
            let first = shape.first().copied().unwrap_or(0);
            let layer = adapters.layers.entry(index).or_default();
            record_adapter_param(layer, rest, first);
        }
        adapters
            .layers
            .retain(|_, layer| *layer != LayerAdapters::default());
        adapters
    }

    fn layer(&self, index: usize) -> Option<&LayerAdapters> {
        self.layers.get(&index)
    }

    fn has_lora(&self) -> bool {
        self.layers.values().any(|l| !l.lora.is_empty())
    }

    fn has_prefix(&self) -> bool {
        self.layers.values().any(|l| l.prefix.is_some())
    }
}

/// `model.layers.{i}.{rest}` -> (i, rest).
fn layer_param(name: &str) -> Option<(usize, &str)> {
    let tail = name.strip_prefix("model.layers.")?;
    let (index, rest) = tail.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// Notes what the layer parameter `rest` (first dimension `first`) says about adapters.
fn record_adapter_param(layer: &mut LayerAdapters, rest: &str, first: i64) {
    if let Some(linear) = rest.strip_suffix(".lora_A.weight") {
        let entry = layer.lora.entry(linear.to_string()).or_insert(LoraShape {
            rank: first,
            dora: false,
        });
        entry.rank = first;
    } else if let Some(linear) = rest.strip_suffix(".lora_magnitude_vector") {
        let entry = layer.lora.entry(linear.to_string()).or_insert(LoraShape {
            rank: 0,
            dora: true,
        });
        entry.dora = true;
    } else if rest == "prefix_key_values" {
        layer.prefix = Some(first);
    } else if let Some(down) = rest.strip_suffix(".adapter_down.0.weight") {
        let Some((location, name)) = down.split_once(".adapters.") else {
            return;
        };
        layer.bottleneck.push(BottleneckShape {
            location: location.to_string(),
            name: name.to_string(),
            width: first,
        });
    }
}

/// MACs of `F.linear` on `tokens` rows: in x out per row.
pub fn linear_macs(tokens: i64, in_features: i64, out_features: i64) -> i64 {
    tokens * in_features * out_features
}

/// MACs of `F.scaled_dot_product_attention` on (B, N, T, D) queries against T_k keys:
/// Q K^T (B N T T_k D) plus A V (B N T T_k D), the full grid whatever the mask.
pub fn attention_macs(batch: i64, heads: i64, q_len: i64, kv_len: i64, head_dim: i64) -> i64 {
    2 * batch * heads * q_len * kv_len * head_dim
}

/// One module of the profiled tree: its own counts (what functionals its forward called
/// directly) and its children.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleNode {
    /// The key under its parent (`q_proj`, `0`); empty for the root.
    pub key: String,
    /// The class name DeepSpeed aggregates by (`type(module).__name__`).
    pub class: String,
    /// The name its repr starts with (`lora.Linear` for PEFT's LoRA layer).
    pub printed: String,
    /// torch's `extra_repr` (`in_features=64, out_features=32, bias=True`), may be empty.
    pub extra: String,
    /// The module path rsdeep times this module's forward under (`forward_clock`).
    pub timed_as: Option<String>,
    /// Parameters of the subtree, a shared one counted once.
    pub params: i64,
    /// MACs and FLOPs of the functionals this module's forward calls itself.
    pub macs: i64,
    pub flops: i64,
    pub children: Vec<ModuleNode>,
    /// A `ModuleList` (torch prints it without a profile line, repeats folded).
    pub is_list: bool,
}

impl ModuleNode {
    fn leaf(key: &str, class: &str, extra: String, params: i64) -> Self {
        ModuleNode {
            key: key.to_string(),
            class: class.to_string(),
            printed: class.to_string(),
            extra,
            timed_as: None,
            params,
            macs: 0,
            flops: 0,
            children: Vec::new(),
            is_list: false,
        }
    }

    fn parent(key: &str, class: &str, children: Vec<ModuleNode>) -> Self {
        let params = children.iter().map(|c| c.params).sum();
        ModuleNode {
            children,
            ..Self::leaf(key, class, String::new(), params)
        }
    }

    fn timed(mut self, path: String) -> Self {
        self.timed_as = Some(path);
        self
    }

    fn printed_as(mut self, printed: &str) -> Self {
        self.printed = printed.to_string();
        self
    }

    /// Adds `macs` (and twice as many FLOPs, the rule for products) to its own counts.
    fn with_macs(mut self, macs: i64) -> Self {
        self.macs += macs;
        self.flops += 2 * macs;
        self
    }

    fn with_flops(mut self, flops: i64) -> Self {
        self.flops += flops;
        self
    }

    /// MACs of the subtree.
    pub fn total_macs(&self) -> i64 {
        self.macs + self.children.iter().map(Self::total_macs).sum::<i64>()
    }

    /// FLOPs of the subtree.
    pub fn total_flops(&self) -> i64 {
        self.flops + self.children.iter().map(Self::total_flops).sum::<i64>()
    }
}

/// The profiled module tree of one training (`training`: LoRA dropout active) forward of
/// `config` with `adapters` on `shape`.
pub fn model_tree(
    config: &ModelConfig,
    adapters: &Adapters,
    shape: ForwardShape,
    training: bool,
) -> ModuleNode {
    let counter = Counter {
        config,
        adapters,
        shape,
        training,
        arch: arch_prefix(config.model_type),
    };
    counter.wrapped_model()
}

/// Forward MACs of the whole model (`model_tree`'s total).
pub fn forward_macs(
    config: &ModelConfig,
    adapters: &Adapters,
    shape: ForwardShape,
    training: bool,
) -> i64 {
    model_tree(config, adapters, shape, training).total_macs()
}

/// transformers' class-name prefix of an architecture.
fn arch_prefix(model_type: ModelType) -> &'static str {
    match model_type {
        ModelType::Qwen2 => "Qwen2",
        ModelType::Qwen3 => "Qwen3",
        ModelType::Llama => "Llama",
        ModelType::Mistral => "Mistral",
    }
}

/// Builds the tree of one model and forward shape.
struct Counter<'a> {
    config: &'a ModelConfig,
    adapters: &'a Adapters,
    shape: ForwardShape,
    training: bool,
    arch: &'static str,
}

impl Counter<'_> {
    fn hidden(&self) -> i64 {
        self.config.hidden_size as i64
    }

    fn tokens(&self) -> i64 {
        self.shape.tokens()
    }

    /// The model inside PEFT's wrappers when it carries LoRA or prefix tuning.
    fn wrapped_model(&self) -> ModuleNode {
        let model = self.causal_lm();
        if self.adapters.has_lora() {
            let lora_model =
                ModuleNode::parent("base_model", "LoraModel", vec![keyed(model, "model")]);
            return ModuleNode::parent("", "PeftModelForCausalLM", vec![lora_model]);
        }
        if self.adapters.has_prefix() {
            let children = vec![keyed(model, "base_model"), self.prompt_encoder()];
            return ModuleNode::parent("", "PeftModelForCausalLM", children);
        }
        model
    }

    /// `XForCausalLM`: the model and the head (a tied head's weight counted once).
    fn causal_lm(&self) -> ModuleNode {
        let lm_head = self
            .linear(
                "lm_head",
                self.hidden(),
                self.config.vocab_size as i64,
                false,
            )
            .timed("lm_head".into());
        let tied = self.config.tie_word_embeddings;
        let mut root = ModuleNode::parent(
            "",
            &format!("{}ForCausalLM", self.arch),
            vec![self.base_model(), lm_head],
        );
        if tied {
            root.params -= self.config.vocab_size as i64 * self.hidden();
        }
        root
    }

    /// `XModel`: embedding, the layers, the final norm and the rotary embedding.
    fn base_model(&self) -> ModuleNode {
        let layers = (0..self.config.num_hidden_layers)
            .map(|i| self.decoder_layer(i))
            .collect();
        let mut list = ModuleNode::parent("layers", "ModuleList", layers);
        list.is_list = true;
        let norm = self
            .rms_norm("norm", self.hidden())
            .timed("model.norm".into());
        let rotary = ModuleNode::leaf(
            "rotary_emb",
            &format!("{}RotaryEmbedding", self.arch),
            String::new(),
            0,
        );
        ModuleNode::parent(
            "model",
            &format!("{}Model", self.arch),
            vec![self.embedding(), list, norm, rotary],
        )
    }

    /// `nn.Embedding(vocab, hidden, padding_idx)`: parameters, no count.
    fn embedding(&self) -> ModuleNode {
        let (vocab, hidden) = (self.config.vocab_size as i64, self.hidden());
        let extra = match self.config.pad_token_id {
            Some(pad) => format!("{vocab}, {hidden}, padding_idx={pad}"),
            None => format!("{vocab}, {hidden}"),
        };
        ModuleNode::leaf("embed_tokens", "Embedding", extra, vocab * hidden)
            .timed("model.embed_tokens".into())
    }

    /// PEFT's prefix encoder: an embedding of every layer's virtual keys and values.
    fn prompt_encoder(&self) -> ModuleNode {
        let (mut positions, mut width) = (0, 0);
        for layer in self.adapters.layers.values() {
            if let Some(n) = layer.prefix {
                positions = n;
                width += 2 * self.config.num_kv_heads() as i64 * self.config.head_dim() as i64;
            }
        }
        let embedding = ModuleNode::leaf(
            "embedding",
            "Embedding",
            format!("{positions}, {width}"),
            positions * width,
        );
        let encoder = ModuleNode::parent("default", "PrefixEncoder", vec![embedding]);
        ModuleNode::parent("prompt_encoder", "ModuleDict", vec![encoder])
    }

    /// `XDecoderLayer` `index`: attention, MLP, the two norms, and any bottleneck adapters.
    fn decoder_layer(&self, index: usize) -> ModuleNode {
        let path = |part: &str| format!("model.layers.{index}.{part}");
        let hidden = self.hidden();
        let mut children = vec![
            self.attention(index).timed(path("self_attn")),
            self.mlp(index).timed(path("mlp")),
            self.rms_norm("input_layernorm", hidden)
                .timed(path("input_layernorm")),
            self.rms_norm("post_attention_layernorm", hidden)
                .timed(path("post_attention_layernorm")),
        ];
        if let Some(layer) = self.adapters.layer(index) {
            children.extend(self.bottleneck_layers(&layer.bottleneck));
        }
        ModuleNode::parent(
            &index.to_string(),
            &format!("{}DecoderLayer", self.arch),
            children,
        )
        .timed(format!("model.layers.{index}"))
    }

    /// `XAttention`: q/k/v/o (Qwen3: per-head q/k norms) and SDPA over the sequence and
    /// any prefix.
    fn attention(&self, index: usize) -> ModuleNode {
        let config = self.config;
        let hidden = self.hidden();
        let (heads, kv_heads) = (
            config.num_attention_heads as i64,
            config.num_kv_heads() as i64,
        );
        let head_dim = config.head_dim() as i64;
        let (q_out, kv_out) = (heads * head_dim, kv_heads * head_dim);
        let layer = self.adapters.layer(index);
        let lin = |name: &str, inp: i64, out: i64, bias: bool| {
            let lora = layer.and_then(|l| l.lora.get(&format!("self_attn.{name}")));
            self.maybe_lora(name, inp, out, bias, lora)
        };
        let mut children = vec![
            lin("q_proj", hidden, q_out, config.qkv_bias()),
            lin("k_proj", hidden, kv_out, config.qkv_bias()),
            lin("v_proj", hidden, kv_out, config.qkv_bias()),
            lin("o_proj", q_out, hidden, config.o_bias()),
        ];
        if config.qk_norm() {
            children.push(self.rms_norm("q_norm", head_dim));
            children.push(self.rms_norm("k_norm", head_dim));
        }
        let prefix = layer.and_then(|l| l.prefix).unwrap_or(0);
        let ForwardShape { batch, seq } = self.shape;
        let sdpa = attention_macs(batch, heads, seq, prefix + seq, head_dim);
        ModuleNode::parent("self_attn", &format!("{}Attention", self.arch), children)
            .with_macs(sdpa)
    }

    /// `XMLP`: gate, up, down and the SiLU between them.
    fn mlp(&self, index: usize) -> ModuleNode {
        let (hidden, inter) = (self.hidden(), self.config.intermediate_size as i64);
        let bias = self.config.mlp_has_bias();
        let layer = self.adapters.layer(index);
        let lin = |name: &str, inp: i64, out: i64| {
            let lora = layer.and_then(|l| l.lora.get(&format!("mlp.{name}")));
            self.maybe_lora(name, inp, out, bias, lora)
        };
        let act = ModuleNode::leaf("act_fn", "SiLUActivation", String::new(), 0)
            .with_flops(self.tokens() * inter);
        let children = vec![
            lin("gate_proj", hidden, inter),
            lin("up_proj", hidden, inter),
            lin("down_proj", inter, hidden),
            act,
        ];
        ModuleNode::parent("mlp", &format!("{}MLP", self.arch), children)
    }

    /// `nn.Linear(in, out, bias)` applied to every token.
    fn linear(&self, key: &str, inp: i64, out: i64, bias: bool) -> ModuleNode {
        let extra = format!(
            "in_features={inp}, out_features={out}, bias={}",
            python_bool(bias)
        );
        let params = inp * out + if bias { out } else { 0 };
        ModuleNode::leaf(key, "Linear", extra, params).with_macs(linear_macs(
            self.tokens(),
            inp,
            out,
        ))
    }

    /// A plain linear, or PEFT's `lora.Linear` around it when `lora` is set.
    fn maybe_lora(
        &self,
        key: &str,
        inp: i64,
        out: i64,
        bias: bool,
        lora: Option<&LoraShape>,
    ) -> ModuleNode {
        match lora {
            Some(lora) => self.lora_linear(key, inp, out, bias, *lora),
            None => self.linear(key, inp, out, bias),
        }
    }

    /// PEFT's `lora.Linear`: the base layer, dropout, A (in -> r), B (r -> out) and for
    /// DoRA the magnitude layer. DoRA's weight norm runs A and B on an (in, in) identity
    /// every forward, and recomputes the base product when dropout is active.
    fn lora_linear(
        &self,
        key: &str,
        inp: i64,
        out: i64,
        bias: bool,
        lora: LoraShape,
    ) -> ModuleNode {
        let rank = lora.rank;
        let mut a = self.linear("default", inp, rank, false);
        let mut b = self.linear("default", rank, out, false);
        let mut magnitude = Vec::new();
        if lora.dora {
            a = a.with_macs(linear_macs(inp, inp, rank));
            b = b.with_macs(linear_macs(inp, rank, out));
            let dropout_on = self.training && self.adapters.lora_dropout > 0.0;
            let rerun = if dropout_on {
                linear_macs(self.tokens(), inp, out)
            } else {
                0
            };
            let layer = ModuleNode::leaf("default", "DoraLinearLayer", String::new(), out)
                .printed_as("lora.dora.DoraLinearLayer")
                .with_macs(rerun);
            magnitude.push(layer);
        }
        let children = vec![
            self.linear("base_layer", inp, out, bias),
            ModuleNode::parent("lora_dropout", "ModuleDict", vec![self.lora_dropout()]),
            ModuleNode::parent("lora_A", "ModuleDict", vec![a]),
            ModuleNode::parent("lora_B", "ModuleDict", vec![b]),
            ModuleNode::leaf("lora_embedding_A", "ParameterDict", String::new(), 0),
            ModuleNode::leaf("lora_embedding_B", "ParameterDict", String::new(), 0),
            ModuleNode::parent("lora_magnitude_vector", "ModuleDict", magnitude),
        ];
        ModuleNode::parent(key, "Linear", children).printed_as("lora.Linear")
    }

    /// PEFT's dropout before A: `nn.Dropout(p)`, or `nn.Identity` when p is 0.
    fn lora_dropout(&self) -> ModuleNode {
        let p = self.adapters.lora_dropout;
        match p > 0.0 {
            true => ModuleNode::leaf(
                "default",
                "Dropout",
                format!("p={}, inplace=False", python_float_repr(p)),
                0,
            ),
            false => ModuleNode::leaf("default", "Identity", String::new(), 0),
        }
    }

    /// `XRMSNorm((dim,), eps)`: a weight, no count.
    fn rms_norm(&self, key: &str, dim: i64) -> ModuleNode {
        let extra = format!(
            "({dim},), eps={}",
            python_float_repr(self.config.rms_norm_eps)
        );
        ModuleNode::leaf(key, &format!("{}RMSNorm", self.arch), extra, dim)
    }

    /// Bottleneck adapters: down (H -> W) + activation + up (W -> H), with biases.
    fn bottleneck_layers(&self, shapes: &[BottleneckShape]) -> Vec<ModuleNode> {
        let mut by_location: BTreeMap<&str, Vec<ModuleNode>> = BTreeMap::new();
        for shape in shapes {
            by_location
                .entry(shape.location.as_str())
                .or_default()
                .push(self.bottleneck_adapter(shape));
        }
        by_location
            .into_iter()
            .map(|(location, adapters)| {
                let dict = ModuleNode::parent("adapters", "ModuleDict", adapters);
                ModuleNode::parent(location, "BottleneckLayer", vec![dict])
            })
            .collect()
    }

    fn bottleneck_adapter(&self, shape: &BottleneckShape) -> ModuleNode {
        let (hidden, width) = (self.hidden(), shape.width);
        let activation = ModuleNode::leaf("1", "Activation_Function_Class", String::new(), 0)
            .with_flops(self.tokens() * width);
        let down = ModuleNode::parent(
            "adapter_down",
            "Sequential",
            vec![self.linear("0", hidden, width, true), activation],
        );
        let up = self.linear("adapter_up", width, hidden, true);
        ModuleNode::parent(&shape.name, "Adapter", vec![down, up])
    }
}

/// `node` under a new key.
fn keyed(mut node: ModuleNode, key: &str) -> ModuleNode {
    node.key = key.to_string();
    node
}

fn python_bool(value: bool) -> &'static str {
    match value {
        true => "True",
        false => "False",
    }
}

/// Python's `repr` of a float: the shortest digits that read back, positional for
/// exponents -4..16 (`0.1`, `12.0`), else scientific with a two-digit exponent (`1e-06`).
pub fn python_float_repr(value: f64) -> String {
    if !value.is_finite() {
        return match value {
            v if v.is_nan() => "nan".into(),
            v if v > 0.0 => "inf".into(),
            _ => "-inf".into(),
        };
    }
    let shortest = format!("{value:e}"); // e.g. "-1.5e-6"
    let (mantissa, exponent) = shortest.split_once('e').unwrap_or((&shortest, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let body = match (-4..16).contains(&exponent) {
        true => positional(&digits, exponent),
        false => scientific(&digits, exponent),
    };
    match negative {
        true => format!("-{body}"),
        false => body,
    }
}

/// `digits` (d.ddd) times 10^`exponent` written out, with at least one decimal.
fn positional(digits: &str, exponent: i32) -> String {
    let point = exponent + 1; // digits before the decimal point
    if point <= 0 {
        return format!("0.{}{digits}", "0".repeat((-point) as usize));
    }
    let point = point as usize;
    if digits.len() <= point {
        return format!("{digits}{}.0", "0".repeat(point - digits.len()));
    }
    format!("{}.{}", &digits[..point], &digits[point..])
}

/// `d.ddde-XX` with at least two exponent digits.
fn scientific(digits: &str, exponent: i32) -> String {
    let mantissa = match digits.len() {
        1 => digits.to_string(),
        _ => format!("{}.{}", &digits[..1], &digits[1..]),
    };
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes of `worker/tests/flops_parity.rs`'s probes: hidden 64, MLP 128, 4 heads
    /// of 16 (2 kv heads), vocabulary 96, 2 x 16 tokens.
    fn tiny(model_type: ModelType, layers: usize, tied: bool) -> ModelConfig {
        let mut config = ModelConfig::new(model_type, 96, 64, 128, layers, 4, 2);
        config.tie_word_embeddings = tied;
        config
    }

    const SHAPE: ForwardShape = ForwardShape { batch: 2, seq: 16 };

    fn totals(config: &ModelConfig, adapters: &Adapters, training: bool) -> (i64, i64, i64) {
        let tree = model_tree(config, adapters, SHAPE, training);
        (tree.params, tree.total_macs(), tree.total_flops())
    }

    #[test]
    fn a_dense_model_counts_its_linears_attention_and_silu() {
        // DeepSpeed 0.19.8's get_model_profile on transformers' Qwen2 of this shape:
        // 86.59 K params, 2686976 MACs, 5382144 FLOPs.
        let config = tiny(ModelType::Qwen2, 2, false);
        let (params, macs, flops) = totals(&config, &Adapters::default(), true);
        assert_eq!((params, macs, flops), (86_592, 2_686_976, 5_382_144));
        // By hand: per layer q/o 32x64x64, k/v 32x64x32, SDPA 2x2x4x16x16x16, MLP
        // 3x32x64x128; the head 32x64x96.
        let layer = 2 * 131_072 + 2 * 65_536 + 65_536 + 3 * 262_144;
        assert_eq!(macs, 2 * layer + 196_608);
        assert_eq!(flops, 2 * macs + 2 * 32 * 128, "SiLU: one FLOP per element");
    }

    #[test]
    fn biases_tied_heads_and_qwen3_norms_follow_transformers_modules() {
        let mut llama = tiny(ModelType::Llama, 1, true);
        (llama.attention_bias, llama.mlp_bias, llama.pad_token_id) = (true, true, Some(0));
        assert_eq!(
            totals(&llama, &Adapters::default(), true),
            (43_712, 1_441_792, 2_887_680)
        );
        let mut qwen3 = tiny(ModelType::Qwen3, 1, true);
        qwen3.head_dim = Some(32);
        assert_eq!(
            totals(&qwen3, &Adapters::default(), true),
            (55_552, 1_900_544, 3_805_184)
        );
        let tree = model_tree(&llama, &Adapters::default(), SHAPE, true);
        let lm_head = &tree.children[1];
        assert_eq!(
            lm_head.params,
            96 * 64,
            "the lm_head module lists its tied weight"
        );
        let embed = &tree.children[0].children[0];
        assert_eq!(embed.extra, "96, 64, padding_idx=0");
    }

    fn lora_params(dora: bool) -> Vec<(String, Vec<i64>)> {
        let mut params = vec![
            (
                "model.layers.0.self_attn.q_proj.weight".into(),
                vec![64, 64],
            ),
            (
                "model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                vec![4, 64],
            ),
            (
                "model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                vec![64, 4],
            ),
        ];
        let second = if dora {
            "mlp.down_proj"
        } else {
            "self_attn.v_proj"
        };
        let (out, inp) = if dora { (64, 128) } else { (32, 64) };
        params.push((
            format!("model.layers.0.{second}.lora_A.weight"),
            vec![4, inp],
        ));
        params.push((
            format!("model.layers.0.{second}.lora_B.weight"),
            vec![out, 4],
        ));
        if dora {
            params.push((
                "model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                vec![64],
            ));
            params.push((
                format!("model.layers.0.{second}.lora_magnitude_vector"),
                vec![out],
            ));
        }
        params
    }

    #[test]
    fn lora_and_dora_adapters_count_as_pefts_layers_do() {
        let config = tiny(ModelType::Qwen2, 1, true);
        let lora = Adapters::from_params(&lora_params(false), 0.1);
        let layer = &lora.layers[&0];
        assert_eq!(
            layer.lora["self_attn.v_proj"],
            LoraShape {
                rank: 4,
                dora: false
            }
        );
        // DeepSpeed on PEFT's LoRA (r 4 on q_proj and v_proj) in eval mode.
        assert_eq!(
            totals(&config, &lora, false),
            (44_224, 1_470_464, 2_945_024)
        );
        let dora = Adapters::from_params(&lora_params(true), 0.0);
        assert_eq!(
            totals(&config, &dora, false),
            (44_736, 1_613_824, 3_231_744)
        );
        // With dropout on in training, DoRA runs the base product once more.
        let dropped = Adapters {
            lora_dropout: 0.1,
            ..dora.clone()
        };
        let extra = linear_macs(32, 64, 64) + linear_macs(32, 128, 64);
        assert_eq!(
            totals(&config, &dropped, true).1,
            totals(&config, &dora, true).1 + extra
        );
        let tree = model_tree(&config, &lora, SHAPE, true);
        assert_eq!(tree.class, "PeftModelForCausalLM");
    }

    #[test]
    fn prefix_tuning_lengthens_the_keys_and_bottlenecks_add_their_linears() {
        let config = tiny(ModelType::Llama, 1, false);
        let base = forward_macs(&config, &Adapters::default(), SHAPE, true);
        let prefix = Adapters::from_params(
            &[("model.layers.0.prefix_key_values".into(), vec![8, 64])],
            0.0,
        );
        let with_prefix = model_tree(&config, &prefix, SHAPE, true);
        assert_eq!(
            with_prefix.total_macs(),
            base + attention_macs(2, 4, 16, 8, 16)
        );
        let name = "model.layers.0.output_adapters.adapters.bn.adapter_down.0.weight";
        let bottleneck = Adapters::from_params(&[(name.into(), vec![8, 64])], 0.0);
        let tree = model_tree(&config, &bottleneck, SHAPE, true);
        assert_eq!(tree.total_macs(), base + 2 * linear_macs(32, 64, 8));
        let dense_params = model_tree(&config, &Adapters::default(), SHAPE, true).params;
        assert_eq!(tree.params, dense_params + (8 * 64 + 8) + (64 * 8 + 64));
    }

    #[test]
    fn floats_print_as_python_reprs_them() {
        let cases = [
            (1e-6, "1e-06"),
            (1e-5, "1e-05"),
            (0.1, "0.1"),
            (0.05, "0.05"),
            (12.0, "12.0"),
            (12.35, "12.35"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456.5, "123456.5"),
            (-2.5e-7, "-2.5e-07"),
        ];
        for (value, repr) in cases {
            assert_eq!(python_float_repr(value), repr, "{value}");
        }
    }
}
