//! Stage-3 parameter gathering: a block's owned slices are all-gathered (in
//! `allgather_bucket_size` pieces) into a full buffer just before its forward and again
//! before its backward, the next block is prefetched when it fits in
//! `stage3_prefetch_bucket_size` and `stage3_max_live_parameters`, and gathered
//! parameters are freed after use except those at or below
//! `stage3_param_persistence_threshold` (a block whose parameters are all persistent is
//! gathered once per optimizer step). Frozen parameters (a LoRA base) are partitioned
//! under stage 3 too and gathered with their block's trainable ones, under the same
//! prefetch, persistence and free rules. Also the stage 1/2 post-step all-gather.
//! Contract: `docs/zero-engine.md`.

use super::engine::{FrozenPart, ZeroEngine, point_params_at};
use super::in_flight::{GatherPart, GatherPiece, PendingGather};
use super::partition::bucket_pieces;
use crate::{Error, Result};
use tch::{Kind, Tensor};

impl ZeroEngine {
    /// All-gathers the (P,) `owned` slice of every rank into a new (padded,) buffer, in
    /// pieces of at most `allgather_bucket_size` elements per collective.
    fn start_gather(
        &self,
        owned: &Tensor,
        partition: usize,
        kind: Kind,
        into: Option<Tensor>,
    ) -> Result<(Tensor, Vec<GatherPiece>)> {
        let world = self.world_size;
        let full = match into {
            Some(buffer) => buffer,
            None => Tensor::f_empty([(partition * world) as i64], (kind, owned.device()))?,
        };
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
        (!shard.is_empty() || shard.frozen.is_some()) && !shard.is_gathered() && !shard.resident
    }

    /// Starts gathering one (P,) slice (nothing to exchange at world size 1) into `into`
    /// (the block's kept buffer) or a new buffer.
    fn start_part(
        &self,
        owned: &Tensor,
        partition: usize,
        into: Option<Tensor>,
    ) -> Result<GatherPart> {
        if self.world_size == 1 {
            return Ok(GatherPart {
                full: owned.shallow_clone(),
                pieces: Vec::new(),
                partition,
            });
        }
        let (full, pieces) = self.start_gather(owned, partition, owned.kind(), into)?;
        Ok(GatherPart {
            full,
            pieces,
            partition,
        })
    }

    /// Starts block `b`'s gathers: the trainable buffer, then the frozen one.
    fn start_block_gather(&self, b: usize) -> Result<PendingGather> {
        let shard = &self.shards[b];
        let trainable = if shard.is_empty() {
            None
        } else {
            let kept = self.kept_buffers[b].0.as_ref().map(|t| t.shallow_clone());
            Some(self.start_part(&shard.compute, shard.layout.partition_numel(), kept)?)
        };
        let frozen = match &shard.frozen {
            Some(f) => {
                let kept = self.kept_buffers[b].1.as_ref().map(|t| t.shallow_clone());
                Some(self.start_part(&f.owned, f.layout.partition_numel(), kept)?)
            }
            None => None,
        };
        Ok(PendingGather {
            block: b,
            trainable,
            frozen,
        })
    }

    /// Waits for a block's gathers; returns the full (trainable, frozen) buffers.
    fn finish_block_gather(
        &self,
        pending: PendingGather,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let finish = |part: Option<GatherPart>| -> Result<Option<Tensor>> {
            let Some(part) = part else { return Ok(None) };
            self.finish_gather(&part.full, part.pieces, part.partition)?;
            Ok(Some(part.full))
        };
        let trainable = finish(pending.trainable)?;
        let frozen = finish(pending.frozen)?;
        Ok((trainable, frozen))
    }

