//! Text generation with a KV cache: prefill the prompt once, then one token per step
//! (positions continue in the cache, `CausalLm::forward_cached`). Greedy or sampled
//! (temperature -> top_k -> top_p -> multinomial, transformers' order) from a seeded
//! RNG; stops at `max_new_tokens` or an end-of-sequence id. `TextStreamer` prints
//! decoded text as tokens arrive, only complete UTF-8. CLI: `generate_cli` (`rsdeep
//! generate`). Greedy parity with transformers' `generate`: `tests/generate_parity.rs`.

mod cli;
mod sampling;

pub use cli::generate_cli;
pub use sampling::{SamplingRng, choose_next};

use crate::model::{CausalLm, KvCache, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

/// How to pick tokens. `temperature <= 0` means greedy (argmax).
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Nucleus: keep the smallest set with probability >= top_p; 1.0 = off.
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after emitting one of these (empty: never before the limit).
    pub eos_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_ids: Vec::new(),
        }
    }
}

/// Generates up to `opts.max_new_tokens` ids after `prompt_ids` (batch of one), calling
/// `on_token` with each new id as soon as it is chosen. When `opts.eos_ids` is empty and
/// a tokenizer is given, its EOS id stops generation. Returns the new ids (EOS included
/// when hit).
pub fn generate(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt_ids.is_empty() {
        return Err(Error::Model("generation needs a non-empty prompt".into()));
    }
    let mut eos_ids = opts.eos_ids.clone();
    if eos_ids.is_empty() {
        eos_ids.extend(tokenizer.and_then(Tokenizer::eos_id));
    }
    let _span = tracing::info_span!("generate", prompt = prompt_ids.len()).entered();
    let mut rng = SamplingRng::new(opts.seed);
    let mut cache = KvCache::new(model);
    let mut produced = Vec::new();
    tch::no_grad(|| -> Result<()> {
        let prompt: Vec<i64> = prompt_ids.iter().map(|&id| id as i64).collect();
        let ids = Tensor::from_slice(&prompt)
            .f_reshape([1, -1])?
            .f_to_device(model.device())?; // (1, T)
        let mut logits = model.forward_cached(&ids, &mut cache)?; // (1, T, V)
        while produced.len() < opts.max_new_tokens {
            let last = last_logits(&logits)?;
            let next = choose_next(&last, opts, &mut rng)?;
            produced.push(next);
            on_token(next)?;
            if eos_ids.contains(&next) || produced.len() == opts.max_new_tokens {
                break;
            }
            let step = Tensor::from_slice(&[next as i64])
                .f_reshape([1, 1])?
                .f_to_device(model.device())?; // (1, 1)
            logits = model.forward_cached(&step, &mut cache)?; // (1, 1, V)
        }
        Ok(())
    })?;
    Ok(produced)
}

/// The last position's logits of (1, T, V) as fp32 on the host.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let last = logits
        .f_select(1, -1)?
        .f_reshape([-1])?
        .f_to_kind(Kind::Float)?
        .f_to_device(tch::Device::Cpu)?; // (V,)
    Ok(Vec::<f32>::try_from(&last)?)
}

/// The end-of-sequence ids transformers' `generate` would use for the model in `dir`:
/// `generation_config.json`'s `eos_token_id` when present, else config.json's.
pub fn model_eos_ids(dir: &Path, config: &ModelConfig) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if let Some(eos) = value.get("eos_token_id") {
            return Ok(ids_of(eos));
        }
    }
    Ok(config.eos_token_id.as_ref().map(ids_of).unwrap_or_default())
}

/// An id or a list of ids.
fn ids_of(value: &Value) -> Vec<u32> {
    match value {
        Value::Array(items) => items.iter().flat_map(ids_of).collect(),
        other => other.as_u64().map(|id| id as u32).into_iter().collect(),
    }
}

/// Prints generated text incrementally: re-decodes the ids of the current line (so
/// decoders that drop a lone token's leading space still space words) and writes only
/// the new text once it no longer ends in an incomplete UTF-8 sequence (U+FFFD).
pub struct TextStreamer<'a, W: Write> {
    tokenizer: &'a Tokenizer,
    out: W,
    ids: Vec<u32>,
    /// Bytes of `decode(ids)` already written.
    printed: usize,
}

impl<'a, W: Write> TextStreamer<'a, W> {
    pub fn new(tokenizer: &'a Tokenizer, out: W) -> Self {
        TextStreamer {
            tokenizer,
            out,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds one id and writes whatever complete text it finishes.
    pub fn push(&mut self, id: u32) -> Result<()> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        if let Some(fresh) = text.get(self.printed..) {
            self.write(fresh)?;
        }
        self.printed = text.len();
        if text.ends_with('\n') {
            // Like transformers' TextStreamer: a finished line starts a fresh window.
            self.ids.clear();
            self.printed = 0;
        }
        Ok(())
    }

    /// Writes any text still held back (a trailing incomplete sequence).
    pub fn finish(&mut self) -> Result<()> {
        let text = self.tokenizer.decode(&self.ids)?;
        if let Some(fresh) = text.get(self.printed..) {
            self.write(fresh)?;
        }
        self.ids.clear();
        self.printed = 0;
        Ok(())
    }

    fn write(&mut self, text: &str) -> Result<()> {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|e| Error::io("writing generated text", e))
    }

    /// The writer (tests read what was streamed).
    pub fn into_inner(self) -> W {
        self.out
    }
}
