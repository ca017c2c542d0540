//! Building a `ZeroEngine` block by block. `EngineBuilder::add_block` partitions one
//! block the moment it exists: its parameters are copied into the block's flat buffer,
//! this rank keeps what its stage says (the whole buffer below stage 3, its (P,) slice
//! under stage 3, for trainable and frozen parameters alike) and the block's own full
//! tensors are released (re-pointed at the buffer, or emptied), so a caller that makes
//! the next block only after handing over the previous one (`zero/causal_lm.rs`) never
//! holds more than one block of full parameters under stage 3. `add_block` runs no
//! collective (a model may be built under a process-wide init lock); `finish` checks in
//! one broadcast that every rank built the same initial weights (a hash per block) and
//! hands over the blocks. `ZeroEngine::new` is this builder over an already built model.
//! Contract: `docs/zero-engine.md`.

use super::adamw::AdamSlice;
use super::config::{EngineConfig, Precision};
use super::engine::point_params_at;
use super::engine::{BlockShard, EngineModel, FrozenPart, Stage3Stats, ZeroEngine};
use super::loss_scaler::LossScaler;
use super::partition::FlatLayout;
use super::profile::StepProfile;
use super::scheduler::LrSchedule;
use super::swap::SwapFile;
use crate::comm::Communicator;
use crate::model::Block;
use crate::{Error, Result};
use std::collections::HashSet;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A `ZeroEngine` under construction: the shards of the blocks added so far.
pub struct EngineBuilder {
    comm: Arc<dyn Communicator>,
    config: EngineConfig,
    /// Ranks the optimizer state is split over: 1 for stage 0, the world otherwise.
    shard_world: usize,
    shard_rank: usize,
    optimizer_device: Device,
    shards: Vec<BlockShard>,
    /// Frozen parameters kept whole (below stage 3).
    frozen_params: Vec<(String, Tensor)>,
    /// Per added block: its parameter names in order (checked against `finish`'s blocks).
    block_names: Vec<Vec<String>>,
    /// Per added block: a hash of its initial values (trainable and frozen).
    block_hashes: Vec<u64>,
}

impl EngineBuilder {
    /// An empty builder for this rank (`comm`) and `config`.
    pub fn new(comm: Arc<dyn Communicator>, config: EngineConfig) -> Result<Self> {
        config.validate(comm.world_size())?;
        let (rank, world_size) = (comm.rank(), comm.world_size());
        let (shard_rank, shard_world) = config.stage.optimizer_partition(rank, world_size);
        let optimizer_device =
            if config.offload_optimizer_cpu || config.optimizer_swap_dir.is_some() {
                Device::Cpu
            } else {
                config.device
            };
        if !config.contiguous_gradients {
            tracing::info!(
                rank,
                "contiguous_gradients=false: rsdeep always keeps gradients in flat buffers"
            );
        }
        Ok(EngineBuilder {
            comm,
            config,
            shard_world,
            shard_rank,
            optimizer_device,
            shards: Vec::new(),
            frozen_params: Vec::new(),
            block_names: Vec::new(),
            block_hashes: Vec::new(),
        })
    }

    /// Partitions the next block (blocks come in model order). Parameters named in
    /// `frozen` get no gradient or optimizer state. Afterwards the block's parameters are
    /// views of the engine's buffers (stages 0-2) or empty until gathered (stage 3): the
    /// block's original full tensors are no longer referenced by the engine or the block.
    /// No collective.
    pub fn add_block(&mut self, block: &dyn Block, frozen: &HashSet<String>) -> Result<()> {
        let index = self.shards.len();
        let _span =
            tracing::debug_span!("zero_add_block", rank = self.comm.rank(), index).entered();
        let names = block.params().iter().map(|p| p.name.clone()).collect();
        let (mut shard, hash) = build_shard(
            block,
            frozen,
            &mut self.frozen_params,
            &self.config,
            self.shard_world,
            self.shard_rank,
            self.optimizer_device,
        )?;
        if let Some(dir) = &self.config.optimizer_swap_dir
            && let Some(optim) = shard.optim.take()
        {
            let numel = shard.layout.partition_numel();
            let swap = SwapFile::create(dir, self.shard_rank, index, numel)?;
            shard.optim = Some(optim.swapped_to(swap)?);
        }
        self.shards.push(shard);
        self.block_names.push(names);
        self.block_hashes.push(hash);
        return_free_heap_pages();
        Ok(())
    }

    /// Blocks added so far.
    pub fn block_count(&self) -> usize {
        self.shards.len()
    }

