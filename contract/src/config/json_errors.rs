//! Reading JSON for the configuration with user-grade errors: syntax errors as
//! `file:line:column: message`, unknown keys with a did-you-mean suggestion and their full
//! dotted path, wrong types naming the key, the expected type and the value found.
//! `ConfigError` (`error.rs`) holds the variants and their wording.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ConfigError;

/// Reads and parses a JSON file; a syntax error points at `file:line:column`.
pub fn read_json_file(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    parse_json_text(path, &text)
}

/// Parses JSON text that came from `path` (used for the message only).
pub fn parse_json_text(path: &Path, text: &str) -> Result<Value, ConfigError> {
    serde_json::from_str(text).map_err(|e| {
        let (line, column) = user_position(text, e.line(), e.column());
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: strip_position_suffix(&e.to_string()),
        }
    })
}

/// serde_json reports column 0 when the error is found just after a newline (e.g. a
/// truncated `tru`); point at the end of the previous line instead, where the typo is.
fn user_position(text: &str, line: usize, column: usize) -> (usize, usize) {
    if column > 0 || line <= 1 {
        return (line, column);
    }
    let previous = text.lines().nth(line - 2).unwrap_or("");
    (line - 1, previous.chars().count())
}

/// serde_json appends " at line L column C" to its messages; we print the position first.
fn strip_position_suffix(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Deserializes `value` into `T`, turning serde's errors into `ConfigError`s whose key is
/// `key_prefix` followed by the path inside `value` (e.g. `deepspeed.zero_optimization.stage`).
pub fn typed_from_value<T: DeserializeOwned>(
    value: Value,
    file: &Path,
    key_prefix: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let inner_path = err.path().to_string();
        let message = err.inner().to_string();
        classify_serde_error(file, &join_key(key_prefix, &inner_path), &message)
    })
}

/// Joins a dotted prefix and a serde_path_to_error path ("." means the root).
pub fn join_key(prefix: &str, path: &str) -> String {
    let path = if path == "." { "" } else { path };
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// Maps serde's message families onto our error variants.
fn classify_serde_error(file: &Path, key: &str, message: &str) -> ConfigError {
    let quoted = backticked_words(message);
    if message.starts_with("unknown field") {
        let unknown = quoted.first().cloned().unwrap_or_default();
        let candidates: Vec<&str> = quoted.iter().skip(1).map(String::as_str).collect();
        // serde_path_to_error reports the path of the map holding the unknown key (or
        // the unknown key itself, depending on the deserializer): normalise to parent.key.
        let parent = key
            .strip_suffix(&unknown)
            .map(|p| p.trim_end_matches('.'))
            .unwrap_or(key);
        return ConfigError::UnknownKey {
            file: file.to_path_buf(),
            key: join_key(parent, &unknown),
            suggestion: did_you_mean(&unknown, &candidates),
            note: None,
        };
    }
    if message.starts_with("unknown variant") {
        let found = quoted.first().cloned().unwrap_or_default();
        let candidates: Vec<&str> = quoted.iter().skip(1).map(String::as_str).collect();
        let hint = did_you_mean(&found, &candidates)
            .map(|s| format!(" (did you mean \"{s}\"?)"))
            .unwrap_or_default();
        return ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            message: format!(
                "\"{found}\" is not one of: {}{hint}",
                candidates
                    .iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    if message.starts_with("invalid type") || message.starts_with("invalid value") {
        let auto_hint = if message.contains("string \"auto\"") {
            " (\"auto\" is accepted only for the keys Hugging Face fills from the training arguments)"
        } else {
            ""
        };
        return ConfigError::WrongType {
            file: file.to_path_buf(),
            key: key.to_string(),
            message: format!("{}{auto_hint}", humanize_expected(message)),
        };
    }
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        message: humanize_expected(message),
    }
}

/// The words serde puts between backticks, in order.
fn backticked_words(message: &str) -> Vec<String> {
    message
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, w)| w.to_string())
        .collect()
}

/// Rewrites Rust type names in serde's "expected ..." into words a user knows.
fn humanize_expected(message: &str) -> String {
    const NAMES: [(&str, &str); 12] = [
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected u8", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected a string", "expected a string"),
        ("expected a boolean", "expected true or false"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected an object"),
        ("expected struct ", "expected an object "),
        (
            "expected an array of length 2",
            "expected a list of 2 numbers",
        ),
    ];
    NAMES
        .iter()
        .fold(message.to_string(), |m, (from, to)| m.replace(from, to))
}

/// The closest candidate to `unknown`, if it is close enough to be a plausible typo.
pub fn did_you_mean(unknown: &str, candidates: &[&str]) -> Option<String> {
    let lowered = unknown.to_lowercase();
    candidates
        .iter()
        .map(|c| {
            (
                strsim::normalized_damerau_levenshtein(&lowered, &c.to_lowercase()),
                c,
            )
        })
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        stage3_prefetch_bucket_size: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        zero_optimization: Option<Inner>,
        steps: Option<u64>,
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let err =
            parse_json_text(Path::new("t.json"), "{\n  \"a\": 1,\n  \"b\": ,\n}").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("t.json:3:8: "), "{text}");
        assert!(!text.contains(" at line "), "{text}");
    }

    #[test]
    fn nested_unknown_key_has_full_path_and_suggestion() {
        let v = serde_json::json!({"zero_optimization": {"stage3_prefetch_bucket_sise": 1}});
        let err = typed_from_value::<Outer>(v, Path::new("ds.json"), "deepspeed").unwrap_err();
        assert_eq!(
            err.to_string(),
            "ds.json: unknown key \"deepspeed.zero_optimization.stage3_prefetch_bucket_sise\" \
             (did you mean \"stage3_prefetch_bucket_size\"?)"
        );
    }

    #[test]
    fn wrong_type_names_key_expected_type_and_value() {
        let v = serde_json::json!({"steps": "ten"});
        let err = typed_from_value::<Outer>(v, Path::new("t.json"), "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.json: key \"steps\": invalid type: string \"ten\", expected a non-negative integer"
        );
    }

    #[test]
    fn auto_where_not_fillable_says_so() {
        let v = serde_json::json!({"steps": "auto"});
        let err = typed_from_value::<Outer>(v, Path::new("t.json"), "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"auto\" is accepted only for the keys Hugging Face fills"),
            "{err}"
        );
    }

    #[test]
    fn did_you_mean_rejects_far_candidates() {
        assert_eq!(
            did_you_mean("deepsped", &["deepspeed", "seed"]).as_deref(),
            Some("deepspeed")
        );
        assert_eq!(did_you_mean("zzzzzz", &["deepspeed", "seed"]), None);
    }
}
