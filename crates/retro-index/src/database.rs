//! The retrieval database: chunk store + keys + HNSW graph + LM tokenizer, described by a versioned
//! manifest, built atomically (temporary directory, then rename) and validated when opened.

use crate::corpus::Corpus;
use crate::embed::{l2_normalize, Embedder, EmbedderId};
use crate::embeddings::{Embeddings, EMBEDDINGS_FILE};
use crate::error::{IndexError, Result};
use crate::hnsw::{brute_force_batch, mean_recall_at_k, Hit, HnswIndex, HnswParams};
use crate::ids::{ChunkId, DatabaseId};
use crate::key_index::{EmbeddedIndex, KeyFilter, KeyIndex};
use crate::store::{ChunkStore, CHUNKS_FILE, DOCUMENTS_FILE, TOKENS_FILE};
use crate::tokenizer::{LmTokenizer, TOKENIZER_FILE};
use crate::vector_store::{MilvusIndexParams, MilvusLocation, MilvusOptions, VectorStoreRecord};
use rayon::prelude::*;
use retro_format::{is_hex, write_json_atomic, FileTable, FolderKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The database's manifest (`manifest.json`): what makes a folder a database.
pub const MANIFEST_FILE: &str = FolderKind::Database.marker();
/// Version of the database layout this build reads and writes.
pub const FORMAT_VERSION: u32 = FolderKind::Database.version();
const HNSW_DIR: &str = "hnsw";
/// The files every database has, wherever its keys are indexed: the chunk store, the keys and the
/// LM tokenizer. The manifest lists them (and the graph's, when it is embedded).
const DATA_FILES: [&str; 5] = [
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

/// Files up to this size are checksummed on every open; larger ones by [`Database::verify`] or
/// [`OpenOptions::verify_checksums`].
pub const SMALL_FILE_BYTES: u64 = 8 << 20;

/// What to do about a damaged database file.
const REBUILD: &str = "rebuild the database (`retro index build --overwrite`)";

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

/// Build stages reported to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tokenizing,
    Embedding,
    Inserting,
    Writing,
}

/// `progress(stage, done, total)`.
pub type ProgressFn = Arc<dyn Fn(Stage, usize, usize) + Send + Sync>;

/// Options of [`Database::build`].
#[derive(Clone)]
pub struct BuildOptions {
    pub chunk_len: usize,
    pub hnsw: HnswParams,
    /// Chunks handed to the embedder at a time.
    pub batch_size: usize,
    pub progress: Option<ProgressFn>,
    /// Replace an existing database at `out_dir` (otherwise it is an error).
    pub overwrite: bool,
    /// Recorded in the manifest so that tools can reload the same embedder (e.g. its model directory).
    pub embedder_source: Option<String>,
    /// Put the keys into a Milvus collection with this index instead of the embedded graph
    /// (needs the `milvus` feature). `overwrite` also allows replacing the collection.
    pub vector_store: Option<(MilvusLocation, MilvusIndexParams)>,
    pub milvus: MilvusOptions,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            chunk_len: 64,
            hnsw: HnswParams::default(),
            batch_size: 256,
            progress: None,
            overwrite: false,
            embedder_source: None,
            vector_store: None,
            milvus: MilvusOptions::default(),
        }
    }
}

/// Options of [`Database::open_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Recompute every file's SHA-256 (sizes are always checked).
    pub verify_checksums: bool,
    /// Batch size and attempts for a database whose keys live in Milvus.
    pub milvus: MilvusOptions,
}

/// Recall of the HNSW graph against exact search over the stored keys.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RecallReport {
    pub sample: usize,
    pub k: usize,
    pub ef: usize,
    pub recall: f64,
    pub hnsw_queries_per_s: f64,
    pub brute_force_queries_per_s: f64,
}

/// An opened retrieval database.
pub struct Database {
    dir: PathBuf,
    manifest: Manifest,
    store: Arc<ChunkStore>,
    embeddings: Embeddings,
    index: Box<dyn KeyIndex>,
    tokenizer: LmTokenizer,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("dir", &self.dir)
            .field("id", &self.manifest.database_id)
            .field("store", &self.store)
            .finish()
    }
}

