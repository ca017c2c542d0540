//! `rsdeep-worker tokenizer ...` (forwarded from `rsdeep tokenizer ...`): the tokenizer
//! subcommands. Today: `train --files F... --vocab_size N --out DIR`.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::data::expand_files;
use crate::error::{Error, Result};

/// Tokenizer tools.
#[derive(Debug, Parser)]
#[command(name = "tokenizer")]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (special tokens <|endoftext|>, <|im_start|>,
    /// <|im_end|>; ChatML chat template) on text files.
    Train {
        /// Text files (glob patterns are expanded); of `.jsonl` files only `--text_field`
        /// of each line is used.
        #[arg(long, num_args = 1.., required = true)]
        files: Vec<String>,
        /// The JSONL field holding the text.
        #[arg(long = "text_field", alias = "text-field", default_value = "text")]
        text_field: String,
        /// Vocabulary size, special tokens included.
        #[arg(long = "vocab_size", alias = "vocab-size")]
        vocab_size: usize,
        /// Output directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Parses `args` (without the program name, starting at `train`) and runs the command.
pub fn run<I, S>(args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from("tokenizer"))
        .chain(args.into_iter().map(Into::into));
    let parsed = match TokenizerArgs::try_parse_from(argv) {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => {
            // --help / --version: print and succeed.
            print!("{e}");
            return Ok(());
        }
        Err(e) => return Err(Error::Config(e.to_string())),
    };
    match parsed.command {
        TokenizerCommand::Train {
            files,
            text_field,
            vocab_size,
            out,
        } => {
            let files = expand_files(&files)?;
            let scratch =
                std::env::temp_dir().join(format!("rsdeep-tokenizer-{}", std::process::id()));
            std::fs::create_dir_all(&scratch)
                .map_err(|e| Error::io(format!("creating {}", scratch.display()), e))?;
            let trained = plain_text_files(&files, &text_field, &scratch)
                .and_then(|texts| super::train_bpe(&texts, vocab_size, &out));
            let _ = std::fs::remove_dir_all(&scratch);
            let tokenizer = trained?;
            println!(
                "trained byte-level BPE: {} ids from {} file(s) -> {}",
                tokenizer.vocab_size(),
                files.len(),
                out.display()
            );
            Ok(())
        }
    }
}

/// The training inputs as plain text: `.jsonl` files are reduced to their `field` (one
/// document per line) in `scratch`; other files are used as they are.
fn plain_text_files(files: &[PathBuf], field: &str, scratch: &Path) -> Result<Vec<PathBuf>> {
    files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            if file.extension().is_some_and(|e| e == "jsonl") {
                let text = scratch.join(format!("{i}.txt"));
                super::train::jsonl_to_text(file, field, &text)?;
                Ok(text)
            } else {
                Ok(file.clone())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_trains_into_out_dir() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("a.txt");
        std::fs::write(&corpus, "hello world, hello rank zero\n".repeat(30)).unwrap();
        let out = dir.path().join("tok");
        let pattern = dir.path().join("*.txt").to_string_lossy().into_owned();
        run([
            "train",
            "--files",
            &pattern,
            "--vocab_size",
            "300",
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        assert!(out.join("tokenizer.json").is_file());
        assert!(out.join("tokenizer_config.json").is_file());
    }

    #[test]
    fn jsonl_inputs_train_on_the_text_field_only() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.jsonl");
        let line = serde_json::json!({"text": "alpha beta gamma\nsecond line", "meta": "zzzz"});
        std::fs::write(&corpus, format!("{line}\n").repeat(40)).unwrap();
        let out = dir.path().join("tok");
        run([
            "train",
            "--files",
            corpus.to_str().unwrap(),
            "--vocab_size",
            "300",
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let vocab = std::fs::read_to_string(out.join("tokenizer.json")).unwrap();
        assert!(vocab.contains("alpha"), "learned from the text");
        assert!(
            !vocab.contains("zzzz") && !vocab.contains("\\\\n"),
            "not from other fields or escapes"
        );
        let help = run(["train", "--help"]);
        assert!(help.is_ok());
    }

    #[test]
    fn unmatched_glob_is_an_error() {
        let err = expand_files(&["/nonexistent/dir/*.jsonl".to_string()]).unwrap_err();
        assert!(err.to_string().contains("no file matches"), "{err}");
    }
}
