//! bitsandbytes' 8-bit blockwise quantization with its signed dynamic code, as the
//! double quantization of 4-bit absmax values uses it on CPU: blocks of 256, each value
//! divided by its block's absmax and mapped to the nearest of 256 codes (a search for the
//! code at or below it, then a step up when the next code is strictly closer). The code
//! is bitsandbytes' `create_dynamic_map(signed=True)` with its first entry set to -1, as
//! the native kernel leaves it. Contract: `quant/mod.rs`.

use super::NESTED_BLOCKSIZE;
use crate::Result;
use tch::{Device, Kind, Tensor};

/// Exponent bits of the dynamic code (bitsandbytes' default).
const MAX_EXPONENT_BITS: i32 = 7;

/// The 256 sorted code values: for each exponent e in 0..7, the midpoints of a float32
/// `linspace(0.1, 1, 2^e + 1)` times ±10^(e - 6), then 0 and 1; entry 0 is -1. Built
/// with libtorch's own linspace and products so every value is bitsandbytes' bit for bit.
fn dynamic_code() -> Result<Vec<f32>> {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for exponent in 0..MAX_EXPONENT_BITS {
        let items = (1i64 << exponent) + 1;
        let bounds = Tensor::f_linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu))?;
        let means = bounds
            .f_narrow(0, 0, items - 1)?
            .f_add(&bounds.f_narrow(0, 1, items - 1)?)?
            .f_div_scalar(2.0)?;
        // 10^(e - 6) as Python computes it, times the fp32 means in fp32 (torch's
        // tensor-by-scalar product).
        let scale = 10f64.powf(f64::from(exponent - (MAX_EXPONENT_BITS - 1)));
        for signed in [scale, -scale] {
            let values = Vec::<f32>::try_from(&means.f_mul_scalar(signed)?)?;
            data.extend(values.iter().map(|v| f64::from(*v)));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f64::total_cmp);
    let mut code: Vec<f32> = data.iter().map(|v| *v as f32).collect();
    code[0] = -1.0;
    Ok(code)
}

/// bitsandbytes' lookup of the code at or below a value (its native CPU kernel uses
/// BinSearch's "Direct2" algorithm, mirrored here in the same fp32 arithmetic): a
/// uniform grid of step 1/h over the codes, each grid cell naming the code to compare
/// against, then two comparisons. The grid makes it approximate near cell edges (one
/// code too low); `nearest` corrects half of that the same way bitsandbytes does, and
/// mirroring it is what makes the bytes equal.
struct CodeSearch {
    /// The codes with the first repeated in front (index k holds code k - 1).
    padded: Vec<f32>,
    /// Per grid cell: the padded index to compare at.
    cells: Vec<u32>,
    h: f32,
    x0: f32,
}

impl CodeSearch {
    /// Two codes apart per grid cell at most: h grows from 1 / (smallest two-code gap)
    /// by doubling steps until no cell holds three codes.
    fn new(code: &[f32]) -> Self {
        let x0 = code[0];
        let n = code.len();
        let mut min_gap = code[n - 1] - x0;
        for i in 2..n {
            min_gap = min_gap.min((code[i] - x0) - (code[i - 2] - x0));
        }
        let mut h = 1.0f32 / min_gap;
        let mut step = f32::from_bits(h.to_bits() + 1) - h;
        let mut checked_from = n;
        loop {
            let mut last = checked_from - 1;
            let mut modified = false;
            let mut i = 2;
            while i <= last {
                while cell(h, x0, code[i - 2]) == cell(h, x0, code[i]) {
                    checked_from = i;
                    last = n - 1;
                    modified = true;
                    h += step;
                    step *= 2.0;
                }
                i += 1;
            }
            if !modified {
                break;
            }
        }
        let padded: Vec<f32> = std::iter::once(x0).chain(code.iter().copied()).collect();
        let count = cell(h, x0, code[n - 1]) as usize + 1;
        let mut cells = vec![0u32; count];
        let (mut b, mut j) = (count - 1, 0u32);
        for i in (0..padded.len()).rev() {
            let idx = cell(h, x0, padded[i]) as usize;
            while b > idx {
                cells[b] = j;
                b -= 1;
            }
            if b == idx {
                j = i as u32 - 1;
                cells[b] = j;
                if b == 0 {
                    break;
                }
                b -= 1;
            }
        }
        CodeSearch {
            padded,
            cells,
            h,
            x0,
        }
    }

