//! Generation throughput, for `retro bench generate`: greedy decoding from a prompt with random
//! neighbours passed at every chunk end.
//!
//! - `cached`: [`RetroModel::prefill`] the prompt, then one [`RetroModel::step`] per new token, at
//!   each batch size asked for (every sequence with its own prompt and its own neighbours).
//! - `reference`: labml's sampler in PyTorch, `tools/reference/bench.py --generate` (a full forward
//!   over the whole growing sequence per new token, B = 1), run as a subprocess on the same work.
//!   Rounds alternate it with the cached runs, so both see the same machine; medians and ranges.
//! - `ours_recompute`: this project's own full forward per token (the same loop as labml's, in
//!   Rust), timed at a sample of the lengths: an estimate, and a check that the cached logits
//!   equal a full recompute.

use crate::model::median;
use candle_core::{DType, Device, IndexOp, Tensor};
use retro_model::{ModelError, Result, RetroConfig, RetroModel};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// How to run labml's sampler in PyTorch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reference {
    /// A Python with torch, e.g. `/work/venv-ref/bin/python`.
    pub python: PathBuf,
    /// `tools/reference/bench.py`.
    pub script: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBenchSpec {
    pub preset: String,
    pub config: RetroConfig,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub neighbours: usize,
    pub neighbour_len: usize,
    /// Batch sizes of the cached runs.
    pub batches: Vec<usize>,
    /// Rounds, each one reference run (if any) and one cached run per batch size.
    pub rounds: usize,
    pub reference: Option<Reference>,
    /// Time our recompute forward at every `recompute_stride`-th new token.
    pub recompute_stride: usize,
    pub seed: u64,
}

impl GenerateBenchSpec {
    /// The labml-small model, a 64-token prompt, 512 new tokens, K 2, N 32; batches 1, 8 and 32.
    pub fn labml_small() -> Self {
        Self {
            preset: "labml-small".into(),
            config: RetroConfig::labml_small(),
            prompt_len: 64,
            new_tokens: 512,
            neighbours: 2,
            neighbour_len: 32,
            batches: vec![1, 8, 32],
            rounds: 3,
            reference: None,
            recompute_stride: 64,
            seed: 0,
        }
    }

    /// Deterministic pseudo-random ids for `(salt, index)`.
    fn id(&self, salt: u64, i: u64) -> u32 {
        // splitmix64
        let mut z = self
            .seed
            .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % self.config.n_vocab as u64) as u32
    }

    /// The prompt of sequence `row`.
    fn prompt(&self, row: usize) -> Vec<u32> {
        let p = self.prompt_len as u64;
        (0..p).map(|i| self.id(1, row as u64 * p + i)).collect()
    }

    /// The `[K * N]` neighbour ids "retrieved" for chunk `u` of sequence `row`.
    fn chunk_neighbours(&self, row: usize, u: usize) -> Vec<u32> {
        let kn = (self.neighbours * self.neighbour_len) as u64;
        let salt = 2 + row as u64;
        (0..kn).map(|i| self.id(salt, u as u64 * kn + i)).collect()
    }

    /// `ret [B, C, K, N]` of sequences `0..b` for the first `c` chunks.
    fn ret(&self, b: usize, c: usize, device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = (0..b)
            .flat_map(|row| (0..c).flat_map(move |u| self.chunk_neighbours(row, u)))
            .collect();
        Ok(Tensor::from_vec(
            ids,
            (b, c, self.neighbours, self.neighbour_len),
            device,
        )?)
    }

    /// Indices `i` of the new tokens whose recompute forward (over `prompt_len + i` tokens) is timed.
    pub fn recompute_samples(&self) -> Vec<usize> {
        let s = self.recompute_stride.max(1);
        (s / 2..self.new_tokens)
            .step_by(s)
            .chain((self.new_tokens > 0 && s / 2 >= self.new_tokens).then_some(0))
            .collect()
    }
}

/// Median and range of one measurement over the rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Spread {
    fn of(runs: Vec<f64>) -> Self {
        let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = runs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self {
            median: median(runs.clone()),
            min,
            max,
            runs,
        }
    }
}

