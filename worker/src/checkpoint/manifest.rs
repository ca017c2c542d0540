//! `manifest.json`, written last into a checkpoint: every file's size and sha256, the
//! rsdeep version, and the ZeRO engine's metadata (stage, world size, step counters, loss
//! scaler, and each block's flat layout, which is what resharding needs). Its presence
//! marks a complete checkpoint; `verify_file` turns any later damage into an error that
//! names the file. Also the small durable-write helpers (fsync of files and folders).

use crate::zero::ZeroStage;
use crate::zero::loss_scaler::LossScalerState;
use crate::zero::partition::{FlatLayout, ParamSlot};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// Bumped when the checkpoint layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// One file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

/// Files keyed by their path relative to the checkpoint folder (`/`-separated).
pub type FileTable = BTreeMap<String, FileEntry>;

/// One parameter's place in a block's flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSlot {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub numel: usize,
}

/// One block's flat layout when it was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBlock {
    pub block: usize,
    pub slots: Vec<SavedSlot>,
    pub numel: usize,
    pub padded_numel: usize,
    /// Partitions the buffer was split into (1 under stage 0).
    pub partition_world: usize,
}

impl SavedBlock {
    pub fn from_layout(block: usize, layout: &FlatLayout) -> Self {
        SavedBlock {
            block,
            slots: layout
                .slots
                .iter()
                .map(|s| SavedSlot {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    offset: s.offset,
                    numel: s.numel,
                })
                .collect(),
            numel: layout.numel,
            padded_numel: layout.padded_numel,
            partition_world: layout.world_size,
        }
    }

    /// Elements of each partition.
    pub fn partition_numel(&self) -> usize {
        self.padded_numel / self.partition_world.max(1)
    }

    /// The layout as the engine's type (for comparisons).
    pub fn to_layout(&self) -> FlatLayout {
        FlatLayout {
            slots: self
                .slots
                .iter()
                .map(|s| ParamSlot {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    offset: s.offset,
                    numel: s.numel,
                })
                .collect(),
            numel: self.numel,
            padded_numel: self.padded_numel,
            world_size: self.partition_world,
        }
    }
}

/// The loss scaler's state as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SavedLossScaler {
    pub cur_scale: f64,
    pub cur_iter: u64,
    pub last_overflow_iter: i64,
    pub cur_hysteresis: u32,
}

impl From<LossScalerState> for SavedLossScaler {
    fn from(s: LossScalerState) -> Self {
        SavedLossScaler {
            cur_scale: s.cur_scale,
            cur_iter: s.cur_iter,
            last_overflow_iter: s.last_overflow_iter,
            cur_hysteresis: s.cur_hysteresis,
        }
    }
}

impl From<SavedLossScaler> for LossScalerState {
    fn from(s: SavedLossScaler) -> Self {
        LossScalerState {
            cur_scale: s.cur_scale,
            cur_iter: s.cur_iter,
            last_overflow_iter: s.last_overflow_iter,
            cur_hysteresis: s.cur_hysteresis,
        }
    }
}

/// The engine's side of a checkpoint: topology, counters, scaler, layouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineMeta {
    pub stage: ZeroStage,
    pub world_size: usize,
    /// Number of optimizer partition files (1 under stage 0, the world size otherwise).
    pub partition_world: usize,
    /// Adam's step count, which is also the LR scheduler's position.
    pub optimizer_steps: u64,
    pub global_steps: u64,
    pub skipped_steps: u64,
    pub loss_scaler: SavedLossScaler,
    pub blocks: Vec<SavedBlock>,
    /// Names of parameters kept outside the optimizer (saved in `zero/frozen_params`).
    pub frozen: Vec<String>,
}

