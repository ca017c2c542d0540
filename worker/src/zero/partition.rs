//! Partition arithmetic of one block's flat buffer: where each parameter sits, how much
//! padding makes the buffer split evenly, which slice each rank owns, and how a range of
//! the per-rank partition is cut into collectives no larger than a bucket. Pure integer
//! code; the engine (`engine.rs`) is its only caller.

/// DeepSpeed pads flat buffers to `2 * world_size` elements (`nccl_start_alignment_factor`).
pub const ALIGNMENT_FACTOR: usize = 2;

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub numel: usize,
}

/// The layout of one block's flat buffer over `world_size` partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    pub slots: Vec<ParamSlot>,
    /// Sum of the parameters' element counts.
    pub numel: usize,
    /// `numel` rounded up to a multiple of `ALIGNMENT_FACTOR * world_size`.
    pub padded_numel: usize,
    pub world_size: usize,
}

impl FlatLayout {
    /// Lays `(name, shape)` parameters out back to back, then pads.
    pub fn new(params: &[(String, Vec<i64>)], world_size: usize) -> Self {
        let mut offset = 0;
        let slots = params
            .iter()
            .map(|(name, shape)| {
                let numel = shape.iter().product::<i64>().max(0) as usize;
                let slot = ParamSlot {
                    name: name.clone(),
                    shape: shape.clone(),
                    offset,
                    numel,
                };
                offset += numel;
                slot
            })
            .collect();
        FlatLayout {
            slots,
            numel: offset,
            padded_numel: padded_len(offset, world_size),
            world_size,
        }
    }

    /// Elements each rank owns.
    pub fn partition_numel(&self) -> usize {
        self.padded_numel / self.world_size.max(1)
    }

    /// Offset of rank `rank`'s slice in the flat buffer.
    pub fn partition_start(&self, rank: usize) -> usize {
        rank * self.partition_numel()
    }

    /// Padding elements at the end of the buffer.
    pub fn padding(&self) -> usize {
        self.padded_numel - self.numel
    }
}

/// `numel` rounded up to a multiple of `ALIGNMENT_FACTOR * world_size` (0 stays 0).
pub fn padded_len(numel: usize, world_size: usize) -> usize {
    let unit = ALIGNMENT_FACTOR * world_size.max(1);
    numel.div_ceil(unit) * unit
}

/// Cuts a per-rank partition of `partition_numel` elements into `(start, len)` pieces such
/// that one collective over a piece (`world_size * len` elements) fits in `bucket_elems`.
/// A bucket smaller than the world size still moves one element per rank.
pub fn bucket_pieces(
    partition_numel: usize,
    world_size: usize,
    bucket_elems: usize,
) -> Vec<(usize, usize)> {
    let per_rank = (bucket_elems / world_size.max(1)).max(1);
    (0..partition_numel)
        .step_by(per_rank)
        .map(|start| (start, per_rank.min(partition_numel - start)))
        .collect()
}

/// Cuts a contiguous buffer of `numel` elements into `(start, len)` ranges of at most
/// `bucket_elems` elements (for all-reduce buckets).
pub fn contiguous_buckets(numel: usize, bucket_elems: usize) -> Vec<(usize, usize)> {
    let size = bucket_elems.max(1);
    (0..numel)
        .step_by(size)
        .map(|start| (start, size.min(numel - start)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(sizes: &[i64], world_size: usize) -> FlatLayout {
        let params: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("p{i}"), vec![*n]))
            .collect();
        FlatLayout::new(&params, world_size)
    }

    #[test]
    fn offsets_are_back_to_back_and_padding_splits_evenly() {
        let l = layout(&[3, 5, 7], 4);
        assert_eq!(
            l.slots.iter().map(|s| s.offset).collect::<Vec<_>>(),
            vec![0, 3, 8]
        );
        assert_eq!(l.numel, 15);
        assert_eq!(l.padded_numel, 16);
        assert_eq!(l.partition_numel(), 4);
        assert_eq!(l.partition_start(3), 12);
        assert_eq!(l.padding(), 1);
    }

    #[test]
    fn buffers_smaller_than_the_world_get_one_aligned_unit() {
        let l = layout(&[1], 4);
        assert_eq!(l.padded_numel, 8);
        assert_eq!(l.partition_numel(), 2);
        assert_eq!(padded_len(0, 4), 0);
        assert_eq!(padded_len(1, 1), 2);
    }

    #[test]
    fn every_size_and_world_covers_all_elements_exactly_once() {
        for world in [1usize, 2, 3, 4, 8] {
            for numel in 0..50usize {
                let padded = padded_len(numel, world);
                assert!(
                    padded >= numel
                        && padded.is_multiple_of(2 * world)
                        && padded - numel < 2 * world
                );
                let part = padded / world;
                for bucket in [1usize, 3, 7, 64, 1000] {
                    let pieces = bucket_pieces(part, world, bucket);
                    let covered: usize = pieces.iter().map(|p| p.1).sum();
                    assert_eq!(covered, part);
                    assert!(pieces.iter().all(|p| p.1 * world <= bucket.max(world)));
                    let ranges = contiguous_buckets(padded, bucket);
                    assert_eq!(ranges.iter().map(|r| r.1).sum::<usize>(), padded);
                    assert!(ranges.iter().all(|r| r.1 <= bucket));
                }
            }
        }
    }
}
