//! Throughput of a RETRO-fit training step (`retro bench retrofit`): a frozen imported base with
//! CCA and the neighbour encoder, on random ids, at the shapes `retro train --base B --retrofit`
//! runs. Besides the whole step (forward, cross-entropy, backward, AdamW), the parts it is made
//! of: the frozen base's forward alone, the neighbours' pass through the base (what the encoder
//! reads, or every CCA layer's states of them), and the training forward, so that a change can
//! be placed.

use crate::model::{pseudo_random_inputs, time_ms};
use candle_core::Device;
use retro_model::llama::LlamaBase;
use retro_model::retrofit::{NeighbourStates, RetroFitted, RetrofitConfig};
use retro_model::train::{AdamW, AdamWParams};
use retro_model::{Kernels, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct RetrofitBenchSpec {
    pub batch: usize,
    pub seq_len: usize,
    pub neighbours: usize,
    /// Tokens per neighbour (chunk + continuation).
    pub neighbour_len: usize,
    pub fit: RetrofitConfig,
    pub warmup: usize,
    pub iters: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RetrofitBenchResult {
    pub spec: RetrofitBenchSpec,
    pub trainable_parameters: usize,
    pub tokens_per_batch: usize,
    /// The base alone, inference kernels (RETRO\[OFF\]).
    pub base_forward_ms: f64,
    /// The neighbours through the base (part of every step): its first `enc_input_layers` layers
    /// for the encoder, or up to the last CCA layer ([`NeighbourStates::BaseLayers`]).
    pub neighbour_input_ms: f64,
    /// The training forward (differentiable kernels) up to the logits.
    pub train_forward_ms: f64,
    /// Forward, cross-entropy, backward and AdamW.
    pub train_step_ms: f64,
    pub train_step_tokens_per_s: f64,
}

pub fn run(base: LlamaBase, spec: &RetrofitBenchSpec) -> Result<RetrofitBenchResult> {
    let (b, t, k, n) = (
        spec.batch,
        spec.seq_len,
        spec.neighbours,
        spec.neighbour_len,
    );
    let c = t / spec.fit.chunk_len;
    let cpu = Device::Cpu;
    let (x, y, ret) = pseudo_random_inputs(base.config().vocab_size, (b, t, c, k, n), &cpu)?;
    let model = RetroFitted::new(base, &spec.fit, 0)?;
    let (w, i) = (spec.warmup, spec.iters);
    let base_forward_ms = time_ms(&cpu, w, i, || {
        model.base().forward(&x, 0, None)?;
        Ok(())
    })?;
    let flat = ret.reshape((b * c * k, n))?;
    let depths: Vec<usize> = match spec.fit.neighbour_states {
        NeighbourStates::Encoder => vec![spec.fit.enc_input_layers],
        NeighbourStates::BaseLayers => model.blocks().ca_layers.iter().copied().collect(),
    };
    let neighbour_input_ms = time_ms(&cpu, w, i, || {
        if depths.iter().any(|&d| d > 0) {
            model.base().hiddens_after(&flat, &depths, Kernels::Fused)?;
        }
        Ok(())
    })?;
    let train_forward_ms = time_ms(&cpu, w, i, || {
        model.forward_train(&x, Some(&ret))?;
        Ok(())
    })?;
    let mut opt = AdamW::new(model.named_vars(), AdamWParams::default())?;
    let train_step_ms = time_ms(&cpu, w, i, || {
        let (_, grads) = model.loss_and_grads(&x, &y, Some(&ret))?;
        opt.step(&grads, 1e-4)?;
        Ok(())
    })?;
    Ok(RetrofitBenchResult {
        spec: spec.clone(),
        trainable_parameters: model.num_trainable(),
        tokens_per_batch: b * t,
        base_forward_ms,
        neighbour_input_ms,
        train_forward_ms,
        train_step_ms,
        train_step_tokens_per_s: (b * t) as f64 / (train_step_ms / 1e3),
    })
}
