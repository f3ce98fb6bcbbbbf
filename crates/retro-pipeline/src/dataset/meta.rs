//! `dataset.json`: how a dataset was cut and retrieved, from which database, and its files.

use super::*;
use crate::error::{PipelineError, Result};
use crate::filter::Filter;
use retro_format::{is_hex, FileTable};
use retro_index::{Database, DatabaseId, DocumentId};
use std::path::{Path, PathBuf};

/// How a dataset is cut and retrieved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatasetParams {
    pub seq_len: usize,
    pub k: usize,
    /// None: same-document, or `sequence:SEQ_LEN` (the whole training sequence and the chunk after
    /// it) for a one-document corpus.
    pub filter: Option<Filter>,
    pub seed: u64,
    /// Documents whose id is listed here, or contains one of `held_out_matching`, form the
    /// validation split and never serve as neighbours.
    pub held_out_ids: Vec<String>,
    pub held_out_matching: Vec<String>,
    /// With nothing held out by id, this fraction of documents (seeded) is held out; with a single
    /// document, its last fraction of sequences is the validation split.
    pub valid_fraction: f64,
    pub max_train_sequences: Option<usize>,
    pub max_valid_sequences: Option<usize>,
    /// This fraction of the training sequences (seeded) get *novel* neighbours: each chunk's are
    /// also kept out of the document of its nearest neighbour
    /// ([`crate::Retriever::search_without_nearest_document`]). Neighbours that look alike without
    /// continuing the text, so CCA learns to check a neighbour before copying it. 0 in the paper.
    pub novel_fraction: f64,
    /// Checked between groups of sequences: once set, the build stops with `Cancelled` and
    /// writes nothing. Not part of the dataset.
    #[serde(skip)]
    pub cancel: retro_index::Cancel,
}

impl Default for DatasetParams {
    fn default() -> Self {
        Self {
            seq_len: 512,
            k: 2,
            filter: None,
            seed: 0,
            held_out_ids: vec![],
            held_out_matching: vec![],
            valid_fraction: 0.1,
            max_train_sequences: None,
            max_valid_sequences: None,
            novel_fraction: 0.0,
            cancel: retro_index::Cancel::default(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SplitInfo {
    pub sequences: usize,
    pub padded_neighbours: usize,
    /// Sequences whose neighbours were retrieved without their chunks' nearest documents
    /// ([`DatasetParams::novel_fraction`]).
    #[serde(default)]
    pub novel_sequences: usize,
}

/// `dataset.json`: what the dataset was built with and from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatasetMeta {
    pub format_version: u32,
    /// Content id: a hash of the parameters, the database id and the files' checksums. A run
    /// records it, and resuming on another dataset is refused.
    pub dataset_id: DatasetId,
    pub database_id: DatabaseId,
    /// Where the database was when the dataset was built (the id is what is checked).
    #[serde(default)]
    pub database_dir: PathBuf,
    pub chunk_len: usize,
    pub seq_len: usize,
    pub k: usize,
    /// Tokens per neighbour: the chunk and its continuation. Datasets built before 2026-12-03
    /// use the American spelling; they still load.
    #[serde(alias = "neighbor_len")]
    pub neighbour_len: usize,
    pub filter: Filter,
    pub seed: u64,
    #[serde(default)]
    pub novel_fraction: f64,
    /// Indices and ids of the held-out (validation) documents.
    pub held_out_documents: Vec<(DocumentId, String)>,
    /// Training documents too short for one sequence of `seq_len + 1` tokens.
    pub skipped_short_documents: usize,
    pub train: SplitInfo,
    pub valid: SplitInfo,
    /// File name -> size and SHA-256, verified on every open.
    pub files: FileTable,
}
impl DatasetMeta {
    /// Checks that need no database: sizes in range, names of the dataset's own files only.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, value: String, why: &str| {
            PipelineError::file(path, format!("{field} = {value}: {why}"))
        };
        let cl = self.chunk_len;
        if cl == 0 || cl > retro_index::database::MAX_CHUNK_LEN {
            return Err(bad(
                "chunk_len",
                cl.to_string(),
                "must be positive and at most 4096",
            ));
        }
        if self.seq_len < cl || self.seq_len > 1 << 20 {
            return Err(bad(
                "seq_len",
                self.seq_len.to_string(),
                "must be at least chunk_len and at most 2^20",
            ));
        }
        if self.k == 0 || self.k > MAX_K {
            return Err(bad("k", self.k.to_string(), "must be between 1 and 64"));
        }
        if self.neighbour_len != 2 * cl {
            return Err(bad(
                "neighbour_len",
                self.neighbour_len.to_string(),
                &format!(
                    "a neighbour is a chunk and its continuation: 2 x chunk_len = {}",
                    2 * cl
                ),
            ));
        }
        if let Filter::Sequence(0) | Filter::Window(0) = self.filter {
            return Err(bad(
                "filter",
                self.filter.to_string(),
                "needs a positive length",
            ));
        }
        let mut want: Vec<String> = [Split::Train, Split::Valid]
            .iter()
            .flat_map(|s| SPLIT_FILES.iter().map(move |f| format!("{}.{f}", s.name())))
            .collect();
        want.sort();
        let have: Vec<String> = self.files.names().cloned().collect();
        if have != want {
            return Err(bad(
                "files",
                format!("{have:?}"),
                &format!("must list exactly {want:?}"),
            ));
        }
        for (name, f) in &self.files {
            if !is_hex(&f.sha256, 64..=64) {
                return Err(bad(
                    &format!("files.{name}.sha256"),
                    format!("{:?}", f.sha256),
                    "is not 64 hex digits",
                ));
            }
        }
        Ok(())
    }

    /// Checks against the database the dataset is opened with.
    pub(super) fn check_against(&self, path: &Path, db: &Database) -> Result<()> {
        if self.database_id != *db.id() {
            return Err(PipelineError::file(
                path,
                format!(
                    "built from database {} but given database {} ({})",
                    self.database_id,
                    db.id(),
                    db.dir().display()
                ),
            ));
        }
        if self.chunk_len != db.chunk_len() {
            return Err(PipelineError::file(
                path,
                format!(
                    "chunk_len = {}, but the database's is {}",
                    self.chunk_len,
                    db.chunk_len()
                ),
            ));
        }
        let docs = db.store().documents();
        for (i, id) in &self.held_out_documents {
            if docs.get(i.0).is_none_or(|d| &d.id != id) {
                return Err(PipelineError::file(
                    path,
                    format!(
                        "held_out_documents: ({}, {id:?}) is not a document of the database",
                        i.0
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A dataset's content id: 16 hex digits of the SHA-256 of its database's id, its parameters and
/// its files' checksums, the same on every machine for the same inputs. A training run records it
/// and refuses to resume on a dataset rebuilt otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct DatasetId(String);

impl DatasetId {
    pub(crate) fn new(id: String) -> Self {
        Self(id)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The id recorded by runs written before datasets had ids: none.
    pub fn is_unknown(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for DatasetId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
