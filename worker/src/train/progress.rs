//! Training progress for people and tools: a live `indicatif` progress bar on rank 0 when
//! stderr is a terminal (plain lines otherwise, one per logging step), `metrics.jsonl` in output_dir (one JSON object per
//! logging step, the same fields HF Trainer puts in `log_history`), TensorBoard scalars
//! when `report_to` includes tensorboard, and the swanlab / wandb / mlflow trackers
//! (`trackers.rs`) when it names them.

use super::tensorboard::EventWriter;
use super::trackers::{self, Trackers};
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

/// One logging step's numbers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub loss_scale: f64,
    /// Optimizer steps skipped so far because fp16 gradients overflowed.
    #[serde(default)]
    pub skipped_steps: u64,
    pub tokens_per_second: f64,
    /// Estimated model FLOPs utilisation in percent (None on CPU, where no peak is known).
    pub mfu: Option<f64>,
    pub elapsed_s: f64,
    pub eta_s: f64,
    /// Each rank's peak resident memory so far (MiB, index = rank).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peak_rss_mib: Vec<f64>,
    /// Rank 0's mean seconds per step since the last log in building batches, forward +
    /// backward, and the engine's step (gradient reduction and optimizer).
    #[serde(default)]
    pub step_time_s: [f64; 3],
}

impl StepMetrics {
    /// HF Trainer's key names for this logged step (as its tracker callbacks send them),
    /// plus rsdeep's own.
    pub fn tracker_keys(&self) -> serde_json::Value {
        let mut metrics = serde_json::json!({
            "train/loss": self.loss, "train/learning_rate": self.learning_rate,
            "train/grad_norm": self.grad_norm, "train/epoch": self.epoch,
            "train/loss_scale": self.loss_scale, "train/tokens_per_second": self.tokens_per_second,
            "train/skipped_steps": self.skipped_steps,
        });
        if let Some(mfu) = self.mfu {
            metrics["train/mfu"] = serde_json::json!(mfu);
        }
        let phases = ["data", "forward_backward", "optimizer"];
        for (phase, seconds) in phases.iter().zip(self.step_time_s) {
            metrics[format!("train/time_{phase}_s")] = serde_json::json!(seconds);
        }
        for (rank, mib) in self.peak_rss_mib.iter().enumerate() {
            metrics[format!("train/peak_rss_mib_rank{rank}")] = serde_json::json!(mib);
        }
        metrics
    }
}

/// Writes metrics and draws the bar; only rank 0 constructs one.
pub struct ProgressReporter {
    total_steps: u64,
    started: Instant,
    jsonl: File,
    tensorboard: Option<EventWriter>,
    trackers: Option<Trackers>,
    /// The live bar when stderr is a terminal.
    bar: Option<ProgressBar>,
    history: Vec<StepMetrics>,
}

