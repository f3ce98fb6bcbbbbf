//! `retro index ...`: build, query, inspect and measure a retrieval database.

use super::common::{
    load_embedder, load_lm_tokenizer, rayon_threads, EmbedderArgs, VectorStoreArgs,
};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use retro_index::{
    read_corpus, write_npy, BuildOptions, CorpusOptions, Database, HnswParams, OpenOptions,
    ProgressFn, Stage,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Subcommand)]
pub enum IndexCmd {
    /// Build a database: corpus -> tokens -> chunks -> keys -> HNSW graph (atomic).
    Build(BuildArgs),
    /// Nearest chunks (with their continuations) to texts.
    Query(QueryArgs),
    /// What a database holds: counts, tokenizer, embedder, files.
    Info(InfoArgs),
    /// Recall@k of the HNSW graph against exact search over the stored keys.
    Recall(RecallArgs),
    /// Write the keys as an n x dim float32 .npy file.
    ExportEmbeddings(ExportArgs),
}

/// Progress bars for the build stages (one bar per stage, on stderr).
pub fn progress_bars() -> ProgressFn {
    let current: Mutex<Option<(Stage, ProgressBar)>> = Mutex::new(None);
    Arc::new(move |stage: Stage, done: usize, total: usize| {
        let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().map(|c| c.0) != Some(stage) {
            if let Some((_, bar)) = cur.take() {
                bar.finish();
            }
            let bar = ProgressBar::new(total as u64);
            let label = match stage {
                Stage::Tokenizing => "tokenizing (documents)",
                Stage::Embedding => "embedding (chunks)",
                Stage::Inserting => "HNSW insertion (chunks)",
                Stage::Writing => "writing",
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>24} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label);
            *cur = Some((stage, bar));
        }
        if let Some((_, bar)) = cur.as_ref() {
            bar.set_position(done as u64);
            if stage == Stage::Writing && done == total {
                bar.finish();
            }
        }
    })
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A text file, a folder (recursive) or a .jsonl file.
    #[arg(long)]
    pub corpus: PathBuf,
    /// LM tokenizer: `char` (labml characters of the corpus) or a tokenizer.json.
    #[arg(long)]
    pub tokenizer: String,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
    #[arg(long, default_value_t = 64)]
    pub chunk_len: usize,
    /// Output database directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing database at --out.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    #[arg(long, default_value_t = HnswParams::default().ef_search)]
    pub ef_search: usize,
    /// Insert keys one at a time, so that rebuilding gives the same graph and the same neighbours
    /// (slower: the default inserts in parallel, and the graph then varies slightly between builds;
    /// the database id never does).
    #[arg(long)]
    pub deterministic: bool,
    /// Chunks handed to the embedder per step.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[command(flatten)]
    pub store: VectorStoreArgs,
    #[arg(long, default_value = "id")]
    pub id_field: String,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Replace invalid UTF-8 instead of failing.
    #[arg(long)]
    pub lossy: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    pub db: PathBuf,
    /// Query texts.
    pub texts: Vec<String>,
    /// A file with one query per line.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    #[arg(short, long, default_value_t = 5)]
    pub k: usize,
    /// Search breadth (default: the database's ef_search).
    #[arg(long)]
    pub ef: Option<usize>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    pub db: PathBuf,
    /// Recompute every file's SHA-256.
    #[arg(long)]
    pub verify: bool,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RecallArgs {
    pub db: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub sample: usize,
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// One or more ef values (comma-separated); default: the database's ef_search.
    #[arg(long, value_delimiter = ',')]
    pub ef: Vec<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    pub db: PathBuf,
    /// Output .npy file (float32, n x dim, row i = chunk i).
    #[arg(long)]
    pub out: PathBuf,
}

fn open_db(dir: &Path, verify: bool) -> anyhow::Result<Database> {
    Database::open_with(
        dir,
        OpenOptions {
            verify_checksums: verify,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening database {}", dir.display()))
}

impl IndexCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            IndexCmd::Build(a) => build(a),
            IndexCmd::Query(a) => query(a),
            IndexCmd::Info(a) => info(a),
            IndexCmd::Recall(a) => recall(a),
            IndexCmd::ExportEmbeddings(a) => {
                let db = open_db(&a.db, false)?;
                write_npy(&a.out, db.embeddings().as_slice(), db.embeddings().dim())?;
                println!(
                    "wrote {} x {} float32 to {}",
                    db.embeddings().len(),
                    db.embeddings().dim(),
                    a.out.display()
                );
                Ok(())
            }
        }
    }
}