/// The cached runs at one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedRow {
    pub batch: usize,
    /// New tokens per second over the whole batch (B x new_tokens / wall time, prefill included).
    pub tokens_per_s: Spread,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBenchResult {
    pub preset: String,
    pub device: String,
    pub dtype: String,
    pub parameters: usize,
    pub threads: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub neighbours: usize,
    pub neighbour_len: usize,
    pub rounds: usize,
    pub cached: Vec<CachedRow>,
    /// The median at batch 1.
    pub cached_tokens_per_s: f64,
    /// What the reference is, as its run reported it.
    pub reference: Option<String>,
    /// labml's sampler in PyTorch, B 1: the median and range over the rounds.
    pub reference_tokens_per_s: Option<f64>,
    pub reference_runs: Option<Spread>,
    /// `cached_tokens_per_s / reference_tokens_per_s`.
    pub speedup_vs_reference: Option<f64>,
    /// Our own full recompute per token, estimated from `ours_recompute_samples` forwards.
    pub ours_recompute_tokens_per_s: f64,
    pub ours_recompute_samples: usize,
    /// Largest |cached - recompute| logit at the sampled positions (a correctness check).
    pub max_logit_diff: f64,
}

fn argmaxes(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// One greedy generation of `spec.new_tokens` tokens for `b` sequences: the wall time, the tokens
/// of sequence 0, and its logits before new token `i` for each `i` in `samples`.
fn cached_run(
    spec: &GenerateBenchSpec,
    model: &RetroModel,
    b: usize,
    samples: &[usize],
    device: &Device,
) -> Result<(f64, Vec<u32>, Vec<Tensor>)> {
    let t0 = Instant::now();
    // On one of rayon's workers, as `retro_pipeline::generate` runs its loop.
    let (tokens, sampled) =
        retro_model::device::on_pool(device, || cached_steps(spec, model, b, samples, device))?;
    device.synchronize()?;
    Ok((t0.elapsed().as_secs_f64(), tokens, sampled))
}

/// [`cached_run`]'s prefill and steps: the tokens of sequence 0 and the sampled logits.
fn cached_steps(
    spec: &GenerateBenchSpec,
    model: &RetroModel,
    b: usize,
    samples: &[usize],
    device: &Device,
) -> Result<(Vec<u32>, Vec<Tensor>)> {
    let (cl, p, n) = (spec.config.chunk_len, spec.prompt_len, spec.new_tokens);
    let prompts: Vec<u32> = (0..b).flat_map(|row| spec.prompt(row)).collect();
    let mut tokens = spec.prompt(0);
    let mut sampled = Vec::with_capacity(samples.len());
    let mut state = model.start_decoding(b, true);
    let x = Tensor::from_vec(prompts, (b, p), device)?;
    let mut last = model
        .prefill(&mut state, &x, Some(&spec.ret(b, p / cl, device)?))?
        .i((.., p - 1))?;
    for i in 0..n {
        if samples.contains(&i) {
            sampled.push(last.i(0)?);
        }
        let next = argmaxes(&last)?;
        tokens.push(next[0]);
        if i + 1 == n {
            break;
        }
        let t = state.position();
        let neighbours = if t % cl == cl - 1 {
            let ids: Vec<u32> = (0..b)
                .flat_map(|row| spec.chunk_neighbours(row, t / cl))
                .collect();
            Some(Tensor::from_vec(
                ids,
                (b, spec.neighbours, spec.neighbour_len),
                device,
            )?)
        } else {
            None
        };
        let tok = Tensor::from_vec(next, b, device)?;
        last = model.step(&mut state, &tok, neighbours.as_ref())?;
    }
    Ok((tokens, sampled))
}

/// One run of labml's sampler in PyTorch on the same work: its tokens/s and its description.
fn reference_run(spec: &GenerateBenchSpec, r: &Reference, threads: usize) -> Result<(f64, String)> {
    let fail = |what: String| ModelError::Config(format!("bench generate: reference {what}"));
    if !r.script.is_file() {
        return Err(fail(format!(
            "script {} does not exist",
            r.script.display()
        )));
    }
    let out = Command::new(&r.python)
        .arg(&r.script)
        .args(["--generate", "--threads", &threads.to_string()])
        .args(["--prompt-len", &spec.prompt_len.to_string()])
        .args(["--new-tokens", &spec.new_tokens.to_string()])
        .output()
        .map_err(|e| fail(format!("{} could not start: {e}", r.python.display())))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} {} failed ({}): {}",
            r.python.display(),
            r.script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| fail(format!("printed `{line}`, not JSON: {e}")))?;
    let tps = v["recompute_tokens_per_s"]
        .as_f64()
        .ok_or_else(|| fail(format!("printed no recompute_tokens_per_s: `{line}`")))?;
    let torch = v["torch_version"].as_str().unwrap_or("?");
    Ok((
        tps,
        format!(
            "labml's sampler in PyTorch {torch} ({}, B 1)",
            r.script.display()
        ),
    ))
}

