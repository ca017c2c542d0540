//! A reader for GGUF files (llama.cpp's single-file model format, version 2 and 3): the
//! typed metadata, the tensor table and each tensor's bytes, memory-mapped.
//!
//! Contract (little-endian throughout): header `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count; each metadata entry is a string key (u64 length + UTF-8), a u32
//! value type and the value (arrays: element type, u64 count, elements); each tensor
//! entry is its name, u32 dimension count, u64 dimensions innermost first, u32 ggml type
//! and u64 offset; tensor data starts at the next multiple of `general.alignment`
//! (default 32) after the table. Errors name the file and what is wrong.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64 (negative values are not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// ggml tensor types this reader knows by name (others keep their number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first (a Hugging Face `[out, in]` weight is `[in, out]`).
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in Hugging Face (outermost first) order.
    pub fn hf_shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: the file is only read; a concurrent writer would be a user error that
        // at worst yields wrong values, which the conversion checks cannot prevent anyway.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        let mut cursor = Cursor {
            bytes: &mmap,
            at: 0,
            path,
        };
        if cursor.take(4)? != MAGIC {
            return Err(Error::Model(format!(
                "{}: not a GGUF file (it does not start with \"GGUF\")",
                path.display()
            )));
        }
        let version = cursor.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Model(format!(
                "{}: GGUF version {version} is not supported (2 and 3 are)",
                path.display()
            )));
        }
        let tensor_count = cursor.u64()?;
        let metadata_count = cursor.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = cursor.string()?;
            let kind = cursor.u32()?;
            metadata.insert(key, cursor.value(kind)?);
        }
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let name = cursor.string()?;
            let rank = cursor.u32()?;
            let dims = (0..rank)
                .map(|_| cursor.u64())
                .collect::<Result<Vec<_>>>()?;
            let kind = GgmlType::from_id(cursor.u32()?);
            let offset = cursor.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
            .max(1);
        let data_start = (cursor.at as u64).div_ceil(alignment) * alignment;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start: data_start as usize,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::Model(format!("{}: no metadata key {key}", self.path.display())))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| self.wrong_type(key, "an integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "a string"))
    }

    /// A string array (the vocabulary, the merges).
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>> {
        let items = self
            .get(key)?
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array"))?;
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings"))
            })
            .collect()
    }

    fn wrong_type(&self, key: &str, expected: &str) -> Error {
        Error::Model(format!(
            "{}: metadata {key} is not {expected}",
            self.path.display()
        ))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The `len` bytes of `info`'s data, checked to lie inside the file.
    pub fn tensor_bytes(&self, info: &TensorInfo, len: usize) -> Result<&[u8]> {
        let start = self.data_start + info.offset as usize;
        self.mmap.get(start..start + len).ok_or_else(|| {
            Error::Model(format!(
                "{}: tensor {} ({len} bytes at {start}) runs past the end of the file ({} bytes): the file is truncated",
                self.path.display(),
                info.name,
                self.mmap.len()
            ))
        })
    }
}

/// Reads little-endian fields from the header, with errors naming the file.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at + n).ok_or_else(|| {
            Error::Model(format!(
                "{}: the header ends early (at byte {}): the file is truncated or not GGUF",
                self.path.display(),
                self.at
            ))
        })?;
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::Model(format!(
                "{}: a string at byte {} is not UTF-8",
                self.path.display(),
                self.at - len
            ))
        })
    }

    fn value(&mut self, kind: u32) -> Result<Value> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let element = self.u32()?;
                let count = self.u64()?;
                let items = (0..count)
                    .map(|_| self.value(element))
                    .collect::<Result<_>>()?;
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(Error::Model(format!(
                    "{}: unknown metadata value type {other} at byte {}",
                    self.path.display(),
                    self.at
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF v3 file: two metadata entries, one 2x3 F32 tensor.
    fn tiny_file() -> Vec<u8> {
        let mut b = Vec::new();
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        string(&mut b, "a");
        string(&mut b, "b");
        string(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for v in [1f32, 2., 3., 4., 5., 6.] {
            b.extend(v.to_le_bytes());
        }
        b
    }

    #[test]
    fn reads_metadata_tensors_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, tiny_file()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(
            file.get_strings("tokenizer.ggml.tokens").unwrap(),
            vec!["a", "b"]
        );
        let info = file.tensor("w").unwrap();
        assert_eq!(info.hf_shape(), vec![2, 3]);
        let bytes = file.tensor_bytes(info, 24).unwrap();
        assert_eq!(f32::from_le_bytes(bytes[20..24].try_into().unwrap()), 6.0);
        let err = file.get_u64("llama.block_count").unwrap_err().to_string();
        assert!(err.contains("llama.block_count"), "{err}");
    }

    #[test]
    fn a_truncated_or_foreign_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let full = tiny_file();
        std::fs::write(&path, &full[..40]).unwrap();
        let err = GgufFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("t.gguf") && err.contains("truncated"), "{err}");
        std::fs::write(&path, b"PK\x03\x04 not gguf").unwrap();
        let err = GgufFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
