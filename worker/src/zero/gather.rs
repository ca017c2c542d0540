//! Stage-3 parameter gathering: a block's owned slices are all-gathered (in
//! `allgather_bucket_size` pieces) into a full buffer just before its forward and again
//! before its backward, the next block is prefetched when it fits in
//! `stage3_prefetch_bucket_size` and `stage3_max_live_parameters`, and gathered
//! parameters are freed after use except those at or below
//! `stage3_param_persistence_threshold` (a block whose parameters are all persistent is
//! gathered once per optimizer step). Also the stage 1/2 post-step all-gather.
//! Contract: `docs/zero-engine.md`.

use super::engine::{ZeroEngine, point_params_at};
use super::partition::bucket_pieces;
use crate::comm::Work;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// One all-gather piece in flight: per-rank range `[start, start + len)` of the partition.
struct GatherPiece {
    work: Work,
    /// (world * len,) receive buffer; None when the gather wrote straight into `full`.
    staging: Option<Tensor>,
    start: usize,
    len: usize,
}

/// A block's gather in flight (a prefetch, or a synchronous gather not yet waited).
pub(super) struct PendingGather {
    block: usize,
    full: Tensor,
    pieces: Vec<GatherPiece>,
}

impl ZeroEngine {
    /// All-gathers the (P,) `owned` slice of every rank into a new (padded,) buffer, in
    /// pieces of at most `allgather_bucket_size` elements per collective.
    fn start_gather(
        &self,
        owned: &Tensor,
        partition: usize,
        kind: Kind,
    ) -> Result<(Tensor, Vec<GatherPiece>)> {
        let world = self.world_size;
        let full = Tensor::f_empty([(partition * world) as i64], (kind, owned.device()))?;
        let pieces = bucket_pieces(partition, world, self.config.allgather_bucket_size);
        let mut started = Vec::with_capacity(pieces.len());
        for (start, len) in pieces {
            let input = owned.f_narrow(0, start as i64, len as i64)?;
            if len == partition {
                let work = self.comm.all_gather(&input, &full)?;
                started.push(GatherPiece {
                    work,
                    staging: None,
                    start,
                    len,
                });
            } else {
                let staging = Tensor::f_empty([(len * world) as i64], (kind, owned.device()))?;
                let work = self.comm.all_gather(&input, &staging)?;
                started.push(GatherPiece {
                    work,
                    staging: Some(staging),
                    start,
                    len,
                });
            }
        }
        Ok((full, started))
    }

    /// Waits for every piece and scatters staged pieces into `full`.
    fn finish_gather(
        &self,
        full: &Tensor,
        pieces: Vec<GatherPiece>,
        partition: usize,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for piece in pieces {
            piece.work.wait()?;
            let Some(staging) = piece.staging else {
                continue;
            };
            for r in 0..self.world_size {
                let mut dst =
                    full.f_narrow(0, (r * partition + piece.start) as i64, piece.len as i64)?;
                dst.f_copy_(&staging.f_narrow(0, (r * piece.len) as i64, piece.len as i64)?)?;
            }
        }
        Ok(())
    }

    fn note_live(&mut self) {
        let peak = &mut self.stage3_stats.peak_live_numel;
        *peak = (*peak).max(self.live_numel);
    }

    fn block_needs_gather(&self, b: usize) -> bool {
        let shard = &self.shards[b];
        !shard.is_empty() && shard.gathered.is_none() && !shard.resident
    }

    /// Starts gathering block `b` in the background when the stage-3 limits allow it.
    pub(super) fn maybe_prefetch(&mut self, b: usize) -> Result<()> {
        if b >= self.shards.len() || self.prefetch.is_some() || !self.block_needs_gather(b) {
            return Ok(());
        }
        let numel = self.shards[b].layout.padded_numel;
        if numel > self.config.stage3_prefetch_bucket_size
            || self.live_numel + numel > self.config.stage3_max_live_parameters
            || self.world_size == 1
        {
            return Ok(());
        }
        let _span = tracing::debug_span!("prefetch_params", rank = self.rank, block = b).entered();
        let shard = &self.shards[b];
        let (full, pieces) = self.start_gather(
            &shard.compute,
            shard.layout.partition_numel(),
            shard.compute.kind(),
        )?;
        self.live_numel += numel;
        self.stage3_stats.prefetches += 1;
        self.note_live();
        self.prefetch = Some(PendingGather {
            block: b,
            full,
            pieces,
        });
        Ok(())
    }

