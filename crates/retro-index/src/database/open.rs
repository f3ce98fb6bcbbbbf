//! Opening a database: the manifest, every file's size (and the small ones' checksums), the
//! store and tokenizer against the manifest, then the key index.

#[cfg(not(feature = "milvus"))]
use super::build::no_milvus;
use super::*;
use crate::embeddings::{Embeddings, EMBEDDINGS_FILE};
use crate::error::{IndexError, Result};
use crate::hnsw::HnswIndex;
use crate::key_index::{EmbeddedIndex, KeyIndex};
use crate::store::{ChunkStore, CHUNKS_FILE, DOCUMENTS_FILE};
use crate::tokenizer::{LmTokenizer, TOKENIZER_FILE};
use crate::vector_store::MilvusOptions;
use retro_format::FolderKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options of [`Database::open_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Recompute every file's SHA-256 (sizes are always checked).
    pub verify_checksums: bool,
    /// Batch size and attempts for a database whose keys live in Milvus.
    pub milvus: MilvusOptions,
}

/// Opening step 1: the manifest of the database at `dir`, of this format version and valid; a
/// folder without one is told apart from a dataset, a run or nothing at all.
fn read_manifest(dir: &Path) -> Result<(PathBuf, Manifest)> {
    let (mpath, manifest): (PathBuf, Manifest) = FolderKind::Database.read_manifest(dir)?;
    manifest.validate(&mpath)?;
    Ok((mpath, manifest))
}

/// Opening step 2: the manifest lists every file a database needs, and each is there with its
/// recorded size; small files and the graph's are checksummed too (all of them with `verify`).
fn check_files(dir: &Path, mpath: &Path, manifest: &Manifest, verify: bool) -> Result<()> {
    let mut required: Vec<String> = DATA_FILES.map(String::from).into();
    if manifest.vector_store.is_none() {
        // The graph's file, or the hnsw_rs dump of a database built before it.
        let base = &manifest.hnsw_basename;
        let in_dir = |names: Vec<String>| -> Vec<String> {
            names
                .into_iter()
                .map(|f| format!("{HNSW_DIR}/{f}"))
                .collect()
        };
        let native = in_dir(HnswIndex::file_names(base));
        let legacy = in_dir(HnswIndex::legacy_file_names(base));
        let listed = |names: &[String]| names.iter().all(|f| manifest.files.contains(f));
        required.extend(if !listed(&native) && listed(&legacy) {
            legacy
        } else {
            native
        });
    }
    manifest.files.require(mpath, &required)?;
    // Small files are always checksummed: it costs milliseconds. The graph files too, whatever
    // their size: hnsw_rs' loader (older databases) exits the process or reads out of bounds on a
    // malformed dump, so it must only ever see the bytes we wrote; and a graph that passes is one
    // the walk can trust.
    let graph = format!("{HNSW_DIR}/");
    manifest
        .files
        .check(dir, "the manifest", REBUILD, |name, info| {
            verify || info.bytes <= SMALL_FILE_BYTES || name.starts_with(&graph)
        })?;
    Ok(())
}

/// Opening step 3: the chunk store, whose counts and chunk_len must be the manifest's.
fn open_store(dir: &Path, manifest: &Manifest) -> Result<ChunkStore> {
    let store = ChunkStore::open(dir)?;
    let c = &manifest.counts;
    if store.len() != c.chunks
        || store.documents().len() != c.documents
        || store.total_tokens() != c.tokens
        || store.chunk_len() != manifest.chunk_len
    {
        return Err(IndexError::corrupt(
            dir.join(DOCUMENTS_FILE),
            "the store's counts or chunk_len disagree with the manifest",
        ));
    }
    Ok(store)
}

/// Opening step 4: the stored tokenizer, which must be the one the manifest describes (ids,
/// padding, vocabulary) and pad as the store does.
fn load_tokenizer(
    dir: &Path,
    mpath: &Path,
    manifest: &Manifest,
    store: &ChunkStore,
) -> Result<LmTokenizer> {
    let tokenizer = LmTokenizer::load(dir)?;
    let t = &manifest.tokenizer;
    let tpath = dir.join(TOKENIZER_FILE);
    for (field, recorded, actual) in [
        (
            "tokenizer.kind",
            t.kind.clone(),
            tokenizer.kind().to_string(),
        ),
        (
            "tokenizer.fingerprint",
            t.fingerprint.clone(),
            tokenizer.fingerprint(),
        ),
        (
            "tokenizer.vocab_size",
            t.vocab_size.to_string(),
            tokenizer.vocab_size().to_string(),
        ),
        (
            "tokenizer.pad_id",
            t.pad_id.to_string(),
            tokenizer.pad_id().to_string(),
        ),
    ] {
        if recorded != actual {
            return Err(IndexError::corrupt(
                mpath,
                format!(
                    "{field} is {recorded}, but {} gives {actual}",
                    tpath.display()
                ),
            ));
        }
    }
    if store.pad_id() != t.pad_id {
        return Err(IndexError::corrupt(
            dir.join(CHUNKS_FILE),
            format!(
                "pads with id {}, the manifest's pad_id is {}",
                store.pad_id(),
                t.pad_id
            ),
        ));
    }
    Ok(tokenizer)
}

impl Database {
    /// Opens and validates a database: the manifest's version and fields, every file present with
    /// its recorded size, the checksums of the small files and of the HNSW dump, the stored
    /// tokenizer against the manifest. [`Database::verify`] checks the rest.
    pub fn open(dir: &Path) -> Result<Database> {
        Self::open_with(dir, OpenOptions::default())
    }

    /// [`Database::open`] with options: every checksum verified, Milvus' request sizes.
    pub fn open_with(dir: &Path, opts: OpenOptions) -> Result<Database> {
        let (mpath, manifest) = read_manifest(dir)?;
        check_files(dir, &mpath, &manifest, opts.verify_checksums)?;
        let store = open_store(dir, &manifest)?;
        let tokenizer = load_tokenizer(dir, &mpath, &manifest, &store)?;
        let c = &manifest.counts;
        let embeddings = Embeddings::open(&dir.join(EMBEDDINGS_FILE), c.chunks, manifest.dim)?;
        let store = Arc::new(store);
        let index: Box<dyn KeyIndex> = match &manifest.vector_store {
            None => {
                let graph_dir = dir.join(HNSW_DIR);
                let hnsw = HnswIndex::load(
                    &graph_dir,
                    &manifest.hnsw_basename,
                    embeddings.clone(),
                    manifest.hnsw,
                )?;
                Box::new(EmbeddedIndex::new(
                    hnsw,
                    store.clone(),
                    graph_dir.display().to_string(),
                ))
            }
            #[cfg(feature = "milvus")]
            Some(record) => Box::new(crate::milvus_store::MilvusIndex::open(record, opts.milvus)?),
            #[cfg(not(feature = "milvus"))]
            Some(record) => return Err(no_milvus(&record.location)),
        };
        Ok(Database {
            dir: dir.to_path_buf(),
            manifest,
            store,
            embeddings,
            index,
            tokenizer,
        })
    }

    /// Recomputes every file's SHA-256 against the manifest: for operations that read the
    /// database whole (a dataset build), where flipped bytes would otherwise pass unnoticed.
    pub fn verify(&self) -> Result<()> {
        for (name, info) in &self.manifest.files {
            info.check_sha256(&self.dir.join(name), "the manifest", REBUILD)?;
        }
        Ok(())
    }
}
