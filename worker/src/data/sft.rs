//! The SFT dataset: chat JSONL in the three common shapes, rendered with the tokenizer's
//! chat template, labels masked to the assistant turns, truncated, optionally packed.
//!
//! Contract:
//! - Shapes (detected per line): `{"messages": [{"role", "content"}]}`; Alpaca
//!   `{"instruction", "input", "output"}` (+ optional `"system"`; the user turn is the
//!   instruction, then `"\n"` and the input when it is not empty); ShareGPT
//!   `{"conversations": [{"from", "value"}]}` (`human`/`user` -> user, `gpt`/`assistant`/
//!   `model`/`chatgpt` -> assistant, `system` -> system); TRL's prompt/completion rows
//!   `{"prompt", "completion"}`, as text or as message lists (text: `tokenizer(prompt +
//!   completion + eos)`, the prompt being `tokenizer(prompt)`; messages: the template over
//!   prompt + completion, the prompt being the template over the prompt with a generation
//!   prompt); and already tokenized rows
//!   `{"input_ids": [...], "labels": [...]}` (the shape TRL and the Trainer take once a
//!   dataset is tokenized; `labels` of the same length, -100 where not trained, default
//!   `input_ids`), used as they are.
//! - Labels of chats (`assistant_only_loss`, rsdeep's and LLaMA-Factory's default; TRL's
//!   default is every token, `assistant_only_loss: false`): -100 everywhere except the
//!   tokens of each assistant turn's content and the
//!   end-of-turn token that follows it (`<|im_end|>` for ChatML, else the EOS token). The
//!   spans are found in the rendered text by locating every message's content in order
//!   (so templates that are not prefix-stable, like Qwen3's, work too) and mapped to
//!   tokens by byte offsets: a token is labelled when it starts inside a span.
//! - Labels of prompt/completion rows (`completion_only_loss`, TRL's default): -100 over
//!   the prompt's tokens; every token without it.
//! - Labels are aligned with `input_ids` (the model shifts them), as in transformers.
//! - A malformed line, or one the template cannot render, fails as `file:line: ...`; with
//!   `skip_bad_lines` it is counted in `skipped_lines` instead.
//! - Truncation keeps the first `max_seq_length` tokens. Packing concatenates examples in
//!   order into blocks of at most `max_seq_length`; `segment_ids` number them 1, 2, ...
//!   within a block so attention and positions can restart per example.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// The label value the loss ignores.
pub const IGNORE_INDEX: i64 = -100;

/// End-of-turn markers tried after an assistant content, before the EOS token.
const TURN_END_MARKERS: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<|end|>"];

/// One training example (or one packed block of several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `IGNORE_INDEX` outside assistant turns.
    pub labels: Vec<i64>,
    /// Same length; which example of a packed block each token belongs to (1-based).
    pub segment_ids: Vec<u32>,
}

