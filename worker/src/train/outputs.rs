//! What a finished run leaves in output_dir besides checkpoints: the HF-loadable model
//! (config.json, model.safetensors or shards + index, tokenizer files), `loss.png`, and
//! `trainer_state.json`. Written by rank 0 after the collective weight gather.

use super::plot::write_loss_curve as plot_loss_curve;
use super::progress::StepMetrics;
use crate::checkpoint::TrainerState;
use crate::model::{ModelConfig, save_safetensors_sharded};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Saves the gathered fp32 `weights` as `kind` with the model config and tokenizer.
pub fn write_final_model(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    weights: Vec<(String, Tensor)>,
    kind: Kind,
    max_shard_size: &str,
) -> Result<()> {
    let max_shard_bytes = parse_size(max_shard_size)?;
    let named = weights
        .into_iter()
        .map(|(name, t)| Ok((name, t.f_to_kind(kind)?)))
        .collect::<Result<Vec<_>>>()?;
    save_safetensors_sharded(&named, dir, max_shard_bytes)?;
    let mut config = config.clone();
    config.set_declared_kind(kind)?;
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_json_string()?)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    tokenizer.save(dir)
}

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
