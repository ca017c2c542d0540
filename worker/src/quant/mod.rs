//! bitsandbytes' 4-bit weight format, as QLoRA uses it for a frozen base: each linear
//! weight stored blockwise (64 values per block) as 4-bit NF4 or FP4 codes, two per byte
//! with the first in the high nibble, plus one fp32 absmax per block, optionally itself
//! quantized ("double quantization": the mean subtracted, then 8-bit dynamic codes in
//! blocks of 256 with their own fp32 absmax). Quantized bytes and dequantized values are
//! bitsandbytes 0.50's on CPU (its pure-torch 4-bit kernel is mirrored op for op through
//! libtorch, its native 8-bit kernel in `blockwise8.rs`); checked against bitsandbytes by
//! `worker/tests/qlora_parity.rs`.
//!
//! Inside a model a quantized weight travels as plain parameters whose elements are the
//! bytes reinterpreted in the model's dtype (`QuantizedWeight::to_params`), so the ZeRO
//! engine keeps, partitions, gathers and checkpoints the 4-bit bytes themselves;
//! `QuantSpec` remembers what the bytes mean and dequantizes them
//! (`QuantSpec::dequantize`).

mod blockwise8;

use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Values per 4-bit block (bitsandbytes' default).
pub const BLOCKSIZE: i64 = 64;
/// Absmax values per block of the double quantization.
pub const NESTED_BLOCKSIZE: i64 = 256;

/// NF4's 16 code values (QLoRA's normal-float quantiles), as fp32.
const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4's 16 code values (sign, 2 exponent bits, 1 mantissa bit, scaled to max 1).
const FP4_CODE: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// bitsandbytes' `bnb_4bit_quant_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// `"nf4"` or `"fp4"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::Config(format!(
                "bnb_4bit_quant_type {other:?}: use \"nf4\" or \"fp4\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 code values, (16,) fp32 on `device`.
    fn code(self, device: Device) -> Result<Tensor> {
        let values = match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        };
        Ok(Tensor::from_slice(values).f_to_device(device)?)
    }
}

/// How a base is quantized: train.json's `load_in_4bit` settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantConfig {
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
}

impl QuantConfig {
    /// From command-line flags: `--base_4bit nf4|fp4` (absent: no 4-bit base) and
    /// `--double_quant`.
    pub fn from_flags(base_4bit: Option<&str>, double_quant: bool) -> Result<Option<Self>> {
        base_4bit
            .map(|name| {
                Ok(QuantConfig {
                    quant_type: QuantType::parse(name)?,
                    double_quant,
                })
            })
            .transpose()
    }
}

/// The fp32 absmax of every 4-bit block, plain or double-quantized.
#[derive(Debug)]
pub enum Absmax {
    /// (blocks,) fp32.
    Plain(Tensor),
    Nested {
        /// (blocks,) u8: 8-bit dynamic codes of absmax - offset.
        codes: Tensor,
        /// (ceil(blocks / 256),) fp32.
        absmax: Tensor,
        /// The mean absmax subtracted before quantizing.
        offset: f32,
    },
}

/// One weight in bitsandbytes' 4-bit format.
#[derive(Debug)]
pub struct QuantizedWeight {
    /// (ceil(numel / 2),) u8: two codes per byte, the first in the high nibble.
    pub packed: Tensor,
    pub absmax: Absmax,
    pub shape: Vec<i64>,
    pub quant_type: QuantType,
}

impl QuantizedWeight {
    /// Quantizes `weight` (any float dtype; read as fp32) exactly as bitsandbytes'
    /// `quantize_4bit(weight, blocksize=64, quant_type, compress_statistics)` does on CPU.
    pub fn quantize(weight: &Tensor, config: QuantConfig) -> Result<Self> {
        let shape = weight.size();
        let flat = weight
            .f_detach()?
            .f_to_device(Device::Cpu)?
            .f_reshape([-1])?
            .f_to_kind(Kind::Float)?; // (n,)
        let (scaled, absmax) = scale_blocks(&flat)?; // (n,), (blocks,)
        let codes = nearest_codes(&scaled, config.quant_type)?; // (n rounded up to even,) u8
        let high = codes
            .f_slice(0, 0, None, 2)?
            .f_bitwise_left_shift_tensor_scalar(4)?;
        let packed = high.f_bitwise_or_tensor(&codes.f_slice(0, 1, None, 2)?)?;
        let absmax = match config.double_quant {
            false => Absmax::Plain(absmax),
            true => {
                let offset = absmax.f_mean(Kind::Float)?.double_value(&[]) as f32;
                let centred = absmax.f_sub_scalar(offset as f64)?;
                let (codes, nested) = blockwise8::quantize(&centred)?;
                Absmax::Nested {
                    codes,
                    absmax: nested,
                    offset,
                }
            }
        };
        Ok(QuantizedWeight {
            packed,
            absmax,
            shape,
            quant_type: config.quant_type,
        })
    }