    /// Makes block `b`'s full parameters available (waiting for its prefetch, or
    /// gathering now), pointing its parameters at the gathered buffer.
    pub(super) fn ensure_gathered(&mut self, b: usize) -> Result<()> {
        if let Some(pending) = self.prefetch.take() {
            // Collectives complete in issue order: finish the prefetch before anything else.
            let partition = self.shards[pending.block].layout.partition_numel();
            self.finish_gather(&pending.full, pending.pieces, partition)?;
            self.install(pending.block, pending.full)?;
        }
        if !self.block_needs_gather(b) {
            return Ok(());
        }
        let _span = tracing::debug_span!("gather_params", rank = self.rank, block = b).entered();
        let shard = &self.shards[b];
        let partition = shard.layout.partition_numel();
        let full = if self.world_size == 1 {
            shard.compute.shallow_clone()
        } else {
            let (full, pieces) =
                self.start_gather(&shard.compute, partition, shard.compute.kind())?;
            self.finish_gather(&full, pieces, partition)?;
            full
        };
        self.live_numel += self.shards[b].layout.padded_numel;
        self.stage3_stats.gathers += 1;
        self.note_live();
        self.install(b, full)
    }

    /// Points block `b`'s parameters at `full` (persistent ones get their own copy).
    fn install(&mut self, b: usize, full: Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let shard = &mut self.shards[b];
        point_params_at(&mut shard.params, &shard.layout, &full)?;
        for (p, persistent) in shard.params.iter_mut().zip(&shard.persistent) {
            if *persistent {
                let own = p.f_detach()?.f_detach_copy()?;
                p.f_set_data(&own)?;
            }
        }
        if shard.persistent.iter().all(|p| *p) {
            shard.resident = true;
            self.live_numel -= shard.layout.padded_numel;
        } else {
            shard.gathered = Some(full);
        }
        Ok(())
    }

    /// Frees block `b`'s gathered, non-persistent parameters.
    pub(super) fn release_block(&mut self, b: usize) -> Result<()> {
        let shard = &mut self.shards[b];
        if shard.gathered.take().is_none() {
            return Ok(());
        }
        let empty = Tensor::f_empty([0], (shard.compute.kind(), shard.compute.device()))?;
        for (p, persistent) in shard.params.iter_mut().zip(&shard.persistent) {
            if !*persistent {
                p.f_set_data(&empty)?;
            }
        }
        self.live_numel -= shard.layout.padded_numel;
        Ok(())
    }

    /// Stage 3 after a step: resident copies are stale, gather them again next time.
    pub(super) fn invalidate_resident(&mut self) {
        for shard in &mut self.shards {
            shard.resident = false;
        }
    }

    /// Stages 1/2 after a step: every rank's updated slice is all-gathered into every
    /// rank's full compute buffer.
    pub(super) fn all_gather_updated_params(&mut self) -> Result<()> {
        if self.shard_world == 1 {
            return Ok(());
        }
        for b in 0..self.shards.len() {
            let shard = &self.shards[b];
            if shard.is_empty() {
                continue;
            }
            let _span =
                tracing::debug_span!("allgather_params", rank = self.rank, block = b).entered();
            let partition = shard.layout.partition_numel();
            let owned = shard
                .compute
                .f_narrow(
                    0,
                    shard.owned_start(self.shard_rank) as i64,
                    partition as i64,
                )?
                .f_detach_copy()?;
            let (full, pieces) = self.start_gather(&owned, partition, owned.kind())?;
            self.finish_gather(&full, pieces, partition)?;
            let mut compute = self.shards[b].compute.shallow_clone();
            tch::no_grad(|| compute.f_copy_(&full))?;
        }
        Ok(())
    }

    /// Drops any prefetch and gathered buffer (before a step changes the slices).
    pub(super) fn settle_gathers(&mut self) -> Result<()> {
        if let Some(pending) = self.prefetch.take() {
            let partition = self.shards[pending.block].layout.partition_numel();
            self.finish_gather(&pending.full, pending.pieces, partition)?;
            self.live_numel -= self.shards[pending.block].layout.padded_numel;
        }
        for b in 0..self.shards.len() {
            self.release_block(b)?;
        }
        if self.live_numel != 0 {
            return Err(Error::Engine(format!(
                "stage 3 live-parameter count off by {}",
                self.live_numel
            )));
        }
        Ok(())
    }
}
