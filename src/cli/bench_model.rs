//! `retro bench model`: forward and train-step throughput of a preset.

use anyhow::{bail, Result};
use clap::Args;
use retro_bench::model::{self, ModelBenchSpec};

#[derive(Args, Debug)]
pub struct BenchModelArgs {
    /// Model and batch preset (labml-small: vocab 65, d_model 128, 16x16 heads, B 4, T 512, K 2, N 32).
    #[arg(long, default_value = "labml-small")]
    pub preset: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchModelArgs) -> Result<()> {
    let mut spec = match args.preset.as_str() {
        "labml-small" => ModelBenchSpec::labml_small(),
        p => bail!("unknown preset `{p}` (available: labml-small)"),
    };
    spec.iters = args.iters;
    spec.warmup = args.warmup;
    let device = retro_model::device_from_name(&args.device)?;
    let dtype = retro_model::dtype_from_name(&args.dtype)?;
    let r = model::run(&spec, &device, dtype)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "preset {} on {} ({}), {} parameters, {} tokens/batch",
            r.preset, r.device, r.dtype, r.parameters, r.tokens_per_batch
        );
        println!(
            "forward     {:9.1} ms  {:10.0} tokens/s",
            r.forward_ms, r.forward_tokens_per_s
        );
        println!(
            "train step  {:9.1} ms  {:10.0} tokens/s",
            r.train_step_ms, r.train_step_tokens_per_s
        );
    }
    Ok(())
}
