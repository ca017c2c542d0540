//! The collective, crash-safe save. Every rank calls `save_checkpoint` (or
//! `save_checkpoint_async` + `PendingSave::finish`); the protocol is:
//! 1. rank 0 removes stale `checkpoint-*.tmp` folders of crashed saves and creates
//!    `output_dir/checkpoint-N.tmp/`; every rank takes views of its owned optimizer
//!    partition (no copy); all ranks agree (one all-reduce) that both worked. A
//!    synchronous save writes the engine's tensors as they are; an asynchronous one
//!    copies them on its background thread into reusable host buffers (one memcpy per
//!    tensor) while the next forward/backward runs, and the next step waits for that
//!    copy only if it is not done yet (`PendingSave::wait_for_snapshot`);
//! 2. every rank writes + fsyncs its files, hashing while writing, and then its manifest
//!    part (renamed into place, so a part that exists is complete);
//! 3. once every rank's part is there, rank 0 merges them, writes the HF weights from the
//!    partitions just written (no gather collective; one parameter at a time), hashes
//!    the tokenizer files, writes `manifest.json`, fsyncs, renames the folder to
//!    `checkpoint-N`, fsyncs `output_dir`, replaces `latest` atomically and rotates by
//!    `save_total_limit`. A synchronous save learns "every rank wrote" from an
//!    all-reduce and ends with another (every rank learns whether rank 0 published);
//!    an asynchronous save runs 2-3 on a background thread per rank, rank 0's waiting
//!    for the other parts to appear on the shared filesystem (or a rank's failure
//!    marker), so training only pays for step 1 and, at `finish`, one all-reduce.
//!
//! A crash at any moment leaves either no `checkpoint-N` or a complete one, so the
//! previous complete checkpoint stays the newest. Contract: `docs/checkpoints.md`.

use super::consolidate::write_weights;
use super::crash::crash_point;
use super::manifest::{
    EngineMeta, FORMAT_VERSION, FileTable, Manifest, RunRecord, SavedBlock, sync_and_hash,
    sync_dir, write_synced,
};
use super::resume::PartitionReader;
use super::tensor_file::{TensorBytes, TensorFile, TensorSpec, write_streaming};
use super::trainer_state::TrainerState;
use super::{
    FROZEN_FILE, LATEST_FILE, MANIFEST_FILE, OPTIMIZER_TENSORS, SAVING_MARKER, ZERO_DIR,
    checkpoint_dir_name, partition_file, partition_tensor_name, rank_state_file,
};
use crate::comm::{Communicator, ReduceOp};
use crate::tokenizer::Tokenizer;
use crate::zero::{OwnedState, ZeroEngine};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
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
    /// This rank's RNG metadata and position, saved as `rng_state_{rank}.json`.
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
    /// The run writing it, recorded in the manifest.
    pub run: Option<&'a RunRecord>,
}

/// How long rank 0's background writer waits for the other ranks' files.
const PARTS_TIMEOUT: Duration = Duration::from_secs(3600);

/// A rank's state for one save.
struct RankSnapshot {
    rank: usize,
    world_size: usize,
    step: u64,
    tmp_dir: PathBuf,
    /// The engine's tensors themselves (synchronous save) or pooled copies (asynchronous).
    owned: OwnedState,
    pooled: bool,
    /// Whether this rank writes an optimizer partition (stage 0: only rank 0).
    writes_partition: bool,
    per_rank_extra: serde_json::Value,
    /// Rank 0 only.
    leader: Option<LeaderSnapshot>,
}

/// Rank 0's extra state: its files and what publishing needs.
struct LeaderSnapshot {
    model_config_json: String,
    trainer_state_json: String,
    /// The engine's meta, frozen parameter names included.
    meta: EngineMeta,
    frozen: Vec<(String, Tensor)>,
    /// dtype and shard size of `model.safetensors`, when written.
    weights: Option<(Kind, u64)>,
    step: u64,
    output_dir: PathBuf,
    tmp_dir: PathBuf,
    final_dir: PathBuf,
    save_total_limit: Option<usize>,
    best_model_checkpoint: Option<String>,
    run: Option<RunRecord>,
}

