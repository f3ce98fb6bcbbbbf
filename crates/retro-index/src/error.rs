//! The crate's error type: every variant names the file, field or value at fault.

use std::path::PathBuf;

/// Errors of the retrieval database. No function of this crate panics on bad input files.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid UTF-8 at byte offset {offset} (use the lossy option to replace it)")]
    InvalidUtf8 { path: PathBuf, offset: usize },
    #[error("{path}, line {line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("duplicate document id {id:?}: {first} and {second} (ids must be unique: rename one, or give each JSONL line its own id)")]
    DuplicateId {
        id: String,
        first: String,
        second: String,
    },
    #[error("the corpus has no non-empty documents ({empty_skipped} empty ones skipped)")]
    EmptyCorpus { empty_skipped: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("embedder: {0}")]
    Embedder(String),
    /// A file that should be there is not; `needed_for` says what wanted it ("a retro database",
    /// "a BERT model directory (--embedder)", ...).
    #[error("{path}: missing: {needed_for}")]
    Missing { path: PathBuf, needed_for: String },
    #[error("{path}: corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: format_version {found} is not supported (this build reads {expected})")]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{field} mismatch: the database was built with {database}, got {given}")]
    Mismatch {
        field: &'static str,
        database: String,
        given: String,
    },
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("index: {0}")]
    Index(String),
    /// A vector store (Milvus) failed or disagrees with the manifest; `location` is its URL.
    #[error("{location}: {message}")]
    Store { location: String, message: String },
}

/// Result with [`IndexError`].
pub type Result<T> = std::result::Result<T, IndexError>;

impl IndexError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn missing(path: impl Into<PathBuf>, needed_for: impl Into<String>) -> Self {
        IndexError::Missing {
            path: path.into(),
            needed_for: needed_for.into(),
        }
    }
    pub(crate) fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        IndexError::Corrupt {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        IndexError::Invalid {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
