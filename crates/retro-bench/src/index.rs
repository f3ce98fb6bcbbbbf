//! The HNSW measurements behind `retro bench index`: embedding chunks/s and inserts/s while a
//! database is built, then queries/s and recall@k at several ef.

use anyhow::Context;
use retro_index::{
    brute_force_batch, mean_recall_at_k, BuildOptions, Corpus, Database, Embedder, HnswIndex,
    HnswParams, LmTokenizer, Stage, Walk,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What to build and measure.
#[derive(Debug, Clone)]
pub struct HnswBenchParams {
    pub m: usize,
    pub ef_construction: usize,
    /// The ef values to measure.
    pub ef: Vec<usize>,
    pub k: usize,
    /// Queries per ef (stored keys spread over the index).
    pub sample: usize,
}

impl HnswBenchParams {
    /// The graph's parameters (default ef_search, not deterministic: the fast build).
    pub fn hnsw(&self) -> HnswParams {
        HnswParams {
            m: self.m,
            ef_construction: self.ef_construction,
            ef_search: HnswParams::default().ef_search,
            deterministic: false,
        }
    }
}

/// One ef's numbers, for the default walk (over 8-bit codes, exact distances re-measured).
#[derive(Debug, serde::Serialize)]
pub struct EfRow {
    pub ef: usize,
    pub recall: f64,
    pub queries_per_s_parallel: f64,
    pub queries_per_s_one_thread: f64,
    /// The same searches walking the f32 keys (`Walk::Exact`), where the bench owns the graph.
    pub exact_walk: Option<WalkRow>,
}

/// Recall and queries/s of one walk.
#[derive(Debug, serde::Serialize)]
pub struct WalkRow {
    pub recall: f64,
    pub queries_per_s_parallel: f64,
    pub queries_per_s_one_thread: f64,
}

/// One graph's build and per-ef numbers.
#[derive(Debug, serde::Serialize)]
pub struct HnswRun {
    pub points: usize,
    pub dim: usize,
    pub m: usize,
    pub ef_construction: usize,
    pub build_s: f64,
    pub inserts_per_s: f64,
    pub k: usize,
    pub per_ef: Vec<EfRow>,
}

/// The stored vectors `ids` as queries, with their exact answers (brute force over `vectors`).
pub struct EfQueries {
    pub queries: retro_index::Queries,
    pub exact: Vec<Vec<retro_index::Hit>>,
}

impl EfQueries {
    pub fn new(vectors: &[f32], dim: usize, ids: &[usize], k: usize) -> Self {
        let rows: Vec<&[f32]> = ids
            .iter()
            .map(|&i| &vectors[i * dim..(i + 1) * dim])
            .collect();
        let queries = retro_index::Queries::from_rows(&rows).expect("rows of one width");
        let exact = brute_force_batch(vectors, dim, &queries, k);
        Self { queries, exact }
    }
}

/// Times `index` on `q` at each of `efs`, with recall@`k` against their exact answers.
pub fn measure_ef(
    index: &HnswIndex,
    q: &EfQueries,
    k: usize,
    efs: &[usize],
) -> anyhow::Result<Vec<EfRow>> {
    let mut rows = Vec::new();
    for &ef in efs {
        let w = measure_walk(index, q, k, ef)?;
        rows.push(EfRow {
            ef,
            recall: w.recall,
            queries_per_s_parallel: w.queries_per_s_parallel,
            queries_per_s_one_thread: w.queries_per_s_one_thread,
            exact_walk: None,
        });
    }
    Ok(rows)
}

/// Recall and queries/s (batched in parallel, then one by one) of `index`'s walk at `ef`.
fn measure_walk(index: &HnswIndex, q: &EfQueries, k: usize, ef: usize) -> anyhow::Result<WalkRow> {
    let (queries, exact) = (&q.queries, &q.exact);
    let t = Instant::now();
    let approx = index.search_batch(queries, k, Some(ef))?;
    let par = queries.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for q in queries.iter() {
        std::hint::black_box(index.search(q, k, Some(ef))?);
    }
    let one = queries.len() as f64 / t.elapsed().as_secs_f64();
    Ok(WalkRow {
        recall: mean_recall_at_k(exact, &approx, k),
        queries_per_s_parallel: par,
        queries_per_s_one_thread: one,
    })
}

/// `sample` ids (at least one, at most `n`) spread evenly over `0..n`.
pub fn sample_ids(n: usize, sample: usize) -> Vec<usize> {
    let s = sample.min(n).max(1);
    (0..s).map(|i| i * n / s).collect()
}

/// Builds a graph over `v` (`dim` wide rows) and measures it.
pub fn hnsw_run(v: &[f32], dim: usize, p: &HnswBenchParams) -> anyhow::Result<HnswRun> {
    let n = v.len() / dim;
    let t = Instant::now();
    let mut index = HnswIndex::build(v, dim, p.hnsw(), None)?;
    let build_s = t.elapsed().as_secs_f64();
    let q = EfQueries::new(v, dim, &sample_ids(n, p.sample), p.k);
    let mut per_ef = measure_ef(&index, &q, p.k, &p.ef)?;
    index.set_walk(Walk::Exact);
    for row in &mut per_ef {
        row.exact_walk = Some(measure_walk(&index, &q, p.k, row.ef)?);
    }
    Ok(HnswRun {
        points: n,
        dim,
        m: p.m,
        ef_construction: p.ef_construction,
        build_s,
        inserts_per_s: n as f64 / build_s,
        k: p.k,
        per_ef,
    })
}

/// `n` unit vectors of `dim`, uniform in direction, from a xorshift seeded with `seed`.
pub fn uniform_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut v: Vec<f32> = (0..n * dim)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    for r in v.chunks_exact_mut(dim) {
        retro_index::l2_normalize(r);
    }
    v
}