fn build(a: BuildArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let copts = CorpusOptions {
        id_field: a.id_field.clone(),
        text_field: a.text_field.clone(),
        lossy: a.lossy,
    };
    let corpus = read_corpus(&a.corpus, &copts)
        .with_context(|| format!("reading corpus {}", a.corpus.display()))?;
    if corpus.documents.is_empty() {
        bail!(
            "corpus {} has no non-empty documents ({} empty skipped)",
            a.corpus.display(),
            corpus.empty_skipped
        );
    }
    let tokenizer = load_lm_tokenizer(&a.tokenizer, &corpus)?;
    let (embedder, source) = load_embedder(&a.embedder, None)?;
    eprintln!(
        "corpus: {} documents ({} empty skipped), {} bytes; tokenizer {} (vocab {}); embedder {}",
        corpus.documents.len(),
        corpus.empty_skipped,
        corpus.text_bytes(),
        tokenizer.kind(),
        tokenizer.vocab_size(),
        embedder.id()
    );
    let hnsw = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: a.ef_search,
        deterministic: a.deterministic,
    };
    let opts = BuildOptions {
        chunk_len: a.chunk_len,
        hnsw,
        batch_size: a.batch_size,
        progress: if a.quiet { None } else { Some(progress_bars()) },
        overwrite: a.overwrite,
        embedder_source: source,
        vector_store: a.store.resolve(hnsw)?,
        milvus: a.store.options(),
        cancel: Default::default(),
    };
    let db = Database::build(&corpus, &tokenizer, embedder.as_ref(), &opts, &a.out)?;
    let c = db.manifest().counts;
    println!(
        "built {} in {:.1}s: id {}, {} documents, {} chunks of {} tokens, {} tokens, {} empty documents skipped",
        a.out.display(),
        t0.elapsed().as_secs_f64(),
        db.id(),
        c.documents,
        c.chunks,
        db.chunk_len(),
        c.tokens,
        c.empty_skipped
    );
    Ok(())
}

fn query(a: QueryArgs) -> anyhow::Result<()> {
    if a.k == 0 {
        bail!("-k 0: ask for at least one neighbour");
    }
    let db = open_db(&a.db, false)?;
    let mut texts = a.texts.clone();
    if let Some(f) = &a.queries {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("reading queries {}", f.display()))?;
        texts.extend(s.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    if texts.is_empty() {
        bail!("no query: give texts or --queries FILE");
    }
    let (embedder, _) = load_embedder(&a.embedder, Some(&db))?;
    let tokenizer = db.load_tokenizer()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let results = db.search_texts(embedder.as_ref(), &refs, a.k, a.ef)?;
    let store = db.store();
    let mut out = Vec::new();
    for (q, hits) in texts.iter().zip(&results) {
        let mut js = Vec::new();
        if !a.json {
            println!("query: {q}");
        }
        for (rank, &(chunk, dist)) in hits.iter().enumerate() {
            let d = store.document_of(chunk);
            let doc = store.document(d);
            let chunk_text = tokenizer.decode(store.chunk_tokens(chunk))?;
            let cont_text = tokenizer.decode(store.continuation(chunk))?;
            if a.json {
                js.push(serde_json::json!({
                    "rank": rank + 1, "chunk": chunk, "document": doc.id, "document_index": d, "source": doc.source,
                    "chunk_start": store.chunk_start(chunk), "distance": dist, "chunk_text": chunk_text, "continuation_text": cont_text,
                }));
            } else {
                println!(
                    "{:>3}. chunk {chunk}  document {:?} @ token {}  distance {dist:.4}",
                    rank + 1,
                    doc.id,
                    store.chunk_start(chunk)
                );
                println!(
                    "     {}\u{2016}{}",
                    chunk_text.replace('\n', "\u{21b5}"),
                    cont_text.replace('\n', "\u{21b5}")
                );
            }
        }
        if a.json {
            out.push(serde_json::json!({ "query": q, "hits": js }));
        } else {
            println!();
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    let db = open_db(&a.db, a.verify)?;
    let m = db.manifest();
    if a.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    let c = m.counts;
    println!(
        "database     {} (id {}, format {}, {})",
        a.db.display(),
        m.database_id,
        m.format_version,
        m.created_by
    );
    println!(
        "documents    {} stored + {} empty skipped",
        c.documents, c.empty_skipped
    );
    println!(
        "chunks       {} of {} tokens ({} tokens in all)",
        c.chunks, m.chunk_len, c.tokens
    );
    println!(
        "tokenizer    {} vocab {} pad {} ({})",
        m.tokenizer.kind,
        m.tokenizer.vocab_size,
        m.tokenizer.pad_id,
        m.tokenizer
            .fingerprint
            .get(..16)
            .unwrap_or(&m.tokenizer.fingerprint)
    );
    println!(
        "embedder     {}{}",
        m.embedder,
        m.embedder_source
            .as_ref()
            .map(|s| format!(" from {s}"))
            .unwrap_or_default()
    );
    let d = db.index().describe();
    println!(
        "keys         {} in {} at {} ({}, dim {}, {})",
        d.count, d.store, d.location, d.params, d.dim, d.metric
    );
    let total: u64 = m.files.total_bytes();
    println!(
        "files        {} bytes{}",
        total,
        if a.verify { ", checksums verified" } else { "" }
    );
    for (name, f) in &m.files {
        println!(
            "  {name:<28} {:>12} {}",
            f.bytes,
            f.sha256.get(..16).unwrap_or(&f.sha256)
        );
    }
    Ok(())
}

fn recall(a: RecallArgs) -> anyhow::Result<()> {
    let db = open_db(&a.db, false)?;
    let efs = if a.ef.is_empty() {
        vec![db.manifest().hnsw.ef_search]
    } else {
        a.ef.clone()
    };
    let mut reports = Vec::new();
    for ef in efs {
        let r = db.recall(a.sample, a.k, Some(ef))?;
        if !a.json {
            println!(
                "recall@{} = {:.4} at ef {} over {} queries; HNSW {:.0} queries/s, brute force {:.0} queries/s ({} threads)",
                r.k,
                r.recall,
                r.ef,
                r.sample,
                r.hnsw_queries_per_s,
                r.brute_force_queries_per_s,
                rayon_threads()
            );
        }
        reports.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}
