//! `retro eval`: loss, perplexity and bits per byte with retrieval on (related and novel databases),
//! off, and for a baseline; the same split by the scored chunks' overlap with their neighbours.

use anyhow::Result;
use clap::Args;
use retro_index::{read_corpus, CorpusOptions};
use retro_pipeline::{evaluate, EvalOptions, EvalReport, Retriever, Run, Scorer, Scores};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub run: PathBuf,
    /// Held-out text: a file, a folder or a JSONL corpus.
    #[arg(long)]
    pub data: PathBuf,
    /// Score only the documents of --data whose id contains this text (repeatable), e.g.
    /// `web/Ruth` of a Bible translation.
    #[arg(long)]
    pub data_matching: Vec<String>,
    /// Retrieve from this database instead of the run's own: swapping the database needs no
    /// retraining. Its tokenizer and chunk_len must be the run's.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// A run trained on the same data without retrieval.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Tokens per scored window (default: the run's dataset's seq_len, else 512).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Neighbours per chunk (default: the K the run was trained with; more is allowed).
    #[arg(long)]
    pub k: Option<usize>,
    /// Score at most this many tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Score documents the model was trained on (memorisation, not generalisation).
    #[arg(long)]
    pub allow_training_documents: bool,
    /// Write the overlap plot here (default: eval-overlap.png beside the run's checkpoints).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// RETRO-fitted runs: skip in-context retrieval (the frozen base with the same neighbours in
    /// its prompt), which costs one forward per chunk.
    #[arg(long)]
    pub no_in_context: bool,
    /// Score with the related database only (no novel condition), e.g. for text the run's
    /// held-out documents have no bearing on.
    #[arg(long)]
    pub related_only: bool,
    #[command(flatten)]
    pub gate: super::common::GateArgs,
    #[command(flatten)]
    pub embedder: super::common::EmbedderArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let run = Run::open(&a.run)?;
    let device = retro_model::device_from_name(&a.embedder.device)?;
    // A labml run, or a RETRO-fitted base (whose frozen base also runs in-context retrieval).
    let loaded = run.load(&device)?;
    let model = loaded.scorer();
    let in_context = loaded
        .base()
        .filter(|_| !a.no_in_context)
        .map(|b| b as &dyn Scorer);
    let baseline_run = a.baseline.as_ref().map(|b| Run::open(b)).transpose()?;
    let baseline = baseline_run
        .as_ref()
        .map(|b| b.load_model(&device))
        .transpose()?;
    let rdb = retro_pipeline::RunDatabase::open(&run, a.db.as_deref(), a.k)?;
    let db = &rdb.db;
    let seq_len = a
        .seq_len
        .or(rdb.dataset.as_ref().map(|m| m.seq_len))
        .unwrap_or(512);
    let (embedder, _) = super::common::load_embedder(&a.embedder, Some(db))?;
    let retriever =
        Retriever::new(db, embedder.as_ref(), &rdb.tokenizer, rdb.k)?.with_gate(a.gate.gate()?);
    let mut corpus = read_corpus(&a.data, &CorpusOptions::default())?;
    if !a.data_matching.is_empty() {
        corpus
            .documents
            .retain(|d| a.data_matching.iter().any(|m| d.id.contains(m.as_str())));
        if corpus.documents.is_empty() {
            anyhow::bail!(
                "{}: no document's id contains any of {:?}",
                a.data.display(),
                a.data_matching
            );
        }
    }
    // The run's held-out documents, found in this database by id; the rest it was trained on.
    let sets = rdb.document_sets();
    let r = evaluate(
        model,
        baseline.as_ref().map(|b| b as &dyn Scorer),
        in_context,
        Some(&retriever),
        &rdb.tokenizer,
        &corpus,
        &EvalOptions {
            seq_len,
            max_tokens: a.max_tokens,
            held_out_set: sets.held_out,
            training_documents: sets.trained_on,
            allow_training_documents: a.allow_training_documents,
            related_only: a.related_only,
        },
    )?;
    let plot = a
        .plot
        .clone()
        .unwrap_or_else(|| run.dir.join("eval-overlap.png"));
    let plotted = retro_pipeline::plot::overlap_plot(&r, &plot);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return plotted.map_err(Into::into);
    }
    print_report(&r, &run, baseline_run.as_ref());
    match plotted {
        Ok(()) => println!("overlap plot: {}", plot.display()),
        Err(e) => eprintln!("overlap plot not written: {e}"),
    }
    Ok(())
}

fn row(name: &str, s: Option<&Scores>) {
    match s {
        Some(s) => println!(
            "  {name:<34} {:>8.4} {:>11.3} {:>10.4}",
            s.loss, s.perplexity, s.bits_per_byte
        ),
        None => println!("  {name:<34} {:>8} {:>11} {:>10}", "-", "-", "-"),
    }
}

