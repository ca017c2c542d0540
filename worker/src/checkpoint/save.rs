//! The collective, crash-safe save. Every rank calls `save_checkpoint` (or
//! `save_checkpoint_async` + `PendingSave::finish`); the protocol is:
//! 1. rank 0 removes stale `checkpoint-*.tmp` folders of crashed saves and creates
//!    `output_dir/checkpoint-N.tmp/`; all ranks agree it exists;
//! 2. every rank snapshots its state (owned optimizer partition, counters; the full
//!    weights are gathered collectively when requested) and writes + fsyncs its files
//!    and a manifest part (sizes and sha256 of what it wrote);
//! 3. all ranks agree that every rank succeeded; rank 0 merges the parts into
//!    `manifest.json` (hashing the files others' code wrote, e.g. tokenizer, weights),
//!    fsyncs, renames the folder to `checkpoint-N`, fsyncs `output_dir`, replaces
//!    `latest` atomically and rotates by `save_total_limit`; all ranks agree again.
//!
//! A crash at any moment leaves either no `checkpoint-N` or a complete one, so the
//! previous complete checkpoint stays the newest. Contract: `docs/checkpoints.md`.

use super::crash::crash_point;
use super::manifest::{
    EngineMeta, FORMAT_VERSION, FileTable, Manifest, SavedBlock, sync_and_hash, sync_dir,
    write_synced,
};
use super::tensor_file::{TensorSpec, tensor_bytes, write_streaming};
use super::trainer_state::TrainerState;
use super::{
    FROZEN_FILE, LATEST_FILE, MANIFEST_FILE, ZERO_DIR, checkpoint_dir_name, partition_file,
    rank_state_file,
};
use crate::comm::{Communicator, ReduceOp};
use crate::tokenizer::Tokenizer;
use crate::zero::{OwnedState, ZeroEngine};
use crate::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Everything one save needs; every rank passes its own.
pub struct SaveRequest<'a> {
    pub output_dir: &'a Path,
    /// The global step; the folder is `checkpoint-{step}`.
    pub step: u64,
    pub engine: &'a mut ZeroEngine,
    pub comm: &'a dyn Communicator,
    /// `config.json` of the model (rank 0 writes it).
    pub model_config_json: &'a str,
    /// Tokenizer files to include (rank 0 writes them).
    pub tokenizer: Option<&'a Tokenizer>,
    pub trainer_state: &'a TrainerState,
    /// This rank's RNG metadata and sampler position, saved as `rng_state_{rank}.json`.
    pub per_rank_extra: serde_json::Value,
    /// Keep at most this many complete checkpoints (the newest is never deleted).
    pub save_total_limit: Option<usize>,
    /// Shard `model.safetensors` above this many bytes.
    pub max_shard_bytes: u64,
    /// Write HF weights (false under stage 3 unless
    /// `stage3_gather_16bit_weights_on_model_save`, as in DeepSpeed).
    pub write_model_weights: bool,
    /// dtype of `model.safetensors`.
    pub weights_dtype: Kind,
}

/// A rank's state copied out of the engine: nothing here aliases training tensors.
struct RankSnapshot {
    rank: usize,
    step: u64,
    tmp_dir: PathBuf,
    owned: OwnedState,
    /// Whether this rank writes an optimizer partition (stage 0: only rank 0).
    writes_partition: bool,
    per_rank_extra: serde_json::Value,
    /// Rank 0 only.
    leader: Option<LeaderSnapshot>,
}

struct LeaderSnapshot {
    model_config_json: String,
    trainer_state_json: String,
    meta: EngineMeta,
    /// Full weights in the requested dtype, on the CPU.
    weights: Option<Vec<(String, Tensor)>>,
    frozen: Vec<(String, Tensor)>,
    max_shard_bytes: u64,
}

/// What the commit phase needs after the files are written.
struct CommitPlan {
    rank: usize,
    output_dir: PathBuf,
    tmp_dir: PathBuf,
    final_dir: PathBuf,
    step: u64,
    meta: EngineMeta,
    save_total_limit: Option<usize>,
    best_model_checkpoint: Option<String>,
    device: Device,
}

