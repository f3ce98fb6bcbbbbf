//! `retro`: build retrieval databases, train, generate and evaluate RETRO models.

// The doc comments of `cli` are clap's help text, not rustdoc: `RETRO[OFF]` there is the paper's
// name, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};

// Tensors of several MB are allocated and freed per layer: glibc maps and unmaps them each time
// (page faults, TLB shootdowns), mimalloc reuses them (measured in docs/PERF.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`; not exported by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed memory back to the OS: a training step frees and reallocates the same few
/// hundred MB every step, and re-faulting zeroed pages cost a fifth of the step.
fn keep_freed_memory() {
    // SAFETY: sets a process-wide option before any purge can have happened; no pointers involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

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
    /// Import a pretrained model (GGUF) as a frozen base for RETRO-fitting.
    #[command(subcommand)]
    Base(cli::base::BaseCmd),
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
    /// Serve a run over HTTP: OpenAI-compatible completions, streamed, retrieving per chunk.
    Serve(cli::serve::ServeArgs),
    /// Loss, perplexity and bits per byte with retrieval on, off, and for a baseline.
    Eval(cli::eval::EvalArgs),
    /// The whole loop on Shakespeare (data, database, dataset, train, eval, generate), or
    /// `demo retrofit`: a pretrained LM RETRO-fitted on Bible translations.
    Demo(cli::demo::DemoCmd),
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
    /// The embedded graph's build time, peak memory, bytes on disk, latency and recall at
    /// several sizes (one process each), as a table and a PNG.
    Scale(cli::bench_scale::BenchScaleArgs),
    /// A RETRO-fit training step on an imported base (`retro train --base B --retrofit`), and
    /// its parts.
    Retrofit(cli::bench_retrofit::BenchRetrofitArgs),
    /// Concurrent streaming clients against a running `retro serve`: total tokens/s, time to
    /// first token, time between tokens.
    Serve(cli::bench_serve::BenchServeArgs),
}

/// Output piped into `head` and closed early: end quietly, as Unix tools do, instead of Rust's
/// "failed printing to stdout: Broken pipe" panic (Rust ignores SIGPIPE by default).
fn exit_quietly_on_broken_pipe() {
    // SAFETY: restoring the default disposition of one signal before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// candle asks for its thread count on every matmul, and without `RAYON_NUM_THREADS` that reads
/// /proc/cpuinfo each time (6% of a decoding step); set it once, to what rayon would use.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: before any other thread exists, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

fn main() -> Result<()> {
    fix_thread_count();
    exit_quietly_on_broken_pipe();
    keep_freed_memory();
    let cli = Cli::parse();
    // A cap the kernels do not know would otherwise be ignored without a word.
    retro_kernels::isa::cap().map_err(anyhow::Error::msg)?;
    match cli.cmd {
        Cmd::Index(c) => c.run(),
        Cmd::Base(c) => c.run(),
        Cmd::Tokenizer(c) => c.run(),
        Cmd::Dataset(c) => c.run(),
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Demo(c) => c.run(),
        Cmd::Model(c) => c.run(),
        Cmd::Bench(BenchCmd::Model(a)) => cli::bench_model::run(a),
        Cmd::Bench(BenchCmd::Index(a)) => cli::bench_index::run(a),
        Cmd::Bench(BenchCmd::Generate(a)) => cli::bench_generate::run(a),
        Cmd::Bench(BenchCmd::Pipeline(a)) => cli::bench_pipeline::run(a),
        Cmd::Bench(BenchCmd::Scale(a)) => cli::bench_scale::run(a),
        Cmd::Bench(BenchCmd::Retrofit(a)) => cli::bench_retrofit::run(a),
        Cmd::Bench(BenchCmd::Serve(a)) => cli::bench_serve::run(a),
    }
}
