//! Throughput of the forward and of a training step (forward, cross-entropy, backward, AdamW) on random
//! ids, for `retro bench model`, the criterion bench and `examples/profile.rs`. Medians over timed
//! iterations after warm-up.

use candle_core::{DType, Device, Tensor};
use retro_model::train::{loss_and_grads, AdamW, AdamWParams};
use retro_model::{Result, RetroConfig, RetroModel};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelBenchSpec {
    pub preset: String,
    pub config: RetroConfig,
    pub batch: usize,
    pub seq_len: usize,
    pub neighbours: usize,
    pub neighbour_len: usize,
    pub warmup: usize,
    pub iters: usize,
}

impl ModelBenchSpec {
    /// labml's training setup: B 4, T 512, K 2, N 32 on the labml-small model.
    pub fn labml_small() -> Self {
        Self {
            preset: "labml-small".into(),
            config: RetroConfig::labml_small(),
            batch: 4,
            seq_len: 512,
            neighbours: 2,
            neighbour_len: 32,
            warmup: 2,
            iters: 10,
        }
    }

    pub fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// Deterministic pseudo-random `(x, y, ret)` on `device`.
    pub fn inputs(&self, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let c = self.seq_len / self.config.chunk_len;
        let shape = (
            self.batch,
            self.seq_len,
            c,
            self.neighbours,
            self.neighbour_len,
        );
        pseudo_random_inputs(self.config.n_vocab, shape, device)
    }
}

/// Deterministic pseudo-random ids below `vocab`: `x` and `y` `[B, T]` and `ret [B, C, K, N]`,
/// for `(B, T, C, K, N)`.
pub fn pseudo_random_inputs(
    vocab: usize,
    (b, t, c, k, n): (usize, usize, usize, usize, usize),
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let v = vocab as u32;
    let gen = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % v)
            .collect()
    };
    let x = Tensor::from_vec(gen(b * t, 1), (b, t), device)?;
    let y = Tensor::from_vec(gen(b * t, 2), (b, t), device)?;
    let ret = Tensor::from_vec(gen(b * c * k * n, 3), (b, c, k, n), device)?;
    Ok((x, y, ret))
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelBenchResult {
    pub preset: String,
    pub device: String,
    pub dtype: String,
    pub parameters: usize,
    pub tokens_per_batch: usize,
    pub forward_ms: f64,
    pub forward_tokens_per_s: f64,
    pub train_step_ms: f64,
    pub train_step_tokens_per_s: f64,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median milliseconds of `iters` calls of `f` after `warmup` more, the device synchronised
/// after each.
pub(crate) fn time_ms(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

pub fn run(spec: &ModelBenchSpec, device: &Device, dtype: DType) -> Result<ModelBenchResult> {
    let model = RetroModel::new(&spec.config, 0, dtype, device)?;
    let (x, y, ret) = spec.inputs(device)?;
    let forward_ms = time_ms(device, spec.warmup, spec.iters, || {
        model.forward(&x, &ret)?;
        Ok(())
    })?;
    let mut opt = AdamW::for_model(&model, AdamWParams::default())?;
    let train_step_ms = time_ms(device, spec.warmup, spec.iters, || {
        let (_, grads) = loss_and_grads(&model, &x, &y, Some(&ret))?;
        opt.step(&grads, 1e-4)?;
        Ok(())
    })?;
    let tokens = spec.tokens() as f64;
    Ok(ModelBenchResult {
        preset: spec.preset.clone(),
        device: format!("{:?}", device.location()),
        dtype: format!("{dtype:?}").to_lowercase(),
        parameters: model.num_parameters(),
        tokens_per_batch: spec.tokens(),
        forward_ms,
        forward_tokens_per_s: tokens / (forward_ms / 1e3),
        train_step_ms,
        train_step_tokens_per_s: tokens / (train_step_ms / 1e3),
    })
}