impl SftExample {
    /// One example on its own (a single segment).
    pub fn unpacked(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        let segment_ids = vec![1; input_ids.len()];
        SftExample {
            input_ids,
            labels,
            segment_ids,
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// How to read and shape the SFT data.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub max_seq_length: usize,
    pub packing: bool,
    pub skip_bad_lines: bool,
    /// Chats: train on the assistant turns only (else on every token).
    pub assistant_only_loss: bool,
    /// Prompt/completion rows: train on the completion only (else on every token).
    pub completion_only_loss: bool,
}

/// The loaded SFT examples (packed blocks when `packing`).
#[derive(Debug, Clone)]
pub struct SftDataset {
    pub examples: Vec<SftExample>,
    pub skipped_lines: u64,
    pub truncated: u64,
}

impl SftDataset {
    /// Reads, renders and tokenizes every file in order.
    pub fn load(
        files: &[impl AsRef<Path>],
        tokenizer: &Tokenizer,
        config: &SftConfig,
    ) -> Result<Self> {
        if config.max_seq_length == 0 {
            return Err(Error::Config("max_seq_length must be positive".into()));
        }
        let mut examples = Vec::new();
        let (mut skipped_lines, mut truncated) = (0, 0);
        for path in files {
            let path = path.as_ref();
            for (number, row) in read_rows(path, config.skip_bad_lines, &mut skipped_lines)? {
                let tokenized = match row {
                    SftRow::Chat(messages) => tokenize_conversation(tokenizer, &messages)
                        .map(|e| unmask_unless(e, config.assistant_only_loss)),
                    SftRow::PromptCompletion { prompt, completion } => {
                        tokenize_prompt_completion(tokenizer, &prompt, &completion)
                            .map(|e| unmask_unless(e, config.completion_only_loss))
                    }
                    SftRow::Tokens(example) => Ok(example),
                };
                let mut example = match tokenized {
                    Ok(example) => example,
                    Err(_) if config.skip_bad_lines => {
                        skipped_lines += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(Error::Data(format!("{}:{number}: {e}", path.display())));
                    }
                };
                truncated += u64::from(truncate(&mut example, config.max_seq_length));
                examples.push(example);
            }
        }
        if skipped_lines > 0 {
            tracing::warn!(
                skipped = skipped_lines,
                "skipped malformed SFT lines (skip_bad_lines)"
            );
        }
        if examples.is_empty() {
            return Err(Error::Data(
                "empty input: no conversations in the SFT files".into(),
            ));
        }
        if config.packing {
            examples = pack(examples, config.max_seq_length);
        }
        Ok(SftDataset {
            examples,
            skipped_lines,
            truncated,
        })
    }
}

/// One SFT line: a conversation to render, or an example already tokenized.
#[derive(Debug)]
pub enum SftRow {
    Chat(Vec<ChatMessage>),
    PromptCompletion { prompt: Turns, completion: Turns },
    Tokens(SftExample),
}

/// One side of a prompt/completion row.
#[derive(Debug)]
pub enum Turns {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// All rows of a JSONL file with their line numbers.
fn read_rows(path: &Path, skip_bad_lines: bool, skipped: &mut u64) -> Result<Vec<(usize, SftRow)>> {
    let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut conversations = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| Error::io(format!("{}:{number}", path.display()), e))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(&line) {
            Ok(row) => conversations.push((number, row)),
            Err(_) if skip_bad_lines => *skipped += 1,
            Err(e) => return Err(Error::Data(format!("{}:{number}: {e}", path.display()))),
        }
    }
    Ok(conversations)
}

/// One JSONL line in any of the four shapes.
pub fn parse_row(line: &str) -> std::result::Result<SftRow, String> {
    let value: Json = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if let Some(ids) = value.get("input_ids") {
        return tokenized_row(ids, value.get("labels")).map(SftRow::Tokens);
    }
    if let (Some(prompt), Some(completion)) = (value.get("prompt"), value.get("completion")) {
        let (prompt, completion) = (
            turns_of(prompt, "prompt")?,
            turns_of(completion, "completion")?,
        );
        if matches!(prompt, Turns::Text(_)) != matches!(completion, Turns::Text(_)) {
            return Err(
                "\"prompt\" and \"completion\" must both be text or both message lists".into(),
            );
        }
        return Ok(SftRow::PromptCompletion { prompt, completion });
    }
    conversation(&value).map(SftRow::Chat)
}

/// A prompt or completion: a string, or a list of `{"role", "content"}` messages.
fn turns_of(value: &Json, key: &str) -> std::result::Result<Turns, String> {
    match value {
        Json::String(text) => Ok(Turns::Text(text.clone())),
        Json::Array(_) => turns(value, "role", "content", |r| Some(r.to_string()))
            .map(Turns::Messages)
            .map_err(|e| format!("\"{key}\": {e}")),
        _ => Err(format!("\"{key}\" is neither text nor a list of messages")),
    }
}

/// Every label set to its token when `keep_mask` is false.
fn unmask_unless(mut example: SftExample, keep_mask: bool) -> SftExample {
    if !keep_mask {
        example.labels = example.input_ids.iter().map(|&id| i64::from(id)).collect();
    }
    example
}

/// TRL's prompt/completion tokenization: the completion labelled, the prompt masked.
pub fn tokenize_prompt_completion(
    tokenizer: &Tokenizer,
    prompt: &Turns,
    completion: &Turns,
) -> Result<SftExample> {
    let (prompt_ids, input_ids) = match (prompt, completion) {
        (Turns::Text(prompt), Turns::Text(completion)) => {
            let eos = tokenizer
                .special_tokens()
                .eos_token
                .clone()
                .unwrap_or_default();
            let ending = if completion.ends_with(&eos) {
                ""
            } else {
                eos.as_str()
            };
            (
                tokenizer.encode(prompt, true)?,
                tokenizer.encode(&format!("{prompt}{completion}{ending}"), true)?,
            )
        }
        (Turns::Messages(prompt), Turns::Messages(completion)) => {
            let all: Vec<ChatMessage> = prompt.iter().chain(completion).cloned().collect();
            (
                tokenizer.encode(&tokenizer.apply_chat_template(prompt, true)?, false)?,
                tokenizer.encode(&tokenizer.apply_chat_template(&all, false)?, false)?,
            )
        }
        _ => {
            return Err(Error::Data(
                "prompt and completion must both be text or both message lists".into(),
            ));
        }
    };
    let boundary = prompt_ids.len().min(input_ids.len());
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i < boundary {
                IGNORE_INDEX
            } else {
                i64::from(id)
            }
        })
        .collect();
    Ok(SftExample::unpacked(input_ids, labels))
}

