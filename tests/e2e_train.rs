//! End-to-end training through the real binaries on loopback, with fixtures the test makes
//! itself (a synthetic corpus and chat set, a tokenizer trained by `rsdeep tokenizer
//! train`, a tiny Qwen2 config): pretrain → SFT → LoRA each lower the loss and write
//! outputs that Python transformers/peft load, and `rsdeep generate` chats with the
//! result; a run resumed from a checkpoint is bit-identical to the uninterrupted run; a
//! resume at another world size continues the same losses; a DoRA run that also trains
//! the norms, and a QLoRA run on an NF4 base, resume bit-identically and their adapters
//! make peft (on bitsandbytes' 4-bit base for QLoRA) generate what `rsdeep generate
//! --adapter` generates.

use rsdeep_e2e::{Launcher, TrainFixture, binary, logged_losses, sentence_corpus};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The training fixture plus chat data (`chat.jsonl`).
fn fixture() -> TrainFixture {
    let fx = TrainFixture::new(&corpus(), 64, 512, 400);
    std::fs::write(fx.path("chat.jsonl"), chat()).expect("chat");
    fx
}

/// The pretrain train.json these tests start from.
trait TrainRuns {
    fn train_json(&self, name: &str, stage: u8) -> PathBuf;
}

impl TrainRuns for TrainFixture {
    /// Writes `name`: 8 steps saving every 4, 2 x 2 accumulation, AdamW + WarmupLR at
    /// ZeRO `stage`.
    fn train_json(&self, name: &str, stage: u8) -> PathBuf {
        let settings = serde_json::json!({
            "block_size": 32,
            "gradient_accumulation_steps": 2,
            "warmup_steps": 2,
            "max_steps": 8,
            "save_steps": 4,
            "seed": 7,
            "output_dir": self.path("out"),
            "deepspeed": {
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
                "zero_optimization": {"stage": stage, "reduce_bucket_size": 5000, "allgather_bucket_size": 5000}
            }
        });
        self.pretrain_json(name, settings)
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

fn mean(values: &[(u64, f64)]) -> f64 {
    values.iter().map(|(_, l)| l).sum::<f64>() / values.len() as f64
}

#[test]
fn pretrain_sft_lora_pipeline_lowers_each_loss_and_writes_files_hf_loads() {
    let fx = fixture();
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
    let pre = logged_losses(&out);
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
    let sft = logged_losses(&sft_out);
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
    let lora = logged_losses(&lora_out);
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
    let fx = fixture();
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
        logged_losses(&straight),
        logged_losses(&resumed),
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
fn dora_run_resumes_bit_identically_and_peft_generates_what_rsdeep_generates() {
    let peft_check =
        r#"assert config["use_dora"] and config["modules_to_save"] == ["norm"], config"#;
    adapter_run_resumes_and_peft_generates_the_same(AdapterMethod {
        train_args: &["--use_dora", "true", "--lora_modules_to_save", "norm"],
        peft_check,
        ..AdapterMethod::default()
    });
}

#[test]
fn qlora_run_resumes_bit_identically_and_peft_on_bitsandbytes_generates_what_rsdeep_generates() {
    adapter_run_resumes_and_peft_generates_the_same(AdapterMethod {
        train_args: &["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4"],
        generate_args: &["--base_4bit", "nf4"],
        python_load_kwargs: r#"{"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu"}"#,
        ..AdapterMethod::default()
    });
}

#[test]
fn prefix_tuning_run_resumes_bit_identically_and_peft_decodes_what_rsdeep_generates() {
    adapter_run_resumes_and_peft_generates_the_same(AdapterMethod {
        train_args: &["--peft_type", "PREFIX_TUNING", "--num_virtual_tokens", "4"],
        peft_check: r#"assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4, config"#,
        // peft 0.21's generate under transformers 5 drops the prefix (it returns the
        // base model's text): peft's forward, which it trains with, decodes instead.
        decoder: Decoder::PeftForward,
        ..AdapterMethod::default()
    });
}

#[test]
fn bottleneck_run_resumes_bit_identically_and_adapterhub_decodes_what_rsdeep_generates() {
    adapter_run_resumes_and_peft_generates_the_same(AdapterMethod {
        train_args: &[
            "--peft_type",
            "BOTTLENECK",
            "--bottleneck_reduction_factor",
            "8",
        ],
        peft_check: r#"assert config["config"]["mh_adapter"] and config["config"]["reduction_factor"] == 8, config"#,
        decoder: Decoder::AdaptersLibrary,
        llama_base: true,
        weights_file: "adapter.safetensors",
        ..AdapterMethod::default()
    });
}

/// How Python decodes with the saved adapter, to compare with `rsdeep generate`.
#[derive(Clone, Copy, PartialEq)]
enum Decoder {
    /// peft's `generate`.
    PeftGenerate,
    /// Greedily with peft's forward (no cache).
    PeftForward,
    /// Greedily with AdapterHub's adapters library (and its transformers 4.57, from
    /// `$RSDEEP_ADAPTERS_PYTHONPATH`).
    AdaptersLibrary,
}

/// One adapter method of the e2e run below.
struct AdapterMethod {
    /// train.json keys (as flags) that select the method.
    train_args: &'static [&'static str],
    /// Flags `rsdeep generate --adapter` needs for it.
    generate_args: &'static [&'static str],
    /// A Python assertion on the saved `adapter_config.json` (`config`).
    peft_check: &'static str,
    /// Keyword arguments for `AutoModelForCausalLM.from_pretrained` of the base.
    python_load_kwargs: &'static str,
    decoder: Decoder,
    /// Pretrain the base as a Llama (else the fixture's Qwen2).
    llama_base: bool,
    /// The adapter weights file the method writes.
    weights_file: &'static str,
}

impl Default for AdapterMethod {
    fn default() -> Self {
        AdapterMethod {
            train_args: &[],
            generate_args: &[],
            peft_check: "",
            python_load_kwargs: "{}",
            decoder: Decoder::PeftGenerate,
            llama_base: false,
            weights_file: "adapter_model.safetensors",
        }
    }
}

/// A run of one adapter method (LoRA-family ones on all linears) on a 2-step pretrained
/// base, at ZeRO-3 on 2 ranks: resumed at step 4 it ends bit-identical to the straight
/// run, and Python (after the method's check of the adapter config) decodes the text
/// `rsdeep generate --adapter` generates.
fn adapter_run_resumes_and_peft_generates_the_same(method: AdapterMethod) {
    let AdapterMethod {
        train_args,
        generate_args,
        peft_check,
        python_load_kwargs,
        decoder,
        llama_base,
        weights_file,
    } = method;
    let fx = fixture();
    let json = fx.train_json("train.json", 3);
    let base = fx.path("base");
    let mut base_args = vec!["--output_dir", base.to_str().unwrap(), "--max_steps", "2"];
    let llama = fx.path("llama.json");
    if llama_base {
        let config = std::fs::read_to_string(fx.path("model.json")).expect("model.json");
        let config = config
            .replace("Qwen2ForCausalLM", "LlamaForCausalLM")
            .replace("\"qwen2\"", "\"llama\"");
        std::fs::write(&llama, config).expect("llama.json");
        base_args.extend(["--config_name", llama.to_str().unwrap()]);
    }
    train(2, &json, &base_args);
    let chat = fx.path("chat.jsonl");
    let run = |out: &Path, max_steps: &str, resume: bool| {
        let mut args = vec![
            "--task",
            "lora",
            "--model_name_or_path",
            base.to_str().unwrap(),
            "--train_files",
            chat.to_str().unwrap(),
            "--max_seq_length",
            "64",
            "--output_dir",
            out.to_str().unwrap(),
            "--max_steps",
            max_steps,
            "--learning_rate",
            "1e-2",
            "--lora_target_modules",
            "all-linear",
        ];
        args.extend_from_slice(train_args);
        if resume {
            args.extend(["--resume_from_checkpoint", "true"]);
        }
        train(2, &json, &args)
    };
    let straight = fx.path("adapter");
    let log = run(&straight, "8", false);
    assert!(
        log.contains("trainable params: "),
        "no PEFT summary line:\n{log}"
    );
    let resumed = fx.path("adapter-resumed");
    run(&resumed, "4", false);
    run(&resumed, "8", true);
    assert_eq!(
        logged_losses(&straight),
        logged_losses(&resumed),
        "logged losses differ after resume"
    );
    let weights = |dir: &Path| std::fs::read(dir.join(weights_file)).expect("adapter");
    assert!(
        weights(&straight) == weights(&resumed),
        "final adapters differ between the straight and the resumed run"
    );

    let prompt = "the quick brown fox";
    let ours = Command::new(binary("rsdeep"))
        .args(["generate", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&straight)
        .args(generate_args)
        .args(["--prompt", prompt, "--max_new_tokens", "8"])
        .output()
        .expect("rsdeep generate");
    assert!(
        ours.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let load = match decoder {
        Decoder::AdaptersLibrary => r#"
import adapters
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
adapters.init(model)
model.set_active_adapters(model.load_adapter(adapter, with_head=False, use_safetensors=True))
model.eval()
"#
        .to_string(),
        _ => format!(
            r#"
from transformers import BitsAndBytesConfig
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(base, **{python_load_kwargs})
for module in model.modules():
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False  # bitsandbytes' general CPU path
model = PeftModel.from_pretrained(model, adapter).eval()
"#
        ),
    };
    let script = format!(
        r#"
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, prompt = sys.argv[1:]
config = json.load(open(adapter + "/adapter_config.json"))
{peft_check}
{load}
tok = AutoTokenizer.from_pretrained(base)
ids = tok(prompt, return_tensors="pt").input_ids
if {peft_generate}:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
else:
    out = ids
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
            out = torch.cat([out, logits[:, -1:].argmax(-1)], 1)
            if out[0, -1] == tok.eos_token_id:
                break
new = out[0, ids.shape[1]:].tolist()
if new and new[-1] == tok.eos_token_id:
    new = new[:-1]  # rsdeep generate prints no end-of-sequence token
sys.stdout.write(tok.decode(new))
"#,
        peft_generate = if decoder == Decoder::PeftGenerate {
            "True"
        } else {
            "False"
        },
    );
    let mut python = Command::new(rsdeep_e2e::python());
    if decoder == Decoder::AdaptersLibrary {
        let folder = std::env::var("RSDEEP_ADAPTERS_PYTHONPATH")
            .expect("RSDEEP_ADAPTERS_PYTHONPATH is not set: `source scripts/env.sh`");
        python.env("PYTHONPATH", folder);
    }
    let theirs = python
        .args(["-c", &script])
        .arg(&base)
        .arg(&straight)
        .arg(prompt)
        .output()
        .expect("run python");
    assert!(
        theirs.status.success(),
        "Python could not load the adapter:\n{}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    let (ours, theirs) = (
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
    );
    assert!(!theirs.trim().is_empty(), "Python generated nothing");
    assert_eq!(
        ours.trim(),
        theirs.trim(),
        "rsdeep and Python generate different text"
    );
}

#[test]
fn resume_at_another_world_size_and_stage_continues_the_same_losses() {
    let fx = fixture();
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
    let (want, got) = (logged_losses(&reference), logged_losses(&moved));
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
    let fx = fixture();
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
    let fx = fixture();
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

#[test]
fn wall_clock_breakdown_and_deepspeed_monitors_do_what_deepspeed_users_expect() {
    let fx = fixture();
    let monitors = fx.path("monitors").display().to_string();
    let flops_file = fx.path("profiles/flops.txt");
    let json = fx.pretrain_json(
        "breakdown.json",
        serde_json::json!({
            "block_size": 32,
            "max_steps": 4,
            "output_dir": fx.path("out"),
            "deepspeed": {
                "wall_clock_breakdown": true, "steps_per_print": 2,
                "comms_logger": {"enabled": true, "prof_all": true},
                "csv_monitor": {"enabled": true, "output_path": monitors, "job_name": "job"},
                "tensorboard": {"enabled": true, "output_path": monitors, "job_name": "tb"},
                "flops_profiler": {"enabled": true, "profile_step": 2, "output_file": flops_file}
            }
        }),
    );
    let log = train(2, &json, &[]);
    check_flops_profile(&flops_file, &fx.path("out"));
    assert!(
        !log.contains("DeepSpeed Flops Profiler"),
        "with output_file the profile goes only there:\n{log}"
    );
    // DeepSpeed's csv monitor: one file per event, `step,<name>`, step = samples seen
    // (2 ranks x 2 per device = 4 per step).
    let csv = std::fs::read_to_string(fx.path("monitors/job/Train_Samples_lr.csv")).unwrap();
    let mut expected = String::from("step,lr\r\n");
    for (step, lr) in logged_rows(&fx, "learning_rate") {
        expected.push_str(&format!("{},{lr:?}\r\n", step * 4));
    }
    assert_eq!(csv, expected);
    let losses = std::fs::read_to_string(fx.path("monitors/job/Train_Samples_train_loss.csv"));
    assert_eq!(losses.unwrap().lines().count(), 5, "header + 4 steps");
    let tb_files = std::fs::read_dir(fx.path("monitors/tb")).unwrap().count();
    assert_eq!(tb_files, 1, "one TensorBoard event file");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[Rank 0] time (ms) | fwd: "))
        .collect();
    assert_eq!(lines.len(), 2, "one line every 2 of 4 steps:\n{log}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("| bwd_allreduce: ") && l.contains("| step: ")),
        "{lines:?}"
    );
    // DeepSpeed's comms log summary once, at the end, with the ZeRO-2 collectives.
    let (_, summary) = log
        .split_once("[rank 0] comms_logger summary (DeepSpeed's log_summary):\n")
        .unwrap_or_else(|| panic!("no comms_logger summary:\n{log}"));
    let summary: Vec<&str> = summary
        .lines()
        .filter_map(|l| l.strip_prefix("[rank 0] "))
        .collect();
    assert!(summary[0].starts_with("Comm. Op"), "{summary:#?}");
    for op in ["reduce_scatter", "all_gather"] {
        assert!(
            summary.iter().any(|l| l.trim_end() == op),
            "no {op} rows in:\n{summary:#?}"
        );
    }
}

/// ZeRO-Infinity's NVMe optimizer offload through the real binaries: the same model as
/// without offload, checkpoints interchangeable both ways, no swap file left behind.
#[test]
fn nvme_optimizer_offload_trains_the_same_model_and_leaves_no_swap_file() {
    let fx = fixture();
    let nvme = fx.path("nvme");
    let json = |name: &str, offload: bool| {
        let mut zero = serde_json::json!({"stage": 3});
        if offload {
            zero["offload_optimizer"] = serde_json::json!({"device": "nvme", "nvme_path": nvme});
        }
        fx.pretrain_json(
            &format!("{name}.json"),
            serde_json::json!({
                "block_size": 32, "max_steps": 4, "save_steps": 2, "seed": 11,
                "output_dir": fx.path(name), "deepspeed": {"zero_optimization": zero}
            }),
        )
    };
    train(2, &json("plain", false), &[]);
    let log = train(2, &json("offloaded", true), &[]);
    assert!(
        log.contains("optimizer 0.0 MiB (+ ") && log.contains(" MiB in files under nvme_path)"),
        "the optimizer state lives in files:\n{log}"
    );
    let model = |dir: &str| std::fs::read(fx.path(dir).join("model.safetensors")).unwrap();
    assert!(
        model("plain") == model("offloaded"),
        "NVMe offload changed the model"
    );
    // The plain run's checkpoint resumed with offload ends at the same model.
    let checkpoint = fx.path("plain").join("checkpoint-2");
    let resumed = fx.path("resumed");
    train(
        2,
        &json("offloaded", true),
        &[
            "--output_dir",
            resumed.to_str().unwrap(),
            "--resume_from_checkpoint",
            checkpoint.to_str().unwrap(),
        ],
    );
    assert!(
        model("plain") == model("resumed"),
        "resumed with offload differs"
    );
    let left: Vec<_> = std::fs::read_dir(&nvme).unwrap().collect();
    assert!(left.is_empty(), "swap files left in nvme_path: {left:?}");
}

/// The flops profile rank 0 wrote of step 2 of the fixture's tiny Qwen2 (hidden 64, MLP
/// 128, 2 layers of 4 heads of 16 with 2 kv heads, vocabulary 512, untied) trained 2 x 32
/// tokens per micro-step on 2 ranks: DeepSpeed's layout, the parameters of the model
/// written to `out`, and the forward's MACs and FLOPs counted by hand as DeepSpeed's
/// profiler counts them.
fn check_flops_profile(file: &Path, out: &Path) {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("no flops profile at {}: {e}", file.display()));
    let row = |label: &str, value: &str| format!("{label:<70}  {value:<8}\n");
    assert!(
        text.starts_with(
            "\n-------------------------- DeepSpeed Flops Profiler --------------------------\n\
             Profile Summary at step 2:\n"
        ),
        "{text}"
    );
    let params = saved_parameter_count(out);
    assert_eq!(params, 139_840, "the fixture's model");
    let (tokens, hidden, inter, vocab, layers) = (2 * 32, 64, 128, 512, 2);
    let (q_out, kv_out) = (4 * 16, 2 * 16);
    let linears = tokens * (hidden * (q_out + 2 * kv_out) + q_out * hidden + 3 * hidden * inter);
    let attention = 2 * 2 * 4 * 32 * 32 * 16; // Q K^T + A V over (B, N, T, T, D)
    let macs = layers * (linears + attention) + tokens * hidden * vocab;
    assert_eq!(macs, 7_340_032);
    let flops = 2 * macs + layers * tokens * inter; // + one per SiLU element
    assert_eq!(flops, 14_696_448);
    for expected in [
        row("world size: ", "2"),
        row("data parallel size: ", "2"),
        row("batch size per GPU: ", "2"),
        row("params per GPU: ", &format!("{} K", params as f64 / 1e3)),
        row("fwd MACs per GPU: ", "7.34 MMACs"),
        row("fwd flops per GPU: ", "14.7 M"),
    ] {
        assert!(text.contains(&expected), "{expected:?} in:\n{text}");
    }
    for part in [
        "bwd latency: ",
        "step latency: ",
        "samples/second: ",
        "Top 1 modules in terms of params, MACs or fwd latency",
        "Detailed Profile per GPU",
        "    (layers): ModuleList(\n      (0): Qwen2DecoderLayer(",
        "  (lm_head): Linear(",
    ] {
        assert!(text.contains(part), "{part:?} in:\n{text}");
    }
}

/// Parameter elements of the model in `dir`'s safetensors files (from their headers).
fn saved_parameter_count(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
            total += header
                .as_object()
                .unwrap()
                .iter()
                .filter(|(name, _)| *name != "__metadata__")
                .map(|(_, t)| {
                    let shape = t["shape"].as_array().unwrap();
                    shape.iter().map(|d| d.as_u64().unwrap()).product::<u64>()
                })
                .sum::<u64>();
        }
    }
    total
}

#[test]
fn bottleneck_adapters_on_a_qwen2_model_are_refused_naming_the_library() {
    let fx = fixture();
    let json = fx.train_json("train.json", 2);
    let base = fx.path("base");
    train(
        1,
        &json,
        &["--output_dir", base.to_str().unwrap(), "--max_steps", "1"],
    );
    let (chat, adapter) = (fx.path("chat.jsonl"), fx.path("adapter"));
    let overrides = [
        "--task",
        "lora",
        "--peft_type",
        "BOTTLENECK",
        "--model_name_or_path",
        base.to_str().unwrap(),
        "--train_files",
        chat.to_str().unwrap(),
        "--max_seq_length",
        "64",
        "--output_dir",
        adapter.to_str().unwrap(),
    ];
    let (launcher, status) = run(1, &json, &overrides, None);
    assert!(
        !status.success(),
        "bottleneck adapters on Qwen2 must be refused"
    );
    let stderr = launcher.stderr();
    assert!(
        stderr.contains("peft_type BOTTLENECK") && stderr.contains("Llama-architecture"),
        "{stderr}"
    );
    assert!(!adapter.join("adapter.safetensors").exists());
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
mlflow, params, metric_keys = {}, {}, []
if glob.glob(f"{mlruns}/*"):
    client = MlflowClient(tracking_uri=f"file://{mlruns}")
    run = client.search_runs([client.get_experiment_by_name("rsdeep").experiment_id])[0]
    mlflow = {k: sorted([m.step, m.value] for m in client.get_metric_history(run.info.run_id, k)) for k in keys}
    params, metric_keys = run.data.params, sorted(run.data.metrics)
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
print(json.dumps({"swanlab": swan, "mlflow": mlflow, "wandb": wb, "params": params, "metric_keys": metric_keys}))
"#;

/// The launcher's arguments for a 2-rank run of `train_json` reporting to swanlab,
/// wandb and mlflow, plus `extra`.
fn tracked_args<'a>(train_json: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--master_port",
        "0",
        train_json,
        "--report_to",
        r#"["swanlab", "wandb", "mlflow"]"#,
        "--run_name",
        "tracked",
    ];
    args.extend_from_slice(extra);
    args
}

