//! Chat templates: Hugging Face `chat_template` Jinja strings rendered with minijinja so
//! that the output is byte-identical to transformers' `apply_chat_template`.
//!
//! Contract: transformers renders with jinja2's `ImmutableSandboxedEnvironment(trim_blocks,
//! lstrip_blocks, loopcontrols)`, a `tojson` that is `json.dumps(ensure_ascii=False)`, and a
//! `raise_exception` global (the minijinja setup is described in `docs/data.md`). The
//! context holds `messages`, `add_generation_prompt` and the special tokens.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The built-in ChatML template used when a tokenizer ships none (Qwen2 convention).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// One chat turn: `role` is `system`, `user`, `assistant` (or `tool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special tokens transformers passes to the template as variables.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template, cheap to render many times.
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source` with the transformers-compatible environment.
    pub fn new(source: &str, tokens: TemplateTokens) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            tokens,
            source: source.to_string(),
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` opens an assistant turn at the end.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages = serde_json::to_value(messages)
            .map_err(|e| Error::Tokenizer(format!("chat messages: {e}")))?;
        self.render_json(&messages, add_generation_prompt)
    }

    /// Renders messages given as JSON (for tool calls and other extra fields).
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let context = serde_json::json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.tokens.bos_token,
            "eos_token": self.tokens.eos_token,
            "pad_token": self.tokens.pad_token,
            "unk_token": self.tokens.unk_token,
        });
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template
            .render(Value::from(minijinja::value::Serde(&context)))
            .map_err(template_error)
    }
}

fn template_error(e: minijinja::Error) -> Error {
    Error::Tokenizer(format!("chat template: {e:#}"))
}

/// `raise_exception(msg)`: the template's own error, as transformers defines it.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None)`: `", "` and `": "`
/// separators, no HTML escaping (minijinja's own `tojson` escapes `<`, `>`, `&`, `'`).
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = Vec::new();
    let formatter = PythonJsonFormatter::new(indent);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(&json, &mut serializer)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

/// serde_json formatter reproducing Python's `json.dumps` separators and indentation.
struct PythonJsonFormatter {
    indent: Option<usize>,
    depth: usize,
    has_value: bool,
}

impl PythonJsonFormatter {
    fn new(indent: Option<usize>) -> Self {
        PythonJsonFormatter {
            indent,
            depth: 0,
            has_value: false,
        }
    }

    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(width) = self.indent {
            w.write_all(b"\n")?;
            w.write_all(" ".repeat(width * self.depth).as_bytes())?;
        }
        Ok(())
    }

    fn separator<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML_TEMPLATE, TemplateTokens::default()).unwrap()
    }

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let messages = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "yo"),
        ];
        let text = chatml().render(&messages, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let ctx = serde_json::json!({"x": {"b": [1, "<é>"], "a": null}});
        let env_out = {
            let mut env = Environment::new();
            env.add_filter("tojson", python_tojson);
            env.render_str(
                "{{ x | tojson }}|{{ x | tojson(indent=2) }}",
                Value::from(minijinja::value::Serde(&ctx)),
            )
            .unwrap()
        };
        assert_eq!(
            env_out,
            "{\"b\": [1, \"<é>\"], \"a\": null}|{\n  \"b\": [\n    1,\n    \"<é>\"\n  ],\n  \"a\": null\n}"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}",
            TemplateTokens::default(),
        )
        .unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.content.startswith(' a') %}yes:{% endif %}{{ m.content.strip() }}{% endfor %}",
            TemplateTokens::default(),
        )
        .unwrap();
        let text = t
            .render(&[ChatMessage::new("user", " ab ")], false)
            .unwrap();
        assert_eq!(text, "yes:ab");
    }
}