/// One JSONL line in any of the three chat shapes, as chat messages.
pub fn parse_conversation(line: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let value: Json = serde_json::from_str(line).map_err(|e| e.to_string())?;
    conversation(&value)
}

/// `{"input_ids", "labels"?}` as an example.
fn tokenized_row(ids: &Json, labels: Option<&Json>) -> std::result::Result<SftExample, String> {
    let input_ids: Vec<u32> = serde_json::from_value(ids.clone())
        .map_err(|e| format!("\"input_ids\" is not a list of token ids: {e}"))?;
    let labels: Vec<i64> = match labels {
        Some(labels) => serde_json::from_value(labels.clone())
            .map_err(|e| format!("\"labels\" is not a list of integers: {e}"))?,
        None => input_ids.iter().map(|&id| i64::from(id)).collect(),
    };
    if input_ids.is_empty() || labels.len() != input_ids.len() {
        return Err(format!(
            "\"input_ids\" ({} ids) must be non-empty and as long as \"labels\" ({})",
            input_ids.len(),
            labels.len()
        ));
    }
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Err("every label is -100: the example trains nothing".into());
    }
    Ok(SftExample::unpacked(input_ids, labels))
}

fn conversation(value: &Json) -> std::result::Result<Vec<ChatMessage>, String> {
    let messages = if let Some(list) = value.get("messages") {
        turns(list, "role", "content", |r| Some(r.to_string()))?
    } else if let Some(list) = value.get("conversations") {
        turns(list, "from", "value", sharegpt_role)?
    } else if value.get("instruction").is_some() {
        alpaca(value)?
    } else {
        return Err(
            "no \"messages\", \"conversations\", \"instruction\" or \"input_ids\" field".into(),
        );
    };
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant turn".into());
    }
    Ok(messages)
}