/// An asynchronous save whose files are being written by a background thread.
pub struct PendingSave {
    writer: std::thread::JoinHandle<Result<FileTable>>,
    plan: CommitPlan,
}

impl PendingSave {
    /// True once the background writer is done (the commit still has to run).
    pub fn is_written(&self) -> bool {
        self.writer.is_finished()
    }

    /// Waits for this rank's files, then runs the collective commit (every rank calls it,
    /// before the next save and at the end of training). Returns the checkpoint folder.
    pub fn finish(self, comm: &dyn Communicator) -> Result<PathBuf> {
        let written = self.writer.join().unwrap_or_else(|_| {
            Err(Error::Checkpoint(
                "the checkpoint writer thread panicked".into(),
            ))
        });
        commit(comm, &self.plan, written)
    }
}

/// Saves a checkpoint (a collective: every rank calls it with the same step).
pub fn save_checkpoint(req: SaveRequest<'_>) -> Result<PathBuf> {
    let comm = req.comm;
    let (snapshot, plan) = prepare(req)?;
    let written = write_rank_files(snapshot);
    commit(comm, &plan, written)
}

/// Like `save_checkpoint`, but the files are written by a background thread while
/// training continues; call `PendingSave::finish` on every rank to make it visible.
pub fn save_checkpoint_async(req: SaveRequest<'_>) -> Result<PendingSave> {
    let (snapshot, plan) = prepare(req)?;
    let writer = std::thread::Builder::new()
        .name(format!("ckpt-writer-{}", plan.rank))
        .spawn(move || write_rank_files(snapshot))
        .map_err(|e| Error::io("starting the checkpoint writer thread", e))?;
    Ok(PendingSave { writer, plan })
}

/// All ranks learn whether any rank failed; `Ok(true)` means someone did.
fn any_rank_failed(comm: &dyn Communicator, device: Device, failed: bool) -> Result<bool> {
    let flag = Tensor::f_from_slice(&[if failed { 1f32 } else { 0f32 }])?.f_to_device(device)?;
    comm.all_reduce(&flag, ReduceOp::Max)?.wait()?;
    Ok(flag.f_double_value(&[])? > 0.0)
}

/// Runs `local`, then tells every rank whether any rank's `local` failed.
fn agreed<T>(comm: &dyn Communicator, device: Device, what: &str, local: Result<T>) -> Result<T> {
    let others_failed = any_rank_failed(comm, device, local.is_err())?;
    match local {
        Err(e) => Err(e),
        Ok(_) if others_failed => Err(Error::Checkpoint(format!(
            "{what} failed on another rank (see its log); the previous checkpoint is still the latest"
        ))),
        Ok(value) => Ok(value),
    }
}

/// Phase 1 and the snapshot: the tmp folder exists on every rank's view, the state is
/// copied to the CPU (weights gathered when requested).
fn prepare(req: SaveRequest<'_>) -> Result<(RankSnapshot, CommitPlan)> {
    let rank = req.comm.rank();
    let _span = tracing::info_span!("checkpoint_save", rank, step = req.step).entered();
    let device = req.engine.config().device;
    let final_dir = req.output_dir.join(checkpoint_dir_name(req.step));
    let tmp_dir = req
        .output_dir
        .join(format!("{}.tmp", checkpoint_dir_name(req.step)));
    let created = if rank == 0 {
        create_tmp_dir(req.output_dir, &tmp_dir, req.step)
    } else {
        Ok(())
    };
    agreed(req.comm, device, "creating the checkpoint folder", created)?;

    let owned = req.engine.owned_state()?;
    let owned = owned_to_cpu(owned)?;
    let weights = if req.write_model_weights {
        Some(req.engine.gather_full_weights()?)
    } else {
        None
    };
    let meta = engine_meta(&owned, req.comm.world_size());
    let leader = if rank == 0 {
        leader_snapshot(&req, &tmp_dir, &meta, weights).map(Some)
    } else {
        Ok(None)
    };
    // Every rank learns whether rank 0's snapshot failed, so none waits in the commit.
    let leader = agreed(req.comm, device, "snapshotting the checkpoint", leader)?;
    let writes_partition = owned.stage > 0 || rank == 0;
    let snapshot = RankSnapshot {
        rank,
        step: req.step,
        tmp_dir: tmp_dir.clone(),
        owned,
        writes_partition,
        per_rank_extra: req.per_rank_extra,
        leader,
    };
    let plan = CommitPlan {
        rank,
        output_dir: req.output_dir.to_path_buf(),
        tmp_dir,
        final_dir,
        step: req.step,
        meta,
        save_total_limit: req.save_total_limit,
        best_model_checkpoint: req.trainer_state.best_model_checkpoint.clone(),
        device,
    };
    Ok((snapshot, plan))
}

