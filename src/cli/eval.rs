//! `retro eval`: loss, perplexity and bits per byte with retrieval on, off, and for a baseline.

use anyhow::Result;
use clap::Args;
use retro_index::{read_corpus, CorpusOptions};
use retro_pipeline::{evaluate, Retriever, Run};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub run: PathBuf,
    /// Held-out text: a file, a folder or a JSONL corpus.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// A run trained on the same data without retrieval.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Tokens per scored window (default: the run's dataset's seq_len, else 512).
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub k: Option<usize>,
    /// Score at most this many tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub embedder: super::index::EmbedderArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let run = Run::open(&a.run)?;
    let device = retro_model::device_from_name(&a.embedder.device)?;
    let model = run.load_model(&device)?;
    let baseline = a
        .baseline
        .as_ref()
        .map(|b| Run::open(b)?.load_model(&device))
        .transpose()?;
    let (db, k) = super::generate::run_database(&run, a.db.as_ref(), a.k)?;
    let seq_len = a.seq_len.or_else(|| {
        let s = run.state().ok().flatten()?;
        retro_pipeline::Dataset::read_meta(&s.dataset)
            .ok()
            .map(|m| m.seq_len)
    });
    let tokenizer = db.load_tokenizer()?;
    let (embedder, _) = super::index::load_embedder(&a.embedder, Some(&db))?;
    let retriever = Retriever::new(&db, embedder.as_ref(), &tokenizer, k)?;
    let corpus = read_corpus(&a.data, &CorpusOptions::default())?;
    let r = evaluate(
        &model,
        baseline.as_ref(),
        Some(&retriever),
        &tokenizer,
        &corpus,
        seq_len.unwrap_or(512),
        a.max_tokens,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} documents, {} tokens, {} bytes",
        r.documents, r.tokens, r.bytes
    );
    println!(
        "{:<22} {:>10} {:>12} {:>14}",
        "", "loss", "perplexity", "bits/byte"
    );
    let row = |name: &str, s: &retro_pipeline::Scores| {
        println!(
            "{name:<22} {:>10.4} {:>12.3} {:>14.4}",
            s.loss, s.perplexity, s.bits_per_byte
        )
    };
    if let Some(s) = &r.retrieval_on {
        row("RETRO (retrieval on)", s);
    }
    row("RETRO[OFF]", &r.retrieval_off);
    if let Some(s) = &r.baseline {
        row("baseline (no CCA)", s);
    }
    if r.held_out_in_database.is_empty() {
        println!("none of the held-out documents is in the database");
    } else {
        println!(
            "{} held-out documents are in the database and were excluded from retrieval: {:?}",
            r.held_out_in_database.len(),
            r.held_out_in_database
        );
    }
    Ok(())
}