/// Rewrites `path` (temp file + rename) without the rows whose `step` is past
/// `last_step`; rows without a step stay. A missing file is fine.
fn keep_rows_up_to(path: &Path, last_step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let past = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|row| row.get("step")?.as_u64())
            .is_some_and(|step| step > last_step)
    };
    if !text.lines().any(past) {
        return Ok(());
    }
    let kept: String = text
        .lines()
        .filter(|l| !past(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let temp = path.with_extension("jsonl.tmp");
    std::fs::write(&temp, kept).map_err(|e| Error::io(format!("writing {}", temp.display()), e))?;
    std::fs::rename(&temp, path).map_err(|e| Error::io(format!("replacing {}", path.display()), e))
}

impl ProgressReporter {
    /// Opens `output_dir/metrics.jsonl` for appending after dropping its rows past
    /// `start_step` (a resumed run continues the file without repeating the steps it
    /// replays; a fresh run starts it empty) and, when asked, a TensorBoard writer under
    /// `logging_dir`.
    pub fn open(
        output_dir: &Path,
        total_steps: u64,
        tensorboard_dir: Option<&Path>,
        start_step: u64,
    ) -> Result<Self> {
        std::fs::create_dir_all(output_dir)
            .map_err(|e| Error::io(format!("creating {}", output_dir.display()), e))?;
        let path = output_dir.join("metrics.jsonl");
        keep_rows_up_to(&path, start_step)?;
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let tensorboard = tensorboard_dir.map(EventWriter::create).transpose()?;
        Ok(ProgressReporter {
            total_steps,
            started: Instant::now(),
            jsonl,
            tensorboard,
            trackers: None,
            bar: std::io::stderr()
                .is_terminal()
                .then(|| live_bar(total_steps, start_step, ProgressDrawTarget::stderr())),
            history: Vec::new(),
        })
    }

    /// Also sends every logged step to these trackers.
    pub fn with_trackers(mut self, trackers: Option<Trackers>) -> Self {
        self.trackers = trackers;
        self
    }

    /// Flushes the trackers (bounded wait); metrics.jsonl is already complete.
    pub fn finish_trackers(&mut self) {
        if let Some(trackers) = self.trackers.take() {
            trackers.finish();
        }
    }

    /// Seconds since the reporter was opened.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Estimated seconds left, from the average step time since `first_step`.
    pub fn eta_s(&self, first_step: u64, step: u64) -> f64 {
        let done = step.saturating_sub(first_step).max(1) as f64;
        let left = self.total_steps.saturating_sub(step) as f64;
        self.elapsed_s() / done * left
    }

    /// Records one logging step everywhere.
    pub fn log(&mut self, metrics: StepMetrics) -> Result<()> {
        let line = serde_json::to_string(&metrics)
            .map_err(|e| Error::Engine(format!("serialising metrics: {e}")))?;
        writeln!(self.jsonl, "{line}").map_err(|e| Error::io("writing metrics.jsonl", e))?;
        if let Some(tb) = self.tensorboard.as_mut() {
            let step = metrics.step as i64;
            tb.add_scalar("train/loss", metrics.loss as f32, step)?;
            tb.add_scalar("train/learning_rate", metrics.learning_rate as f32, step)?;
            tb.add_scalar("train/grad_norm", metrics.grad_norm as f32, step)?;
            tb.add_scalar(
                "train/tokens_per_second",
                metrics.tokens_per_second as f32,
                step,
            )?;
            tb.flush()?;
        }
        if let Some(trackers) = &self.trackers {
            trackers.log(metrics.step, metrics.tracker_keys());
        }
        self.draw(&metrics);
        self.history.push(metrics);
        Ok(())
    }

    /// Records an evaluation result (loss and perplexity).
    pub fn log_eval(&mut self, step: u64, eval_loss: f64) -> Result<()> {
        let record = serde_json::json!({
            "step": step,
            "eval_loss": eval_loss,
            "eval_perplexity": eval_loss.exp(),
        });
        writeln!(self.jsonl, "{record}").map_err(|e| Error::io("writing metrics.jsonl", e))?;
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.add_scalar("eval/loss", eval_loss as f32, step as i64)?;
            tb.flush()?;
        }
        if let Some(trackers) = &self.trackers {
            trackers.log(step, trackers::eval_metrics(eval_loss));
        }
        self.print_line(&format!(
            "eval step {step}: loss {eval_loss:.4} perplexity {:.2}",
            eval_loss.exp()
        ));
        Ok(())
    }

    /// Every logged step so far (for the loss curve and the summary).
    pub fn history(&self) -> &[StepMetrics] {
        &self.history
    }

    /// Leaves the live bar drawn where it is, so later output starts below it.
    pub fn finish_line(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    /// A line of its own above the live bar (or after the plain lines).
    fn print_line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn draw(&self, m: &StepMetrics) {
        let mfu = m.mfu.map(|v| format!(" mfu {v:.1}%")).unwrap_or_default();
        let text = format!(
            "step {}/{} loss {:.4} lr {:.3e} grad_norm {:.3} scale {} tok/s {:.0}{} elapsed {} eta {}",
            m.step,
            self.total_steps,
            m.loss,
            m.learning_rate,
            m.grad_norm,
            m.loss_scale,
            m.tokens_per_second,
            mfu,
            clock(m.elapsed_s),
            clock(m.eta_s),
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(text);
            }
            None => eprintln!("{text}"),
        }
    }
}

