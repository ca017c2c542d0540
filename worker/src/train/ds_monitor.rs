//! DeepSpeed's monitor blocks of the DeepSpeed config (`csv_monitor`, `tensorboard`;
//! contract: `MonitorBlock` in `contract/src/config/deepspeed.rs`): after every optimizer
//! step rank 0 writes the events DeepSpeed's engine writes, `Train/Samples/lr` (and
//! `Train/Samples/loss_scale` under fp16), plus `Train/Samples/train_loss` as DeepSpeed's
//! pipeline engine writes it, each at step = samples seen so far (global batch x
//! steps). CSV as DeepSpeed's csv monitor lays it out: one `<name, / and spaces as _>.csv`
//! per event under `output_path/job_name`, first row `step,<last name component>`;
//! TensorBoard: scalars in an event file there.

use super::tensorboard::EventWriter;
use crate::{Error, Result};
use rsdeep_contract::config::MonitorBlock;
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

/// One optimizer step's events: (name, value).
pub type Events = Vec<(&'static str, f64)>;

/// The enabled monitors of a run (rank 0 only).
pub struct DsMonitor {
    csv_dir: Option<PathBuf>,
    /// CSV files written to so far in this run (their header is written once).
    started: HashSet<String>,
    tensorboard: Option<EventWriter>,
}

impl DsMonitor {
    /// The monitors `csv` and `tensorboard` enable; None when neither is.
    pub fn open(csv: &MonitorBlock, tensorboard: &MonitorBlock) -> Result<Option<Self>> {
        let csv_dir = csv.folder();
        if let Some(dir) = &csv_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("csv_monitor: creating {}", dir.display()), e))?;
        }
        let tensorboard = tensorboard
            .folder()
            .map(|dir| EventWriter::create(&dir))
            .transpose()?;
        Ok(
            (csv_dir.is_some() || tensorboard.is_some()).then(|| DsMonitor {
                csv_dir,
                started: HashSet::new(),
                tensorboard,
            }),
        )
    }

    /// Writes one step's `events` at `samples` (samples seen so far).
    pub fn write(&mut self, events: &Events, samples: u64) -> Result<()> {
        for (name, value) in events {
            if let Some(dir) = &self.csv_dir {
                let file = name.replace(['/', ' '], "_");
                let path = dir.join(format!("{file}.csv"));
                let mut out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| {
                        Error::io(format!("csv_monitor: opening {}", path.display()), e)
                    })?;
                let mut rows = String::new();
                if self.started.insert(file) {
                    let header = name.rsplit('/').next().unwrap_or(name);
                    rows.push_str(&format!("step,{header}\r\n"));
                }
                rows.push_str(&format!("{samples},{value:?}\r\n"));
                out.write_all(rows.as_bytes()).map_err(|e| {
                    Error::io(format!("csv_monitor: writing {}", path.display()), e)
                })?;
            }
            if let Some(tb) = self.tensorboard.as_mut() {
                tb.add_scalar(name, *value as f32, samples as i64)?;
            }
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.flush()?;
        }
        Ok(())
    }
}

/// DeepSpeed's events for one optimizer step: the loss, the learning rate and, under
/// fp16, the loss scale.
pub fn step_events(loss: f64, lr: f64, loss_scale: Option<f64>) -> Events {
    let mut events = vec![("Train/Samples/train_loss", loss), ("Train/Samples/lr", lr)];
    events.extend(loss_scale.map(|scale| ("Train/Samples/loss_scale", scale)));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_files_follow_deepspeeds_layout() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let block = MonitorBlock {
            enabled: true,
            output_path: dir.path().display().to_string(),
            job_name: "job".into(),
        };
        let mut monitor = DsMonitor::open(&block, &MonitorBlock::default())?.expect("enabled");
        monitor.write(&step_events(2.5, 1e-3, None), 8)?;
        monitor.write(&step_events(2.25, 2e-3, None), 16)?;
        let lr = std::fs::read_to_string(dir.path().join("job/Train_Samples_lr.csv"))
            .map_err(|e| Error::io("read", e))?;
        assert_eq!(lr, "step,lr\r\n8,0.001\r\n16,0.002\r\n");
        let loss = std::fs::read_to_string(dir.path().join("job/Train_Samples_train_loss.csv"))
            .map_err(|e| Error::io("read", e))?;
        assert_eq!(loss, "step,train_loss\r\n8,2.5\r\n16,2.25\r\n");
        assert!(!dir.path().join("job/Train_Samples_loss_scale.csv").exists());
        assert!(DsMonitor::open(&MonitorBlock::default(), &MonitorBlock::default())?.is_none());
        Ok(())
    }
}