fn turns(
    list: &Json,
    role_key: &str,
    content_key: &str,
    map_role: fn(&str) -> Option<String>,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let items = list
        .as_array()
        .ok_or_else(|| "the turn list is not an array".to_string())?;
    items
        .iter()
        .enumerate()
        .map(|(i, turn)| {
            let role = string_field(turn, role_key).map_err(|e| format!("turn {i}: {e}"))?;
            let content = string_field(turn, content_key).map_err(|e| format!("turn {i}: {e}"))?;
            let role =
                map_role(&role).ok_or_else(|| format!("turn {i}: unknown role \"{role}\""))?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn sharegpt_role(from: &str) -> Option<String> {
    let role = match from {
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" | "chatgpt" | "bard" => "assistant",
        "system" => "system",
        _ => return None,
    };
    Some(role.to_string())
}

fn alpaca(value: &Json) -> std::result::Result<Vec<ChatMessage>, String> {
    let instruction = string_field(value, "instruction")?;
    let input = optional_string(value, "input")?;
    let output = string_field(value, "output")?;
    let mut messages = Vec::new();
    if let Some(system) = optional_string(value, "system")?.filter(|s| !s.is_empty()) {
        messages.push(ChatMessage::new("system", system));
    }
    let user = match input.filter(|s| !s.is_empty()) {
        Some(input) => format!("{instruction}\n{input}"),
        None => instruction,
    };
    messages.push(ChatMessage::new("user", user));
    messages.push(ChatMessage::new("assistant", output));
    Ok(messages)
}

fn string_field(value: &Json, key: &str) -> std::result::Result<String, String> {
    optional_string(value, key)?.ok_or_else(|| format!("missing field \"{key}\""))
}

fn optional_string(value: &Json, key: &str) -> std::result::Result<Option<String>, String> {
    match value.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("field \"{key}\" is not a string")),
    }
}

/// Renders `messages` with the chat template and labels the assistant spans.
pub fn tokenize_conversation(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<SftExample> {
    let text = tokenizer.apply_chat_template(messages, false)?;
    let spans = assistant_spans(
        &text,
        messages,
        tokenizer.special_tokens().eos_token.as_deref(),
    )?;
    let encoding = tokenizer
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
    let input_ids = encoding.get_ids().to_vec();
    let labels = encoding
        .get_offsets()
        .iter()
        .zip(&input_ids)
        .map(|(&(start, _), &id)| {
            if spans.iter().any(|s| s.contains(&start)) {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(SftExample::unpacked(input_ids, labels))
}

/// Byte ranges of the rendered `text` that are trained: each assistant content plus the
/// end-of-turn marker right after it.
pub fn assistant_spans(
    text: &str,
    messages: &[ChatMessage],
    eos_token: Option<&str>,
) -> Result<Vec<Range<usize>>> {
    let mut cursor = 0;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let found = text[cursor..]
            .find(message.content.as_str())
            .ok_or_else(|| {
                Error::Data(format!(
                    "message {i} ({}) not found in the rendered chat template",
                    message.role
                ))
            })?;
        let start = cursor + found;
        let mut end = start + message.content.len();
        if message.role == "assistant" {
            let rest = &text[end..];
            let marker = TURN_END_MARKERS
                .iter()
                .copied()
                .chain(eos_token)
                .find(|m| !m.is_empty() && rest.starts_with(m));
            end += marker.map_or(0, str::len);
            spans.push(start..end);
        }
        cursor = end;
    }
    Ok(spans)
}

/// Keeps the first `max_len` tokens; true when something was cut.
fn truncate(example: &mut SftExample, max_len: usize) -> bool {
    if example.len() <= max_len {
        return false;
    }
    example.input_ids.truncate(max_len);
    example.labels.truncate(max_len);
    example.segment_ids.truncate(max_len);
    true
}

/// Concatenates examples in order into blocks of at most `max_len` tokens, numbering
/// the examples of each block 1, 2, ... in `segment_ids`.
pub fn pack(examples: Vec<SftExample>, max_len: usize) -> Vec<SftExample> {
    let mut blocks = Vec::new();
    let mut current = SftExample {
        input_ids: Vec::new(),
        labels: Vec::new(),
        segment_ids: Vec::new(),
    };
    let mut segment = 0;
    for example in examples {
        if !current.is_empty() && current.len() + example.len() > max_len {
            blocks.push(std::mem::replace(
                &mut current,
                SftExample {
                    input_ids: Vec::new(),
                    labels: Vec::new(),
                    segment_ids: Vec::new(),
                },
            ));
            segment = 0;
        }
        segment += 1;
        current.input_ids.extend_from_slice(&example.input_ids);
        current.labels.extend_from_slice(&example.labels);
        current
            .segment_ids
            .extend(std::iter::repeat_n(segment, example.len()));
    }
    if !current.is_empty() {
        blocks.push(current);
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenized_rows_are_taken_as_they_are_and_checked() {
        let row = parse_row(r#"{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}"#).unwrap();
        let SftRow::Tokens(example) = row else {
            panic!("expected a tokenized row")
        };
        assert_eq!(example.input_ids, vec![5, 6, 7]);
        assert_eq!(example.labels, vec![IGNORE_INDEX, 6, 7]);
        let SftRow::Tokens(all) = parse_row(r#"{"input_ids": [5, 6]}"#).unwrap() else {
            panic!("expected a tokenized row")
        };
        assert_eq!(all.labels, vec![5, 6]);
        let short = parse_row(r#"{"input_ids": [5, 6], "labels": [6]}"#).unwrap_err();
        assert!(short.contains("as long as"), "{short}");
        let none = parse_row(r#"{"input_ids": [5], "labels": [-100]}"#).unwrap_err();
        assert!(none.contains("trains nothing"), "{none}");
    }

    #[test]
    fn three_shapes_parse_to_the_same_roles() {
        let messages = parse_conversation(
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#,
        )
        .unwrap();
        let sharegpt = parse_conversation(
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
        )
        .unwrap();
        let alpaca = parse_conversation(r#"{"instruction":"q","input":"","output":"a"}"#).unwrap();
        assert_eq!(messages, sharegpt);
        assert_eq!(messages, alpaca);
        let with_input =
            parse_conversation(r#"{"instruction":"q","input":"x","output":"a","system":"s"}"#)
                .unwrap();
        assert_eq!(with_input[0], ChatMessage::new("system", "s"));
        assert_eq!(with_input[1].content, "q\nx");
    }

    #[test]
    fn bad_shapes_are_explained() {
        assert!(
            parse_conversation(r#"{"text":"x"}"#)
                .unwrap_err()
                .contains("no \"messages\"")
        );
        assert!(
            parse_conversation(r#"{"messages":[{"role":"user","content":"q"}]}"#)
                .unwrap_err()
                .contains("no assistant")
        );
        assert!(
            parse_conversation(r#"{"conversations":[{"from":"alien","value":"q"}]}"#)
                .unwrap_err()
                .contains("unknown role")
        );
    }

    #[test]
    fn spans_cover_assistant_content_and_end_marker() {
        let text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n";
        let messages = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "hi"),
        ];
        let spans = assistant_spans(text, &messages, None).unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(&text[spans[0].clone()], "hi<|im_end|>");
        assert!(
            spans[0].start > 30,
            "the user's identical 'hi' is not the span"
        );
    }

    #[test]
    fn packing_numbers_segments_and_respects_the_limit() {
        let example = |n: usize| SftExample {
            input_ids: vec![7; n],
            labels: vec![IGNORE_INDEX; n],
            segment_ids: vec![1; n],
        };
        let blocks = pack(vec![example(3), example(4), example(5), example(2)], 8);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].segment_ids, vec![1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(blocks[1].segment_ids, vec![1, 1, 1, 1, 1, 2, 2]);
    }
}
