//! Who owns an `output_dir`: the check that a fresh run does not start on top of another
//! run's checkpoints or model, and the lock that keeps two jobs out of one folder. The
//! folder rules launcher and worker share (what a `checkpoint-N` folder is, which run wrote
//! it, what `latest` names) are `rsdeep_contract::checkpoint_dir`.
//!
//! The lock is `output_dir/.rsdeep.lock`: an exclusive `flock` held by the deciding
//! launcher for the whole job (restarts included) plus a JSON record of the holder (job
//! id, pid, host, boot id) whose mtime the holder refreshes. A lock whose holder is gone is
//! stale and taken over: on the same host when its pid is dead or the machine rebooted, on
//! another host when it has not been refreshed for `STALE_AFTER`, or at once by the same
//! job (a requeued SLURM job keeps its id). The record in every checkpoint's manifest
//! (`run`: run id, lineage, config summary) is written by the worker
//! (`worker/src/checkpoint/manifest.rs`); this module only reads its `run.run_id`.

use rsdeep_contract::checkpoint_dir::{
    LATEST_FILE, MODEL_FILES, checkpoint_run_id, checkpoints_with_manifest,
};
use rsdeep_contract::process::pid_alive;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// The lock file inside `output_dir`.
pub const LOCK_FILE: &str = ".rsdeep.lock";
/// How often the holder refreshes the lock's mtime.
const REFRESH_EVERY: Duration = Duration::from_secs(15);
/// A lock held from another host that has not been refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum OutputDirError {
    /// The OS error is in the message, not a `source` (chains would print it twice).
    #[error("{what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "output_dir {dir} is in use by job {} (pid {} on {}, since {}s after the epoch); wait for it to finish, stop it, or choose another --output_dir (if that job is gone, remove {}/{LOCK_FILE})",
        holder.job_id, holder.pid, holder.host, holder.started_unix, dir.display()
    )]
    Locked { dir: PathBuf, holder: LockHolder },
    #[error(
        "output_dir {dir} already holds {what}{from}: a new run would mix with it. Pass --resume_from_checkpoint true to continue that run, --overwrite_output_dir true to replace its checkpoints, or choose another --output_dir"
    )]
    NotEmpty {
        dir: PathBuf,
        what: String,
        from: String,
    },
}

type Result<T> = std::result::Result<T, OutputDirError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutputDirError {
    let path = path.to_path_buf();
    move |cause| OutputDirError::Io { what, path, cause }
}

/// What an earlier run left in an output folder.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PriorOutputs {
    /// `checkpoint-N` folders with a manifest, oldest first.
    pub checkpoints: Vec<PathBuf>,
    /// Names from `MODEL_FILES` that exist.
    pub model_files: Vec<String>,
    /// Run ids recorded in those checkpoints, first seen first.
    pub run_ids: Vec<String>,
}

