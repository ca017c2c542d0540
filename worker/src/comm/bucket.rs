//! Coalesced collectives: many small tensors are packed into flat buckets of at most
//! `bucket_bytes`, one collective is issued per bucket, and the results are unpacked when
//! the returned `Work` is waited on. A tensor larger than a bucket travels alone (without
//! a copy when it is already contiguous); a dtype or device change starts a new bucket.
//! The contract of the collectives themselves is `comm/mod.rs`.

use super::{Communicator, ReduceOp, Work};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Which tensors (by index) go into each bucket, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Vec<usize>>,
}

impl BucketPlan {
    /// Greedy packing in list order: a bucket closes when the next tensor would push it
    /// past `bucket_bytes` or has another `(dtype, device)` key.
    pub fn new<K: PartialEq>(items: &[(usize, K)], bucket_bytes: usize) -> BucketPlan {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut filled = 0usize;
        for (index, (bytes, key)) in items.iter().enumerate() {
            let fits = buckets.last().is_some_and(|bucket| {
                let same_key = bucket.first().is_some_and(|&first| items[first].1 == *key);
                same_key && filled + bytes <= bucket_bytes
            });
            if fits {
                filled += bytes;
                if let Some(bucket) = buckets.last_mut() {
                    bucket.push(index);
                }
            } else {
                buckets.push(vec![index]);
                filled = *bytes;
            }
        }
        BucketPlan { buckets }
    }

    fn for_tensors(tensors: &[Tensor], bucket_bytes: usize) -> BucketPlan {
        let items: Vec<(usize, (Kind, Device))> = tensors
            .iter()
            .map(|t| {
                (
                    t.numel() * t.kind().elt_size_in_bytes(),
                    (t.kind(), t.device()),
                )
            })
            .collect();
        BucketPlan::new(&items, bucket_bytes)
    }
}

fn bucket_error(op: &'static str, rank: usize, detail: String) -> Error {
    Error::Comm {
        op,
        rank,
        numel: 0,
        detail,
    }
}

/// Copies `flat`'s consecutive pieces back into `targets` (each viewed flat).
fn unpack(flat: &Tensor, targets: &[Tensor]) -> Result<()> {
    let mut offset = 0i64;
    for target in targets {
        let numel = target.numel() as i64;
        let piece = flat.f_narrow(0, offset, numel)?.f_view_as(target)?;
        target.shallow_clone().f_copy_(&piece)?;
        offset += numel;
    }
    Ok(())
}

/// Waits for every bucket (so no collective is left running), then unpacks; the first
/// error wins.
fn finish(works: Vec<Work>, unpacks: Vec<(Tensor, Vec<Tensor>)>) -> Result<()> {
    let mut first_error = None;
    for work in works {
        if let Err(e) = work.wait() {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    unpacks
        .iter()
        .try_for_each(|(flat, targets)| unpack(flat, targets))
}

fn flat_views(tensors: &[&Tensor]) -> Result<Vec<Tensor>> {
    Ok(tensors
        .iter()
        .map(|t| t.f_reshape([-1]))
        .collect::<std::result::Result<_, _>>()?)
}

/// All-reduces every tensor of `tensors` in place, through buckets of `bucket_bytes`.
pub fn all_reduce_bucketed(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<Work> {
    let _span = tracing::debug_span!(
        "all_reduce_bucketed",
        rank = comm.rank(),
        tensors = tensors.len(),
        bucket_bytes
    )
    .entered();
    let plan = BucketPlan::for_tensors(tensors, bucket_bytes);
    let (mut works, mut unpacks) = (Vec::new(), Vec::new());
    for bucket in &plan.buckets {
        let members: Vec<&Tensor> = bucket.iter().map(|&i| &tensors[i]).collect();
        if let [single] = members.as_slice() {
            if single.is_contiguous() {
                works.push(comm.all_reduce(single, op)?);
                continue;
            }
        }
        let flat = Tensor::f_cat(&flat_views(&members)?, 0)?; // (sum of numels,)
        works.push(comm.all_reduce(&flat, op)?);
        unpacks.push((flat, members.iter().map(|t| t.shallow_clone()).collect()));
    }
    Ok(Work::new(move || finish(works, unpacks)))
}

/// Reduce-scatters each `inputs[i]` (`world * outputs[i].numel()` elements) into
/// `outputs[i]`, through buckets of at most `bucket_bytes` of input. A bucket is laid out
/// rank-major, `(world, sum of chunk sizes)`, so one reduce-scatter hands every rank its
/// chunk of every tensor in the bucket.
pub fn reduce_scatter_bucketed(
    comm: &dyn Communicator,
    inputs: &[Tensor],
    outputs: &[Tensor],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<Work> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let _span = tracing::debug_span!(
        "reduce_scatter_bucketed",
        rank,
        tensors = inputs.len(),
        bucket_bytes
    )
    .entered();
    if inputs.len() != outputs.len() {
        return Err(bucket_error(
            "reduce_scatter",
            rank,
            format!("{} inputs for {} outputs", inputs.len(), outputs.len()),
        ));
    }
    let plan = BucketPlan::for_tensors(inputs, bucket_bytes);
    let (mut works, mut unpacks) = (Vec::new(), Vec::new());
    for bucket in &plan.buckets {
        let rows = bucket
            .iter()
            .map(|&i| inputs[i].f_reshape([world as i64, outputs[i].numel() as i64])) // (world, chunk_i)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| {
                bucket_error(
                    "reduce_scatter",
                    rank,
                    format!("an input is not world x output: {e}"),
                )
            })?;
        let packed = Tensor::f_cat(&rows, 1)?.f_reshape([-1])?; // (world * sum chunk_i,)
        let chunk: i64 = bucket.iter().map(|&i| outputs[i].numel() as i64).sum();
        let flat_out = packed.f_new_empty([chunk], (packed.kind(), packed.device()))?; // (sum chunk_i,)
        works.push(comm.reduce_scatter(&packed, &flat_out, op)?);
        unpacks.push((
            flat_out,
            bucket.iter().map(|&i| outputs[i].shallow_clone()).collect(),
        ));
    }
    Ok(Work::new(move || finish(works, unpacks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_respects_size_and_key() {
        let items = [
            (40, 'f'),
            (40, 'f'),
            (40, 'f'),
            (200, 'f'),
            (10, 'b'),
            (10, 'f'),
        ];
        let plan = BucketPlan::new(&items, 100);
        assert_eq!(
            plan.buckets,
            vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]
        );
        let empty: [(usize, u8); 0] = [];
        assert!(BucketPlan::new(&empty, 100).buckets.is_empty());
    }
}
