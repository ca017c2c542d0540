//! safetensors files written as a stream and read piece by piece. The writer lays out
//! the header from the tensors' names, dtypes and shapes first and then takes each
//! tensor's bytes one at a time (borrowed straight from a CPU tensor's memory when it can,
//! never copied into an intermediate buffer), hashing them in the same pass on a second
//! thread while the first writes, and asking the kernel to start writing back every
//! `WRITEBACK_CHUNK` bytes so the final fsync only waits for the tail. The reader uses
//! positioned reads (`pread`) into the caller's buffer, so reading a checkpoint never
//! maps it into the process: resident memory stays at what the caller holds (a small
//! multiple of the largest tensor for `consolidate`). Format:
//! https://github.com/huggingface/safetensors (8-byte LE header length, JSON header,
//! data; offsets relative to the data start).

use super::manifest::FileEntry;
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A tensor to be written: name, dtype and shape (its bytes come later).
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> u64 {
        self.shape.iter().product::<i64>().max(0) as u64 * self.kind.elt_size_in_bytes() as u64
    }
}

/// The safetensors dtype name of a tch kind.
pub fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        other => {
            return Err(Error::Checkpoint(format!(
                "cannot store {other:?} in a checkpoint"
            )));
        }
    })
}

/// The header bytes (length prefix included) for `specs` in order.
fn header_bytes(specs: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for spec in specs {
        let end = offset + spec.byte_len();
        header.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": dtype_name(spec.kind)?, "shape": spec.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header)
        .map_err(|e| Error::Checkpoint(format!("safetensors header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// The bytes of one tensor handed to `write_streaming`.
pub enum TensorBytes<'a> {
    /// Bytes the caller holds (e.g. read from a partition file).
    Slice(&'a [u8]),
    Owned(Vec<u8>),
    /// A contiguous CPU tensor whose memory is written as it is (no copy).
    Tensor(Tensor),
}

impl TensorBytes<'_> {
    /// `tensor` detached, on the CPU and contiguous (a copy only when it is not already).
    pub fn of(tensor: &Tensor) -> Result<Self> {
        let host = tensor
            .f_detach()?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        Ok(TensorBytes::Tensor(host))
    }

    pub fn as_slice(&self) -> Result<&[u8]> {
        match self {
            TensorBytes::Slice(bytes) => Ok(bytes),
            TensorBytes::Owned(bytes) => Ok(bytes),
            TensorBytes::Tensor(t) => {
                let len = t.numel() * t.f_kind()?.elt_size_in_bytes();
                if len == 0 {
                    return Ok(&[]);
                }
                // SAFETY: `of` made `t` a contiguous CPU tensor, so its storage holds
                // `len` bytes from `data_ptr`; `self` owns a handle on that storage for the
                // slice's lifetime. Nothing writes it meanwhile: the save's snapshot is
                // either a private copy or (synchronous save) the engine's state while the
                // engine is borrowed by the save.
                Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) })
            }
        }
    }
}

/// The kernel is asked to start writing back every this many bytes.
const WRITEBACK_CHUNK: usize = 32 << 20;
/// Writes at least this large are hashed on a second thread while they are written.
const PARALLEL_HASH_MIN: usize = 4 << 20;
/// Small writes are gathered up to this size.
const BUFFER_BYTES: usize = 1 << 20;

/// A file written once, front to back, hashed in the same pass and fsynced at the end.
pub struct StreamingFile {
    path: PathBuf,
    file: std::fs::File,
    buffer: Vec<u8>,
    hasher: Sha256,
    /// Bytes handed to `write` so far.
    size: u64,
    /// Bytes handed to the kernel so far, and where the last writeback request ended.
    flushed: u64,
    writeback_from: u64,
}

impl StreamingFile {
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(StreamingFile {
            path: path.to_path_buf(),
            file,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            hasher: Sha256::new(),
            size: 0,
            flushed: 0,
            writeback_from: 0,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.size += bytes.len() as u64;
        if self.buffer.len() + bytes.len() <= BUFFER_BYTES {
            self.hasher.update(bytes);
            self.buffer.extend_from_slice(bytes);
            return Ok(());
        }
        self.flush_buffer()?;
        for piece in bytes.chunks(WRITEBACK_CHUNK) {
            self.write_through(piece)?;
        }
        Ok(())
    }

    /// Writes `piece` to the kernel while another thread hashes it (when large).
    fn write_through(&mut self, piece: &[u8]) -> Result<()> {
        let (file, path) = (&self.file, &self.path);
        let write = || {
            (&*file)
                .write_all(piece)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))
        };
        if piece.len() < PARALLEL_HASH_MIN {
            self.hasher.update(piece);
            write()?;
        } else {
            let mut hasher = std::mem::take(&mut self.hasher);
            let written = std::thread::scope(|scope| {
                let hashing = scope.spawn(move || {
                    hasher.update(piece);
                    hasher
                });
                let written = write();
                match hashing.join() {
                    Ok(hasher) => Ok((hasher, written)),
                    Err(_) => Err(Error::Checkpoint("the hashing thread panicked".into())),
                }
            })?;
            self.hasher = written.0;
            written.1?;
        }
        self.flushed += piece.len() as u64;
        self.request_writeback();
        Ok(())
    }

    fn flush_buffer(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        (&self.file)
            .write_all(&self.buffer)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
        self.flushed += self.buffer.len() as u64;
        self.buffer.clear();
        self.request_writeback();
        Ok(())
    }

    /// Starts the disk write of what was handed over since the last request, so the
    /// disk works while the next bytes are produced (Linux `sync_file_range`; a hint,
    /// durability still comes from the fsync in `finish`).
    fn request_writeback(&mut self) {
        let pending = self.flushed - self.writeback_from;
        if pending < WRITEBACK_CHUNK as u64 {
            return;
        }
        // SAFETY: a plain syscall on our open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.writeback_from as libc::off64_t,
                pending as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.writeback_from = self.flushed;
    }

    /// Flushes, fsyncs and returns the file's size and sha256.
    pub fn finish(mut self) -> Result<FileEntry> {
        self.flush_buffer()?;
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        Ok(FileEntry {
            size: self.size,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

/// Writes a safetensors file at `path` whose tensors are `specs`; `fill(i)` returns the
/// bytes of tensor `i` (called once per tensor, in order). The file is fsynced; returns
/// its size and sha256.
pub fn write_streaming<'a>(
    path: &Path,
    specs: &[TensorSpec],
    mut fill: impl FnMut(usize) -> Result<TensorBytes<'a>>,
) -> Result<FileEntry> {
    let mut file = StreamingFile::create(path)?;
    file.write(&header_bytes(specs)?)?;
    for (i, spec) in specs.iter().enumerate() {
        let bytes = fill(i)?;
        let bytes = bytes.as_slice()?;
        if bytes.len() as u64 != spec.byte_len() {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {} has {} bytes, expected {}",
                path.display(),
                spec.name,
                bytes.len(),
                spec.byte_len()
            )));
        }
        file.write(bytes)?;
    }
    file.finish()
}

