//! The training hot path of the head: final RMSNorm + `lm_head` + HF's causal-LM
//! cross-entropy (labels shifted by one, `IGNORE_INDEX` skipped, mean over the rest), with
//! the loss and the gradients computed in one pass over row chunks of the logits instead
//! of materialising (B*T, V) logits, a log-softmax and its backward. Per chunk of rows:
//! logits = h W^T, lse, loss, p = softmax - onehot, dh = p W, dW += p^T h. Equal to
//! `Head::forward` + `causal_lm_loss` + autograd within fp32 rounding (tests below;
//! `worker/tests/zero_equivalence.rs` runs it through the engine). fp32 and an untied
//! head only; the engine (`zero/engine.rs`, `forward_backward_causal_lm`) falls back to
//! the generic path otherwise. Issue 5 (docs/benchmarks.md).

use super::ctx::shifted_labels;
use super::{Block, Head, IGNORE_INDEX, rms_norm};
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// Rows of logits computed at once: (ROWS, V) fp32 stays near the L2 cache for an 8k
/// vocabulary, and the matrix products stay large enough to run at full speed.
const CHUNK_ROWS: i64 = 256;

/// What the fused head computed for one micro-batch.
pub struct FusedHeadOutput {
    /// Mean loss over the counted tokens (unscaled), as `causal_lm_loss` returns it.
    pub loss: f64,
    /// d(scale * loss)/d(input): (B, T, H).
    pub grad_input: Tensor,
    /// d(scale * loss)/d(param) for each of the head's `params()`, in order.
    pub param_grads: Vec<Tensor>,
}

impl Head {
    /// Whether `fused_loss_backward` can run for this head and `labels` (B, T): fp32
    /// weights, an untied `lm_head`, and at least one counted token.
    pub fn fused_loss_applies(&self, labels: &Tensor) -> Result<bool> {
        if self.is_tied() || self.params().len() != 2 {
            return Ok(false);
        }
        if self.params().iter().any(|p| p.tensor.kind() != Kind::Float) {
            return Ok(false);
        }
        let shifted = shifted_labels(labels)?;
        Ok(shifted.f_ne(IGNORE_INDEX)?.f_any()?.f_int64_value(&[])? != 0)
    }

    /// Loss and gradients of `scale * causal_lm_loss(self.forward(x), labels)` for the
    /// (B, T, H) input `x` (a grad-requiring leaf) and its (B, T) labels.
    pub fn fused_loss_backward(
        &self,
        x: &Tensor,
        labels: &Tensor,
        scale: f64,
    ) -> Result<FusedHeadOutput> {
        let size = x.size();
        if size.len() != 3 || labels.size() != size[..2] {
            return Err(Error::Model(format!(
                "fused head wants input (B, T, H) and labels (B, T), got {size:?} and {:?}",
                labels.size()
            )));
        }
        let (norm_weight, lm_head) = (&self.params()[0].tensor, &self.params()[1].tensor);
        let normed = rms_norm(x, norm_weight, self.eps)?; // (B, T, H), with graph
        let hidden = normed.f_detach()?.f_reshape([-1, size[2]])?; // (N, H)
        let targets = shifted_labels(labels)?.f_to_device(x.device())?; // (N,)
        let counted = targets.f_ne(IGNORE_INDEX)?; // (N,) bool
        let count = counted.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if count == 0 {
            return Err(Error::Model("fused head: no counted token".into()));
        }
        let weight = lm_head.f_detach()?; // (V, H)
        let (loss_sum, grad_hidden, grad_weight) = tch::no_grad(|| {
            chunked_cross_entropy(&hidden, &weight, &targets, &counted, scale / count as f64)
        })?;
        // Backward through the norm: d/dx and d/d(norm weight) of <normed, grad_hidden>.
        let root = normed
            .f_mul(&grad_hidden.f_view(size.as_slice())?)?
            .f_sum(Kind::Float)?;
        let mut grads = Tensor::f_run_backward(&[root], &[x, norm_weight], false, false)?;
        let grad_norm = grads.pop().unwrap_or_else(Tensor::new);
        let grad_input = grads.pop().unwrap_or_else(Tensor::new);
        Ok(FusedHeadOutput {
            loss: loss_sum / count as f64,
            grad_input,
            param_grads: vec![grad_norm, grad_weight],
        })
    }
}

