//! Test harness for the end-to-end tests in this folder: finds the built `rsdeep` and
//! `rsdeep-worker` binaries (next to the test executable's target directory), makes the
//! training fixture every test starts from (`TrainFixture`), runs the launcher in a
//! temporary folder with its output captured to files, writes wrapper "worker" scripts
//! that misbehave on purpose, and checks whether processes are gone.
//! The tests themselves are the `[[test]]` targets of this crate.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary built by this workspace (`cargo build --workspace` must have run).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the e2e tests",
        path.display()
    );
    path
}

/// The tiny Qwen2 the end-to-end tests train (2 layers, 4 heads over 2 KV heads, untied
/// head, fp32): `hidden` wide (MLP 2x, context 2x), `vocab_size` entries (at least the
/// test's tokenizer vocabulary).
pub fn tiny_qwen2_config(hidden: usize, vocab_size: usize) -> String {
    serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2 * hidden, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "vocab_size": vocab_size, "tie_word_embeddings": false, "initializer_range": 0.02,
        "hidden_act": "silu", "torch_dtype": "float32"
    })
    .to_string()
}

/// `lines` JSONL lines `{"text": "..."}` of two sentences each, built by walking the
/// word lists as an odometer (subject fastest), so the corpus is deterministic and
/// repetitive enough for a tiny model to learn within a few steps.
pub fn sentence_corpus(
    lines: usize,
    subjects: &[&str],
    verbs: &[&str],
    objects: &[&str],
) -> String {
    let (ns, nv, no) = (subjects.len(), verbs.len(), objects.len());
    (0..lines)
        .map(|i| {
            let text = format!(
                "{} {} {}. {} {} {}.",
                subjects[i % ns],
                verbs[(i / ns) % nv],
                objects[(i / (ns * nv)) % no],
                subjects[(i + 2) % ns],
                verbs[(i + 3) % nv],
                objects[(i + 1) % no]
            );
            serde_json::json!({ "text": text }).to_string() + "\n"
        })
        .collect()
}

/// Trains a byte-level BPE of `vocab_size` tokens on `root/corpus.jsonl` into `root/tok`
/// with the real `rsdeep tokenizer train`.
pub fn train_tokenizer(root: &Path, vocab_size: usize) {
    let status = Command::new(binary("rsdeep"))
        .args(["tokenizer", "train", "--files"])
        .arg(root.join("corpus.jsonl"))
        .args(["--vocab_size", &vocab_size.to_string(), "--out"])
        .arg(root.join("tok"))
        .stdout(Stdio::null())
        .status()
        .expect("rsdeep tokenizer train");
    assert!(status.success(), "tokenizer training failed");
}

/// What every training e2e test starts from, in a temp folder: a corpus
/// (`corpus.jsonl`), a BPE trained on it by `rsdeep tokenizer train` (`tok/`), a tiny
/// Qwen2 config (`model.json`), and pretrain train.json files written from one template.
pub struct TrainFixture {
    dir: tempfile::TempDir,
}

impl TrainFixture {
    /// `corpus` (JSONL), a `tokenizer_vocab`-token BPE, a `hidden`-wide tiny Qwen2 with
    /// `vocab_size` embeddings (`tiny_qwen2_config`).
    pub fn new(corpus: &str, hidden: usize, vocab_size: usize, tokenizer_vocab: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::write(root.join("corpus.jsonl"), corpus).expect("corpus");
        std::fs::write(
            root.join("model.json"),
            tiny_qwen2_config(hidden, vocab_size),
        )
        .expect("model config");
        train_tokenizer(root, tokenizer_vocab);
        TrainFixture { dir }
    }

    /// The fixture's folder.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name`, a pretrain train.json over the fixture (2 per device, lr 3e-3, a log
    /// line per step, ZeRO-2 with "auto" batch sizes) with `settings` laid over it (nested
    /// objects merged key by key), and returns its path.
    pub fn pretrain_json(&self, name: &str, settings: serde_json::Value) -> PathBuf {
        let mut config = serde_json::json!({
            "task": "pretrain",
            "config_name": self.path("model.json"),
            "tokenizer_name": self.path("tok"),
            "train_files": [self.path("corpus.jsonl")],
            "per_device_train_batch_size": 2,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "deepspeed": {
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "zero_optimization": {"stage": 2}
            }
        });
        merge_json(&mut config, settings);
        let path = self.path(name);
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
            .expect("write train.json");
        path
    }
}

