//! The three block kinds of a Qwen2 / Qwen3 / Llama / Mistral causal LM — `Embedding`, `DecoderLayer`,
//! `Head` — implementing the `Block` contract of `model/mod.rs`, plus the functional
//! pieces they share (RMSNorm, linear, SwiGLU, attention). Numerics follow transformers
//! 5.x `modeling_qwen2.py` / `modeling_qwen3.py` / `modeling_llama.py` with the SDPA
//! attention backend. Weights
//! are read from the `Param` tensors at every forward (the engine swaps their storage).

use super::bottleneck::{BottleneckSlots, BottleneckStyle, BottleneckTensors};
use super::config::ModelConfig;
use super::forward_clock;
use super::rope::{Rotary, apply_rotary};
use super::{Block, ForwardCtx, Param};
use crate::quant::{QuantConfig, QuantSpec, QuantizedWeight};
use crate::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Kind, Tensor};

/// HF RMSNorm: normalise in fp32, cast back to the input dtype, then scale by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let input_kind = x.kind();
    let x32 = x.f_to_kind(Kind::Float)?; // (B, T, H)
    let variance = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?; // (B, T, 1)
    let normed = x32.f_mul(&variance.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(weight.f_mul(&normed.f_to_kind(input_kind)?)?)
}

/// Indices of a linear layer's weight and optional bias inside a block's `params`, plus
/// an optional LoRA adapter on it and, for a 4-bit weight, its entry in the layer's
/// `quantized` list.
#[derive(Clone, Copy)]
pub(super) struct LinearSlot {
    pub(super) weight: usize,
    pub(super) bias: Option<usize>,
    pub(super) lora: Option<LoraSlot>,
    pub(super) quant: Option<usize>,
}

/// A linear weight stored in bitsandbytes' 4-bit format: what its parameters mean and
/// their indices in the block's `params` (the first is the weight's own slot).
pub(super) struct QuantizedLinear {
    spec: QuantSpec,
    params: Vec<usize>,
}

/// A LoRA adapter on one linear layer (PEFT's math): indices of `lora_A.weight` (r, in)
/// and `lora_B.weight` (out, r) in the block's `params`, `scaling` = alpha / r, and with
/// DoRA the index of `lora_magnitude_vector` (out,).
#[derive(Clone, Copy)]
pub(super) struct LoraSlot {
    a: usize,
    b: usize,
    magnitude: Option<usize>,
    scaling: f64,
    dropout: f64,
}

/// One adapter's tensors for `DecoderLayer::attach_lora`: A (r, in), B (out, r) and,
/// for DoRA, the magnitude (out,).
pub struct LoraTensors {
    pub a: Tensor,
    pub b: Tensor,
    pub magnitude: Option<Tensor>,
}

impl LinearSlot {
    /// y = x W^T + b (+ B(A(dropout(x))) * scaling when an adapter is attached; with DoRA
    /// the adapted output rows are rescaled to their trained magnitudes). `weight` is
    /// the slot's weight (dequantized when stored in 4 bits).
    fn apply(
        &self,
        params: &[Param],
        weight: &Tensor,
        training: bool,
        x: &Tensor,
    ) -> Result<Tensor> {
        let bias = self.bias.map(|i| &params[i].tensor);
        let base = x.f_linear(weight, bias)?; // (B, T, out)
        let Some(lora) = self.lora else {
            return Ok(base);
        };
        let dropout_on = lora.dropout > 0.0 && training;
        let dropped = match dropout_on {
            true => x.f_dropout(lora.dropout, true)?,
            false => x.shallow_clone(),
        };
        let (a, b) = (&params[lora.a].tensor, &params[lora.b].tensor);
        let down = dropped.f_linear::<&Tensor>(a, None)?; // (B, T, r)
        let up = down.f_linear::<&Tensor>(b, None)?; // (B, T, out)
        let Some(magnitude) = lora.magnitude else {
            return Ok(base.f_add(&up.f_mul_scalar(lora.scaling)?)?);
        };
        // DoRA: base(x) + (m/n - 1) (x W^T) + (m/n) s B A x, n = |W + s B A| per row
        // (detached), the base term from the dropped-out input while dropout is on.
        let scale = params[magnitude]
            .tensor
            .f_div(&dora_row_norms(weight, a, b, lora.scaling)?)?; // (out,)
        let unbiased = match (dropout_on, bias) {
            (true, _) => dropped.f_linear::<&Tensor>(weight, None)?,
            (false, Some(bias)) => base.f_sub(bias)?,
            (false, None) => base.shallow_clone(),
        }; // (B, T, out)
        let rescaled_base = unbiased.f_mul(&scale.f_sub_scalar(1.0)?)?;
        let rescaled_adapter = up.f_mul(&scale)?.f_mul_scalar(lora.scaling)?;
        Ok(base.f_add(&rescaled_base)?.f_add(&rescaled_adapter)?)
    }
}

