//! `manifest.json`: what a database is built from and holds, checked field by field when read.

use crate::embed::EmbedderId;
use crate::embeddings::EMBEDDINGS_FILE;
use crate::error::{IndexError, Result};
use crate::hnsw::HnswParams;
use crate::ids::DatabaseId;
use crate::store::{CHUNKS_FILE, DOCUMENTS_FILE, TOKENS_FILE};
use crate::tokenizer::TOKENIZER_FILE;
use crate::vector_store::VectorStoreRecord;
use retro_format::{is_hex, FileTable, FolderKind};
use std::path::Path;

/// The database's manifest (`manifest.json`): what makes a folder a database.
pub const MANIFEST_FILE: &str = FolderKind::Database.marker();
/// Version of the database layout this build reads and writes.
pub const FORMAT_VERSION: u32 = FolderKind::Database.version();
pub(crate) const HNSW_DIR: &str = "hnsw";
/// The files every database has, wherever its keys are indexed: the chunk store, the keys and the
/// LM tokenizer. The manifest lists them (and the graph's, when it is embedded).
pub(crate) const DATA_FILES: [&str; 5] = [
    TOKENS_FILE,
    CHUNKS_FILE,
    DOCUMENTS_FILE,
    EMBEDDINGS_FILE,
    TOKENIZER_FILE,
];

/// The LM tokenizer a database was built with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerInfo {
    pub kind: String,
    pub fingerprint: String,
    pub vocab_size: usize,
    pub pad_id: u32,
}

/// Counts that add up: `documents` stored, `empty_skipped` not stored, `chunks` = sum of ceil(tokens/chunk_len).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub documents: usize,
    pub empty_skipped: usize,
    pub chunks: usize,
    pub tokens: usize,
}

/// `manifest.json`: written last, so a directory without it is not a database.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Content id (hash of the files' checksums and parameters).
    pub database_id: DatabaseId,
    pub created_by: String,
    pub chunk_len: usize,
    pub tokenizer: TokenizerInfo,
    pub embedder: EmbedderId,
    /// Where the embedder was loaded from (e.g. the model directory), as given to the build.
    #[serde(default)]
    pub embedder_source: Option<String>,
    pub dim: usize,
    pub counts: Counts,
    pub hnsw: HnswParams,
    pub hnsw_basename: String,
    /// Path relative to the database directory -> size and SHA-256.
    pub files: FileTable,
    /// How keys are compared: `unit-l2` (every key and query L2-normalised, then ranked by L2
    /// distance, the same order as cosine). Absent in databases built before keys were always
    /// normalised: those stored a model's raw vectors when it had no Normalize module.
    #[serde(default)]
    pub key_metric: Option<String>,
    /// Where the keys are searched: absent for the embedded graph in `hnsw/`, or a
    /// Milvus collection (then there is no graph in the folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_store: Option<VectorStoreRecord>,
}

/// Files up to this size are checksummed on every open; larger ones by [`super::Database::verify`] or
/// [`super::OpenOptions::verify_checksums`].
pub const SMALL_FILE_BYTES: u64 = 8 << 20;

/// What to do about a damaged database file.
pub(crate) const REBUILD: &str = "rebuild the database (`retro index build --overwrite`)";

impl Manifest {
    /// Field checks that need no other file: ids and checksums are hex of the right length,
    /// sizes are positive, names stay inside the database folder.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, why: String| IndexError::corrupt(path, format!("{field}: {why}"));
        if !is_hex(self.database_id.as_str(), 16..=64) {
            return Err(bad(
                "database_id",
                format!("{:?} is not 16-64 hex digits", self.database_id),
            ));
        }
        if !is_hex(&self.tokenizer.fingerprint, 16..=64) {
            return Err(bad(
                "tokenizer.fingerprint",
                format!("{:?} is not 16-64 hex digits", self.tokenizer.fingerprint),
            ));
        }
        if self.chunk_len == 0 || self.chunk_len > MAX_CHUNK_LEN {
            return Err(bad(
                "chunk_len",
                format!("{} is outside 1..={MAX_CHUNK_LEN}", self.chunk_len),
            ));
        }
        if self.dim == 0 || self.dim > 65_536 {
            return Err(bad("dim", format!("{} is outside 1..=65536", self.dim)));
        }
        let h = &self.hnsw;
        if !(2..=255).contains(&h.m)
            || !(1..=1 << 20).contains(&h.ef_construction)
            || !(1..=1 << 20).contains(&h.ef_search)
        {
            return Err(bad(
                "hnsw",
                format!(
                    "m {} ef_construction {} ef_search {}: m must be 2..=255, ef 1..=2^20",
                    h.m, h.ef_construction, h.ef_search
                ),
            ));
        }
        if self.tokenizer.vocab_size == 0 {
            return Err(bad("tokenizer.vocab_size", "is 0".into()));
        }
        if let Some(v) = &self.vector_store {
            if v.dim != self.dim || v.count != self.counts.chunks {
                return Err(bad(
                    "vector_store",
                    format!(
                        "dim {} and count {} disagree with the manifest's dim {} and {} chunks",
                        v.dim, v.count, self.dim, self.counts.chunks
                    ),
                ));
            }
            if v.database_id != self.database_id {
                return Err(bad(
                    "vector_store.database_id",
                    format!("{:?} is not this database's id", v.database_id.as_str()),
                ));
            }
            v.index.validate()?;
        } else if self.hnsw_basename.is_empty()
            || self.hnsw_basename.contains(['/', '\\'])
            || self.hnsw_basename.starts_with('.')
        {
            return Err(bad(
                "hnsw_basename",
                format!("{:?} is not a file name", self.hnsw_basename),
            ));
        }
        for (name, f) in &self.files {
            if Path::new(name)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(bad("files", format!("{name:?} leaves the database folder")));
            }
            if !is_hex(&f.sha256, 64..=64) {
                return Err(bad(
                    &format!("files.{name}.sha256"),
                    format!("{:?} is not 64 hex digits", f.sha256),
                ));
            }
        }
        if let Some(m) = &self.key_metric {
            if m != KEY_METRIC {
                return Err(bad(
                    "key_metric",
                    format!("{m:?}: this build knows only {KEY_METRIC:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// The longest chunk a database may have (the paper uses 64; beyond this a chunk's attention and
/// the store's padding make no sense).
pub const MAX_CHUNK_LEN: usize = 4096;

/// [`Manifest::key_metric`] of every database built now.
pub const KEY_METRIC: &str = "unit-l2";
