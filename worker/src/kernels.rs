//! Fused fp32 CPU kernels for the training hot path: RMSNorm forward/backward, rotary
//! embedding (and its transpose), SwiGLU forward/backward and one AdamW update, each a
//! single pass over rows instead of the four to eight aten passes (and temporaries) the
//! same math costs through autograd. Used by the manual decoder-layer path
//! (`model/manual_layer.rs`) and by `zero/adamw.rs`; both fall back to aten ops for any
//! tensor that is not contiguous fp32 on the CPU (`applies`). The math is Hugging Face's
//! (`modeling_qwen2.py`) and `torch.optim.AdamW`'s; tests below check every kernel
//! against the aten formula. This is the only module besides `comm::nccl` with `unsafe`:
//! it views tensor storage as slices (see `SAFETY` notes). Measurements:
//! docs/benchmarks.md §1e.

use crate::{Error, Result};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// Whether `t` can go through these kernels: contiguous fp32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

fn check(t: &Tensor, what: &str, numel: usize) -> Result<()> {
    if !applies(t) || t.numel() != numel {
        return Err(Error::Model(format!(
            "kernel input {what}: want {numel} contiguous fp32 CPU elements, got {:?} {:?} on {:?}",
            t.size(),
            t.kind(),
            t.device()
        )));
    }
    Ok(())
}

/// The elements of `t` as a slice (`t` checked by `check` first).
fn view<'a>(t: &'a Tensor, what: &str, numel: usize) -> Result<&'a [f32]> {
    check(t, what, numel)?;
    if numel == 0 {
        return Ok(&[]);
    }
    // SAFETY: `check` proved `t` is a contiguous fp32 CPU tensor of `numel` elements, so
    // its data pointer addresses `numel` initialised, aligned f32s. The storage lives at
    // least as long as the borrow of `t`; the kernels only read it while no kernel output
    // aliases it (outputs are fresh tensors or `&mut` handles, see `view_mut`).
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, numel) })
}

/// The elements of `t` as a mutable slice (`t` checked by `check` first).
fn view_mut<'a>(t: &'a mut Tensor, what: &str, numel: usize) -> Result<&'a mut [f32]> {
    check(t, what, numel)?;
    if numel == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `view`; in addition the `&mut Tensor` borrow guarantees no other
    // Rust reference to this handle exists, and every caller passes a tensor it created
    // itself (a fresh allocation or the output of an out-of-place op), so no other
    // handle shares the storage while the slice is alive.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, numel) })
}

/// A fresh (rows, cols) fp32 CPU tensor.
fn empty(rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::f_empty(
        [rows as i64, cols as i64],
        (Kind::Float, Device::Cpu),
    )?)
}

/// Rows per thread: everything on one thread unless the work is large and libtorch was
/// given several intra-op threads (the same budget aten's own kernels would use).
fn row_ranges(rows: usize, cols: usize) -> Vec<Range<usize>> {
    let threads = (tch::get_num_threads().max(1) as usize).min(rows.max(1));
    let threads = if rows * cols < (1 << 16) { 1 } else { threads };
    let per = rows.div_ceil(threads.max(1)).max(1);
    (0..rows)
        .step_by(per)
        .map(|start| start..(start + per).min(rows))
        .collect()
}

