//! End-to-end training through the real binaries on loopback, with fixtures the test makes
//! itself (a synthetic corpus and chat set, a tokenizer trained by `rsdeep tokenizer
//! train`, a tiny Qwen2 config): pretrain → SFT → LoRA each lower the loss and write
//! outputs that Python transformers/peft load, and `rsdeep generate` chats with the result; a run resumed from a checkpoint is bit-identical to the
//! uninterrupted run; a resume at another world size continues the same losses.

use rsdeep_e2e::{Launcher, binary, sentence_corpus, tiny_qwen2_config, train_tokenizer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(300);

/// A folder with corpus, chat data, tokenizer, model config and a base train.json.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::write(root.join("corpus.jsonl"), corpus()).expect("corpus");
        std::fs::write(root.join("chat.jsonl"), chat()).expect("chat");
        std::fs::write(root.join("model.json"), tiny_qwen2_config(64, 512)).expect("model config");
        train_tokenizer(root, 400);
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name` (a pretrain train.json over the fixture) and returns its path.
    fn train_json(&self, name: &str, stage: u8) -> PathBuf {
        let config = serde_json::json!({
            "task": "pretrain",
            "config_name": self.path("model.json"),
            "tokenizer_name": self.path("tok"),
            "train_files": [self.path("corpus.jsonl")],
            "block_size": 32,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "max_steps": 8,
            "logging_steps": 1,
            "save_steps": 4,
            "seed": 7,
            "output_dir": self.path("out"),
            "deepspeed": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "gradient_clipping": "auto",
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
                "zero_optimization": {"stage": stage, "reduce_bucket_size": 5000, "allgather_bucket_size": 5000}
            }
        });
        let path = self.path(name);
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
            .expect("write train.json");
        path
    }
}

/// Runs `rsdeep --device cpu --num_procs N <train.json> <overrides>` to success.
fn train(ranks: usize, train_json: &Path, overrides: &[&str]) -> String {
    let (launcher, status) = run(ranks, train_json, overrides, None);
    assert!(status.success(), "training failed:\n{}", launcher.output());
    launcher.output()
}

/// Runs `rsdeep --device cpu --num_procs N <train.json> <overrides>` (one intra-op thread
/// per rank, optionally a kill point) to its end; the finished launcher and its status.
fn run(
    ranks: usize,
    train_json: &Path,
    overrides: &[&str],
    kill_at: Option<&str>,
) -> (Launcher, std::process::ExitStatus) {
    let procs = ranks.to_string();
    let json = train_json.to_string_lossy().to_string();
    let mut args = vec![
        "--device",
        "cpu",
        "--num_procs",
        &procs,
        "--master_port",
        "0",
        &json,
    ];
    args.extend_from_slice(overrides);
    let mut envs = vec![("OMP_NUM_THREADS", "1".to_string())];
    envs.extend(kill_at.map(|k| ("RSDEEP_CHECKPOINT_KILL_AT", k.to_string())));
    let mut launcher = Launcher::start(&args, &envs);
    let status = launcher.wait(RUN_LIMIT);
    (launcher, status)
}

/// (step, loss) of every logged training step in `out/metrics.jsonl`.
fn losses(out: &Path) -> Vec<(u64, f64)> {
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

fn mean(values: &[(u64, f64)]) -> f64 {
    values.iter().map(|(_, l)| l).sum::<f64>() / values.len() as f64
}

#[test]
fn pretrain_sft_lora_pipeline_lowers_each_loss_and_writes_files_hf_loads() {
    let fx = Fixture::new();
    let pretrain = fx.train_json("pretrain.json", 2);
    let out = fx.path("pre");
    train(
        2,
        &pretrain,
        &[
            "--output_dir",
            out.to_str().unwrap(),
            "--max_steps",
            "16",
            "--report_to",
            "tensorboard",
        ],
    );
    let pre = losses(&out);
    assert_eq!(pre.len(), 16, "one log line per step");
    assert!(
        mean(&pre[12..]) < mean(&pre[..4]) - 0.3,
        "pretraining did not lower the loss: {pre:?}"
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
        "loss.png",
        "checkpoint-16/manifest.json",
        "latest",
    ] {
        assert!(
            out.join(file).exists(),
            "{file} missing in {}",
            out.display()
        );
    }
    let events = std::fs::read_dir(out.join("runs")).expect("runs/").count();
    assert!(events >= 1, "no TensorBoard event file");

    let sft_out = fx.path("sft");
    train(
        2,
        &pretrain,
        &[
            "--task",
            "sft",
            "--model_name_or_path",
            out.to_str().unwrap(),
            "--train_files",
            fx.path("chat.jsonl").to_str().unwrap(),
            "--max_seq_length",
            "64",
            "--output_dir",
            sft_out.to_str().unwrap(),
            "--max_steps",
            "12",
            "--deepspeed.zero_optimization.stage",
            "3",
        ],
    );
    let sft = losses(&sft_out);
    assert!(
        mean(&sft[9..]) < mean(&sft[..3]),
        "SFT did not lower the loss: {sft:?}"
    );

    let lora_out = fx.path("lora");
    train(
        2,
        &pretrain,
        &[
            "--task",
            "lora",
            "--model_name_or_path",
            out.to_str().unwrap(),
            "--train_files",
            fx.path("chat.jsonl").to_str().unwrap(),
            "--max_seq_length",
            "64",
            "--output_dir",
            lora_out.to_str().unwrap(),
            "--max_steps",
            "16",
            "--learning_rate",
            "1e-2",
            "--lora_target_modules",
            "all-linear",
        ],
    );
    let lora = losses(&lora_out);
    assert!(
        mean(&lora[12..]) < mean(&lora[..4]) - 0.1,
        "LoRA did not lower the loss: {lora:?}"
    );
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-16/adapter_model.safetensors",
    ] {
        assert!(
            lora_out.join(file).exists(),
            "{file} missing in {}",
            lora_out.display()
        );
    }
    let chat = Command::new(binary("rsdeep"))
        .args(["generate", "--model"])
        .arg(&out)
        .arg("--adapter")
        .arg(&lora_out)
        .args([
            "--chat",
            "--prompt",
            "what does the fox do?",
            "--max_new_tokens",
            "8",
        ])
        .output()
        .expect("rsdeep generate");
    assert!(
        chat.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&chat.stderr)
    );
    assert!(
        String::from_utf8_lossy(&chat.stderr).contains("new tokens"),
        "no generation summary"
    );

    let python = std::env::var("RSDEEP_PYTHON").expect(
        "RSDEEP_PYTHON is not set: run the tests through `make test` (scripts/env.sh), which points it at the venv with transformers",
    );
    let script = r#"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for path in sys.argv[1:]:
    base, _, adapter = path.partition("+")
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert torch.isfinite(logits).all(), path
    print("loaded", path, tuple(logits.shape))
"#;
    let output = Command::new(python)
        .args(["-c", script])
        .arg(&out)
        .arg(&sft_out)
        .arg(format!("{}+{}", out.display(), lora_out.display()))
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "transformers could not load the outputs:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn resume_from_checkpoint_is_bit_identical_to_an_uninterrupted_run() {
    let fx = Fixture::new();
    let json = fx.train_json("train.json", 2);
    let straight = fx.path("straight");
    train(2, &json, &["--output_dir", straight.to_str().unwrap()]);

    let resumed = fx.path("resumed");
    train(
        2,
        &json,
        &[
            "--output_dir",
            resumed.to_str().unwrap(),
            "--max_steps",
            "4",
        ],
    );
    assert!(resumed.join("checkpoint-4/manifest.json").exists());
    train(
        2,
        &json,
        &[
            "--output_dir",
            resumed.to_str().unwrap(),
            "--resume_from_checkpoint",
            "true",
        ],
    );

    assert_eq!(
        losses(&straight),
        losses(&resumed),
        "logged losses differ after resume"
    );
    let a = std::fs::read(straight.join("model.safetensors")).expect("straight weights");
    let b = std::fs::read(resumed.join("model.safetensors")).expect("resumed weights");
    assert!(
        a == b,
        "final weights differ between the straight and the resumed run"
    );
}

#[test]
fn resume_at_another_world_size_and_stage_continues_the_same_losses() {
    let fx = Fixture::new();
    let json = fx.train_json("train.json", 2);
    let reference = fx.path("reference");
    train(2, &json, &["--output_dir", reference.to_str().unwrap()]);

    // Same global batch (2 ranks x 2 = 1 rank x 4), ZeRO-2 -> ZeRO-3.
    let moved = fx.path("moved");
    train(
        2,
        &json,
        &["--output_dir", moved.to_str().unwrap(), "--max_steps", "4"],
    );
    train(
        1,
        &json,
        &[
            "--output_dir",
            moved.to_str().unwrap(),
            "--resume_from_checkpoint",
            "true",
            "--per_device_train_batch_size",
            "4",
            "--deepspeed.zero_optimization.stage",
            "3",
        ],
    );
    let (want, got) = (losses(&reference), losses(&moved));
    assert_eq!(want.len(), got.len());
    for ((step, a), (_, b)) in want.iter().zip(&got) {
        assert!(
            ((a - b) / a).abs() < 1e-5,
            "step {step}: loss {b} after resharding, {a} without"
        );
    }
}

/// 300 short documents of repetitive, learnable English.
fn corpus() -> String {
    let subjects = [
        "the quick brown fox",
        "a lazy dog",
        "the old captain",
        "my small cat",
        "the river",
    ];
    let verbs = [
        "jumps over",
        "sleeps near",
        "sails across",
        "watches",
        "runs past",
    ];
    let objects = [
        "the fence",
        "the harbour",
        "a sunny garden",
        "the mountain",
        "an open door",
    ];
    sentence_corpus(300, &subjects, &verbs, &objects)
}

/// 120 short conversations in the `messages` shape.
fn chat() -> String {
    let animals = ["fox", "dog", "cat", "horse", "bird", "fish"];
    (0..120)
        .map(|i| {
            let animal = animals[i % animals.len()];
            let messages = serde_json::json!({"messages": [
                {"role": "user", "content": format!("what does the {animal} do?")},
                {"role": "assistant", "content": format!("the {animal} runs past the fence.")}
            ]});
            messages.to_string() + "\n"
        })
        .collect()
}

/// Save points every rank passes (killed on rank 1) and rank 0's commit points.
const PER_RANK_POINTS: [&str; 3] = [
    "partition_partly_written",
    "partition_written",
    "manifest_part_written",
];
const LEADER_POINTS: [&str; 8] = [
    "tmp_dir_created",
    "leader_files_written",
    "weights_written",
    "manifest_parts_merged",
    "manifest_written",
    "renamed_into_place",
    "latest_updated",
    "rotation_retired_one",
];

/// Runs with a SIGKILL injected at `kill_at` (`POINT:STEP[:RANK]`) and expects failure.
fn train_until_killed(train_json: &Path, out: &Path, kill_at: &str) {
    let overrides = [
        "--output_dir",
        out.to_str().unwrap(),
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--save_total_limit",
        "1",
    ];
    let (launcher, status) = run(2, train_json, &overrides, Some(kill_at));
    assert!(
        !status.success(),
        "the kill at {kill_at} did not stop the job:\n{}",
        launcher.output()
    );
    assert!(
        launcher.stderr().contains("killing this process at"),
        "no kill happened at {kill_at}:\n{}",
        launcher.output()
    );
}

#[test]
fn a_kill_at_any_moment_of_a_save_leaves_a_checkpoint_that_resumes_exactly() {
    let fx = Fixture::new();
    let json = fx.train_json("train.json", 2);
    let straight = fx.path("straight");
    train(
        2,
        &json,
        &[
            "--output_dir",
            straight.to_str().unwrap(),
            "--max_steps",
            "6",
            "--save_steps",
            "2",
        ],
    );
    let want = std::fs::read(straight.join("model.safetensors")).expect("straight weights");
    let one_worker = PER_RANK_POINTS
        .iter()
        .map(|p| format!("{p}:4:1"))
        .chain(LEADER_POINTS.iter().map(|p| format!("{p}:4:0")));
    let all_workers = [
        "partition_partly_written",
        "manifest_part_written",
        "renamed_into_place",
    ]
    .iter()
    .map(|p| format!("{p}:4"));
    for (case, kill_at) in one_worker.chain(all_workers).enumerate() {
        let out = fx.path(&format!("killed-{case}"));
        train_until_killed(&json, &out, &kill_at);
        train(
            2,
            &json,
            &[
                "--output_dir",
                out.to_str().unwrap(),
                "--max_steps",
                "6",
                "--save_steps",
                "2",
                "--resume_from_checkpoint",
                "true",
            ],
        );
        let got = std::fs::read(out.join("model.safetensors")).expect("resumed weights");
        assert!(
            got == want,
            "after a kill at {kill_at} the resumed run's weights differ"
        );
        assert!(
            out.join("checkpoint-6/manifest.json").exists(),
            "no complete checkpoint-6 after {kill_at}"
        );
    }
}

#[test]
fn a_worker_error_reaches_the_launcher_report_with_the_file_name() {
    let fx = Fixture::new();
    let json = fx.train_json("train.json", 2);
    let overrides = ["--train_files", "/nonexistent/corpus.jsonl"];
    let (launcher, status) = run(2, &json, &overrides, None);
    assert!(!status.success(), "a missing data file must fail the job");
    let stderr = launcher.stderr();
    assert!(
        stderr.contains("reported:") && stderr.contains("/nonexistent/corpus.jsonl"),
        "the worker's own error was not in the failure report:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "a worker panicked:\n{stderr}");
}

/// Reads back, with each tracker's own package, every `train/loss` and
/// `train/learning_rate` the run logged: `{tracker: {key: [[step, value], ...]}}`.
/// SwanLab: its `DataStoreReader` and record protobuf; MLflow: `MlflowClient`; wandb 0.31
/// ships no Python reader, so its offline run file is split into records by its
/// documented LevelDB-log framing and each record parsed with wandb's own protobuf.
const READ_TRACKERS: &str = r#"
import glob, json, sys
from swanlab.sdk.internal.core_python.store import DataStoreReader
from swanlab.proto.swanlab.record.v1.record_pb2 import Record
from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2
swan_dir, mlruns, wandb_dir = sys.argv[1], sys.argv[2], sys.argv[3]
keys = ["train/loss", "train/learning_rate"]
swan = {k: [] for k in keys}
for path in glob.glob(f"{swan_dir}/run-*/run-*.swanlab"):
    reader = DataStoreReader(); reader.open(path)
    for data in reader:
        record = Record(); record.ParseFromString(data)
        if record.HasField("scalar") and record.scalar.key in swan:
            swan[record.scalar.key].append([record.scalar.step, record.scalar.value.number])
client = MlflowClient(tracking_uri=f"file://{mlruns}")
run = client.search_runs([client.get_experiment_by_name("rsdeep").experiment_id])[0]
mlflow = {k: sorted([m.step, m.value] for m in client.get_metric_history(run.info.run_id, k)) for k in keys}
def wandb_records(path):
    data, pos, parts = open(path, "rb").read(), 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts = ([] if kind in (1, 2) else parts) + [data[pos + 7:pos + 7 + length]]
        pos += 7 + length
        if kind in (1, 4):
            yield b"".join(parts)
wb = {k: [] for k in keys}
for path in glob.glob(f"{wandb_dir}/wandb/offline-run-*/run-*.wandb"):
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record(); record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for k in keys:
                if k in items:
                    wb[k].append([items["_step"], items[k]])
print(json.dumps({"swanlab": swan, "mlflow": mlflow, "wandb": wb, "params": len(run.data.params)}))
"#;

#[test]
fn report_to_swanlab_wandb_and_mlflow_log_every_step_as_metrics_jsonl_offline() {
    let fx = Fixture::new();
    let train_json = fx.train_json("trackers.json", 2);
    let (swan_dir, mlruns, wandb_dir) = (fx.path("swanlog"), fx.path("mlruns"), fx.path("wandb"));
    std::fs::create_dir_all(&wandb_dir).unwrap();
    let python = std::env::var("RSDEEP_PYTHON").expect("RSDEEP_PYTHON (scripts/env.sh)");
    let json = train_json.display().to_string();
    let args = [
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--master_port",
        "0",
        &json,
        "--report_to",
        r#"["swanlab", "wandb", "mlflow"]"#,
        "--run_name",
        "tracked",
    ];
    let envs = [
        ("OMP_NUM_THREADS", "1".to_string()),
        ("RSDEEP_TRACKER_PYTHON", python.clone()),
        ("SWANLAB_MODE", "offline".to_string()),
        ("SWANLAB_LOG_DIR", swan_dir.display().to_string()),
        (
            "MLFLOW_TRACKING_URI",
            format!("file://{}", mlruns.display()),
        ),
        ("WANDB_MODE", "offline".to_string()),
        ("WANDB_DIR", wandb_dir.display().to_string()),
        // MLflow 3 keeps its file store behind this opt-in (no database offline here).
        ("MLFLOW_ALLOW_FILE_STORE", "true".to_string()),
    ];
    let mut launcher = Launcher::start(&args, &envs);
    let status = launcher.wait(RUN_LIMIT);
    assert!(status.success(), "training failed:\n{}", launcher.output());
    assert!(
        launcher.stderr().contains("swanlab: logging this run"),
        "{}",
        launcher.output()
    );
    let read = std::process::Command::new(&python)
        .args(["-c", READ_TRACKERS])
        .env("MLFLOW_ALLOW_FILE_STORE", "true")
        .arg(&swan_dir)
        .arg(&mlruns)
        .arg(&wandb_dir)
        .output()
        .expect("run the tracker reader");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let logged: serde_json::Value = serde_json::from_slice(&read.stdout).expect("reader JSON");
    let jsonl = std::fs::read_to_string(fx.path("out/metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(rows.len(), 8, "{jsonl}");
    for tracker in ["swanlab", "wandb", "mlflow"] {
        for (key, field) in [
            ("train/loss", "loss"),
            ("train/learning_rate", "learning_rate"),
        ] {
            let expected: Vec<(u64, f64)> = rows
                .iter()
                .map(|r| (r["step"].as_u64().unwrap(), r[field].as_f64().unwrap()))
                .collect();
            let got: Vec<(u64, f64)> = logged[tracker][key]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
                .collect();
            assert_eq!(got, expected, "{tracker} {key}");
        }
    }
    assert!(
        logged["params"].as_u64().unwrap() > 20,
        "the resolved config is the run's parameters"
    );
}
