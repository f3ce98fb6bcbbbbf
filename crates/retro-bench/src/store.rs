//! The vector-store comparison behind `retro bench index --vector-store milvus://HOST:PORT/COLLECTION`:
//! the same keys in the embedded graph and in Milvus, through the `KeyIndex` trait the
//! pipeline uses: build throughput, query latency at batch 1 (p50, p99), queries/s at batch 1 and
//! 64, recall@k against exact search. Keys come from `--vectors E.npy` (e.g. real MiniLM keys from
//! `retro index export-embeddings`) or `--synthetic N` clustered unit vectors. The embedded half
//! alone, at several sizes, is the scale curve ([`crate::scale`]).

use retro_index::{mean_recall_at_k, Embeddings, Hit, HnswIndex, HnswParams, Queries};
#[cfg(feature = "milvus")]
use retro_index::{ChunkId, DatabaseId, DocumentId};
use std::path::PathBuf;
use std::time::Instant;

/// One store's numbers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoreRun {
    pub store: String,
    pub params: String,
    pub keys: usize,
    pub dim: usize,
    /// Everything until the first search can run (inserts, graph; for Milvus also flush,
    /// index build and load).
    pub build_s: f64,
    pub keys_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub queries_per_s_batch1: f64,
    pub queries_per_s_batch64: f64,
    pub recall: f64,
    pub k: usize,
    /// The process's peak resident memory (Linux `VmHWM`) when this store's half ended: the
    /// peak so far, so a second half in the same process reports the larger of both.
    pub peak_rss_mb: Option<f64>,
    /// The embedded graph's footprint (absent for a vector store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footprint: Option<Footprint>,
}

/// What the embedded graph holds, in memory and on disk.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Footprint {
    /// Links on all layers.
    pub links: usize,
    /// The graph's link lists in memory (their fixed slots, used or not).
    pub graph_memory_mb: f64,
    /// The raw keys: `keys * dim * 4` bytes.
    pub keys_mb: f64,
    /// `graph.links` as written by `HnswIndex::save`.
    pub graph_file_bytes: u64,
    /// What a database stores for the keys (`embeddings.bin`: the keys and a 16-byte header).
    pub keys_file_bytes: u64,
}

/// The process's peak resident set in MiB, where `/proc/self/status` has it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// What [`measure_queries`] found.
pub struct Measured {
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub queries_per_s_batch1: f64,
    pub queries_per_s_batch64: f64,
    pub recall: f64,
}

impl StoreRun {
    fn new(
        store: &str,
        params: String,
        keys: usize,
        dim: usize,
        build_s: f64,
        m: Measured,
        k: usize,
    ) -> Self {
        Self {
            store: store.into(),
            params,
            keys,
            dim,
            build_s,
            keys_per_s: keys as f64 / build_s.max(1e-9),
            latency_ms_p50: m.latency_ms_p50,
            latency_ms_p99: m.latency_ms_p99,
            queries_per_s_batch1: m.queries_per_s_batch1,
            queries_per_s_batch64: m.queries_per_s_batch64,
            recall: m.recall,
            k,
            peak_rss_mb: peak_rss_mb(),
            footprint: None,
        }
    }
}

