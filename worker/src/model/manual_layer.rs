//! The training hot path of a decoder layer: forward that saves exactly what its backward
//! needs, and a hand-written backward, instead of tch autograd. Same math as
//! `DecoderLayer::forward` (HF's `Qwen2DecoderLayer`, SDPA attention), but the
//! elementwise parts run as single-pass fused kernels (`crate::kernels`: RMSNorm, rotary,
//! SwiGLU), the residual adds ride in the `addmm`s, attention calls libtorch's CPU flash
//! kernels directly (with GQA, saving only the output and its log-sum-exp), and no graph
//! is built. It applies to plain causal training on the CPU in fp32 without LoRA and
//! without Qwen3's per-head query/key norms (`manual_applies`); the engine (`zero/engine.rs`) falls back to autograd otherwise.
//! Tests below compare output and every gradient with autograd within 1e-5.
//! Measurements: docs/benchmarks.md §1e.

use super::layers::LinearSlot;
use super::{DecoderLayer, ForwardCtx};
use crate::kernels;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// What `backward_manual` needs from one `forward_manual`: row-major (M, ·) tensors with
/// M = B * T rows.
pub struct LayerSaved {
    /// (B, T, H) shape of the layer's input and output.
    shape: [i64; 3],
    /// (M, H) layer input, its inverse RMS (M,) and normalised form.
    input: Tensor,
    inv_rms_in: Tensor,
    normed_in: Tensor,
    /// (M, D) rotary cos/sin of every row.
    cos: Tensor,
    sin: Tensor,
    /// (M, N*D) rotated queries, (M, KV*D) rotated keys and values.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// (M, N*D) attention output by rows (the input of `o_proj`) and its (B, N, T)
    /// log-sum-exp.
    attn_rows: Tensor,
    lse: Tensor,
    /// (M, H) residual stream after attention, its inverse RMS and normalised form.
    mid: Tensor,
    inv_rms_mid: Tensor,
    normed_mid: Tensor,
    /// (M, I) gate and up projections, sigmoid(gate), silu(gate) * up.
    gate: Tensor,
    up: Tensor,
    sigmoid: Tensor,
    act: Tensor,
}

/// What the attention part of `forward_manual` computed: rows of (M, ·) as in
/// `LayerSaved`, `mid` the residual stream after attention.
struct ManualAttention {
    cos: Tensor,
    sin: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_rows: Tensor,
    lse: Tensor,
    mid: Tensor,
}

/// What the MLP part of `forward_manual` computed: (M, I) gate, up, sigmoid(gate),
/// silu(gate) * up, and the (M, H) layer output.
struct ManualMlp {
    gate: Tensor,
    up: Tensor,
    sigmoid: Tensor,
    act: Tensor,
    out: Tensor,
}

impl DecoderLayer {
    /// Whether `forward_manual` / `backward_manual` can train this layer on `x` (B, T, H):
    /// fp32 CPU tensors, no LoRA adapter, 4-bit weight or prefix, plain causal attention
    /// (no mask), T > 1.
    pub fn manual_applies(&self, x: &Tensor, ctx: &ForwardCtx) -> bool {
        let size = x.size();
        let slots = [
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
        ];
        ctx.attention_mask.is_none()
            && size.len() == 3
            && size[1] > 1
            && x.device() == tch::Device::Cpu
            && x.kind() == Kind::Float
            && slots.iter().all(|s| s.lora.is_none() && s.quant.is_none())
            && self.prefix.is_none()
            && self.bottleneck.is_none()
            && self.qk_norm.is_none()
            && self.sliding_window.is_none_or(|window| size[1] <= window)
            && self.params.iter().all(|p| kernels::applies(&p.tensor))
    }

    fn weight(&self, slot: LinearSlot) -> &Tensor {
        &self.params[slot.weight].tensor
    }

    /// x W^T + b for (M, in) `x`.
    fn project(&self, slot: LinearSlot, x: &Tensor) -> Result<Tensor> {
        let bias = slot.bias.map(|i| &self.params[i].tensor);
        Ok(x.f_linear(self.weight(slot), bias)?)
    }

    /// residual + x W^T (+ b), the residual add riding in the matrix product.
    fn project_onto(&self, slot: LinearSlot, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        let out = residual.f_addmm(x, &self.weight(slot).f_transpose(0, 1)?)?;
        match slot.bias {
            Some(b) => Ok(out.f_add(&self.params[b].tensor)?),
            None => Ok(out),
        }
    }

