//! `retro tokenizer ...`: train an LM tokenizer offline.

use anyhow::Context;
use clap::{Args, Subcommand};
use retro_index::{read_corpus, train_bpe, CorpusOptions};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer (GPT-2 style) on a corpus and write it as tokenizer.json.
    Train(TrainArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A text file, a folder (recursive) or a .jsonl file.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Vocabulary size, special tokens (`<pad>` = 0, `<|endoftext|>` = 1) and the 256 bytes included.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "id")]
    pub id_field: String,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Replace invalid UTF-8 instead of failing.
    #[arg(long)]
    pub lossy: bool,
}

impl TokenizerCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            TokenizerCmd::Train(a) => {
                let opts = CorpusOptions {
                    id_field: a.id_field,
                    text_field: a.text_field,
                    lossy: a.lossy,
                };
                let corpus = read_corpus(&a.corpus, &opts)
                    .with_context(|| format!("reading corpus {}", a.corpus.display()))?;
                anyhow::ensure!(
                    !corpus.documents.is_empty(),
                    "corpus {} has no non-empty documents",
                    a.corpus.display()
                );
                let t = std::time::Instant::now();
                let tok = train_bpe(&corpus, a.vocab_size, &a.out)?;
                let tokens: usize = corpus
                    .documents
                    .iter()
                    .map(|d| tok.encode(&d.text).map(|v| v.len()).unwrap_or(0))
                    .sum();
                println!(
                    "trained BPE on {} documents ({} bytes) in {:.1}s: vocab {}, {} tokens ({:.2} bytes/token), fingerprint {}, written to {}",
                    corpus.documents.len(),
                    corpus.text_bytes(),
                    t.elapsed().as_secs_f64(),
                    tok.vocab_size(),
                    tokens,
                    corpus.text_bytes() as f64 / tokens.max(1) as f64,
                    &tok.fingerprint()[..16],
                    a.out.display()
                );
                Ok(())
            }
        }
    }
}
