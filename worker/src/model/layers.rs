//! The three block kinds of a Qwen2 / Llama causal LM — `Embedding`, `DecoderLayer`,
//! `Head` — implementing the `Block` contract of `model/mod.rs`, plus the functional
//! pieces they share (RMSNorm, linear, SwiGLU, attention). Numerics follow transformers
//! 5.x `modeling_qwen2.py` / `modeling_llama.py` with the SDPA attention backend. Weights
//! are read from the `Param` tensors at every forward (the engine swaps their storage).

use super::config::ModelConfig;
use super::rope::{Rotary, apply_rotary};
use super::{Block, ForwardCtx, Param};
use crate::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// HF RMSNorm: normalise in fp32, cast back to the input dtype, then scale by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let input_kind = x.kind();
    let x32 = x.f_to_kind(Kind::Float)?; // (B, T, H)
    let variance = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?; // (B, T, 1)
    let normed = x32.f_mul(&variance.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(weight.f_mul(&normed.f_to_kind(input_kind)?)?)
}

/// Indices of a linear layer's weight and optional bias inside a block's `params`.
#[derive(Clone, Copy)]
struct LinearSlot {
    weight: usize,
    bias: Option<usize>,
}

impl LinearSlot {
    fn apply(&self, params: &[Param], x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.map(|i| &params[i].tensor);
        Ok(x.f_linear(&params[self.weight].tensor, bias)?)
    }
}

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
        LinearSlot { weight, bias }
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
        Ok(Tensor::f_embedding(
            weight,
            ids,
            self.padding_idx,
            false,
            false,
        )?) // (B, T, H)
    }
}

/// One transformer layer: pre-norm attention and pre-norm SwiGLU MLP, both residual.
pub struct DecoderLayer {
    params: Vec<Param>,
    input_norm: usize,
    q: LinearSlot,
    k: LinearSlot,
    v: LinearSlot,
    o: LinearSlot,
    post_attention_norm: usize,
    gate: LinearSlot,
    up: LinearSlot,
    down: LinearSlot,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    eps: f64,
    rotary: Arc<Rotary>,
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
        Ok(DecoderLayer {
            params: list.params,
            input_norm,
            q,
            k,
            v,
            o,
            post_attention_norm,
            gate,
            up,
            down,
            num_heads: config.num_attention_heads as i64,
            num_kv_heads: config.num_kv_heads() as i64,
            head_dim,
            eps: config.rms_norm_eps,
            rotary,
        })
    }

    /// (B, T, H) -> (B, T, H): RoPE attention with GQA through SDPA.
    fn attention(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64| -> Result<Tensor> {
            Ok(t.f_view([batch, seq, n, self.head_dim])?
                .f_transpose(1, 2)?) // (B, n, T, D)
        };
        let q = heads(self.q.apply(&self.params, x)?, self.num_heads)?;
        let k = heads(self.k.apply(&self.params, x)?, self.num_kv_heads)?;
        let v = heads(self.v.apply(&self.params, x)?, self.num_kv_heads)?;
        let (cos, sin) = self.rotary.cos_sin(&ctx.position_ids, x.kind())?; // (B, T, D)
        let q = apply_rotary(&q, &cos, &sin)?;
        let k = repeat_kv(
            &apply_rotary(&k, &cos, &sin)?,
            self.num_heads / self.num_kv_heads,
        )?;
        let v = repeat_kv(&v, self.num_heads / self.num_kv_heads)?; // (B, N, T, D)
        let scale = (self.head_dim as f64).powf(-0.5);
        let is_causal = ctx.attention_mask.is_none() && seq > 1;
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            ctx.attention_mask.as_ref(),
            0.0,
            is_causal,
            scale,
            false,
        )?; // (B, N, T, D)
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([batch, seq, self.num_heads * self.head_dim])?; // (B, T, N*D)
        self.o.apply(&self.params, &out)
    }

    /// (B, T, H) -> (B, T, H): down(silu(gate(x)) * up(x)).
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let gated = self.gate.apply(&self.params, x)?.f_silu()?; // (B, T, I)
        let hidden = gated.f_mul(&self.up.apply(&self.params, x)?)?;
        self.down.apply(&self.params, &hidden)
    }
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

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let normed = rms_norm(x, &self.params[self.input_norm].tensor, self.eps)?;
        let x = x.f_add(&self.attention(&normed, ctx)?)?; // (B, T, H)
        let normed = rms_norm(&x, &self.params[self.post_attention_norm].tensor, self.eps)?;
        Ok(x.f_add(&self.mlp(&normed)?)?)
    }
}

/// Final RMSNorm + lm_head: (B, T, H) -> logits (B, T, V). With tied embeddings the
/// head multiplies by the embedding matrix, which it holds but does not list in `params`.
pub struct Head {
    params: Vec<Param>,
    /// The embedding's tensor handle when tied.
    tied_weight: Option<Tensor>,
    eps: f64,
}

impl Head {
    pub const NORM: &'static str = "model.norm.weight";
    pub const LM_HEAD: &'static str = "lm_head.weight";

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

    fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> Result<Tensor> {
        let normed = rms_norm(x, &self.params[0].tensor, self.eps)?; // (B, T, H)
        Ok(normed.f_linear::<&Tensor>(self.lm_head_weight(), None)?) // (B, T, V)
    }
}