    /// Forward of (B, T, H) `x` without autograd; returns the (B, T, H) output and what the
    /// backward needs. Call only when `manual_applies`. Timed per part while
    /// `forward_clock` records.
    pub fn forward_manual(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<(Tensor, LayerSaved)> {
        self.timed_part(x, "", || self.forward_manual_untimed(x, ctx))
    }

    fn forward_manual_untimed(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<(Tensor, LayerSaved)> {
        let _guard = tch::no_grad_guard();
        let size = x.size();
        let shape = [size[0], size[1], size[2]];
        let rows = shape[0] * shape[1];
        let input = x.f_detach()?.f_reshape([rows, shape[2]])?.f_contiguous()?; // (M, H)
        let in_norm = &self.params[self.input_norm].tensor;
        let (normed_in, inv_rms_in) = self.timed_part(x, "input_layernorm", || {
            kernels::rms_norm_forward(&input, in_norm, self.eps) // (M, H), (M,)
        })?;
        let attended = self.timed_part(x, "self_attn", || {
            self.manual_attention(&input, &normed_in, ctx, shape)
        })?;
        let mid_norm = &self.params[self.post_attention_norm].tensor;
        let (normed_mid, inv_rms_mid) = self.timed_part(x, "post_attention_layernorm", || {
            kernels::rms_norm_forward(&attended.mid, mid_norm, self.eps) // (M, H), (M,)
        })?;
        let mlp = self.timed_part(x, "mlp", || self.manual_mlp(&attended.mid, &normed_mid))?;
        let ManualAttention {
            cos,
            sin,
            q,
            k,
            v,
            attn_rows,
            lse,
            mid,
        } = attended;
        let saved = LayerSaved {
            shape,
            input,
            inv_rms_in,
            normed_in,
            cos,
            sin,
            q,
            k,
            v,
            attn_rows,
            lse,
            mid,
            inv_rms_mid,
            normed_mid,
            gate: mlp.gate,
            up: mlp.up,
            sigmoid: mlp.sigmoid,
            act: mlp.act,
        };
        Ok((mlp.out.f_view(shape)?, saved))
    }

    /// Rotary q/k/v, flash attention and `o_proj` onto the residual `input` (M, H).
    fn manual_attention(
        &self,
        input: &Tensor,
        normed_in: &Tensor,
        ctx: &ForwardCtx,
        shape: [i64; 3],
    ) -> Result<ManualAttention> {
        let rows = shape[0] * shape[1];
        let (heads, kv_heads, dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (cos, sin) = self.rotary.cos_sin(&ctx.position_ids, Kind::Float)?; // (B, T, D)
        let cos = cos.f_reshape([rows, dim])?.f_contiguous()?; // (M, D)
        let sin = sin.f_reshape([rows, dim])?.f_contiguous()?;
        let mut q = self.project(self.q, normed_in)?; // (M, N*D)
        let mut k = self.project(self.k, normed_in)?; // (M, KV*D)
        let v = self.project(self.v, normed_in)?;
        kernels::rotary_in_place(&mut q, &cos, &sin, heads as usize, dim as usize, false)?;
        kernels::rotary_in_place(&mut k, &cos, &sin, kv_heads as usize, dim as usize, false)?;
        let (attn, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
            &by_heads(&q, shape, heads, dim)?,
            &by_heads(&k, shape, kv_heads, dim)?,
            &by_heads(&v, shape, kv_heads, dim)?,
            0.0,
            true,
            None::<&Tensor>,
            self.attention_scale(),
        )?; // (B, N, T, D), (B, N, T)
        let attn_rows = by_rows(&attn, rows)?; // (M, N*D)
        let mid = self.project_onto(self.o, input, &attn_rows)?; // (M, H)
        Ok(ManualAttention {
            cos,
            sin,
            q,
            k,
            v,
            attn_rows,
            lse,
            mid,
        })
    }

    /// The SwiGLU MLP of `normed_mid` (M, H) onto the residual `mid` (M, H).
    fn manual_mlp(&self, mid: &Tensor, normed_mid: &Tensor) -> Result<ManualMlp> {
        let gate = self.project(self.gate, normed_mid)?; // (M, I)
        let up = self.project(self.up, normed_mid)?;
        let (act, sigmoid) = kernels::swiglu_forward(&gate, &up)?;
        let out = self.project_onto(self.down, mid, &act)?; // (M, H)
        Ok(ManualMlp {
            gate,
            up,
            sigmoid,
            act,
            out,
        })
    }

    fn attention_scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// Gradients of `<forward(x), grad_out>` from what `forward_manual` saved: returns
    /// d/dx (B, T, H) and d/d(param) for each of `params()`, in order.
    pub fn backward_manual(
        &self,
        saved: LayerSaved,
        grad_out: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let _guard = tch::no_grad_guard();
        let s = saved;
        let rows = s.shape[0] * s.shape[1];
        let (heads, kv_heads, dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut grads: Vec<Tensor> = self.params.iter().map(|_| Tensor::new()).collect();
        let dy = grad_out.f_reshape([rows, s.shape[2]])?.f_contiguous()?; // (M, H)
        // MLP: out = mid + act Wd^T.
        let d_act = self.linear_backward(self.down, &dy, &s.act, &mut grads)?; // (M, I)
        let (d_gate, d_up) = kernels::swiglu_backward(&d_act, &s.gate, &s.up, &s.sigmoid)?;
        let mut d_normed_mid =
            self.linear_backward(self.gate, &d_gate, &s.normed_mid, &mut grads)?;
        let d_up_input = self.linear_backward(self.up, &d_up, &s.normed_mid, &mut grads)?;
        let _ = d_normed_mid.f_add_(&d_up_input)?; // (M, H)
        let mid_norm = &self.params[self.post_attention_norm].tensor;
        let (d_mid, d_mid_norm) =
            kernels::rms_norm_backward(&d_normed_mid, &s.mid, mid_norm, &s.inv_rms_mid, Some(&dy))?;
        grads[self.post_attention_norm] = d_mid_norm;
        // Attention: mid = input + attn_rows Wo^T.
        let d_attn_rows = self.linear_backward(self.o, &d_mid, &s.attn_rows, &mut grads)?;
        let (d_q, d_k, d_v) =
            Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
                &by_heads(&d_attn_rows, s.shape, heads, dim)?,
                &by_heads(&s.q, s.shape, heads, dim)?,
                &by_heads(&s.k, s.shape, kv_heads, dim)?,
                &by_heads(&s.v, s.shape, kv_heads, dim)?,
                &by_heads(&s.attn_rows, s.shape, heads, dim)?,
                &s.lse,
                0.0,
                true,
                None::<&Tensor>,
                self.attention_scale(),
            )?; // (B, N, T, D), (B, KV, T, D) x 2
        let mut d_q = by_rows(&d_q, rows)?; // (M, N*D)
        let mut d_k = by_rows(&d_k, rows)?; // (M, KV*D)
        let d_v = by_rows(&d_v, rows)?;
        kernels::rotary_in_place(&mut d_q, &s.cos, &s.sin, heads as usize, dim as usize, true)?;
        kernels::rotary_in_place(
            &mut d_k,
            &s.cos,
            &s.sin,
            kv_heads as usize,
            dim as usize,
            true,
        )?;
        let mut d_normed_in = self.linear_backward(self.q, &d_q, &s.normed_in, &mut grads)?;
        let d_from_k = self.linear_backward(self.k, &d_k, &s.normed_in, &mut grads)?;
        let d_from_v = self.linear_backward(self.v, &d_v, &s.normed_in, &mut grads)?;
        let _ = d_normed_in.f_add_(&d_from_k)?.f_add_(&d_from_v)?; // (M, H)
        let in_norm = &self.params[self.input_norm].tensor;
        let (d_input, d_in_norm) = kernels::rms_norm_backward(
            &d_normed_in,
            &s.input,
            in_norm,
            &s.inv_rms_in,
            Some(&d_mid),
        )?;
        grads[self.input_norm] = d_in_norm;
        Ok((d_input.f_view(s.shape)?, grads))
    }

    /// Backward of y = x W^T + b for the cotangent `dy` (M, out): stores dW = dy^T x and db =
    /// sum of dy's rows in `grads`, returns dx = dy W (M, in).
    fn linear_backward(
        &self,
        slot: LinearSlot,
        dy: &Tensor,
        x: &Tensor,
        grads: &mut [Tensor],
    ) -> Result<Tensor> {
        grads[slot.weight] = dy.f_transpose(0, 1)?.f_mm(x)?; // (out, in)
        if let Some(b) = slot.bias {
            grads[b] = dy.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Float)?; // (out,)
        }
        Ok(dy.f_mm(self.weight(slot))?)
    }
}

/// (M, n*D) rows -> (B, n, T, D) view for the attention kernels.
fn by_heads(x: &Tensor, shape: [i64; 3], heads: i64, dim: i64) -> Result<Tensor> {
    Ok(x.f_view([shape[0], shape[1], heads, dim])?
        .f_transpose(1, 2)?)
}

/// (B, n, T, D) -> contiguous (M, n*D) rows (a view when the kernel laid the result out
/// (B, T, n, D), as libtorch's CPU flash attention does).
fn by_rows(x: &Tensor, rows: i64) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 {
        return Err(Error::Model(format!(
            "attention result {size:?} is not 4-d"
        )));
    }
    Ok(x.f_transpose(1, 2)?
        .f_reshape([rows, size[1] * size[3]])?
        .f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::super::{Block, CausalLm, ModelConfig};
    use super::*;
    use tch::Device;

    /// A one-layer model: qwen2 (q/k/v biases) or llama (no biases), GQA 4 -> 2 heads.
    fn tiny_model(model_type: &str) -> CausalLm {
        let text = format!(
            r#"{{"model_type": "{model_type}", "hidden_size": 32, "intermediate_size": 48,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
            "vocab_size": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 64}}"#
        );
        let config = ModelConfig::from_json_str(&text).expect("tiny config parses");
        CausalLm::from_config(config, Device::Cpu, Kind::Float, 11).expect("tiny model")
    }