/// The two training budgets as measured, and what they are equal in, if anything (times within
/// 5% of each other count as equal).
fn budget(run: &Run, baseline: &Run) -> String {
    let (Ok(Some(a)), Ok(Some(b))) = (run.state(), baseline.state()) else {
        return String::new();
    };
    let (ta, tb) = (a.train_seconds, b.train_seconds);
    let equal_time = ta > 0.0 && tb > 0.0 && (ta - tb).abs() <= 0.05 * ta.max(tb);
    let kind = match (a.step == b.step, equal_time) {
        (true, true) => "equal steps and time",
        (true, false) => "equal steps",
        (false, true) => "equal time",
        (false, false) => "neither equal steps nor equal time",
    };
    format!(
        "budgets ({kind}): RETRO {} steps in {:.1} min of training, baseline {} steps in {:.1} min",
        a.step,
        ta / 60.0,
        b.step,
        tb / 60.0
    )
}

pub fn print_report(r: &EvalReport, run: &Run, baseline: Option<&Run>) {
    println!(
        "{} documents, {} tokens, {} bytes; K = {} neighbours per chunk; database {}",
        r.documents,
        r.tokens,
        r.bytes,
        r.k.map_or("-".into(), |k| k.to_string()),
        r.database_id.as_ref().map_or("-", |d| d.as_str())
    );
    if let Some(b) = baseline {
        println!("{}", budget(run, b));
    }
    for c in &r.conditions {
        println!(
            "\n{} database: {} excluded from retrieval: {:?}",
            c.condition.name(),
            c.excluded_documents.len(),
            c.excluded_documents
        );
        println!(
            "  {:<34} {:>8} {:>11} {:>10}",
            "", "loss", "perplexity", "bits/byte"
        );
        match &c.gated {
            Some(g) => {
                row("RETRO (on, every neighbour read)", Some(&c.on));
                row("RETRO (on, gated)", Some(&g.on));
            }
            None => row("RETRO (retrieval on)", Some(&c.on)),
        }
        row("RETRO[OFF]", Some(&r.retrieval_off));
        if r.baseline.is_some() {
            row("baseline (no CCA)", r.baseline.as_ref());
        }
        if c.in_context.is_some() {
            row("in-context retrieval (base)", c.in_context.as_ref());
        }
        let off = r.retrieval_off.bits_per_byte;
        let against_off = |what: &str, on: &Scores| {
            println!(
                "  {what}: ON / OFF = {:.3}, ON - OFF = {:+.4} bits/byte",
                on.bits_per_byte / off,
                on.bits_per_byte - off
            )
        };
        against_off("every neighbour read", &c.on);
        if let Some(g) = &c.gated {
            against_off("gated", &g.on);
        }
        if let Some(ic) = &c.in_context {
            against_off("in-context retrieval", ic);
            println!(
                "  scored tokens/s: RETRO {:.0}, in-context retrieval {:.0}",
                c.on_tokens_per_s,
                c.in_context_tokens_per_s.unwrap_or(0.0)
            );
        }
        println!(
            "  by overlap of each chunk with its neighbours (longest common token run / chunk_len):"
        );
        let gated = c.gated.is_some();
        let col = |v: String| {
            if gated {
                format!(" {v:>9}")
            } else {
                String::new()
            }
        };
        let ic = c.in_context.is_some();
        let ic_col = |v: String| {
            if ic {
                format!(" {v:>9}")
            } else {
                String::new()
            }
        };
        println!(
            "  {:<28} {:>7} {:>9}{} {:>9} {:>9}{}",
            "bucket",
            "chunks",
            "ON bpb",
            col("gated bpb".into()),
            "OFF bpb",
            "base bpb",
            ic_col("ctx bpb".into())
        );
        let f =
            |s: &Option<Scores>| s.map_or("-".to_string(), |s| format!("{:.4}", s.bits_per_byte));
        for b in &c.overlap {
            println!(
                "  {:<28} {:>7} {:>9}{} {:>9} {:>9}{}",
                b.label(),
                b.chunks,
                f(&b.on),
                col(f(&b.on_gated)),
                f(&b.off),
                f(&b.baseline),
                ic_col(f(&b.in_context))
            );
        }
        if let Some(g) = &c.gated {
            println!(
                "  gate: {}; {} of {} retrieved chunks kept",
                g.gate, g.kept_chunks, g.chunks
            );
        }
    }
    if r.conditions.is_empty() {
        println!(
            "  {:<34} {:>8} {:>11} {:>10}",
            "", "loss", "perplexity", "bits/byte"
        );
        row("RETRO[OFF]", Some(&r.retrieval_off));
        if r.baseline.is_some() {
            row("baseline (no CCA)", r.baseline.as_ref());
        }
    }
}
