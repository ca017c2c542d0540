//! Shared helpers of the worker's integration tests: the demo data (fetched by
//! scripts/fetch-data.sh when missing), the Python reference
//! (worker/tests/hf_reference.py), and `rerun_alone` for tests that need the process to
//! themselves.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// `$RSDEEP_HOME/data`, default `~/.cache/rsdeep/data`.
pub fn data_dir() -> PathBuf {
    let home = std::env::var("RSDEEP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/rsdeep")
        });
    home.join("data")
}

/// The real Qwen tokenizer directory; runs scripts/fetch-data.sh when it is missing and
/// panics (fails the test) when it still cannot be obtained.
pub fn qwen_tokenizer_dir() -> PathBuf {
    let dir = data_dir().join("tokenizer-qwen");
    if !dir.join("tokenizer.json").is_file() {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-data.sh");
        let status = Command::new("bash").arg(&script).status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "scripts/fetch-data.sh failed ({status:?}): the real Qwen tokenizer is required"
        );
    }
    assert!(
        dir.join("tokenizer.json").is_file(),
        "no tokenizer.json in {}",
        dir.display()
    );
    dir
}

/// The venv python (`$RSDEEP_PYTHON`); panics when it is not set or does not exist.
pub fn python() -> PathBuf {
    let python = std::env::var("RSDEEP_PYTHON")
        .expect("RSDEEP_PYTHON is not set: `source scripts/env.sh` before cargo test");
    let python = PathBuf::from(python);
    assert!(
        python.exists(),
        "RSDEEP_PYTHON={} does not exist",
        python.display()
    );
    python
}

/// Sends `request` to hf_reference.py and returns its JSON answer; panics on failure.
pub fn python_reference(request: &serde_json::Value) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hf_reference.py");
    let mut child = Command::new(python())
        .arg(&script)
        .env("TOKENIZERS_PARALLELISM", "false")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the Python reference");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("writing the request");
    let output = child
        .wait_with_output()
        .expect("running the Python reference");
    assert!(
        output.status.success(),
        "Python reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the Python reference answers JSON")
}

/// Mixed Chinese/English texts that exercise the pre-tokenizer and normalizer.
pub fn mixed_texts() -> Vec<String> {
    [
        "Hello, world! 你好，世界！",
        "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。",
        "The rsdeep launcher starts 8 workers on 2 nodes; rank 3 uses GPU 3.",
        "  leading and trailing spaces   \n\n\ttabs\tand\r\nnewlines  ",
        "数字 12345 和 3.14159，English mixed 中文 without spaces中文English",
        "emoji 🚀🔥 and accents: café naïve e\u{301} Å\u{30a} ﬁ",
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
        "fn main() { println!(\"{}\", 1 + 2); } // code 代码",
        "It's they're we'll I'd've ABC's",
        "",
        "https://example.com/path?q=1&r=2 — en dash – «quotes» “curly”",
        "ﾃｽﾄ 半角 全角ＡＢＣ １２３ 한국어 日本語のテキスト",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs this test binary again on the one test `path` (`module::test_name`), alone on
/// one thread with `env` set and `extra_args` (e.g. `--ignored`), and returns its
/// output: for tests that measure their own process's memory or are killed on purpose,
/// which other tests of this binary must not share.
pub fn rerun_alone(path: &str, env: &[(&str, &str)], extra_args: &[&str]) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    Command::new(exe)
        .args([path, "--exact", "--nocapture", "--test-threads=1"])
        .args(extra_args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("re-running the test binary on {path}: {e}"))
}

/// The value a child printed as `KEY=value` (`key` includes the `=`); panics naming the
/// key and the child's output when it is missing or does not parse.
pub fn printed_value<T: std::str::FromStr>(stdout: &str, key: &str) -> T {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the child printed no {key}: {stdout}"))
}
