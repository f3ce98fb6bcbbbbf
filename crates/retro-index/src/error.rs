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
    /// A file or folder that is missing, corrupt, of another format version or another kind
    /// (retro-format's one error for every folder the project writes).
    #[error(transparent)]
    Format(#[from] retro_format::FormatError),
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
    /// A build stopped by its [`crate::Cancel`]; its staged folder was removed.
    #[error("cancelled: the build was stopped and nothing was written")]
    Cancelled,
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
        retro_format::FormatError::missing(path, needed_for).into()
    }
    pub(crate) fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        retro_format::FormatError::corrupt(path, message).into()
    }
    /// A file of the database in a format version this build does not read.
    pub(crate) fn version(path: &std::path::Path, found: u32, expected: u32) -> Self {
        retro_format::FolderKind::Database
            .version_error(path, found.into(), expected)
            .into()
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
