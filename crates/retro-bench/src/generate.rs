//! Generation throughput, for `retro bench generate`: greedy decoding of B = 1 sequence from a short
//! prompt with random neighbours passed at every chunk end, two ways.
//!
//! - `cached`: [`RetroModel::prefill`] the prompt, then one [`RetroModel::step`] per new token (KV cache,
//!   encoder run once per completed chunk).
//! - `recompute`: what the labml reference does, a full [`RetroModel::forward`] over the whole growing
//!   sequence for every new token. Timing all `new_tokens` forwards would take minutes, so the forward is
//!   timed at a uniform sample of the lengths (every `recompute_stride`-th new token, centred in its
//!   stride) and the mean time per token estimates the total.
//!
//! Both produce the logits of the same positions: their largest difference over the sampled positions is
//! reported as a check.

use crate::model::median;
use candle_core::{DType, Device, IndexOp, Tensor};
use retro_model::{ModelError, Result, RetroConfig, RetroModel};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBenchSpec {
    pub preset: String,
    pub config: RetroConfig,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub neighbours: usize,
    pub neighbour_len: usize,
    /// Time the recompute forward at every `recompute_stride`-th new token.
    pub recompute_stride: usize,
    pub seed: u64,
}

impl GenerateBenchSpec {
    /// The labml-small model, a 16-token prompt, 512 new tokens, K 2, N 32.
    pub fn labml_small() -> Self {
        Self {
            preset: "labml-small".into(),
            config: RetroConfig::labml_small(),
            prompt_len: 16,
            new_tokens: 512,
            neighbours: 2,
            neighbour_len: 32,
            recompute_stride: 16,
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

    fn prompt(&self) -> Vec<u32> {
        (0..self.prompt_len as u64).map(|i| self.id(1, i)).collect()
    }

    /// The `[K * N]` neighbour ids "retrieved" for chunk `u`.
    fn chunk_neighbours(&self, u: usize) -> Vec<u32> {
        let kn = (self.neighbours * self.neighbour_len) as u64;
        (0..kn).map(|i| self.id(2, u as u64 * kn + i)).collect()
    }

    /// `ret [1, C, K, N]` for the first `c` chunks.
    fn ret(&self, c: usize, device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = (0..c).flat_map(|u| self.chunk_neighbours(u)).collect();
        Ok(Tensor::from_vec(
            ids,
            (1, c, self.neighbours, self.neighbour_len),
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBenchResult {
    pub preset: String,
    pub device: String,
    pub dtype: String,
    pub parameters: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub neighbours: usize,
    pub neighbour_len: usize,
    /// Wall time of the cached generation (prefill of the prompt and every step), seconds.
    pub cached_s: f64,
    pub cached_ms_per_token: f64,
    pub cached_tokens_per_s: f64,
    pub recompute_stride: usize,
    /// Number of recompute forwards timed.
    pub recompute_samples: usize,
    /// Median and mean over the sampled lengths of one full forward (= one new token), ms.
    pub recompute_median_ms_per_token: f64,
    pub recompute_mean_ms_per_token: f64,
    /// `new_tokens * recompute_mean_ms_per_token`: an estimate, not a measurement of the whole run.
    pub recompute_estimated_s: f64,
    pub recompute_tokens_per_s: f64,
    pub recompute_is_estimate: bool,
    /// `cached_tokens_per_s / recompute_tokens_per_s`.
    pub speedup: f64,
    /// Largest |cached - recompute| logit at the sampled positions (a correctness check).
    pub max_logit_diff: f64,
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(0)?.to_scalar::<u32>()?)
}

pub fn run(spec: &GenerateBenchSpec, device: &Device, dtype: DType) -> Result<GenerateBenchResult> {
    if spec.prompt_len == 0 || spec.new_tokens == 0 {
        return Err(ModelError::Config(
            "bench generate: prompt_len and new_tokens must be > 0".into(),
        ));
    }
    let model = RetroModel::new(&spec.config, spec.seed, dtype, device)?;
    let cl = spec.config.chunk_len;
    let (p, n) = (spec.prompt_len, spec.new_tokens);
    let prompt = spec.prompt();
    let samples = spec.recompute_samples();

    // Warm-up: the prompt once each way.
    {
        let mut state = model.start_decoding(1, true);
        let x = Tensor::new(prompt.as_slice(), device)?.unsqueeze(0)?;
        model.prefill(&mut state, &x, Some(&spec.ret(p / cl, device)?))?;
        model.forward(&x, &spec.ret(p / cl, device)?)?;
        device.synchronize()?;
    }

    // Cached: prefill, then one step per token; new token i is chosen from the logits at p + i - 1.
    let mut tokens = prompt.clone();
    let mut sampled_logits = Vec::with_capacity(samples.len());
    let t0 = Instant::now();
    let mut state = model.start_decoding(1, true);
    let x = Tensor::new(prompt.as_slice(), device)?.unsqueeze(0)?;
    let mut last = model
        .prefill(&mut state, &x, Some(&spec.ret(p / cl, device)?))?
        .i((0, p - 1))?;
    for i in 0..n {
        if samples.contains(&i) {
            sampled_logits.push(last.clone());
        }
        let next = argmax(&last)?;
        tokens.push(next);
        if i + 1 == n {
            break;
        }
        let t = state.position();
        let neighbours = if t % cl == cl - 1 {
            Some(Tensor::from_vec(
                spec.chunk_neighbours(t / cl),
                (1, spec.neighbours, spec.neighbour_len),
                device,
            )?)
        } else {
            None
        };
        let tok = Tensor::new(&[next], device)?;
        last = model.step(&mut state, &tok, neighbours.as_ref())?.i(0)?;
    }
    device.synchronize()?;
    let cached_s = t0.elapsed().as_secs_f64();

    // Recompute: the full forward over the p + i tokens that choose new token i, at the sampled i.
    let mut times = Vec::with_capacity(samples.len());
    let mut max_diff = 0f64;
    for (&i, cached) in samples.iter().zip(&sampled_logits) {
        let len = p + i;
        let x = Tensor::new(&tokens[..len], device)?.unsqueeze(0)?;
        let ret = spec.ret(len / cl, device)?;
        let t0 = Instant::now();
        let logits = model.forward(&x, &ret)?.i((0, len - 1))?;
        std::hint::black_box(argmax(&logits)?);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        let d = (logits - cached)?
            .abs()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        max_diff = max_diff.max(d);
    }
    let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let recompute_estimated_s = mean_ms * n as f64 / 1e3;
    let cached_tokens_per_s = n as f64 / cached_s;
    let recompute_tokens_per_s = 1e3 / mean_ms;
    Ok(GenerateBenchResult {
        preset: spec.preset.clone(),
        device: format!("{:?}", device.location()),
        dtype: format!("{dtype:?}").to_lowercase(),
        parameters: model.num_parameters(),
        prompt_len: p,
        new_tokens: n,
        neighbours: spec.neighbours,
        neighbour_len: spec.neighbour_len,
        cached_s,
        cached_ms_per_token: cached_s * 1e3 / n as f64,
        cached_tokens_per_s,
        recompute_stride: spec.recompute_stride,
        recompute_samples: times.len(),
        recompute_median_ms_per_token: median(times),
        recompute_mean_ms_per_token: mean_ms,
        recompute_estimated_s,
        recompute_tokens_per_s,
        recompute_is_estimate: true,
        speedup: cached_tokens_per_s / recompute_tokens_per_s,
        max_logit_diff: max_diff,
    })
}
