//! The training hot path of the head: final RMSNorm + `lm_head` + HF's causal-LM
//! cross-entropy (labels shifted by one, `IGNORE_INDEX` skipped, mean over the rest), with
//! the loss and the gradients computed in one pass over row chunks of the logits instead
//! of materialising (B*T, V) logits, a log-softmax and its backward. Per chunk of rows:
//! logits = h W^T, lse, loss, p = softmax - onehot, dh = p W, dW += p^T h. Equal to
//! `Head::forward` + `causal_lm_loss` + autograd within fp32 rounding (tests below;
//! `worker/tests/zero_equivalence.rs` runs it through the engine). fp32 and an untied
//! head only; the engine (`zero/engine.rs`, `forward_backward_causal_lm`) falls back to
//! the generic path otherwise. Measurements: docs/benchmarks.md §1b-§1d.

use super::ctx::shifted_labels;
use super::forward_clock;
use super::{Block, Head, IGNORE_INDEX, rms_norm};
use crate::kernels;
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
        let rows = x.f_detach()?.f_reshape([-1, size[2]])?; // (N, H)
        // The final norm by the fused CPU kernel when it can, else through autograd.
        let by_kernel = kernels::applies(&rows) && kernels::applies(norm_weight);
        let lap = forward_clock::lap(x.device());
        let (normed, inv_rms) = match by_kernel {
            true => kernels::rms_norm_forward(&rows, norm_weight, self.eps)?,
            false => (rms_norm(x, norm_weight, self.eps)?, Tensor::new()), // with graph
        };
        forward_clock::record(lap, || Self::NORM_MODULE.into());
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
        let (grad_input, grad_norm) = if by_kernel {
            let (dx, dw) =
                kernels::rms_norm_backward(&grad_hidden, &rows, norm_weight, &inv_rms, None)?;
            (dx.f_view(size.as_slice())?, dw)
        } else {
            let root = normed
                .f_mul(&grad_hidden.f_view(size.as_slice())?)?
                .f_sum(Kind::Float)?;
            let mut grads = Tensor::f_run_backward(&[root], &[x, norm_weight], false, false)?;
            let grad_norm = grads.pop().unwrap_or_else(Tensor::new);
            (grads.pop().unwrap_or_else(Tensor::new), grad_norm)
        };
        Ok(FusedHeadOutput {
            loss: loss_sum / count as f64,
            grad_input,
            param_grads: vec![grad_norm, grad_weight],
        })
    }
}

/// Columns of the vocabulary multiplied at once. One (256, 8192) product runs at ~40
/// GFLOP/s on one core here, eight (256, 1024) tiles at ~55, so the head multiplies tile
/// by tile and keeps each (rows, VOCAB_TILE) logits tile contiguous (docs/benchmarks.md
/// §1d).
const VOCAB_TILE: i64 = 1024;