/// DoRA's norm of each output row of W + scaling * B A, outside the autograd graph:
/// W (out, in), A (r, in), B (out, r) -> (out,).
pub fn dora_row_norms(weight: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    tch::no_grad(|| {
        let delta = b.f_detach()?.f_matmul(&a.f_detach()?)?; // (out, in)
        let adapted = weight.f_detach()?.f_add(&delta.f_mul_scalar(scaling)?)?;
        Ok(adapted.f_norm_scalaropt_dim(2.0, [1i64], false)?)
    })
}

/// The linear layers of a decoder layer, by their module path inside the layer, in HF
/// order (PEFT's `target_modules` names are the last component).
pub const DECODER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Builds a block's parameter list in a fixed order while handing out slots.
struct ParamList {
    prefix: String,
    params: Vec<Param>,
}

impl ParamList {
    fn new(prefix: impl Into<String>) -> Self {
        ParamList {
            prefix: prefix.into(),
            params: Vec::new(),
        }
    }

    fn push(&mut self, suffix: &str, tensor: Tensor) -> usize {
        self.params.push(Param {
            name: format!("{}{suffix}", self.prefix),
            tensor,
        });
        self.params.len() - 1
    }

    fn linear(&mut self, name: &str, weight: Tensor, bias: Option<Tensor>) -> LinearSlot {
        let weight = self.push(&format!("{name}.weight"), weight);
        let bias = bias.map(|b| self.push(&format!("{name}.bias"), b));
        LinearSlot {
            weight,
            bias,
            lora: None,
            quant: None,
        }
    }
}

/// Supplies parameter tensors by HF name (fresh init or loaded from a checkpoint).
pub trait ParamSource {
    /// The tensor for `name` with `shape`; `kind` says how it is initialised from scratch.
    fn take(&mut self, name: &str, shape: &[i64], init: InitKind) -> Result<Tensor>;
}

/// How a parameter is initialised from a config (transformers' `_init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitKind {
    /// normal(0, initializer_range): Linear and Embedding weights.
    Normal,
    /// zeros: biases.
    Zeros,
    /// ones: RMSNorm weights.
    Ones,
}

/// Token embedding: ids (B, T) int64 -> hidden states (B, T, H).
pub struct Embedding {
    params: Vec<Param>,
    padding_idx: i64,
}

impl Embedding {
    pub const WEIGHT: &'static str = "model.embed_tokens.weight";

    pub fn new(config: &ModelConfig, source: &mut dyn ParamSource) -> Result<Self> {
        let shape = [config.vocab_size as i64, config.hidden_size as i64];
        let weight = source.take(Self::WEIGHT, &shape, InitKind::Normal)?;
        Ok(Embedding {
            params: vec![Param {
                name: Self::WEIGHT.to_string(),
                tensor: weight,
            }],
            padding_idx: config.pad_token_id.unwrap_or(-1),
        })
    }

    /// A handle to the embedding matrix (same tensor, for a tied head).
    pub fn weight_handle(&self) -> Tensor {
        self.params[0].tensor.shallow_clone()
    }
}

impl Block for Embedding {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn forward(&self, ids: &Tensor, _ctx: &ForwardCtx) -> Result<Tensor> {
        // nn.Embedding with padding_idx: that row gets no gradient.
        let weight = &self.params[0].tensor;
        let padding = self.padding_idx;
        // (B, T) ids -> (B, T, H)
        let embed = || Ok(Tensor::f_embedding(weight, ids, padding, false, false)?);
        forward_clock::timed(weight.device(), || "model.embed_tokens".into(), embed)
    }
}

/// One transformer layer: pre-norm attention and pre-norm SwiGLU MLP, both residual.
pub struct DecoderLayer {
    pub(super) params: Vec<Param>,
    pub(super) input_norm: usize,
    pub(super) q: LinearSlot,
    pub(super) k: LinearSlot,
    pub(super) v: LinearSlot,
    pub(super) o: LinearSlot,
    /// Qwen3: the per-head RMSNorm weights (D,) of queries and keys, in `params`.
    pub(super) qk_norm: Option<(usize, usize)>,
    /// Mistral: the attention window; longer sequences are refused (within it,
    /// sliding-window attention is causal attention).
    pub(super) sliding_window: Option<i64>,
    pub(super) post_attention_norm: usize,
    pub(super) gate: LinearSlot,
    pub(super) up: LinearSlot,
    pub(super) down: LinearSlot,
    pub(super) num_heads: i64,
    pub(super) num_kv_heads: i64,
    pub(super) head_dim: i64,
    pub(super) eps: f64,
    pub(super) rotary: Arc<Rotary>,
    /// Layer index in the model (`model.layers.{index}.`).
    index: usize,
    /// The linears stored in 4 bits (`quantize_linears`).
    pub(super) quantized: Vec<QuantizedLinear>,
    /// Prefix tuning: the index in `params` of this layer's trained prefix keys and
    /// values, (N, 2 * KV * D) (`attach_prefix`).
    pub(super) prefix: Option<usize>,
    /// Bottleneck adapters after the attention and/or the MLP (`attach_bottleneck`).
    pub(super) bottleneck: Option<BottleneckSlots>,
    /// Whether LoRA dropout is active (training) or not (inference); shared by every
    /// layer of a model through `use_lora_switch`, so it can be flipped after the blocks
    /// moved into the engine.
    lora_training: Arc<AtomicBool>,
}