    fn layer_of(model: &CausalLm) -> &DecoderLayer {
        model.blocks[1]
            .as_decoder_layer()
            .expect("block 1 is a decoder layer")
    }

    /// Output and all gradients of the manual path against autograd through
    /// `DecoderLayer::forward`.
    fn check_against_autograd(model_type: &str) {
        tch::manual_seed(12);
        let model = tiny_model(model_type);
        let layer = layer_of(&model);
        // Non-trivial norm weights and biases (they start at ones and zeros).
        tch::no_grad(|| {
            for p in layer.params() {
                let noise = Tensor::randn_like(&p.tensor) * 0.1;
                let _ = p.tensor.shallow_clone().f_add_(&noise);
            }
        });
        let (batch, seq) = (2, 7);
        let ids = Tensor::zeros([batch, seq], (Kind::Int64, Device::Cpu));
        let ctx = ForwardCtx::causal(&ids).expect("ctx");
        let x = Tensor::randn([batch, seq, 32], (Kind::Float, Device::Cpu));
        assert!(layer.manual_applies(&x, &ctx));
        let grad_out = Tensor::randn([batch, seq, 32], (Kind::Float, Device::Cpu));

        let leaf = x.copy().set_requires_grad(true);
        let mut wrt = vec![leaf.shallow_clone()];
        for p in layer.params() {
            wrt.push(p.tensor.shallow_clone().set_requires_grad(true));
        }
        let reference = layer.forward(&leaf, &ctx).expect("forward");
        let root = (&reference * &grad_out).sum(Kind::Float);
        let expected = Tensor::run_backward(&[root], &wrt, false, false);

        let (out, saved) = layer.forward_manual(&x, &ctx).expect("manual forward");
        let (d_input, grads) = layer
            .backward_manual(saved, &grad_out)
            .expect("manual backward");
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            let diff = (got - want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]).max(1.0);
            assert!(
                diff <= 1e-5 * scale,
                "{what}: max diff {diff} (scale {scale})"
            );
        };
        close(&out, &reference.detach(), "output");
        close(&d_input, &expected[0], "d input");
        assert_eq!(grads.len(), layer.params().len());
        for ((grad, want), p) in grads.iter().zip(&expected[1..]).zip(layer.params()) {
            close(grad, want, &p.name);
        }
    }

    #[test]
    fn manual_layer_equals_autograd_with_qkv_bias() {
        check_against_autograd("qwen2");
    }

    #[test]
    fn manual_layer_equals_autograd_without_bias() {
        check_against_autograd("llama");
    }

    #[test]
    fn manual_path_does_not_apply_with_a_mask_or_in_double() {
        let model = tiny_model("qwen2");
        let layer = layer_of(&model);
        let ids = Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu));
        let x = Tensor::randn([1, 4, 32], (Kind::Float, Device::Cpu));
        let mut ctx = ForwardCtx::causal(&ids).expect("ctx");
        assert!(layer.manual_applies(&x, &ctx));
        assert!(!layer.manual_applies(&x.to_kind(Kind::Double), &ctx));
        ctx.attention_mask = Some(Tensor::ones([1, 1, 4, 4], (Kind::Bool, Device::Cpu)));
        assert!(!layer.manual_applies(&x, &ctx));
    }
}
