//! Hugging Face Trainer + DeepSpeed against rsdeep, step by step. The HF side is a user
//! script under `deepspeed` (2 CPU ranks): the seed's pretrain.py for pretraining,
//! sft_tokenized.py (the Trainer on tokenized rows, peft for LoRA) for fine-tuning. The
//! rsdeep side is its built-in trainer (2 CPU ranks) on a train.json with the same
//! settings. Both start from one initial safetensors file (and one adapter file for
//! LoRA), and must log the same loss (1e-4 relative), gradient norm (1e-3) and learning
//! rate at every step and end with the same weights (1e-4 absolute) — which holds only if
//! the data order, the blocks, the padding, the token-weighted loss over the global batch,
//! the optimizer, the clipping and the schedule all equal Hugging Face's.
//!
//! Pretraining: ZeRO 1 (the Trainer's linear schedule), 2 and 3 (the seed's DeepSpeed
//! WarmupLR), each with the `random` and the `sequential` order, 30 steps crossing epoch
//! boundaries whose last window is short; and a run resumed from step 10 on both sides.
//! Fine-tuning: full SFT at ZeRO 2 and 3 and LoRA at ZeRO 2, 20 steps, on rows of
//! different lengths with masked prompts (so micro-batches differ in label tokens).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rsdeep_e2e::{Launcher, pretrain_fixture, python, run_deepspeed, user_script};

const LOSS_RTOL: f64 = 1e-4;
const GRAD_NORM_RTOL: f64 = 1e-3;
const LR_RTOL: f64 = 1e-9;
const WEIGHT_ATOL: f64 = 1e-4;

/// What is trained, and how the HF side runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Task {
    Pretrain,
    Sft,
    Lora,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Pretrain => "pretrain",
            Task::Sft => "sft",
            Task::Lora => "lora",
        }
    }

    fn hf_script(self) -> String {
        match self {
            Task::Pretrain => user_script("pretrain.py"),
            _ => user_script("sft_tokenized.py"),
        }
    }

    /// The file holding the trained weights.
    fn weights_file(self) -> &'static str {
        match self {
            Task::Lora => "adapter_model.safetensors",
            _ => "model.safetensors",
        }
    }
}

/// One comparison: task, ZeRO stage, data order, steps.
#[derive(Debug, Clone, Copy)]
struct Case {
    task: Task,
    stage: u8,
    strategy: &'static str,
    steps: u64,
}

impl Case {
    fn pretrain(stage: u8, strategy: &'static str) -> Case {
        Case {
            task: Task::Pretrain,
            stage,
            strategy,
            steps: 30,
        }
    }

    fn tune(task: Task, stage: u8) -> Case {
        Case {
            task,
            stage,
            strategy: "random",
            steps: 20,
        }
    }

    fn label(&self) -> String {
        format!("{} zero{} {}", self.task.name(), self.stage, self.strategy)
    }
}

/// One logged step: loss, gradient norm, learning rate.
#[derive(Debug, Clone, Copy)]
struct Logged {
    step: u64,
    loss: f64,
    grad_norm: f64,
    learning_rate: f64,
}

fn logged(entry: &serde_json::Value) -> Option<Logged> {
    Some(Logged {
        step: entry.get("step")?.as_u64()?,
        loss: entry.get("loss")?.as_f64()?,
        grad_norm: entry.get("grad_norm")?.as_f64()?,
        learning_rate: entry.get("learning_rate")?.as_f64()?,
    })
}

/// `weights.py args...` in the venv; its stdout.
fn weights_py(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/parity/weights.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run weights.py");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "weights.py {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `rows` tokenized SFT rows of 8 to 47 ids below `vocab`, the first quarter to half of
/// each masked as its prompt (-100), from a fixed linear congruential sequence.
fn tokenized_rows(rows: usize, vocab: u64) -> String {
    let mut state = 12345u64;
    let mut next = |bound: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % bound
    };
    (0..rows)
        .map(|_| {
            let len = 8 + next(40) as usize;
            let ids: Vec<u64> = (0..len).map(|_| 1 + next(vocab - 1)).collect();
            let prompt = len / 4 + next(len as u64 / 4) as usize;
            let labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| if i < prompt { -100 } else { id as i64 })
                .collect();
            serde_json::json!({"input_ids": ids, "labels": labels}).to_string() + "\n"
        })
        .collect()
}

