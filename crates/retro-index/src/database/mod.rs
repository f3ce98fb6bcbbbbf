//! The retrieval database: chunk store + keys + HNSW graph + LM tokenizer, described by a versioned
//! manifest, built atomically (temporary directory, then rename) and validated when opened.

mod build;
mod manifest;
mod open;

pub use build::{BuildOptions, ProgressFn, Stage};
pub use manifest::*;
pub use open::OpenOptions;

use crate::embed::Embedder;
use crate::embeddings::Embeddings;
use crate::error::{IndexError, Result};
use crate::hnsw::{brute_force_batch, mean_recall_at_k, Hit, HnswIndex};
use crate::ids::{ChunkId, DatabaseId};
use crate::key_index::{KeyFilter, KeyIndex};
use crate::queries::Queries;
use crate::store::ChunkStore;
use crate::tokenizer::LmTokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

impl Database {
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
        let q = Queries::one(query).normalised();
        Ok(self.index.search(&q, k, ef)?.pop().unwrap_or_default())
    }

    /// Many keys in parallel (normalised here, in place).
    pub fn search_batch(
        &self,
        queries: Queries,
        k: usize,
        ef: Option<usize>,
    ) -> Result<Vec<Vec<Hit>>> {
        self.index.search(&queries.normalised(), k, ef)
    }

    /// The `k` nearest chunks of each key that its filter keeps (one filter per key), e.g. the
    /// self-retrieval filter `Exclusion::document(my_doc)`: exactly `k` whenever `k` exist.
    pub fn search_filtered(
        &self,
        queries: Queries,
        k: usize,
        ef: Option<usize>,
        filters: &[KeyFilter],
    ) -> Result<Vec<Vec<Hit>>> {
        self.index
            .search_filtered(&queries.normalised(), k, ef, filters)
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
        self.search_batch(Queries::from_rows(&keys)?, k, ef)
    }

    /// Recall@k of the graph against brute force over the stored keys, on `sample` chunks spread
    /// evenly over the database, with their own keys as queries.
    pub fn recall(&self, sample: usize, k: usize, ef: Option<usize>) -> Result<RecallReport> {
        let n = self.store.len();
        let sample = sample.min(n).max(1);
        let ids: Vec<usize> = (0..sample).map(|i| i * n / sample).collect();
        let queries = Queries::from_rows(
            &ids.iter()
                .map(|&i| self.embeddings.row(ChunkId(i)))
                .collect::<Vec<_>>(),
        )?;
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
