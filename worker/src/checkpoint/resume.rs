//! Resuming: `resolve_resume_path` picks a checkpoint (HF's `get_last_checkpoint` rule,
//! restricted to complete checkpoints), `load_checkpoint` verifies every file it reads
//! against the manifest and restores the engine, resharding the optimizer state when the
//! world size or ZeRO stage differs: each owned slice of the new engine is filled, slot
//! by slot and by parameter name, from the byte ranges of the saved partitions that hold
//! it (positioned reads, so only the needed bytes are read and nothing stays resident).
//! Contract: `docs/checkpoints.md`.

use super::manifest::{EngineMeta, Manifest, SavedBlock};
use super::tensor_file::TensorFile;
use super::trainer_state::TrainerState;
use super::{
    OPTIMIZER_TENSORS, TRAINER_STATE_FILE, partition_file, partition_tensor_name, rank_state_file,
};
use crate::zero::ZeroEngine;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// What the training loop needs besides the restored engine.
#[derive(Debug, Clone)]
pub struct ResumeState {
    pub trainer_state: TrainerState,
    /// This rank's saved extra when the world size is unchanged, rank 0's otherwise (the
    /// data position follows from `global_step`).
    pub per_rank_extra: serde_json::Value,
    pub global_step: u64,
    /// The optimizer state was resharded (world size or stage changed).
    pub resharded: bool,
    /// The run that wrote the checkpoint (absent in older checkpoints).
    pub run: Option<super::RunRecord>,
}

/// Complete checkpoints in `output_dir` (named `checkpoint-N`, with a readable
/// manifest), oldest first.
pub fn complete_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let listed = rsdeep_contract::checkpoint_dir::checkpoints_with_manifest(output_dir)
        .map_err(|e| Error::io(format!("listing {}", output_dir.display()), e))?;
    Ok(listed
        .into_iter()
        .filter(|(_, dir)| Manifest::read(dir).is_ok())
        .collect())
}

/// `spec` is `true`/`latest` (the newest complete checkpoint of the run that wrote the one
/// `output_dir/latest` names; without a usable `latest`, the newest complete checkpoint in
/// `output_dir`) or a path.
pub fn resolve_resume_path(output_dir: &Path, spec: &str) -> Result<PathBuf> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("true") || spec.eq_ignore_ascii_case("latest") {
        if !output_dir.is_dir() {
            return Err(Error::Checkpoint(format!(
                "No valid checkpoint found in output directory ({}): it does not exist",
                output_dir.display()
            )));
        }
        let latest = rsdeep_contract::checkpoint_dir::latest_checkpoint(output_dir)
            .filter(|dir| Manifest::read(dir).is_ok());
        if let Some(latest) = latest {
            return newest_of_the_same_run(output_dir, latest);
        }
        return complete_checkpoints(output_dir)?.pop().map(|(_, p)| p).ok_or_else(|| {
            Error::Checkpoint(format!(
                "No valid checkpoint found in output directory ({}): no complete checkpoint-N folder \
                 (one with a manifest.json); start without --resume_from_checkpoint",
                output_dir.display()
            ))
        });
    }
    let path = PathBuf::from(spec);
    if !path.is_dir() {
        return Err(Error::Checkpoint(format!(
            "Can't find a valid checkpoint at {spec}: no such folder"
        )));
    }
    Manifest::read(&path)?;
    Ok(path)
}

/// The newest complete checkpoint written by the run that wrote `latest` (usually
/// `latest` itself; a newer one when a save was interrupted between putting its folder in
/// place and updating `output_dir/latest`). Checkpoints of other runs are never picked.
fn newest_of_the_same_run(output_dir: &Path, latest: PathBuf) -> Result<PathBuf> {
    let run = rsdeep_contract::checkpoint_dir::checkpoint_run_id(&latest);
    let newest = complete_checkpoints(output_dir)?
        .into_iter()
        .rev()
        .find(|(_, dir)| rsdeep_contract::checkpoint_dir::checkpoint_run_id(dir) == run);
    Ok(newest.map_or(latest, |(_, dir)| dir))
}

/// The saved optimizer partitions of a checkpoint, opened for reading, with an index from
/// parameter name to its saved place.
pub struct PartitionReader {
    meta: EngineMeta,
    partitions: Vec<TensorFile>,
    /// name -> (index into manifest.engine.blocks, slot index)
    by_name: HashMap<String, (usize, usize)>,
}

impl PartitionReader {
    /// Opens `dir`'s partitions after checking their size and sha256 against `manifest`
    /// (read from `dir`).
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<Self> {
        for p in 0..manifest.engine.partition_world {
            manifest.verify_file(dir, &partition_file(p))?;
        }
        Self::open_unverified(dir, manifest.engine.clone())
    }