/// `n` unit vectors in `dim` dimensions around `sqrt(n)` random centres (a mixture, like
/// embeddings of a corpus with topics), from a seeded xorshift; `extra` more from the same
/// mixture serve as queries that are not in the index.
pub fn clustered(n: usize, extra: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut state = seed | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut normal = move || {
        // Box-Muller
        let (u, v) = (uniform().max(1e-12), uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    };
    let centres = ((n as f64).sqrt() as usize).max(1);
    let c: Vec<f32> = (0..centres * dim).map(|_| normal()).collect();
    let mut point = |i: usize| -> Vec<f32> {
        let base = &c[(i % centres) * dim..(i % centres + 1) * dim];
        let mut v: Vec<f32> = base.iter().map(|&x| x + 0.6 * normal()).collect();
        retro_index::l2_normalize(&mut v);
        v
    };
    let mut keys = Vec::with_capacity(n * dim);
    for i in 0..n {
        keys.extend(point(i.wrapping_mul(2654435761)));
    }
    let queries = (0..extra).map(|i| point(n + i * 7919)).collect();
    (keys, queries)
}

/// Unit-normalises `keys` and holds out the last `sample` of them (at least one, at most half) as
/// queries, which are then not indexed.
pub fn hold_out_queries(
    mut keys: Vec<f32>,
    dim: usize,
    sample: usize,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    for r in keys.chunks_exact_mut(dim) {
        retro_index::l2_normalize(r);
    }
    let n = keys.len() / dim;
    let q = sample.min(n / 2).max(1);
    let queries = keys[(n - q) * dim..]
        .chunks_exact(dim)
        .map(<[f32]>::to_vec)
        .collect();
    keys.truncate((n - q) * dim);
    (keys, queries)
}

/// Latency percentile `p` (0..=1) of sorted milliseconds.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A store's search over a batch of queries.
pub type SearchFn<'a> = dyn Fn(&[Vec<f32>]) -> anyhow::Result<Vec<Vec<Hit>>> + 'a;

/// Times `search` at batch 1 (each query alone) and batch 64, and scores recall against `exact`.
pub fn measure_queries(
    queries: &[Vec<f32>],
    exact: &[Vec<Hit>],
    k: usize,
    search: &SearchFn,
) -> anyhow::Result<Measured> {
    let mut ms = Vec::with_capacity(queries.len());
    let mut found = Vec::with_capacity(queries.len());
    let t0 = Instant::now();
    for q in queries {
        let t = Instant::now();
        found.extend(search(std::slice::from_ref(q))?);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let qps1 = queries.len() as f64 / t0.elapsed().as_secs_f64();
    let t = Instant::now();
    for part in queries.chunks(64) {
        std::hint::black_box(search(part)?);
    }
    let qps64 = queries.len() as f64 / t.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    let recall = mean_recall_at_k(exact, &found, k);
    Ok(Measured {
        latency_ms_p50: percentile(&ms, 0.5),
        latency_ms_p99: percentile(&ms, 0.99),
        queries_per_s_batch1: qps1,
        queries_per_s_batch64: qps64,
        recall,
    })
}

/// The embedded graph over `keys` (shared, not copied), saved once to measure its file.
pub fn embedded_run(
    keys: Embeddings,
    params: HnswParams,
    queries: &[Vec<f32>],
    exact: &[Vec<Hit>],
    k: usize,
) -> anyhow::Result<StoreRun> {
    let (n, dim) = (keys.len(), keys.dim());
    let t = Instant::now();
    let index = HnswIndex::build_keys(keys, params, None)?;
    let build_s = t.elapsed().as_secs_f64();
    let search = |q: &[Vec<f32>]| Ok(index.search_batch(&Queries::from_rows(q)?, k, None)?);
    let m = measure_queries(queries, exact, k, &search)?;
    let mut run = StoreRun::new("embedded graph", params.to_string(), n, dim, build_s, m, k);
    let tmp = tempfile::tempdir()?;
    let base = index.save(tmp.path())?;
    let graph_file_bytes = HnswIndex::file_names(&base)
        .iter()
        .map(|f| std::fs::metadata(tmp.path().join(f)).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let mb = |b: usize| b as f64 / (1024.0 * 1024.0);
    run.footprint = Some(Footprint {
        links: index.link_count(),
        graph_memory_mb: mb(index.graph_bytes()),
        keys_mb: mb(n * dim * 4),
        graph_file_bytes,
        keys_file_bytes: (n * dim * 4 + retro_index::array_file::HEADER_LEN) as u64,
    });
    Ok(run)
}

/// A Milvus collection to compare against, with its index and request options.
#[derive(Debug, Clone)]
pub struct MilvusTarget {
    /// `milvus://HOST:PORT/COLLECTION`.
    pub url: String,
    pub index: retro_index::MilvusIndexParams,
    pub opts: retro_index::MilvusOptions,
}

/// The same keys in a Milvus collection (dropped afterwards).
#[cfg(feature = "milvus")]
pub fn milvus_run(h: &HeldOut, target: &MilvusTarget) -> anyhow::Result<StoreRun> {
    use retro_index::key_index::{KeyIndex, KeyIndexBuilder, KeyRef};
    use retro_index::milvus_store::{MilvusBuilder, MilvusIndex};
    let (keys, dim, k) = (h.keys.as_slice(), h.keys.dim(), h.k);
    let MilvusTarget { url, index, opts } = target;
    let (index, opts) = (*index, *opts);
    let loc = retro_index::MilvusLocation::parse(url)?;
    let n = keys.len() / dim;
    let t = Instant::now();
    let mut b = MilvusBuilder::create(&loc, dim, index, &DatabaseId::placeholder(), true, opts)?;
    // One document per 1,000 keys, as if chunked from documents; `add` sends them in batches.
    let refs: Vec<KeyRef> = (0..n)
        .map(|c| KeyRef {
            chunk: ChunkId(c),
            document: DocumentId(c / 1000),
            start: c % 1000,
        })
        .collect();
    b.add(keys, &refs)?;
    let record = b.record(n);
    Box::new(b).finish()?;
    let build_s = t.elapsed().as_secs_f64();
    let store = MilvusIndex::open(&record, opts)?;
    let search = |q: &[Vec<f32>]| Ok(store.search(&Queries::from_rows(q)?, k, None)?);
    let m = measure_queries(&h.queries, &h.exact, k, &search)?;
    store.drop_index()?;
    Ok(StoreRun::new(
        "milvus",
        index.to_string(),
        n,
        dim,
        build_s,
        m,
        k,
    ))
}

/// Refuses `url` in a build without the `milvus` feature, before any work is done.
pub fn milvus_supported(url: &str) -> anyhow::Result<()> {
    if cfg!(feature = "milvus") {
        Ok(())
    } else {
        anyhow::bail!("{url}: this build has no Milvus support: build with `--features milvus`")
    }
}

/// Where the keys of a comparison (or a scale point) come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// An `n x dim` float32 `.npy` file (e.g. real MiniLM keys from `retro index export-embeddings`).
    Vectors(PathBuf),
    /// `n` clustered unit vectors of `dim` ([`clustered`]), plus the held-out queries.
    Synthetic { n: usize, dim: usize },
}

/// The keys of a comparison, the last `sample` held out as queries, with their exact answers.
pub struct HeldOut {
    pub keys: Embeddings,
    pub queries: Vec<Vec<f32>>,
    /// The exact `k` nearest keys of each query.
    pub exact: Vec<Vec<Hit>>,
    pub k: usize,
    /// What the keys are, for the report.
    pub source: String,
}

impl HeldOut {
    /// Loads or makes the keys and holds out `sample` of them (see [`hold_out_queries`]).
    pub fn load(source: &KeySource, sample: usize, k: usize) -> anyhow::Result<Self> {
        let (keys, dim, name) = match source {
            KeySource::Vectors(path) => {
                let (_, d, v) = retro_index::read_npy(path)?;
                (v, d, path.display().to_string())
            }
            KeySource::Synthetic { n, dim } => {
                let (keys, _) = clustered(n + sample, 0, *dim, 42);
                (keys, *dim, format!("{n} clustered synthetic"))
            }
        };
        // The last `sample` keys are the queries, not indexed.
        let (keys, queries) = hold_out_queries(keys, dim, sample);
        let exact = retro_index::brute_force_batch(&keys, dim, &Queries::from_rows(&queries)?, k);
        Ok(Self {
            keys: Embeddings::from_vec(keys, dim)?,
            queries,
            exact,
            k,
            source: name,
        })
    }

    /// The embedded graph over these keys (shared, not copied).
    pub fn embedded_run(&self, params: HnswParams) -> anyhow::Result<StoreRun> {
        embedded_run(
            self.keys.clone(),
            params,
            &self.queries,
            &self.exact,
            self.k,
        )
    }
}

/// What to compare on the same held-out keys: the embedded graph, a store, or both.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub keys: KeySource,
    /// Keys held out as queries.
    pub sample: usize,
    pub k: usize,
    /// The embedded graph's parameters.
    pub hnsw: HnswParams,
    /// Measure the embedded graph.
    pub embedded: bool,
    /// Measure this store (needs the `milvus` feature).
    pub store: Option<MilvusTarget>,
}

/// What [`compare`] has done so far, for the caller to print.
pub enum Progress<'a> {
    /// The keys are ready; the halves come next.
    Loaded(&'a HeldOut),
    /// The store's half starts (its URL).
    Store(&'a str),
    /// The embedded half is measured: reported at once, so that a failure in the store's half
    /// does not lose its numbers.
    Embedded(&'a StoreRun),
}

/// What [`compare`] measured.
#[derive(Debug)]
pub struct Compared {
    /// What the keys are.
    pub source: String,
    pub queries: usize,
    pub runs: Vec<StoreRun>,
}

/// Measures `c`'s halves on the same held-out keys, through the `KeyIndex` trait; a store without
/// Milvus support is refused before any key is loaded.
pub fn compare(c: &Comparison, progress: &mut dyn FnMut(Progress)) -> anyhow::Result<Compared> {
    if let Some(t) = &c.store {
        milvus_supported(&t.url)?;
    }
    let h = HeldOut::load(&c.keys, c.sample, c.k)?;
    progress(Progress::Loaded(&h));
    let mut runs = vec![];
    if c.embedded {
        runs.push(h.embedded_run(c.hnsw)?);
        progress(Progress::Embedded(&runs[0]));
    }
    #[cfg(feature = "milvus")]
    if let Some(target) = &c.store {
        progress(Progress::Store(&target.url));
        runs.push(milvus_run(&h, target)?);
    }
    Ok(Compared {
        source: h.source,
        queries: h.queries.len(),
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clustered_vectors_are_unit_and_clustered() {
        let (keys, queries) = clustered(400, 5, 16, 7);
        assert_eq!((keys.len(), queries.len()), (400 * 16, 5));
        for r in keys.chunks(16).chain(queries.iter().map(Vec::as_slice)) {
            let n: f32 = r.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        // A query's nearest key is much nearer than an average key: there is structure.
        let q = &queries[0];
        let d: Vec<f32> = keys
            .chunks(16)
            .map(|r| 1.0 - r.iter().zip(q).map(|(a, b)| a * b).sum::<f32>())
            .collect();
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        let min = d.iter().cloned().fold(f32::INFINITY, f32::min);
        assert!(min < 0.5 * mean, "min {min} mean {mean}");
    }

    #[test]
    fn held_out_queries_are_the_last_keys_normalised() {
        let keys: Vec<f32> = (1..=10).map(|i| i as f32).collect(); // 5 keys of dim 2
        let (keys, queries) = hold_out_queries(keys, 2, 3); // at most half: 2 queries
        assert_eq!((keys.len(), queries.len()), (3 * 2, 2));
        let n = (9f32 * 9. + 10. * 10.).sqrt();
        assert!((queries[1][0] - 9. / n).abs() < 1e-6 && (queries[1][1] - 10. / n).abs() < 1e-6);
    }

    #[test]
    fn percentiles_pick_the_right_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