/// The live bar: `[####>...] ` and the step's numbers, drawn on `target`.
fn live_bar(total_steps: u64, start_step: u64, target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total_steps), target);
    let style = ProgressStyle::with_template("[{bar:24}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>.");
    bar.set_style(style);
    bar.set_position(start_step);
    bar
}

/// `h:mm:ss` for a duration in seconds.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0.5,
            loss: 3.0 / step as f64,
            learning_rate: 1e-3,
            grad_norm: 0.7,
            loss_scale: 1.0,
            skipped_steps: 0,
            tokens_per_second: 1000.0,
            mfu: None,
            elapsed_s: 1.0,
            eta_s: 2.0,
            peak_rss_mib: vec![100.0, 120.5],
            step_time_s: [0.01, 0.5, 0.1],
        }
    }

    #[test]
    fn reopening_drops_the_rows_a_resumed_run_replays() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let rows = (1..=6).map(|s| format!("{{\"step\":{s},\"loss\":1.0}}\n"));
        std::fs::write(
            &path,
            rows.collect::<String>() + "{\"step\":4,\"eval_loss\":2.0}\n",
        )
        .unwrap();
        drop(ProgressReporter::open(dir.path(), 10, None, 4)?);
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4, 4]);
        drop(ProgressReporter::open(dir.path(), 10, None, 0)?);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "a fresh run starts empty"
        );
        Ok(())
    }

    #[test]
    fn metrics_jsonl_has_one_parseable_line_per_log() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let mut reporter = ProgressReporter::open(dir.path(), 10, None, 0)?;
        reporter.log(metrics(1))?;
        reporter.log(metrics(2))?;
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
            .map_err(|e| Error::io("read", e))?;
        let parsed: Vec<StepMetrics> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("valid json line"))
            .collect();
        assert_eq!(parsed, vec![metrics(1), metrics(2)]);
        Ok(())
    }

    #[test]
    fn the_live_bar_follows_the_logged_step_and_shows_its_numbers() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let mut reporter = ProgressReporter::open(dir.path(), 10, None, 2)?;
        let bar = live_bar(10, 2, ProgressDrawTarget::hidden());
        assert_eq!(
            bar.position(),
            2,
            "a resumed run starts the bar at its step"
        );
        reporter.bar = Some(bar.clone());
        reporter.log(metrics(3))?;
        assert_eq!((bar.position(), bar.length()), (3, Some(10)));
        let message = bar.message();
        assert!(
            message.starts_with("step 3/10 loss 1.0000 lr 1.000e-3"),
            "{message}"
        );
        reporter.finish_line();
        assert!(bar.is_finished(), "the bar is left in place at the end");
        Ok(())
    }

    #[test]
    fn trackers_get_hf_keys_and_each_ranks_peak_memory() {
        let keys = metrics(2).tracker_keys();
        assert_eq!(keys["train/loss"], 1.5);
        assert_eq!(keys["train/learning_rate"], 1e-3);
        assert_eq!(keys["train/peak_rss_mib_rank0"], 100.0);
        assert_eq!(keys["train/peak_rss_mib_rank1"], 120.5);
        assert_eq!(keys["train/time_forward_backward_s"], 0.5);
        assert_eq!(keys["train/time_optimizer_s"], 0.1);
        assert!(keys.get("train/mfu").is_none(), "no MFU on CPU");
    }

    #[test]
    fn clock_formats_hours_minutes_seconds() {
        assert_eq!(clock(3725.2), "1:02:05");
        assert_eq!(clock(-3.0), "0:00:00");
    }
}