/// Where one tensor's bytes lie in a file.
#[derive(Debug, Clone)]
pub struct TensorLocation {
    pub kind: Kind,
    pub shape: Vec<i64>,
    start: u64,
    end: u64,
}

impl TensorLocation {
    pub fn byte_len(&self) -> usize {
        (self.end - self.start) as usize
    }
}

/// A safetensors file opened for positioned reads.
pub struct TensorFile {
    path: PathBuf,
    file: std::fs::File,
    tensors: HashMap<String, TensorLocation>,
}

/// One entry of a safetensors header.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: (u64, u64),
}

impl TensorFile {
    /// Opens `path` and reads its header (a malformed or truncated file is an error
    /// naming it).
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |why: String| {
            Error::Checkpoint(format!(
                "{} is not a valid safetensors file: {why}",
                path.display()
            ))
        };
        let file = std::fs::File::open(path).map_err(|e| {
            Error::Checkpoint(format!("{} is missing or unreadable: {e}", path.display()))
        })?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        let mut prefix = [0u8; 8];
        file.read_exact_at(&mut prefix, 0)
            .map_err(|e| invalid(format!("no header ({e})")))?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
            return Err(invalid(format!("header length {header_len}")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| invalid(e.to_string()))?;
        let mut entries: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
        entries.remove("__metadata__");
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, value) in entries {
            let entry: HeaderEntry =
                serde_json::from_value(value).map_err(|e| invalid(format!("{name}: {e}")))?;
            let (start, end) = (
                data_start + entry.data_offsets.0,
                data_start + entry.data_offsets.1,
            );
            if end > file_len || start > end {
                return Err(Error::Checkpoint(format!(
                    "{} is truncated (tensor {name})",
                    path.display()
                )));
            }
            let kind = kind_of_name(&entry.dtype).ok_or_else(|| {
                invalid(format!(
                    "tensor {name} has unsupported dtype {}",
                    entry.dtype
                ))
            })?;
            tensors.insert(
                name,
                TensorLocation {
                    kind,
                    shape: entry.shape,
                    start,
                    end,
                },
            );
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            file,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn location(&self, name: &str) -> Result<&TensorLocation> {
        self.tensors.get(name).ok_or_else(|| {
            Error::Checkpoint(format!("{} has no tensor {name}", self.path.display()))
        })
    }

    /// Appends bytes `range` (relative to the tensor's start) of tensor `name` to `out`.
    pub fn read_range(
        &self,
        name: &str,
        range: std::ops::Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let loc = self.location(name)?;
        if range.start > range.end || range.end > loc.byte_len() {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {name} is shorter than its layout",
                self.path.display()
            )));
        }
        let at = out.len();
        out.resize(at + range.len(), 0);
        self.file
            .read_exact_at(&mut out[at..], loc.start + range.start as u64)
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))
    }

    /// Tensor `name` read into a CPU tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let loc = self.location(name)?;
        let mut bytes = Vec::with_capacity(loc.byte_len());
        self.read_range(name, 0..loc.byte_len(), &mut bytes)?;
        Ok(Tensor::f_from_data_size(&bytes, &loc.shape, loc.kind)?)
    }

    /// Names of the tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// The tch kind of a safetensors dtype name (those `dtype_name` writes).
