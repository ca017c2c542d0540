//! ZeRO-Infinity's optimizer offload to NVMe (`offload_optimizer.device: "nvme"`): one
//! file per owned optimizer slice under `nvme_path`, holding the slice's fp32 master
//! weights, first and second moments back to back, each `numel` little-endian f32. The
//! optimizer (`adamw.rs`) reads a slice in with one positioned read per tensor, updates it
//! and writes it back, so resident memory holds one block's optimizer state at a time
//! instead of all of them. The file is this process's alone (pid, rank and block in its
//! name) and is removed when the engine drops it. Contract: `docs/zero-engine.md`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Which of the three tensors of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapPart {
    Master = 0,
    ExpAvg = 1,
    ExpAvgSq = 2,
}

/// The file of one owned optimizer slice.
#[derive(Debug)]
pub struct SwapFile {
    /// `nvme_path` as configured (named in every error).
    dir: PathBuf,
    path: PathBuf,
    file: File,
    numel: usize,
}

impl SwapFile {
    /// Creates (or truncates) this rank's file for block `block` under `dir`.
    pub fn create(dir: &Path, rank: usize, block: usize, numel: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| nvme_error(dir, "cannot create it", e))?;
        let name = format!(
            "rsdeep-optimizer-{}-rank{rank}-block{block}.swp",
            std::process::id()
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| nvme_error(dir, &format!("cannot create {}", path.display()), e))?;
        Ok(SwapFile {
            dir: dir.to_path_buf(),
            path,
            file,
            numel,
        })
    }

    /// Elements of each of the three tensors.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Bytes the file holds once written.
    pub fn bytes(&self) -> usize {
        3 * 4 * self.numel
    }

    /// Writes `tensor` ((numel,) fp32, on the CPU) as `part`.
    pub fn write(&self, part: SwapPart, tensor: &Tensor) -> Result<()> {
        let tensor = self.checked(tensor)?;
        // SAFETY: `tensor` is a contiguous CPU fp32 tensor of `numel` elements (checked
        // above) that outlives this call; the byte view covers exactly its storage and is
        // only read.
        let bytes =
            unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u8, self.numel * 4) };
        self.file
            .write_all_at(bytes, self.offset(part))
            .map_err(|e| nvme_error(&self.dir, &format!("writing {}", self.path.display()), e))
    }

    /// Reads `part` into a new (numel,) fp32 CPU tensor.
    pub fn read(&self, part: SwapPart) -> Result<Tensor> {
        let tensor = Tensor::f_empty([self.numel as i64], (Kind::Float, Device::Cpu))?;
        // SAFETY: `tensor` was just allocated contiguous, fp32 and on the CPU with `numel`
        // elements; the byte view covers exactly its storage and no other reference to it
        // exists while it is filled.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, self.numel * 4) };
        self.file
            .read_exact_at(bytes, self.offset(part))
            .map_err(|e| nvme_error(&self.dir, &format!("reading {}", self.path.display()), e))?;
        Ok(tensor)
    }

    fn offset(&self, part: SwapPart) -> u64 {
        (part as u64) * (self.numel as u64) * 4
    }

    /// `tensor` as a contiguous CPU fp32 tensor of `numel` elements, or an error.
    fn checked(&self, tensor: &Tensor) -> Result<Tensor> {
        if tensor.numel() != self.numel {
            return Err(Error::Engine(format!(
                "swap file {}: a tensor of {} elements for a slice of {}",
                self.path.display(),
                tensor.numel(),
                self.numel
            )));
        }
        Ok(tensor
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An I/O error under `nvme_path`, naming it and what to do.
fn nvme_error(dir: &Path, what: &str, cause: std::io::Error) -> Error {
    Error::io(
        format!(
            "offload_optimizer.nvme_path {}: {what} (the optimizer state of this rank needs \
             room there: free space, or point nvme_path at a larger disk)",
            dir.display()
        ),
        cause,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_bit_exactly_and_the_file_goes_with_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let swap = SwapFile::create(dir.path(), 1, 4, 5).unwrap();
        let values = [
            Tensor::from_slice(&[1.5f32, -0.0, f32::MIN_POSITIVE, 3e38, -7.25]),
            Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4, 0.5]),
            Tensor::from_slice(&[9f32, 8., 7., 6., 5.]),
        ];
        let parts = [SwapPart::Master, SwapPart::ExpAvg, SwapPart::ExpAvgSq];
        for (part, value) in parts.iter().zip(&values) {
            swap.write(*part, value).unwrap();
        }
        for (part, value) in parts.iter().zip(&values) {
            let back = swap.read(*part).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) =
                (Vec::try_from(&back).unwrap(), Vec::try_from(value).unwrap());
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        let path = swap.path.clone();
        assert!(path.exists());
        assert!(
            swap.write(
                SwapPart::Master,
                &Tensor::zeros([3], (Kind::Float, Device::Cpu))
            )
            .is_err()
        );
        drop(swap);
        assert!(!path.exists(), "the file is removed with its slot");
    }

    #[test]
    fn a_full_disk_names_nvme_path() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("rsdeep-optimizer-{}-rank0-block0.swp", std::process::id());
        std::os::unix::fs::symlink("/dev/full", dir.path().join(name)).unwrap();
        let swap = SwapFile::create(dir.path(), 0, 0, 4).unwrap();
        let err = swap
            .write(
                SwapPart::Master,
                &Tensor::ones([4], (Kind::Float, Device::Cpu)),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "offload_optimizer.nvme_path {}",
                dir.path().display()
            )) && err.contains("No space left on device"),
            "{err}"
        );
    }
}