/// Rank 0's extra state: tokenizer files (written now), config, trainer state, weights.
fn leader_snapshot(
    req: &SaveRequest<'_>,
    tmp_dir: &Path,
    meta: &EngineMeta,
    weights: Option<Vec<(String, Tensor)>>,
) -> Result<LeaderSnapshot> {
    if let Some(tokenizer) = req.tokenizer {
        tokenizer.save(tmp_dir)?;
    }
    let weights = match weights {
        Some(w) => Some(
            w.into_iter()
                .map(|(n, t)| Ok((n, t.f_to_kind(req.weights_dtype)?.f_to_device(Device::Cpu)?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    Ok(LeaderSnapshot {
        model_config_json: req.model_config_json.to_string(),
        trainer_state_json: req.trainer_state.to_json_string()?,
        frozen: frozen_params(req.engine, meta)?,
        meta: meta.clone(),
        weights,
        max_shard_bytes: req.max_shard_bytes,
    })
}

fn owned_to_cpu(mut owned: OwnedState) -> Result<OwnedState> {
    for block in &mut owned.blocks {
        for t in [&mut block.master, &mut block.exp_avg, &mut block.exp_avg_sq] {
            if t.device() != Device::Cpu {
                *t = t.f_to_device(Device::Cpu)?;
            }
        }
    }
    Ok(owned)
}

fn engine_meta(owned: &OwnedState, world_size: usize) -> EngineMeta {
    let partition_world = owned
        .blocks
        .first()
        .map(|b| b.layout.world_size)
        .unwrap_or(if owned.stage == 0 { 1 } else { world_size });
    EngineMeta {
        stage: owned.stage,
        world_size,
        partition_world,
        optimizer_steps: owned.optimizer_steps,
        global_steps: owned.global_steps,
        skipped_steps: owned.skipped_steps,
        loss_scaler: owned.loss_scaler.into(),
        blocks: owned
            .blocks
            .iter()
            .map(|b| SavedBlock::from_layout(b.block, &b.layout))
            .collect(),
        frozen: Vec::new(),
    }
}

/// Parameters the blocks list that no flat buffer holds (never updated, e.g. LoRA
/// bases), as CPU copies; their names are recorded in the leader's meta later.
fn frozen_params(engine: &ZeroEngine, meta: &EngineMeta) -> Result<Vec<(String, Tensor)>> {
    let trained: HashSet<&str> = meta
        .blocks
        .iter()
        .flat_map(|b| b.slots.iter().map(|s| s.name.as_str()))
        .collect();
    let mut frozen = Vec::new();
    for block in engine.blocks() {
        for param in block.params() {
            if !trained.contains(param.name.as_str()) && param.tensor.numel() > 0 {
                frozen.push((
                    param.name.clone(),
                    param
                        .tensor
                        .f_detach()?
                        .f_to_device(Device::Cpu)?
                        .f_detach_copy()?,
                ));
            }
        }
    }
    Ok(frozen)
}

fn create_tmp_dir(output_dir: &Path, tmp_dir: &Path, step: u64) -> Result<()> {
    std::fs::create_dir_all(output_dir)
        .map_err(|e| Error::io(format!("creating {}", output_dir.display()), e))?;
    remove_stale_tmp_dirs(output_dir)?;
    std::fs::create_dir_all(tmp_dir.join(ZERO_DIR))
        .map_err(|e| Error::io(format!("creating {}", tmp_dir.display()), e))?;
    sync_dir(output_dir)?;
    crash_point("tmp_dir_created", step);
    Ok(())
}

/// Removes `checkpoint-*.tmp` folders left by crashed saves (never resumable).
pub fn remove_stale_tmp_dirs(output_dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(output_dir)
        .map_err(|e| Error::io(format!("listing {}", output_dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("checkpoint-") && name.ends_with(".tmp") && entry.path().is_dir()) {
            continue;
        }
        // A complete checkpoint moved aside by a re-save of its step that then crashed
        // before the new one took its place: put it back instead of deleting it.
        if let Some(original) = name.strip_suffix(".replaced.tmp") {
            let target = output_dir.join(original);
            if !target.exists() && entry.path().join(MANIFEST_FILE).is_file() {
                std::fs::rename(entry.path(), &target)
                    .map_err(|e| Error::io(format!("restoring {}", target.display()), e))?;
                continue;
            }
        }
        tracing::info!(dir = %entry.path().display(), "removing an incomplete checkpoint of a crashed save");
        std::fs::remove_dir_all(entry.path())
            .map_err(|e| Error::io(format!("removing stale {}", entry.path().display()), e))?;
    }
    Ok(())
}

fn manifest_part_file(rank: usize) -> String {
    format!("{ZERO_DIR}/.manifest_part_{rank}.json")
}

/// Phase 2 on one rank: writes and fsyncs its files, then its manifest part.
fn write_rank_files(snapshot: RankSnapshot) -> Result<FileTable> {
    let _span = tracing::info_span!("checkpoint_write", rank = snapshot.rank).entered();
    let dir = &snapshot.tmp_dir;
    let mut table = FileTable::new();
    if snapshot.writes_partition {
        let partition_rank = if snapshot.owned.stage == 0 {
            0
        } else {
            snapshot.rank
        };
        let relative = partition_file(partition_rank);
        table.insert(
            relative.clone(),
            write_partition(&dir.join(&relative), &snapshot.owned, snapshot.step)?,
        );
        crash_point("partition_written", snapshot.step);
    }
    let extra = serde_json::to_vec_pretty(&snapshot.per_rank_extra)
        .map_err(|e| Error::Checkpoint(format!("serialising rank state: {e}")))?;
    let relative = rank_state_file(snapshot.rank);
    table.insert(
        relative.clone(),
        write_synced(&dir.join(&relative), &extra)?,
    );
    if let Some(leader) = snapshot.leader {
        write_leader_files(dir, leader, &mut table, snapshot.step)?;
    }
    let part =
        serde_json::to_vec(&table).map_err(|e| Error::Checkpoint(format!("manifest part: {e}")))?;
    write_synced(&dir.join(manifest_part_file(snapshot.rank)), &part)?;
    crash_point("manifest_part_written", snapshot.step);
    Ok(table)
}

/// Tensor names of block `b`'s partition in an optimizer file.
pub(super) fn partition_tensor_name(block: usize, which: &str) -> String {
    format!("block_{block}.{which}")
}

/// The three optimizer tensors of each block, in file order.
pub(super) const OPTIMIZER_TENSORS: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

fn write_partition(
    path: &Path,
    owned: &OwnedState,
    step: u64,
) -> Result<super::manifest::FileEntry> {
    let mut specs = Vec::new();
    let mut sources = Vec::new();
    for block in &owned.blocks {
        for (which, tensor) in
            OPTIMIZER_TENSORS
                .iter()
                .zip([&block.master, &block.exp_avg, &block.exp_avg_sq])
        {
            specs.push(TensorSpec {
                name: partition_tensor_name(block.block, which),
                kind: Kind::Float,
                shape: vec![tensor.numel() as i64],
            });
            sources.push(tensor);
        }
    }
    write_streaming(path, &specs, |i| {
        if i == specs.len() / 2 {
            crash_point("partition_partly_written", step);
        }
        tensor_bytes(sources[i])
    })
}

fn write_leader_files(
    dir: &Path,
    mut leader: LeaderSnapshot,
    table: &mut FileTable,
    step: u64,
) -> Result<()> {
    table.insert(
        "config.json".into(),
        write_synced(
            &dir.join("config.json"),
            leader.model_config_json.as_bytes(),
        )?,
    );
    table.insert(
        super::TRAINER_STATE_FILE.into(),
        write_synced(
            &dir.join(super::TRAINER_STATE_FILE),
            leader.trainer_state_json.as_bytes(),
        )?,
    );
    leader.meta.frozen = leader.frozen.iter().map(|(n, _)| n.clone()).collect();
    if !leader.frozen.is_empty() {
        let specs: Vec<TensorSpec> = leader
            .frozen
            .iter()
            .map(|(n, t)| TensorSpec {
                name: n.clone(),
                kind: t.kind(),
                shape: t.size(),
            })
            .collect();
        let entry = write_streaming(&dir.join(FROZEN_FILE), &specs, |i| {
            tensor_bytes(&leader.frozen[i].1)
        })?;
        table.insert(FROZEN_FILE.into(), entry);
    }
    let state = serde_json::to_vec_pretty(&leader.meta)
        .map_err(|e| Error::Checkpoint(format!("engine state: {e}")))?;
    table.insert(
        "engine_state.json".into(),
        write_synced(&dir.join("engine_state.json"), &state)?,
    );
    crash_point("leader_files_written", step);
    if let Some(weights) = leader.weights {
        let written =
            crate::model::save_safetensors_sharded(&weights, dir, leader.max_shard_bytes)?;
        drop(weights);
        // Hashed here (the writer thread of an async save), not in the commit.
        for path in written {
            let relative = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            table.insert(relative, sync_and_hash(&path)?);
        }
        crash_point("weights_written", step);
    }
    Ok(())
}

/// Phase 3: agreement, manifest, rename, `latest`, rotation.
fn commit(
    comm: &dyn Communicator,
    plan: &CommitPlan,
    written: Result<FileTable>,
) -> Result<PathBuf> {
    let _span =
        tracing::info_span!("checkpoint_commit", rank = plan.rank, step = plan.step).entered();
    agreed(
        comm,
        plan.device,
        "writing checkpoint files",
        written.map(|_| ()),
    )?;
    let published = if plan.rank == 0 {
        publish(comm.world_size(), plan)
    } else {
        Ok(())
    };
    agreed(comm, plan.device, "publishing the checkpoint", published)?;
    Ok(plan.final_dir.clone())
}

fn publish(world_size: usize, plan: &CommitPlan) -> Result<()> {
    let mut files = FileTable::new();
    for rank in 0..world_size {
        let path = plan.tmp_dir.join(manifest_part_file(rank));
        let text = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let part: FileTable = serde_json::from_slice(&text)
            .map_err(|e| Error::Checkpoint(format!("{} is damaged: {e}", path.display())))?;
        files.extend(part);
        std::fs::remove_file(&path)
            .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    }
    crash_point("manifest_parts_merged", plan.step);
    hash_unlisted_files(&plan.tmp_dir, "", &mut files)?;
    let mut meta = plan.meta.clone();
    let engine_state = plan.tmp_dir.join("engine_state.json");
    if let Ok(text) = std::fs::read(&engine_state) {
        meta = serde_json::from_slice(&text)
            .map_err(|e| Error::Checkpoint(format!("engine state: {e}")))?;
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        rsdeep_version: env!("CARGO_PKG_VERSION").to_string(),
        global_step: plan.step,
        engine: meta,
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Checkpoint(format!("manifest: {e}")))?;
    write_synced(&plan.tmp_dir.join(MANIFEST_FILE), &text)?;
    sync_dir(&plan.tmp_dir.join(ZERO_DIR))?;
    sync_dir(&plan.tmp_dir)?;
    crash_point("manifest_written", plan.step);
    move_into_place(plan)?;
    crash_point("renamed_into_place", plan.step);
    write_latest(&plan.output_dir, plan.step)?;
    crash_point("latest_updated", plan.step);
    rotate(
        &plan.output_dir,
        plan.save_total_limit,
        plan.step,
        plan.best_model_checkpoint.as_deref(),
    )
}

/// Adds size and sha256 of every file under `dir` not yet in `files` (tokenizer and
/// weights written by other modules), fsyncing each.
fn hash_unlisted_files(root: &Path, prefix: &str, files: &mut FileTable) -> Result<()> {
    let dir = root.join(prefix);
    let entries =
        std::fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if entry.path().is_dir() {
            hash_unlisted_files(root, &relative, files)?;
        } else if !files.contains_key(&relative) && relative != MANIFEST_FILE {
            files.insert(relative, sync_and_hash(&entry.path())?);
        }
    }
    Ok(())
}

/// Renames the finished folder to `checkpoint-N` (an older one of the same step is
/// moved aside first and removed after).
fn move_into_place(plan: &CommitPlan) -> Result<()> {
    let replaced = plan
        .output_dir
        .join(format!("{}.replaced.tmp", checkpoint_dir_name(plan.step)));
    let had_old = plan.final_dir.exists();
    if had_old {
        std::fs::rename(&plan.final_dir, &replaced)
            .map_err(|e| Error::io(format!("moving aside {}", plan.final_dir.display()), e))?;
    }
    std::fs::rename(&plan.tmp_dir, &plan.final_dir)
        .map_err(|e| Error::io(format!("renaming {} into place", plan.tmp_dir.display()), e))?;
    sync_dir(&plan.output_dir)?;
    if had_old {
        std::fs::remove_dir_all(&replaced)
            .map_err(|e| Error::io(format!("removing {}", replaced.display()), e))?;
    }
    Ok(())
}

/// Points `output_dir/latest` at `checkpoint-{step}` (temp file + rename).
fn write_latest(output_dir: &Path, step: u64) -> Result<()> {
    let temp = output_dir.join(format!(".{LATEST_FILE}.tmp"));
    write_synced(&temp, format!("{}\n", checkpoint_dir_name(step)).as_bytes())?;
    let path = output_dir.join(LATEST_FILE);
    std::fs::rename(&temp, &path)
        .map_err(|e| Error::io(format!("replacing {}", path.display()), e))?;
    sync_dir(output_dir)
}

/// Deletes the oldest complete checkpoints beyond `limit`, never the newest (`newest`)
/// nor the best model's. Deletion renames first, so a crash never leaves a half-deleted
/// folder that looks complete.
fn rotate(output_dir: &Path, limit: Option<usize>, newest: u64, best: Option<&str>) -> Result<()> {
    let Some(limit) = limit else { return Ok(()) };
    let complete = super::resume::complete_checkpoints(output_dir)?;
    let keep = limit.max(1);
    if complete.len() <= keep {
        return Ok(());
    }
    let best_name = best.and_then(|b| {
        Path::new(b)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    });
    for (step, path) in &complete[..complete.len() - keep] {
        let name = checkpoint_dir_name(*step);
        if *step == newest || best_name.as_deref() == Some(name.as_str()) {
            continue;
        }
        let doomed = output_dir.join(format!("{name}.deleting.tmp"));
        std::fs::rename(path, &doomed)
            .map_err(|e| Error::io(format!("retiring {}", path.display()), e))?;
        crash_point("rotation_retired_one", newest);
        std::fs::remove_dir_all(&doomed)
            .map_err(|e| Error::io(format!("removing {}", doomed.display()), e))?;
        tracing::info!(checkpoint = %name, "deleted by save_total_limit");
    }
    sync_dir(output_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_cleanup_removes_tmp_folders_and_restores_a_moved_aside_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path();
        std::fs::create_dir_all(dir.join("checkpoint-5.tmp/zero")).unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-2.deleting.tmp")).unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-3.replaced.tmp")).unwrap();
        std::fs::write(
            dir.join("checkpoint-3.replaced.tmp").join(MANIFEST_FILE),
            "{}",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-4")).unwrap();
        remove_stale_tmp_dirs(dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["checkpoint-3", "checkpoint-4"]);
        assert!(dir.join("checkpoint-3").join(MANIFEST_FILE).is_file());
    }
}
