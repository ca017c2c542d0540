//! What a finished run leaves in output_dir besides checkpoints and the weights (those
//! are streamed by `checkpoint/export.rs`): `loss.png`, `trainer_state.json`, and the
//! `max_shard_size` rule. Written by rank 0.

use super::plot::write_loss_curve as plot_loss_curve;
use super::progress::StepMetrics;
use crate::checkpoint::TrainerState;
use crate::{Error, Result};
use std::path::Path;

/// `loss.png` from the logged train losses and any eval points in the history.
pub fn write_loss_curve(
    dir: &Path,
    history: &[StepMetrics],
    log_history: &[serde_json::Value],
) -> Result<()> {
    let train: Vec<(u64, f64)> = history.iter().map(|m| (m.step, m.loss)).collect();
    let eval: Vec<(u64, f64)> = log_history
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("eval_loss")?.as_f64()?)))
        .collect();
    plot_loss_curve(&dir.join("loss.png"), &train, &eval)
}

/// HF's `trainer_state.json` for the finished run.
pub fn write_trainer_state(dir: &Path, state: &TrainerState) -> Result<()> {
    let path = dir.join("trainer_state.json");
    std::fs::write(&path, state.to_json_string()?)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// `max_shard_size` ("5GB", "500MB", "2GiB", a byte count) in bytes, or an error saying
/// what to write.
pub fn parse_size(text: &str) -> Result<u64> {
    crate::checkpoint::consolidate::parse_size(text)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| {
            Error::Config(format!(
                "max_shard_size {text:?} is not a size: use e.g. \"5GB\", \"500MB\" or a byte count"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_hf_units() -> Result<()> {
        assert_eq!(parse_size("5GB")?, 5_000_000_000);
        assert_eq!(parse_size("2GiB")?, 2 * 1024 * 1024 * 1024);
        assert_eq!(parse_size("500MB")?, 500_000_000);
        assert_eq!(parse_size("1024")?, 1024);
        assert!(parse_size("big").is_err());
        assert!(parse_size("-1GB").is_err());
        Ok(())
    }
}