impl DecoderLayer {
    pub fn new(
        config: &ModelConfig,
        index: usize,
        rotary: Arc<Rotary>,
        source: &mut dyn ParamSource,
    ) -> Result<Self> {
        let hidden = config.hidden_size as i64;
        let inter = config.intermediate_size as i64;
        let head_dim = config.head_dim() as i64;
        let q_out = config.num_attention_heads as i64 * head_dim;
        let kv_out = config.num_kv_heads() as i64 * head_dim;
        let prefix = format!("model.layers.{index}.");
        let mut list = ParamList::new(prefix.clone());
        let mut linear = |list: &mut ParamList, name: &str, out: i64, inp: i64, bias: bool| {
            let full = format!("{prefix}{name}");
            let weight = source.take(&format!("{full}.weight"), &[out, inp], InitKind::Normal)?;
            let bias = match bias {
                true => Some(source.take(&format!("{full}.bias"), &[out], InitKind::Zeros)?),
                false => None,
            };
            Ok::<_, crate::Error>(list.linear(name, weight, bias))
        };
        let q = linear(
            &mut list,
            "self_attn.q_proj",
            q_out,
            hidden,
            config.qkv_bias(),
        )?;
        let k = linear(
            &mut list,
            "self_attn.k_proj",
            kv_out,
            hidden,
            config.qkv_bias(),
        )?;
        let v = linear(
            &mut list,
            "self_attn.v_proj",
            kv_out,
            hidden,
            config.qkv_bias(),
        )?;
        let o = linear(
            &mut list,
            "self_attn.o_proj",
            hidden,
            q_out,
            config.o_bias(),
        )?;
        let gate = linear(
            &mut list,
            "mlp.gate_proj",
            inter,
            hidden,
            config.mlp_has_bias(),
        )?;
        let up = linear(
            &mut list,
            "mlp.up_proj",
            inter,
            hidden,
            config.mlp_has_bias(),
        )?;
        let down = linear(
            &mut list,
            "mlp.down_proj",
            hidden,
            inter,
            config.mlp_has_bias(),
        )?;
        let norm = |list: &mut ParamList, source: &mut dyn ParamSource, name: &str| {
            let tensor =
                source.take(&format!("{prefix}{name}.weight"), &[hidden], InitKind::Ones)?;
            Ok::<_, crate::Error>(list.push(&format!("{name}.weight"), tensor))
        };
        let input_norm = norm(&mut list, source, "input_layernorm")?;
        let post_attention_norm = norm(&mut list, source, "post_attention_layernorm")?;
        let mut head_norm = |list: &mut ParamList, name: &str| {
            let tensor = source.take(
                &format!("{prefix}{name}.weight"),
                &[head_dim],
                InitKind::Ones,
            )?;
            Ok::<_, crate::Error>(list.push(&format!("{name}.weight"), tensor))
        };
        let qk_norm = match config.qk_norm() {
            true => Some((
                head_norm(&mut list, "self_attn.q_norm")?,
                head_norm(&mut list, "self_attn.k_norm")?,
            )),
            false => None,
        };
        Ok(DecoderLayer {
            params: list.params,
            input_norm,
            q,
            k,
            v,
            o,
            qk_norm,
            sliding_window: config.sliding_window().map(|w| w as i64),
            post_attention_norm,
            gate,
            up,
            down,
            num_heads: config.num_attention_heads as i64,
            num_kv_heads: config.num_kv_heads() as i64,
            head_dim,
            eps: config.rms_norm_eps,
            rotary,
            index,
            quantized: Vec::new(),
            prefix: None,
            bottleneck: None,
            lora_training: Arc::new(AtomicBool::new(true)),
        })
    }

    /// y = linear `slot` of this layer applied to `x`.
    fn linear(&self, slot: LinearSlot, training: bool, x: &Tensor) -> Result<Tensor> {
        slot.apply(&self.params, &self.weight_of(slot, x.kind())?, training, x)
    }

    /// The weight of `slot` (out, in): the parameter, or the 4-bit one dequantized into
    /// `kind`.
    fn weight_of(&self, slot: LinearSlot, kind: Kind) -> Result<Tensor> {
        let Some(quantized) = slot.quant.map(|i| &self.quantized[i]) else {
            return Ok(self.params[slot.weight].tensor.shallow_clone());
        };
        let tensors: Vec<&Tensor> = quantized
            .params
            .iter()
            .map(|i| &self.params[*i].tensor)
            .collect();
        quantized.spec.dequantize(&tensors, kind)
    }

