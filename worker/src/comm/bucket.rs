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
        if let [single] = members.as_slice()
            && single.is_contiguous()
        {
            works.push(comm.all_reduce(single, op)?);
            continue;
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
    use crate::comm::tcp::testing::{run_world, test_options};

    /// Mixed sizes (some over the bucket), integer-valued so any summation order is exact.
    fn tensors_for(rank: usize, sizes: &[i64]) -> Result<Vec<Tensor>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let base = Tensor::f_arange(n, (Kind::Float, Device::Cpu))?;
                Ok(base
                    .f_remainder((7 + i + rank) as i64)?
                    .f_add_scalar((rank * 3) as i64)?)
            })
            .collect()
    }

    const SIZES: [i64; 9] = [3, 100, 1, 257, 40, 1000, 64, 5, 333];
    const BUCKET_BYTES: usize = 1024;

    #[test]
    fn bucketed_all_reduce_equals_one_big_reduction() -> Result<()> {
        let results = run_world(3, test_options(128), |rank, comm| {
            let tensors = tensors_for(rank, &SIZES)?;
            let flat = Tensor::f_cat(&tensors, 0)?;
            comm.all_reduce(&flat, ReduceOp::Sum)?.wait()?;
            comm.trace().set_enabled(true);
            all_reduce_bucketed(&comm, &tensors, ReduceOp::Sum, BUCKET_BYTES)?.wait()?;
            let events = comm.trace().take();
            assert!(
                Tensor::f_cat(&tensors, 0)?.f_equal(&flat)?,
                "bucketed result equals the big reduction"
            );
            Ok(events)
        })?;
        // Tensors over the bucket size travel alone; the rest fill ceil(bytes / B)-ish buckets.
        let bytes: Vec<usize> = SIZES.iter().map(|&n| n as usize * 4).collect();
        let oversized = bytes.iter().filter(|&&b| b > BUCKET_BYTES).count();
        let small_total: usize = bytes.iter().filter(|&&b| b <= BUCKET_BYTES).sum();
        let lower = oversized + small_total.div_ceil(BUCKET_BYTES);
        for events in results {
            let events = events?;
            assert!(
                events.len() >= lower && events.len() <= 2 * lower + 1,
                "{} collectives for {lower} buckets' worth",
                events.len()
            );
            for event in &events {
                let oversized_single = SIZES
                    .iter()
                    .any(|&n| n as usize * 4 == event.bytes && event.bytes > BUCKET_BYTES);
                assert!(
                    event.op == "all_reduce" && (event.bytes <= BUCKET_BYTES || oversized_single),
                    "{event:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bucketed_reduce_scatter_equals_per_tensor_reduce_scatter() -> Result<()> {
        let world = 3usize;
        let chunks: Vec<i64> = SIZES.to_vec();
        let results = run_world(world, test_options(96), move |rank, comm| {
            let inputs = tensors_for(
                rank,
                &chunks.iter().map(|c| c * world as i64).collect::<Vec<_>>(),
            )?;
            let zeros = |c: &i64| Tensor::f_zeros([*c], (Kind::Float, Device::Cpu));
            let expected = chunks
                .iter()
                .map(zeros)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            for (input, output) in inputs.iter().zip(&expected) {
                comm.reduce_scatter(input, output, ReduceOp::Avg)?.wait()?;
            }
            let outputs = chunks
                .iter()
                .map(zeros)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            comm.trace().set_enabled(true);
            reduce_scatter_bucketed(&comm, &inputs, &outputs, ReduceOp::Avg, BUCKET_BYTES)?
                .wait()?;
            let events = comm.trace().take();
            for (got, want) in outputs.iter().zip(&expected) {
                assert!(
                    got.f_allclose(want, 1e-6, 1e-6, false)?,
                    "bucketed chunk equals the per-tensor chunk"
                );
            }
            assert!(
                events.iter().all(|e| e.op == "reduce_scatter"),
                "{events:?}"
            );
            assert!(
                events.len() < chunks.len(),
                "tensors were coalesced: {events:?}"
            );
            Ok(())
        })?;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

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
