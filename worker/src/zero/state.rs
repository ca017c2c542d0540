//! What the engine holds, for memory accounting and checkpoints: `memory_report` counts
//! the bytes of the tensors this rank actually keeps (parameters, gradients, optimizer
//! state); `owned_state`/`load_owned_state` expose each block's owned fp32 master slice
//! and Adam moments with the layout needed to reshard them; `gather_full_weights`
//! rebuilds full fp32 weights by Hugging Face name from any stage (a collective).
//! Contract: `docs/zero-engine.md`.

use super::adamw::AdamTensors;
use super::config::ZeroStage;
use super::engine::ZeroEngine;
use super::loss_scaler::LossScalerState;
use super::partition::FlatLayout;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// Bytes this rank holds for model states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// Compute-precision parameters (full buffers, or owned slices + persistent/gathered
    /// ones under stage 3), frozen parameters included.
    pub param_bytes: usize,
    /// Gradient buffers kept between micro-steps (full, or owned slices).
    pub grad_bytes: usize,
    /// fp32 master weights plus Adam's two moments kept in memory.
    pub optimizer_bytes: usize,
    /// The same kept in files under `nvme_path` instead (NVMe offload).
    pub swapped_optimizer_bytes: usize,
    /// The part of `param_bytes` that is frozen parameters (e.g. a LoRA base): whole
    /// below stage 3, the owned slice (+ gathered/persistent copies) under stage 3.
    pub frozen_bytes: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }
}

/// One block's owned optimizer partition and the layout to place it.
pub struct BlockOwnedState {
    pub block: usize,
    /// Names, shapes and offsets in the flat buffer, padding, partition world size.
    pub layout: FlatLayout,
    /// Which partition this is (0 under stage 0, where the partition is everything).
    pub partition_rank: usize,
    /// (P,) fp32 tensors: master weights, exp_avg, exp_avg_sq.
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// This rank's whole optimizer-side state.
pub struct OwnedState {
    pub stage: ZeroStage,
    pub world_size: usize,
    pub rank: usize,
    /// Applied optimizer steps (Adam's step, the scheduler position).
    pub optimizer_steps: u64,
    pub global_steps: u64,
    pub skipped_steps: u64,
    pub loss_scaler: LossScalerState,
    pub blocks: Vec<BlockOwnedState>,
}

impl ZeroEngine {
    /// Bytes of model states this rank holds now.
    pub fn memory_report(&self) -> MemoryReport {
        let bytes = |t: &Tensor| {
            if t.defined() {
                t.numel() * t.kind().elt_size_in_bytes()
            } else {
                0
            }
        };
        let mut report = MemoryReport {
            param_bytes: 0,
            grad_bytes: 0,
            optimizer_bytes: 0,
            swapped_optimizer_bytes: 0,
            frozen_bytes: 0,
        };
        for shard in &self.shards {
            report.param_bytes += bytes(&shard.compute);
            if let Some(full) = &shard.gathered {
                report.param_bytes += bytes(full);
            }
            for (p, persistent) in shard.params.iter().zip(&shard.persistent) {
                if *persistent && self.config.stage.partitions_parameters() {
                    report.param_bytes += bytes(p);
                }
            }
            if let Some(part) = &shard.frozen {
                report.frozen_bytes += bytes(&part.owned);
                if let Some(full) = &part.gathered {
                    report.frozen_bytes += bytes(full);
                }
                for (p, persistent) in part.params.iter().zip(&part.persistent) {
                    if *persistent {
                        report.frozen_bytes += bytes(p);
                    }
                }
            }
            for grad in [&shard.grad_full, &shard.grad_owned].into_iter().flatten() {
                report.grad_bytes += bytes(grad);
            }
            if let Some(optim) = &shard.optim {
                report.optimizer_bytes += optim.bytes();
                report.swapped_optimizer_bytes += optim.swapped_bytes();
            }
        }
        report.frozen_bytes += self
            .frozen_params
            .iter()
            .map(|(_, t)| bytes(t))
            .sum::<usize>();
        report.param_bytes += report.frozen_bytes;
        report
    }