/// Every tracker offline, writing under the fixture (`swanlog`, `mlruns`, `wandb`).
fn tracker_envs(fx: &TrainFixture) -> Vec<(&'static str, String)> {
    let wandb_dir = fx.path("wandb");
    std::fs::create_dir_all(&wandb_dir).unwrap();
    vec![
        ("OMP_NUM_THREADS", "1".to_string()),
        ("RSDEEP_TRACKER_PYTHON", rsdeep_e2e::python()),
        ("SWANLAB_MODE", "offline".to_string()),
        ("SWANLAB_LOG_DIR", fx.path("swanlog").display().to_string()),
        (
            "MLFLOW_TRACKING_URI",
            format!("file://{}", fx.path("mlruns").display()),
        ),
        ("WANDB_MODE", "offline".to_string()),
        ("WANDB_DIR", wandb_dir.display().to_string()),
        // MLflow 3 keeps its file store behind this opt-in (no database offline here).
        ("MLFLOW_ALLOW_FILE_STORE", "true".to_string()),
    ]
}

/// What each tracker's own package reads back from the fixture's tracker folders
/// (`READ_TRACKERS`).
fn read_trackers(fx: &TrainFixture) -> serde_json::Value {
    let read = std::process::Command::new(rsdeep_e2e::python())
        .args(["-c", READ_TRACKERS])
        .env("MLFLOW_ALLOW_FILE_STORE", "true")
        .arg(fx.path("swanlog"))
        .arg(fx.path("mlruns"))
        .arg(fx.path("wandb"))
        .output()
        .expect("run the tracker reader");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    serde_json::from_slice(&read.stdout).expect("reader JSON")
}

