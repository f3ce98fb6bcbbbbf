//! Errors of the model crate: each names the tensor, shape, field or file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid config: {0}")]
    Config(String),
    /// An input of the wrong shape or kind: `input` names it (`x`, `ret`, `keep`, `tokens`,
    /// `neighbours`, `decode state`), `at` the call (`forward`, `prefill at t = 3`, `step at t = 7`).
    #[error("{at}: `{input}` {expected}, got {got}")]
    Shape {
        at: String,
        input: &'static str,
        expected: String,
        got: String,
    },
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

impl ModelError {
    pub(crate) fn shape(
        at: impl Into<String>,
        input: &'static str,
        expected: impl Into<String>,
        got: impl std::fmt::Display,
    ) -> Self {
        Self::Shape {
            at: at.into(),
            input,
            expected: expected.into(),
            got: got.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