/// An asynchronous save whose files are being written (and, on rank 0, published) by a
/// background thread.
pub struct PendingSave {
    writer: Option<std::thread::JoinHandle<Result<()>>>,
    snapshot: Arc<SnapshotGate>,
    cancel: Arc<AtomicBool>,
    final_dir: PathBuf,
    device: Device,
    rank: usize,
    step: u64,
}

impl PendingSave {
    /// Blocks until the background thread has copied the engine state this save
    /// writes. Call it before anything changes the engine's optimizer state (the next
    /// `step()`, a load): the copy runs while the next forward/backward does, so training
    /// usually does not wait here at all. A step taken without it makes the save fail
    /// (the tensors' version counters are checked after the copy).
    pub fn wait_for_snapshot(&self) -> Result<()> {
        let _span = tracing::info_span!(
            "checkpoint_wait_snapshot",
            rank = self.rank,
            step = self.step
        )
        .entered();
        self.snapshot.wait()
    }

    /// True once this rank's background work is done (rank 0: the checkpoint is
    /// published or failed); `finish` then returns at once.
    pub fn is_written(&self) -> bool {
        self.writer.as_ref().is_none_or(|w| w.is_finished())
    }

    /// Waits for this rank's background work (the snapshot included), then all ranks agree it succeeded (one
    /// all-reduce; every rank calls it, before the next save and at the end of
    /// training). Returns the checkpoint folder.
    pub fn finish(mut self, comm: &dyn Communicator) -> Result<PathBuf> {
        let _span =
            tracing::info_span!("checkpoint_finish", rank = self.rank, step = self.step).entered();
        let done = match self.writer.take() {
            Some(writer) => writer.join().unwrap_or_else(|_| {
                Err(Error::Checkpoint(
                    "the checkpoint writer thread panicked".into(),
                ))
            }),
            None => Err(Error::Checkpoint(
                "the checkpoint save was already finished".into(),
            )),
        };
        agreed(
            comm,
            self.device,
            "writing or publishing the checkpoint",
            done,
        )?;
        Ok(self.final_dir.clone())
    }
}

impl Drop for PendingSave {
    /// A save dropped without `finish` (training failed) stops waiting for other ranks.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Saves a checkpoint (a collective: every rank calls it with the same step).
pub fn save_checkpoint(req: SaveRequest<'_>) -> Result<PathBuf> {
    let (comm, device) = (req.comm, req.engine.config().device);
    let (snapshot, final_dir) = prepare(req)?;
    let world_size = snapshot.world_size;
    let written = write_rank_files(snapshot);
    let leader = agreed(comm, device, "writing checkpoint files", written)?;
    let published = match leader {
        Some(leader) => publish(&leader, world_size),
        None => Ok(()),
    };
    agreed(comm, device, "publishing the checkpoint", published)?;
    Ok(final_dir)
}

/// Like `save_checkpoint`, but training continues right after the snapshot: the files
/// are written and published by a background thread; call `PendingSave::finish` on
/// every rank before the next save and at the end.
pub fn save_checkpoint_async(req: SaveRequest<'_>) -> Result<PendingSave> {
    let (device, step) = (req.engine.config().device, req.step);
    let (snapshot, final_dir) = prepare(req)?;
    let versions = tensor_versions(&snapshot.owned)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(SnapshotGate::default());
    let (rank, world_size) = (snapshot.rank, snapshot.world_size);
    let (stop, opener) = (cancel.clone(), GateOpener(gate.clone()));
    let writer = std::thread::Builder::new()
        .name(format!("ckpt-writer-{rank}"))
        .spawn(move || write_in_background(snapshot, versions, opener, world_size, step, &stop))
        .map_err(|e| Error::io("starting the checkpoint writer thread", e))?;
    Ok(PendingSave {
        writer: Some(writer),
        snapshot: gate,
        cancel,
        final_dir,
        device,
        rank,
        step,
    })
}

/// Opens once the background copy of the engine state is taken (or failed).
#[derive(Default)]
struct SnapshotGate {
    taken: Mutex<Option<std::result::Result<(), String>>>,
    opened: Condvar,
}

impl SnapshotGate {
    fn open(&self, result: std::result::Result<(), String>) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if taken.is_none() {
            *taken = Some(result);
        }
        self.opened.notify_all();
    }