    /// Copies of this rank's owned optimizer partitions with their layout.
    pub fn owned_state(&self) -> Result<OwnedState> {
        self.owned_state_with(|t| Ok(t.f_detach_copy()?))
    }

    /// Like `owned_state`, but the tensors share the engine's storage (no copy): the next
    /// `step()` or load changes them, so copy what must outlive that (the checkpoint
    /// snapshot does, `checkpoint::save`).
    pub fn owned_state_view(&self) -> Result<OwnedState> {
        self.owned_state_with(|t| Ok(t.f_detach()?))
    }

    fn owned_state_with(&self, take: impl Fn(&Tensor) -> Result<Tensor>) -> Result<OwnedState> {
        let mut blocks = Vec::new();
        for (b, shard) in self.shards.iter().enumerate() {
            let Some(optim) = &shard.optim else { continue };
            let tensors = optim.tensors()?;
            blocks.push(BlockOwnedState {
                block: b,
                layout: shard.layout.clone(),
                partition_rank: self.shard_rank,
                master: take(&tensors.master)?,
                exp_avg: take(&tensors.exp_avg)?,
                exp_avg_sq: take(&tensors.exp_avg_sq)?,
            });
        }
        Ok(OwnedState {
            stage: self.config.stage,
            world_size: self.world_size,
            rank: self.rank,
            optimizer_steps: self.optimizer_steps,
            global_steps: self.global_steps,
            skipped_steps: self.skipped_steps,
            loss_scaler: self.scaler.state(),
            blocks,
        })
    }

    /// Restores a state saved by `owned_state` with the same stage and world size, and
    /// refreshes the compute buffers from the masters (a collective under stages 1/2).
    pub fn load_owned_state(&mut self, state: &OwnedState) -> Result<()> {
        if state.stage != self.config.stage || state.world_size != self.world_size {
            return Err(Error::Engine(format!(
                "owned state is stage {} world {}, engine is stage {} world {}: reshard it first",
                state.stage, state.world_size, self.config.stage, self.world_size
            )));
        }
        let _guard = tch::no_grad_guard();
        for saved in &state.blocks {
            let shard = self
                .shards
                .get_mut(saved.block)
                .ok_or_else(|| Error::Engine(format!("no block {}", saved.block)))?;
            if shard.layout != saved.layout || saved.partition_rank != self.shard_rank {
                return Err(Error::Engine(format!(
                    "block {}: layout or partition differs from the saved one",
                    saved.block
                )));
            }
            let optim = shard
                .optim
                .as_mut()
                .ok_or_else(|| Error::Engine(format!("block {} has no optimizer", saved.block)))?;
            optim.set(&AdamTensors {
                master: saved.master.shallow_clone(),
                exp_avg: saved.exp_avg.shallow_clone(),
                exp_avg_sq: saved.exp_avg_sq.shallow_clone(),
            })?;
            let updated = saved
                .master
                .f_to_kind(shard.compute.kind())?
                .f_to_device(shard.compute.device())?;
            let mut target = if self.config.stage.partitions_parameters() {
                shard.compute.shallow_clone()
            } else {
                let start = shard.layout.partition_start(self.shard_rank) as i64;
                shard.compute.f_narrow(0, start, updated.numel() as i64)?
            };
            target.f_copy_(&updated)?;
        }
        self.optimizer_steps = state.optimizer_steps;
        self.global_steps = state.global_steps;
        self.skipped_steps = state.skipped_steps;
        self.scaler.load_state(state.loss_scaler);
        if self.config.stage.partitions_parameters() {
            self.invalidate_resident();
            Ok(())
        } else {
            self.all_gather_updated_params()
        }
    }