fn kind_of_name(name: &str) -> Option<Kind> {
    Some(match name {
        "F32" => Kind::Float,
        "BF16" => Kind::BFloat16,
        "F16" => Kind::Half,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::SafeTensors;

    #[test]
    fn streamed_file_reads_back_with_the_safetensors_crate_and_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16);
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                kind: Kind::Float,
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "b".into(),
                kind: Kind::BFloat16,
                shape: vec![2],
            },
        ];
        let sources = [a.shallow_clone(), b.shallow_clone()];
        let entry = write_streaming(&path, &specs, |i| TensorBytes::of(&sources[i])).unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(entry.size, raw.len() as u64);
        assert_eq!(
            entry.sha256,
            super::super::manifest::hash_file(&path).unwrap()
        );
        let parsed = SafeTensors::deserialize(&raw).unwrap();
        assert_eq!(parsed.tensor("a").unwrap().shape(), &[2, 3]);
        let file = TensorFile::open(&path).unwrap();
        assert!(file.tensor("a").unwrap().equal(&a));
        assert!(file.tensor("b").unwrap().equal(&b));
        assert!(file.tensor("c").is_err());
        let mut part = Vec::new();
        file.read_range("a", 4..12, &mut part).unwrap();
        assert_eq!(part, [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat());
        assert!(file.read_range("a", 20..28, &mut part).is_err());
        std::fs::write(&path, &raw[..raw.len() - 3]).unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("t.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn large_writes_hash_and_size_like_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        // Small, buffer-sized and multi-chunk pieces, so every write path is taken.
        let pieces: Vec<Vec<u8>> = [10usize, BUFFER_BYTES, PARALLEL_HASH_MIN + 7, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j * 31 + i) as u8).collect())
            .collect();
        let mut file = StreamingFile::create(&path).unwrap();
        for piece in &pieces {
            file.write(piece).unwrap();
        }
        let entry = file.finish().unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw, pieces.concat());
        assert_eq!(entry.size, raw.len() as u64);
        assert_eq!(
            entry.sha256,
            super::super::manifest::hash_file(&path).unwrap()
        );
    }
}
