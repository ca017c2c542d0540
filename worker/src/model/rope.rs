//! Rotary position embeddings, exactly as transformers 5.x computes them
//! (`modeling_rope_utils` for the inverse frequencies, `*RotaryEmbedding.forward` and
//! `apply_rotary_pos_emb` for their use). `Rotary` is shared by all decoder layers of a
//! model; it keeps the inverse frequencies on the device and derives cos/sin from the
//! position ids at each use (a few element-wise ops, no host sync, any position). It is
//! model state, not a parameter.

use super::config::RopeSpec;
use crate::Result;
use std::f64::consts::PI;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Inverse frequencies (head_dim / 2,) fp32 on the CPU, per the RoPE recipe.
pub fn inverse_frequencies(spec: &RopeSpec, head_dim: usize) -> Result<Tensor> {
    let theta = match spec {
        RopeSpec::Default { theta }
        | RopeSpec::Linear { theta, .. }
        | RopeSpec::Llama3 { theta, .. } => *theta,
    };
    // 1 / theta^(arange(0, d, 2) / d), computed in fp32 like transformers.
    let exponents = Tensor::f_arange_start_step(0, head_dim as i64, 2, (Kind::Int64, Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(head_dim as f64)?;
    let base = Tensor::f_pow_scalar(theta, &exponents)?;
    let inv_freq = scalar_over(1.0, &base)?; // (D/2,)
    match spec {
        RopeSpec::Default { .. } => Ok(inv_freq),
        RopeSpec::Linear { factor, .. } => Ok(inv_freq.f_div_scalar(*factor)?),
        RopeSpec::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
            ..
        } => llama3_scaling(
            &inv_freq,
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_max_position_embeddings as f64,
        ),
    }
}

/// Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept,
/// the band between interpolated smoothly.
fn llama3_scaling(
    inv_freq: &Tensor,
    factor: f64,
    low: f64,
    high: f64,
    old_len: f64,
) -> Result<Tensor> {
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;
    let wavelen = scalar_over(2.0 * PI, inv_freq)?;
    let is_low_freq = wavelen.f_gt(low_freq_wavelen)?;
    let scaled = inv_freq
        .f_div_scalar(factor)?
        .f_where_self(&is_low_freq, inv_freq)?;
    // smooth = (old_len / wavelen - low) / (high - low)
    let smooth = scalar_over(old_len, &wavelen)?
        .f_sub_scalar(low)?
        .f_div_scalar(high - low)?;
    let one_minus_smooth = smooth.f_neg()?.f_add_scalar(1.0)?;
    let smoothed = one_minus_smooth
        .f_mul(&scaled)?
        .f_div_scalar(factor)?
        .f_add(&smooth.f_mul(&scaled)?)?;
    let is_medium = wavelen
        .f_lt(high_freq_wavelen)?
        .f_logical_not()?
        .f_logical_and(&is_low_freq.f_logical_not()?)?;
    Ok(smoothed.f_where_self(&is_medium, &scaled)?)
}

/// numerator / t elementwise, rounded like Python's `float / tensor`.
fn scalar_over(numerator: f64, t: &Tensor) -> Result<Tensor> {
    Ok(t.f_full_like(numerator)?.f_div(t)?)
}

/// The shared cos/sin source for one model.
pub struct Rotary {
    /// (D/2,) fp32 values (kept as plain floats so `Rotary` is `Sync`).
    inv_freq: Vec<f32>,
    /// `inv_freq` as a tensor on the device last asked for (one upload per device).
    on_device: Mutex<Option<(Device, Tensor)>>,
}

impl Rotary {
    pub fn new(spec: &RopeSpec, head_dim: usize) -> Result<Self> {
        Ok(Rotary {
            inv_freq: Vec::<f32>::try_from(&inverse_frequencies(spec, head_dim)?)?,
            on_device: Mutex::new(None),
        })
    }

    /// cos and sin for `position_ids` (B, T), each (B, T, D) in `kind` on the ids' device.
    /// Computed like transformers' `RotaryEmbedding.forward` (fp32 position * inv_freq,
    /// duplicated halves, cos/sin, cast): a few element-wise ops, no host sync.
    pub fn cos_sin(&self, position_ids: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let inv_freq = self.inv_freq_on(position_ids.device())?; // (D/2,)
        let freqs = position_ids
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&inv_freq)?; // (B, T, D/2)
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?; // (B, T, D)
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }

    fn inv_freq_on(&self, device: Device) -> Result<Tensor> {
        let mut cached = self
            .on_device
            .lock()
            .map_err(|_| crate::Error::Model("RoPE cache lock poisoned".into()))?;
        match cached.as_ref() {
            Some((at, tensor)) if *at == device => Ok(tensor.shallow_clone()),
            _ => {
                let tensor = Tensor::from_slice(&self.inv_freq).f_to_device(device)?;
                *cached = Some((device, tensor.shallow_clone()));
                Ok(tensor)
            }
        }
    }
}