/// The queries as unit vectors, as the stored keys are.
fn normalized(queries: &[Vec<f32>]) -> Vec<Vec<f32>> {
    queries
        .iter()
        .map(|q| {
            let mut q = q.clone();
            l2_normalize(&mut q);
            q
        })
        .collect()
}

/// What build step 5 indexes: the keys (`n x dim`, row-major) and the chunks they belong to.
struct Keys<'a> {
    vectors: Vec<f32>,
    dim: usize,
    store: &'a ChunkStore,
}

/// Puts the keys into a new Milvus collection, in batches, with their chunk, document and start.
#[cfg(feature = "milvus")]
fn build_milvus(
    keys: &Keys,
    database_id: &DatabaseId,
    loc: &MilvusLocation,
    params: MilvusIndexParams,
    opts: &BuildOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<VectorStoreRecord> {
    use crate::key_index::{KeyIndexBuilder, KeyRef};
    use crate::milvus_store::MilvusBuilder;
    let (dim, store) = (keys.dim, keys.store);
    let mut b = MilvusBuilder::create(loc, dim, params, database_id, opts.overwrite, opts.milvus)?;
    let n = store.len();
    let step = b.batch_size();
    for first in (0..n).step_by(step) {
        let last = (first + step).min(n);
        let refs: Vec<KeyRef> = (first..last)
            .map(|c| KeyRef {
                chunk: ChunkId(c),
                document: store.document_of(ChunkId(c)),
                start: store.chunk_start(ChunkId(c)),
            })
            .collect();
        b.add(&keys.vectors[first * dim..last * dim], &refs)?;
        progress(last, n);
    }
    let record = b.record(n);
    Box::new(b).finish()?;
    Ok(record)
}

#[cfg(not(feature = "milvus"))]
fn build_milvus(
    _: &Keys,
    _: &DatabaseId,
    loc: &MilvusLocation,
    _: MilvusIndexParams,
    _: &BuildOptions,
    _: &dyn Fn(usize, usize),
) -> Result<VectorStoreRecord> {
    Err(no_milvus(loc))
}

#[cfg(not(feature = "milvus"))]
fn no_milvus(loc: &MilvusLocation) -> IndexError {
    IndexError::Store {
        location: loc.to_string(),
        message: "this build has no Milvus support: build with `--features milvus`".into(),
    }
}

/// What `Database::build` checks before it writes anything: a corpus with documents, a chunk
/// length in range, and an output folder that does not hold the corpus.
fn check_build_inputs(corpus: &Corpus, opts: &BuildOptions, out_dir: &Path) -> Result<()> {
    if corpus.documents.is_empty() {
        return Err(IndexError::EmptyCorpus {
            empty_skipped: corpus.empty_skipped,
        });
    }
    if opts.chunk_len == 0 || opts.chunk_len > MAX_CHUNK_LEN {
        return Err(IndexError::invalid(
            "chunk_len",
            opts.chunk_len,
            format!("must be between 1 and {MAX_CHUNK_LEN} tokens (the paper uses 64)"),
        ));
    }
    // Never write into the corpus: replacing the folder would delete the documents.
    if let Ok(out_abs) = out_dir.canonicalize() {
        if let Some(d) = corpus.documents.iter().find(|d| {
            let src = d
                .source
                .rsplit_once(':')
                .map_or(d.source.as_str(), |(p, l)| {
                    if l.parse::<usize>().is_ok() {
                        p
                    } else {
                        d.source.as_str()
                    }
                });
            Path::new(src)
                .canonicalize()
                .is_ok_and(|p| p.starts_with(&out_abs))
        }) {
            return Err(IndexError::invalid(
                "out_dir",
                out_dir.display(),
                format!(
                    "holds the corpus itself ({}): the database must go elsewhere",
                    d.source
                ),
            ));
        }
    }
    Ok(())
}

/// Build step 1: every document's token ids, in corpus order.
fn tokenize(
    corpus: &Corpus,
    tokenizer: &LmTokenizer,
    report: &(dyn Fn(Stage, usize, usize) + Sync),
) -> Result<Vec<Vec<u32>>> {
    let n_docs = corpus.documents.len();
    let done = AtomicUsize::new(0);
    report(Stage::Tokenizing, 0, n_docs);
    let tokens: Vec<Vec<u32>> = corpus
        .documents
        .par_iter()
        .map(|d| {
            let t = tokenizer.encode(&d.text).map_err(|e| {
                IndexError::Tokenizer(format!("document {:?} ({}): {e}", d.id, d.source))
            });
            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
            if k & 63 == 0 {
                report(Stage::Tokenizing, k, n_docs);
            }
            t
        })
        .collect::<Result<_>>()?;
    report(Stage::Tokenizing, n_docs, n_docs);
    Ok(tokens)
}

/// Build step 3: the unit key of every chunk of `store`, row-major, embedded `batch_size` chunks
/// at a time.
fn embed_chunks(
    store: &ChunkStore,
    tokenizer: &LmTokenizer,
    embedder: &dyn Embedder,
    batch_size: usize,
    report: &(dyn Fn(Stage, usize, usize) + Sync),
) -> Result<Vec<f32>> {
    let n = store.len();
    let dim = embedder.dim();
    let mut vectors = Vec::with_capacity(n * dim);
    report(Stage::Embedding, 0, n);
    let batch = batch_size.max(1);
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let texts: Vec<String> = (start..end)
            .into_par_iter()
            .map(|i| tokenizer.decode(store.chunk_tokens(ChunkId(i))))
            .collect::<Result<_>>()?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vs = embedder.embed(&refs)?;
        if vs.len() != refs.len() {
            return Err(IndexError::Embedder(format!(
                "returned {} vectors for {} texts",
                vs.len(),
                refs.len()
            )));
        }
        for (j, v) in vs.iter().enumerate() {
            if v.len() != dim {
                return Err(IndexError::Embedder(format!(
                    "chunk {}: vector of {} floats, dim is {dim}",
                    start + j,
                    v.len()
                )));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(IndexError::Embedder(format!(
                    "chunk {} ({:?}): the key has NaN or infinite components",
                    start + j,
                    refs[j]
                )));
            }
            // The graph's distance assumes unit keys: normalise every key, whatever the model
            // does (plain BERT has no Normalize module, and raw norms would decide the ranking).
            let start_of = vectors.len();
            vectors.extend_from_slice(v);
            // (A zero key, e.g. the lexical embedder's for a chunk of punctuation, stays zero.)
            l2_normalize(&mut vectors[start_of..]);
        }
        report(Stage::Embedding, end, n);
    }
    Ok(vectors)
}