    /// The weight as bitsandbytes' `dequantize_4bit` gives it, in `kind`.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let device = self.packed.device();
        let absmax = match &self.absmax {
            Absmax::Plain(absmax) => absmax.shallow_clone(),
            Absmax::Nested {
                codes,
                absmax,
                offset,
            } => blockwise8::dequantize(codes, absmax)?.f_add_scalar(*offset as f64)?,
        };
        let numel: i64 = self.shape.iter().product();
        let high = self.packed.f_bitwise_right_shift_tensor_scalar(4)?;
        let low = self.packed.f_bitwise_and(15)?;
        let indices = Tensor::f_stack(&[high, low], 1)?
            .f_reshape([-1])?
            .f_narrow(0, 0, numel)?
            .f_to_kind(Kind::Int64)?; // (n,)
        let values = self.quant_type.code(device)?.f_index_select(0, &indices)?; // (n,) fp32
        let scales = absmax
            .f_to_device(device)?
            .f_repeat_interleave_self_int(BLOCKSIZE, 0, None)?
            .f_narrow(0, 0, numel)?; // (n,)
        Ok(values
            .f_mul(&scales)?
            .f_reshape(self.shape.as_slice())?
            .f_to_kind(kind)?)
    }

    /// The tensors as plain parameters of `kind` holding the bytes (suffixes after the
    /// weight's name: `""` the codes, `.absmax`, and with double quantization
    /// `.nested_absmax` and `.nested_offset`), and the spec that reads them back.
    pub fn to_params(&self, kind: Kind) -> Result<(Vec<(&'static str, Tensor)>, QuantSpec)> {
        let mut params = vec![("", bytes_as(&self.packed, kind)?)];
        let mut lengths = vec![self.packed.numel() as i64];
        let nested = match &self.absmax {
            Absmax::Plain(absmax) => {
                params.push((".absmax", bytes_as(&float_bytes(absmax)?, kind)?));
                lengths.push(absmax.numel() as i64 * 4);
                false
            }
            Absmax::Nested {
                codes,
                absmax,
                offset,
            } => {
                let offset = Tensor::from_slice(&[*offset]);
                for (suffix, bytes) in [
                    (".absmax", codes.shallow_clone()),
                    (".nested_absmax", float_bytes(absmax)?),
                    (".nested_offset", float_bytes(&offset)?),
                ] {
                    lengths.push(bytes.numel() as i64);
                    params.push((suffix, bytes_as(&bytes, kind)?));
                }
                true
            }
        };
        let spec = QuantSpec {
            shape: self.shape.clone(),
            quant_type: self.quant_type,
            nested,
            byte_lengths: lengths,
        };
        Ok((params, spec))
    }
}

/// What a quantized weight's parameters mean: enough to dequantize them.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSpec {
    /// The weight's shape, e.g. (out, in).
    pub shape: Vec<i64>,
    pub quant_type: QuantType,
    pub nested: bool,
    /// Bytes each parameter of `QuantizedWeight::to_params` carries (before padding).
    byte_lengths: Vec<i64>,
}

impl QuantSpec {
    /// How many parameters carry the weight (2 plain, 4 double-quantized).
    pub fn param_count(&self) -> usize {
        self.byte_lengths.len()
    }

    /// The weight back from its parameters (as `to_params` made them, possibly moved or
    /// gathered) in `kind`.
    pub fn dequantize(&self, params: &[&Tensor], kind: Kind) -> Result<Tensor> {
        self.read(params)?.dequantize(kind)
    }

    /// The `QuantizedWeight` the parameters hold.
    pub fn read(&self, params: &[&Tensor]) -> Result<QuantizedWeight> {
        if params.len() != self.byte_lengths.len() {
            return Err(Error::Model(format!(
                "a 4-bit weight needs {} tensors, got {}",
                self.byte_lengths.len(),
                params.len()
            )));
        }
        let bytes: Vec<Tensor> = params
            .iter()
            .zip(&self.byte_lengths)
            .map(|(t, len)| as_bytes(t, *len))
            .collect::<Result<_>>()?;
        let absmax = match self.nested {
            false => Absmax::Plain(bytes_as_float(&bytes[1])?),
            true => Absmax::Nested {
                codes: bytes[1].shallow_clone(),
                absmax: bytes_as_float(&bytes[2])?,
                offset: bytes_as_float(&bytes[3])?.double_value(&[0]) as f32,
            },
        };
        Ok(QuantizedWeight {
            packed: bytes[0].shallow_clone(),
            absmax,
            shape: self.shape.clone(),
            quant_type: self.quant_type,
        })
    }
}

/// bitsandbytes' 4-bit scaling: per block of 64, x * (1 / absmax) clamped to [-1, 1]
/// (a short last block divides by its absmax). (n,) fp32 -> ((n,), (blocks,)).
fn scale_blocks(flat: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = flat.numel() as i64;
    let full = n - n % BLOCKSIZE;
    let whole = flat
        .f_narrow(0, 0, full)?
        .f_reshape([full / BLOCKSIZE, BLOCKSIZE])?;
    let absmax = whole.f_abs()?.f_amax([1i64], false)?; // (blocks,)
    let inverse = absmax.f_clamp_min(1e-38)?.f_reciprocal()?.f_unsqueeze(1)?;
    let scaled = whole.f_mul(&inverse)?.f_clamp(-1.0, 1.0)?.f_reshape([-1])?;
    if full == n {
        return Ok((scaled, absmax));
    }
    let rest = flat.f_narrow(0, full, n - full)?;
    let rest_max = rest.f_abs()?.f_max()?.f_clamp_min(1e-38)?;
    let rest_scaled = rest.f_div(&rest_max)?.f_clamp(-1.0, 1.0)?;
    Ok((
        Tensor::f_cat(&[scaled, rest_scaled], 0)?,
        Tensor::f_cat(&[absmax, rest_max.f_reshape([1])?], 0)?,
    ))
}