    /// The engine over `model`, whose blocks must be the ones added, in order. A
    /// collective: checks that every rank built the same initial weights.
    pub fn finish(self, model: EngineModel) -> Result<ZeroEngine> {
        let rank = self.comm.rank();
        let _span =
            tracing::info_span!("zero_init", rank, stage = self.config.stage.number()).entered();
        self.check_blocks(&model.blocks)?;
        self.check_same_initial_weights()?;
        let scaler = match self.config.precision {
            Precision::Fp16(scale) => LossScaler::new(scale),
            _ => LossScaler::unit(),
        };
        let block_count = model.blocks.len();
        let window = ZeroEngine::default_window(&self.config);
        let breakdown_every = match self.config.wall_clock_breakdown {
            // DeepSpeed's default `steps_per_print` is 10.
            true if self.config.steps_per_print == 0 => 10,
            true => self.config.steps_per_print,
            false => 0,
        };
        Ok(ZeroEngine {
            blocks: model.blocks,
            shards: self.shards,
            frozen_params: self.frozen_params,
            tied: model.head_tied_to_embedding,
            world_size: self.comm.world_size(),
            comm: self.comm,
            schedule: LrSchedule::new(self.config.scheduler, self.config.optimizer.lr),
            config: self.config,
            rank,
            shard_world: self.shard_world,
            shard_rank: self.shard_rank,
            optimizer_device: self.optimizer_device,
            scaler,
            optimizer_steps: 0,
            global_steps: 0,
            skipped_steps: 0,
            micro_step: 0,
            window,
            micro_losses: Vec::new(),
            pending_reduce: Vec::new(),
            prefetch: None,
            live_numel: 0,
            kept_buffers: (0..block_count).map(|_| (None, None)).collect(),
            stage3_stats: Stage3Stats::default(),
            inject_overflow: false,
            profile: StepProfile::new(breakdown_every),
        })
    }

    /// `blocks` are the added ones: same count, same parameter names in order.
    fn check_blocks(&self, blocks: &[Box<dyn Block>]) -> Result<()> {
        if blocks.len() != self.block_names.len() {
            return Err(Error::Engine(format!(
                "the engine was built from {} blocks but is given {}",
                self.block_names.len(),
                blocks.len()
            )));
        }
        for (index, (block, names)) in blocks.iter().zip(&self.block_names).enumerate() {
            let same = block.params().len() == names.len()
                && block.params().iter().zip(names).all(|(p, n)| &p.name == n);
            if !same {
                return Err(Error::Engine(format!(
                    "block {index} is not the block that was partitioned"
                )));
            }
        }
        Ok(())
    }

    /// Every rank must start from rank 0's weights. Each rank built them itself (same
    /// seed or checkpoint), so rank 0's per-block hashes are broadcast and compared.
    fn check_same_initial_weights(&self) -> Result<()> {
        if self.comm.world_size() == 1 {
            return Ok(());
        }
        let ours = encode_hashes(&self.block_hashes);
        let root = ours.f_detach_copy()?;
        self.comm.broadcast(&root, 0)?.wait()?;
        if root.f_equal(&ours)? {
            return Ok(());
        }
        let theirs = decode_hashes(&root)?;
        let block = (0..self.block_hashes.len())
            .find(|&b| theirs.get(b) != self.block_hashes.get(b))
            .unwrap_or(0);
        Err(Error::Engine(format!(
            "rank {} built different initial weights than rank 0 (first in block {block}): \
             every rank must use the same seed and model files",
            self.comm.rank()
        )))
    }
}

impl ZeroEngine {
    /// Flattens every block's trainable parameters into its flat buffer, creates the
    /// owned fp32 masters and moments, and partitions according to `config.stage` (see
    /// `EngineBuilder`; every rank must have built the same initial weights).
    pub fn new(
        model: EngineModel,
        comm: Arc<dyn Communicator>,
        config: EngineConfig,
    ) -> Result<Self> {
        let mut builder = EngineBuilder::new(comm, config)?;
        for block in &model.blocks {
            builder.add_block(block.as_ref(), &model.frozen)?;
        }
        builder.finish(model)
    }
}

/// Hands the free pages of the C heap back to the OS. glibc raises its mmap threshold to
/// the size of the largest block freed so far, so a block's full tensors (and the flat
/// copies made while partitioning it) are mostly heap chunks below it; freed between the
/// long-lived slices they stay resident, and the engine's build would leave ~the size of
/// the transients in RSS. `malloc_trim` releases every whole free page (MADV_DONTNEED).
fn return_free_heap_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hashes as an f32 tensor any backend can broadcast: four exact 16-bit pieces each.
fn encode_hashes(hashes: &[u64]) -> Tensor {
    let pieces: Vec<f32> = hashes
        .iter()
        .flat_map(|h| (0..4).map(move |i| ((h >> (16 * i)) & 0xFFFF) as f32))
        .collect();
    Tensor::from_slice(&pieces)
}

