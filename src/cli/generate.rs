//! `retro generate`: stream text from a trained run, retrieving for each chunk as it completes.

use anyhow::Result;
use clap::Args;
use retro_pipeline::{generate, Decoder, Event, Retriever, RunModel, Sampling};
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    pub prompt: String,
    #[command(flatten)]
    pub model: super::common::ModelSource,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the neighbours retrieved for each chunk.
    #[arg(long)]
    pub show_neighbours: bool,
    /// Generate with every CCA skipped (RETRO[OFF]).
    #[arg(long)]
    pub no_retrieval: bool,
    #[command(flatten)]
    pub gate: super::common::GateArgs,
    #[command(flatten)]
    pub embedder: super::common::EmbedderArgs,
}

/// Prints tokens as they come; byte-level BPE tokens may split a character, so they wait until
/// they decode to whole characters.
struct Printer<'a> {
    tokenizer: &'a retro_index::LmTokenizer,
    pending: Vec<u32>,
}

impl Printer<'_> {
    fn token(&mut self, t: u32) {
        self.pending.push(t);
        if let Ok(s) = self.tokenizer.decode(&self.pending) {
            if !s.contains('\u{FFFD}') {
                print!("{s}");
                let _ = std::io::stdout().flush();
                self.pending.clear();
            }
        }
    }
}

fn sampling(a: &GenerateArgs) -> Sampling {
    Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    }
}

/// Streams the prompt and what `model` generates after it, with the neighbours of each chunk
/// when asked; returns the number of tokens generated.
fn stream<D: Decoder>(
    a: &GenerateArgs,
    model: &D,
    retriever: Option<&Retriever>,
    tokenizer: &retro_index::LmTokenizer,
) -> Result<usize> {
    print!("{}", a.prompt);
    std::io::stdout().flush()?;
    let mut printer = Printer {
        tokenizer,
        pending: vec![],
    };
    let store = retriever.map(|r| r.database().store());
    let show = a.show_neighbours;
    let out = generate(
        model,
        retriever,
        tokenizer,
        &a.prompt,
        a.max_tokens,
        &sampling(a),
        &mut |e| match e {
            Event::Token(t) => printer.token(t),
            Event::Neighbours {
                chunk,
                tokens,
                neighbours,
            } if show => {
                let Some(store) = store else { return };
                let gate = match neighbours.keep.as_deref() {
                    Some([k]) if *k == 0.0 => " (not read: the gate is closed)",
                    Some(_) => " (read: the gate is open)",
                    None => "",
                };
                println!(
                    "\n[chunk {chunk} {:?} retrieved{gate}:",
                    tokenizer.decode(tokens).unwrap_or_default()
                );
                for (j, id) in neighbours.chunk_ids.iter().enumerate() {
                    match id {
                        Some(id) => println!(
                            "   #{j} chunk {id} of {} d={:.3}: {:?}",
                            store.document(store.document_of(*id)).id,
                            neighbours.distances[j],
                            tokenizer.decode(&store.neighbour(*id)).unwrap_or_default()
                        ),
                        None => println!("   #{j} (padded)"),
                    }
                }
                println!("]");
            }
            Event::Neighbours { .. } => {}
        },
    )?;
    println!();
    Ok(out.len())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    use super::common::{open_model, OpenedModel};
    match open_model(&a.model, &a.embedder, &|_| {})? {
        OpenedModel::Base { model, tokenizer } => {
            let t0 = std::time::Instant::now();
            let n = stream(&a, &model, None, &tokenizer)?;
            eprintln!(
                "generated {n} tokens with the base alone ({:.1} tokens/s, the prompt included)",
                n as f64 / t0.elapsed().as_secs_f64()
            );
        }
        OpenedModel::Run {
            model,
            db: rdb,
            embedder,
        } => {
            let (db, k, tokenizer) = (&rdb.db, rdb.k, &rdb.tokenizer);
            let retriever =
                Retriever::new(db, embedder.as_ref(), tokenizer, k)?.with_gate(a.gate.gate()?);
            let retriever = (!a.no_retrieval).then_some(&retriever);
            let n = match model {
                RunModel::Labml(m) => stream(&a, &m, retriever, tokenizer)?,
                RunModel::Fitted(m) => stream(&a, &m, retriever, tokenizer)?,
            };
            eprintln!("generated {n} tokens");
        }
    }
    Ok(())
}
