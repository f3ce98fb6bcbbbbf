//! The key index: where a database's chunk keys live and how the k nearest are found. Two stores
//! sit behind one trait: the embedded HNSW graph ([`EmbeddedIndex`], the default) and Milvus
//! (`crate::milvus_store`, feature `milvus`). The retriever, dataset builder, eval and generate see only
//! [`KeyIndex`].

use crate::error::Result;
use crate::hnsw::{Hit, HnswIndex};
use crate::ids::{ChunkId, DocumentId};
use crate::queries::Queries;
use crate::store::ChunkStore;
use std::ops::Range;
use std::sync::Arc;

/// Chunks that must not be returned: those of `document` whose start token lies in `starts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    pub document: DocumentId,
    pub starts: Range<usize>,
}

impl Exclusion {
    /// Every chunk of `document`.
    pub fn document(document: DocumentId) -> Self {
        Self {
            document,
            starts: 0..usize::MAX,
        }
    }
}

/// What a filtered search leaves out; empty keeps everything. It is data, not a closure, so a
/// server can evaluate it next to the keys (Milvus: a boolean expression on the document id and
/// the chunk's start), and a filtered search returns exactly k hits whenever k exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    pub exclude: Vec<Exclusion>,
}

impl KeyFilter {
    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty()
    }

    /// Whether a chunk of `document` starting at token `start` may be returned.
    pub fn keeps(&self, document: DocumentId, start: usize) -> bool {
        !self
            .exclude
            .iter()
            .any(|e| e.document == document && e.starts.contains(&start))
    }
}

/// What an index is, for `index info` and the checks on open.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IndexDescription {
    /// `hnsw` (the embedded graph) or `milvus`.
    pub store: String,
    /// Where it lives: the graph's folder, or `milvus://HOST:PORT/COLLECTION`.
    pub location: String,
    /// `unit-l2`: keys and queries L2-normalised, ranked by L2 (the same order as cosine).
    pub metric: String,
    pub dim: usize,
    pub count: usize,
    /// The index type and its parameters, e.g. `HNSW M=16 efConstruction=200 ef=128`.
    pub params: String,
}

/// A chunk's key with what a filter needs to know of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef {
    pub chunk: ChunkId,
    pub document: DocumentId,
    pub start: usize,
}

/// The k-nearest-neighbour index over a database's chunk keys (unit vectors; a hit's distance is
/// `1 - cosine`). Ids are chunk ids of the database's store.
pub trait KeyIndex: Send + Sync {
    fn describe(&self) -> IndexDescription;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn dim(&self) -> usize;
    /// The `k` nearest chunks of each query, nearest first, in query order. `ef` is the search
    /// breadth (HNSW ef, IVF nprobe); `None` uses the index's default.
    fn search(&self, queries: &Queries, k: usize, ef: Option<usize>) -> Result<Vec<Vec<Hit>>>;
    /// As [`KeyIndex::search`], each query with its own filter (`filters.len() == queries.len()`):
    /// exactly `k` hits whenever `k` chunks pass the filter.
    fn search_filtered(
        &self,
        queries: &Queries,
        k: usize,
        ef: Option<usize>,
        filters: &[KeyFilter],
    ) -> Result<Vec<Vec<Hit>>>;
    /// Deletes the index: the Milvus collection, or the embedded graph's files (the database
    /// folder then no longer opens).
    fn drop_index(&self) -> Result<()>;
    /// The embedded graph, for benchmarks that measure it alone.
    fn as_hnsw(&self) -> Option<&HnswIndex> {
        None
    }
}

/// The filtered searches' precondition, one filter per query, as an error rather than a panic.
pub fn check_filters(queries: &Queries, filters: &[KeyFilter]) -> Result<()> {
    if queries.len() != filters.len() {
        return Err(crate::error::IndexError::invalid(
            "filters",
            filters.len(),
            format!("one per query ({} queries)", queries.len()),
        ));
    }
    Ok(())
}

/// A store of keys being built: keys are added in batches with their chunk and document, then
/// the index is finished (built, flushed, loaded) and described for the manifest.
pub trait KeyIndexBuilder {
    fn add(&mut self, keys: &[f32], refs: &[KeyRef]) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<IndexDescription>;
}

/// The embedded HNSW graph, stored in the database folder.
pub struct EmbeddedIndex {
    hnsw: HnswIndex,
    store: Arc<ChunkStore>,
    location: String,
}

impl EmbeddedIndex {
    pub fn new(hnsw: HnswIndex, store: Arc<ChunkStore>, location: String) -> Self {
        Self {
            hnsw,
            store,
            location,
        }
    }

    pub fn hnsw(&self) -> &HnswIndex {
        &self.hnsw
    }
}

impl KeyIndex for EmbeddedIndex {
    fn describe(&self) -> IndexDescription {
        IndexDescription {
            store: "hnsw".into(),
            location: self.location.clone(),
            metric: crate::database::KEY_METRIC.into(),
            dim: self.hnsw.dim(),
            count: self.hnsw.len(),
            params: self.hnsw.params().to_string(),
        }
    }
    fn len(&self) -> usize {
        self.hnsw.len()
    }
    fn dim(&self) -> usize {
        self.hnsw.dim()
    }
    fn search(&self, queries: &Queries, k: usize, ef: Option<usize>) -> Result<Vec<Vec<Hit>>> {
        self.hnsw.search_batch(queries, k, ef)
    }
    fn as_hnsw(&self) -> Option<&HnswIndex> {
        Some(&self.hnsw)
    }
    fn drop_index(&self) -> Result<()> {
        let dir = std::path::Path::new(&self.location);
        std::fs::remove_dir_all(dir).map_err(|e| crate::error::IndexError::io(dir, e))
    }
    fn search_filtered(
        &self,
        queries: &Queries,
        k: usize,
        ef: Option<usize>,
        filters: &[KeyFilter],
    ) -> Result<Vec<Vec<Hit>>> {
        use rayon::prelude::*;
        check_filters(queries, filters)?;
        queries.check(self.hnsw.dim())?;
        let store = &self.store;
        queries
            .par_iter()
            .zip(filters)
            .map(|(q, f)| {
                if f.is_empty() {
                    return self.hnsw.search(q, k, ef);
                }
                let keep = |c: ChunkId| f.keeps(store.document_of(c), store.chunk_start(c));
                // Over-fetch from the fast unfiltered search first; fall back to the graph's
                // filtered walk only when too few candidates survive.
                let over = (8 * k).max(32);
                let hits = self.hnsw.search(q, over, ef.map(|e| e.max(over)))?;
                let kept: Vec<Hit> = hits.into_iter().filter(|h| keep(h.0)).take(k).collect();
                if kept.len() == k {
                    Ok(kept)
                } else {
                    self.hnsw.search_filtered(q, k, ef, &keep)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_what_no_exclusion_covers() {
        let f = KeyFilter {
            exclude: vec![
                Exclusion::document(DocumentId(3)),
                Exclusion {
                    document: DocumentId(1),
                    starts: 10..20,
                },
            ],
        };
        assert!(!f.keeps(DocumentId(3), 0) && !f.keeps(DocumentId(3), usize::MAX - 1));
        assert!(
            f.keeps(DocumentId(1), 9)
                && !f.keeps(DocumentId(1), 10)
                && !f.keeps(DocumentId(1), 19)
                && f.keeps(DocumentId(1), 20)
        );
        assert!(f.keeps(DocumentId(0), 15));
        assert!(KeyFilter::default().keeps(DocumentId(3), 0));
    }
}