/// Build step 2: the chunk store of the tokenized documents, written into `tmp` and opened, with
/// its counts. A corpus whose documents give no chunk is refused here.
fn write_chunk_store(
    tmp: &Path,
    corpus: &Corpus,
    tokens: Vec<Vec<u32>>,
    tokenizer: &LmTokenizer,
    chunk_len: usize,
) -> Result<(ChunkStore, Counts)> {
    let counts = ChunkStore::write(
        tmp,
        corpus
            .documents
            .iter()
            .zip(&tokens)
            .map(|(d, t)| (d.id.as_str(), d.source.as_str(), t.as_slice())),
        chunk_len,
        tokenizer.pad_id(),
    )?;
    // The tokens are in the store now: free them before the keys are embedded.
    drop(tokens);
    let store = ChunkStore::open(tmp)?;
    if store.is_empty() {
        return Err(IndexError::EmptyCorpus {
            empty_skipped: corpus.empty_skipped,
        });
    }
    let counts = Counts {
        documents: counts.documents,
        empty_skipped: corpus.empty_skipped,
        chunks: counts.chunks,
        tokens: counts.tokens,
    };
    Ok((store, counts))
}

/// Build step 4's result: the files written so far and what the database is built with, under
/// the id they give.
struct Identity {
    files: FileTable,
    tokenizer: TokenizerInfo,
    embedder: EmbedderId,
    database_id: DatabaseId,
}