/// How long a database build spent embedding and inserting, seconds.
#[derive(Debug, Clone, Copy)]
pub struct BuildTimes {
    pub embed_s: f64,
    pub insert_s: f64,
}

/// `Database::build` with `opts.progress` replaced by a recorder of when each stage reported:
/// a stage's time is from its first report to its last.
pub fn build_timed(
    corpus: &Corpus,
    tokenizer: &LmTokenizer,
    embedder: &dyn Embedder,
    mut opts: BuildOptions,
    out: &Path,
) -> anyhow::Result<(Database, BuildTimes)> {
    let times: Arc<Mutex<Vec<(Stage, Instant)>>> = Arc::default();
    let t2 = times.clone();
    opts.progress = Some(Arc::new(move |s, _, _| {
        t2.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((s, Instant::now()))
    }));
    let db = Database::build(corpus, tokenizer, embedder, &opts, out)?;
    let times = times.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let span = |stage: Stage| {
        let v: Vec<_> = times.iter().filter(|x| x.0 == stage).collect();
        match (v.first(), v.last()) {
            (Some(a), Some(b)) => b.1.duration_since(a.1).as_secs_f64(),
            _ => 0.0,
        }
    };
    let times = BuildTimes {
        embed_s: span(Stage::Embedding),
        insert_s: span(Stage::Inserting),
    };
    Ok((db, times))
}

/// The database's own graph, measured on its stored keys; `insert_s` from [`build_timed`].
pub fn database_run(db: &Database, p: &HnswBenchParams, insert_s: f64) -> anyhow::Result<HnswRun> {
    let n = db.store().len();
    let dim = db.embeddings().dim();
    let graph = db
        .hnsw()
        .context("`bench index` measures the embedded HNSW graph")?;
    let q = EfQueries::new(
        db.embeddings().as_slice(),
        dim,
        &sample_ids(n, p.sample),
        p.k,
    );
    let per_ef = measure_ef(graph, &q, p.k, &p.ef)?;
    Ok(HnswRun {
        points: n,
        dim,
        m: p.m,
        ef_construction: p.ef_construction,
        build_s: insert_s,
        inserts_per_s: n as f64 / insert_s.max(1e-9),
        k: p.k,
        per_ef,
    })
}

/// `retro bench index` on a corpus: what to build, and what else to measure.
pub struct CorpusBench<'a> {
    pub corpus: &'a Corpus,
    pub tokenizer: &'a LmTokenizer,
    pub embedder: &'a dyn Embedder,
    /// Where the embedder was loaded from, for the manifest.
    pub embedder_source: Option<String>,
    pub chunk_len: usize,
    pub params: HnswBenchParams,
    /// Also measure HNSW alone on this many random unit vectors of this width.
    pub synthetic: Option<(usize, usize)>,
    /// The threads the report names.
    pub threads: usize,
}

/// What [`corpus_run`] measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub threads: usize,
    pub documents: usize,
    pub chunks: usize,
    pub tokens: usize,
    pub chunk_len: usize,
    pub embedder: String,
    pub embed_s: f64,
    pub embed_chunks_per_s: f64,
    pub database: HnswRun,
    pub synthetic: Option<HnswRun>,
}

/// Builds a database of `b.corpus` at `out` (embedding chunks/s and inserts/s), then measures its
/// graph at each ef, and HNSW alone on synthetic vectors if asked.
pub fn corpus_run(b: &CorpusBench, out: &Path) -> anyhow::Result<Report> {
    let opts = BuildOptions {
        chunk_len: b.chunk_len,
        hnsw: b.params.hnsw(),
        batch_size: 256,
        overwrite: true,
        embedder_source: b.embedder_source.clone(),
        ..Default::default()
    };
    let (db, times) = build_timed(b.corpus, b.tokenizer, b.embedder, opts, out)?;
    let n = db.store().len();
    let embed_s = times.embed_s;
    let database = database_run(&db, &b.params, times.insert_s)?;
    let synthetic = match b.synthetic {
        Some((count, dim)) => {
            let v = uniform_unit_vectors(count, dim, 0x9e3779b97f4a7c15);
            Some(hnsw_run(&v, dim, &b.params)?)
        }
        None => None,
    };
    let c = db.manifest().counts;
    Ok(Report {
        threads: b.threads,
        documents: c.documents,
        chunks: c.chunks,
        tokens: c.tokens,
        chunk_len: b.chunk_len,
        embedder: b.embedder.id().to_string(),
        embed_s,
        embed_chunks_per_s: n as f64 / embed_s.max(1e-9),
        database,
        synthetic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_ids_spread_and_stay_in_range() {
        assert_eq!(sample_ids(10, 5), [0, 2, 4, 6, 8]);
        assert_eq!(sample_ids(3, 10), [0, 1, 2]);
        assert_eq!(sample_ids(0, 10), [0]);
    }
}