    /// Opens the partitions of a checkpoint being written (`dir` is its tmp folder and
    /// `meta` the writer's own), which have no manifest yet.
    pub fn open_unverified(dir: &Path, meta: EngineMeta) -> Result<Self> {
        let partitions = (0..meta.partition_world)
            .map(|p| TensorFile::open(&dir.join(partition_file(p))))
            .collect::<Result<Vec<_>>>()?;
        let mut by_name = HashMap::new();
        for (b, block) in meta.blocks.iter().enumerate() {
            for (s, slot) in block.slots.iter().enumerate() {
                by_name.insert(slot.name.clone(), (b, s));
            }
        }
        Ok(PartitionReader {
            meta,
            partitions,
            by_name,
        })
    }

    pub fn meta(&self) -> &EngineMeta {
        &self.meta
    }

    /// Parameter names in saved order with their shapes.
    pub fn params(&self) -> impl Iterator<Item = (&str, &[i64])> {
        self.meta().blocks.iter().flat_map(|b| {
            b.slots
                .iter()
                .map(|s| (s.name.as_str(), s.shape.as_slice()))
        })
    }

    /// Appends `len` fp32 elements of tensor `which` of `block`'s flat buffer starting at
    /// `start` to `out`, reading across partition files.
    fn read_flat(
        &self,
        block: &SavedBlock,
        which: &str,
        start: usize,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let per_partition = block.partition_numel();
        let name = partition_tensor_name(block.block, which);
        let (mut pos, end) = (start, start + len);
        while pos < end {
            let part = pos / per_partition;
            let within = pos % per_partition;
            let take = (per_partition - within).min(end - pos);
            let file = self.partitions.get(part).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "block {} needs partition {part}, which was not saved",
                    block.block
                ))
            })?;
            file.read_range(&name, within * 4..(within + take) * 4, out)?;
            pos += take;
        }
        Ok(())
    }

    /// Appends elements [lo, hi) of parameter `name`'s `which` tensor (fp32 bytes).
    fn read_param_range(
        &self,
        name: &str,
        which: &str,
        lo: usize,
        hi: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let &(b, s) = self.by_name.get(name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "parameter {name} is not in the checkpoint (a different model?)"
            ))
        })?;
        let block = &self.meta().blocks[b];
        self.read_flat(block, which, block.slots[s].offset + lo, hi - lo, out)
    }

    /// The whole parameter `name` (`which` = master, exp_avg or exp_avg_sq), fp32, CPU.
    pub fn read_param(&self, name: &str, which: &str) -> Result<Tensor> {
        let (bytes, shape) = self.read_param_bytes(name, which)?;
        Ok(Tensor::f_from_data_size(&bytes, &shape, Kind::Float)?)
    }

    /// The fp32 bytes of parameter `name`'s `which` tensor and its shape.
    pub fn read_param_bytes(&self, name: &str, which: &str) -> Result<(Vec<u8>, Vec<i64>)> {
        let &(b, s) = self.by_name.get(name).ok_or_else(|| {
            Error::Checkpoint(format!("parameter {name} is not in the checkpoint"))
        })?;
        let slot = &self.meta().blocks[b].slots[s];
        let mut bytes = Vec::with_capacity(slot.numel * 4);
        self.read_param_range(name, which, 0, slot.numel, &mut bytes)?;
        Ok((bytes, slot.shape.clone()))
    }

    /// The (P,) fp32 slice [start, start + len) of a flat buffer laid out by `layout`
    /// (the new engine's), filled by name from the saved partitions; padding is zero.
    fn fill_slice(
        &self,
        layout: &crate::zero::partition::FlatLayout,
        which: &str,
        start: usize,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len * 4);
        let end = start + len;
        for slot in &layout.slots {
            let (lo, hi) = (slot.offset.max(start), (slot.offset + slot.numel).min(end));
            if lo >= hi {
                continue;
            }
            self.check_shape(&slot.name, &slot.shape)?;
            let slot_start = (lo - start) * 4;
            if out.len() < slot_start {
                out.resize(slot_start, 0);
            }
            self.read_param_range(
                &slot.name,
                which,
                lo - slot.offset,
                hi - slot.offset,
                &mut out,
            )?;
        }
        out.resize(len * 4, 0);
        Ok(out)
    }

    fn check_shape(&self, name: &str, shape: &[i64]) -> Result<()> {
        let &(b, s) = self.by_name.get(name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "parameter {name} of the model is not in the checkpoint (a different model?)"
            ))
        })?;
        let saved = &self.meta().blocks[b].slots[s].shape;
        if saved.as_slice() != shape {
            return Err(Error::Checkpoint(format!(
                "parameter {name} has shape {saved:?} in the checkpoint but {shape:?} in the model"
            )));
        }
        Ok(())
    }
}

/// Full per-parameter optimizer state by name (for inspection and tests).
pub struct FullOptimizerState {
    pub meta: EngineMeta,
    /// (name, master, exp_avg, exp_avg_sq), saved order, fp32 CPU.
    pub params: Vec<(String, Tensor, Tensor, Tensor)>,
}