    fn wait(&self) -> Result<()> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        while taken.is_none() {
            taken = self.opened.wait(taken).unwrap_or_else(|e| e.into_inner());
        }
        match taken.as_ref() {
            Some(Err(why)) => Err(Error::Checkpoint(why.clone())),
            _ => Ok(()),
        }
    }
}

/// The writer's handle on the gate: dropping it (the thread ended or panicked before
/// the copy) opens the gate with an error, so `wait_for_snapshot` never hangs.
struct GateOpener(Arc<SnapshotGate>);

impl Drop for GateOpener {
    fn drop(&mut self) {
        self.0.open(Err(
            "the checkpoint writer stopped before taking its snapshot".into(),
        ));
    }
}

/// The version counters of the snapshot's tensors (shared with the engine's).
fn tensor_versions(owned: &OwnedState) -> Result<Vec<i64>> {
    let mut versions = Vec::new();
    for block in &owned.blocks {
        for t in [&block.master, &block.exp_avg, &block.exp_avg_sq] {
            versions.push(t.f_internal_version()?);
        }
    }
    Ok(versions)
}

/// Replaces the snapshot's views of the engine's tensors by pooled host copies, and
/// fails if the engine changed any of them before it was copied (a step taken without
/// `wait_for_snapshot`).
fn copy_views(owned: &mut OwnedState, versions: &[i64]) -> Result<()> {
    let mut expected = versions.iter();
    for block in &mut owned.blocks {
        for t in [&mut block.master, &mut block.exp_avg, &mut block.exp_avg_sq] {
            let copy = pooled_copy(t)?;
            if Some(&t.f_internal_version()?) != expected.next() {
                return Err(Error::Checkpoint(
                    "the engine's state changed before the asynchronous checkpoint copied it: \
                     call PendingSave::wait_for_snapshot before the next step"
                        .into(),
                ));
            }
            *t = copy;
        }
    }
    Ok(())
}

/// An asynchronous save's background work on one rank: the copy of its state (then the
/// training thread may step again), its files, then (rank 0) the wait for every other
/// rank's part and the publication. A failure leaves a marker the leader sees instead
/// of waiting.
fn write_in_background(
    mut snapshot: RankSnapshot,
    versions: Vec<i64>,
    opener: GateOpener,
    world_size: usize,
    step: u64,
    cancel: &AtomicBool,
) -> Result<()> {
    let (rank, tmp_dir) = (snapshot.rank, snapshot.tmp_dir.clone());
    let _span = tracing::info_span!("checkpoint_background", rank, step).entered();
    let copied = copy_views(&mut snapshot.owned, &versions);
    opener
        .0
        .open(copied.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    drop(opener);
    snapshot.pooled = copied.is_ok();
    let written = copied.and_then(|()| write_rank_files(snapshot));
    let leader = match written {
        Ok(leader) => leader,
        Err(e) => {
            mark_failed(&tmp_dir, rank, &e);
            return Err(e);
        }
    };
    let Some(leader) = leader else { return Ok(()) };
    wait_for_parts(&tmp_dir, world_size, cancel)?;
    publish(&leader, world_size)
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
        Ok(_) if others_failed => Err(Error::OtherRankFailed(format!(
            "checkpoint: {what} failed on another rank (see its log); the previous checkpoint is still the latest"
        ))),
        Ok(value) => Ok(value),
    }
}

/// Phase 1: the tmp folder (rank 0) and every rank's snapshot, agreed by one
/// all-reduce. The snapshot aliases the engine's tensors: a synchronous save writes them
/// while the engine is borrowed; an asynchronous one copies them first (background).
fn prepare(req: SaveRequest<'_>) -> Result<(RankSnapshot, PathBuf)> {
    let rank = req.comm.rank();
    let _span = tracing::info_span!("checkpoint_snapshot", rank, step = req.step).entered();
    let device = req.engine.config().device;
    let final_dir = req.output_dir.join(checkpoint_dir_name(req.step));
    let tmp_dir = req
        .output_dir
        .join(format!("{}.tmp", checkpoint_dir_name(req.step)));
    let frozen = frozen_params(req.engine, rank);
    let created = if rank == 0 {
        create_tmp_dir(req.output_dir, &tmp_dir, req.step).and_then(|()| match req.tokenizer {
            Some(tokenizer) => tokenizer.save(&tmp_dir),
            None => Ok(()),
        })
    } else {
        Ok(())
    };
    let snapshot = created
        .and(frozen)
        .and_then(|frozen| snapshot(&req, frozen, &tmp_dir, &final_dir));
    let snapshot = agreed(
        req.comm,
        device,
        "creating the checkpoint folder or snapshotting",
        snapshot,
    )?;
    Ok((snapshot, final_dir))
}