    /// Stores every linear weight in bitsandbytes' 4-bit format (QLoRA's frozen base,
    /// quantized from the weight as loaded): the weight's parameter then holds the packed
    /// codes and `{weight}.absmax` (plus `.nested_absmax`, `.nested_offset` with double
    /// quantization) follow the layer's parameters, all frozen; forward dequantizes. Call
    /// before attaching adapters.
    pub fn quantize_linears(&mut self, config: QuantConfig) -> Result<()> {
        for module in DECODER_LINEARS {
            let Some(slot) = self.slot(module).copied() else {
                continue;
            };
            if slot.quant.is_some() || slot.lora.is_some() {
                return Err(Error::Model(format!(
                    "layer {} {module}: quantize before attaching adapters, once",
                    self.index
                )));
            }
            let weight = &self.params[slot.weight];
            let (name, device) = (weight.name.clone(), weight.tensor.device());
            let (tensors, spec) = QuantizedWeight::quantize(&weight.tensor, config)?
                .to_params(weight.tensor.kind())?;
            let mut indices = Vec::new();
            for (suffix, tensor) in tensors {
                let tensor = tensor.f_to_device(device)?;
                match suffix.is_empty() {
                    true => {
                        self.params[slot.weight].tensor = tensor;
                        indices.push(slot.weight);
                    }
                    false => {
                        self.params.push(Param {
                            name: format!("{name}{suffix}"),
                            tensor,
                        });
                        indices.push(self.params.len() - 1);
                    }
                }
            }
            self.quantized.push(QuantizedLinear {
                spec,
                params: indices,
            });
            let quant = Some(self.quantized.len() - 1);
            if let Some(slot) = self.slot_mut(module) {
                slot.quant = quant;
            }
        }
        Ok(())
    }

    /// Prefix tuning (PEFT's `PrefixTuningConfig` without projection): `kv` (N, 2 * KV * D)
    /// becomes the parameter `model.layers.{i}.prefix_key_values`, N virtual positions
    /// of keys (first KV * D columns) and values (the rest) that every token attends to
    /// before its own sequence; the tokens' positions start at N. Returns its name.
    pub fn attach_prefix(&mut self, kv: Tensor) -> Result<String> {
        let width = 2 * self.num_kv_heads * self.head_dim;
        let size = kv.size();
        if size.len() != 2 || size[1] != width || size[0] == 0 || self.prefix.is_some() {
            return Err(Error::Model(format!(
                "layer {}: a prefix must be (N > 0, {width}) and attached once, got {size:?}",
                self.index
            )));
        }
        let name = format!("model.layers.{}.prefix_key_values", self.index);
        self.params.push(Param {
            name: name.clone(),
            tensor: kv,
        });
        self.prefix = Some(self.params.len() - 1);
        Ok(name)
    }

    /// Bottleneck adapters (`style`): `attention` after the attention output (Houlsby
    /// only), `output` after the MLP, their tensors becoming the params
    /// `model.layers.{i}.{attention,output}_adapters.adapters.{name}.adapter_down.0.weight`
    /// (and `.bias`, `adapter_up.weight`, `.bias`), AdapterHub's keys. Returns the names.
    pub fn attach_bottleneck(
        &mut self,
        style: BottleneckStyle,
        name: &str,
        attention: Option<BottleneckTensors>,
        output: BottleneckTensors,
    ) -> Result<Vec<String>> {
        if self.bottleneck.is_some() || attention.is_some() != (style == BottleneckStyle::DoubleSeq)
        {
            return Err(Error::Model(format!(
                "layer {}: bottleneck adapters attach once, after the attention exactly for                  double_seq_bn",
                self.index
            )));
        }
        let mut names = Vec::new();
        let mut push = |location: &str, tensors: BottleneckTensors| -> [usize; 4] {
            tensors.named().map(|(suffix, tensor)| {
                let full = format!(
                    "model.layers.{}.{location}.adapters.{name}.{suffix}",
                    self.index
                );
                names.push(full.clone());
                self.params.push(Param { name: full, tensor });
                self.params.len() - 1
            })
        };
        let attention = attention.map(|t| push("attention_adapters", t));
        let output = push("output_adapters", output);
        self.bottleneck = Some(BottleneckSlots {
            style,
            attention,
            output,
        });
        Ok(names)
    }

