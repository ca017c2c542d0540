//! The rsdeep tokenizer: a Hugging Face `tokenizer.json` (through the `tokenizers` crate)
//! plus `tokenizer_config.json` (special tokens, `chat_template`), as transformers'
//! `AutoTokenizer` reads a model directory.
//!
//! Contract: ids are exactly those of Python `tokenizers` for the same tokenizer.json, and
//! chat rendering is byte-identical to `apply_chat_template` (worker/tests/tokenizer_parity.rs).
//! `save` writes a directory `AutoTokenizer.from_pretrained` loads. Training a small
//! byte-level BPE lives in `train`, its command line in `cli`.

pub mod chat_template;
pub mod cli;
pub mod train;

use std::path::Path;

use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};
pub use chat_template::{CHATML_TEMPLATE, ChatMessage, ChatTemplate, TemplateTokens};
pub use train::train_bpe;

/// A loaded tokenizer: the encoder, its special tokens and its chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: Map<String, Json>,
    tokens: TemplateTokens,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    bos_id: Option<u32>,
    chat_template: ChatTemplate,
    has_own_template: bool,
    fingerprint: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja` (transformers 5 writes the template there; it wins).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&json_path)
            .map_err(|e| Error::io(format!("reading {}", json_path.display()), e))?;
        let fingerprint = sha256_hex(&bytes);
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json_path.display())))?;
        let config = read_config(&dir.join("tokenizer_config.json"))?;
        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.exists() {
            Some(read_text(&jinja_path)?)
        } else {
            template_from_config(&config)
        };
        Self::assemble(inner, config, template, fingerprint)
    }

    /// Builds from an encoder, a tokenizer_config map and an optional template text.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        config: Map<String, Json>,
        template: Option<String>,
    ) -> Result<Self> {
        let json = inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("serializing tokenizer.json: {e}")))?;
        let fingerprint = sha256_hex(json.as_bytes());
        Self::assemble(inner, config, template, fingerprint)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        config: Map<String, Json>,
        template: Option<String>,
        fingerprint: String,
    ) -> Result<Self> {
        let tokens = TemplateTokens {
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
            pad_token: special_token(&config, "pad_token"),
            unk_token: special_token(&config, "unk_token"),
        };
        let id_of = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let (bos_id, eos_id, pad_id) = (
            id_of(&tokens.bos_token),
            id_of(&tokens.eos_token),
            id_of(&tokens.pad_token),
        );
        let has_own_template = template.is_some();
        let source = template.unwrap_or_else(|| CHATML_TEMPLATE.to_string());
        let chat_template = ChatTemplate::new(&source, tokens.clone())?;
        Ok(Tokenizer {
            inner,
            config,
            tokens,
            eos_id,
            pad_id,
            bos_id,
            chat_template,
            has_own_template,
            fingerprint,
        })
    }

    /// Token ids of `text`; `add_special` applies the post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of each text, encoded in parallel (rayon).
    pub fn encode_batch(&self, texts: &[&str], add_special: bool) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.to_vec();
        let encodings = self
            .inner
            .encode_batch_fast(inputs, add_special)
            .map_err(|e| Error::Tokenizer(format!("encode_batch: {e}")))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Number of ids, added tokens included (the embedding needs at least this many rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End-of-sequence id (`eos_token` of tokenizer_config.json).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Padding id; falls back to the EOS id, as HF training scripts do.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id.or(self.eos_id)
    }

    /// Beginning-of-sequence id, if the tokenizer has one (Qwen2 has none).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The special tokens as strings.
    pub fn special_tokens(&self) -> &TemplateTokens {
        &self.tokens
    }

    /// The chat template in use (the tokenizer's own, or the built-in ChatML).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat_template
    }

    /// Whether the tokenizer shipped its own chat template.
    pub fn has_own_chat_template(&self) -> bool {
        self.has_own_template
    }

    /// Renders a conversation as transformers' `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat_template.render(messages, add_generation_prompt)
    }

    /// sha256 of the tokenizer.json bytes (of its serialization when built in memory):
    /// part of the data cache key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes tokenizer.json, tokenizer_config.json (with the chat template) and
    /// special_tokens_map.json, loadable by `AutoTokenizer.from_pretrained(dir)`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        self.inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| Error::Tokenizer(format!("saving tokenizer.json: {e}")))?;
        let mut config = self.config.clone();
        config.insert(
            "chat_template".into(),
            Json::String(self.chat_template.source().to_string()),
        );
        write_json(&dir.join("tokenizer_config.json"), &Json::Object(config))?;
        write_json(
            &dir.join("special_tokens_map.json"),
            &self.special_tokens_map(),
        )
    }

    fn special_tokens_map(&self) -> Json {
        let mut map = Map::new();
        let named = [
            ("bos_token", &self.tokens.bos_token),
            ("eos_token", &self.tokens.eos_token),
            ("pad_token", &self.tokens.pad_token),
            ("unk_token", &self.tokens.unk_token),
        ];
        for (name, token) in named {
            if let Some(token) = token {
                map.insert(name.into(), Json::String(token.clone()));
            }
        }
        Json::Object(map)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// tokenizer_config.json as a map; a missing file is an empty config.
fn read_config(path: &Path) -> Result<Map<String, Json>> {
    if !path.exists() {
        return Ok(Map::new());
    }
    let text = read_text(path)?;
    match serde_json::from_str(&text) {
        Ok(Json::Object(map)) => Ok(map),
        Ok(_) => Err(Error::Tokenizer(format!(
            "{}: not a JSON object",
            path.display()
        ))),
        Err(e) => Err(Error::Tokenizer(format!("{}: {e}", path.display()))),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// A special token entry: a string, or an AddedToken object `{"content": ...}`; null is none.
fn special_token(config: &Map<String, Json>, name: &str) -> Option<String> {
    match config.get(name)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` of the config: a string, or a list of `{name, template}` (use "default").
fn template_from_config(config: &Map<String, Json>) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_accept_strings_objects_and_null() {
        let config: Map<String, Json> = serde_json::from_value(serde_json::json!({
            "eos_token": "<|im_end|>",
            "pad_token": {"content": "<|endoftext|>", "lstrip": false},
            "bos_token": null
        }))
        .unwrap();
        assert_eq!(
            special_token(&config, "eos_token").as_deref(),
            Some("<|im_end|>")
        );
        assert_eq!(
            special_token(&config, "pad_token").as_deref(),
            Some("<|endoftext|>")
        );
        assert_eq!(special_token(&config, "bos_token"), None);
        assert_eq!(special_token(&config, "unk_token"), None);
    }

    #[test]
    fn template_list_picks_default() {
        let config: Map<String, Json> = serde_json::from_value(serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
        }))
        .unwrap();
        assert_eq!(template_from_config(&config).as_deref(), Some("D"));
    }
}