/// Views of the engine's owned state (no copy) and rank 0's small state.
fn snapshot(
    req: &SaveRequest<'_>,
    frozen: Vec<(String, Tensor)>,
    tmp_dir: &Path,
    final_dir: &Path,
) -> Result<RankSnapshot> {
    let rank = req.comm.rank();
    let owned = req.engine.owned_state_view()?;
    let mut meta = engine_meta(&owned, req.comm.world_size());
    let leader = if rank == 0 {
        meta.frozen = frozen.iter().map(|(n, _)| n.clone()).collect();
        Some(LeaderSnapshot {
            model_config_json: req.model_config_json.to_string(),
            trainer_state_json: req.trainer_state.to_json_string()?,
            meta: meta.clone(),
            frozen,
            weights: req
                .write_model_weights
                .then_some((req.weights_dtype, req.max_shard_bytes)),
            step: req.step,
            output_dir: req.output_dir.to_path_buf(),
            tmp_dir: tmp_dir.to_path_buf(),
            final_dir: final_dir.to_path_buf(),
            save_total_limit: req.save_total_limit,
            best_model_checkpoint: req.trainer_state.best_model_checkpoint.clone(),
            run: req.run.cloned(),
        })
    } else {
        None
    };
    Ok(RankSnapshot {
        rank,
        world_size: req.comm.world_size(),
        step: req.step,
        tmp_dir: tmp_dir.to_path_buf(),
        writes_partition: owned.stage.partitions_optimizer_state() || rank == 0,
        owned,
        pooled: false,
        per_rank_extra: req.per_rank_extra.clone(),
        leader,
    })
}

/// Host buffers of earlier asynchronous snapshots, reused so a snapshot is one memcpy
/// per tensor into memory that is already mapped (pinned when the source is on a GPU).
/// They hold one copy of the rank's optimizer partition between asynchronous saves.
static SNAPSHOT_POOL: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());

/// A host copy of `source` in a pooled buffer of the same size and dtype.
fn pooled_copy(source: &Tensor) -> Result<Tensor> {
    let (numel, kind) = (source.numel(), source.f_kind()?);
    let reused = {
        let mut pool = SNAPSHOT_POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter()
            .position(|t| t.numel() == numel && t.kind() == kind)
            .map(|i| pool.swap_remove(i))
    };
    let mut buffer = match reused {
        Some(buffer) => buffer,
        None => {
            let fresh = Tensor::f_empty([numel as i64], (kind, Device::Cpu))?;
            if source.device().is_cuda() {
                fresh.f_pin_memory(source.device())?
            } else {
                fresh
            }
        }
    };
    buffer.f_copy_(&source.f_detach()?.f_view([numel as i64])?)?;
    Ok(buffer)
}

/// Gives a snapshot's buffers back for the next asynchronous save.
fn return_to_pool(owned: OwnedState) {
    let mut pool = SNAPSHOT_POOL.lock().unwrap_or_else(|e| e.into_inner());
    for block in owned.blocks {
        pool.extend([block.master, block.exp_avg, block.exp_avg_sq]);
    }
}

