//! ggml tensor data to f32 values, as gguf-py's `quants.py` decodes it (so the values
//! equal transformers' GGUF loader's): F32, F16, BF16, and the 32-element block formats
//! Q8_0 (f16 scale d, 32 × i8: x = d·q), Q4_0 (f16 d, 16 bytes: byte j holds element j in
//! its low nibble and element j+16 in its high one: x = d·(q − 8)) and Q4_1 (f16 d, f16
//! minimum m, the same nibbles: x = d·q + m), with the products in f32. Other types are
//! an error naming the tensor and the types this build decodes.

use half::{bf16, f16};

use super::gguf::{GgmlType, TensorInfo};
use crate::error::{Error, Result};

const BLOCK: usize = 32;

/// Bytes of `numel` elements of `kind`, or an error for a type not decoded here.
pub fn byte_len(info: &TensorInfo) -> Result<usize> {
    let numel = info.numel() as usize;
    let blocks = || -> Result<usize> {
        if !numel.is_multiple_of(BLOCK) {
            return Err(Error::Model(format!(
                "tensor {}: {numel} elements is not a whole number of {BLOCK}-element blocks",
                info.name
            )));
        }
        Ok(numel / BLOCK)
    };
    Ok(match info.kind {
        GgmlType::F32 => numel * 4,
        GgmlType::F16 | GgmlType::BF16 => numel * 2,
        GgmlType::Q8_0 => blocks()? * 34,
        GgmlType::Q4_0 => blocks()? * 18,
        GgmlType::Q4_1 => blocks()? * 20,
        GgmlType::Other(id) => return Err(unsupported(info, id)),
    })
}

/// The f32 values of `info`'s `bytes` (`byte_len(info)` of them), innermost dimension
/// fastest.
pub fn dequantize(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<f32>> {
    let half_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    Ok(match info.kind {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|c| half_at(c, 0)).collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|block| {
                let d = half_at(block, 0);
                block[2..].iter().map(move |&q| d * f32::from(q as i8))
            })
            .collect(),
        GgmlType::Q4_0 => bytes
            .chunks_exact(18)
            .flat_map(|block| {
                let d = half_at(block, 0);
                nibbles(&block[2..]).map(move |q| d * (f32::from(q) - 8.0))
            })
            .collect(),
        GgmlType::Q4_1 => bytes
            .chunks_exact(20)
            .flat_map(|block| {
                let (d, m) = (half_at(block, 0), half_at(block, 2));
                nibbles(&block[4..]).map(move |q| d * f32::from(q) + m)
            })
            .collect(),
        GgmlType::Other(id) => return Err(unsupported(info, id)),
    })
}

/// A 32-element block's 4-bit values in element order: the 16 low nibbles, then the 16
/// high nibbles.
fn nibbles(packed: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let low = packed.iter().map(|b| b & 0x0f);
    let high = packed.iter().map(|b| b >> 4);
    low.chain(high)
}

fn unsupported(info: &TensorInfo, id: u32) -> Error {
    Error::Model(format!(
        "tensor {}: ggml type {id} cannot be decoded by this build (it decodes F32, F16, BF16, \
         Q8_0, Q4_0 and Q4_1): convert the model to one of those with llama.cpp's \
         llama-quantize, or from its original safetensors",
        info.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: GgmlType, numel: u64) -> TensorInfo {
        TensorInfo {
            name: "t".into(),
            dims: vec![numel],
            kind,
            offset: 0,
        }
    }

    #[test]
    fn q8_0_scales_signed_bytes() {
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let values = dequantize(&info(GgmlType::Q8_0, 32), &block).unwrap();
        assert_eq!(values[0], -8.0);
        assert_eq!(values[31], 7.5);
    }

    #[test]
    fn q4_blocks_put_low_nibbles_first() {
        let mut q4_1 = f16::from_f32(2.0).to_le_bytes().to_vec();
        q4_1.extend(f16::from_f32(-1.0).to_le_bytes());
        q4_1.extend((0..16).map(|j| (j as u8) | ((15 - j as u8) << 4)));
        let values = dequantize(&info(GgmlType::Q4_1, 32), &q4_1).unwrap();
        assert_eq!(values[0], -1.0); // 2·0 − 1
        assert_eq!(values[15], 29.0); // 2·15 − 1
        assert_eq!(values[16], 29.0); // high nibble of byte 0 = 15
        assert_eq!(values[31], -1.0);
        let mut q4_0 = f16::from_f32(1.0).to_le_bytes().to_vec();
        q4_0.extend([0x80u8; 16]);
        let values = dequantize(&info(GgmlType::Q4_0, 32), &q4_0).unwrap();
        assert_eq!((values[0], values[16]), (-8.0, 0.0));
    }

    #[test]
    fn types_not_built_are_named() {
        let err = byte_len(&info(GgmlType::Other(12), 256))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ggml type 12") && err.contains("Q4_1"),
            "{err}"
        );
        assert_eq!(byte_len(&info(GgmlType::Q4_1, 64)).unwrap(), 40);
    }
}
