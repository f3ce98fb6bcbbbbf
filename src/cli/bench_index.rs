//! `retro bench index`: embedding chunks/s, HNSW inserts/s, queries/s and recall@k at several ef,
//! on (a prefix of) the Python-docs corpus with MiniLM; with `--vector-store`, the embedded graph
//! against that store on the same keys. The measurements are `retro_bench::{index, store}`.

use super::index::{load_embedder, load_lm_tokenizer, rayon_threads, EmbedderArgs};
use anyhow::Context;
use clap::Args;
use retro_bench::index::{self as ix, HnswBenchParams, HnswRun};
use retro_index::{read_corpus, BuildOptions, Corpus, CorpusOptions, HnswParams};
use std::path::PathBuf;

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
    /// With `--vector-store`: measure only one half, `embedded` or `store`, so that each half's
    /// peak RSS is its own (a second half in the same process reports the larger of both).
    /// `embedded` alone: the embedded graph on held-out `--vectors` or `--synthetic` keys, with
    /// its peak RSS and bytes on disk (a point of `retro bench scale`).
    #[arg(long, value_parser = ["embedded", "store"])]
    pub only: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl BenchIndexArgs {
    fn params(&self) -> HnswBenchParams {
        HnswBenchParams {
            m: self.m,
            ef_construction: self.ef_construction,
            ef: self.ef.clone(),
            k: self.k,
            sample: self.sample,
        }
    }
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

fn print_run(name: &str, r: &HnswRun) {
    println!(
        "{name}: {} x {} build M {} efC {}: {:.0} inserts/s ({:.2}s)",
        r.points, r.dim, r.m, r.ef_construction, r.inserts_per_s, r.build_s
    );
    println!(
        "  {:>5} {:>10} {:>14} {:>14} {:>16} {:>16}",
        "ef", "recall@k", "q/s parallel", "q/s 1 thread", "f32 walk recall", "f32 walk q/s 1t"
    );
    for e in &r.per_ef {
        let (recall, one) = e.exact_walk.as_ref().map_or((f64::NAN, f64::NAN), |w| {
            (w.recall, w.queries_per_s_one_thread)
        });
        println!(
            "  {:>5} {:>10.4} {:>14.0} {:>14.0} {:>16.4} {:>16.0}",
            e.ef, e.recall, e.queries_per_s_parallel, e.queries_per_s_one_thread, recall, one
        );
    }
}

#[cfg(feature = "milvus")]
fn print_runs(runs: &[retro_bench::store::StoreRun]) {
    println!(
        "{:<20} {:<36} {:>8} {:>10} {:>9} {:>9} {:>9} {:>10} {:>9} {:>12}",
        "store",
        "index",
        "keys",
        "keys/s",
        "p50 ms",
        "p99 ms",
        "q/s b1",
        "q/s b64",
        "recall",
        "peak RSS MB"
    );
    for r in runs {
        println!(
            "{:<20} {:<36} {:>8} {:>10.0} {:>9.3} {:>9.3} {:>9.0} {:>10.0} {:>9.4} {:>12}",
            r.store,
            r.params,
            r.keys,
            r.keys_per_s,
            r.latency_ms_p50,
            r.latency_ms_p99,
            r.queries_per_s_batch1,
            r.queries_per_s_batch64,
            r.recall,
            r.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}"))
        );
    }
}

/// The keys of a store comparison or a scale point: `--vectors E.npy` or `--synthetic N`
/// clustered keys, the last `--sample` held out as queries, with their exact answers.
struct HeldOut {
    keys: retro_index::Embeddings,
    queries: Vec<Vec<f32>>,
    exact: Vec<Vec<retro_index::Hit>>,
    source: String,
}