impl PriorOutputs {
    pub fn read(output_dir: &Path) -> PriorOutputs {
        // A folder that cannot be listed holds nothing of an earlier run.
        let checkpoints: Vec<PathBuf> = checkpoints_with_manifest(output_dir)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let mut run_ids = Vec::new();
        for id in checkpoints.iter().filter_map(|c| checkpoint_run_id(c)) {
            if !run_ids.contains(&id) {
                run_ids.push(id);
            }
        }
        let model_files = MODEL_FILES
            .iter()
            .filter(|f| output_dir.join(f).is_file())
            .map(|f| f.to_string())
            .collect();
        PriorOutputs {
            checkpoints,
            model_files,
            run_ids,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty() && self.model_files.is_empty()
    }

    /// "checkpoint-5, checkpoint-10 and model.safetensors", for messages.
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .checkpoints
            .iter()
            .filter_map(|c| Some(c.file_name()?.to_string_lossy().into_owned()))
            .collect();
        parts.extend(self.model_files.iter().cloned());
        match parts.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

/// Checks that a fresh run (no resume asked for) may write into `output_dir`. Refuses when
/// an earlier run left checkpoints or a model there, unless `overwrite`: then the earlier
/// checkpoint folders (only those with a manifest: rsdeep made them) and `latest` are
/// removed, and the names removed are returned. Other files are never touched; an old
/// final model is replaced when this run writes its own.
pub fn claim_for_fresh_run(output_dir: &Path, overwrite: bool) -> Result<Vec<String>> {
    let prior = PriorOutputs::read(output_dir);
    if prior.is_empty() {
        return Ok(Vec::new());
    }
    if !overwrite {
        let from = match prior.run_ids.as_slice() {
            [] => String::new(),
            ids => format!(" (from run {})", ids.join(", ")),
        };
        return Err(OutputDirError::NotEmpty {
            dir: output_dir.to_path_buf(),
            what: prior.describe(),
            from,
        });
    }
    let mut removed = Vec::new();
    for dir in &prior.checkpoints {
        std::fs::remove_dir_all(dir).map_err(io("removing", dir))?;
        removed.push(
            dir.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    let latest = output_dir.join(LATEST_FILE);
    if latest.is_file() {
        std::fs::remove_file(&latest).map_err(io("removing", &latest))?;
        removed.push(LATEST_FILE.to_string());
    }
    Ok(removed)
}

/// Who holds (or held) an output folder's lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub job_id: String,
    pub pid: u32,
    pub host: String,
    pub boot_id: String,
    pub started_unix: u64,
}

impl LockHolder {
    /// This process, as job `job_id`.
    pub fn this_process(job_id: &str) -> LockHolder {
        LockHolder {
            job_id: job_id.to_string(),
            pid: std::process::id(),
            host: this_host(),
            boot_id: boot_id(),
            started_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Whether a lock record left by `self` no longer protects anything, judged by `me`
    /// (the would-be holder) and the age of the record's last refresh.
    fn is_stale(&self, me: &LockHolder, age: Duration) -> bool {
        if self.job_id == me.job_id {
            return true; // the same job again (a requeue): its own lock
        }
        if self.host == me.host {
            return self.boot_id != me.boot_id || !pid_alive(self.pid);
        }
        age >= STALE_AFTER
    }
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

/// An acquired output folder lock: released (record removed, `flock` dropped) on drop.
#[derive(Debug)]
pub struct OutputDirLock {
    path: PathBuf,
    holder: LockHolder,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
    _flock: nix::fcntl::Flock<File>,
}

/// What `OutputDirLock::acquire` found besides the lock itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    Fresh,
    /// A stale record of this holder was replaced.
    TookOver(LockHolder),
}

impl OutputDirLock {
    /// Takes `output_dir`'s lock for job `job_id` (creating the folder), or names the job
    /// that holds it.
    pub fn acquire(output_dir: &Path, job_id: &str) -> Result<(OutputDirLock, Acquired)> {
        std::fs::create_dir_all(output_dir).map_err(io("creating", output_dir))?;
        let path = output_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening", &path))?;
        let me = LockHolder::this_process(job_id);
        let mut flock =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(flock) => flock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = read_holder(&path).unwrap_or_else(|| unknown_holder(&me));
                    return Err(OutputDirError::Locked {
                        dir: output_dir.to_path_buf(),
                        holder,
                    });
                }
                Err((_, errno)) => return Err(io("locking", &path)(std::io::Error::from(errno))),
            };
        let acquired = match read_holder(&path) {
            None => Acquired::Fresh,
            Some(previous) if previous.is_stale(&me, age_of(&path)) => Acquired::TookOver(previous),
            Some(holder) => {
                return Err(OutputDirError::Locked {
                    dir: output_dir.to_path_buf(),
                    holder,
                });
            }
        };
        write_holder(&mut flock, &path, &me)?;
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = spawn_refresher(path.clone(), stop.clone());
        let lock = OutputDirLock {
            path,
            holder: me,
            stop,
            refresher,
            _flock: flock,
        };
        Ok((lock, acquired))
    }
}

impl Drop for OutputDirLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.refresher.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        // Only our own record is removed (never one a later holder wrote).
        if read_holder(&self.path).as_ref() == Some(&self.holder) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn unknown_holder(me: &LockHolder) -> LockHolder {
    LockHolder {
        job_id: "(unknown: the lock file has no record yet)".into(),
        pid: 0,
        host: me.host.clone(),
        boot_id: String::new(),
        started_unix: 0,
    }
}

fn read_holder(path: &Path) -> Option<LockHolder> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_holder(file: &mut File, path: &Path, holder: &LockHolder) -> Result<()> {
    let text = serde_json::to_string(holder).unwrap_or_default();
    file.set_len(0).map_err(io("truncating", path))?;
    file.rewind().map_err(io("writing", path))?;
    file.write_all(text.as_bytes())
        .map_err(io("writing", path))?;
    file.sync_all().map_err(io("syncing", path))
}

fn age_of(path: &Path) -> Duration {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or(Duration::ZERO)
}

/// Refreshes the lock file's mtime every `REFRESH_EVERY` until `stop` (hosts sharing the
/// folder over a network file system judge staleness by it).
fn spawn_refresher(path: PathBuf, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("output-dir-lock".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(REFRESH_EVERY);
                if let Ok(file) = OpenOptions::new().append(true).open(&path) {
                    let _ = file.set_modified(SystemTime::now());
                }
            }
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsdeep_contract::checkpoint_dir::MANIFEST_FILE;

    fn checkpoint(dir: &Path, step: u64, run_id: Option<&str>) -> PathBuf {
        let c = dir.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(&c).unwrap();
        let run = run_id.map_or(
            serde_json::Value::Null,
            |id| serde_json::json!({"run_id": id}),
        );
        std::fs::write(
            c.join(MANIFEST_FILE),
            serde_json::json!({"global_step": step, "run": run}).to_string(),
        )
        .unwrap();
        c
    }

    #[test]
    fn a_fresh_run_refuses_a_folder_with_checkpoints_or_a_model() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            claim_for_fresh_run(dir.path(), false).unwrap(),
            Vec::<String>::new()
        );
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        claim_for_fresh_run(dir.path(), false).expect("unrelated files are fine");
        std::fs::write(dir.path().join("model.safetensors"), "x").unwrap();
        let err = claim_for_fresh_run(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        checkpoint(dir.path(), 5, Some("run-a"));
        checkpoint(dir.path(), 10, Some("run-a"));
        let err = claim_for_fresh_run(dir.path(), false)
            .unwrap_err()
            .to_string();
        for part in [
            "checkpoint-5, checkpoint-10 and model.safetensors",
            "run run-a",
            "--resume_from_checkpoint true",
            "--overwrite_output_dir true",
        ] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
    }

    #[test]
    fn overwrite_removes_only_rsdeeps_checkpoints_and_latest() {
        let dir = tempfile::tempdir().unwrap();
        checkpoint(dir.path(), 5, Some("a"));
        std::fs::create_dir_all(dir.path().join("checkpoint-7")).unwrap(); // no manifest
        std::fs::write(dir.path().join(LATEST_FILE), "checkpoint-5").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let removed = claim_for_fresh_run(dir.path(), true).unwrap();
        assert_eq!(removed, ["checkpoint-5", LATEST_FILE]);
        assert!(dir.path().join("checkpoint-7").is_dir());
        assert!(dir.path().join("notes.txt").is_file());
        assert!(PriorOutputs::read(dir.path()).is_empty());
    }

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let (first, how) = OutputDirLock::acquire(dir.path(), "job-a").unwrap();
        assert_eq!(how, Acquired::Fresh);
        let err = OutputDirLock::acquire(dir.path(), "job-b").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("job-a") && text.contains(&std::process::id().to_string()),
            "{text}"
        );
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists(), "released on drop");
        let (_second, how) = OutputDirLock::acquire(dir.path(), "job-b").unwrap();
        assert_eq!(how, Acquired::Fresh);
    }

    #[test]
    fn stale_records_are_taken_over_and_live_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let me = LockHolder::this_process("job-new");
        let write = |holder: &LockHolder| {
            std::fs::write(
                dir.path().join(LOCK_FILE),
                serde_json::to_string(holder).unwrap(),
            )
            .unwrap()
        };
        // A killed launcher on this host: its pid is gone, no flock is held.
        let dead = LockHolder {
            job_id: "job-dead".into(),
            pid: u32::MAX / 2,
            ..me.clone()
        };
        write(&dead);
        let (lock, how) = OutputDirLock::acquire(dir.path(), "job-new").unwrap();
        assert_eq!(how, Acquired::TookOver(dead));
        drop(lock);
        // A holder on another host that refreshed just now: still in use.
        let remote = LockHolder {
            job_id: "job-remote".into(),
            host: "another-host".into(),
            ..me.clone()
        };
        write(&remote);
        let err = OutputDirLock::acquire(dir.path(), "job-new").unwrap_err();
        assert!(err.to_string().contains("another-host"), "{err}");
        // ... and once it has been silent for longer than STALE_AFTER: stale.
        assert!(remote.is_stale(&me, STALE_AFTER));
        // A live pid on this host (this test process) recorded without a flock.
        let live = LockHolder {
            job_id: "job-live".into(),
            ..me.clone()
        };
        assert!(!live.is_stale(&me, STALE_AFTER * 10));
        // The same job (a requeue) always takes its own lock back.
        assert!(me.is_stale(&me, Duration::ZERO));
    }
}
