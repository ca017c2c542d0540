//! QLoRA's 4-bit base against bitsandbytes 0.50 on CPU (the reference, run by
//! `tests/fixtures/qlora/bnb_reference.py`): for NF4 and FP4, with and without double
//! quantization, fp32 and bf16 weights, shapes with a short last block and an odd number
//! of values, `rsdeep_worker::quant` gives the same packed 4-bit bytes, the same absmax
//! and bit-identical dequantized values. Double quantization: the same offset and
//! nested absmax; the 8-bit absmax codes are bitsandbytes' except where a value lies
//! within a few millionths of the midpoint between two codes, where bitsandbytes'
//! native grid search picks by grid cell (measured: 2 of 128 values in one case, one
//! code step apart); every 64-value block whose code agrees dequantizes bit-identically.
//! Needs `RSDEEP_PYTHON` with bitsandbytes (`scripts/setup.sh` installs it).

use crate::support::python;
use rsdeep_worker::quant::{Absmax, QuantConfig, QuantType, QuantizedWeight};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::{Kind, Tensor};

/// (rows, cols): whole blocks; a short last block; an odd count of values; more than
/// 256 blocks (two nested blocks).
const SHAPES: [(i64, i64); 4] = [(64, 128), (48, 70), (7, 9), (160, 128)];

fn reference(cases: &serde_json::Value, dir: &Path) -> HashMap<String, Tensor> {
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, cases.to_string()).unwrap();
    let out = dir.join("bnb.safetensors");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qlora/bnb_reference.py");
    let output = Command::new(python())
        .arg(&script)
        .arg("quantize")
        .arg(&cases_path)
        .arg(&out)
        .output()
        .expect("running the bitsandbytes reference");
    assert!(
        output.status.success(),
        "bitsandbytes reference failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_bits_equal(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}: shapes");
    assert_eq!(ours.kind(), theirs.kind(), "{what}: dtypes");
    let differing = ours.ne_tensor(theirs).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(differing, 0, "{what}: {differing} values differ");
}

/// 8-bit absmax codes: at most 2% differ, each by one code step; returns the indices of
/// the blocks whose codes agree.
fn assert_codes_nearly_equal(ours: &Tensor, theirs: &Tensor, what: &str) -> Tensor {
    let (ours, theirs) = (ours.to_kind(Kind::Int64), theirs.to_kind(Kind::Int64));
    let step = (&ours - &theirs).abs();
    assert!(
        step.max().int64_value(&[]) <= 1,
        "{what}: an absmax code differs by more than one step"
    );
    let differing = step.sum(Kind::Int64).int64_value(&[]);
    assert!(
        differing * 50 <= ours.numel() as i64,
        "{what}: {differing} of {} absmax codes differ",
        ours.numel()
    );
    step.eq(0).nonzero().reshape([-1])
}

#[test]
fn quantized_bytes_and_dequantized_values_equal_bitsandbytes() {
    let mut cases = Vec::new();
    for (i, (rows, cols)) in SHAPES.iter().enumerate() {
        for dtype in ["float32", "bfloat16"] {
            for quant_type in ["nf4", "fp4"] {
                for double_quant in [false, true] {
                    cases.push(json!({"rows": rows, "cols": cols, "dtype": dtype,
                        "quant_type": quant_type, "double_quant": double_quant,
                        "seed": 10 + i}));
                }
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let bnb = reference(&json!(cases), tmp.path());
    for (i, case) in cases.iter().enumerate() {
        let what = format!("case {i} {case}");
        let get = |key: &str| &bnb[&format!("{key}:{i}")];
        let config = QuantConfig {
            quant_type: QuantType::parse(case["quant_type"].as_str().unwrap()).unwrap(),
            double_quant: case["double_quant"].as_bool().unwrap(),
        };
        let weight = get("w");
        let ours = QuantizedWeight::quantize(weight, config).unwrap();
        assert_bits_equal(&ours.packed, get("packed"), &format!("{what}: packed"));
        let dequantized = ours.dequantize(weight.kind()).unwrap();
        match &ours.absmax {
            Absmax::Plain(absmax) => {
                assert_bits_equal(absmax, get("absmax"), &what);
                assert_bits_equal(&dequantized, get("dequantized"), &format!("{what}: values"));
            }
            Absmax::Nested {
                codes,
                absmax,
                offset,
            } => {
                assert_bits_equal(absmax, get("nested_absmax"), &format!("{what}: nested"));
                let theirs = get("offset").double_value(&[0]) as f32;
                assert_eq!(offset.to_bits(), theirs.to_bits(), "{what}: offset");
                let agree = assert_codes_nearly_equal(codes, get("absmax"), &what);
                // Blocks whose absmax code agrees dequantize bit-identically.
                let blocks = |t: &Tensor| {
                    let n = t.numel() as i64;
                    let padded = (n + 63) / 64 * 64;
                    t.reshape([-1])
                        .to_kind(Kind::Float)
                        .constant_pad_nd([0, padded - n])
                        .reshape([-1, 64])
                };
                let (ours_b, theirs_b) = (blocks(&dequantized), blocks(get("dequantized")));
                let same = ours_b
                    .index_select(0, &agree)
                    .eq_tensor(&theirs_b.index_select(0, &agree));
                assert!(
                    bool::try_from(same.all()).unwrap(),
                    "{what}: values of agreeing blocks"
                );
            }
        }
    }
}