/// (step, value) of `field` in every training row of `out/metrics.jsonl`.
fn logged_rows(fx: &TrainFixture, field: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(fx.path("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|r| (r["step"].as_u64().unwrap(), r[field].as_f64().unwrap()))
        .collect()
}

/// (step, value) pairs one tracker read back for `key`.
fn tracked(logged: &serde_json::Value, tracker: &str, key: &str) -> Vec<(u64, f64)> {
    logged[tracker][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

const TRACKED_KEYS: [(&str, &str); 2] = [
    ("train/loss", "loss"),
    ("train/learning_rate", "learning_rate"),
];

#[test]
fn report_to_swanlab_wandb_and_mlflow_log_every_step_as_metrics_jsonl_offline() {
    let fx = fixture();
    let train_json = fx.train_json("trackers.json", 2);
    let json = train_json.display().to_string();
    let mut launcher = Launcher::start(&tracked_args(&json, &[]), &tracker_envs(&fx));
    let status = launcher.wait(RUN_LIMIT);
    assert!(status.success(), "training failed:\n{}", launcher.output());
    assert!(
        launcher.stderr().contains("swanlab: logging this run"),
        "{}",
        launcher.output()
    );
    let logged = read_trackers(&fx);
    assert_eq!(logged_rows(&fx, "loss").len(), 8);
    for tracker in ["swanlab", "wandb", "mlflow"] {
        for (key, field) in TRACKED_KEYS {
            let expected = logged_rows(&fx, field);
            assert_eq!(tracked(&logged, tracker, key), expected, "{tracker} {key}");
        }
    }
    let params = logged["params"].as_object().expect("MLflow parameters");
    assert!(
        params.len() > 20,
        "the resolved config is the run's parameters"
    );
    assert_eq!(params["rsdeep.world_size"], "2", "{params:?}");
    for key in [
        "train/peak_rss_mib_rank0",
        "train/peak_rss_mib_rank1",
        "train/time_data_s",
        "train/time_forward_backward_s",
        "train/time_optimizer_s",
        "train/skipped_steps",
        "train/grad_norm",
    ] {
        assert!(
            logged["metric_keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == key),
            "MLflow has no {key}: {}",
            logged["metric_keys"]
        );
    }
}

#[test]
fn a_sigterm_mid_run_still_brings_every_step_rank_0_sent_to_each_tracker() {
    let fx = fixture();
    let train_json = fx.train_json("trackers.json", 2);
    let json = train_json.display().to_string();
    let args = tracked_args(&json, &["--max_steps", "500", "--save_steps", "1000"]);
    let envs = tracker_envs(&fx);
    let mut launcher = Launcher::start(&args, &envs);
    rsdeep_e2e::wait_for_step(&launcher, &fx.path("out"), 6, RUN_LIMIT);
    // SAFETY: signalling the launcher child this test started.
    unsafe { libc::kill(launcher.pid(), libc::SIGTERM) };
    let status = launcher.wait(RUN_LIMIT);
    assert!(!status.success(), "a stopped job exits non-zero");
    let swanlog = fx.path("swanlog").display().to_string();
    wait_until_no_sidecar_writes_to(&swanlog);
    let logged = read_trackers(&fx);
    for tracker in ["swanlab", "wandb", "mlflow"] {
        for (key, field) in TRACKED_KEYS {
            let expected = logged_rows(&fx, field);
            let got = tracked(&logged, tracker, key);
            // The step logged as the signal arrived may not have left rank 0.
            assert!(
                got.len() + 1 >= expected.len() && got.len() >= 6,
                "{tracker} {key}: {} of {} steps",
                got.len(),
                expected.len()
            );
            assert_eq!(got[..], expected[..got.len()], "{tracker} {key}");
        }
    }
}

#[test]
fn the_seed_configuration_with_report_to_swanlab_runs_offline_end_to_end() {
    let fx = fixture();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let seed = repo.join("configs/pretrain.json").display().to_string();
    let (tok, corpus, model, out) = (
        fx.path("tok").display().to_string(),
        fx.path("corpus.jsonl").display().to_string(),
        fx.path("model.json").display().to_string(),
        fx.path("out").display().to_string(),
    );
    let args = [
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--master_port",
        "0",
        &seed,
        "--report_to",
        "swanlab",
        "--tokenizer_name",
        &tok,
        "--train_files",
        &corpus,
        "--config_name",
        &model,
        "--block_size",
        "32",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--output_dir",
        &out,
    ];
    let envs: Vec<_> = tracker_envs(&fx)
        .into_iter()
        .filter(|(key, _)| !key.starts_with("MLFLOW") && !key.starts_with("WANDB"))
        .collect();
    let mut launcher = Launcher::start(&args, &envs);
    let status = launcher.wait(RUN_LIMIT);
    assert!(
        status.success(),
        "the seed's configuration failed:\n{}",
        launcher.output()
    );
    let logged = read_trackers(&fx);
    for (key, field) in TRACKED_KEYS {
        let expected = logged_rows(&fx, field);
        assert_eq!(expected.len(), 4, "{key}");
        assert_eq!(tracked(&logged, "swanlab", key), expected, "swanlab {key}");
    }
}

/// Waits (up to a minute) until no tracker sidecar whose SwanLab folder is `swanlog` runs:
/// after the job stops, the sidecar finishes flushing on its own.
fn wait_until_no_sidecar_writes_to(swanlog: &str) {
    let marker = format!("SWANLAB_LOG_DIR={swanlog}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("experiment-tracker sidecar")
                && environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_bytes())
        })
    };
    while running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tracker sidecar still runs a minute after the job stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