/// Frees the host buffers kept for asynchronous snapshots (e.g. after the last save).
pub fn release_snapshot_buffers() {
    SNAPSHOT_POOL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

fn engine_meta(owned: &OwnedState, world_size: usize) -> EngineMeta {
    let partition_world = owned
        .blocks
        .first()
        .map(|b| b.layout.world_size)
        .unwrap_or(owned.stage.optimizer_partition(0, world_size).1);
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

/// Frozen parameters (never updated, e.g. LoRA bases) as CPU copies on rank 0; every
/// rank calls it (a collective under stage 3, where they are partitioned).
fn frozen_params(engine: &ZeroEngine, rank: usize) -> Result<Vec<(String, Tensor)>> {
    let held = engine.frozen_weights(rank == 0)?;
    let mut frozen = Vec::with_capacity(held.len());
    for (name, tensor) in held {
        frozen.push((name, tensor.f_to_device(Device::Cpu)?));
    }
    Ok(frozen)
}

fn create_tmp_dir(output_dir: &Path, tmp_dir: &Path, step: u64) -> Result<()> {
    std::fs::create_dir_all(output_dir)
        .map_err(|e| Error::io(format!("creating {}", output_dir.display()), e))?;
    remove_stale_tmp_dirs(output_dir)?;
    std::fs::create_dir_all(tmp_dir.join(ZERO_DIR))
        .map_err(|e| Error::io(format!("creating {}", tmp_dir.display()), e))?;
    std::fs::write(tmp_dir.join(SAVING_MARKER), b"")
        .map_err(|e| Error::io(format!("creating {}", tmp_dir.display()), e))?;
    // No fsync here: the folder only has to be durable once renamed, and the rename is
    // followed by an fsync of `output_dir` (this keeps a disk flush off the training
    // thread of an asynchronous save).
    crash_point("tmp_dir_created", step);
    Ok(())
}

/// Removes `checkpoint-*.tmp` folders left by crashed saves (never resumable): those
/// rsdeep made (with `SAVING_MARKER`, or a complete checkpoint moved aside); any other
/// folder of that name is the user's and stays.
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
        let made_by_rsdeep = entry.path().join(SAVING_MARKER).is_file()
            || entry.path().join(MANIFEST_FILE).is_file();
        if !made_by_rsdeep {
            continue;
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

fn failure_marker_file(rank: usize) -> String {
    format!("{ZERO_DIR}/.failed_rank_{rank}")
}

/// Phase 2 on one rank: writes and fsyncs its files, then its manifest part (written
/// aside and renamed, so a visible part is complete). Returns rank 0's publishing state.
fn write_rank_files(snapshot: RankSnapshot) -> Result<Option<LeaderSnapshot>> {
    let _span = tracing::info_span!("checkpoint_write", rank = snapshot.rank).entered();
    let (dir, step) = (&snapshot.tmp_dir, snapshot.step);
    let mut table = FileTable::new();
    if snapshot.writes_partition {
        let (partition_rank, _) = snapshot
            .owned
            .stage
            .optimizer_partition(snapshot.rank, snapshot.world_size);
        let relative = partition_file(partition_rank);
        table.insert(
            relative.clone(),
            write_partition(&dir.join(&relative), &snapshot.owned, step)?,
        );
        crash_point("partition_written", step);
    }
    if snapshot.pooled {
        return_to_pool(snapshot.owned);
    }
    let extra = serde_json::to_vec_pretty(&snapshot.per_rank_extra)
        .map_err(|e| Error::Checkpoint(format!("serialising rank state: {e}")))?;
    let relative = rank_state_file(snapshot.rank);
    table.insert(
        relative.clone(),
        write_synced(&dir.join(&relative), &extra)?,
    );
    if let Some(leader) = &snapshot.leader {
        write_leader_files(dir, leader, &mut table)?;
    }
    let part =
        serde_json::to_vec(&table).map_err(|e| Error::Checkpoint(format!("manifest part: {e}")))?;
    let final_part = dir.join(manifest_part_file(snapshot.rank));
    let partial = final_part.with_extension("partial");
    write_synced(&partial, &part)?;
    std::fs::rename(&partial, &final_part)
        .map_err(|e| Error::io(format!("renaming {}", partial.display()), e))?;
    crash_point("manifest_part_written", step);
    Ok(snapshot.leader)
}

/// Leaves `zero/.failed_rank_{rank}` with the error, so rank 0 stops waiting for this
/// rank's part (best effort: if even this fails, rank 0 waits until the training
/// thread's `finish` fails on the all-reduce and the job ends).
fn mark_failed(tmp_dir: &Path, rank: usize, error: &Error) {
    let _ = std::fs::write(tmp_dir.join(failure_marker_file(rank)), error.to_string());
}

/// Rank 0 (asynchronous save): waits until every rank's manifest part exists, failing as
/// soon as a rank left a failure marker, when `cancel` is set, or after `PARTS_TIMEOUT`.
fn wait_for_parts(tmp_dir: &Path, world_size: usize, cancel: &AtomicBool) -> Result<()> {
    let started = Instant::now();
    let mut missing: Vec<usize> = (0..world_size).collect();
    loop {
        for &rank in &missing {
            if let Ok(why) = std::fs::read_to_string(tmp_dir.join(failure_marker_file(rank))) {
                return Err(Error::Checkpoint(format!(
                    "rank {rank} failed writing its checkpoint files: {why}"
                )));
            }
        }
        missing.retain(|&rank| !tmp_dir.join(manifest_part_file(rank)).is_file());
        if missing.is_empty() {
            return Ok(());
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Checkpoint(
                "the checkpoint save was abandoned (training stopped)".into(),
            ));
        }
        if started.elapsed() > PARTS_TIMEOUT {
            return Err(Error::Checkpoint(format!(
                "ranks {missing:?} did not write their checkpoint files within {} s",
                PARTS_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

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
        TensorBytes::of(sources[i])
    })
}

/// Rank 0's small files: config, trainer state, engine state, frozen parameters.
fn write_leader_files(dir: &Path, leader: &LeaderSnapshot, table: &mut FileTable) -> Result<()> {
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
            TensorBytes::of(&leader.frozen[i].1)
        })?;
        table.insert(FROZEN_FILE.into(), entry);
    }
    let state = serde_json::to_vec_pretty(&leader.meta)
        .map_err(|e| Error::Checkpoint(format!("engine state: {e}")))?;
    table.insert(
        "engine_state.json".into(),
        write_synced(&dir.join("engine_state.json"), &state)?,
    );
    crash_point("leader_files_written", leader.step);
    Ok(())
}

/// HF weights from the partitions every rank just wrote (rank 0, after all parts are
/// in), added to `files`.
fn write_model_weights(leader: &LeaderSnapshot, files: &mut FileTable) -> Result<()> {
    let Some((dtype, max_shard_bytes)) = leader.weights else {
        return Ok(());
    };
    let reader = PartitionReader::open_unverified(&leader.tmp_dir, leader.meta.clone())?;
    let frozen = if leader.meta.frozen.is_empty() {
        None
    } else {
        Some(TensorFile::open(&leader.tmp_dir.join(FROZEN_FILE))?)
    };
    let written = write_weights(
        &reader,
        frozen.as_ref(),
        &leader.tmp_dir,
        dtype,
        max_shard_bytes,
    )?;
    files.extend(written);
    crash_point("weights_written", leader.step);
    Ok(())
}

/// Phase 3 on rank 0 (every part is there): weights, manifest, rename, `latest`,
/// rotation.
fn publish(leader: &LeaderSnapshot, world_size: usize) -> Result<()> {
    let _span = tracing::info_span!("checkpoint_publish", rank = 0, step = leader.step).entered();
    let (tmp_dir, step) = (&leader.tmp_dir, leader.step);
    let mut files = FileTable::new();
    for rank in 0..world_size {
        let path = tmp_dir.join(manifest_part_file(rank));
        let text = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let part: FileTable = serde_json::from_slice(&text)
            .map_err(|e| Error::Checkpoint(format!("{} is damaged: {e}", path.display())))?;
        files.extend(part);
        std::fs::remove_file(&path)
            .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    }
    crash_point("manifest_parts_merged", step);
    write_model_weights(leader, &mut files)?;
    hash_unlisted_files(tmp_dir, "", &mut files)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        rsdeep_version: env!("CARGO_PKG_VERSION").to_string(),
        global_step: step,
        engine: leader.meta.clone(),
        files,
        run: leader.run.clone(),
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Checkpoint(format!("manifest: {e}")))?;
    write_synced(&tmp_dir.join(MANIFEST_FILE), &text)?;
    sync_dir(&tmp_dir.join(ZERO_DIR))?;
    sync_dir(tmp_dir)?;
    crash_point("manifest_written", step);
    move_into_place(leader)?;
    // Best effort: a marker left in a complete checkpoint is harmless (never a .tmp).
    let _ = std::fs::remove_file(leader.final_dir.join(SAVING_MARKER));
    crash_point("renamed_into_place", step);
    write_latest(&leader.output_dir, step)?;
    crash_point("latest_updated", step);
    rotate(
        &leader.output_dir,
        leader.save_total_limit,
        step,
        leader.best_model_checkpoint.as_deref(),
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
        } else if !files.contains_key(&relative)
            && relative != MANIFEST_FILE
            && relative != SAVING_MARKER
        {
            files.insert(relative, sync_and_hash(&entry.path())?);
        }
    }
    Ok(())
}

