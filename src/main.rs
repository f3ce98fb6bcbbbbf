//! `retro`: build retrieval databases, train, generate and evaluate RETRO models.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "retro",
    version,
    about = "RETRO, the retrieval-enhanced transformer, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run or initialise model checkpoints.
    #[command(subcommand)]
    Model(cli::model::ModelCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Forward and train-step throughput of the model.
    Model(cli::bench_model::BenchModelArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Model(c) => c.run(),
        Cmd::Bench(BenchCmd::Model(a)) => cli::bench_model::run(a),
    }
}
