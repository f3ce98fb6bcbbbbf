//! The folders RETRO writes (databases, datasets, training runs and their checkpoints, imported
//! bases), in one place: each [`FolderKind`] is told by its manifest and carries a format
//! version; manifests list their files' sizes and SHA-256 in a [`FileTable`]; files are written
//! atomically ([`write_atomic`]) and folders through a [`StagedDir`] swapped into place whole.
//! Every failure is a [`FormatError`]: missing, corrupt, another version, another kind.
//!
//! ```
//! use retro_format::{write_json_atomic, FileTable, FolderKind, FormatError};
//!
//! let root = tempfile::tempdir()?;
//! let out = root.path().join("base");
//! let staged = FolderKind::Base.stage(&out, false)?;
//! std::fs::write(staged.path().join("config.json"), "{}")?;
//! let files = FileTable::record(staged.path(), ["config.json"])?;
//! let manifest = serde_json::json!({ "format_version": 1, "files": files });
//! write_json_atomic(&staged.path().join(FolderKind::Base.marker()), &manifest)?;
//! staged.commit()?;
//!
//! let (_, read): (_, serde_json::Value) = FolderKind::Base.read_manifest(&out)?;
//! let files: FileTable = serde_json::from_value(read["files"].clone())?;
//! files.check(&out, "base.json", "import it again", |_, _| true)?;
//! // A base is not a dataset, and the error says what it is.
//! let e = FolderKind::Dataset.open(&out).unwrap_err();
//! assert!(matches!(e, FormatError::WrongKind { found: FolderKind::Base, .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod atomic;
mod checksum;
mod error;
mod folder;
mod staged;

pub use atomic::{read_json, sync_path, write_atomic, write_json_atomic};
pub use checksum::{is_hex, sha256_bytes, sha256_file, FileInfo, FileTable};
pub use error::{FormatError, Result};
pub use folder::FolderKind;
pub use staged::{remove_stale_staged, StagedDir};
