//! Building a `ForwardCtx` (position ids + optional boolean attention mask) from a batch,
//! and the causal-LM loss. Semantics follow transformers 5.x: positions are `arange(T)`
//! unless sequences are packed (then they restart per segment, as HF infers packing from
//! position ids); padding/packing masks are causal AND key-is-valid AND same-segment.

use super::ForwardCtx;
use crate::{Error, Result};
use tch::{Kind, Reduction, Tensor};

/// Label value that the loss ignores (HF's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

impl ForwardCtx {
    /// Plain causal attention over `ids` (B, T): positions 0..T, no mask (flash-eligible).
    pub fn causal(ids: &Tensor) -> Result<ForwardCtx> {
        Self::build(ids, None, None)
    }

    /// Context for `ids` (B, T) with an optional padding mask (B, T) (nonzero = real
    /// token) and optional packed-sequence segment ids (B, T) (tokens attend only within
    /// their segment; positions restart at 0 per segment). Without padding (or with an
    /// all-ones mask) and without segments the mask is `None`, so SDPA runs `is_causal`.
    /// Like transformers, a padding query that sees no real key keeps an all-false row;
    /// torch's SDPA (>= 2.5) returns zeros there, exactly as HF gets (its logits still
    /// enter the loss when the next label is real, e.g. the last left-padding position).
    pub fn build(
        ids: &Tensor,
        padding_mask: Option<&Tensor>,
        segment_ids: Option<&Tensor>,
    ) -> Result<ForwardCtx> {
        let size = ids.size();
        if size.len() != 2 {
            return Err(Error::Model(format!(
                "input ids must be (B, T), got {size:?}"
            )));
        }
        let (batch, seq) = (size[0], size[1]);
        let device = ids.device();
        for (what, t) in [("padding mask", padding_mask), ("segment ids", segment_ids)] {
            if let Some(t) = t
                && t.size() != size
            {
                return Err(Error::Model(format!(
                    "{what} shape {:?} differs from input ids {size:?}",
                    t.size()
                )));
            }
        }
        let steps = Tensor::f_arange(seq, (Kind::Int64, device))?; // (T,)
        let position_ids = match segment_ids {
            Some(segments) => restart_positions(&segments.f_to_device(device)?, &steps)?,
            None => steps
                .f_unsqueeze(0)?
                .f_expand([batch, seq], false)?
                .f_contiguous()?,
        }; // (B, T)
        let padding = match padding_mask {
            Some(mask) => {
                let valid = mask.f_to_device(device)?.f_ne(0)?; // (B, T) bool
                let all_valid = valid.f_all()?.f_int64_value(&[])? != 0;
                (!all_valid).then_some(valid)
            }
            None => None,
        };
        if padding.is_none() && segment_ids.is_none() {
            return Ok(ForwardCtx {
                position_ids,
                attention_mask: None,
            });
        }
        let causal = Tensor::f_ones([seq, seq], (Kind::Bool, device))?.f_tril(0)?; // (T, T)
        let mut mask = causal.f_unsqueeze(0)?.f_unsqueeze(0)?; // (1, 1, T, T)
        if let Some(valid) = &padding {
            mask = mask.f_logical_and(&valid.f_unsqueeze(1)?.f_unsqueeze(1)?)?; // (B, 1, T, T)
        }
        if let Some(segments) = segment_ids {
            let segments = segments.f_to_device(device)?;
            let same = segments
                .f_unsqueeze(2)?
                .f_eq_tensor(&segments.f_unsqueeze(1)?)?; // (B, T, T)
            mask = mask.f_logical_and(&same.f_unsqueeze(1)?)?;
        }
        let mask = mask.f_expand([batch, 1, seq, seq], false)?.f_contiguous()?; // (B, 1, T, T)
        Ok(ForwardCtx {
            position_ids,
            attention_mask: Some(mask),
        })
    }
}

/// Positions that restart at 0 wherever the segment id changes: (B, T) -> (B, T).
fn restart_positions(segments: &Tensor, steps: &Tensor) -> Result<Tensor> {
    let seq = steps.size()[0];
    let previous = segments.f_narrow(1, 0, seq - 1)?;
    let current = segments.f_narrow(1, 1, seq - 1)?;
    let first = Tensor::f_ones([segments.size()[0], 1], (Kind::Bool, segments.device()))?;
    let starts = Tensor::f_cat(&[first, current.f_ne_tensor(&previous)?], 1)?; // (B, T)
    let start_index = steps.f_unsqueeze(0)?.f_mul(&starts)?; // index where a start, else 0
    let (segment_start, _) = start_index.f_cummax(1)?; // (B, T)
    Ok(steps.f_unsqueeze(0)?.f_sub(&segment_start)?)
}

