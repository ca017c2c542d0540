//! safetensors files written as a stream and read through memory maps. The writer lays
//! out the header from the tensors' names, dtypes and shapes first and then takes each
//! tensor's bytes one at a time, hashing as it writes, so neither the optimizer
//! partitions nor a consolidated shard need to sit in memory whole. The reader maps a
//! file and hands out byte ranges of its tensors without copying the rest. Format:
//! https://github.com/huggingface/safetensors (8-byte LE header length, JSON header,
//! data; offsets relative to the data start).

use super::manifest::{FileEntry, HashingWriter};
use crate::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
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

/// A contiguous CPU copy of `tensor`'s bytes.
pub fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let host = tensor
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    let numel = host.numel();
    let mut bytes = vec![0u8; numel * host.f_kind()?.elt_size_in_bytes()];
    host.f_copy_data_u8(&mut bytes, numel)?;
    Ok(bytes)
}

/// Writes a safetensors file at `path` whose tensors are `specs`; `fill(i)` returns the
/// bytes of tensor `i` (called once per tensor, in order). The file is fsynced; returns
/// its size and sha256.
pub fn write_streaming(
    path: &Path,
    specs: &[TensorSpec],
    mut fill: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<FileEntry> {
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
    let file = std::fs::File::create(path).map_err(|e| io("creating", e))?;
    let mut writer = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
    writer
        .write_all(&header_bytes(specs)?)
        .map_err(|e| io("writing", e))?;
    for (i, spec) in specs.iter().enumerate() {
        let bytes = fill(i)?;
        if bytes.len() as u64 != spec.byte_len() {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {} has {} bytes, expected {}",
                path.display(),
                spec.name,
                bytes.len(),
                spec.byte_len()
            )));
        }
        writer.write_all(&bytes).map_err(|e| io("writing", e))?;
    }
    let (buffered, entry) = writer.finish();
    let file = buffered
        .into_inner()
        .map_err(|e| io("writing", e.into_error()))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    Ok(entry)
}

/// Where one tensor's bytes lie in a mapped file.
#[derive(Debug, Clone)]
pub struct TensorLocation {
    pub kind: Kind,
    pub shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file.
pub struct MappedTensors {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, TensorLocation>,
}

impl MappedTensors {
    /// Maps `path` and reads its header (a malformed or truncated file is an error
    /// naming it).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            Error::Checkpoint(format!("{} is missing or unreadable: {e}", path.display()))
        })?;
        // SAFETY: checkpoint folders are immutable once complete (files are never
        // rewritten in place), so the mapping stays valid while it is read.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::Checkpoint(format!(
                "{} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = (
                data_start + info.data_offsets.0,
                data_start + info.data_offsets.1,
            );
            if end > map.len() {
                return Err(Error::Checkpoint(format!(
                    "{} is truncated (tensor {name})",
                    path.display()
                )));
            }
            let shape = info.shape.iter().map(|&d| d as i64).collect();
            tensors.insert(
                name,
                TensorLocation {
                    kind: crate::model::io::kind_of(info.dtype)?,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(MappedTensors {
            path: path.to_path_buf(),
            map,
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

    /// All bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let loc = self.location(name)?;
        Ok(&self.map[loc.start..loc.end])
    }

    /// Tensor `name` copied into a CPU tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let loc = self.location(name)?;
        Ok(Tensor::f_from_data_size(
            &self.map[loc.start..loc.end],
            &loc.shape,
            loc.kind,
        )?)
    }

    /// Names of the tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_file_reads_back_with_the_safetensors_crate_and_the_mapper() {
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
        let entry = write_streaming(&path, &specs, |i| tensor_bytes(&sources[i])).unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(entry.size, raw.len() as u64);
        let parsed = SafeTensors::deserialize(&raw).unwrap();
        assert_eq!(parsed.tensor("a").unwrap().shape(), &[2, 3]);
        let mapped = MappedTensors::open(&path).unwrap();
        assert!(mapped.tensor("a").unwrap().equal(&a));
        assert!(mapped.tensor("b").unwrap().equal(&b));
        assert!(mapped.tensor("c").is_err());
        std::fs::write(&path, &raw[..raw.len() - 3]).unwrap();
        let err = MappedTensors::open(&path).err().unwrap().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
    }
}