/// Over row chunks of `hidden` (N, H) and `weight` (V, H): the summed cross-entropy of
/// the counted rows, d/d(hidden) (N, H) and d/d(weight) (V, H) of `grad_scale` times
/// that sum (rows not counted get zero gradient).
fn chunked_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    counted: &Tensor,
    grad_scale: f64,
) -> Result<(f64, Tensor, Tensor)> {
    let rows = hidden.size()[0];
    let grad_hidden = hidden.f_empty_like()?; // (N, H)
    let mut grad_weight = weight.f_zeros_like()?; // (V, H)
    let safe_targets = targets.f_clamp_min(0)?.f_unsqueeze(1)?; // (N, 1)
    let weights = counted.f_to_kind(Kind::Float)?.f_unsqueeze(1)?; // (N, 1) 1 or 0
    let mut loss_sum = 0f64;
    let mut start = 0i64;
    while start < rows {
        let len = CHUNK_ROWS.min(rows - start);
        let h = hidden.f_narrow(0, start, len)?; // (c, H)
        let target = safe_targets.f_narrow(0, start, len)?; // (c, 1)
        let row_weight = weights.f_narrow(0, start, len)?; // (c, 1)
        let mut logits = h.f_linear::<&Tensor>(weight, None)?; // (c, V)
        let lse = logits.f_logsumexp(&[1i64][..], true)?; // (c, 1)
        let picked = logits.f_gather(1, &target, false)?; // (c, 1)
        let row_loss = lse.f_sub(&picked)?.f_mul(&row_weight)?; // (c, 1)
        loss_sum += row_loss.f_sum(Kind::Double)?.f_double_value(&[])?;
        // p = softmax(logits) - onehot(target), on counted rows, times grad_scale
        let _ = logits.f_sub_(&lse)?.f_exp_()?;
        let _ = logits.f_scatter_add_(1, &target, &row_weight.f_neg()?)?;
        let _ = logits.f_mul_(&row_weight.f_mul_scalar(grad_scale)?)?;
        let mut dh = grad_hidden.f_narrow(0, start, len)?;
        dh.f_copy_(&logits.f_mm(weight)?)?; // (c, H)
        let _ = grad_weight.f_addmm_(&logits.f_transpose(0, 1)?, &h)?; // (V, H)
        start += len;
    }
    Ok((loss_sum, grad_hidden, grad_weight))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CausalLm, ForwardCtx};
    use crate::model::{ModelConfig, ModelType, causal_lm_loss};
    use tch::Device;

    fn tiny_model(tied: bool) -> CausalLm {
        // vocab 96, hidden 32, intermediate 48, 2 layers, 4 heads, 2 kv heads
        let mut config = ModelConfig::new(ModelType::Qwen2, 96, 32, 48, 2, 4, 2);
        config.tie_word_embeddings = tied;
        config.initializer_range = 0.05;
        CausalLm::from_config(config, Device::Cpu, Kind::Float, 3).unwrap()
    }

    /// The head's input, a grad-requiring leaf (B, T, H), and labels with ignored tokens.
    fn inputs(hidden: i64, vocab: i64) -> (Tensor, Tensor) {
        let x = Tensor::randn([3, 300, hidden], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let labels = Tensor::randint(vocab, [3, 300], (Kind::Int64, Device::Cpu));
        let _ = labels.narrow(1, 10, 20).fill_(IGNORE_INDEX);
        (x, labels)
    }

    #[test]
    fn fused_head_equals_head_forward_then_loss_then_autograd() {
        tch::manual_seed(5);
        let model = tiny_model(false);
        let head = model.blocks.last().unwrap();
        let head: &Head = head.as_head().expect("last block is the head");
        let hidden = model.config.hidden_size as i64;
        let (x, labels) = inputs(hidden, model.config.vocab_size as i64);
        assert!(head.fused_loss_applies(&labels).unwrap());
        let scale = 0.5;
        let fused = head.fused_loss_backward(&x, &labels, scale).unwrap();

        let ids = Tensor::zeros([3, 300], (Kind::Int64, Device::Cpu));
        let ctx = ForwardCtx::build(&ids, None, None).unwrap();
        let logits = head.forward(&x, &ctx).unwrap();
        let loss = causal_lm_loss(&logits, &labels).unwrap();
        let mut wrt = vec![x.shallow_clone()];
        wrt.extend(head.params().iter().map(|p| p.tensor.shallow_clone()));
        let expected = Tensor::run_backward(&[loss.shallow_clone() * scale], &wrt, false, false);
        assert!(
            (fused.loss - loss.double_value(&[])).abs() < 1e-5,
            "loss {} vs {}",
            fused.loss,
            loss.double_value(&[])
        );
        let got = std::iter::once(&fused.grad_input).chain(&fused.param_grads);
        for (i, (g, e)) in got.zip(&expected).enumerate() {
            let diff = (g - e).abs().max().double_value(&[]);
            let size = e.abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5 * size.max(1e-3),
                "grad {i}: max diff {diff} (max {size})"
            );
        }
    }

    #[test]
    fn fused_head_refuses_tied_heads_and_all_ignored_labels() {
        let tied = tiny_model(true);
        let head = tied.blocks.last().unwrap().as_head().unwrap();
        let labels = Tensor::ones([2, 8], (Kind::Int64, Device::Cpu));
        assert!(!head.fused_loss_applies(&labels).unwrap());
        let untied = tiny_model(false);
        let head = untied.blocks.last().unwrap().as_head().unwrap();
        assert!(head.fused_loss_applies(&labels).unwrap());
        let ignored = Tensor::full([2, 8], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        assert!(!head.fused_loss_applies(&ignored).unwrap());
    }
}
