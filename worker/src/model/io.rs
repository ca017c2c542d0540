//! Hugging Face checkpoint files: `model.safetensors`, or sharded
//! `model-0000x-of-0000y.safetensors` plus `model.safetensors.index.json`
//! (`{"metadata": {"total_size": N}, "weight_map": {name: file}}`), the layout
//! transformers' `save_pretrained` writes and `from_pretrained` reads. Files carry the
//! metadata `{"format": "pt"}` and are written atomically (temp file + rename).

use crate::{Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(Error::Checkpoint(format!(
                "cannot store {other:?} in safetensors"
            )));
        }
    })
}

/// The tch kind of a safetensors dtype.
pub(crate) fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => {
            return Err(Error::Checkpoint(format!(
                "unsupported safetensors dtype {other:?}"
            )));
        }
    })
}

/// A tensor's bytes copied to host memory, ready for serialisation.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    fn from_tensor(tensor: &Tensor) -> Result<Self> {
        let host = tensor
            .f_detach()?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        let kind = host.f_kind()?;
        let numel = host.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        host.f_copy_data_u8(&mut bytes, numel)?;
        Ok(HostTensor {
            dtype: dtype_of(kind)?,
            shape: host.size().iter().map(|&d| d as usize).collect(),
            bytes,
        })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn byte_size(tensor: &Tensor) -> u64 {
    tensor.numel() as u64 * tensor.kind().elt_size_in_bytes() as u64
}

/// Writes `bytes` (or a safetensors file) to `path` through a temp file + rename.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Checkpoint(format!("bad file name {}", path.display())))?;
    let temp = path.with_file_name(format!(".{name}.tmp"));
    write(&temp)?;
    std::fs::rename(&temp, path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", temp.display(), path.display()),
            e,
        )
    })
}

fn write_shard(path: &Path, named: &[&(String, Tensor)]) -> Result<()> {
    let host: Vec<(String, HostTensor)> = named
        .iter()
        .map(|(name, tensor)| Ok((name.clone(), HostTensor::from_tensor(tensor)?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomically(path, |temp| {
        safetensors::serialize_to_file(
            host.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            temp,
        )
        .map_err(|e| Error::Checkpoint(format!("writing {}: {e}", path.display())))
    })
}

/// Groups tensors, in order, into shards of at most `max_shard_bytes` (a tensor larger
/// than the limit gets a shard of its own), as transformers does.
fn plan_shards(named: &[(String, Tensor)], max_shard_bytes: u64) -> Vec<Vec<&(String, Tensor)>> {
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for entry in named {
        let size = byte_size(&entry.1);
        let last = shards.len() - 1;
        if !shards[last].is_empty() && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        let last = shards.len() - 1;
        shards[last].push(entry);
        current += size;
    }
    shards
}

/// Saves `named` tensors (any device, stored in their own dtype) into `dir` in HF layout:
/// one `model.safetensors` when everything fits in `max_shard_bytes`, otherwise shards
/// plus the index. Returns the files written. A stale single file or index of the other
/// layout is removed so transformers cannot pick it up.
pub fn save_safetensors_sharded(
    named: &[(String, Tensor)],
    dir: &Path,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let shards = plan_shards(named, max_shard_bytes.max(1));
    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        write_shard(&path, &shards[0])?;
        remove_if_present(&dir.join(INDEX_FILE))?;
        return Ok(vec![path]);
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut written = Vec::with_capacity(count + 1);
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        write_shard(&dir.join(&file), shard)?;
        for (name, _) in shard.iter().map(|e| (&e.0, &e.1)) {
            weight_map.insert(name.clone(), file.clone());
        }
        written.push(dir.join(file));
    }
    let total_size: u64 = named.iter().map(|(_, t)| byte_size(t)).sum();
    let index = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    let index_path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::Checkpoint(format!("serialising index: {e}")))?;
    write_atomically(&index_path, |temp| {
        std::fs::write(temp, text).map_err(|e| Error::io(format!("writing {}", temp.display()), e))
    })?;
    remove_if_present(&dir.join(SINGLE_FILE))?;
    written.push(index_path);
    Ok(written)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing stale {}", path.display()), e)),
    }
}

/// A checkpoint folder opened for reading: every tensor name mapped to its (memory-mapped)
/// file. Tensors are copied out one at a time, so loading never holds two copies of the
/// whole model.
pub struct SafetensorsFolder {
    files: Vec<(PathBuf, Mmap)>,
    /// name -> index into `files`, in file order.
    names: BTreeMap<String, usize>,
}

