//! `retro bench retrofit`: the RETRO-fit training step on an imported base, and its parts.

use crate::cli::train::RetrofitArgs;
use anyhow::Result;
use clap::Args;
use retro_bench::retrofit::{self, RetrofitBenchSpec};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchRetrofitArgs {
    /// An imported base (`retro base import`).
    #[arg(long)]
    pub base: PathBuf,
    #[command(flatten)]
    pub fit: RetrofitArgs,
    #[arg(long, default_value_t = 64)]
    pub chunk_len: usize,
    /// Sequences per step (`retro train --batch-size`).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Neighbours per chunk (K).
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchRetrofitArgs) -> Result<()> {
    let dir = retro_pipeline::BaseDir::open(&a.base)?;
    let base = dir.load(&candle_core::Device::Cpu)?;
    let spec = RetrofitBenchSpec {
        batch: a.batch,
        seq_len: a.seq_len,
        neighbours: a.k,
        neighbour_len: 2 * a.chunk_len,
        fit: a.fit.config(a.chunk_len, base.config().hidden_size),
        warmup: a.warmup,
        iters: a.iters,
    };
    let r = retrofit::run(base, &spec)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "RETRO-fit of {} : batch {} x {} tokens, K {}, neighbours of {} tokens, {} trainable parameters",
        a.base.display(),
        a.batch,
        a.seq_len,
        a.k,
        spec.neighbour_len,
        r.trainable_parameters
    );
    println!("base forward (RETRO[OFF])   {:9.1} ms", r.base_forward_ms);
    println!(
        "neighbours through base     {:9.1} ms",
        r.neighbour_input_ms
    );
    println!("training forward            {:9.1} ms", r.train_forward_ms);
    println!(
        "train step                  {:9.1} ms  {:8.1} tokens/s",
        r.train_step_ms, r.train_step_tokens_per_s
    );
    Ok(())
}
