//! `retro bench index`: embedding chunks/s, HNSW inserts/s, queries/s and recall@k at several ef,
//! on (a prefix of) the Python-docs corpus with MiniLM; with `--vector-store`, the embedded graph
//! against that store on the same keys. The measurements are `retro_bench::{index, store}`.

use super::common::{
    load_embedder, load_lm_tokenizer, rayon_threads, EmbedderArgs, VectorStoreArgs,
};
use clap::Args;
use retro_bench::index::{self as ix, CorpusBench, HnswBenchParams, HnswRun};
use retro_bench::store::{self as bs, Compared, Comparison, KeySource, MilvusTarget, Progress};
use retro_index::HnswParams;
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
    pub store: VectorStoreArgs,
    /// With `--vector-store`: measure only one half, `embedded` or `store`, so that each half's
    /// peak RSS is its own (a second half in the same process reports the larger of both).
    /// `embedded` alone: the embedded graph on held-out `--vectors` or `--synthetic` keys, with
    /// its peak RSS and bytes on disk (a point of `retro bench scale`).
    #[arg(long, value_enum)]
    pub only: Option<super::choices::BenchHalf>,
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

    /// The keys of a store comparison or a scale point: `--vectors E.npy` or `--synthetic N`.
    fn key_source(&self) -> anyhow::Result<KeySource> {
        match &self.vectors {
            Some(path) => Ok(KeySource::Vectors(path.clone())),
            None if self.synthetic > 0 => Ok(KeySource::Synthetic {
                n: self.synthetic,
                dim: self.synthetic_dim,
            }),
            None => anyhow::bail!(
                "--vector-store and --only embedded measure --vectors E.npy or --synthetic N keys"
            ),
        }
    }
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

/// `--vector-store` or `--only`: the embedded graph, the store or both on the same held-out keys.
fn store_comparison(a: &BenchIndexArgs) -> anyhow::Result<()> {
    if let Some(url) = &a.store.vector_store {
        bs::milvus_supported(url)?;
    }
    let hnsw = a.params().hnsw();
    let store = match (&a.store.vector_store, a.store.resolve(hnsw)?) {
        (Some(url), Some((_, index))) => Some(MilvusTarget {
            url: url.clone(),
            index,
            opts: a.store.options(),
        }),
        _ => None,
    };
    use super::choices::BenchHalf;
    let only = a.only;
    if store.is_none() && only == Some(BenchHalf::Store) {
        anyhow::bail!("--only store measures a --vector-store: none was given");
    }
    let c = Comparison {
        keys: a.key_source()?,
        sample: a.sample,
        k: a.k,
        hnsw,
        embedded: only != Some(BenchHalf::Store),
        store: store.filter(|_| only != Some(BenchHalf::Embedded)),
    };
    let compared_with_store = a.store.vector_store.is_some();
    let r = bs::compare(&c, &mut |p| {
        if a.json {
            return;
        }
        match p {
            Progress::Loaded(h) if compared_with_store => eprintln!(
                "{} keys of dim {} ({}), {} queries{}",
                h.keys.len(),
                h.keys.dim(),
                h.source,
                h.queries.len(),
                if c.embedded {
                    "; embedded graph ..."
                } else {
                    ""
                }
            ),
            Progress::Loaded(h) => eprintln!(
                "{} keys ({}), {} queries ...",
                h.keys.len(),
                h.source,
                h.queries.len()
            ),
            Progress::Embedded(run) if compared_with_store => {
                eprintln!("{}", serde_json::to_string(run).unwrap_or_default())
            }
            Progress::Embedded(_) => {}
            Progress::Store(url) => eprintln!("{url} ..."),
        }
    })?;
    print_compared(a, &r, compared_with_store)
}

fn print_compared(a: &BenchIndexArgs, r: &Compared, with_store: bool) -> anyhow::Result<()> {
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "threads": rayon_threads(), "keys": r.source, "queries": r.queries, "runs": r.runs
            }))?
        );
    } else if with_store {
        println!(
            "threads {}; keys {}; {} held-out queries, k {}",
            rayon_threads(),
            r.source,
            r.queries,
            a.k
        );
        print_runs(&r.runs);
    } else {
        for run in &r.runs {
            println!("{}", serde_json::to_string_pretty(run)?);
        }
    }
    Ok(())
}

pub fn run(a: BenchIndexArgs) -> anyhow::Result<()> {
    if a.store.vector_store.is_some() || a.only.is_some() {
        return store_comparison(&a);
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
    let corpus = retro_bench::corpus::first_documents(a.corpus.as_deref(), a.docs)?;
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
    let tmp = tempfile::tempdir()?;
    let out = a.keep.clone().unwrap_or_else(|| tmp.path().join("db"));
    if !a.json {
        eprintln!(
            "building a database of {} documents with {} ...",
            corpus.documents.len(),
            embedder.id()
        );
    }
    let report = ix::corpus_run(
        &CorpusBench {
            corpus: &corpus,
            tokenizer: &tokenizer,
            embedder: embedder.as_ref(),
            embedder_source: source,
            chunk_len: a.chunk_len,
            params: a.params(),
            synthetic: (a.synthetic > 0).then_some((a.synthetic, a.synthetic_dim)),
            threads: rayon_threads(),
        },
        &out,
    )?;
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
