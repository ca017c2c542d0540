//! Collating micro-batches into tensors for the model.
//!
//! Contract: `input_ids` and `labels` are `(B, T)` int64. Pretraining blocks all have the
//! block length, so they need no mask, and labels equal the ids (the model shifts). SFT
//! examples are right-padded to the longest in the batch with `pad_id` / `IGNORE_INDEX`;
//! `attention_mask` is 1 on real tokens, `segment_ids` is 0 on padding and 1, 2, ... per
//! packed example, and `position_ids` restart at 0 at each segment start, so a packed
//! block behaves like separate sequences when the model masks attention across segments.

use tch::{Device, Kind, Tensor};

use super::sft::{IGNORE_INDEX, SftExample};
use crate::error::{Error, Result};

/// One micro-batch on `device`.
#[derive(Debug)]
pub struct Batch {
    /// (B, T) int64
    pub input_ids: Tensor,
    /// (B, T) int64, `IGNORE_INDEX` where no loss is taken
    pub labels: Tensor,
    /// (B, T) int64, 1 = real token; `None` when nothing is padded
    pub attention_mask: Option<Tensor>,
    /// (B, T) int64, 0 = padding, 1.. = packed example; `None` for pretraining blocks
    pub segment_ids: Option<Tensor>,
    /// (B, T) int64, restarting per segment; `None` means 0..T
    pub position_ids: Option<Tensor>,
}

/// Stacks equal-length pretraining blocks; labels are the ids.
pub fn collate_blocks(blocks: &[Vec<u32>], device: Device) -> Result<Batch> {
    let width = blocks
        .first()
        .map(Vec::len)
        .ok_or_else(|| Error::Data("empty micro-batch".into()))?;
    if blocks.iter().any(|b| b.len() != width) {
        return Err(Error::Data(
            "pretraining blocks of different lengths in one batch".into(),
        ));
    }
    let flat: Vec<i64> = blocks.iter().flatten().map(|&id| i64::from(id)).collect();
    let input_ids = to_2d(&flat, blocks.len(), width, device)?; // (B, T)
    let labels = to_2d(&flat, blocks.len(), width, device)?; // (B, T)
    Ok(Batch {
        input_ids,
        labels,
        attention_mask: None,
        segment_ids: None,
        position_ids: None,
    })
}

/// Right-pads SFT examples to the longest one.
pub fn collate_sft(examples: &[&SftExample], pad_id: u32, device: Device) -> Result<Batch> {
    let width = examples
        .iter()
        .map(|e| e.len())
        .max()
        .ok_or_else(|| Error::Data("empty micro-batch".into()))?;
    let rows = examples.len();
    let mut ids = vec![i64::from(pad_id); rows * width];
    let mut labels = vec![IGNORE_INDEX; rows * width];
    let mut mask = vec![0i64; rows * width];
    let mut segments = vec![0i64; rows * width];
    let mut positions = vec![0i64; rows * width];
    for (row, example) in examples.iter().enumerate() {
        let base = row * width;
        let mut position = 0;
        for t in 0..example.len() {
            if t > 0 && example.segment_ids[t] != example.segment_ids[t - 1] {
                position = 0;
            }
            ids[base + t] = i64::from(example.input_ids[t]);
            labels[base + t] = example.labels[t];
            mask[base + t] = 1;
            segments[base + t] = i64::from(example.segment_ids[t]);
            positions[base + t] = position;
            position += 1;
        }
    }
    Ok(Batch {
        input_ids: to_2d(&ids, rows, width, device)?, // (B, T)
        labels: to_2d(&labels, rows, width, device)?, // (B, T)
        attention_mask: Some(to_2d(&mask, rows, width, device)?), // (B, T)
        segment_ids: Some(to_2d(&segments, rows, width, device)?), // (B, T)
        position_ids: Some(to_2d(&positions, rows, width, device)?), // (B, T)
    })
}

/// `values` (rows * width) as a (rows, width) int64 tensor on `device`.
fn to_2d(values: &[i64], rows: usize, width: usize, device: Device) -> Result<Tensor> {
    let tensor = Tensor::from_slice(values).f_view([rows as i64, width as i64])?; // (B, T)
    Ok(tensor.f_to_device(device)?.f_to_kind(Kind::Int64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_stack_with_labels_equal_to_ids() {
        let batch = collate_blocks(&[vec![1, 2, 3], vec![4, 5, 6]], Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.size(), vec![2, 3]);
        assert_eq!(
            Vec::<i64>::try_from(batch.labels.flatten(0, 1)).unwrap(),
            vec![1, 2, 3, 4, 5, 6]
        );
        assert!(collate_blocks(&[vec![1], vec![1, 2]], Device::Cpu).is_err());
    }

    #[test]
    fn sft_pads_and_restarts_positions_per_segment() {
        let packed = SftExample {
            input_ids: vec![10, 11, 12, 13],
            labels: vec![-100, 11, -100, 13],
            segment_ids: vec![1, 1, 2, 2],
        };
        let short = SftExample {
            input_ids: vec![20],
            labels: vec![20],
            segment_ids: vec![1],
        };
        let batch = collate_sft(&[&packed, &short], 0, Device::Cpu).unwrap();
        let row = |t: &Tensor| Vec::<i64>::try_from(t.flatten(0, 1)).unwrap();
        assert_eq!(row(&batch.input_ids), vec![10, 11, 12, 13, 20, 0, 0, 0]);
        assert_eq!(
            row(&batch.labels),
            vec![-100, 11, -100, 13, 20, -100, -100, -100]
        );
        assert_eq!(
            row(batch.attention_mask.as_ref().unwrap()),
            vec![1, 1, 1, 1, 1, 0, 0, 0]
        );
        assert_eq!(
            row(batch.segment_ids.as_ref().unwrap()),
            vec![1, 1, 2, 2, 1, 0, 0, 0]
        );
        assert_eq!(
            row(batch.position_ids.as_ref().unwrap()),
            vec![0, 1, 0, 1, 0, 0, 0, 0]
        );
    }
}
