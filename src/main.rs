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
    /// Build, query and inspect retrieval databases.
    #[command(subcommand)]
    Index(cli::index::IndexCmd),
    /// Train an LM tokenizer offline.
    #[command(subcommand)]
    Tokenizer(cli::tokenizer::TokenizerCmd),
    /// Training sequences with precomputed neighbours.
    #[command(subcommand)]
    Dataset(cli::dataset::DatasetCmd),
    /// Train a model (or resume, or RETRO-fit).
    Train(cli::train::TrainArgs),
    /// Generate text, retrieving for every completed chunk.
    Generate(cli::generate::GenerateArgs),
    /// Loss, perplexity and bits per byte with retrieval on, off, and for a baseline.
    Eval(cli::eval::EvalArgs),
    /// The whole loop on Shakespeare: data, database, dataset, train, eval, generate.
    Demo(cli::demo::DemoArgs),
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
    /// Embedding, build, search and recall of the retrieval database.
    Index(cli::bench_index::BenchIndexArgs),
    /// Cached (KV) generation against labml's full recompute per token.
    Generate(cli::bench_generate::BenchGenerateArgs),
    /// Chunks retrieved per second (embed / search / gather), dataset precompute, embedder alone.
    Pipeline(cli::bench_pipeline::BenchPipelineArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Index(c) => c.run(),
        Cmd::Tokenizer(c) => c.run(),
        Cmd::Dataset(c) => c.run(),
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Demo(a) => cli::demo::run(a),
        Cmd::Model(c) => c.run(),
        Cmd::Bench(BenchCmd::Model(a)) => cli::bench_model::run(a),
        Cmd::Bench(BenchCmd::Index(a)) => cli::bench_index::run(a),
        Cmd::Bench(BenchCmd::Generate(a)) => cli::bench_generate::run(a),
        Cmd::Bench(BenchCmd::Pipeline(a)) => cli::bench_pipeline::run(a),
    }
}
