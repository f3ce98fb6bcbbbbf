//! Approximate nearest-neighbour index over L2-normalised keys: hnsw_rs with [`DistUnitDot`],
//! parallel insertion, persistence and reload without rebuilding, plain, batched and filtered search.

use crate::distance::DistUnitDot;
use crate::error::{IndexError, Result};
use crate::flat::FlatGraph;
use crate::ids::ChunkId;
use hnsw_rs::prelude::{AnnT, Hnsw, HnswIo};
use rayon::prelude::*;
use std::path::Path;

/// HNSW parameters. The defaults reach recall@10 >= 0.95 on MiniLM-like keys at 100k points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HnswParams {
    /// Links per node (layer 0 gets `2 * m`).
    pub m: usize,
    pub ef_construction: usize,
    /// Default search breadth (raised to `k` when smaller).
    pub ef_search: usize,
    /// Insert one key at a time: the same keys then give the same graph (and the same neighbours)
    /// on every build, at the cost of the parallel insertion's speed.
    #[serde(default)]
    pub deterministic: bool,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            ef_search: 128,
            deterministic: false,
        }
    }
}

impl std::fmt::Display for HnswParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HNSW M={} efConstruction={} ef={}",
            self.m, self.ef_construction, self.ef_search
        )
    }
}

/// Basename of the graph files inside the index directory.
pub const HNSW_BASENAME: &str = "graph";
const MAX_LAYER: usize = 16;
const INSERT_BLOCK: usize = 2048;

/// A search hit: chunk id and distance `1 - cosine` (0 = identical direction).
pub type Hit = (ChunkId, f32);

/// The HNSW graph over chunk keys.
pub struct HnswIndex {
    // Reloaded graphs borrow their `HnswIo`, which is leaked (a few hundred bytes, no vector data:
    // reload copies the vectors into the graph) so that the index can be `'static`.
    hnsw: Hnsw<'static, f32, DistUnitDot>,
    /// Fast read-only copy used by unfiltered searches (see [`crate::flat`]).
    flat: Option<FlatGraph>,
    dim: usize,
    params: HnswParams,
}

/// Checks a query: right width, finite values.
fn check_vector(v: &[f32], dim: usize, what: &str) -> Result<()> {
    if v.len() != dim {
        return Err(IndexError::invalid(
            "vector length",
            v.len(),
            format!("{what}: the index has dimension {dim}"),
        ));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::invalid(
            "vector component",
            v[i],
            format!("{what}: component {i} is not finite"),
        ));
    }
    Ok(())
}

