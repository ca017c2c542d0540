//! Gradient reduction, bucketed by `reduce_bucket_size` elements per collective:
//! stages 0/1 accumulate full gradients locally and all-reduce (Avg) them at the
//! accumulation boundary; stages 2/3 reduce-scatter every micro-step's block gradient into
//! the owned slice (or all-reduce and keep the slice when `reduce_scatter` is false).
//! With `overlap_comm` the collectives of a block are left in flight while the block
//! before it runs its backward; under stages 2/3 they are waited before the next block's
//! reduction is issued (bounding the flattened gradients alive to about two blocks), and
//! the last ones at the end of the backward pass.
//! Contract: `docs/zero-engine.md`.

use super::engine::ZeroEngine;
use super::in_flight::PendingReduce;
use super::partition::{bucket_pieces, contiguous_buckets};
use crate::comm::{ReduceOp, Work};
use crate::{Error, Result};
use tch::Tensor;

impl ZeroEngine {
    /// Hands block `b`'s (padded,) micro-step gradient to the reducer.
    pub(super) fn reduce_block_gradients(
        &mut self,
        b: usize,
        flat: Tensor,
        last_micro: bool,
    ) -> Result<()> {
        let _span = tracing::debug_span!("reduce_grads", rank = self.rank, block = b).entered();
        if !self.config.stage.partitions_gradients() {
            let grad_full = self.shards[b]
                .grad_full
                .as_ref()
                .ok_or_else(|| missing("full gradient", b))?;
            let mut grad_full = grad_full.shallow_clone();
            let _ = tch::no_grad(|| grad_full.f_add_(&flat))?;
            if last_micro && self.world_size > 1 {
                self.all_reduce_buckets(&grad_full, self.shards[b].layout.padded_numel)?;
            }
            return Ok(());
        }
        // Stages 2/3 keep each block's flattened (padded,) gradient alive until its
        // collectives complete: at most the previous block's stay in flight (they had this
        // block's whole backward to finish), not every block's until the end of the pass
        // (a full model of gradients at the peak).
        self.finish_reductions()?;
        let grad_owned = self.shards[b]
            .grad_owned
            .as_ref()
            .ok_or_else(|| missing("owned gradient", b))?
            .shallow_clone();
        let partition = self.shards[b].layout.partition_numel();
        if self.world_size == 1 {
            let mut owned = grad_owned;
            let _ = tch::no_grad(|| owned.f_add_(&flat))?;
            return Ok(());
        }
        if self.config.reduce_scatter {
            self.reduce_scatter_buckets(&flat, &grad_owned, partition)
        } else {
            self.all_reduce_buckets(&flat, flat.numel())?;
            let start = self.shards[b].owned_start(self.shard_rank) as i64;
            let src = flat.f_narrow(0, start, partition as i64)?;
            self.push(Work::done(), Some((src, grad_owned)), vec![flat])
        }
    }

    /// All-reduces (Avg) `flat` in place, in contiguous buckets.
    fn all_reduce_buckets(&mut self, flat: &Tensor, numel: usize) -> Result<()> {
        for (start, len) in contiguous_buckets(numel, self.config.reduce_bucket_size) {
            let bucket = flat.f_narrow(0, start as i64, len as i64)?;
            let work = self.comm.all_reduce(&bucket, ReduceOp::Avg)?;
            self.push(work, None, vec![bucket])?;
        }
        Ok(())
    }

    /// Reduce-scatters (Avg) `flat` into `grad_owned`: bucket piece `[s, s+k)` of every
    /// rank's partition travels in one collective of `world * k` elements.
    fn reduce_scatter_buckets(
        &mut self,
        flat: &Tensor,
        grad_owned: &Tensor,
        partition: usize,
    ) -> Result<()> {
        let world = self.world_size;
        for (start, len) in bucket_pieces(partition, world, self.config.reduce_bucket_size) {
            let chunks: Vec<Tensor> = (0..world)
                .map(|r| flat.f_narrow(0, (r * partition + start) as i64, len as i64))
                .collect::<std::result::Result<_, _>>()?;
            // (world * len,): chunk r is rank r's piece
            let input = Tensor::f_cat(&chunks, 0)?;
            let output = Tensor::f_zeros([len as i64], (flat.kind(), flat.device()))?;
            let work = self.comm.reduce_scatter(&input, &output, ReduceOp::Avg)?;
            let dst = grad_owned.f_narrow(0, start as i64, len as i64)?;
            self.push(work, Some((output, dst)), vec![input])?;
        }
        Ok(())
    }

    /// Records a started collective; without `overlap_comm` it completes right away.
    fn push(
        &mut self,
        work: Work,
        accumulate: Option<(Tensor, Tensor)>,
        buffers: Vec<Tensor>,
    ) -> Result<()> {
        let pending = PendingReduce {
            work,
            accumulate,
            _buffers: buffers,
        };
        if self.config.overlap_comm {
            self.pending_reduce.push(pending);
            Ok(())
        } else {
            complete(pending)
        }
    }

    /// Waits for every reduction still in flight, in issue order.
    pub(super) fn finish_reductions(&mut self) -> Result<()> {
        for pending in std::mem::take(&mut self.pending_reduce) {
            complete(pending)?;
        }
        Ok(())
    }
}

fn complete(pending: PendingReduce) -> Result<()> {
    pending.work.wait()?;
    if let Some((src, dst)) = pending.accumulate {
        let mut dst = dst;
        let _ = tch::no_grad(|| dst.f_add_(&src))?;
    }
    Ok(())
}

fn missing(what: &str, block: usize) -> Error {
    Error::Engine(format!("block {block} has no {what} buffer for this stage"))
}
