//! The one error of every folder the project writes: missing, corrupt, of another format version,
//! of another kind. The crates that own a folder wrap it (`IndexError::Format`,
//! `PipelineError::Format`), so a damaged file reads the same whatever opened it.

use crate::FolderKind;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that should be there is not; `needed_for` says what wanted it ("a retro database",
    /// "listed in the manifest: the folder is incomplete", ...).
    #[error("{path}: missing: {needed_for}")]
    Missing { path: PathBuf, needed_for: String },
    #[error("{path}: corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// A file of a format version this build does not read; `remedy` says what to do.
    #[error(
        "{path}: format_version {found} is not supported (this build reads {expected}){remedy}"
    )]
    Version {
        path: PathBuf,
        found: u64,
        expected: u32,
        remedy: String,
    },
    /// A folder of the project's, but not the kind asked for (a dataset given as a database).
    #[error("{path}: this folder is a {}, not a {}{}", found.long_name(), expected.short_name(), expected.remedy_for(*found))]
    WrongKind {
        path: PathBuf,
        found: FolderKind,
        expected: FolderKind,
    },
    /// An output folder that may not be written (a file, or a folder of someone else's files).
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, FormatError>;

impl FormatError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn missing(path: impl Into<PathBuf>, needed_for: impl Into<String>) -> Self {
        FormatError::Missing {
            path: path.into(),
            needed_for: needed_for.into(),
        }
    }
    pub fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        FormatError::Corrupt {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        FormatError::Invalid {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
    /// An I/O error opening `path`, told apart when the file is not there.
    pub fn opening(path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            Self::missing(path, "no such file")
        } else {
            Self::io(path, e)
        }
    }
}