fn held_out(a: &BenchIndexArgs) -> anyhow::Result<HeldOut> {
    use retro_bench::store as bs;
    let (keys, dim, source) = match &a.vectors {
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
        None => anyhow::bail!(
            "--vector-store and --only embedded measure --vectors E.npy or --synthetic N keys"
        ),
    };
    // The last `sample` keys are the queries, not indexed.
    let (keys, queries) = bs::hold_out_queries(keys, dim, a.sample);
    let exact = retro_index::brute_force_batch(&keys, dim, &queries, a.k);
    Ok(HeldOut {
        keys: retro_index::Embeddings::from_vec(keys, dim)?,
        queries,
        exact,
        source,
    })
}

/// `--only embedded` without a store: the embedded graph alone (a point of the scale curve).
fn embedded_only(a: &BenchIndexArgs) -> anyhow::Result<()> {
    let h = held_out(a)?;
    let n = h.keys.len();
    if !a.json {
        eprintln!("{n} keys ({}), {} queries ...", h.source, h.queries.len());
    }
    let run =
        retro_bench::store::embedded_run(h.keys, a.params().hnsw(), &h.queries, &h.exact, a.k)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "threads": rayon_threads(), "keys": h.source, "queries": h.queries.len(), "runs": [run]
            }))?
        );
    } else {
        println!("{}", serde_json::to_string_pretty(&run)?);
    }
    Ok(())
}

#[cfg(not(feature = "milvus"))]
fn store_comparison(_: &BenchIndexArgs, url: &str) -> anyhow::Result<()> {
    anyhow::bail!("{url}: this build has no Milvus support: build with `--features milvus`")
}

/// The embedded graph against `--vector-store` on the same keys, through the `KeyIndex` trait.
#[cfg(feature = "milvus")]
fn store_comparison(a: &BenchIndexArgs, url: &str) -> anyhow::Result<()> {
    let h = held_out(a)?;
    let (dim, source) = (h.keys.dim(), &h.source);
    let (n, q) = (h.keys.len() + h.queries.len(), h.queries.len());
    let hnsw = a.params().hnsw();
    let (embedded, store) = match a.only.as_deref() {
        Some("embedded") => (true, false),
        Some(_) => (false, true),
        None => (true, true),
    };
    if !a.json {
        eprintln!(
            "{} keys of dim {dim} ({source}), {q} queries{}",
            n - q,
            if embedded { "; embedded graph ..." } else { "" }
        );
    }
    let mut runs = vec![];
    if embedded {
        let keys = h.keys.clone();
        runs.push(retro_bench::store::embedded_run(
            keys, hnsw, &h.queries, &h.exact, a.k,
        )?);
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
        runs.push(retro_bench::store::milvus_run(
            h.keys.as_slice(),
            dim,
            url,
            index,
            a.store.options(),
            &h.queries,
            &h.exact,
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
        print_runs(&runs);
    }
    Ok(())
}

pub fn run(a: BenchIndexArgs) -> anyhow::Result<()> {
    if let Some(url) = &a.store.vector_store {
        return store_comparison(&a, url);
    }
    match a.only.as_deref() {
        Some("embedded") => return embedded_only(&a),
        Some(_) => anyhow::bail!("--only store measures a --vector-store: none was given"),
        None => {}
    }
    if let Some(path) = &a.vectors {
        let (_, d, v) = retro_index::read_npy(path)?;
        let r = ix::hnsw_run(&v, d, &a.params())?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "threads": rayon_threads(), "vectors": path, "hnsw": r })
                )?
            );
        } else {
            println!("threads {}; vectors {}", rayon_threads(), path.display());
            print_run("graph", &r);
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

    let params = a.params();
    let opts = BuildOptions {
        chunk_len: a.chunk_len,
        hnsw: params.hnsw(),
        batch_size: 256,
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
    let (db, times) = ix::build_timed(&corpus, &tokenizer, embedder.as_ref(), opts, &out)?;
    let n = db.store().len();
    let embed_s = times.embed_s;
    let database = ix::database_run(&db, &params, times.insert_s)?;

    let synthetic = if a.synthetic > 0 {
        let v = ix::uniform_unit_vectors(a.synthetic, a.synthetic_dim, 0x9e3779b97f4a7c15);
        Some(ix::hnsw_run(&v, a.synthetic_dim, &params)?)
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
