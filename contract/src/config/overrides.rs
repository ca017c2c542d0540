//! Command-line overrides after train.json: `rsdeep train.json --learning_rate 3e-4
//! --output_dir out2 --bf16`. Each `--key value` (or `--key=value`) replaces that training
//! argument, typed by the key's type; a flag with no value means `true`;
//! `--deepspeed.<path> value` sets a key inside the DeepSpeed config.

use serde_json::{Map, Value};

use super::error::ConfigError;
use super::json_errors::did_you_mean;
use super::train_args::TrainingArgs;

/// One parsed `--key value` pair; `value` is `None` for a bare flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: Option<String>,
}

/// Splits `["--a", "1", "--flag", "--b=2"]` into overrides.
pub fn parse_overrides(tokens: &[String]) -> Result<Vec<Override>, ConfigError> {
    let mut parsed = Vec::new();
    let mut index = 0;
    while index < tokens.len() {
        let token = &tokens[index];
        let Some(body) = token.strip_prefix("--").filter(|b| !b.is_empty()) else {
            return Err(ConfigError::Override {
                flag: token.clone(),
                message: "expected --key value (overrides come after the train.json path)"
                    .to_string(),
            });
        };
        index += 1;
        if let Some((key, value)) = body.split_once('=') {
            parsed.push(Override {
                key: key.to_string(),
                value: Some(value.to_string()),
            });
            continue;
        }
        let value = tokens
            .get(index)
            .filter(|next| !next.starts_with("--"))
            .cloned();
        if value.is_some() {
            index += 1;
        }
        parsed.push(Override {
            key: body.to_string(),
            value,
        });
    }
    Ok(parsed)
}

/// The training-argument names (what `--key` may be), including serde aliases.
pub fn training_arg_names() -> Vec<String> {
    let mut names: Vec<String> = match serde_json::to_value(TrainingArgs::default()) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    names.push("evaluation_strategy".to_string());
    names
}

/// Applies training-argument overrides to the raw train.json object.
pub fn apply_to_training_args(
    raw: &mut Map<String, Value>,
    overrides: &[Override],
) -> Result<(), ConfigError> {
    let names = training_arg_names();
    for item in overrides
        .iter()
        .filter(|o| !o.key.starts_with("deepspeed."))
    {
        if !names.contains(&item.key) {
            let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
            let hint = did_you_mean(&item.key, &candidates)
                .map(|s| format!(" (did you mean \"--{s}\"?)"))
                .unwrap_or_default();
            return Err(ConfigError::Override {
                flag: format!("--{}", item.key),
                message: format!("unknown training argument{hint}"),
            });
        }
        let value = typed_value(&item.key, item.value.as_deref())?;
        raw.insert(canonical_key(&item.key).to_string(), value);
    }
    Ok(())
}

/// Hugging Face's older spelling maps to the current key, so a file and an override
/// using different spellings do not collide.
pub fn canonical_key(key: &str) -> &str {
    match key {
        "evaluation_strategy" => "eval_strategy",
        other => other,
    }
}

/// Renames older spellings in the raw train.json (both spellings in one file stay an
/// error: serde reports the duplicate).
pub fn canonicalize_keys(raw: &mut Map<String, Value>) {
    if !raw.contains_key("eval_strategy")
        && let Some(value) = raw.remove("evaluation_strategy")
    {
        raw.insert("eval_strategy".to_string(), value);
    }
}

/// Applies `--deepspeed.a.b value` overrides to the raw DeepSpeed config (validated later
/// with the rest of it, so unknown keys there are reported with their path).
pub fn apply_to_deepspeed(ds: &mut Value, overrides: &[Override]) -> Result<(), ConfigError> {
    for item in overrides {
        let Some(path) = item.key.strip_prefix("deepspeed.") else {
            continue;
        };
        let value = item
            .value
            .as_deref()
            .map_or(Value::Bool(true), json_or_string);
        set_dotted(ds, path, value).map_err(|message| ConfigError::Override {
            flag: format!("--{}", item.key),
            message,
        })?;
    }
    Ok(())
}

fn set_dotted(root: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let leaf = parts.pop().filter(|l| !l.is_empty()).ok_or("empty key")?;
    let mut node = root;
    for part in parts {
        let map = node
            .as_object_mut()
            .ok_or(format!("\"{part}\" is not inside an object"))?;
        node = map.entry(part).or_insert_with(|| Value::Object(Map::new()));
    }
    let map = node
        .as_object_mut()
        .ok_or(format!("cannot set \"{leaf}\": parent is not an object"))?;
    map.insert(leaf.to_string(), value);
    Ok(())
}