/// HF causal-LM loss: logits (B, T, V) predict labels shifted by one; `IGNORE_INDEX`
/// labels are skipped; mean over the rest; computed in fp32 whatever the logits' dtype.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (logits, shifted) = flat_logits_and_shifted_labels(logits, labels)?;
    Ok(
        logits.f_cross_entropy_loss::<Tensor>(
            &shifted,
            None,
            Reduction::Mean,
            IGNORE_INDEX,
            0.0,
        )?,
    )
}

/// HF's loss when the Trainer passes `num_items_in_batch` (gradient accumulation): the
/// summed token loss of this micro-batch divided by the token count of the whole
/// accumulated batch (sum of `count_loss_tokens` over its micro-batches).
pub fn causal_lm_loss_over(
    logits: &Tensor,
    labels: &Tensor,
    num_items_in_batch: f64,
) -> Result<Tensor> {
    let (logits, shifted) = flat_logits_and_shifted_labels(logits, labels)?;
    let summed =
        logits.f_cross_entropy_loss::<Tensor>(&shifted, None, Reduction::Sum, IGNORE_INDEX, 0.0)?;
    Ok(summed.f_div_scalar(num_items_in_batch)?)
}

/// How many tokens of `labels` (B, T) enter the loss (shifted labels != IGNORE_INDEX):
/// a 0-dim int64 tensor on the labels' device.
pub fn count_loss_tokens(labels: &Tensor) -> Result<Tensor> {
    let seq = labels.size().get(1).copied().unwrap_or(0);
    if seq < 2 {
        return Ok(Tensor::f_zeros([], (Kind::Int64, labels.device()))?);
    }
    let next = labels.f_narrow(1, 1, seq - 1)?;
    Ok(next.f_ne(IGNORE_INDEX)?.f_sum(Kind::Int64)?)
}

/// (B*T, V) fp32 logits and (B*T,) labels shifted left by one, IGNORE_INDEX at the end.
fn flat_logits_and_shifted_labels(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let size = logits.size();
    if size.len() != 3 || labels.size() != size[..2] {
        return Err(Error::Model(format!(
            "loss wants logits (B, T, V) and labels (B, T), got {size:?} and {:?}",
            labels.size()
        )));
    }
    let vocab = size[2];
    let logits = logits.f_to_kind(Kind::Float)?.f_reshape([-1, vocab])?; // (B*T, V)
    let shifted = shifted_labels(&labels.f_to_device(logits.device())?)?;
    Ok((logits, shifted))
}