fn decode_hashes(encoded: &Tensor) -> Result<Vec<u64>> {
    let pieces: Vec<f32> = Vec::<f32>::try_from(encoded.f_to_kind(Kind::Float)?)?;
    Ok(pieces
        .chunks(4)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u64, |h, (i, p)| h | ((*p as u64) << (16 * i)))
        })
        .collect())
}

/// A 64-bit hash of a tensor's bytes (bit-exact, so equal on every rank that holds the
/// same values). CPU tensors are read in place; others are copied to the CPU first.
fn hash_tensor(tensor: &Tensor, seed: u64) -> Result<u64> {
    let host = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
    let len = host.numel() * host.f_kind()?.elt_size_in_bytes();
    if len == 0 {
        return Ok(hash_bytes(&[], seed));
    }
    // SAFETY: `host` is a contiguous CPU tensor holding `len` bytes from `data_ptr`, and
    // its handle keeps the storage alive for the slice's lifetime; nothing writes the
    // block's buffers while it is being partitioned (the builder owns this step).
    let bytes = unsafe { std::slice::from_raw_parts(host.data_ptr() as *const u8, len) };
    Ok(hash_bytes(bytes, seed))
}

/// FNV-style mixing over 8-byte words (fast enough for model-sized buffers).
fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut hash = seed ^ 0xCBF2_9CE4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        hash = (hash ^ u64::from_le_bytes(w)).wrapping_mul(PRIME);
        hash ^= hash >> 29;
    }
    for byte in words.remainder() {
        hash = (hash ^ *byte as u64).wrapping_mul(PRIME);
    }
    hash
}

/// Builds one block's shard: flat fp32 copy of its trainable parameters, the owned
/// masters and moments, the compute buffer, and points the parameters at it (stages 0-2)
/// or empties them (stage 3); frozen parameters go whole to `frozen_params` (stages 0-2)
/// or are partitioned (stage 3). Returns the shard and a hash of the block's values.
#[allow(clippy::too_many_arguments)]
fn build_shard(
    block: &dyn Block,
    frozen: &HashSet<String>,
    frozen_params: &mut Vec<(String, Tensor)>,
    config: &EngineConfig,
    shard_world: usize,
    shard_rank: usize,
    optimizer_device: Device,
) -> Result<(BlockShard, u64)> {
    let mut named = Vec::new();
    let mut params = Vec::new();
    let mut frozen_here = Vec::new();
    for p in block.params() {
        if frozen.contains(&p.name) {
            frozen_here.push((p.name.clone(), p.tensor.shallow_clone()));
        } else {
            named.push((p.name.clone(), p.tensor.size()));
            params.push(p.tensor.shallow_clone());
        }
    }
    let mut hash = 0u64;
    let frozen_part = if config.stage.partitions_parameters() {
        let (part, frozen_hash) = build_frozen_part(frozen_here, config, shard_world, shard_rank)?;
        hash = frozen_hash;
        part
    } else {
        for (_, tensor) in &frozen_here {
            hash = hash_tensor(tensor, hash)?;
        }
        frozen_params.extend(frozen_here);
        None
    };
    let layout = FlatLayout::new(&named, shard_world);
    let kind = config.precision.kind();
    let persistent = persistence(&layout, config);
    let mut shard = BlockShard {
        params,
        persistent,
        compute: Tensor::new(),
        gathered: None,
        resident: false,
        grad_full: None,
        grad_owned: None,
        tied_grad: None,
        optim: None,
        frozen: frozen_part,
        layout,
    };
    if shard.is_empty() {
        return Ok((shard, hash));
    }
    let flat32 = flat_buffer(&shard.params, &shard.layout, Kind::Float, config.device)?;
    hash = hash_tensor(&flat32, hash)?;
    let (start, part) = (
        shard.owned_start(shard_rank) as i64,
        shard.layout.partition_numel() as i64,
    );
    let owned32 = flat32.f_narrow(0, start, part)?;
    let padded = shard.layout.padded_numel as i64;
    if !config.stage.partitions_parameters() {
        shard.compute = flat32.f_to_kind(kind)?.f_contiguous()?;
        point_params_at(&mut shard.params, &shard.layout, &shard.compute)?;
        if !config.stage.partitions_gradients() {
            shard.grad_full = Some(Tensor::f_zeros([padded], (kind, config.device))?);
        } else {
            shard.grad_owned = Some(Tensor::f_zeros([part], (kind, config.device))?);
        }
    } else {
        shard.compute = owned32.f_to_kind(kind)?.f_contiguous()?.f_detach_copy()?;
        shard.grad_owned = Some(Tensor::f_zeros([part], (kind, config.device))?);
        empty_params(&mut shard.params, kind, config.device)?;
    }
    // fp32 compute next to the optimizer: the owned compute slice is the master (with
    // NVMe offload the master goes to the swap file as a copy, freeing its memory).
    let shared_master = kind == Kind::Float
        && optimizer_device == config.device
        && config.optimizer_swap_dir.is_none();
    shard.optim = Some(match shared_master {
        true if config.stage.partitions_parameters() => AdamSlice::over_compute(&shard.compute)?,
        true => AdamSlice::over_compute(&shard.compute.f_narrow(0, start, part)?)?,
        false => AdamSlice::new(&owned32, optimizer_device)?,
    });
    for p in shard.params.iter_mut() {
        *p = p.f_set_requires_grad(true)?;
    }
    Ok((shard, hash))
}