/// Build step 4: saves the tokenizer beside the store and the keys in `tmp`, records every data
/// file's size and checksum, and derives the id from them and the parameters.
fn identify(
    tmp: &Path,
    tokenizer: &LmTokenizer,
    embedder: &dyn Embedder,
    opts: &BuildOptions,
) -> Result<Identity> {
    tokenizer.save(tmp)?;
    let files = FileTable::record(tmp, DATA_FILES)?;
    let embedder = embedder.id();
    let tokenizer = TokenizerInfo {
        kind: tokenizer.kind().into(),
        fingerprint: tokenizer.fingerprint(),
        vocab_size: tokenizer.vocab_size(),
        pad_id: tokenizer.pad_id(),
    };
    let database_id = database_id(opts, &tokenizer, &embedder, &files);
    Ok(Identity {
        files,
        tokenizer,
        embedder,
        database_id,
    })
}

/// Build step 6: the manifest of a database with this identity (its files now including the
/// graph's), counts and index (the graph's basename, or the store's record).
fn manifest(
    identity: Identity,
    opts: &BuildOptions,
    dim: usize,
    counts: Counts,
    (hnsw_basename, vector_store): (String, Option<VectorStoreRecord>),
) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        database_id: identity.database_id,
        created_by: format!("retro-index {}", env!("CARGO_PKG_VERSION")),
        chunk_len: opts.chunk_len,
        tokenizer: identity.tokenizer,
        dim,
        embedder: identity.embedder,
        embedder_source: opts.embedder_source.clone(),
        counts,
        hnsw: opts.hnsw,
        hnsw_basename,
        files: identity.files,
        key_metric: Some(KEY_METRIC.into()),
        vector_store,
    }
}

/// Build step 4's id: a function of the inputs and the parameters (the chunks, keys
/// and tokenizer, and the index's parameters), not of the graph's bytes, which parallel insertion
/// varies between builds. So a rebuilt database keeps its id and the datasets built on it.
fn database_id(
    opts: &BuildOptions,
    tokenizer_info: &TokenizerInfo,
    embedder_id: &EmbedderId,
    files: &FileTable,
) -> DatabaseId {
    let index_params = match &opts.vector_store {
        None => format!("{:?}", opts.hnsw),
        Some((_, p)) => format!("milvus {p:?}"),
    };
    let params = format!(
        "{}|{}|{}|{}",
        opts.chunk_len, tokenizer_info.fingerprint, embedder_id.weights_hash, index_params,
    );
    DatabaseId::new(files.content_id(&params))
}

