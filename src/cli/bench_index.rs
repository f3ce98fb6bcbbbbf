//! `retro bench index`: embedding chunks/s, HNSW inserts/s, queries/s and recall@k at several ef,
//! on (a prefix of) the Python-docs corpus with MiniLM.

use super::index::{load_embedder, load_lm_tokenizer, rayon_threads, EmbedderArgs};
use anyhow::Context;
use clap::Args;
use retro_index::{
    brute_force, read_corpus, recall_at_k, BuildOptions, Corpus, CorpusOptions, Database,
    HnswIndex, HnswParams, Stage,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Args)]
pub struct BenchIndexArgs {
    /// Corpus (default: $RETRO_SHARED/data/python-3.11-docs.jsonl).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Use only the first N documents (MiniLM embeds ~74 chunks/s on 2 CPU cores).
    #[arg(long, default_value_t = 10)]
    pub docs: usize,
    /// LM tokenizer: `char` or a tokenizer.json (default: $RETRO_SHARED/models/gpt2-tokenizer/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
    #[arg(long, default_value_t = 64)]
    pub chunk_len: usize,
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// ef values to measure.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    pub ef: Vec<usize>,
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Queries per ef (stored keys spread over the database).
    #[arg(long, default_value_t = 1000)]
    pub sample: usize,
    /// Also measure HNSW alone on this many random unit vectors (0: skip).
    #[arg(long, default_value_t = 0)]
    pub synthetic: usize,
    #[arg(long, default_value_t = 384)]
    pub synthetic_dim: usize,
    /// Only measure HNSW on these vectors (e.g. from `retro index export-embeddings`), no corpus.
    #[arg(long)]
    pub vectors: Option<PathBuf>,
    /// Keep the database here (e.g. for `retro index export-embeddings`) instead of a temporary directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Compare the embedded graph with this vector store on the same keys (`--vectors` or
    /// `--synthetic` clustered vectors; `--sample` of them held out as queries).
    #[command(flatten)]
    pub store: super::index::VectorStoreArgs,
    /// With `--vector-store`: measure only one half, `embedded` or `store`. At 1M keys the two
    /// halves in one process did not fit a 23 GB machine; run each in its own process.
    #[arg(long, value_parser = ["embedded", "store"], requires = "vector_store")]
    pub only: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// (stage, done, total, when)
type StageEvent = (Stage, usize, usize, Instant);

#[derive(Debug, serde::Serialize)]
struct EfRow {
    ef: usize,
    recall: f64,
    queries_per_s_parallel: f64,
    queries_per_s_one_thread: f64,
    /// hnsw_rs' own search on the same graph, one thread (the flat search is the default).
    queries_per_s_one_thread_hnsw_rs: f64,
    recall_hnsw_rs: f64,
}

#[derive(Debug, serde::Serialize)]
struct HnswRun {
    points: usize,
    dim: usize,
    m: usize,
    ef_construction: usize,
    build_s: f64,
    inserts_per_s: f64,
    k: usize,
    per_ef: Vec<EfRow>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    threads: usize,
    documents: usize,
    chunks: usize,
    tokens: usize,
    chunk_len: usize,
    embedder: String,
    embed_s: f64,
    embed_chunks_per_s: f64,
    database: HnswRun,
    synthetic: Option<HnswRun>,
}

fn measure(
    index: &HnswIndex,
    vectors: &[f32],
    dim: usize,
    ids: &[usize],
    k: usize,
    efs: &[usize],
) -> anyhow::Result<Vec<EfRow>> {
    let queries: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| vectors[i * dim..(i + 1) * dim].to_vec())
        .collect();
    let exact: Vec<_> = queries
        .iter()
        .map(|q| brute_force(vectors, dim, q, k))
        .collect();
    let mut rows = Vec::new();
    for &ef in efs {
        let t = Instant::now();
        let approx = index.search_batch(&queries, k, Some(ef))?;
        let par = queries.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for q in &queries {
            std::hint::black_box(index.search(q, k, Some(ef))?);
        }
        let one = queries.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut rs = Vec::with_capacity(queries.len());
        for q in &queries {
            rs.push(index.search_hnsw_rs(q, k, Some(ef))?);
        }
        let one_rs = queries.len() as f64 / t.elapsed().as_secs_f64();
        let recall_hnsw_rs = exact
            .iter()
            .zip(&rs)
            .map(|(e, a)| recall_at_k(e, a, k))
            .sum::<f64>()
            / queries.len().max(1) as f64;
        let recall = exact
            .iter()
            .zip(&approx)
            .map(|(e, a)| recall_at_k(e, a, k))
            .sum::<f64>()
            / queries.len().max(1) as f64;
        rows.push(EfRow {
            ef,
            recall,
            queries_per_s_parallel: par,
            queries_per_s_one_thread: one,
            queries_per_s_one_thread_hnsw_rs: one_rs,
            recall_hnsw_rs,
        });
    }
    Ok(rows)
}