/// The fixture plus the initial weights (`init/`), tokenized rows (`rows.jsonl`) and the
/// initial LoRA adapter (`adapter/`).
fn material() -> tempfile::TempDir {
    let fixture = pretrain_fixture();
    let dir = fixture.path();
    let (model, init) = (dir.join("model"), dir.join("init"));
    weights_py(&[
        "init",
        &model.display().to_string(),
        &init.display().to_string(),
        "7",
    ]);
    std::fs::write(dir.join("rows.jsonl"), tokenized_rows(120, 384)).unwrap();
    let adapter = dir.join("adapter").display().to_string();
    weights_py(&["adapter", &init.display().to_string(), &adapter, "5"]);
    fixture
}

/// The seed's ds_config_zero2.json at `stage`; at stage 1 without its WarmupLR scheduler
/// (the Trainer's own linear schedule runs), at stage 3 gathering weights on save.
fn ds_config(dir: &Path, stage: u8) -> PathBuf {
    let seed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/ds_config_zero2.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(seed).unwrap()).unwrap();
    config["zero_optimization"]["stage"] = stage.into();
    if stage == 1 {
        config.as_object_mut().unwrap().remove("scheduler");
    }
    if stage == 3 {
        // Without it HF's save_model writes no weights under ZeRO-3.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = true.into();
    }
    let path = dir.join(format!("ds_zero{stage}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// The settings both sides get, as (HF flag, value) pairs.
fn shared_settings(dir: &Path, case: &Case) -> Vec<(&'static str, String)> {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut settings = vec![
        ("model_name_or_path", path("init")),
        ("per_device_train_batch_size", "2".into()),
        ("gradient_accumulation_steps", "2".into()),
        ("learning_rate", "1e-3".into()),
        ("weight_decay", "0.01".into()),
        ("max_steps", case.steps.to_string()),
        ("warmup_steps", "3".into()),
        ("logging_steps", "1".into()),
        ("seed", "12".into()),
        ("train_sampling_strategy", case.strategy.into()),
        ("report_to", "none".into()),
        (
            "deepspeed",
            ds_config(dir, case.stage).display().to_string(),
        ),
    ];
    match case.task {
        Task::Pretrain => settings.extend([
            ("tokenizer_name", path("tok")),
            ("train_files", path("corpus.jsonl")),
            ("preprocessing_num_workers", "3".into()),
            ("block_size", "64".into()),
        ]),
        Task::Sft => settings.push(("train_files", path("rows.jsonl"))),
        Task::Lora => settings.extend([
            ("train_files", path("rows.jsonl")),
            ("adapter_name_or_path", path("adapter")),
        ]),
    }
    settings
}

/// How a run saves and resumes: (save_steps, resume checkpoint).
#[derive(Clone, Copy, Default)]
struct Saving<'a> {
    save_steps: Option<u64>,
    resume_from: Option<&'a Path>,
}

/// HF Trainer + DeepSpeed; the log history of its trainer_state.json.
fn run_hf(dir: &Path, case: &Case, out: &Path, saving: Saving) -> Vec<Logged> {
    let mut args: Vec<String> = shared_settings(dir, case)
        .into_iter()
        .flat_map(|(key, value)| [format!("--{key}"), value])
        .collect();
    args.extend(["--use_cpu", "--do_train", "--output_dir"].map(String::from));
    args.push(out.display().to_string());
    match saving.save_steps {
        Some(steps) => args.extend(["--save_steps".into(), steps.to_string()]),
        None => args.extend(["--save_strategy".into(), "no".into()]),
    }
    if let Some(checkpoint) = saving.resume_from {
        args.extend([
            "--resume_from_checkpoint".into(),
            checkpoint.display().to_string(),
        ]);
    }
    run_deepspeed(dir, &case.task.hf_script(), &args);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(logged)
        .collect()
}