    /// The index of the code at or below `z` (sometimes one lower, as bitsandbytes').
    fn below(&self, z: f32) -> usize {
        let cell = (cell(self.h, self.x0, z) as usize).min(self.cells.len() - 1);
        let mut index = self.cells[cell] as usize;
        if z < self.padded[index] {
            index -= 1;
        }
        if z < self.padded[index + 1] {
            index -= 1;
        }
        index
    }
}

/// The grid cell of `z`: truncate(h * (z - x0)) in fp32.
fn cell(h: f32, x0: f32, z: f32) -> u32 {
    (h * (z - x0)) as u32
}

/// The index of the code nearest `x` (in [-1, 1]) as bitsandbytes picks it: the search
/// result, one up when the next code is strictly closer.
fn nearest(search: &CodeSearch, code: &[f32], x: f32) -> u8 {
    let below = search.below(x);
    let index = match below < 255 && (x - code[below + 1]).abs() < (x - code[below]).abs() {
        true => below + 1,
        false => below,
    };
    index as u8
}

/// Quantizes (n,) fp32 values: ((n,) u8 codes, (ceil(n / 256),) fp32 absmax).
pub(super) fn quantize(values: &Tensor) -> Result<(Tensor, Tensor)> {
    let values: Vec<f32> = Vec::<f32>::try_from(&values.f_contiguous()?)?;
    let code = dynamic_code()?;
    let search = CodeSearch::new(&code);
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::new();
    for block in values.chunks(NESTED_BLOCKSIZE as usize) {
        let block_max = block.iter().fold(-f32::MAX, |m, v| m.max(v.abs()));
        absmax.push(block_max);
        codes.extend(block.iter().map(|v| nearest(&search, &code, v / block_max)));
    }
    Ok((Tensor::from_slice(&codes), Tensor::from_slice(&absmax)))
}

/// The values back: code[q] * absmax of its block, fp32 (n,).
pub(super) fn dequantize(codes: &Tensor, absmax: &Tensor) -> Result<Tensor> {
    let device = codes.device();
    let code = Tensor::from_slice(&dynamic_code()?).f_to_device(device)?;
    let n = codes.numel() as i64;
    let values = code.f_index_select(0, &codes.f_to_kind(Kind::Int64)?)?;
    let scales = absmax
        .f_to_device(device)?
        .f_repeat_interleave_self_int(NESTED_BLOCKSIZE, 0, None)?
        .f_narrow(0, 0, n)?;
    Ok(values.f_mul(&scales)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_sorted_signed_and_spans_minus_one_to_one() {
        let code = dynamic_code().unwrap();
        assert_eq!(code.len(), 256);
        assert!(code.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((code[0], code[255]), (-1.0, 1.0));
        assert!(code.contains(&0.0));
    }

    #[test]
    fn the_search_finds_the_code_at_or_just_below_every_value() {
        let code = dynamic_code().unwrap();
        let search = CodeSearch::new(&code);
        for (i, c) in code.iter().enumerate() {
            assert_eq!(search.below(*c), i, "code {i} itself");
        }
        for i in 0..255 {
            let mid = (code[i] + code[i + 1]) / 2.0;
            let found = search.below(mid);
            assert!(
                found == i || found + 1 == i,
                "between codes {i} and {}: {found}",
                i + 1
            );
            assert_eq!(nearest(&search, &code, code[i + 1] - 1e-9), (i + 1) as u8);
        }
    }
}