impl HnswIndex {
    /// Builds the graph from `n * dim` row-major vectors (row i gets id i), inserting in parallel.
    /// `progress(done, total)` is called after each block. NaN or infinite components are an error;
    /// zero vectors are accepted (distance 1 to everything).
    pub fn build(
        vectors: &[f32],
        dim: usize,
        params: HnswParams,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<Self> {
        if dim == 0 || vectors.len() / dim * dim != vectors.len() {
            return Err(IndexError::invalid(
                "dim",
                dim,
                format!("{} floats are not whole rows", vectors.len()),
            ));
        }
        if params.m < 2 || params.m > 255 || params.ef_construction == 0 {
            return Err(IndexError::invalid(
                "hnsw m / ef_construction",
                format!("{} / {}", params.m, params.ef_construction),
                "m must be in 2..=255, ef_construction > 0",
            ));
        }
        let n = vectors.len() / dim;
        for (i, row) in vectors.chunks_exact(dim).enumerate() {
            check_vector(row, dim, &format!("vector {i}"))?;
        }
        let mut hnsw = Hnsw::new(
            params.m,
            n.max(1),
            MAX_LAYER,
            params.ef_construction,
            DistUnitDot,
        );
        let rows: Vec<(&[f32], usize)> = vectors
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, r)| (r, i))
            .collect();
        let mut done = 0;
        for block in rows.chunks(INSERT_BLOCK) {
            if params.deterministic {
                for &(r, i) in block {
                    hnsw.insert_slice((r, i));
                }
            } else {
                hnsw.parallel_insert_slice(&block.to_vec());
            }
            done += block.len();
            if let Some(p) = progress {
                p(done, n);
            }
        }
        hnsw.set_searching_mode(true);
        let flat = FlatGraph::from_hnsw(&hnsw, dim);
        Ok(Self {
            hnsw,
            flat,
            dim,
            params,
        })
    }

    pub fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn params(&self) -> HnswParams {
        self.params
    }

    fn hits(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&dyn hnsw_rs::prelude::FilterT>,
    ) -> Vec<Hit> {
        if k == 0 || self.is_empty() {
            return Vec::new();
        }
        let ef = ef.max(k);
        if let (None, Some(flat)) = (filter, &self.flat) {
            return flat
                .search(q, k, ef)
                .into_iter()
                .map(|(c, d)| (ChunkId(c), d))
                .collect();
        }
        let mut hits: Vec<Hit> = self
            .hnsw
            .search_filter(q, k, ef, filter)
            .into_iter()
            .map(|n| (ChunkId(n.d_id), n.distance))
            .collect();
        hits.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        hits
    }

    /// The `k` nearest ids with distances, nearest first. `ef = None` uses `params().ef_search`.
    pub fn search(&self, query: &[f32], k: usize, ef: Option<usize>) -> Result<Vec<Hit>> {
        check_vector(query, self.dim, "query")?;
        Ok(self.hits(query, k, ef.unwrap_or(self.params.ef_search), None))
    }

    /// Many queries in parallel (rayon), results in query order.
    pub fn search_batch(
        &self,
        queries: &[Vec<f32>],
        k: usize,
        ef: Option<usize>,
    ) -> Result<Vec<Vec<Hit>>> {
        for (i, q) in queries.iter().enumerate() {
            check_vector(q, self.dim, &format!("query {i}"))?;
        }
        let ef = ef.unwrap_or(self.params.ef_search);
        Ok(queries
            .par_iter()
            .map(|q| self.hits(q, k, ef, None))
            .collect())
    }

    /// The `k` nearest ids for which `keep(id)` is true (e.g. not from the query's own document).
    /// hnsw_rs filters during the graph walk; if it returns fewer than `k`, this retries with a larger
    /// ef and finally scans exhaustively among kept ids, so `k` are returned whenever `k` exist.
    pub fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        keep: &(dyn Fn(ChunkId) -> bool + Sync),
    ) -> Result<Vec<Hit>> {
        check_vector(query, self.dim, "query")?;
        let f = |id: &usize| keep(ChunkId(*id));
        let mut ef = ef.unwrap_or(self.params.ef_search).max(k);
        loop {
            let hits = self.hits(query, k, ef, Some(&f));
            if hits.len() >= k.min(self.len()) || ef >= self.len() {
                return Ok(hits);
            }
            if ef >= 4 * self.params.ef_search.max(k) {
                return Ok(hits);
            }
            ef *= 2;
        }
    }

    /// Writes `graph.hnsw.graph` and `graph.hnsw.data` into `dir`, which must be empty
    /// (hnsw_rs would silently choose another name otherwise). Returns the basename used.
    pub fn save(&self, dir: &Path) -> Result<String> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let base = self
            .hnsw
            .file_dump(dir, HNSW_BASENAME)
            .map_err(|e| IndexError::Index(format!("{}: dump failed: {e}", dir.display())))?;
        Ok(base)
    }

    /// Reloads a graph written by [`HnswIndex::save`] without rebuilding it. Corrupt files are reported
    /// as errors (hnsw_rs asserts on them; the panic is caught here).
    pub fn load(
        dir: &Path,
        basename: &str,
        dim: usize,
        params: HnswParams,
        expected_len: usize,
    ) -> Result<Self> {
        for ext in ["hnsw.graph", "hnsw.data"] {
            let p = dir.join(format!("{basename}.{ext}"));
            if !p.is_file() {
                return Err(IndexError::missing(
                    p,
                    "the database's HNSW graph is incomplete",
                ));
            }
        }
        let graph = dir.join(format!("{basename}.hnsw.graph"));
        let io = Box::new(HnswIo::new(dir, basename));
        let mut hnsw = match crate::panic_guard::catch(move || load_leaked(io)) {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return Err(IndexError::corrupt(&graph, e)),
            Err(why) => {
                return Err(IndexError::corrupt(
                    &graph,
                    format!("hnsw_rs could not read the graph ({why})"),
                ))
            }
        };
        if hnsw.get_nb_point() != expected_len
            || (expected_len > 0 && hnsw.get_point_indexation().get_data_dimension() != dim)
        {
            return Err(IndexError::corrupt(
                &graph,
                format!(
                    "graph has {} points, expected {expected_len} of dimension {dim}",
                    hnsw.get_nb_point()
                ),
            ));
        }
        hnsw.set_searching_mode(true);
        let flat = FlatGraph::from_hnsw(&hnsw, dim);
        Ok(Self {
            hnsw,
            flat,
            dim,
            params,
        })
    }

    /// Searches with hnsw_rs' own code path (for comparison with the flat search).
    pub fn search_hnsw_rs(&self, query: &[f32], k: usize, ef: Option<usize>) -> Result<Vec<Hit>> {
        check_vector(query, self.dim, "query")?;
        let ef = ef.unwrap_or(self.params.ef_search).max(k);
        let mut hits: Vec<Hit> = self
            .hnsw
            .search(query, k, ef)
            .into_iter()
            .map(|n| (ChunkId(n.d_id), n.distance))
            .collect();
        hits.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        Ok(hits)
    }
}