/// Lays `over` onto `base`: objects merge key by key, anything else replaces.
fn merge_json(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => merge_json(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// The reference venv's Python (`RSDEEP_PYTHON`, set by `scripts/env.sh`).
pub fn python() -> String {
    std::env::var("RSDEEP_PYTHON").expect(
        "RSDEEP_PYTHON is not set: run the tests through `make test` (scripts/env.sh), which points it at the venv with torch",
    )
}

/// A fixture user program (`tests/fixtures/user_scripts/<name>`).
pub fn user_script(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/user_scripts")
        .join(name);
    path.display().to_string()
}

/// A temp folder with the seed's pretraining material scaled down: `corpus.jsonl`, a
/// BPE trained on it by `rsdeep tokenizer train` (`tok/`), and the fixture's tiny Qwen2
/// with a vocabulary that fits it (`model/config.json`).
pub fn pretrain_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let corpus = sentence_corpus(
        400,
        &["the old captain", "a lazy dog", "my cat", "the quick fox"],
        &["sails across", "sleeps near", "watches", "jumps over"],
        &["the harbour", "a garden", "the fence", "the hill"],
    );
    std::fs::write(dir.path().join("corpus.jsonl"), corpus).unwrap();
    train_tokenizer(dir.path(), 320);
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/user_scripts/tiny-qwen2/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    config["vocab_size"] = 384.into();
    (config["bos_token_id"], config["eos_token_id"]) = (0.into(), 0.into());
    std::fs::create_dir_all(dir.path().join("model")).unwrap();
    std::fs::write(dir.path().join("model/config.json"), config.to_string()).unwrap();
    dir
}

/// How long one `run_deepspeed` may take before its processes are killed and the test
/// fails with their output (a cold first run builds DeepSpeed's CPU ops: minutes).
const DEEPSPEED_LIMIT: Duration = Duration::from_secs(900);

/// `deepspeed --num_gpus 2 <script> args...` from the venv in `dir`, on DeepSpeed's CPU
/// accelerator; returns its output (stdout and stderr, as written, also kept in
/// `dir/deepspeed-<port>.log`) and fails the test if it failed or outlived
/// `DEEPSPEED_LIMIT`.
pub fn run_deepspeed(dir: &Path, script: &str, args: &[String]) -> String {
    let deepspeed = PathBuf::from(python()).with_file_name("deepspeed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    remove_shm_segments(port);
    let log_path = dir.join(format!("deepspeed-{port}.log"));
    let log = File::create(&log_path).expect("deepspeed log file");
    let mut child = Command::new(&deepspeed)
        .args(["--num_gpus", "2", "--master_port", &port.to_string()])
        .arg(script)
        .args(args)
        .current_dir(dir)
        .env("DS_ACCELERATOR", "cpu")
        .env("OMP_NUM_THREADS", "1")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("deepspeed log file"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (scripts/setup.sh installs DeepSpeed)",
                deepspeed.display()
            )
        });
    let deadline = Instant::now() + DEEPSPEED_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait deepspeed") {
            break status;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the process group this function started (its leader's pid).
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            panic!(
                "deepspeed did not finish within {DEEPSPEED_LIMIT:?}; its output:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    remove_shm_segments(port);
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "deepspeed failed:\n{text}");
    text
}

/// Removes the shared-memory segments DeepSpeed's CPU all-reduce leaves in /dev/shm for a
/// run on loopback `port` (69 MB per rank, never unlinked): a later run given the same
/// port would otherwise attach to a dead run's segment and wait on it forever.
fn remove_shm_segments(port: u16) {
    // SAFETY: getuid(2) has no preconditions.
    let uid = unsafe { libc::getuid() };
    let prefix = format!("deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_");
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A running `rsdeep` launcher whose stdout/stderr go to files in its own temp folder.
/// Dropping it kills the launcher's process group if it is still running.
pub struct Launcher {
    pub dir: tempfile::TempDir,
    child: Child,
    status: Option<ExitStatus>,
}

impl Launcher {
    /// Starts `rsdeep args...` in a fresh temp folder with `envs` added.
    pub fn start(args: &[&str], envs: &[(&str, String)]) -> Launcher {
        Launcher::start_with_files(args, envs, &[])
    }

    /// Like `start`, with `files` (name, content) written into the folder first.
    pub fn start_with_files(
        args: &[&str],
        envs: &[(&str, String)],
        files: &[(&str, &str)],
    ) -> Launcher {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("launcher folder file");
        }
        let stdout = File::create(dir.path().join("stdout")).expect("stdout file");
        let stderr = File::create(dir.path().join("stderr")).expect("stderr file");
        let mut command = Command::new(binary("rsdeep"));
        command
            .args(args)
            .current_dir(dir.path())
            .env_remove("RSDEEP_JOB_ID")
            .env_remove("RSDEEP_TOKEN")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env("RSDEEP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn rsdeep");
        Launcher {
            dir,
            child,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the launcher to exit; panics (with its output) after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "rsdeep did not exit within {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `pred(stderr)` holds; panics after `limit`.
    pub fn wait_for_stderr(&self, limit: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        while !pred(&self.stderr()) {
            assert!(
                Instant::now() < deadline,
                "stderr never matched within {limit:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Stdout and stderr, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes an executable `/bin/sh` script used as `RSDEEP_WORKER_BIN`. The script gets
/// `$REAL_WORKER` (the real `rsdeep-worker`) and `$PID_DIR` (where it should record
/// `$$` as `pid.<LOCAL_RANK>`) from the environment the test passes.
pub fn worker_script(dir: &Path, body: &str) -> PathBuf {
    let text = format!("echo $$ > \"$PID_DIR/pid.$LOCAL_RANK\"\n{body}");
    shell_script(dir, "worker.sh", &text)
}

/// Writes `dir/name`, an executable `/bin/sh` script running `body`.
pub fn shell_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write shell script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The pids recorded by `worker_script` in `dir`, once `count` are there.
pub fn recorded_pids(dir: &Path, count: usize, limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let pids: Vec<i32> = (0..count)
            .filter_map(|r| std::fs::read_to_string(dir.join(format!("pid.{r}"))).ok())
            .filter_map(|t| t.trim().parse().ok())
            .collect();
        if pids.len() == count {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} workers recorded their pid",
            pids.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

/// Waits up to `limit` for every pid to be gone; returns the survivors.
pub fn survivors(pids: &[i32], limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills leftover processes by pid (cleanup after a failed assertion).
pub fn kill_all(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: plain kill(2) on pids this test started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// (step, loss) of every logged training step in `out/metrics.jsonl`.
pub fn logged_losses(out: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().expect("step"),
                v["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

/// An elastic job's check: `checkpoint` (of the run in `elastic_out`, at `resumed_step`)
/// resumed by a fresh one-node job of `ranks` CPU ranks on `train_json` with `overrides`
/// (the batch kept by hand) into `reference`; its losses after that step must equal the
/// elastic run's within 1e-5, `total_steps - resumed_step` of them.
pub fn assert_losses_match_a_resume(
    train_json: &Path,
    ranks: usize,
    overrides: &[&str],
    (checkpoint, resumed_step, total_steps): (&Path, u64, u64),
    (elastic_out, reference): (&Path, &Path),
) {
    let ranks = ranks.to_string();
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let (json, reference_arg, checkpoint_arg) =
        (path(train_json), path(reference), path(checkpoint));
    let mut args = vec![
        "--device",
        "cpu",
        "--num_procs",
        &ranks,
        "--master_port",
        "0",
        &json,
    ];
    args.extend_from_slice(overrides);
    args.extend([
        "--output_dir",
        &reference_arg,
        "--resume_from_checkpoint",
        &checkpoint_arg,
    ]);
    let mut resumed = Launcher::start(&args, &[("OMP_NUM_THREADS", "1".to_string())]);
    let status = resumed.wait(Duration::from_secs(300));
    assert!(
        status.success(),
        "reference resume failed:\n{}",
        resumed.output()
    );
    let after = |dir: &Path| -> Vec<(u64, f64)> {
        logged_losses(dir)
            .into_iter()
            .filter(|(step, _)| *step > resumed_step)
            .collect()
    };
    let (want, got) = (after(reference), after(elastic_out));
    assert_eq!(want.len() as u64, total_steps - resumed_step, "{want:?}");
    assert_eq!(want.len(), got.len(), "{got:?}");
    for ((step, a), (_, b)) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() < 1e-5,
            "step {step}: loss {b} after the shrink, {a} resumed at the smaller world size"
        );
    }
}

/// The highest step in `out/metrics.jsonl` (rank 0 logs every step), 0 before any.
pub fn logged_step(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("step").and_then(|s| s.as_u64()))
        .max()
        .unwrap_or(0)
}

/// Waits until the run logged step `step` or later and returns the step seen; panics
/// (with the launcher's output) after `limit`.
pub fn wait_for_step(launcher: &Launcher, out: &Path, step: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let seen = logged_step(out);
        if seen >= step {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "step {step} never logged:\n{}",
            launcher.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