pub fn run(spec: &GenerateBenchSpec, device: &Device, dtype: DType) -> Result<GenerateBenchResult> {
    if spec.prompt_len == 0 || spec.new_tokens == 0 || spec.rounds == 0 {
        return Err(ModelError::Config(
            "bench generate: prompt_len, new_tokens and rounds must be > 0".into(),
        ));
    }
    if spec.batches.contains(&0) || spec.batches.is_empty() {
        return Err(ModelError::Config(
            "bench generate: batch sizes must be > 0".into(),
        ));
    }
    if let Some(r) = &spec.reference {
        if !r.script.is_file() {
            return Err(ModelError::Config(format!(
                "bench generate: the reference script {} does not exist (run from the repository \
                 root, or pass --reference-script)",
                r.script.display()
            )));
        }
    }
    let model = RetroModel::new(&spec.config, spec.seed, dtype, device)?;
    let cl = spec.config.chunk_len;
    let (p, n) = (spec.prompt_len, spec.new_tokens);
    let samples = spec.recompute_samples();
    let threads = rayon::current_num_threads();

    // Warm-up: a short generation at each batch size.
    let short = GenerateBenchSpec {
        new_tokens: cl + 1,
        ..spec.clone()
    };
    for &b in &spec.batches {
        cached_run(&short, &model, b, &[], device)?;
    }

    let mut per_batch = vec![Vec::new(); spec.batches.len()];
    let mut reference = Vec::new();
    let mut reference_name = None;
    let (mut tokens, mut sampled) = (Vec::new(), Vec::new());
    for _ in 0..spec.rounds {
        if let Some(r) = &spec.reference {
            let (tps, name) = reference_run(spec, r, threads)?;
            reference.push(tps);
            reference_name = Some(name);
        }
        for (j, &b) in spec.batches.iter().enumerate() {
            let (s, t, l) = cached_run(spec, &model, b, &samples, device)?;
            per_batch[j].push((b * n) as f64 / s);
            if b == 1 || tokens.is_empty() {
                (tokens, sampled) = (t, l);
            }
        }
    }

    // Our recompute: the full forward over the p + i tokens that choose new token i, at the
    // sampled i, for sequence 0.
    let mut times = Vec::with_capacity(samples.len());
    let mut max_diff = 0f64;
    for (&i, cached) in samples.iter().zip(&sampled) {
        let len = p + i;
        let x = Tensor::new(&tokens[..len], device)?.unsqueeze(0)?;
        let ret = spec.ret(1, len / cl, device)?;
        let t0 = Instant::now();
        let logits = model.forward(&x, &ret)?.i((0, len - 1))?;
        std::hint::black_box(logits.argmax(0)?.to_scalar::<u32>()?);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        let d = (logits - cached)?
            .abs()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        max_diff = max_diff.max(d);
    }
    let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let cached: Vec<CachedRow> = spec
        .batches
        .iter()
        .zip(per_batch)
        .map(|(&batch, runs)| CachedRow {
            batch,
            tokens_per_s: Spread::of(runs),
        })
        .collect();
    let cached_tokens_per_s = cached
        .iter()
        .find(|r| r.batch == 1)
        .unwrap_or(&cached[0])
        .tokens_per_s
        .median;
    let reference_runs = (!reference.is_empty()).then(|| Spread::of(reference));
    let reference_tokens_per_s = reference_runs.as_ref().map(|s| s.median);
    Ok(GenerateBenchResult {
        preset: spec.preset.clone(),
        device: format!("{:?}", device.location()),
        dtype: format!("{dtype:?}").to_lowercase(),
        parameters: model.num_parameters(),
        threads,
        prompt_len: p,
        new_tokens: n,
        neighbours: spec.neighbours,
        neighbour_len: spec.neighbour_len,
        rounds: spec.rounds,
        cached,
        cached_tokens_per_s,
        reference: reference_name,
        reference_tokens_per_s,
        reference_runs,
        speedup_vs_reference: reference_tokens_per_s.map(|r| cached_tokens_per_s / r),
        ours_recompute_tokens_per_s: 1e3 / mean_ms,
        ours_recompute_samples: times.len(),
        max_logit_diff: max_diff,
    })
}