    /// Attention and MLP around the residual stream, with any bottleneck adapters:
    /// (B, T, H) -> (B, T, H).
    fn residual_block(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let norm = |x: &Tensor, index: usize| rms_norm(x, &self.params[index].tensor, self.eps);
        let normed = self.timed_part(x, "input_layernorm", || norm(x, self.input_norm))?;
        let attend = || self.attention(&normed, ctx, cache); // (B, T, H)
        let attended = self.timed_part(x, "self_attn", attend)?;
        let attended = match &self.bottleneck {
            Some(slots) => slots.after_attention(&self.params, attended)?,
            None => attended,
        };
        let x = x.f_add(&attended)?;
        let normed = self.timed_part(&x, "post_attention_layernorm", || {
            norm(&x, self.post_attention_norm)
        })?;
        let mlp = self.timed_part(&x, "mlp", || self.mlp(&normed))?;
        let mlp = match &self.bottleneck {
            Some(slots) => slots.after_mlp(&self.params, mlp, &x)?,
            None => mlp,
        };
        Ok(x.f_add(&mlp)?)
    }

    /// The prefix as attention keys and values, (B, KV, N, D) each, for `batch` rows.
    pub(super) fn prefix_keys_values(&self, batch: i64) -> Result<Option<(Tensor, Tensor)>> {
        let Some(index) = self.prefix else {
            return Ok(None);
        };
        let kv = &self.params[index].tensor; // (N, 2 * KV * D)
        let n = kv.size()[0];
        let split = kv
            .f_view([n, 2, self.num_kv_heads, self.head_dim])?
            .f_permute([1, 2, 0, 3])?; // (2, KV, N, D)
        let side = |i: i64| -> Result<Tensor> {
            Ok(split
                .f_select(0, i)?
                .f_unsqueeze(0)?
                .f_expand([batch, self.num_kv_heads, n, self.head_dim], false)?)
        };
        Ok(Some((side(0)?, side(1)?)))
    }

    /// The elements parameter `index` stands for: a 4-bit weight counts its full shape,
    /// its quantization state nothing (PEFT's and bitsandbytes' count).
    pub fn logical_numel(&self, index: usize) -> i64 {
        for quantized in &self.quantized {
            if quantized.params[0] == index {
                return quantized.spec.shape.iter().product();
            }
            if quantized.params.contains(&index) {
                return 0;
            }
        }
        self.params[index].tensor.numel() as i64
    }

    /// (B, T, H) -> (B, T, H): RoPE attention with GQA through SDPA. With `cache`, the
    /// keys/values of earlier positions are prepended and this call's are appended to it
    /// (the ctx's positions must continue the cached ones; no padding mask then).
    fn attention(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64| -> Result<Tensor> {
            Ok(t.f_view([batch, seq, n, self.head_dim])?
                .f_transpose(1, 2)?) // (B, n, T, D)
        };
        let training = self.lora_training.load(Ordering::Relaxed);
        let q = heads(self.linear(self.q, training, x)?, self.num_heads)?;
        let k = heads(self.linear(self.k, training, x)?, self.num_kv_heads)?;
        let (q, k) = match self.qk_norm {
            Some((q_norm, k_norm)) => (
                rms_norm(&q, &self.params[q_norm].tensor, self.eps)?, // (B, N, T, D)
                rms_norm(&k, &self.params[k_norm].tensor, self.eps)?, // (B, KV, T, D)
            ),
            None => (q, k),
        };
        let v = heads(self.linear(self.v, training, x)?, self.num_kv_heads)?;
        // A prefix sits before the sequence (in the cache when decoding, seeded there by
        // `CausalLm::forward_cached`): positions continue after it.
        let prefix = match cache.is_none() {
            true => self.prefix_keys_values(batch)?,
            false => None,
        };
        let positions = match &prefix {
            Some((pk, _)) => ctx.position_ids.f_add_scalar(pk.size()[2])?,
            None => ctx.position_ids.shallow_clone(),
        };
        let (cos, sin) = self.rotary.cos_sin(&positions, x.kind())?; // (B, T, D)
        let q = apply_rotary(&q, &cos, &sin)?;
        let k = apply_rotary(&k, &cos, &sin)?; // (B, KV, T, D)
        let (k, v, past) = match (cache, prefix) {
            (Some(cache), _) => cache.append(k, v)?, // (B, KV, P+T, D)
            (None, Some((pk, pv))) => {
                let past = pk.size()[2];
                (
                    Tensor::f_cat(&[pk, k], 2)?,
                    Tensor::f_cat(&[pv, v], 2)?,
                    past,
                )
            }
            (None, None) => (k, v, 0),
        };
        let offset_mask = match (past > 0, ctx.attention_mask.as_ref()) {
            // Every query sees the whole past, then its own mask.
            (true, Some(mask)) => {
                let size = mask.size(); // (B, 1, T, T)
                let seen =
                    Tensor::f_ones([size[0], size[1], size[2], past], (Kind::Bool, x.device()))?;
                Some(Tensor::f_cat(&[&seen, mask], 3)?) // (B, 1, T, P+T)
            }
            (true, None) if seq > 1 => Some(offset_causal_mask(seq, past, x.device())?), // (T, P+T)
            _ => None,
        };
        if let Some(window) = self.sliding_window
            && past + seq > window
        {
            return Err(Error::Config(format!(
                "model config.json key `sliding_window`: {} positions do not fit Mistral's \
                 attention window of {window}; rsdeep runs sliding-window models on sequences \
                 within the window (lower block_size / max_seq_length, or the prompt and \
                 max_new_tokens)",
                past + seq
            )));
        }
        let mask = offset_mask.as_ref().or(ctx.attention_mask.as_ref());
        // Without a mask SDPA shares each kv head across its query group itself (as HF's
        // sdpa path does): no repeated (B, N, T, D) copies and no summing them back in
        // the backward. With a mask the kv heads are repeated explicitly.
        let n_rep = self.num_heads / self.num_kv_heads;
        let native_gqa = mask.is_none() && n_rep > 1;
        let (k, v) = match native_gqa {
            true => (k, v),                                          // (B, KV, P+T, D)
            false => (repeat_kv(&k, n_rep)?, repeat_kv(&v, n_rep)?), // (B, N, P+T, D)
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let is_causal = mask.is_none() && seq > 1 && past == 0;
        let out = Tensor::f_scaled_dot_product_attention(
            &q, &k, &v, mask, 0.0, is_causal, scale, native_gqa,
        )?; // (B, N, T, D)
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([batch, seq, self.num_heads * self.head_dim])?; // (B, T, N*D)
        self.linear(self.o, training, &out)
    }

    /// One layer step with a KV cache: (B, T, H) -> (B, T, H). `ctx.position_ids` must be
    /// `past..past+T` where `past` is the cache's length.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        self.residual_block(x, ctx, Some(cache))
    }

