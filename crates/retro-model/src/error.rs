//! Errors of the model crate: each names the tensor, shape, field or file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("shape error: {0}")]
    Shape(String),
    #[error("token id {id} in `{input}` is out of range for n_vocab {n_vocab}")]
    TokenOutOfRange {
        input: &'static str,
        id: u64,
        n_vocab: usize,
    },
    #[error("weights: tensor `{name}`: {msg}")]
    Weight { name: String, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