/// Renames the finished folder to `checkpoint-N` (an older one of the same step is
/// moved aside first and removed after).
fn move_into_place(plan: &LeaderSnapshot) -> Result<()> {
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
    use crate::zero::ZeroStage;
    use crate::zero::loss_scaler::LossScalerState;
    use crate::zero::partition::FlatLayout;
    use crate::zero::state::BlockOwnedState;

    /// One block whose three tensors are views of `engine` (master, exp_avg, exp_avg_sq).
    fn views_of(engine: &[Tensor; 3]) -> OwnedState {
        OwnedState {
            stage: ZeroStage::One,
            world_size: 1,
            rank: 0,
            optimizer_steps: 0,
            global_steps: 0,
            skipped_steps: 0,
            loss_scaler: LossScalerState {
                cur_scale: 1.0,
                cur_iter: 0,
                last_overflow_iter: -1,
                cur_hysteresis: 2,
            },
            blocks: vec![BlockOwnedState {
                block: 0,
                layout: FlatLayout {
                    slots: vec![],
                    numel: 4,
                    padded_numel: 4,
                    world_size: 1,
                },
                partition_rank: 0,
                master: engine[0].detach(),
                exp_avg: engine[1].detach(),
                exp_avg_sq: engine[2].detach(),
            }],
        }
    }

    #[test]
    fn the_background_copy_is_independent_and_a_step_before_it_fails_the_save() {
        let mut engine =
            [0.5f64, 1.5, 2.5].map(|v| Tensor::full([4], v, (Kind::Float, Device::Cpu)));
        let mut owned = views_of(&engine);
        let versions = tensor_versions(&owned).unwrap();
        copy_views(&mut owned, &versions).unwrap();
        let _ = engine[0].f_add_scalar_(1.0).unwrap(); // the next step, after the copy
        assert_eq!(
            owned.blocks[0].master.double_value(&[0]),
            0.5,
            "the copy aliases"
        );
        return_to_pool(owned);

        let mut owned = views_of(&engine);
        let versions = tensor_versions(&owned).unwrap();
        let _ = engine[2].f_add_scalar_(1.0).unwrap(); // a step without wait_for_snapshot
        let err = copy_views(&mut owned, &versions).unwrap_err().to_string();
        assert!(err.contains("wait_for_snapshot"), "{err}");
    }

    #[test]
    fn the_snapshot_gate_reports_a_writer_that_stopped_instead_of_hanging() {
        let gate = Arc::new(SnapshotGate::default());
        drop(GateOpener(gate.clone()));
        let err = gate.wait().unwrap_err().to_string();
        assert!(err.contains("stopped before taking its snapshot"), "{err}");
        let gate = Arc::new(SnapshotGate::default());
        let opener = GateOpener(gate.clone());
        opener.0.open(Ok(()));
        drop(opener);
        gate.wait().unwrap();
    }

    #[test]
    fn stale_cleanup_removes_tmp_folders_and_restores_a_moved_aside_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path();
        std::fs::create_dir_all(dir.join("checkpoint-5.tmp/zero")).unwrap();
        std::fs::write(dir.join("checkpoint-5.tmp").join(SAVING_MARKER), "").unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-2.deleting.tmp")).unwrap();
        std::fs::write(
            dir.join("checkpoint-2.deleting.tmp").join(MANIFEST_FILE),
            "{}",
        )
        .unwrap();
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

    #[test]
    fn stale_cleanup_leaves_a_users_folder_named_like_a_checkpoint_tmp() {
        let out = tempfile::tempdir().unwrap();
        let mine = out.path().join("checkpoint-mine.tmp");
        std::fs::create_dir_all(mine.join("zero")).unwrap();
        std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
        remove_stale_tmp_dirs(out.path()).unwrap();
        assert!(
            mine.join("notes.txt").is_file(),
            "not made by rsdeep: never deleted"
        );
    }
}