    /// Layer index in the model.
    pub fn index(&self) -> usize {
        self.index
    }

    /// This layer's Hugging Face module path, or that of its `part` (`self_attn`).
    fn module_path(&self, part: &str) -> String {
        match part.is_empty() {
            true => format!("model.layers.{}", self.index),
            false => format!("model.layers.{}.{part}", self.index),
        }
    }

    /// Runs `forward` on `x`'s device, timed as this layer's `part` while
    /// `forward_clock` records (the whole layer for "").
    pub(super) fn timed_part<T>(
        &self,
        x: &Tensor,
        part: &str,
        forward: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        forward_clock::timed(x.device(), || self.module_path(part), forward)
    }

    fn slot(&self, module: &str) -> Option<&LinearSlot> {
        match module {
            "self_attn.q_proj" => Some(&self.q),
            "self_attn.k_proj" => Some(&self.k),
            "self_attn.v_proj" => Some(&self.v),
            "self_attn.o_proj" => Some(&self.o),
            "mlp.gate_proj" => Some(&self.gate),
            "mlp.up_proj" => Some(&self.up),
            "mlp.down_proj" => Some(&self.down),
            _ => None,
        }
    }

    fn slot_mut(&mut self, module: &str) -> Option<&mut LinearSlot> {
        match module {
            "self_attn.q_proj" => Some(&mut self.q),
            "self_attn.k_proj" => Some(&mut self.k),
            "self_attn.v_proj" => Some(&mut self.v),
            "self_attn.o_proj" => Some(&mut self.o),
            "mlp.gate_proj" => Some(&mut self.gate),
            "mlp.up_proj" => Some(&mut self.up),
            "mlp.down_proj" => Some(&mut self.down),
            _ => None,
        }
    }

    /// (out, in) of the linear `module` (one of `DECODER_LINEARS`).
    pub fn linear_shape(&self, module: &str) -> Result<(i64, i64)> {
        let slot = self
            .slot(module)
            .ok_or_else(|| Error::Model(format!("no linear layer {module}")))?;
        let size = match slot.quant {
            Some(i) => self.quantized[i].spec.shape.clone(),
            None => self.params[slot.weight].tensor.size(),
        };
        Ok((size[0], size[1]))
    }

    /// The weight (out, in) of the linear `module` (one of `DECODER_LINEARS`), in fp32
    /// (dequantized when stored in 4 bits).
    pub fn linear_weight(&self, module: &str) -> Result<Tensor> {
        let slot = self
            .slot(module)
            .copied()
            .ok_or_else(|| Error::Model(format!("no linear layer {module}")))?;
        Ok(self.weight_of(slot, Kind::Float)?.f_to_kind(Kind::Float)?)
    }

