//! Training a small byte-level BPE tokenizer (for small models, where a 150k vocabulary
//! would dominate the parameters), with Qwen2's special tokens and ChatML template.
//!
//! Conventions (Qwen2 base models): ids 0..3 are `<|endoftext|>`, `<|im_start|>`,
//! `<|im_end|>`; `eos_token` and `pad_token` are `<|endoftext|>`, the document separator
//! the pretraining pipeline appends; chat turns end with `<|im_end|>` via the template (SFT
//! labels include it, so a model stops there). No BOS, as Qwen2. The pre-tokenizer is
//! GPT-2's ByteLevel with its regex and no prefix space; every byte is in the alphabet, so
//! nothing is ever unknown.

use std::path::Path;

use serde_json::{Map, Value as Json};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

use super::{CHATML_TEMPLATE, Tokenizer};
use crate::error::{Error, Result};

/// The special tokens of a trained tokenizer, in id order.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

type WrappedTokenizer = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Trains a byte-level BPE of `vocab_size` ids (special tokens included) on the text
/// `files` and saves it to `out_dir` (tokenizer.json, tokenizer_config.json,
/// special_tokens_map.json).
pub fn train_bpe(
    files: &[impl AsRef<Path>],
    vocab_size: usize,
    out_dir: impl AsRef<Path>,
) -> Result<Tokenizer> {
    let minimum = 256 + SPECIAL_TOKENS.len();
    if vocab_size < minimum {
        return Err(Error::Tokenizer(format!(
            "vocab_size {vocab_size} is below the byte alphabet plus special tokens ({minimum})"
        )));
    }
    let files = existing_files(files)?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut wrapped = new_byte_level_bpe()?;
    wrapped
        .train_from_files(&mut trainer, files)
        .map_err(|e| Error::Tokenizer(format!("training BPE: {e}")))?;
    let tokenizer = Tokenizer::from_parts(
        tokenizers::Tokenizer::from(wrapped),
        trained_config(),
        Some(CHATML_TEMPLATE.to_string()),
    )?;
    tokenizer.save(out_dir)?;
    Ok(tokenizer)
}

/// Writes the `field` of every line of the JSONL file `src` to `dst`, one document per
/// line (newlines inside a document kept); returns the number of documents. Errors name
/// `file:line`.
pub fn jsonl_to_text(src: &Path, field: &str, dst: &Path) -> Result<u64> {
    use std::io::{BufRead, Write};
    let input =
        std::fs::File::open(src).map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
    let output = std::fs::File::create(dst)
        .map_err(|e| Error::io(format!("creating {}", dst.display()), e))?;
    let mut writer = std::io::BufWriter::new(output);
    let mut documents = 0;
    for (index, line) in std::io::BufReader::new(input).lines().enumerate() {
        let at = format!("{}:{}", src.display(), index + 1);
        let line = line.map_err(|e| Error::io(at.clone(), e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Json =
            serde_json::from_str(&line).map_err(|e| Error::Data(format!("{at}: {e}")))?;
        let text = value
            .get(field)
            .and_then(Json::as_str)
            .ok_or_else(|| Error::Data(format!("{at}: missing text field \"{field}\"")))?;
        writeln!(writer, "{text}")
            .map_err(|e| Error::io(format!("writing {}", dst.display()), e))?;
        documents += 1;
    }
    writer
        .flush()
        .map_err(|e| Error::io(format!("writing {}", dst.display()), e))?;
    Ok(documents)
}

fn existing_files(files: &[impl AsRef<Path>]) -> Result<Vec<String>> {
    if files.is_empty() {
        return Err(Error::Tokenizer("no training files given".into()));
    }
    files
        .iter()
        .map(|f| {
            let f = f.as_ref();
            if f.is_file() {
                Ok(f.to_string_lossy().into_owned())
            } else {
                Err(Error::Tokenizer(format!(
                    "training file {} does not exist",
                    f.display()
                )))
            }
        })
        .collect()
}

fn new_byte_level_bpe() -> Result<WrappedTokenizer> {
    let byte_level = ByteLevel::new(false, true, true);
    TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_post_processor(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))
}

/// tokenizer_config.json of a trained tokenizer (`PreTrainedTokenizerFast`, so transformers
/// needs nothing but tokenizer.json).
fn trained_config() -> Map<String, Json> {
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 131072,
    });
    match config {
        Json::Object(map) => map,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_round_trips_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        let text =
            "the rust launcher starts rank 3 of the worker group.\n三国演义 滚滚长江东逝水。\n"
                .repeat(50);
        std::fs::write(&corpus, text).unwrap();
        let out = dir.path().join("tok");
        let tok = train_bpe(&[&corpus], 320, &out).unwrap();
        assert!(
            tok.vocab_size() <= 320 && tok.vocab_size() > 259,
            "{}",
            tok.vocab_size()
        );
        for (id, name) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(name), Some(id as u32));
        }
        assert_eq!(tok.eos_id(), Some(0));
        let sample = "rust launcher 长江 <|im_end|> ünïcode";
        let ids = tok.encode(sample, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), sample);
        assert!(ids.contains(&2), "special token kept whole: {ids:?}");
        let reloaded = Tokenizer::from_dir(&out).unwrap();
        assert_eq!(reloaded.encode(sample, false).unwrap(), ids);
        assert!(reloaded.has_own_chat_template());
    }

    #[test]
    fn rejects_tiny_vocab_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(train_bpe(&[dir.path().join("nope.txt")], 1000, dir.path()).is_err());
        assert!(train_bpe(&[dir.path().join("nope.txt")], 10, dir.path()).is_err());
    }
}
