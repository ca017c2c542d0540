//! `rsdeep-worker tokenizer ...` (forwarded from `rsdeep tokenizer ...`): the tokenizer
//! subcommands. Today: `train --files F... --vocab_size N --out DIR`.

use std::path::PathBuf;

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
        /// Text files (glob patterns are expanded); JSONL lines are read as plain text.
        #[arg(long, num_args = 1.., required = true)]
        files: Vec<String>,
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
    let parsed = TokenizerArgs::try_parse_from(argv).map_err(|e| Error::Config(e.to_string()))?;
    match parsed.command {
        TokenizerCommand::Train {
            files,
            vocab_size,
            out,
        } => {
            let files = expand_files(&files)?;
            let tokenizer = super::train_bpe(&files, vocab_size, &out)?;
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
    fn unmatched_glob_is_an_error() {
        let err = expand_files(&["/nonexistent/dir/*.jsonl".to_string()]).unwrap_err();
        assert!(err.to_string().contains("no file matches"), "{err}");
    }
}