    /// Attaches a LoRA adapter to `module`: `a` (r, in), `b` (out, r) and, for DoRA, the
    /// `magnitude` (out,) become params named `model.layers.{i}.{module}.lora_A.weight` /
    /// `.lora_B.weight` / `.lora_magnitude_vector` (PEFT's saved keys without their
    /// prefix), appended after the base params. Returns their names.
    pub fn attach_lora(
        &mut self,
        module: &str,
        adapter: LoraTensors,
        scaling: f64,
        dropout: f64,
    ) -> Result<Vec<String>> {
        let (out, inp) = self.linear_shape(module)?;
        let (a_size, b_size) = (adapter.a.size(), adapter.b.size());
        let rank = a_size.first().copied().unwrap_or(0);
        let magnitude_fits = adapter.magnitude.as_ref().is_none_or(|m| m.size() == [out]);
        if a_size != [rank, inp] || b_size != [out, rank] || rank == 0 || !magnitude_fits {
            return Err(Error::Model(format!(
                "LoRA for layer {} {module}: A {a_size:?} / B {b_size:?} / magnitude {:?} do \
                 not fit a ({out}, {inp}) linear",
                self.index,
                adapter.magnitude.as_ref().map(Tensor::size)
            )));
        }
        if self.slot(module).is_some_and(|s| s.lora.is_some()) {
            return Err(Error::Model(format!(
                "layer {} {module} already has a LoRA adapter",
                self.index
            )));
        }
        let prefix = format!("model.layers.{}.{module}", self.index);
        let mut names = Vec::new();
        let mut push = |params: &mut Vec<Param>, name: String, tensor: Tensor| {
            names.push(name.clone());
            params.push(Param { name, tensor });
            params.len() - 1
        };
        let a = push(
            &mut self.params,
            format!("{prefix}.lora_A.weight"),
            adapter.a,
        );
        let b = push(
            &mut self.params,
            format!("{prefix}.lora_B.weight"),
            adapter.b,
        );
        let magnitude = adapter.magnitude.map(|m| {
            push(
                &mut self.params,
                format!("{prefix}.lora_magnitude_vector"),
                m,
            )
        });
        if let Some(slot) = self.slot_mut(module) {
            slot.lora = Some(LoraSlot {
                a,
                b,
                magnitude,
                scaling,
                dropout,
            });
        }
        Ok(names)
    }

    /// Folds every adapter into its base weight (W += scaling * B A; with DoRA
    /// W = m / |W + scaling * B A| * (W + scaling * B A) row by row) and removes the
    /// adapter params, leaving a plain layer. 4-bit weights are dequantized first (into
    /// the layer's dtype), so a QLoRA model merges into exactly the weights it trained on.
    pub fn merge_lora(&mut self) -> Result<()> {
        let kind = self.params[self.input_norm].tensor.kind();
        let mut first_extra = self.params.len();
        for module in DECODER_LINEARS {
            let Some(slot) = self.slot(module).copied() else {
                continue;
            };
            if slot.lora.is_none() && slot.quant.is_none() {
                continue;
            }
            let float = |i: usize| self.params[i].tensor.f_detach()?.f_to_kind(Kind::Float);
            let mut merged = self.weight_of(slot, Kind::Float)?.f_detach()?; // (out, in)
            if let Some(lora) = slot.lora {
                first_extra = first_extra.min(lora.a).min(lora.b);
                let delta = float(lora.b)?
                    .f_matmul(&float(lora.a)?)?
                    .f_mul_scalar(lora.scaling)?; // (out, in)
                merged = merged.f_add(&delta)?;
                if let Some(magnitude) = lora.magnitude {
                    first_extra = first_extra.min(magnitude);
                    let norms = merged.f_norm_scalaropt_dim(2.0, [1i64], true)?; // (out, 1)
                    let magnitude = float(magnitude)?.f_unsqueeze(1)?; // (out, 1)
                    merged = merged.f_mul(&magnitude.f_div(&norms)?)?;
                }
            }
            match slot.quant.map(|i| &self.quantized[i]) {
                Some(quantized) => {
                    first_extra = quantized.params[1..]
                        .iter()
                        .fold(first_extra, |m, i| m.min(*i));
                    self.params[slot.weight].tensor = merged.f_to_kind(kind)?;
                }
                None => {
                    let weight = &self.params[slot.weight].tensor;
                    let merged = merged.f_to_kind(weight.kind())?;
                    let mut target = weight.shallow_clone();
                    tch::no_grad(|| target.f_copy_(&merged))?;
                }
            }
            if let Some(slot) = self.slot_mut(module) {
                slot.lora = None;
                slot.quant = None;
            }
        }
        self.quantized.clear();
        self.params.truncate(first_extra);
        Ok(())
    }

    /// Turns LoRA dropout on (training) or off (inference).
    pub fn set_lora_training(&mut self, training: bool) {
        self.lora_training.store(training, Ordering::Relaxed);
    }

    /// Makes this layer read LoRA's training/inference state from `switch`.
    pub fn use_lora_switch(&mut self, switch: Arc<AtomicBool>) {
        self.lora_training = switch;
    }

