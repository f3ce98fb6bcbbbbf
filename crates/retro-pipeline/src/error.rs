//! Errors of the pipeline: they name the file, field or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Index(#[from] retro_index::IndexError),
    #[error(transparent)]
    Model(#[from] retro_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written; the OS error stays the source.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse as what it should hold; serde's error stays the source.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A tensor file (safetensors) candle could not read; candle's error stays the source.
    #[error("{path}: {source}")]
    Tensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// A checkpoint that its `checkpoint.json` (at `path`) does not describe: resuming skips it.
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

impl PipelineError {
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
    pub fn file(path: &std::path::Path, msg: impl Into<String>) -> Self {
        Self::File {
            path: path.to_owned(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, PipelineError>;
