//! Errors of the pipeline: they name the file, field or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Index(#[from] retro_index::IndexError),
    /// A dataset, run, checkpoint or base folder that is missing, corrupt, of another format
    /// version or another kind.
    #[error(transparent)]
    Format(#[from] retro_format::FormatError),
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
    /// A tensor file (safetensors) candle could not read; candle's error stays the source.
    #[error("{path}: {source}")]
    Tensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// What was being done when `source` happened ("opening database DIR"); the CLI prints both.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<PipelineError>,
    },
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

/// Says what was being done when an error happened, as anyhow's `with_context` does.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<PipelineError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| PipelineError::Context {
            context: what(),
            source: Box::new(e.into()),
        })
    }
}