/// Stage 3: partitions a block's frozen parameters. Every rank loaded the same frozen
/// values (the base model): each keeps its (P,) slice and the model's tensors are
/// emptied until a gather re-points them. Returns the part and a hash of the values.
fn build_frozen_part(
    named: Vec<(String, Tensor)>,
    config: &EngineConfig,
    shard_world: usize,
    shard_rank: usize,
) -> Result<(Option<FrozenPart>, u64)> {
    if named.is_empty() {
        return Ok((None, 0));
    }
    let shapes: Vec<(String, Vec<i64>)> =
        named.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let layout = FlatLayout::new(&shapes, shard_world);
    let mut params: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    let kind = config.precision.kind();
    let flat = flat_buffer(&params, &layout, kind, config.device)?; // (padded,)
    let hash = hash_tensor(&flat, 0)?;
    let owned = flat
        .f_narrow(
            0,
            layout.partition_start(shard_rank) as i64,
            layout.partition_numel() as i64,
        )?
        .f_detach_copy()?; // (P,)
    drop(flat);
    empty_params(&mut params, kind, config.device)?;
    let part = FrozenPart {
        persistent: persistence(&layout, config),
        layout,
        params,
        owned,
        gathered: None,
    };
    Ok((Some(part), hash))
}

/// Stage 3: which of a layout's parameters stay resident once gathered.
fn persistence(layout: &FlatLayout, config: &EngineConfig) -> Vec<bool> {
    layout
        .slots
        .iter()
        .map(|s| {
            config.stage.partitions_parameters()
                && s.numel <= config.stage3_param_persistence_threshold
        })
        .collect()
}

/// Points every parameter at an empty tensor (stage 3 outside a gather).
fn empty_params(params: &mut [Tensor], kind: Kind, device: Device) -> Result<()> {
    let empty = Tensor::f_empty([0], (kind, device))?;
    for p in params.iter_mut() {
        p.f_set_data(&empty)?;
    }
    Ok(())
}

/// `params` (laid out by `layout`) as one (padded,) buffer of `kind` on `device`.
fn flat_buffer(
    params: &[Tensor],
    layout: &FlatLayout,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut pieces: Vec<Tensor> = Vec::with_capacity(params.len() + 1);
    for p in params {
        pieces.push(
            p.f_detach()?
                .f_reshape([-1])?
                .f_to_kind(kind)?
                .f_to_device(device)?,
        );
    }
    if layout.padding() > 0 {
        pieces.push(Tensor::f_zeros([layout.padding() as i64], (kind, device))?);
    }
    Ok(Tensor::f_cat(&pieces, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_survive_the_f32_encoding_and_see_one_bit() {
        let hashes = vec![0u64, u64::MAX, 0x0123_4567_89AB_CDEF];
        assert_eq!(decode_hashes(&encode_hashes(&hashes)).unwrap(), hashes);
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = Tensor::from_slice(&[1.0f32, 2.0, 3.000_000_2]);
        assert_eq!(
            hash_tensor(&a, 0).unwrap(),
            hash_tensor(&a.copy(), 0).unwrap()
        );
        assert_ne!(hash_tensor(&a, 0).unwrap(), hash_tensor(&b, 0).unwrap());
    }
}