    /// Starts gathering block `b` in the background when the stage-3 limits allow it.
    pub(super) fn maybe_prefetch(&mut self, b: usize) -> Result<()> {
        if b >= self.shards.len() || self.prefetch.is_some() || !self.block_needs_gather(b) {
            return Ok(());
        }
        let numel = self.shards[b].gather_numel();
        if numel > self.config.stage3_prefetch_bucket_size
            || self.live_numel + numel > self.config.stage3_max_live_parameters
            || self.world_size == 1
        {
            return Ok(());
        }
        let _span = tracing::debug_span!("prefetch_params", rank = self.rank, block = b).entered();
        let pending = self.start_block_gather(b)?;
        self.live_numel += numel;
        self.stage3_stats.prefetches += 1;
        self.note_live();
        self.prefetch = Some(pending);
        Ok(())
    }

    /// Makes block `b`'s full parameters available (waiting for its prefetch, or
    /// gathering now), pointing its parameters at the gathered buffers.
    pub(super) fn ensure_gathered(&mut self, b: usize) -> Result<()> {
        if let Some(pending) = self.prefetch.take() {
            // Collectives complete in issue order: finish the prefetch before anything else.
            let block = pending.block;
            let (trainable, frozen) = self.finish_block_gather(pending)?;
            self.install(block, trainable, frozen)?;
        }
        if !self.block_needs_gather(b) {
            return Ok(());
        }
        let _span = tracing::debug_span!("gather_params", rank = self.rank, block = b).entered();
        let pending = self.start_block_gather(b)?;
        let (trainable, frozen) = self.finish_block_gather(pending)?;
        self.live_numel += self.shards[b].gather_numel();
        self.stage3_stats.gathers += 1;
        self.note_live();
        self.install(b, trainable, frozen)
    }

    /// Points block `b`'s parameters at the gathered buffers (persistent ones get their
    /// own copy); a block whose parameters are all persistent becomes resident.
    fn install(
        &mut self,
        b: usize,
        trainable: Option<Tensor>,
        frozen: Option<Tensor>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let keep = self.keeps_gather_buffers();
        if keep {
            let clone = |t: &Option<Tensor>| t.as_ref().map(|t| t.shallow_clone());
            self.kept_buffers[b] = (clone(&trainable), clone(&frozen));
        }
        let shard = &mut self.shards[b];
        if let Some(full) = &trainable {
            point_params_at(&mut shard.params, &shard.layout, full)?;
            keep_persistent_copies(&mut shard.params, &shard.persistent)?;
        }
        if let (Some(part), Some(full)) = (shard.frozen.as_mut(), &frozen) {
            point_params_at(&mut part.params, &part.layout, full)?;
            keep_persistent_copies(&mut part.params, &part.persistent)?;
        }
        let all_persistent = shard.persistent.iter().all(|p| *p)
            && shard
                .frozen
                .as_ref()
                .is_none_or(|f| f.persistent.iter().all(|p| *p));
        if all_persistent {
            shard.resident = true;
            self.live_numel -= shard.gather_numel();
            if keep {
                discard_block_pages(trainable.as_ref(), frozen.as_ref());
            }
        } else {
            shard.gathered = trainable;
            if let Some(part) = shard.frozen.as_mut() {
                part.gathered = frozen;
            }
        }
        Ok(())
    }

    /// Frees block `b`'s gathered, non-persistent parameters.
    pub(super) fn release_block(&mut self, b: usize) -> Result<()> {
        let keep = self.keeps_gather_buffers();
        let shard = &mut self.shards[b];
        if !shard.is_gathered() {
            return Ok(());
        }
        let numel = shard.gather_numel();
        if keep {
            let frozen = shard.frozen.as_ref().and_then(|f| f.gathered.as_ref());
            discard_block_pages(shard.gathered.as_ref(), frozen);
        }
        if shard.gathered.take().is_some() {
            let (kind, device) = (shard.compute.kind(), shard.compute.device());
            free_non_persistent(&mut shard.params, &shard.persistent, kind, device)?;
        }
        if let Some(part) = shard.frozen.as_mut() {
            release_frozen(part)?;
        }
        self.live_numel -= numel;
        Ok(())
    }