    /// Full fp32 weights by Hugging Face name, in block order (frozen ones included, cast
    /// to fp32). Every rank must call it (it all-gathers the masters when partitioned).
    pub fn gather_full_weights(&mut self) -> Result<Vec<(String, Tensor)>> {
        let _span = tracing::info_span!("gather_full_weights", rank = self.rank).entered();
        let mut weights = self.gather_trainable_weights()?;
        for (name, tensor) in self.frozen_weights(true)? {
            weights.push((name, tensor.f_to_kind(Kind::Float)?));
        }
        Ok(weights)
    }

    /// Full fp32 weights of the trainable parameters only (e.g. LoRA adapters, without
    /// the frozen base), by name in block order. A collective like `gather_full_weights`.
    pub fn gather_trainable_weights(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut weights = Vec::new();
        for b in 0..self.shards.len() {
            weights.extend(self.gather_block_weights(b, true)?);
        }
        Ok(weights)
    }

    /// Number of blocks (for `gather_block_weights`).
    pub fn block_count(&self) -> usize {
        self.shards.len()
    }

    /// Names and shapes of block `b`'s trainable parameters, in `gather_block_weights`
    /// order (empty for a block without trainable parameters or past the end).
    pub fn block_weight_specs(&self, b: usize) -> Vec<(String, Vec<i64>)> {
        match self.shards.get(b) {
            Some(shard) if shard.optim.is_some() => shard
                .layout
                .slots
                .iter()
                .map(|slot| (slot.name.clone(), slot.shape.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Full fp32 weights of block `b`'s trainable parameters by name. A collective when
    /// the masters are partitioned (every rank calls it for the same `b`); ranks passing
    /// `keep` false take part and get nothing back.
    pub fn gather_block_weights(&mut self, b: usize, keep: bool) -> Result<Vec<(String, Tensor)>> {
        let shard = self
            .shards
            .get(b)
            .ok_or_else(|| Error::Engine(format!("no block {b}")))?;
        let Some(optim) = &shard.optim else {
            return Ok(Vec::new());
        };
        let master = optim.master()?; // (P,)
        let full = if self.shard_world == 1 {
            master
        } else {
            let full = Tensor::f_empty(
                [shard.layout.padded_numel as i64],
                (Kind::Float, master.device()),
            )?; // (padded,)
            self.comm.all_gather(&master, &full)?.wait()?;
            full
        };
        if !keep {
            return Ok(Vec::new());
        }
        slot_copies(&shard.layout, &full)
    }

    /// Frozen parameters (never updated, e.g. a LoRA base) by name in block order, as
    /// copies in the precision the engine holds them. A collective under stage 3 (they
    /// are partitioned: one all-gather per block at a time), so every rank must call it;
    /// ranks passing `keep` false take part and get nothing back.
    pub fn frozen_weights(&self, keep: bool) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let mut weights = Vec::new();
        for part in self.shards.iter().filter_map(|s| s.frozen.as_ref()) {
            let full = if self.world_size == 1 {
                part.owned.shallow_clone()
            } else {
                let full = Tensor::f_empty(
                    [part.layout.padded_numel as i64],
                    (part.owned.kind(), part.owned.device()),
                )?;
                self.comm.all_gather(&part.owned, &full)?.wait()?;
                full
            };
            if !keep {
                continue;
            }
            weights.extend(slot_copies(&part.layout, &full)?);
        }
        if keep {
            for (name, tensor) in &self.frozen_params {
                weights.push((name.clone(), tensor.f_detach()?.f_detach_copy()?));
            }
        }
        Ok(weights)
    }
}

/// Each slot of `layout` as a named copy out of its gathered (padded,) buffer `full`.
fn slot_copies(layout: &FlatLayout, full: &Tensor) -> Result<Vec<(String, Tensor)>> {
    layout
        .slots
        .iter()
        .map(|slot| {
            let weight = full
                .f_narrow(0, slot.offset as i64, slot.numel as i64)?
                .f_view(slot.shape.as_slice())?
                .f_detach_copy()?;
            Ok((slot.name.clone(), weight))
        })
        .collect()
}
