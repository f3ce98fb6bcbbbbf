//! The kinds of folder the project writes, each told by its marker file (its manifest, written
//! last), with the format version this build reads and writes. Opening a folder of another kind
//! names what it is instead ("this folder is a retro dataset, not a database").

use crate::atomic::read_json;
use crate::error::{FormatError, Result};
use crate::staged::StagedDir;
use std::path::{Path, PathBuf};

/// A folder the project writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// `retro index build`: chunks, keys, graph, tokenizer; `manifest.json`.
    Database,
    /// `retro dataset build`: sequences with their neighbours; `dataset.json`.
    Dataset,
    /// `retro train --out`: configs, `state.json` and checkpoints; `train.json`.
    Run,
    /// A run's `checkpoint-STEP/`: weights and optimiser state; `checkpoint.json`.
    Checkpoint,
    /// `retro base import`: a pretrained base's weights, config, tokenizer; `base.json`.
    Base,
}

struct Spec {
    marker: &'static str,
    version: u32,
    long: &'static str,
    short: &'static str,
    /// What to do where there is none.
    make: &'static str,
    /// What to do about a folder of another format version.
    rebuild: &'static str,
}

impl FolderKind {
    /// Every kind, in the order [`FolderKind::of`] tries their markers.
    pub const ALL: [FolderKind; 5] = [
        FolderKind::Database,
        FolderKind::Dataset,
        FolderKind::Base,
        FolderKind::Checkpoint,
        FolderKind::Run,
    ];

    const fn spec(self) -> Spec {
        match self {
            FolderKind::Database => Spec {
                marker: "manifest.json",
                version: 1,
                long: "retro database",
                short: "database",
                make: "build one with `retro index build`",
                rebuild: "rebuild the database with `retro index build --overwrite`",
            },
            FolderKind::Dataset => Spec {
                marker: "dataset.json",
                version: 2,
                long: "retro dataset",
                short: "dataset",
                make: "build one with `retro dataset build --db DIR --out DS`",
                rebuild: "rebuild the dataset with `retro dataset build --overwrite`",
            },
            FolderKind::Run => Spec {
                marker: "train.json",
                version: 1,
                long: "training run",
                short: "training run",
                make: "a run folder is made by `retro train --out`",
                rebuild: "train it again with this build",
            },
            FolderKind::Checkpoint => Spec {
                marker: "checkpoint.json",
                version: 1,
                long: "checkpoint",
                short: "checkpoint",
                make: "checkpoints are written by `retro train`",
                rebuild: "resume from an older checkpoint or train again",
            },
            FolderKind::Base => Spec {
                marker: "base.json",
                version: 1,
                long: "base folder",
                short: "base",
                make: "make one with `retro base import`",
                rebuild: "import it again with `retro base import --overwrite`",
            },
        }
    }

    /// The file that makes a folder of this kind: its manifest, written last.
    pub const fn marker(self) -> &'static str {
        self.spec().marker
    }
    /// The format version this build reads and writes.
    pub const fn version(self) -> u32 {
        self.spec().version
    }
    /// "retro database", "training run", ...
    pub const fn long_name(self) -> &'static str {
        self.spec().long
    }
    /// "database", "training run", ...
    pub const fn short_name(self) -> &'static str {
        self.spec().short
    }

    /// What a folder holding `found` instead of this kind should point the user to.
    pub(crate) fn remedy_for(self, found: FolderKind) -> String {
        match (self, found) {
            (FolderKind::Database, FolderKind::Dataset) => {
                " (give the database it was built from)".into()
            }
            (FolderKind::Dataset, FolderKind::Database) => format!(" ({})", self.spec().make),
            _ => String::new(),
        }
    }

    /// The kind of the folder at `dir`, by its marker file; `None` for a folder of none.
    pub fn of(dir: &Path) -> Option<FolderKind> {
        Self::ALL.into_iter().find(|k| {
            dir.join(k.marker()).is_file()
                || (*k == FolderKind::Run && dir.join("state.json").is_file())
        })
    }

    /// The marker file of the folder `dir`, which must be of this kind: otherwise an error that
    /// says what is there instead (nothing, a folder of another kind, a folder of other files).
    pub fn open(self, dir: &Path) -> Result<PathBuf> {
        let marker = dir.join(self.marker());
        if marker.is_file() {
            return Ok(marker);
        }
        let s = self.spec();
        if !dir.exists() {
            let what = match self {
                FolderKind::Run => "no such run".to_string(),
                _ => format!("no {} here", s.short),
            };
            return Err(FormatError::missing(dir, format!("{what} ({})", s.make)));
        }
        if let Some(found) = Self::of(dir).filter(|&k| k != self) {
            return Err(FormatError::WrongKind {
                path: dir.to_owned(),
                found,
                expected: self,
            });
        }
        Err(FormatError::missing(
            marker,
            format!(
                "not a {} (every {} has a {}, written last); {}",
                s.long, s.short, s.marker, s.make
            ),
        ))
    }

    /// Opens the folder `dir` of this kind and reads its manifest, of this build's format version.
    pub fn read_manifest<T: serde::de::DeserializeOwned>(self, dir: &Path) -> Result<(PathBuf, T)> {
        let path = self.open(dir)?;
        let manifest = self.read_versioned(&path)?;
        Ok((path, manifest))
    }

    /// Reads a JSON file of this kind's folders that carries a `format_version`, which must be
    /// this build's.
    pub fn read_versioned<T: serde::de::DeserializeOwned>(self, path: &Path) -> Result<T> {
        let raw: serde_json::Value = read_json(path)?;
        let found = raw
            .get("format_version")
            .ok_or_else(|| FormatError::corrupt(path, "no format_version"))?;
        let found = found.as_u64().ok_or_else(|| {
            FormatError::corrupt(path, format!("format_version {found} is not a number"))
        })?;
        if found != self.version() as u64 {
            return Err(self.version_error(path, found, self.version()));
        }
        serde_json::from_value(raw).map_err(|e| FormatError::corrupt(path, e.to_string()))
    }

    /// A file of a folder of this kind, at `path`, of format version `found` where this build
    /// reads `expected` (the manifest's, or that of a file inside with its own version), with
    /// what to do about it.
    pub fn version_error(self, path: &Path, found: u64, expected: u32) -> FormatError {
        FormatError::Version {
            path: path.to_owned(),
            found,
            expected,
            remedy: format!("; {}", self.spec().rebuild),
        }
    }

    /// A staged folder to write one of this kind at `out` (see [`StagedDir::new`]).
    pub fn stage(self, out: &Path, overwrite: bool) -> Result<StagedDir> {
        StagedDir::new(out, self.marker(), self.long_name(), overwrite)
    }
}

impl std::fmt::Display for FolderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.long_name())
    }
}