    /// (B, T, H) -> (B, T, H): down(silu(gate(x)) * up(x)).
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let training = self.lora_training.load(Ordering::Relaxed);
        let gated = self.linear(self.gate, training, x)?.f_silu()?; // (B, T, I)
        let hidden = gated.f_mul(&self.linear(self.up, training, x)?)?;
        self.linear(self.down, training, &hidden)
    }
}

/// One decoder layer's cached keys (after RoPE) and values, (B, KV, P, D) each.
#[derive(Default)]
pub struct LayerKv {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl LayerKv {
    /// Starts an empty cache with `keys` and `values` (B, KV, P, D): a layer's prefix.
    pub(super) fn seed(&mut self, keys: Tensor, values: Tensor) -> Result<()> {
        self.keys = Some(keys.f_detach()?);
        self.values = Some(values.f_detach()?);
        Ok(())
    }

    /// Number of cached positions P.
    pub fn len(&self) -> i64 {
        self.keys.as_ref().map_or(0, |k| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends (B, KV, T, D) keys/values; returns the full (B, KV, P+T, D) pair and P.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor, i64)> {
        let past = self.len();
        let (k, v) = match (&self.keys, &self.values) {
            (Some(pk), Some(pv)) => (Tensor::f_cat(&[pk, &k], 2)?, Tensor::f_cat(&[pv, &v], 2)?),
            _ => (k, v),
        };
        self.keys = Some(k.f_detach()?);
        self.values = Some(v.f_detach()?);
        Ok((k, v, past))
    }
}

/// (T, P+T) boolean mask: query i (absolute position P+i) may see keys 0..=P+i.
fn offset_causal_mask(seq: i64, past: i64, device: tch::Device) -> Result<Tensor> {
    let ones = Tensor::f_ones([seq, past + seq], (Kind::Bool, device))?;
    Ok(ones.f_tril(past)?)
}

/// (B, KV, T, D) -> (B, KV * n_rep, T, D), each kv head repeated n_rep times in place.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.shallow_clone());
    }
    let size = x.size(); // [B, KV, T, D]
    let (b, kv, t, d) = (size[0], size[1], size[2], size[3]);
    Ok(x.f_unsqueeze(2)?
        .f_expand([b, kv, n_rep, t, d], false)?
        .f_reshape([b, kv * n_rep, t, d])?)
}

impl Block for DecoderLayer {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn as_decoder_layer(&self) -> Option<&DecoderLayer> {
        Some(self)
    }

    fn as_decoder_layer_mut(&mut self) -> Option<&mut DecoderLayer> {
        Some(self)
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.timed_part(x, "", || self.residual_block(x, ctx, None))
    }
}

/// Final RMSNorm + lm_head: (B, T, H) -> logits (B, T, V). With tied embeddings the
/// head multiplies by the embedding matrix, which it holds but does not list in `params`.
pub struct Head {
    params: Vec<Param>,
    /// The embedding's tensor handle when tied.
    tied_weight: Option<Tensor>,
    pub(super) eps: f64,
}

impl Head {
    pub const NORM: &'static str = "model.norm.weight";
    pub const LM_HEAD: &'static str = "lm_head.weight";
    /// The Hugging Face module paths of the head's two parts (`forward_clock`).
    pub const NORM_MODULE: &'static str = "model.norm";
    pub const LM_HEAD_MODULE: &'static str = "lm_head";

    /// `tied_weight`: the embedding's weight handle when `tie_word_embeddings`.
    pub fn new(
        config: &ModelConfig,
        tied_weight: Option<Tensor>,
        source: &mut dyn ParamSource,
    ) -> Result<Self> {
        let hidden = config.hidden_size as i64;
        let mut params = vec![Param {
            name: Self::NORM.to_string(),
            tensor: source.take(Self::NORM, &[hidden], InitKind::Ones)?,
        }];
        if tied_weight.is_none() {
            let shape = [config.vocab_size as i64, hidden];
            params.push(Param {
                name: Self::LM_HEAD.to_string(),
                tensor: source.take(Self::LM_HEAD, &shape, InitKind::Normal)?,
            });
        }
        Ok(Head {
            params,
            tied_weight,
            eps: config.rms_norm_eps,
        })
    }

    pub fn is_tied(&self) -> bool {
        self.tied_weight.is_some()
    }

    fn lm_head_weight(&self) -> &Tensor {
        match &self.tied_weight {
            Some(weight) => weight,
            None => &self.params[1].tensor,
        }
    }
}

impl Block for Head {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn as_head(&self) -> Option<&Head> {
        Some(self)
    }

    fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> Result<Tensor> {
        let device = x.device();
        let norm = || rms_norm(x, &self.params[0].tensor, self.eps); // (B, T, H)
        let normed = forward_clock::timed(device, || Self::NORM_MODULE.into(), norm)?;
        let project = || Ok(normed.f_linear::<&Tensor>(self.lm_head_weight(), None)?); // (B, T, V)
        forward_clock::timed(device, || Self::LM_HEAD_MODULE.into(), project)
    }
}