/// Reads every parameter's master weight and moments from `dir` (verified).
pub fn read_full_optimizer_state(dir: &Path) -> Result<FullOptimizerState> {
    let reader = PartitionReader::open(dir, &Manifest::read(dir)?)?;
    let names: Vec<String> = reader.params().map(|(n, _)| n.to_string()).collect();
    let params = names
        .into_iter()
        .map(|name| {
            let [m, a, s] = OPTIMIZER_TENSORS;
            Ok((
                name.clone(),
                reader.read_param(&name, m)?,
                reader.read_param(&name, a)?,
                reader.read_param(&name, s)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FullOptimizerState {
        meta: reader.meta().clone(),
        params,
    })
}

/// Restores `engine` (this rank of `world_size`) from checkpoint `dir`, resharding when
/// the saved world size or stage differs. Every rank calls it (the engine refresh is a
/// collective under stages 1/2). Nothing on disk is modified.
pub fn load_checkpoint(
    dir: &Path,
    engine: &mut ZeroEngine,
    rank: usize,
    world_size: usize,
) -> Result<ResumeState> {
    let _span = tracing::info_span!("checkpoint_load", rank, dir = %dir.display()).entered();
    let manifest = &Manifest::read(dir)?;
    if rank == 0 {
        verify_files_resume_does_not_read(dir, manifest)?;
    }
    let reader = PartitionReader::open(dir, manifest)?;
    manifest.verify_file(dir, TRAINER_STATE_FILE)?;
    let trainer_state = TrainerState::from_file(&dir.join(TRAINER_STATE_FILE))?;
    let same_world = manifest.engine.world_size == world_size;
    let extra_file = rank_state_file(if same_world { rank } else { 0 });
    manifest.verify_file(dir, &extra_file)?;
    let extra_path = dir.join(&extra_file);
    let text = std::fs::read(&extra_path)
        .map_err(|e| Error::io(format!("reading {}", extra_path.display()), e))?;
    let per_rank_extra = serde_json::from_slice(&text)
        .map_err(|e| Error::Checkpoint(format!("{} is damaged: {e}", extra_path.display())))?;

    let mut target = engine.owned_state()?;
    let resharded = !same_world || target.stage != manifest.engine.stage;
    for block in &mut target.blocks {
        let numel = block.master.numel();
        let start = block.layout.partition_start(block.partition_rank);
        for (which, tensor) in OPTIMIZER_TENSORS.iter().zip([
            &mut block.master,
            &mut block.exp_avg,
            &mut block.exp_avg_sq,
        ]) {
            let bytes = reader.fill_slice(&block.layout, which, start, numel)?;
            let device = tensor.device();
            *tensor = Tensor::f_from_data_size(&bytes, &[numel as i64], Kind::Float)?
                .f_to_device(device)?;
        }
    }
    let meta = &manifest.engine;
    target.optimizer_steps = meta.optimizer_steps;
    target.global_steps = meta.global_steps;
    target.skipped_steps = meta.skipped_steps;
    target.loss_scaler = meta.loss_scaler.into();
    check_every_saved_param_is_used(&reader, &target)?;
    engine.load_owned_state(&target)?;
    tracing::info!(
        rank,
        step = manifest.global_step,
        resharded,
        "resumed from {}",
        dir.display()
    );
    Ok(ResumeState {
        trainer_state,
        per_rank_extra,
        global_step: manifest.global_step,
        resharded,
        run: manifest.run.clone(),
    })
}

/// Rank 0 checks the files a resume does not read (weights, engine state, tokenizer,
/// config) against the manifest too: a damaged checkpoint is refused as a whole, never
/// half-used. The partitions, trainer state and per-rank states are checked where read.
fn verify_files_resume_does_not_read(dir: &Path, manifest: &Manifest) -> Result<()> {
    let read_later = |name: &str| {
        name == TRAINER_STATE_FILE
            || (0..manifest.engine.partition_world).any(|p| partition_file(p) == name)
            || (0..manifest.engine.world_size).any(|r| rank_state_file(r) == name)
    };
    for name in manifest.files.keys().filter(|n| !read_later(n)) {
        manifest.verify_file(dir, name)?;
    }
    Ok(())
}

/// A checkpoint parameter the model does not have means a different model.
fn check_every_saved_param_is_used(
    reader: &PartitionReader,
    target: &crate::zero::OwnedState,
) -> Result<()> {
    let model: std::collections::HashSet<&str> = target
        .blocks
        .iter()
        .flat_map(|b| b.layout.slots.iter().map(|s| s.name.as_str()))
        .collect();
    let unknown: Vec<&str> = reader
        .params()
        .map(|(n, _)| n)
        .filter(|n| !model.contains(n))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::Checkpoint(format!(
            "the checkpoint has parameters the model lacks (a different model?): {}",
            unknown.join(", ")
        )))
    }
}