fn load_leaked(io: Box<HnswIo>) -> std::result::Result<Hnsw<'static, f32, DistUnitDot>, String> {
    Box::leak(io)
        .load_hnsw::<f32, DistUnitDot>()
        .map_err(|e| e.to_string())
}

/// Exact `k` nearest rows of `vectors` (row-major, `dim` wide) to `query` by `1 - dot`, nearest
/// first, ties by id.
///
/// Holds only the `k` best so far (a max-heap), so an answer costs `k` hits of memory, not a
/// distance per row: collecting then truncating left each answer with a capacity of 16 bytes a
/// row, and a benchmark's 1,000 exact answers over 1M keys with 16 GB.
pub fn brute_force(vectors: &[f32], dim: usize, query: &[f32], k: usize) -> Vec<Hit> {
    #[derive(PartialEq)]
    struct Worst(f32, usize);
    impl Eq for Worst {}
    impl PartialOrd for Worst {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Worst {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
        }
    }
    if k == 0 || dim == 0 {
        return Vec::new();
    }
    let k = k.min(vectors.len() / dim);
    let mut best = std::collections::BinaryHeap::with_capacity(k + 1);
    for (i, r) in vectors.chunks_exact(dim).enumerate() {
        let d = (1.0 - crate::distance::dot(r, query)).max(0.0);
        let w = Worst(d, i);
        if best.len() < k {
            best.push(w);
        } else if best.peek().is_some_and(|top| w < *top) {
            best.pop();
            best.push(w);
        }
    }
    best.into_sorted_vec()
        .into_iter()
        .map(|Worst(d, i)| (ChunkId(i), d))
        .collect()
}

/// [`brute_force`] for each of `queries`, in parallel (rayon), in query order.
pub fn brute_force_batch(
    vectors: &[f32],
    dim: usize,
    queries: &[Vec<f32>],
    k: usize,
) -> Vec<Vec<Hit>> {
    queries
        .par_iter()
        .map(|q| brute_force(vectors, dim, q, k))
        .collect()
}

/// Mean [`recall_at_k`] over queries: `exact[i]` against `approx[i]` (0 queries: 0).
pub fn mean_recall_at_k(exact: &[Vec<Hit>], approx: &[Vec<Hit>], k: usize) -> f64 {
    exact
        .iter()
        .zip(approx)
        .map(|(e, a)| recall_at_k(e, a, k))
        .sum::<f64>()
        / exact.len().max(1) as f64
}

/// Recall@k of `approx` against `exact`, robust to ties: an approximate hit counts when its
/// distance is within the exact k-th distance (+1e-6).
pub fn recall_at_k(exact: &[Hit], approx: &[Hit], k: usize) -> f64 {
    let k = k.min(exact.len());
    if k == 0 {
        return 1.0;
    }
    let kth = exact[k - 1].1 + 1e-6;
    let mut seen = std::collections::HashSet::new();
    let good = approx
        .iter()
        .take(k)
        .filter(|h| h.1 <= kth && seen.insert(h.0))
        .count();
    good as f64 / k as f64
}
