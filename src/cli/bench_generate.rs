//! `retro bench generate`: greedy generation with the KV cache at several batch sizes, against
//! labml's sampler in PyTorch (a full forward over the whole growing sequence per new token).

use anyhow::{bail, Result};
use clap::Args;
use retro_bench::generate::{self, GenerateBenchSpec, Reference};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Model preset (labml-small: vocab 65, d_model 128, 16x16 heads, 6 layers, CCA at {3, 5}, chunk 16;
    /// K 2 random neighbours of N 32 at every chunk end).
    #[arg(long, default_value = "labml-small")]
    pub preset: String,
    #[arg(long, default_value_t = 512)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Batch sizes of the cached runs, each sequence with its own prompt and neighbours.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Rounds: each runs the reference once (if given) and the cached generation once per batch.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// A Python with torch: runs labml's sampler in PyTorch on the same work, alternating with ours.
    #[arg(long)]
    pub reference_python: Option<PathBuf>,
    /// The reference's script.
    #[arg(long, default_value = "tools/reference/bench.py")]
    pub reference_script: PathBuf,
    /// Time our own recompute forward at every N-th new token; the mean estimates its total.
    #[arg(long, default_value_t = 64)]
    pub recompute_stride: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchGenerateArgs) -> Result<()> {
    let mut spec = match args.preset.as_str() {
        "labml-small" => GenerateBenchSpec::labml_small(),
        p => bail!("unknown preset `{p}` (available: labml-small)"),
    };
    if args.new_tokens == 0
        || args.prompt_len == 0
        || args.recompute_stride == 0
        || args.rounds == 0
    {
        bail!("--new-tokens, --prompt-len, --rounds and --recompute-stride must be > 0");
    }
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch: sizes must be > 0, got {:?}", args.batch);
    }
    spec.new_tokens = args.new_tokens;
    spec.prompt_len = args.prompt_len;
    spec.recompute_stride = args.recompute_stride;
    spec.batches = args.batch;
    spec.rounds = args.rounds;
    spec.reference = args.reference_python.map(|python| Reference {
        python,
        script: args.reference_script,
    });
    let device = retro_model::device_from_name(&args.device)?;
    let dtype = retro_model::dtype_from_name(&args.dtype)?;
    let r = generate::run(&spec, &device, dtype)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "preset {} on {} ({}), {} parameters, {} threads: prompt {} tokens, {} new tokens, K {} x N {}, \
         {} rounds",
        r.preset,
        r.device,
        r.dtype,
        r.parameters,
        r.threads,
        r.prompt_len,
        r.new_tokens,
        r.neighbours,
        r.neighbour_len,
        r.rounds
    );
    for row in &r.cached {
        let s = &row.tokens_per_s;
        println!(
            "cached, batch {:>3}   {:9.1} tokens/s  (median; range {:.1}-{:.1})",
            row.batch, s.median, s.min, s.max
        );
    }
    match (&r.reference, &r.reference_runs, r.speedup_vs_reference) {
        (Some(name), Some(s), Some(x)) => println!(
            "reference, batch 1 {:9.2} tokens/s  (median; range {:.2}-{:.2}): {name}\n\
             cached batch 1 / reference: {x:.1}x",
            s.median, s.min, s.max
        ),
        _ => {
            println!("reference: not run (--reference-python PATH runs labml's sampler in PyTorch)")
        }
    }
    println!(
        "ours, full recompute per token (Rust, estimated from {} forwards): {:.1} tokens/s; \
         max |cached - recompute| logit {:.2e}",
        r.ours_recompute_samples, r.ours_recompute_tokens_per_s, r.max_logit_diff
    );
    Ok(())
}