impl SafetensorsFolder {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            shard_files(&index_path)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else {
            return Err(Error::Checkpoint(format!(
                "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
                dir.display()
            )));
        };
        let mut folder = SafetensorsFolder {
            files: Vec::new(),
            names: BTreeMap::new(),
        };
        for path in files {
            folder.add_file(path)?;
        }
        Ok(folder)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = std::fs::File::open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: checkpoint files are not modified while a model loads from them (writers
        // replace files by rename, which leaves this mapping intact).
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        let parsed = SafeTensors::deserialize(&map)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
        for name in parsed.names() {
            if self
                .names
                .insert(name.to_string(), self.files.len())
                .is_some()
            {
                return Err(Error::Checkpoint(format!(
                    "tensor {name} appears in more than one file of the checkpoint"
                )));
            }
        }
        self.files.push((path, map));
        Ok(())
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Copies tensor `name` out as a CPU tensor in the file's dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let &file = self
            .names
            .get(name)
            .ok_or_else(|| Error::Checkpoint(format!("tensor {name} is not in the checkpoint")))?;
        let (path, map) = &self.files[file];
        let parsed = SafeTensors::deserialize(map)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
        let view = parsed
            .tensor(name)
            .map_err(|e| Error::Checkpoint(format!("{}: {name}: {e}", path.display())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)?;
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        // The copy is made: drop the mapped pages from this process (they stay in the page
        // cache), so loading a model tensor by tensor never keeps the whole file resident.
        // SAFETY: a read-only shared file mapping; MADV_DONTNEED only makes the next read
        // of those pages fault them in again from the file.
        let dropped = unsafe {
            map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, view.data().len())
        };
        if let Err(e) = dropped {
            tracing::debug!("madvise(MADV_DONTNEED) on {}: {e}", path.display());
        }
        Ok(tensor)
    }
}

/// The distinct shard file names an index refers to, in first-seen order.
fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path)
        .map_err(|e| Error::io(format!("reading {}", index_path.display()), e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", index_path.display())))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Checkpoint(format!("{}: no weight_map", index_path.display())))?;
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: weight_map[{name}] is not a string",
                index_path.display()
            ))
        })?;
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(sizes: &[i64]) -> Vec<(String, Tensor)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (
                    format!("t{i}"),
                    Tensor::arange(n, (Kind::Float, Device::Cpu)) * (i as f64 + 0.5),
                )
            })
            .collect()
    }

    #[test]
    fn single_file_round_trip_keeps_dtype_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = named(&[5, 3]);
        tensors.push((
            "half".into(),
            Tensor::arange(6, (Kind::BFloat16, Device::Cpu)).reshape([2, 3]),
        ));
        let files = save_safetensors_sharded(&tensors, dir.path(), 1 << 20).unwrap();
        assert_eq!(files, vec![dir.path().join(SINGLE_FILE)]);
        let folder = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(folder.names().collect::<Vec<_>>(), vec!["half", "t0", "t1"]);
        for (name, tensor) in &tensors {
            let loaded = folder.load(name).unwrap();
            assert_eq!(loaded.kind(), tensor.kind());
            assert!(loaded.equal(tensor), "{name}");
        }
        let bytes = std::fs::read(&files[0]).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            metadata.metadata().as_ref().unwrap().get("format").unwrap(),
            "pt"
        );
    }

    #[test]
    fn sharded_layout_has_index_with_total_size() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = named(&[10, 10, 30, 4]); // 40, 40, 120, 16 bytes
        let files = save_safetensors_sharded(&tensors, dir.path(), 80).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                INDEX_FILE
            ]
        );
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
                .unwrap();
        assert_eq!(index["metadata"]["total_size"], 216);
        assert_eq!(
            index["weight_map"]["t2"],
            "model-00002-of-00003.safetensors"
        );
        assert_eq!(
            index["weight_map"]["t3"],
            "model-00003-of-00003.safetensors"
        );
        let folder = SafetensorsFolder::open(dir.path()).unwrap();
        assert!(folder.load("t2").unwrap().equal(&tensors[2].1));
        assert!(folder.load("missing").is_err());
    }

    #[test]
    fn missing_checkpoint_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = SafetensorsFolder::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(SINGLE_FILE), "{err}");
    }
}