/// Runs `f(rows, out_chunk)` over `out` (rows x cols) split by `row_ranges`, one scoped
/// thread per range beyond the first; returns each call's result in order.
fn par_rows<R: Send>(
    out: &mut [f32],
    rows: usize,
    cols: usize,
    f: impl Fn(Range<usize>, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    let ranges = row_ranges(rows, cols);
    if ranges.len() <= 1 {
        return vec![f(0..rows, out)];
    }
    let mut chunks = Vec::with_capacity(ranges.len());
    let mut rest = out;
    for range in &ranges {
        let (head, tail) = rest.split_at_mut(range.len() * cols);
        chunks.push(head);
        rest = tail;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .into_iter()
            .zip(chunks)
            .map(|(range, chunk)| scope.spawn(|| f(range, chunk)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Sum of `a[i] * b[i]` with eight independent accumulators (vectorisable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// HF RMSNorm over the last dim of `x` (rows, H): y = w * x * r with r = 1/sqrt(mean(x^2)
/// + eps). Returns y (rows, H) and r (rows,), which the backward needs.
pub fn rms_norm_forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let hidden = weight.numel();
    let rows = x.numel() / hidden.max(1);
    let xs = view(x, "rms_norm x", rows * hidden)?;
    let w = view(weight, "rms_norm weight", hidden)?;
    let mut y = empty(rows, hidden)?;
    let mut inv = Tensor::f_empty([rows as i64], (Kind::Float, Device::Cpu))?;
    let inv_all = view_mut(&mut inv, "rms_norm r", rows)?;
    let ys = view_mut(&mut y, "rms_norm y", rows * hidden)?;
    let parts = par_rows(ys, rows, hidden, |range, out| {
        let mut r_part = Vec::with_capacity(range.len());
        for (i, row) in range.enumerate() {
            let xr = &xs[row * hidden..(row + 1) * hidden];
            let r = 1.0 / ((dot(xr, xr) / hidden as f32) + eps as f32).sqrt();
            let yr = &mut out[i * hidden..(i + 1) * hidden];
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *o = wv * (xv * r);
            }
            r_part.push(r);
        }
        r_part
    });
    for (slot, r) in inv_all.iter_mut().zip(parts.into_iter().flatten()) {
        *slot = r;
    }
    Ok((y, inv))
}

/// Backward of `rms_norm_forward` for the cotangent `dy` (rows, H): returns
/// dx = r * (dn - n * mean(dn * n)) with n = x * r, dn = dy * w, plus `residual` when
/// given (the gradient flowing around the norm through a skip connection), and
/// dw = sum over rows of dy * n.
pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    inv_rms: &Tensor,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let hidden = weight.numel();
    let rows = x.numel() / hidden.max(1);
    let (n_all, h) = (rows * hidden, hidden);
    let dys = view(dy, "rms_norm dy", n_all)?;
    let xs = view(x, "rms_norm x", n_all)?;
    let w = view(weight, "rms_norm weight", h)?;
    let rs = view(inv_rms, "rms_norm r", rows)?;
    let res = residual
        .map(|t| view(t, "rms_norm residual", n_all))
        .transpose()?;
    let mut dx = empty(rows, h)?;
    let dxs = view_mut(&mut dx, "rms_norm dx", n_all)?;
    let partial_dw = par_rows(dxs, rows, h, |range, out| {
        let mut dw = vec![0f32; h];
        let mut dn = vec![0f32; h];
        for (i, row) in range.enumerate() {
            let span = row * h..(row + 1) * h;
            let (xr, dyr, r) = (&xs[span.clone()], &dys[span.clone()], rs[row]);
            for j in 0..h {
                dn[j] = dyr[j] * w[j];
                dw[j] += dyr[j] * (xr[j] * r);
            }
            // mean(dn * n) = r * mean(dn * x)
            let mean = r * dot(&dn, xr) / h as f32;
            let o = &mut out[i * h..(i + 1) * h];
            for j in 0..h {
                o[j] = r * (dn[j] - xr[j] * r * mean);
            }
            if let Some(res) = res {
                for (oj, rj) in o.iter_mut().zip(&res[span]) {
                    *oj += rj;
                }
            }
        }
        dw
    });
    let mut dweight = Tensor::f_zeros([h as i64], (Kind::Float, Device::Cpu))?;
    let dws = view_mut(&mut dweight, "rms_norm dw", h)?;
    for part in partial_dw {
        for (a, b) in dws.iter_mut().zip(part) {
            *a += b;
        }
    }
    Ok((dx, dweight))
}

/// HF rotary embedding in place on `x` (rows, heads * D), rows = B*T in (b, t) order, for
/// the (rows, D) `cos`/`sin` of each row: x' = x * cos + rotate_half(x) * sin, where
/// rotate_half(x) = (-x[D/2..], x[..D/2]). With `transpose` it applies the transposed
/// map instead (the backward: x * cos - rotate_half^T(x * sin)).
pub fn rotary_in_place(
    x: &mut Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    dim: usize,
    transpose: bool,
) -> Result<()> {
    if !dim.is_multiple_of(2) || dim == 0 || heads == 0 {
        return Err(Error::Model(format!(
            "rotary over {heads} heads of dim {dim}: want an even, non-zero head dim"
        )));
    }
    let rows = x.numel() / (heads * dim);
    let half = dim / 2;
    let cs = view(cos, "rotary cos", rows * dim)?;
    let ss = view(sin, "rotary sin", rows * dim)?;
    let xs = view_mut(x, "rotary x", rows * heads * dim)?;
    par_rows(xs, rows, heads * dim, |range, out| {
        for (i, row) in range.enumerate() {
            let (c, s) = (
                &cs[row * dim..(row + 1) * dim],
                &ss[row * dim..(row + 1) * dim],
            );
            for head in out[i * heads * dim..(i + 1) * heads * dim].chunks_exact_mut(dim) {
                let (lo, hi) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (lo[j], hi[j]);
                    if transpose {
                        lo[j] = a * c[j] + b * s[j + half];
                        hi[j] = b * c[j + half] - a * s[j];
                    } else {
                        lo[j] = a * c[j] - b * s[j];
                        hi[j] = b * c[j + half] + a * s[j + half];
                    }
                }
            }
        }
    });
    Ok(())
}

/// SwiGLU: silu(gate) * up for (rows, I) `gate`/`up`. Returns the product and
/// sigmoid(gate), which the backward needs.
pub fn swiglu_forward(gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let sigmoid = gate.f_sigmoid()?; // one vectorised aten pass (exp)
    let (rows, cols) = rows_and_cols(gate);
    let n = rows * cols;
    let (g, u, sg) = (
        view(gate, "swiglu gate", n)?,
        view(up, "swiglu up", n)?,
        view(&sigmoid, "swiglu sigmoid", n)?,
    );
    let mut out = empty(rows, cols)?;
    let os = view_mut(&mut out, "swiglu out", n)?;
    fill_elementwise(os, rows, cols, |i| g[i] * sg[i] * u[i]);
    Ok((out, sigmoid))
}

/// Backward of `swiglu_forward` for the cotangent `dout`: d gate = dout * up * s * (1 +
/// gate * (1 - s)), d up = dout * gate * s, with s = sigmoid(gate). Returns both.
pub fn swiglu_backward(
    dout: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    sigmoid: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = rows_and_cols(gate);
    let n = rows * cols;
    let (d, g, u, sg) = (
        view(dout, "swiglu dout", n)?,
        view(gate, "swiglu gate", n)?,
        view(up, "swiglu up", n)?,
        view(sigmoid, "swiglu sigmoid", n)?,
    );
    let mut dgate = empty(rows, cols)?;
    let mut dup = empty(rows, cols)?;
    let dus = view_mut(&mut dup, "swiglu dup", n)?;
    fill_elementwise(dus, rows, cols, |i| d[i] * g[i] * sg[i]);
    let dgs = view_mut(&mut dgate, "swiglu dgate", n)?;
    fill_elementwise(dgs, rows, cols, |i| {
        d[i] * u[i] * sg[i] * (1.0 + g[i] * (1.0 - sg[i]))
    });
    Ok((dgate, dup))
}

/// (rows, cols) of `t` seen as a matrix over its last dimension.
fn rows_and_cols(t: &Tensor) -> (usize, usize) {
    let cols = t.size().last().copied().unwrap_or(1).max(1) as usize;
    (t.numel() / cols, cols)
}

/// out[i] = value(i) for every element of the (rows, cols) `out`, split over threads by
/// rows like every kernel here.
fn fill_elementwise(
    out: &mut [f32],
    rows: usize,
    cols: usize,
    value: impl Fn(usize) -> f32 + Sync,
) {
    par_rows(out, rows, cols, |range, chunk| {
        for (offset, o) in chunk.iter_mut().enumerate() {
            *o = value(range.start * cols + offset);
        }
    });
}

/// The scalars of one AdamW update (`zero/adamw.rs` computes them from the config).
#[derive(Clone, Copy, Debug)]
pub struct AdamCoefficients {
    pub beta1: f32,
    pub beta2: f32,
    /// 1 - beta1 and 1 - beta2, rounded once from f64 as aten rounds its scalars.
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// `1 - lr * weight_decay` for decoupled decay, 1 otherwise.
    pub decay_factor: f32,
    /// `weight_decay` for Adam's L2 decay (g += wd * p), 0 otherwise.
    pub l2: f32,
    /// lr / bias_correction1.
    pub step_size: f32,
    /// sqrt(bias_correction2).
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

/// One AdamW update in a single pass over the (P,) fp32 `master`, `grad`, `exp_avg`,
/// `exp_avg_sq` (the same arithmetic, in the same order, as the aten formula in
/// `zero/adamw.rs`).
pub fn adamw_in_place(
    master: &mut Tensor,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    c: AdamCoefficients,
) -> Result<()> {
    let n = master.numel();
    let g = view(grad, "adam grad", n)?;
    let p = view_mut(master, "adam master", n)?;
    let m = view_mut(exp_avg, "adam exp_avg", n)?;
    let v = view_mut(exp_avg_sq, "adam exp_avg_sq", n)?;
    let (one_minus_b1, one_minus_b2) = (c.one_minus_beta1, c.one_minus_beta2);
    for i in 0..n {
        let gi = g[i] + c.l2 * p[i];
        let pi = p[i] * c.decay_factor;
        let mi = m[i] * c.beta1 + gi * one_minus_b1;
        let vi = v[i] * c.beta2 + gi * gi * one_minus_b2;
        let denom = vi.sqrt() / c.bias_correction2_sqrt + c.eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - mi / denom * c.step_size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]).max(1.0);
        assert!(diff <= tol * scale, "max diff {diff} (scale {scale})");
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn rms_norm_matches_aten_forward_and_autograd() {
        tch::manual_seed(3);
        let (rows, h) = (37, 24);
        let x = randn(&[rows, h]).set_requires_grad(true);
        let w = (randn(&[h]) * 0.3 + 1.0).set_requires_grad(true);
        let reference = crate::model::rms_norm(&x, &w, 1e-6).unwrap();
        let dy = randn(&[rows, h]);
        let residual = randn(&[rows, h]);
        let grads = Tensor::run_backward(
            &[(&reference * &dy).sum(Kind::Float)],
            &[&x, &w],
            false,
            false,
        );
        let (y, r) = rms_norm_forward(&x.detach(), &w.detach(), 1e-6).unwrap();
        close(&y, &reference.detach(), 1e-6);
        let (dx, dw) =
            rms_norm_backward(&dy, &x.detach(), &w.detach(), &r, Some(&residual)).unwrap();
        close(&dx, &(&grads[0] + &residual), 1e-5);
        close(&dw, &grads[1], 1e-5);
    }

    #[test]
    fn rotary_matches_apply_rotary_and_its_transpose_inverts_it() {
        tch::manual_seed(4);
        let (rows, heads, dim) = (10, 3, 8);
        let angles = randn(&[rows, dim / 2]);
        let emb = Tensor::cat(&[&angles, &angles], -1); // (rows, D) as HF builds it
        let (cos, sin) = (emb.cos(), emb.sin());
        let x = randn(&[rows, heads * dim]);
        // The autograd path's rotary on (1, heads, rows, D) with (1, rows, D) tables.
        let by_heads = x.view([1, rows, heads, dim]).transpose(1, 2);
        let expected = crate::model::apply_rotary(&by_heads, &cos.unsqueeze(0), &sin.unsqueeze(0))
            .unwrap()
            .transpose(1, 2)
            .reshape([rows, heads * dim]);
        let mut y = x.copy();
        rotary_in_place(&mut y, &cos, &sin, heads as usize, dim as usize, false).unwrap();
        close(&y, &expected, 1e-6);
        // The map is a rotation: its transpose is its inverse.
        rotary_in_place(&mut y, &cos, &sin, heads as usize, dim as usize, true).unwrap();
        close(&y, &x, 1e-5);
    }

    #[test]
    fn swiglu_matches_aten_forward_and_autograd() {
        tch::manual_seed(5);
        let (rows, cols) = (19, 33);
        let g = randn(&[rows, cols]).set_requires_grad(true);
        let u = randn(&[rows, cols]).set_requires_grad(true);
        let reference = g.silu() * &u;
        let dout = randn(&[rows, cols]);
        let grads = Tensor::run_backward(
            &[(&reference * &dout).sum(Kind::Float)],
            &[&g, &u],
            false,
            false,
        );
        let (out, sigmoid) = swiglu_forward(&g.detach(), &u.detach()).unwrap();
        close(&out, &reference.detach(), 1e-6);
        let (dg, du) = swiglu_backward(&dout, &g.detach(), &u.detach(), &sigmoid).unwrap();
        close(&dg, &grads[0], 1e-5);
        close(&du, &grads[1], 1e-5);
    }

    #[test]
    fn kernels_refuse_what_they_cannot_read() {
        let strided = randn(&[4, 6]).transpose(0, 1);
        let w = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let err = rms_norm_forward(&strided, &w, 1e-6)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("contiguous fp32")));
        let doubles = Tensor::ones([2, 4], (Kind::Double, Device::Cpu));
        assert!(rms_norm_forward(&doubles, &w, 1e-6).is_err());
    }

    #[test]
    fn work_split_over_threads_covers_every_row_once() {
        for (rows, cols) in [(1, 1), (1000, 256), (7, 1 << 16), (0, 4)] {
            let ranges = row_ranges(rows, cols);
            let covered: usize = ranges.iter().map(|r| r.len()).sum();
            assert_eq!(covered, rows);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
