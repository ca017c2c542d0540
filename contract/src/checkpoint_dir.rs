//! The checkpoint folder rules the launcher and the worker share: what a `checkpoint-N`
//! folder is, when it is complete (its manifest exists), which run wrote it (the manifest's
//! `run.run_id`), what `output_dir/latest` names, and which files mark a finished model.
//! The worker writes these folders (`worker/src/checkpoint/`); the launcher reads them to
//! decide who owns an output folder (`launcher/src/launch/output_dir.rs`).

use std::path::{Path, PathBuf};

/// A checkpoint folder is complete once this file exists in it.
pub const MANIFEST_FILE: &str = "manifest.json";
/// `output_dir/latest`: the name of the newest complete checkpoint folder.
pub const LATEST_FILE: &str = "latest";
/// Files that mark a finished model in an output folder (full weights or an adapter).
pub const MODEL_FILES: [&str; 5] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
];
/// Marks a `checkpoint-N.tmp` folder as one rsdeep is writing: only such folders (or
/// complete checkpoints moved aside) are ever removed as leftovers of a crashed save.
pub const SAVING_MARKER: &str = ".rsdeep-saving";

/// Name of the folder of step `step`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// The step of a folder named `checkpoint-N` (HF's `^checkpoint\-(\d+)$`).
pub fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `checkpoint-N` folders of `output_dir` holding a manifest, oldest first (the manifest
/// is not parsed here; the worker verifies it before reading anything).
pub fn checkpoints_with_manifest(output_dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)?
        .flatten()
        .filter_map(|e| Some((checkpoint_step(e.file_name().to_str()?)?, e.path())))
        .filter(|(_, path)| path.join(MANIFEST_FILE).is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// The run id recorded in `checkpoint_dir`'s manifest (`run.run_id`), if any.
pub fn checkpoint_run_id(checkpoint_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(checkpoint_dir.join(MANIFEST_FILE)).ok()?;
    let manifest: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(manifest.get("run")?.get("run_id")?.as_str()?.to_string())
}

/// The newest checkpoint of `output_dir` written by run `run_id`: where a restart of that
/// run resumes. Checkpoints of other runs in the same folder are never picked.
pub fn newest_checkpoint_of_run(output_dir: &Path, run_id: &str) -> Option<(u64, PathBuf)> {
    checkpoints_with_manifest(output_dir)
        .ok()?
        .into_iter()
        .rev()
        .find(|(_, dir)| checkpoint_run_id(dir).as_deref() == Some(run_id))
}

/// The checkpoint `output_dir/latest` names, when it names a folder with a manifest.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(output_dir.join(LATEST_FILE)).ok()?;
    let name = name.trim();
    checkpoint_step(name)?;
    let dir = output_dir.join(name);
    dir.join(MANIFEST_FILE).is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_restart_picks_only_its_own_runs_newest_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 15, 20] {
            checkpoint(dir.path(), step, Some("old"));
        }
        checkpoint(dir.path(), 5, Some("new"));
        std::fs::create_dir_all(dir.path().join("checkpoint-25")).unwrap(); // no manifest
        let (step, _) = newest_checkpoint_of_run(dir.path(), "new").unwrap();
        assert_eq!(step, 5, "the other run's checkpoint-20 is never picked");
        assert_eq!(newest_checkpoint_of_run(dir.path(), "old").unwrap().0, 20);
        assert!(newest_checkpoint_of_run(dir.path(), "third").is_none());
    }

    #[test]
    fn latest_is_followed_only_when_it_names_a_complete_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        checkpoint(dir.path(), 10, None);
        checkpoint(dir.path(), 20, None);
        std::fs::write(dir.path().join(LATEST_FILE), "checkpoint-10\n").unwrap();
        assert_eq!(
            latest_checkpoint(dir.path()),
            Some(dir.path().join("checkpoint-10"))
        );
        for bad in ["checkpoint-30", "../elsewhere", ""] {
            std::fs::write(dir.path().join(LATEST_FILE), bad).unwrap();
            assert_eq!(latest_checkpoint(dir.path()), None, "{bad:?}");
        }
    }
}