/// Build step 5: the keys indexed, in the embedded graph (saved into `tmp`, its files added to
/// `files`) or in a Milvus collection. Returns the graph's basename (empty for Milvus) and the
/// store's record for the manifest.
fn build_key_index(
    keys: Keys,
    database_id: &DatabaseId,
    opts: &BuildOptions,
    tmp: &Path,
    files: &mut FileTable,
    report: &(dyn Fn(Stage, usize, usize) + Sync),
) -> Result<(String, Option<VectorStoreRecord>)> {
    let n = keys.store.len();
    report(Stage::Inserting, 0, n);
    let progress = |d: usize, t: usize| report(Stage::Inserting, d, t);
    Ok(match &opts.vector_store {
        None => {
            let keys = Embeddings::from_vec(keys.vectors, keys.dim)?;
            let index = HnswIndex::build_keys(keys, opts.hnsw, Some(&progress))?;
            report(Stage::Writing, 0, 1);
            let basename = index.save(&tmp.join(HNSW_DIR))?;
            for name in HnswIndex::file_names(&basename) {
                files.add(tmp, &format!("{HNSW_DIR}/{name}"))?;
            }
            (basename, None)
        }
        Some((loc, params)) => {
            let record = build_milvus(&keys, database_id, loc, *params, opts, &progress)?;
            report(Stage::Writing, 0, 1);
            (String::new(), Some(record))
        }
    })
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
    /// Tokenizes, chunks, embeds and indexes `corpus` into `out_dir`. Everything is written into a
    /// temporary directory beside `out_dir`, renamed into place at the end: an interrupted build
    /// leaves no directory that claims to be a database.
    pub fn build(
        corpus: &Corpus,
        tokenizer: &LmTokenizer,
        embedder: &dyn Embedder,
        opts: &BuildOptions,
        out_dir: &Path,
    ) -> Result<Database> {
        check_build_inputs(corpus, opts, out_dir)?;
        let staged = FolderKind::Database.stage(out_dir, opts.overwrite)?;
        let report = |s: Stage, d: usize, t: usize| {
            if let Some(p) = &opts.progress {
                p(s, d, t)
            }
        };
        let tmp = staged.path().to_owned();

        // 1. Tokenize (parallel over documents).
        let tokens = tokenize(corpus, tokenizer, &report)?;

        // 2. Chunk store.
        let (store, counts) = write_chunk_store(&tmp, corpus, tokens, tokenizer, opts.chunk_len)?;

        // 3. Keys: decode each chunk, embed in batches.
        let dim = embedder.dim();
        let vectors = embed_chunks(&store, tokenizer, embedder, opts.batch_size, &report)?;
        Embeddings::write(&tmp.join(EMBEDDINGS_FILE), &vectors)?;

        // 4. The id, from the files written so far and the parameters.
        let mut identity = identify(&tmp, tokenizer, embedder, opts)?;

        // 5. The index: the embedded graph in the folder, or a Milvus collection.
        let keys = Keys {
            vectors,
            dim,
            store: &store,
        };
        let id = &identity.database_id;
        let index = build_key_index(keys, id, opts, &tmp, &mut identity.files, &report)?;

        // 6. Manifest, last.
        let manifest = manifest(identity, opts, dim, counts, index);
        write_json_atomic(&tmp.join(MANIFEST_FILE), &manifest)?;
        drop(store);

        // 7. Into place.
        staged.commit()?;
        report(Stage::Writing, 1, 1);
        Database::open(out_dir)
    }

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

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The database's content id.
    pub fn id(&self) -> &DatabaseId {
        &self.manifest.database_id
    }
    pub fn chunk_len(&self) -> usize {
        self.manifest.chunk_len
    }
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }
    pub fn embeddings(&self) -> &Embeddings {
        &self.embeddings
    }
    /// The embedded HNSW graph, when the keys live in the folder (not in a vector store).
    pub fn hnsw(&self) -> Option<&HnswIndex> {
        self.index.as_hnsw()
    }

    /// The key index, whichever store holds it.
    pub fn index(&self) -> &dyn KeyIndex {
        self.index.as_ref()
    }
    /// The embedder the keys were made with: the lexical one the manifest names, or the BERT
    /// model folder it records (`bert_dir` instead, when the folder has moved).
    pub fn own_embedder(
        &self,
        bert_dir: Option<&Path>,
        device: &candle_core::Device,
        opts: crate::BertOptions,
    ) -> Result<Box<dyn Embedder>> {
        let m = &self.manifest;
        if bert_dir.is_none() {
            if let Some(features) = crate::LexicalFeatures::from_name(&m.embedder.name) {
                return Ok(Box::new(crate::LexicalEmbedder::with_features(
                    m.dim, features,
                )?));
            }
        }
        let dir = match (bert_dir, &m.embedder_source) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(s)) => PathBuf::from(s),
            (None, None) => {
                return Err(IndexError::Embedder(format!(
                    "the database was built with {} and does not record where it was loaded \
                     from: give its model folder",
                    m.embedder
                )))
            }
        };
        Ok(Box::new(crate::BertEmbedder::load_with(
            &dir, device, opts,
        )?))
    }

    /// The LM tokenizer stored with the database.
    pub fn load_tokenizer(&self) -> Result<LmTokenizer> {
        Ok(self.tokenizer.clone())
    }

    /// The LM tokenizer stored with the database (checked against the manifest on open).
    pub fn tokenizer(&self) -> &LmTokenizer {
        &self.tokenizer
    }

    /// Errors unless `tokenizer` is the one the database was built with.
    pub fn check_compatible(&self, tokenizer: &LmTokenizer) -> Result<()> {
        let fp = tokenizer.fingerprint();
        if fp != self.manifest.tokenizer.fingerprint {
            return Err(IndexError::Mismatch {
                field: "tokenizer",
                database: format!(
                    "{} {}",
                    self.manifest.tokenizer.kind, self.manifest.tokenizer.fingerprint
                ),
                given: format!("{} {fp}", tokenizer.kind()),
            });
        }
        Ok(())
    }

    /// Errors unless `embedder` is the one the database was built with (name, weights, dim).
    pub fn check_embedder(&self, embedder: &dyn Embedder) -> Result<()> {
        let id = embedder.id();
        if id != self.manifest.embedder {
            return Err(IndexError::Mismatch {
                field: "embedder",
                database: self.manifest.embedder.to_string(),
                given: id.to_string(),
            });
        }
        Ok(())
    }

    /// Errors unless the database uses `chunk_len`.
    pub fn check_chunk_len(&self, chunk_len: usize) -> Result<()> {
        if chunk_len != self.manifest.chunk_len {
            return Err(IndexError::Mismatch {
                field: "chunk_len",
                database: self.manifest.chunk_len.to_string(),
                given: chunk_len.to_string(),
            });
        }
        Ok(())
    }

    /// The `k` nearest chunks to a key (normalised here), at the default ef.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        self.search_ef(query, k, None)
    }

    pub fn search_ef(&self, query: &[f32], k: usize, ef: Option<usize>) -> Result<Vec<Hit>> {
        let q = normalized(std::slice::from_ref(&query.to_vec()));
        Ok(self.index.search(&q, k, ef)?.pop().unwrap_or_default())
    }

    /// Many keys in parallel.
    pub fn search_batch(
        &self,
        queries: &[Vec<f32>],
        k: usize,
        ef: Option<usize>,
    ) -> Result<Vec<Vec<Hit>>> {
        self.index.search(&normalized(queries), k, ef)
    }

    /// The `k` nearest chunks of each key that its filter keeps (one filter per key), e.g. the
    /// self-retrieval filter `Exclusion::document(my_doc)`: exactly `k` whenever `k` exist.
    pub fn search_filtered(
        &self,
        queries: &[Vec<f32>],
        k: usize,
        ef: Option<usize>,
        filters: &[KeyFilter],
    ) -> Result<Vec<Vec<Hit>>> {
        self.index
            .search_filtered(&normalized(queries), k, ef, filters)
    }

    /// Embeds texts with `embedder` (checked against the manifest) and searches.
    pub fn search_texts(
        &self,
        embedder: &dyn Embedder,
        texts: &[&str],
        k: usize,
        ef: Option<usize>,
    ) -> Result<Vec<Vec<Hit>>> {
        self.check_embedder(embedder)?;
        let keys = embedder.embed(texts)?;
        self.search_batch(&keys, k, ef)
    }

    /// Recall@k of the graph against brute force over the stored keys, on `sample` chunks spread
    /// evenly over the database, with their own keys as queries.
    pub fn recall(&self, sample: usize, k: usize, ef: Option<usize>) -> Result<RecallReport> {
        let n = self.store.len();
        let sample = sample.min(n).max(1);
        let ids: Vec<usize> = (0..sample).map(|i| i * n / sample).collect();
        let queries: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| self.embeddings.row(i).to_vec())
            .collect();
        let ef_used = ef.unwrap_or(self.manifest.hnsw.ef_search).max(k);
        let t = std::time::Instant::now();
        let approx = self.index.search(&queries, k, Some(ef_used))?;
        let hnsw_s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let dim = self.manifest.dim;
        let all = self.embeddings.as_slice();
        let exact = brute_force_batch(all, dim, &queries, k);
        let bf_s = t.elapsed().as_secs_f64();
        let recall = mean_recall_at_k(&exact, &approx, k);
        Ok(RecallReport {
            sample,
            k,
            ef: ef_used,
            recall,
            hnsw_queries_per_s: sample as f64 / hnsw_s.max(1e-9),
            brute_force_queries_per_s: sample as f64 / bf_s.max(1e-9),
        })
    }
}