/// The vocabulary split into tiles of at most `VOCAB_TILE` rows of `weight`: (start, len).
fn vocab_tiles(vocab: i64) -> Vec<(i64, i64)> {
    (0..vocab)
        .step_by(VOCAB_TILE as usize)
        .map(|start| (start, VOCAB_TILE.min(vocab - start)))
        .collect()
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
    let vocab = weight.size()[0];
    let tiles = vocab_tiles(vocab);
    let weight_tiles = tiles
        .iter()
        .map(|&(start, len)| weight.f_narrow(0, start, len)) // (v, H)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let grad_hidden = hidden.f_empty_like()?; // (N, H)
    let grad_weight = weight.f_zeros_like()?; // (V, H)
    let safe_targets = targets.f_clamp_min(0)?; // (N,)
    let weights = counted.f_to_kind(Kind::Float)?; // (N,) 1 or 0
    let mut loss_sum = 0f64;
    let mut start = 0i64;
    while start < rows {
        let len = CHUNK_ROWS.min(rows - start);
        let h = hidden.f_narrow(0, start, len)?; // (c, H)
        let target = safe_targets.f_narrow(0, start, len)?; // (c,)
        let row_weight = weights.f_narrow(0, start, len)?; // (c,)
        // The (c, V) logits as tiles (c, v) laid back to back in one buffer.
        let logits = Tensor::f_empty([len * vocab], (Kind::Float, hidden.device()))?;
        let logit_tiles = tiles
            .iter()
            .map(|&(first, cols)| {
                logits
                    .f_narrow(0, len * first, len * cols)?
                    .f_view([len, cols])
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // The lm_head's forward, chunk by chunk (timed while `forward_clock` records).
        let lap = forward_clock::lap(hidden.device());
        for (tile, w) in logit_tiles.iter().zip(&weight_tiles) {
            let _ = h.f_mm_out(tile, &w.f_transpose(0, 1)?)?; // (c, v)
        }
        forward_clock::accumulate(lap, Head::LM_HEAD_MODULE);
        let target_at = target_positions(&target, len, vocab)?; // (c,) into `logits`
        let picked = logits.f_gather(0, &target_at, false)?; // (c,)
        let mut row_max = logit_tiles[0].f_amax([1i64].as_slice(), false)?; // (c,)
        for tile in &logit_tiles[1..] {
            row_max = row_max.f_maximum(&tile.f_amax([1i64].as_slice(), false)?)?;
        }
        // exp(logits - max) in place, and its row sums.
        let column_max = row_max.f_unsqueeze(1)?; // (c, 1)
        let mut row_sum = Tensor::f_zeros([len], (Kind::Float, hidden.device()))?; // (c,)
        for tile in &logit_tiles {
            let _ = tile.shallow_clone().f_sub_(&column_max)?.f_exp_()?;
            row_sum =
                row_sum.f_add(&tile.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?)?;
        }
        let lse = row_max.f_add(&row_sum.f_log()?)?; // (c,)
        let row_loss = lse.f_sub(&picked)?.f_mul(&row_weight)?; // (c,)
        loss_sum += row_loss.f_sum(Kind::Double)?.f_double_value(&[])?;
        // p = (softmax(logits) - onehot(target)) * grad_scale, on counted rows only.
        let row_scale = row_weight.f_mul_scalar(grad_scale)?; // (c,)
        let softmax_scale = row_scale.f_div(&row_sum)?.f_unsqueeze(1)?; // (c, 1)
        for tile in &logit_tiles {
            let _ = tile.shallow_clone().f_mul_(&softmax_scale)?;
        }
        let _ = logits
            .shallow_clone()
            .f_scatter_add_(0, &target_at, &row_scale.f_neg()?)?;
        // dh = p W over the tiles; dW[tile] += p[tile]^T h.
        let dh = grad_hidden.f_narrow(0, start, len)?; // (c, H)
        for (i, (tile, w)) in logit_tiles.iter().zip(&weight_tiles).enumerate() {
            let _ = match i {
                0 => tile.f_mm_out(&dh, w)?,
                _ => dh.shallow_clone().f_addmm_(tile, w)?,
            };
        }
        for (tile, &(first, cols)) in logit_tiles.iter().zip(&tiles) {
            let _ = grad_weight
                .f_narrow(0, first, cols)?
                .f_addmm_(&tile.f_transpose(0, 1)?, &h)?; // (v, H)
        }
        start += len;
    }
    Ok((loss_sum, grad_hidden, grad_weight))
}

/// Where each row's target logit sits in the tiled logits buffer of `rows` rows: tile
/// `t / VOCAB_TILE` starts at `rows * tile_start`, and holds the row's logits at
/// `row * tile_len + t % VOCAB_TILE`. `target` (rows,) int64 in [0, vocab).
fn target_positions(target: &Tensor, rows: i64, vocab: i64) -> Result<Tensor> {
    let tile_start = target
        .f_floor_divide_scalar(VOCAB_TILE)?
        .f_mul_scalar(VOCAB_TILE)?; // (c,)
    let column = target.f_sub(&tile_start)?;
    let tile_len = tile_start
        .f_neg()?
        .f_add_scalar(vocab)?
        .f_clamp_max(VOCAB_TILE)?;
    let row = Tensor::f_arange(rows, (Kind::Int64, target.device()))?;
    Ok(tile_start
        .f_mul_scalar(rows)?
        .f_add(&row.f_mul(&tile_len)?)?
        .f_add(&column)?)
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

    /// Several vocabulary tiles, the last one partial, and ignored rows: the tiled loss
    /// and gradients equal log-softmax cross-entropy and autograd.
    #[test]
    fn tiled_cross_entropy_equals_autograd_over_several_tiles() {
        tch::manual_seed(9);
        let (rows, hidden_size, vocab) = (300, 16, 2 * VOCAB_TILE + 452);
        let opts = (Kind::Float, Device::Cpu);
        let hidden = Tensor::randn([rows, hidden_size], opts).set_requires_grad(true);
        let weight = (Tensor::randn([vocab, hidden_size], opts) * 0.3).set_requires_grad(true);
        let targets = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
        let _ = targets.narrow(0, 5, 40).fill_(IGNORE_INDEX);
        let _ = targets.narrow(0, 50, 3).fill_(vocab - 1); // the partial tile's last column
        let counted = targets.ne(IGNORE_INDEX);
        let scale = 0.25;
        let (loss, grad_hidden, grad_weight) = tch::no_grad(|| {
            chunked_cross_entropy(
                &hidden.detach(),
                &weight.detach(),
                &targets,
                &counted,
                scale,
            )
        })
        .unwrap();

        let logits = hidden.mm(&weight.tr()); // (N, V)
        let expected = logits.cross_entropy_loss::<Tensor>(
            &targets,
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        );
        let grads = Tensor::run_backward(&[&expected * scale], &[&hidden, &weight], false, false);
        let expected_loss = expected.double_value(&[]);
        assert!(
            (loss - expected_loss).abs() <= 1e-5 * expected_loss.abs(),
            "loss {loss} vs {expected_loss}"
        );
        for (name, got, want) in [
            ("d hidden", &grad_hidden, &grads[0]),
            ("d weight", &grad_weight, &grads[1]),
        ] {
            let diff = (got - want).abs().max().double_value(&[]);
            let size = want.abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * size, "{name}: max diff {diff} (max {size})");
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