/// A value written on the command line as JSON when it parses, else as a string.
fn json_or_string(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Types `text` by the key's type: the first candidate (JSON reading, then the plain
/// string) that the training arguments accept for that key alone.
fn typed_value(key: &str, text: Option<&str>) -> Result<Value, ConfigError> {
    let Some(text) = text else {
        return accept(key, Value::Bool(true)).ok_or_else(|| ConfigError::Override {
            flag: format!("--{key}"),
            message: "needs a value (only true/false keys may be given as a bare flag)".to_string(),
        });
    };
    let as_json = serde_json::from_str::<Value>(text).ok();
    let candidates = as_json.into_iter().chain([Value::String(text.to_string())]);
    let mut first_error = None;
    for candidate in candidates {
        let probe = Value::Object(Map::from_iter([(key.to_string(), candidate.clone())]));
        match serde_json::from_value::<TrainingArgs>(probe) {
            Ok(_) => return Ok(candidate),
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    Err(ConfigError::Override {
        flag: format!("--{key}"),
        message: format!(
            "value {text:?} does not fit: {}",
            first_error.unwrap_or_default()
        ),
    })
}

fn accept(key: &str, value: Value) -> Option<Value> {
    let probe = Value::Object(Map::from_iter([(key.to_string(), value.clone())]));
    serde_json::from_value::<TrainingArgs>(probe)
        .ok()
        .map(|_| value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn applied(tokens: &[&str]) -> Result<Map<String, Value>, ConfigError> {
        let mut raw = Map::new();
        apply_to_training_args(&mut raw, &parse_overrides(&strings(tokens))?)?;
        Ok(raw)
    }

    #[test]
    fn values_are_typed_by_the_key() {
        let raw = applied(&["--learning_rate", "3e-4", "--output_dir", "123", "--seed=7"]).unwrap();
        assert_eq!(raw["learning_rate"], json!(3e-4));
        assert_eq!(raw["output_dir"], json!("123"));
        assert_eq!(raw["seed"], json!(7));
    }

    #[test]
    fn bare_flag_means_true_and_explicit_false_works() {
        let raw = applied(&["--bf16", "--gradient_checkpointing", "false"]).unwrap();
        assert_eq!(raw["bf16"], json!(true));
        assert_eq!(raw["gradient_checkpointing"], json!(false));
    }

    #[test]
    fn list_keys_take_one_string_or_json_list() {
        let raw = applied(&[
            "--train_files",
            "a.jsonl",
            "--lora_target_modules",
            "[\"q_proj\",\"o_proj\"]",
        ])
        .unwrap();
        assert_eq!(raw["train_files"], json!("a.jsonl"));
        assert_eq!(raw["lora_target_modules"], json!(["q_proj", "o_proj"]));
    }

    #[test]
    fn unknown_key_suggests_the_closest() {
        let err = applied(&["--learning_rat", "1"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "command-line override --learning_rat: unknown training argument (did you mean \"--learning_rate\"?)"
        );
    }

    #[test]
    fn wrong_type_and_missing_value_are_errors() {
        let err = applied(&["--per_device_train_batch_size", "big"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--per_device_train_batch_size") && err.contains("\"big\""),
            "{err}"
        );
        let err = applied(&["--output_dir"]).unwrap_err().to_string();
        assert!(err.contains("needs a value"), "{err}");
    }

    #[test]
    fn old_eval_spelling_overrides_the_new_key() {
        let mut raw = Map::from_iter([("evaluation_strategy".to_string(), json!("steps"))]);
        canonicalize_keys(&mut raw);
        let parsed = parse_overrides(&strings(&["--evaluation_strategy", "no"])).unwrap();
        apply_to_training_args(&mut raw, &parsed).unwrap();
        assert_eq!(
            raw,
            Map::from_iter([("eval_strategy".to_string(), json!("no"))])
        );
    }

    #[test]
    fn positional_after_overrides_is_refused() {
        assert!(parse_overrides(&strings(&["stray"])).is_err());
    }

    #[test]
    fn deepspeed_paths_are_set_inside_the_section() {
        let mut ds = json!({"zero_optimization": {"stage": 2}});
        let parsed =
            parse_overrides(&strings(&["--deepspeed.zero_optimization.stage", "3"])).unwrap();
        apply_to_deepspeed(&mut ds, &parsed).unwrap();
        assert_eq!(ds["zero_optimization"]["stage"], json!(3));
    }
}
