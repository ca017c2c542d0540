//! The worker library's error type: one enum, grouped by subsystem. Binaries wrap it in
//! `anyhow` with context; library code returns `Result<T>` and uses fallible tch ops.

/// Every error the worker library can return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === libtorch and I/O ===
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// The OS error is part of the message and deliberately not a `source`: error chains
    /// (`{:#}`) would print it twice.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },

    // === rendezvous ===
    #[error("rendezvous: {0}")]
    Rendezvous(String),

    // === collectives ===
    /// A collective failed: which operation, on which rank, with how many elements.
    #[error("collective {op} failed on rank {rank} ({numel} elements): {detail}")]
    Comm {
        op: &'static str,
        rank: usize,
        numel: usize,
        detail: String,
    },

    // === model, tokenizer, data ===
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("data: {0}")]
    Data(String),

    // === engine, checkpoints, configuration ===
    #[error("engine: {0}")]
    Engine(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("config: {0}")]
    Config(String),

    // === another rank's failure ===
    /// This rank stopped only because another rank failed (it gave up on a step the
    /// ranks agree on, or on a rank it waited for); the launcher names that rank's own
    /// error as the cause.
    #[error("{0}")]
    OtherRankFailed(String),
}

/// The worker library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether this error only follows another rank's failure: a collective that broke
    /// (a peer died or gave up) or `OtherRankFailed`.
    pub fn is_caused_by_another_rank(&self) -> bool {
        matches!(self, Error::Comm { .. } | Error::OtherRankFailed(_))
    }

    /// Wraps an I/O error with what was being done (file names belong in `context`).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `{:#}` of an error chain prints (anyhow's format): every message, `: `-joined.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            text.push_str(&format!(": {cause}"));
            next = cause.source();
        }
        text
    }

    #[test]
    fn an_os_error_is_printed_once_in_a_chain() {
        let missing = std::fs::read("/no/such/file").unwrap_err();
        let e = Error::io("reading /no/such/file", missing);
        let text = chain(&e);
        assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");
        assert!(text.starts_with("reading /no/such/file: "), "{text}");
    }
}
