//! `retro bench pipeline`: chunks retrieved per second for batches of sequences, split into
//! embedding, search and gather; the dataset-precompute path; the embedder's own throughput.

use super::common::{load_embedder, load_lm_tokenizer, rayon_threads, EmbedderArgs};
use anyhow::Context;
use clap::Args;
use retro_bench::pipeline::{
    bench_embedder, bench_precompute, bench_retrieve, cut_batches, EmbedderReport,
    PipelineBenchParams, PrecomputeReport, RetrieveReport,
};
use retro_index::{BuildOptions, Database};
use retro_pipeline::Filter;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct BenchPipelineArgs {
    /// An existing database (otherwise one is built from --corpus in a temporary directory).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Corpus (default: $RETRO_SHARED/data/python-3.11-docs.jsonl).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Use only the first N documents.
    #[arg(long, default_value_t = 10)]
    pub docs: usize,
    /// LM tokenizer: `char` or a tokenizer.json (default: char).
    #[arg(long, default_value = "char")]
    pub tokenizer: String,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
    #[arg(long, default_value_t = 64)]
    pub chunk_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(short, long, default_value_t = 2)]
    pub k: usize,
    /// Timed batches (medians are reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed batches first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// none, same-document or window:N.
    #[arg(long, default_value = "same-document")]
    pub filter: Filter,
    /// Search breadth (default: the database's ef_search).
    #[arg(long)]
    pub ef: Option<usize>,
    /// Cap the precomputed dataset at this many train (and valid) sequences.
    #[arg(long)]
    pub precompute_sequences: Option<usize>,
    /// Skip the dataset-precompute measurement.
    #[arg(long)]
    pub no_precompute: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    threads: usize,
    embedder: String,
    documents: usize,
    db_chunks: usize,
    build_s: Option<f64>,
    #[serde(flatten)]
    retrieve: RetrieveReport,
    precompute: Option<PrecomputeReport>,
    precompute_chunks_per_s: Option<f64>,
    embedder_run: EmbedderReport,
    embedder_chunks_per_s: f64,
}

pub fn run(a: BenchPipelineArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (db, build_s) = match &a.db {
        Some(dir) => (
            Database::open(dir).with_context(|| format!("opening {}", dir.display()))?,
            None,
        ),
        None => {
            let corpus = retro_bench::corpus::first_documents(a.corpus.as_deref(), a.docs)?;
            let tokenizer = load_lm_tokenizer(&a.tokenizer, &corpus)?;
            let (embedder, source) = load_embedder(&a.embedder, None)?;
            let opts = BuildOptions {
                chunk_len: a.chunk_len,
                overwrite: true,
                embedder_source: source,
                ..Default::default()
            };
            if !a.json {
                eprintln!(
                    "building a database of {} documents with {} ...",
                    corpus.documents.len(),
                    embedder.id()
                );
            }
            let t = Instant::now();
            let db = Database::build(
                &corpus,
                &tokenizer,
                embedder.as_ref(),
                &opts,
                &tmp.path().join("db"),
            )?;
            (db, Some(t.elapsed().as_secs_f64()))
        }
    };
    let (embedder, _) = load_embedder(&a.embedder, Some(&db))?;
    let tokenizer = db.load_tokenizer()?;
    let params = PipelineBenchParams {
        batch: a.batch,
        seq_len: a.seq_len,
        k: a.k,
        iters: a.iters,
        warmup: a.warmup,
        filter: a.filter,
        ef: a.ef,
    };
    let batches = cut_batches(&db, a.batch, a.seq_len, a.warmup + a.iters.max(1))?;
    let retrieve = bench_retrieve(&db, embedder.as_ref(), &tokenizer, &params, &batches)?;
    let ids: Vec<retro_index::ChunkId> = batches[a.warmup.min(batches.len() - 1)..]
        .iter()
        .flat_map(|b| b.chunk_ids.iter().copied())
        .collect();
    let embedder_run = bench_embedder(&db, embedder.as_ref(), &tokenizer, &ids)?;
    let precompute = if a.no_precompute {
        None
    } else {
        Some(bench_precompute(
            &db,
            a.seq_len,
            a.k,
            a.precompute_sequences,
            &tmp.path().join("dataset"),
        )?)
    };
    let c = db.manifest().counts;
    let report = Report {
        threads: rayon_threads(),
        embedder: embedder.id().to_string(),
        documents: c.documents,
        db_chunks: c.chunks,
        build_s,
        precompute_chunks_per_s: precompute.as_ref().map(|p| p.chunks_per_s),
        precompute,
        embedder_chunks_per_s: embedder_run.chunks_per_s,
        embedder_run,
        retrieve,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let r = &report.retrieve;
    println!(
        "threads {}; {} documents, {} chunks; {}",
        report.threads, report.documents, report.db_chunks, report.embedder
    );
    println!(
        "retrieve: B {} x T {} = {} chunks of {} per batch, K {}, filter {}, {} batches (medians)",
        r.batch, r.seq_len, r.chunks_per_batch, r.chunk_len, r.k, r.filter, r.iters
    );
    println!(
        "  {:.1} chunks/s; per batch {:.3} ms = embed {:.3} + search {:.3} + gather {:.3} ms",
        r.retrieve_chunks_per_s,
        r.total_s * 1e3,
        r.embed_s * 1e3,
        r.search_s * 1e3,
        r.gather_s * 1e3
    );
    println!(
        "  stored keys: search unfiltered {:.3} ms, {} {:.3} ms; (gather + filter) / embed = {:.4}",
        r.search_unfiltered_s * 1e3,
        r.filter,
        r.search_stored_keys_s * 1e3,
        r.gather_filter_over_embed
    );
    println!(
        "  search + gather alone: {:.0} chunks/s; padded neighbours {}",
        r.search_gather_chunks_per_s, r.padded_neighbours
    );
    let e = &report.embedder_run;
    println!(
        "embedder alone: {} chunks in {:.3}s = {:.1} chunks/s",
        e.chunks, e.seconds, e.chunks_per_s
    );
    if let Some(p) = &report.precompute {
        println!(
            "precompute (dataset build, stored keys): {} sequences, {} chunks in {:.3}s = {:.1} chunks/s ({:.1}x the embedder)",
            p.sequences,
            p.chunks,
            p.seconds,
            p.chunks_per_s,
            p.chunks_per_s / e.chunks_per_s.max(1e-12)
        );
    }
    Ok(())
}