    /// Stage 3 on the CPU with several ranks: each block keeps its gathered buffers for
    /// the engine's lifetime and hands their pages back to the OS when released
    /// (`discard_pages`), instead of dropping them. Autograd's saved views of a gathered
    /// buffer (a block's graph between its forward and backward) then stop pinning its
    /// memory; the re-gather before the backward writes the same values into the same
    /// buffer. Elsewhere the buffers are dropped on release.
    pub(super) fn keeps_gather_buffers(&self) -> bool {
        self.world_size > 1 && self.config.device == tch::Device::Cpu
    }

    /// Stage 3 after a step: resident copies of trainable parameters are stale, gather
    /// them again next time (all-frozen resident blocks never change and stay).
    pub(super) fn invalidate_resident(&mut self) {
        for shard in &mut self.shards {
            shard.resident = shard.resident && shard.is_empty();
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
            let (full, pieces) = self.start_gather(&owned, partition, owned.kind(), None)?;
            self.finish_gather(&full, pieces, partition)?;
            let mut compute = self.shards[b].compute.shallow_clone();
            tch::no_grad(|| compute.f_copy_(&full))?;
        }
        Ok(())
    }

    /// Drops any prefetch and gathered buffer (before a step changes the slices).
    pub(super) fn settle_gathers(&mut self) -> Result<()> {
        if let Some(pending) = self.prefetch.take() {
            let block = pending.block;
            let (trainable, frozen) = self.finish_block_gather(pending)?;
            if self.keeps_gather_buffers() {
                discard_block_pages(trainable.as_ref(), frozen.as_ref());
            }
            self.live_numel -= self.shards[block].gather_numel();
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

/// Gives each persistent parameter its own copy of its gathered values.
fn keep_persistent_copies(params: &mut [Tensor], persistent: &[bool]) -> Result<()> {
    for (p, persistent) in params.iter_mut().zip(persistent) {
        if *persistent {
            let own = p.f_detach()?.f_detach_copy()?;
            p.f_set_data(&own)?;
        }
    }
    Ok(())
}

/// Points the non-persistent parameters at an empty tensor.
fn free_non_persistent(
    params: &mut [Tensor],
    persistent: &[bool],
    kind: Kind,
    device: tch::Device,
) -> Result<()> {
    let empty = Tensor::f_empty([0], (kind, device))?;
    for (p, persistent) in params.iter_mut().zip(persistent) {
        if !*persistent {
            p.f_set_data(&empty)?;
        }
    }
    Ok(())
}

/// Frees a frozen part's gathered buffer and its non-persistent parameters.
fn release_frozen(part: &mut FrozenPart) -> Result<()> {
    if part.gathered.take().is_some() {
        let (kind, device) = (part.owned.kind(), part.owned.device());
        free_non_persistent(&mut part.params, &part.persistent, kind, device)?;
    }
    Ok(())
}

/// `discard_pages` on a block's gathered (trainable, frozen) buffers, where present.
fn discard_block_pages(trainable: Option<&Tensor>, frozen: Option<&Tensor>) {
    trainable.into_iter().chain(frozen).for_each(discard_pages);
}

/// Hands the whole pages inside a CPU buffer back to the OS (`madvise(MADV_DONTNEED)`).
/// The tensor stays valid: those pages read as zeros until written again, and nothing
/// reads a released buffer before the next gather rewrites it.
fn discard_pages(buffer: &Tensor) {
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    };
    let start = buffer.data_ptr() as usize;
    let bytes = buffer.numel() * buffer.kind().elt_size_in_bytes();
    let (first, end) = (start.div_ceil(page) * page, (start + bytes) / page * page);
    if end <= first {
        return;
    }
    // SAFETY: [first, end) is whole pages inside the buffer's own allocation, which stays
    // allocated (the engine keeps the tensor); MADV_DONTNEED on the CPU allocator's
    // private anonymous memory only makes those pages zero-filled on the next access.
    let rc = unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
    if rc != 0 {
        tracing::debug!(
            "madvise(MADV_DONTNEED) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}