/// x * cos + rotate_half(x) * sin for x (B, N, T, D) and cos/sin (B, T, D).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.f_unsqueeze(1)?; // (B, 1, T, D)
    let sin = sin.f_unsqueeze(1)?;
    let half = x.size()[3] / 2;
    let first = x.f_narrow(3, 0, half)?;
    let second = x.f_narrow(3, half, half)?;
    let rotated = Tensor::f_cat(&[&second.f_neg()?, &first], -1)?; // (B, N, T, D)
    Ok(x.f_mul(&cos)?.f_add(&rotated.f_mul(&sin)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    #[test]
    fn default_and_linear_frequencies() {
        let base = values(&inverse_frequencies(&RopeSpec::Default { theta: 10000.0 }, 8).unwrap());
        let expected: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0))
            .collect();
        for (a, b) in base.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
        }
        let linear = values(
            &inverse_frequencies(
                &RopeSpec::Linear {
                    theta: 10000.0,
                    factor: 4.0,
                },
                8,
            )
            .unwrap(),
        );
        for (a, b) in linear.iter().zip(&base) {
            assert!((a * 4.0 - b).abs() < 1e-7);
        }
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let spec = RopeSpec::Llama3 {
            theta: 10000.0,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let base = values(&inverse_frequencies(&RopeSpec::Default { theta: 10000.0 }, 16).unwrap());
        let scaled = values(&inverse_frequencies(&spec, 16).unwrap());
        for (b, s) in base.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / b;
            if wavelen < 16.0 {
                assert_eq!(s, b);
            } else if wavelen > 64.0 {
                assert!((s * 8.0 - b).abs() < 1e-7);
            } else {
                assert!(*s < *b && *s > *b / 8.0);
            }
        }
    }

    #[test]
    fn cos_sin_match_direct_formula_and_rotation_preserves_norm() {
        let rotary = Rotary::new(&RopeSpec::Default { theta: 10000.0 }, 8).unwrap();
        let positions = Tensor::from_slice(&[0i64, 1, 2, 100, 3, 0]).reshape([2, 3]);
        let (cos, sin) = rotary.cos_sin(&positions, Kind::Float).unwrap();
        assert_eq!(cos.size(), vec![2, 3, 8]);
        let inv = rotary.inv_freq.clone();
        let got = cos.double_value(&[1, 0, 1]) as f32; // position 100, frequency 1
        assert!((got - (100.0 * inv[1]).cos()).abs() < 1e-6);
        assert_eq!(sin.double_value(&[0, 0, 3]), 0.0);
        let x = Tensor::arange(96, (Kind::Float, Device::Cpu))
            .reshape([2, 2, 3, 8])
            .sin();
        let y = apply_rotary(&x, &cos, &sin).unwrap();
        let diff = (x.square().sum(Kind::Float) - y.square().sum(Kind::Float)).abs();
        assert!(diff.double_value(&[]) < 1e-3);
    }
}