/// Each scaled value's nearest code (ties to the lower one), as bitsandbytes finds it:
/// a bucketize over the midpoints of the sorted codes. (n,) fp32 -> (n rounded up to
/// even,) u8.
fn nearest_codes(scaled: &Tensor, quant_type: QuantType) -> Result<Tensor> {
    let code = quant_type.code(Device::Cpu)?;
    let order = code.f_argsort(0, false)?;
    let sorted = code.f_index_select(0, &order)?;
    let midpoints = sorted
        .f_narrow(0, 0, 15)?
        .f_add(&sorted.f_narrow(0, 1, 15)?)?
        .f_div_scalar(2.0)?; // (15,)
    let scaled = match scaled.numel() % 2 {
        0 => scaled.shallow_clone(),
        _ => scaled.f_constant_pad_nd([0i64, 1])?,
    };
    let buckets = scaled.f_bucketize(&midpoints, true, false)?;
    let codes = match quant_type {
        QuantType::Nf4 => buckets,
        QuantType::Fp4 => order.f_index_select(0, &buckets.f_to_kind(Kind::Int64)?)?,
    };
    Ok(codes.f_to_kind(Kind::Uint8)?)
}

/// An fp32 tensor's bytes, (4 n,) u8.
fn float_bytes(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_contiguous()?
        .f_view_dtype(Kind::Uint8)?
        .f_reshape([-1])?)
}

/// (4 n,) u8 -> (n,) fp32, the same bits.
fn bytes_as_float(bytes: &Tensor) -> Result<Tensor> {
    Ok(bytes.f_contiguous()?.f_view_dtype(Kind::Float)?)
}

/// u8 bytes as a 1-D tensor of `kind` holding the same bits (zero-padded to whole
/// elements of any float dtype).
fn bytes_as(bytes: &Tensor, kind: Kind) -> Result<Tensor> {
    let len = bytes.numel() as i64;
    let padded = (len + 3) / 4 * 4;
    let bytes = match padded - len {
        0 => bytes.f_reshape([-1])?,
        pad => bytes.f_reshape([-1])?.f_constant_pad_nd([0, pad])?,
    };
    Ok(bytes.f_contiguous()?.f_view_dtype(kind)?)
}

/// The first `len` bytes a tensor made by `bytes_as` carries, (len,) u8.
fn as_bytes(t: &Tensor, len: i64) -> Result<Tensor> {
    let bytes = t
        .f_contiguous()?
        .f_view_dtype(Kind::Uint8)?
        .f_reshape([-1])?;
    if bytes.numel() < len as usize {
        return Err(Error::Model(format!(
            "a 4-bit weight tensor holds {} bytes, {len} expected",
            bytes.numel()
        )));
    }
    Ok(bytes.f_narrow(0, 0, len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: i64, cols: i64) -> Tensor {
        tch::manual_seed(7);
        Tensor::randn([rows, cols], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn dequantized_values_are_codes_times_block_absmax() {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                let w = weight(8, 96); // 12 blocks of 64
                let config = QuantConfig {
                    quant_type,
                    double_quant,
                };
                let q = QuantizedWeight::quantize(&w, config).unwrap();
                assert_eq!(q.packed.size(), [8 * 96 / 2]);
                let back = q.dequantize(Kind::Float).unwrap();
                assert_eq!(back.size(), [8, 96]);
                let err = (&back - &w).abs().max().double_value(&[]);
                assert!(
                    err < 0.7,
                    "{quant_type:?} double {double_quant}: error {err}"
                );
            }
        }
    }

    #[test]
    fn parameters_carry_the_bytes_through_any_float_dtype() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for double_quant in [false, true] {
                let config = QuantConfig {
                    quant_type: QuantType::Nf4,
                    double_quant,
                };
                let q = QuantizedWeight::quantize(&weight(6, 70), config).unwrap();
                let (params, spec) = q.to_params(kind).unwrap();
                assert!(params.iter().all(|(_, t)| t.kind() == kind));
                assert_eq!(spec.param_count(), params.len());
                // What a gather does: copy into another buffer of the same dtype.
                let copies: Vec<Tensor> = params.iter().map(|(_, t)| t.copy()).collect();
                let refs: Vec<&Tensor> = copies.iter().collect();
                let back = spec.dequantize(&refs, Kind::Float).unwrap();
                assert!(back.equal(&q.dequantize(Kind::Float).unwrap()), "{kind:?}");
            }
        }
    }
}
