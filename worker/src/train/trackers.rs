//! `report_to` swanlab / wandb / mlflow: rank 0 streams every logged step to a sidecar
//! process that drives each tracker's own Python client (`tracker_sidecar.py`, embedded
//! here; protocol in its header). Training never waits on a tracker: steps go through a
//! bounded queue to a writer thread, a full queue drops the step (counted and reported at
//! the end), and a sidecar that dies or stops reading costs one warning. metrics.jsonl and
//! TensorBoard are written by `progress.rs` whatever happens here. The sidecar runs in a
//! process group of its own, so the launcher stopping the job (SIGTERM, then SIGKILL, to
//! each worker's group) ends rank 0 but not the sidecar: it reads what rank 0 had sent
//! until its input ends, flushes every tracker and exits (within a bounded time).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The sidecar's source, run with `python -u -c`.
const SIDECAR: &str = include_str!("tracker_sidecar.py");
/// Steps that may wait for the sidecar before new ones are dropped.
const QUEUE_STEPS: usize = 1024;
/// How long the end of training waits for the trackers to flush.
const FINISH_LIMIT: Duration = Duration::from_secs(60);
/// The interpreter that runs the sidecar (default `python3` on PATH).
pub const TRACKER_PYTHON_ENV: &str = "RSDEEP_TRACKER_PYTHON";
/// Trackers the sidecar drives.
pub const SIDECAR_BACKENDS: [&str; 3] = ["swanlab", "wandb", "mlflow"];

/// What the sidecar needs to open the run.
pub struct TrackerRun<'a> {
    pub report_to: &'a [String],
    pub run_name: String,
    /// Stable across restarts and resumes (the launcher's job id), so trackers that
    /// support it continue the same run.
    pub run_id: &'a str,
    pub resumed: bool,
    /// The resolved train.json, logged as the run's config.
    pub config: Value,
}

/// The running sidecar and the queue to it.
pub struct Trackers {
    queue: Option<SyncSender<String>>,
    writer: Option<JoinHandle<()>>,
    child: Child,
    dropped: AtomicU64,
}

impl Trackers {
    /// Starts the sidecar when `report_to` names a tracker it drives (or `all`); `None`
    /// otherwise or when it cannot start (said once: training goes on).
    pub fn start(run: TrackerRun<'_>) -> Option<Trackers> {
        let all = run.report_to.iter().any(|b| b == "all");
        let backends: Vec<&String> = run
            .report_to
            .iter()
            .filter(|b| SIDECAR_BACKENDS.contains(&b.as_str()))
            .collect();
        if backends.is_empty() && !all {
            return None;
        }
        let python = std::env::var(TRACKER_PYTHON_ENV).unwrap_or_else(|_| "python3".into());
        let spawned = Command::new(&python)
            .args(["-u", "-c", SIDECAR])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "rsdeep: report_to {backends:?}: cannot start the tracker sidecar with {python} ({e}); set {TRACKER_PYTHON_ENV} to a Python with the tracker installed. Training goes on without it"
                );
                return None;
            }
        };
        forward_output(&mut child);
        let stdin = child.stdin.take()?;
        let init = json!({
            "event": "init", "backends": backends, "all": all, "run_name": run.run_name,
            "run_id": run.run_id, "resume": run.resumed, "config": run.config,
        });
        let (queue, lines) = sync_channel(QUEUE_STEPS);
        let _ = queue.try_send(init.to_string());
        let writer = std::thread::spawn(move || write_lines(stdin, lines));
        Some(Trackers {
            queue: Some(queue),
            writer: Some(writer),
            child,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues one step's metrics; never blocks (a full queue drops the step).
    pub fn log(&self, step: u64, metrics: Value) {
        let Some(queue) = &self.queue else { return };
        let line = json!({"event": "log", "step": step, "metrics": metrics}).to_string();
        match queue.try_send(line) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends the end of the run and waits (bounded) for the trackers to flush.
    pub fn finish(mut self) {
        if let Some(queue) = self.queue.take() {
            let _ = queue.try_send(json!({"event": "finish"}).to_string());
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        let deadline = Instant::now() + FINISH_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(None) = self.child.try_wait() {
            eprintln!(
                "rsdeep: the tracker sidecar did not finish within {FINISH_LIMIT:?}; stopped"
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            eprintln!(
                "rsdeep: {dropped} logged step(s) were not sent to the trackers (the sidecar fell behind); metrics.jsonl has them all"
            );
        }
    }
}

/// Writes queued lines to the sidecar until the queue closes; a broken pipe ends the
/// writing with one warning (the queue then fills and drops, never blocking training).
fn write_lines(mut stdin: ChildStdin, lines: Receiver<String>) {
    for line in lines {
        if writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            eprintln!(
                "rsdeep: the tracker sidecar stopped reading; training goes on without trackers"
            );
            return;
        }
    }
}

/// The sidecar's own output (trackers' banners and warnings) on this rank's stderr.
fn forward_output(child: &mut Child) {
    let out = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
    let err = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
    for stream in [out, err].into_iter().flatten() {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
    }
}

/// HF Trainer's key names for an evaluation.
pub fn eval_metrics(eval_loss: f64) -> Value {
    json!({"eval/loss": eval_loss, "eval/perplexity": eval_loss.exp()})
}
