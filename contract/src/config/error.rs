//! `ConfigError`: every way train.json or a DeepSpeed config can be rejected, worded for
//! the user (what is wrong, where, what to do). DeepSpeed's and Hugging Face's own
//! messages are reproduced where they exist, so search engines still find them.

use std::path::PathBuf;

/// A configuration problem found before any worker starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The OS error is in the message, not a `source` (chains would print it twice).
    #[error("{path}: cannot read: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("{file}: unknown key \"{key}\"{}{}", suggestion_text(.suggestion), note_text(.note))]
    UnknownKey {
        file: PathBuf,
        key: String,
        suggestion: Option<String>,
        note: Option<String>,
    },

    #[error("{file}: key \"{key}\": {message}")]
    WrongType {
        file: PathBuf,
        key: String,
        message: String,
    },

    #[error("{file}: key \"{key}\": {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },

    #[error("{file}: key \"{key}\": {message}")]
    Unsupported {
        file: PathBuf,
        key: String,
        message: String,
    },

    /// DeepSpeed's batch rule failed (`_batch_assertion`); the message carries the numbers.
    #[error("{0}")]
    Batch(String),

    /// Hugging Face's "auto" integration found explicit DeepSpeed values that differ from
    /// the training arguments; every mismatch is listed.
    #[error(
        "Please correct the following DeepSpeed config values that mismatch TrainingArguments values:\n{}\nThe easiest method is to set these DeepSpeed config values to 'auto'.",
        .mismatches.join("\n")
    )]
    AutoMismatch { mismatches: Vec<String> },

    #[error("command-line override {flag}: {message}")]
    Override { flag: String, message: String },

    #[error(
        "DeepSpeed key \"{key}\" is still \"auto\": it depends on the model and is filled by \
         TrainConfig::fill_model_autos (the worker calls it once the model is loaded)"
    )]
    UnresolvedAuto { key: String },
}

fn suggestion_text(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean \"{s}\"?)"),
        None => String::new(),
    }
}

fn note_text(note: &Option<String>) -> String {
    match note {
        Some(n) => format!(": {n}"),
        None => String::new(),
    }
}