/// rsdeep's built-in trainer on a train.json with the same settings; its metrics.jsonl.
fn run_rsdeep(dir: &Path, case: &Case, out: &Path, saving: Saving) -> Vec<Logged> {
    let mut train: serde_json::Map<String, serde_json::Value> = shared_settings(dir, case)
        .into_iter()
        .map(|(key, value)| {
            let typed = match (value.parse::<u64>(), value.parse::<f64>()) {
                (Ok(whole), _) => whole.into(),
                (_, Ok(real)) => real.into(),
                _ => serde_json::Value::String(value),
            };
            (key.to_string(), typed)
        })
        .collect();
    let files = serde_json::json!([train["train_files"]]);
    let mut more = vec![
        ("train_files", files),
        ("task", case.task.name().into()),
        ("output_dir", out.display().to_string().into()),
        (
            "tokenizer_name",
            dir.join("tok").display().to_string().into(),
        ),
        // pretrain.py groups blocks in `datasets.map` batches of 40000 documents.
        ("group_texts_batch_size", 40000.into()),
        ("max_seq_length", 64.into()),
    ];
    match saving.save_steps {
        Some(steps) => more.push(("save_steps", steps.into())),
        None => more.push(("save_strategy", "no".into())),
    }
    if let Some(checkpoint) = saving.resume_from {
        more.push((
            "resume_from_checkpoint",
            checkpoint.display().to_string().into(),
        ));
    }
    train.extend(more.into_iter().map(|(k, v)| (k.to_string(), v)));
    let path = out.with_extension("json");
    std::fs::write(&path, serde_json::Value::Object(train).to_string()).unwrap();
    let json = path.display().to_string();
    let args = [
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--master_port",
        "0",
        &json,
    ];
    let mut launcher = Launcher::start(&args, &[("OMP_NUM_THREADS", "1".to_string())]);
    let status = launcher.wait(Duration::from_secs(600));
    assert!(status.success(), "{}", launcher.output());
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| logged(&v))
        .collect()
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

/// Both curves over `steps`, printed; asserts every step agrees.
fn assert_curves_agree(
    label: &str,
    hf: &[Logged],
    rs: &[Logged],
    steps: std::ops::RangeInclusive<u64>,
) {
    let pick = |log: &[Logged], step| log.iter().rev().find(|l| l.step == step).copied();
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for step in steps {
        let h = pick(hf, step).unwrap_or_else(|| panic!("{label}: HF logged no step {step}"));
        let r = pick(rs, step).unwrap_or_else(|| panic!("{label}: rsdeep logged no step {step}"));
        let deviation = (
            relative(h.loss, r.loss),
            relative(h.grad_norm, r.grad_norm),
            relative(h.learning_rate, r.learning_rate),
        );
        eprintln!(
            "{label} step {step:2}: loss {:.7} vs {:.7} ({:.1e}), grad_norm {:.6} vs {:.6} ({:.1e}), lr {:.3e} vs {:.3e}",
            h.loss,
            r.loss,
            deviation.0,
            h.grad_norm,
            r.grad_norm,
            deviation.1,
            h.learning_rate,
            r.learning_rate
        );
        worst = (
            worst.0.max(deviation.0),
            worst.1.max(deviation.1),
            worst.2.max(deviation.2),
        );
    }
    eprintln!(
        "{label}: worst loss {:.1e}, grad_norm {:.1e}, lr {:.1e}",
        worst.0, worst.1, worst.2
    );
    assert!(
        worst.0 <= LOSS_RTOL,
        "{label}: loss deviates by {:.2e}",
        worst.0
    );
    assert!(
        worst.1 <= GRAD_NORM_RTOL,
        "{label}: grad_norm deviates by {:.2e}",
        worst.1
    );
    assert!(
        worst.2 <= LR_RTOL,
        "{label}: the logged learning rate deviates by {:.2e}",
        worst.2
    );
}

