//! Hugging Face's `trainer_state.json` (transformers `TrainerState`), field for field, so
//! HF tooling reads rsdeep checkpoints and the training loop can resume from HF ones.
//! Contract: transformers `trainer_callback.py:TrainerState` (its place in a checkpoint:
//! `docs/checkpoints.md`).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The trainer's progress and history, as HF writes it in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerState {
    pub epoch: Option<f64>,
    pub global_step: u64,
    pub max_steps: u64,
    pub logging_steps: u64,
    pub eval_steps: u64,
    pub save_steps: u64,
    pub train_batch_size: Option<u64>,
    pub num_train_epochs: u64,
    pub num_input_tokens_seen: u64,
    pub total_flos: f64,
    pub log_history: Vec<serde_json::Value>,
    pub best_metric: Option<f64>,
    pub best_global_step: Option<u64>,
    pub best_model_checkpoint: Option<String>,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub is_hyper_param_search: bool,
    pub trial_name: Option<String>,
    pub trial_params: Option<serde_json::Value>,
    pub stateful_callbacks: serde_json::Map<String, serde_json::Value>,
}

impl Default for TrainerState {
    fn default() -> Self {
        TrainerState {
            epoch: Some(0.0),
            global_step: 0,
            max_steps: 0,
            logging_steps: 500,
            eval_steps: 500,
            save_steps: 500,
            train_batch_size: None,
            num_train_epochs: 0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: serde_json::Map::new(),
        }
    }
}

impl TrainerState {
    /// Pretty JSON with a trailing newline, as HF's `save_to_json` writes it.
    pub fn to_json_string(&self) -> Result<String> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Checkpoint(format!("serialising trainer state: {e}")))?;
        Ok(text + "\n")
    }

    /// Reads `path` (a `trainer_state.json` of rsdeep or transformers).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Checkpoint(format!("{} is not a trainer state: {e}", path.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_hf_files_with_extra_and_missing_fields() {
        let mut state = TrainerState {
            global_step: 12,
            max_steps: 40,
            ..Default::default()
        };
        state
            .log_history
            .push(serde_json::json!({"loss": 2.5, "step": 10}));
        let text = state.to_json_string().unwrap();
        let back: TrainerState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        for field in [
            "global_step",
            "log_history",
            "best_model_checkpoint",
            "stateful_callbacks",
        ] {
            assert!(text.contains(&format!("\"{field}\"")), "{field} missing");
        }
        let hf = r#"{"global_step": 3, "epoch": 0.5, "some_future_field": 1}"#;
        let parsed: TrainerState = serde_json::from_str(hf).unwrap();
        assert_eq!(parsed.global_step, 3);
        assert_eq!(parsed.epoch, Some(0.5));
    }
}
