//! `retro bench generate`: greedy generation with the KV cache (`cached`) against labml's way, a full
//! forward over the whole growing sequence per new token (`recompute`, timed at sampled lengths).

use anyhow::{bail, Result};
use clap::Args;
use retro_bench::generate::{self, GenerateBenchSpec};

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Model preset (labml-small: vocab 65, d_model 128, 16x16 heads, 6 layers, CCA at {3, 5}, chunk 16;
    /// B 1, a 16-token prompt, K 2 random neighbours of N 32 at every chunk end).
    #[arg(long, default_value = "labml-small")]
    pub preset: String,
    #[arg(long, default_value_t = 512)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// Time the recompute forward at every N-th new token; the mean estimates the total.
    #[arg(long, default_value_t = 16)]
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
    if args.new_tokens == 0 || args.prompt_len == 0 || args.recompute_stride == 0 {
        bail!("--new-tokens, --prompt-len and --recompute-stride must be > 0");
    }
    spec.new_tokens = args.new_tokens;
    spec.prompt_len = args.prompt_len;
    spec.recompute_stride = args.recompute_stride;
    let device = retro_model::device_from_name(&args.device)?;
    let dtype = retro_model::dtype_from_name(&args.dtype)?;
    let r = generate::run(&spec, &device, dtype)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "preset {} on {} ({}), {} parameters: B 1, prompt {} tokens, {} new tokens, K {} x N {}",
            r.preset,
            r.device,
            r.dtype,
            r.parameters,
            r.prompt_len,
            r.new_tokens,
            r.neighbours,
            r.neighbour_len
        );
        println!(
            "cached     {:9.3} ms/token  {:9.1} tokens/s  ({:.2} s in all, measured)",
            r.cached_ms_per_token, r.cached_tokens_per_s, r.cached_s
        );
        println!(
            "recompute  {:9.3} ms/token  {:9.1} tokens/s  ({:.2} s in all, ESTIMATED: mean of {} forwards \
             timed at every {}th length)",
            r.recompute_mean_ms_per_token,
            r.recompute_tokens_per_s,
            r.recompute_estimated_s,
            r.recompute_samples,
            r.recompute_stride
        );
        println!(
            "speedup    {:.1}x   (max |cached - recompute| logit at the sampled positions: {:.2e})",
            r.speedup, r.max_logit_diff
        );
    }
    Ok(())
}