/// The targets of every position, flattened: labels[:, 1:] followed by one IGNORE_INDEX
/// column, (B, T) -> (B*T,) int64.
pub(super) fn shifted_labels(labels: &Tensor) -> Result<Tensor> {
    let size = labels.size();
    if size.len() != 2 {
        return Err(Error::Model(format!("labels must be (B, T), got {size:?}")));
    }
    let labels = labels.f_to_kind(Kind::Int64)?;
    let tail = Tensor::f_full([size[0], 1], IGNORE_INDEX, (Kind::Int64, labels.device()))?;
    let shifted = Tensor::f_cat(&[labels.f_narrow(1, 1, size[1] - 1)?, tail], 1)?; // (B, T)
    Ok(shifted.f_reshape([-1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn ids(b: i64, t: i64) -> Tensor {
        Tensor::arange(b * t, (Kind::Int64, Device::Cpu)).reshape([b, t])
    }

    #[test]
    fn loss_ignores_minus_100_and_shifts() {
        // V = 3; logits favour class 2 at t=0 and class 0 at t=1.
        let logits = Tensor::from_slice(&[0.0f32, 0.0, 5.0, 5.0, 0.0, 0.0, 1.0, 2.0, 3.0])
            .reshape([1, 3, 3]);
        let labels = Tensor::from_slice(&[7i64, 2, IGNORE_INDEX]).reshape([1, 3]);
        // Only position 0 (predicting label[1] = 2) counts.
        let loss = causal_lm_loss(&logits, &labels).unwrap().double_value(&[]);
        let expected = -(5f64.exp() / (2.0 + 5f64.exp())).ln();
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        let labels = Tensor::from_slice(&[7i64, 2, 0]).reshape([1, 3]);
        let loss2 = causal_lm_loss(&logits, &labels).unwrap().double_value(&[]);
        let second = -(5f64.exp() / (2.0 + 5f64.exp())).ln();
        assert!((loss2 - (expected + second) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn summed_loss_over_accumulated_token_count_equals_global_mean() {
        let logits = Tensor::from_slice(&[
            0.3f32, -1.0, 2.0, 0.5, 0.1, 0.7, -0.2, 0.9, 0.0, 1.5, 0.4, -0.6,
        ])
        .reshape([2, 2, 3]);
        let labels = Tensor::from_slice(&[0i64, 2, 1, 1]).reshape([2, 2]);
        let labels_b = Tensor::from_slice(&[0i64, IGNORE_INDEX, 1, 0]).reshape([2, 2]);
        let count_a = count_loss_tokens(&labels).unwrap().int64_value(&[]);
        let count_b = count_loss_tokens(&labels_b).unwrap().int64_value(&[]);
        assert_eq!((count_a, count_b), (2, 1));
        let total = (count_a + count_b) as f64;
        let accumulated = causal_lm_loss_over(&logits, &labels, total).unwrap()
            + causal_lm_loss_over(&logits, &labels_b, total).unwrap();
        let both = causal_lm_loss(
            &Tensor::cat(&[&logits, &logits], 0),
            &Tensor::cat(&[&labels, &labels_b], 0),
        )
        .unwrap();
        assert!((accumulated - both).abs().double_value(&[]) < 1e-6);
    }

    #[test]
    fn loss_upcasts_half_logits_and_rejects_bad_shapes() {
        let logits = Tensor::zeros([2, 4, 8], (Kind::BFloat16, Device::Cpu));
        let labels = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
        let loss = causal_lm_loss(&logits, &labels).unwrap();
        assert_eq!(loss.kind(), Kind::Float);
        assert!((loss.double_value(&[]) - 8f64.ln()).abs() < 1e-6);
        assert!(causal_lm_loss(&logits, &labels.narrow(1, 0, 3)).is_err());
    }

    #[test]
    fn no_padding_means_no_mask() {
        let ctx = ForwardCtx::build(
            &ids(2, 5),
            Some(&Tensor::ones([2, 5], (Kind::Int64, Device::Cpu))),
            None,
        )
        .unwrap();
        assert!(ctx.attention_mask.is_none());
        assert_eq!(
            Vec::<i64>::try_from(ctx.position_ids.get(1)).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn padding_mask_is_causal_and_hides_padded_keys() {
        let pad = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1, 1, 0]).reshape([2, 4]);
        let ctx = ForwardCtx::build(&ids(2, 4), Some(&pad), None).unwrap();
        let mask = ctx.attention_mask.unwrap();
        assert_eq!(mask.size(), vec![2, 1, 4, 4]);
        let at = |b, q, k| mask.int64_value(&[b, 0, q, k]) != 0;
        assert!(!at(0, 2, 0), "left padding key hidden");
        assert!(at(0, 2, 1) && at(0, 2, 2) && !at(0, 2, 3), "causal");
        assert!(
            !at(0, 0, 0),
            "a fully padded row stays empty, as in transformers"
        );
        assert!(
            at(1, 3, 0) && !at(1, 3, 3),
            "padded query sees real keys only"
        );
        assert!(!at(1, 2, 3), "right-padding key hidden");
    }

    #[test]
    fn segments_restart_positions_and_block_cross_attention() {
        let segments = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 2]).reshape([1, 6]);
        let ctx = ForwardCtx::build(&ids(1, 6), None, Some(&segments)).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(ctx.position_ids.reshape([-1])).unwrap(),
            vec![0, 1, 2, 0, 1, 0]
        );
        let mask = ctx.attention_mask.unwrap();
        let at = |q, k| mask.int64_value(&[0, 0, q, k]) != 0;
        assert!(at(2, 0) && !at(3, 2) && at(4, 3) && !at(5, 4) && at(5, 5));
    }
}