/// Which run wrote a checkpoint: its id (the launcher's job id, kept across restarts),
/// the runs it continues (oldest first, itself last), and the training settings an exact
/// resume depends on (compared, key by key, when another run resumes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub lineage: Vec<String>,
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl RunRecord {
    /// A run that starts fresh.
    pub fn new(run_id: &str, config: serde_json::Map<String, serde_json::Value>) -> Self {
        RunRecord {
            run_id: run_id.to_string(),
            lineage: vec![run_id.to_string()],
            config,
        }
    }

    /// This run continues `resumed`'s checkpoint: its lineage comes first.
    pub fn continuing(mut self, resumed: &RunRecord) -> Self {
        let mut lineage = resumed.lineage.clone();
        if lineage.last() != Some(&self.run_id) {
            lineage.push(self.run_id.clone());
        }
        self.lineage = lineage;
        self
    }

    /// Settings that differ from `saved`'s, as `key: saved -> now`.
    pub fn changed_settings(&self, saved: &RunRecord) -> Vec<String> {
        let null = serde_json::Value::Null;
        let mut keys: Vec<&String> = self.config.keys().chain(saved.config.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|key| {
                let (was, now) = (
                    saved.config.get(key).unwrap_or(&null),
                    self.config.get(key).unwrap_or(&null),
                );
                (was != now).then(|| format!("{key}: {was} -> {now}"))
            })
            .collect()
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub rsdeep_version: String,
    pub global_step: u64,
    pub engine: EngineMeta,
    pub files: FileTable,
    /// Absent in checkpoints written before runs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunRecord>,
}

impl Manifest {
    /// Reads and parses `dir/manifest.json`; an unreadable one means an incomplete or
    /// damaged checkpoint.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(super::MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Checkpoint(format!(
                "{} cannot be read ({e}): the checkpoint is incomplete; resume from an earlier checkpoint-M",
                path.display()
            ))
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::Checkpoint(format!(
                "{} is damaged ({e}); resume from an earlier checkpoint-M",
                path.display()
            ))
        })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(Error::Checkpoint(format!(
                "{} has format version {}, this rsdeep reads {FORMAT_VERSION}",
                path.display(),
                manifest.format_version
            )));
        }
        Ok(manifest)
    }

    /// Checks `dir/relative` against its entry: present, same size, same sha256.
    pub fn verify_file(&self, dir: &Path, relative: &str) -> Result<()> {
        let path = dir.join(relative);
        let advice =
            "the checkpoint is damaged; resume from an earlier checkpoint-M (nothing was changed)";
        let entry = self.files.get(relative).ok_or_else(|| {
            Error::Checkpoint(format!(
                "{} is not listed in {}/manifest.json; {advice}",
                path.display(),
                dir.display()
            ))
        })?;
        let size = std::fs::metadata(&path)
            .map_err(|e| {
                Error::Checkpoint(format!("{} is missing ({e}); {advice}", path.display()))
            })?
            .len();
        if size != entry.size {
            return Err(Error::Checkpoint(format!(
                "{} is {size} bytes but the manifest says {} (truncated or partly written); {advice}",
                path.display(),
                entry.size
            )));
        }
        let digest = hash_file(&path)?;
        if digest != entry.sha256 {
            return Err(Error::Checkpoint(format!(
                "{} fails its checksum (sha256 {digest}, manifest {}); {advice}",
                path.display(),
                entry.sha256
            )));
        }
        Ok(())
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The inner writer and the entry of everything written.
    pub fn finish(self) -> (W, FileEntry) {
        let sha256 = hex::encode(self.hasher.finalize());
        (
            self.inner,
            FileEntry {
                size: self.written,
                sha256,
            },
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a file, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Writes `bytes` to `path`, flushed to disk, and returns its entry.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileEntry> {
    let file = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut writer = HashingWriter::new(std::io::BufWriter::new(file));
    writer
        .write_all(bytes)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    let (buffered, entry) = writer.finish();
    let file = buffered
        .into_inner()
        .map_err(|e| Error::io(format!("writing {}", path.display()), e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
    Ok(entry)
}

/// Flushes a file written by someone else to disk and returns its entry.
pub fn sync_and_hash(path: &Path) -> Result<FileEntry> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .len();
    Ok(FileEntry {
        size,
        sha256: hash_file(path)?,
    })
}

/// fsync of a folder, so renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let handle =
        std::fs::File::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    handle
        .sync_all()
        .map_err(|e| Error::io(format!("syncing folder {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_writer_matches_file_hash_and_verify_catches_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        let entry = write_synced(&path, b"hello checkpoint").unwrap();
        assert_eq!(entry.size, 16);
        assert_eq!(entry.sha256, hash_file(&path).unwrap());
        let mut files = FileTable::new();
        files.insert("a.bin".into(), entry);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            rsdeep_version: "test".into(),
            run: None,
            global_step: 1,
            engine: EngineMeta {
                stage: ZeroStage::Zero,
                world_size: 1,
                partition_world: 1,
                optimizer_steps: 0,
                global_steps: 0,
                skipped_steps: 0,
                loss_scaler: SavedLossScaler {
                    cur_scale: 1.0,
                    cur_iter: 0,
                    last_overflow_iter: -1,
                    cur_hysteresis: 2,
                },
                blocks: vec![],
                frozen: vec![],
            },
            files,
        };
        manifest.verify_file(dir.path(), "a.bin").unwrap();
        std::fs::write(&path, b"hellO checkpoint").unwrap();
        let err = manifest
            .verify_file(dir.path(), "a.bin")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.bin") && err.contains("checksum") && err.contains("earlier checkpoint"),
            "{err}"
        );
        std::fs::write(&path, b"hello").unwrap();
        let err = manifest
            .verify_file(dir.path(), "a.bin")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.bin") && err.contains("truncated"), "{err}");
    }
}