/// The two final weight files agree within `WEIGHT_ATOL`.
fn assert_weights_agree(label: &str, task: Task, hf: &Path, rs: &Path) {
    let (hf, rs) = (hf.display().to_string(), rs.display().to_string());
    let report = weights_py(&["compare", &hf, &rs, task.weights_file()]);
    let weights: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    eprintln!("{label}: final weights {weights}");
    assert_eq!(weights["only_one_side"], serde_json::json!([]), "{weights}");
    let largest = weights["max_abs"].as_f64().unwrap();
    assert!(
        largest <= WEIGHT_ATOL,
        "{label}: final weights deviate: {weights}"
    );
}

/// Runs `case` on both sides from the same material and asserts they agree.
fn assert_parity(case: Case) {
    let material = material();
    let dir = material.path();
    let label = case.label();
    let (hf_out, rs_out) = (dir.join("hf"), dir.join("rs"));
    let hf = run_hf(dir, &case, &hf_out, Saving::default());
    let rs = run_rsdeep(dir, &case, &rs_out, Saving::default());
    assert_curves_agree(&label, &hf, &rs, 1..=case.steps);
    assert_weights_agree(&label, case.task, &hf_out, &rs_out);
}

#[test]
fn pretraining_zero1_random_order_matches_hf_trainer_step_by_step() {
    assert_parity(Case::pretrain(1, "random"));
}

#[test]
fn pretraining_zero1_sequential_order_matches_hf_trainer_step_by_step() {
    assert_parity(Case::pretrain(1, "sequential"));
}

#[test]
fn pretraining_zero2_random_order_matches_hf_trainer_step_by_step() {
    assert_parity(Case::pretrain(2, "random"));
}

#[test]
fn pretraining_zero2_sequential_order_matches_hf_trainer_step_by_step() {
    assert_parity(Case::pretrain(2, "sequential"));
}

#[test]
fn pretraining_zero3_random_order_matches_hf_trainer_step_by_step() {
    assert_parity(Case::pretrain(3, "random"));
}

#[test]
fn pretraining_zero3_sequential_order_matches_hf_trainer_step_by_step() {
    assert_parity(Case::pretrain(3, "sequential"));
}

#[test]
fn full_sft_zero2_matches_hf_trainer_step_by_step() {
    assert_parity(Case::tune(Task::Sft, 2));
}

#[test]
fn full_sft_zero3_matches_hf_trainer_step_by_step() {
    assert_parity(Case::tune(Task::Sft, 3));
}

#[test]
fn lora_from_one_adapter_file_matches_peft_under_hf_trainer_step_by_step() {
    assert_parity(Case::tune(Task::Lora, 2));
}

#[test]
fn a_run_resumed_at_step_10_matches_hf_resumed_at_step_10() {
    let material = material();
    let dir = material.path();
    let case = Case::pretrain(2, "random");
    let saving = Saving {
        save_steps: Some(10),
        resume_from: None,
    };
    let (hf_first, rs_first) = (dir.join("hf-first"), dir.join("rs-first"));
    let hf_whole = run_hf(dir, &case, &hf_first, saving);
    run_rsdeep(dir, &case, &rs_first, saving);
    let (hf_checkpoint, rs_checkpoint) = (
        hf_first.join("checkpoint-10"),
        rs_first.join("checkpoint-10"),
    );
    fn resumed(from: &Path) -> Saving<'_> {
        Saving {
            save_steps: None,
            resume_from: Some(from),
        }
    }
    let (hf_out, rs_out) = (dir.join("hf-resumed"), dir.join("rs-resumed"));
    let hf = run_hf(dir, &case, &hf_out, resumed(&hf_checkpoint));
    let rs = run_rsdeep(dir, &case, &rs_out, resumed(&rs_checkpoint));
    assert_curves_agree("resumed at 10", &hf, &rs, 11..=case.steps);
    assert_curves_agree("resumed vs uninterrupted", &hf_whole, &rs, 11..=case.steps);
    assert_weights_agree("resumed at 10", case.task, &hf_out, &rs_out);
}
