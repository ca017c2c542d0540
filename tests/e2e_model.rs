//! The real pretrained model end to end: SmolLM2-135M-Instruct as llama.cpp ships it
//! (GGUF, Q4_1; fetched by `scripts/fetch-model.sh`, which `make test` runs) converted by
//! `rsdeep convert gguf`, then checked against transformers' own GGUF loader by
//! `tests/fixtures/gguf/check_convert.py` (every tensor, the config, token ids, the chat
//! template, logits, greedy generations), and rsdeep's own generation on the converted
//! folder equal to transformers' greedy generation, Chinese and emoji included.

use std::path::{Path, PathBuf};
use std::process::Command;

use rsdeep_e2e::{binary, python};

const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "用一句话介绍长江。",
    "Reply with a happy emoji and one word.",
];

fn gguf_file() -> PathBuf {
    let home = std::env::var_os("RSDEEP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rsdeep")))
        .expect("RSDEEP_HOME or HOME");
    let path = home.join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh (make test does)",
        path.display()
    );
    path
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/gguf")
        .join(name)
}

/// `rsdeep convert gguf <file> <out>`, which must succeed.
fn convert(out: &Path) {
    let output = Command::new(binary("rsdeep"))
        .args(["convert", "gguf"])
        .arg(gguf_file())
        .arg(out)
        .output()
        .expect("run rsdeep convert");
    assert!(
        output.status.success(),
        "rsdeep convert failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// rsdeep's greedy chat answer to `prompt` (the text it streamed, without its stats line).
fn rsdeep_answer(model: &Path, prompt: &str) -> String {
    let output = Command::new(binary("rsdeep"))
        .args(["generate", "--chat", "--max_new_tokens", "32", "--model"])
        .arg(model)
        .args(["--prompt", prompt])
        .output()
        .expect("run rsdeep generate");
    let stdout = String::from_utf8(output.stdout).expect("whole UTF-8 characters only");
    assert!(output.status.success(), "rsdeep generate failed: {stdout}");
    stdout.trim_end().to_string()
}

/// transformers' greedy chat answers to `PROMPTS` on the converted folder.
fn transformers_answers(model: &Path) -> Vec<String> {
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
answers = []
for p in prompts:
    ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
print(json.dumps(answers))
"#;
    let output = Command::new(python())
        .args(["-c", script])
        .arg(model)
        .arg(serde_json::json!(PROMPTS).to_string())
        .output()
        .expect("run transformers");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "transformers generation failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("[]")).unwrap()
}

#[test]
fn the_converted_model_equals_transformers_gguf_loader_and_rsdeep_generates_as_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("smollm2");
    convert(&model);
    let output = Command::new(python())
        .arg(fixture("check_convert.py"))
        .arg(gguf_file())
        .arg(&model)
        .output()
        .expect("run check_convert.py");
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "the conversion differs from transformers' GGUF loader:\n{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = transformers_answers(&model);
    for (prompt, expected) in PROMPTS.iter().zip(&expected) {
        let answer = rsdeep_answer(&model, prompt);
        eprintln!("{prompt} -> {answer}");
        assert_eq!(
            answer.trim(),
            expected.trim(),
            "greedy answer to {prompt:?}"
        );
    }
}

#[test]
fn a_truncated_gguf_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf_file()).unwrap();
    let truncated = dir.path().join("cut.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out");
    let output = Command::new(binary("rsdeep"))
        .args(["convert", "gguf"])
        .arg(&truncated)
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("cut.gguf") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(
        !out.join("model.safetensors").exists(),
        "a failed conversion left weights behind"
    );
}
