//! Building a database: tokenize, chunk, embed, index, in a staged folder swapped in whole.

use super::*;
use crate::corpus::Corpus;
use crate::embed::{l2_normalize, Embedder, EmbedderId};
use crate::embeddings::{Embeddings, EMBEDDINGS_FILE};
use crate::error::{IndexError, Result};
use crate::hnsw::{HnswIndex, HnswParams};
use crate::ids::{ChunkId, DatabaseId};
use crate::store::ChunkStore;
use crate::tokenizer::LmTokenizer;
use crate::vector_store::{MilvusIndexParams, MilvusLocation, MilvusOptions, VectorStoreRecord};
use rayon::prelude::*;
use retro_format::{write_json_atomic, FileTable, FolderKind};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    /// Checked between the build's steps and its batches of keys: once set, the build stops with
    /// [`IndexError::Cancelled`] and writes nothing.
    pub cancel: crate::Cancel,
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
            cancel: crate::Cancel::default(),
        }
    }
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
pub(super) fn no_milvus(loc: &MilvusLocation) -> IndexError {
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
    opts: &BuildOptions,
    report: &(dyn Fn(Stage, usize, usize) + Sync),
) -> Result<Vec<f32>> {
    let n = store.len();
    let dim = embedder.dim();
    let mut vectors = Vec::with_capacity(n * dim);
    report(Stage::Embedding, 0, n);
    let batch = opts.batch_size.max(1);
    for start in (0..n).step_by(batch) {
        opts.cancel.check()?;
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
        opts.cancel.check()?;

        // 2. Chunk store.
        let (store, counts) = write_chunk_store(&tmp, corpus, tokens, tokenizer, opts.chunk_len)?;

        // 3. Keys: decode each chunk, embed in batches.
        let dim = embedder.dim();
        let vectors = embed_chunks(&store, tokenizer, embedder, opts, &report)?;
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
        opts.cancel.check()?;

        // 6. Manifest, last.
        let manifest = manifest(identity, opts, dim, counts, index);
        write_json_atomic(&tmp.join(MANIFEST_FILE), &manifest)?;
        drop(store);

        // 7. Into place, unless cancelled by now.
        report(Stage::Writing, 1, 1);
        opts.cancel.check()?;
        staged.commit()?;
        Database::open(out_dir)
    }
}
