//! Training data: the pretraining block dataset with its on-disk cache, the SFT chat
//! dataset, the Trainer's data order and micro-batch collation.
//!
//! Contracts live in each module's `//!`: `pretrain` (JSONL -> EOS per document ->
//! group_texts blocks, cache keyed by inputs), `sft` (three chat shapes, assistant-only
//! labels, packing), `sampler` (Hugging Face Trainer's order: torch's randperm, accelerate's dealing, windows), `batch`
//! ((B, T) int64 tensors). docs/data.md describes the user-facing side.

pub mod batch;
pub mod pretrain;
pub mod sampler;
pub mod sft;

pub use batch::{Batch, collate_blocks, collate_sft};
pub use pretrain::{PretrainConfig, PretrainDataset, check_block_size, poll_wait};
pub use sampler::{OrderConfig, Strategy, TrainOrder, Window, torch_randperm};
pub use sft::{IGNORE_INDEX, SftConfig, SftDataset, SftExample};

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Expands file names and glob patterns, in the given order (each pattern's matches
/// sorted), dropping repeats; a pattern that matches nothing is an error naming it.
pub fn expand_files(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        let paths =
            glob::glob(pattern).map_err(|e| Error::Config(format!("glob {pattern}: {e}")))?;
        let mut matched = 0;
        for path in paths {
            let path = path.map_err(|e| Error::Config(format!("glob {pattern}: {e}")))?;
            matched += 1;
            if !files.contains(&path) {
                files.push(path);
            }
        }
        if matched == 0 {
            return Err(Error::Config(format!("no file matches {pattern}")));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_files_keeps_pattern_order_and_drops_repeats() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jsonl", "a.jsonl", "c.txt"] {
            std::fs::write(dir.path().join(name), "{}").unwrap();
        }
        let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
        let files = expand_files(&[p("c.txt"), p("*.jsonl"), p("a.jsonl")]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["c.txt", "a.jsonl", "b.jsonl"]);
    }
}