fn sample_ids(n: usize, sample: usize) -> Vec<usize> {
    let s = sample.min(n).max(1);
    (0..s).map(|i| i * n / s).collect()
}

fn hnsw_run(v: &[f32], d: usize, a: &BenchIndexArgs) -> anyhow::Result<HnswRun> {
    let params = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: HnswParams::default().ef_search,
        deterministic: false,
    };
    let n = v.len() / d;
    let t = Instant::now();
    let index = HnswIndex::build(v, d, params, None)?;
    let build_s = t.elapsed().as_secs_f64();
    let per_ef = measure(&index, v, d, &sample_ids(n, a.sample), a.k, &a.ef)?;
    Ok(HnswRun {
        points: n,
        dim: d,
        m: a.m,
        ef_construction: a.ef_construction,
        build_s,
        inserts_per_s: n as f64 / build_s,
        k: a.k,
        per_ef,
    })
}

fn print_run(name: &str, r: &HnswRun) {
    println!(
        "{name}: {} x {} build M {} efC {}: {:.0} inserts/s ({:.2}s)",
        r.points, r.dim, r.m, r.ef_construction, r.inserts_per_s, r.build_s
    );
    println!(
        "  {:>5} {:>10} {:>14} {:>14} {:>16} {:>16}",
        "ef", "recall@k", "q/s parallel", "q/s 1 thread", "hnsw_rs recall", "hnsw_rs q/s 1t"
    );
    for e in &r.per_ef {
        println!(
            "  {:>5} {:>10.4} {:>14.0} {:>14.0} {:>16.4} {:>16.0}",
            e.ef,
            e.recall,
            e.queries_per_s_parallel,
            e.queries_per_s_one_thread,
            e.recall_hnsw_rs,
            e.queries_per_s_one_thread_hnsw_rs
        );
    }
}

#[cfg(not(feature = "milvus"))]
fn store_comparison(_: &BenchIndexArgs, url: &str) -> anyhow::Result<()> {
    anyhow::bail!("{url}: this build has no Milvus support: build with `--features milvus`")
}

/// The embedded graph against `--vector-store` on the same keys, through the `KeyIndex` trait.
#[cfg(feature = "milvus")]
fn store_comparison(a: &BenchIndexArgs, url: &str) -> anyhow::Result<()> {
    use super::bench_store as bs;
    let (mut keys, dim, source) = match &a.vectors {
        Some(path) => {
            let (_, d, v) = retro_index::read_npy(path)?;
            (v, d, path.display().to_string())
        }
        None if a.synthetic > 0 => {
            let (k, _) = bs::clustered(a.synthetic + a.sample, 0, a.synthetic_dim, 42);
            (
                k,
                a.synthetic_dim,
                format!("{} clustered synthetic", a.synthetic),
            )
        }
        None => {
            anyhow::bail!("--vector-store compares stores on --vectors E.npy or --synthetic N keys")
        }
    };
    for r in keys.chunks_exact_mut(dim) {
        retro_index::l2_normalize(r);
    }
    // The last `sample` keys are the queries, not indexed.
    let n = keys.len() / dim;
    let q = a.sample.min(n / 2).max(1);
    let queries: Vec<Vec<f32>> = keys[(n - q) * dim..]
        .chunks_exact(dim)
        .map(<[f32]>::to_vec)
        .collect();
    keys.truncate((n - q) * dim);
    let exact = bs::exact_top_k(&keys, dim, &queries, a.k);
    let hnsw = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: HnswParams::default().ef_search,
        deterministic: false,
    };
    let (embedded, store) = match a.only.as_deref() {
        Some("embedded") => (true, false),
        Some(_) => (false, true),
        None => (true, true),
    };
    if !a.json {
        eprintln!(
            "{} keys of dim {dim} ({source}), {q} queries{}",
            n - q,
            if embedded { "; hnsw_rs ..." } else { "" }
        );
    }
    let mut runs = vec![];
    if embedded {
        runs.push(bs::embedded_run(&keys, dim, hnsw, &queries, &exact, a.k)?);
        if !a.json {
            // Now, so that a failure in the store's half does not lose the embedded half's numbers.
            eprintln!("{}", serde_json::to_string(&runs[0])?);
        }
    }
    if store {
        let Some((_, index)) = a.store.resolve(hnsw)? else {
            unreachable!("a vector store was given")
        };
        if !a.json {
            eprintln!("{url} ...");
        }
        runs.push(bs::milvus_run(
            &keys,
            dim,
            url,
            index,
            a.store.options(),
            &queries,
            &exact,
            a.k,
        )?);
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "threads": rayon_threads(), "keys": source, "queries": q, "runs": runs
            }))?
        );
    } else {
        println!(
            "threads {}; keys {source}; {q} held-out queries, k {}",
            rayon_threads(),
            a.k
        );
        bs::print_runs(&runs);
    }
    Ok(())
}

pub fn run(a: BenchIndexArgs) -> anyhow::Result<()> {
    if let Some(url) = &a.store.vector_store {
        return store_comparison(&a, url);
    }
    if let Some(path) = &a.vectors {
        let (_, d, v) = retro_index::read_npy(path)?;
        let r = hnsw_run(&v, d, &a)?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "threads": rayon_threads(), "vectors": path, "hnsw": r })
                )?
            );
        } else {
            println!("threads {}; vectors {}", rayon_threads(), path.display());
            print_run("hnsw_rs", &r);
        }
        return Ok(());
    }
    let shared = retro_index::testdata::shared_dir();
    let corpus_path = a
        .corpus
        .clone()
        .unwrap_or_else(|| shared.join("data/python-3.11-docs.jsonl"));
    let mut corpus = read_corpus(&corpus_path, &CorpusOptions::default())
        .with_context(|| format!("reading {}", corpus_path.display()))?;
    corpus.documents.truncate(a.docs);
    let corpus = Corpus {
        documents: corpus.documents,
        empty_skipped: corpus.empty_skipped,
    };
    let tok_spec = a.tokenizer.clone().unwrap_or_else(|| {
        let p = shared.join("models/gpt2-tokenizer/tokenizer.json");
        if p.exists() {
            p.display().to_string()
        } else {
            "char".into()
        }
    });
    let tokenizer = load_lm_tokenizer(&tok_spec, &corpus)?;
    let mut eargs = a.embedder.clone();
    if eargs.embedder.is_none() && eargs.lexical_embedder.is_none() {
        eargs.embedder = Some(shared.join("models/all-MiniLM-L6-v2"));
    }
    let (embedder, source) = load_embedder(&eargs, None)?;

    let times: Arc<Mutex<Vec<StageEvent>>> = Arc::default();
    let t2 = times.clone();
    let params = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: HnswParams::default().ef_search,
        deterministic: false,
    };
    let opts = BuildOptions {
        chunk_len: a.chunk_len,
        hnsw: params,
        batch_size: 256,
        progress: Some(Arc::new(move |s, d, t| {
            t2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((s, d, t, Instant::now()))
        })),
        overwrite: true,
        embedder_source: source,
        ..Default::default()
    };
    let tmp = tempfile::tempdir()?;
    let out = a.keep.clone().unwrap_or_else(|| tmp.path().join("db"));
    if !a.json {
        eprintln!(
            "building a database of {} documents with {} ...",
            corpus.documents.len(),
            embedder.id()
        );
    }
    let db = Database::build(&corpus, &tokenizer, embedder.as_ref(), &opts, &out)?;
    let times = times.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let span = |stage: Stage| {
        let v: Vec<_> = times.iter().filter(|x| x.0 == stage).collect();
        match (v.first(), v.last()) {
            (Some(a), Some(b)) => b.3.duration_since(a.3).as_secs_f64(),
            _ => 0.0,
        }
    };
    let n = db.store().len();
    let embed_s = span(Stage::Embedding);
    let insert_s = span(Stage::Inserting);
    let dim = db.embeddings().dim();
    let vectors = db.embeddings().as_slice();
    let ids = sample_ids(n, a.sample);
    let graph = db
        .hnsw()
        .context("`bench index` measures the embedded hnsw_rs graph")?;
    let per_ef = measure(graph, vectors, dim, &ids, a.k, &a.ef)?;
    let database = HnswRun {
        points: n,
        dim,
        m: a.m,
        ef_construction: a.ef_construction,
        build_s: insert_s,
        inserts_per_s: n as f64 / insert_s.max(1e-9),
        k: a.k,
        per_ef,
    };

    let synthetic = if a.synthetic > 0 {
        let d = a.synthetic_dim;
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut v: Vec<f32> = (0..a.synthetic * d)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        for r in v.chunks_exact_mut(d) {
            retro_index::l2_normalize(r);
        }
        Some(hnsw_run(&v, d, &a)?)
    } else {
        None
    };

    let c = db.manifest().counts;
    let report = Report {
        threads: rayon_threads(),
        documents: c.documents,
        chunks: c.chunks,
        tokens: c.tokens,
        chunk_len: a.chunk_len,
        embedder: embedder.id().to_string(),
        embed_s,
        embed_chunks_per_s: n as f64 / embed_s.max(1e-9),
        database,
        synthetic,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "threads {}; {} documents, {} chunks of {} tokens ({} tokens)",
        report.threads, report.documents, report.chunks, report.chunk_len, report.tokens
    );
    println!(
        "embedding: {} -> {:.1} chunks/s ({:.1}s)",
        report.embedder, report.embed_chunks_per_s, report.embed_s
    );
    print_run("database", &report.database);
    if let Some(r) = &report.synthetic {
        print_run("synthetic", r);
    }
    Ok(())
}
