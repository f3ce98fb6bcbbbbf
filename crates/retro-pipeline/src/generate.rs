//! Generation with incremental decoding: neighbours are retrieved for every chunk of the prompt, then
//! for each generated chunk as soon as it is complete (the partial last chunk has none yet); the model
//! runs one token at a time on its KV cache, the encoder once per completed chunk.

use crate::decoder::Decoder;
use crate::error::{PipelineError, Result};
use crate::filter::Filter;
use crate::retriever::{Neighbours, Retriever};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use retro_index::LmTokenizer;
use retro_model::ChunkSchedule;

/// Greedy when `temperature == 0`; otherwise temperature, then top-k, then top-p (nucleus).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Errors naming the first parameter outside its domain.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(PipelineError::invalid(
                "temperature",
                self.temperature,
                "must be a finite number >= 0 (0 is greedy)",
            ));
        }
        if self.top_k == Some(0) {
            return Err(PipelineError::invalid(
                "top_k",
                0,
                "must be at least 1 (omit it to keep every token)",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(PipelineError::invalid(
                    "top_p",
                    p,
                    "must be in (0, 1] (omit it to keep every token)",
                ));
            }
        }
        Ok(())
    }
}

/// Picks a token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = s.top_k {
        idx.truncate(k.max(1));
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = s.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= top_p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// What the caller hears as generation proceeds.
pub enum Event<'a> {
    /// Neighbours retrieved for chunk `chunk` (its tokens are `tokens`).
    Neighbours {
        chunk: usize,
        tokens: &'a [u32],
        neighbours: &'a Neighbours,
    },
    /// A new token.
    Token(u32),
}

/// Generates up to `max_tokens` after `prompt` (fewer if the model's end-of-text token comes).
/// With `retriever` None (or a model that reads no neighbours) it generates without retrieval.
pub fn generate<D: Decoder>(
    model: &D,
    retriever: Option<&Retriever>,
    tokenizer: &LmTokenizer,
    prompt: &str,
    max_tokens: usize,
    sampling: &Sampling,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<Vec<u32>> {
    // The whole loop on one of rayon's workers: each step's kernels fork from there, instead of
    // every step being handed to the pool from outside (see `on_pool`).
    retro_model::device::on_pool(model.device(), || {
        sampling.validate()?;
        let cl = model.chunk_len();
        let retriever = retriever.filter(|_| model.reads_neighbours());
        if let Some(r) = retriever {
            if r.chunk_len() != cl {
                return Err(PipelineError::invalid(
                    "chunk_len",
                    cl,
                    format!("the database has chunk_len {}", r.chunk_len()),
                ));
            }
        }
        let mut tokens = tokenizer.encode(prompt)?;
        if tokens.is_empty() {
            return Err(PipelineError::invalid(
                "prompt",
                format!("{prompt:?}"),
                "encodes to no token",
            ));
        }
        let device = model.device().clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
        if let Some(context) = model.context().filter(|&c| tokens.len() + max_tokens > c) {
            return Err(PipelineError::invalid(
                "max_tokens",
                max_tokens,
                format!(
                    "the prompt's {} tokens and max_tokens exceed the model's context of {context}",
                    tokens.len()
                ),
            ));
        }
        let mut state = model.start(retriever.is_some());
        let schedule = retriever.map(|_| ChunkSchedule::new(cl));
        // Neighbours `[1, K, N]` of the chunk that ends at position t, if any, and their gate `[1]`.
        type Retrieved = (Option<Tensor>, Option<Tensor>);
        // The neighbours of the last chunks, as many as the coherent gate looks back over: it compares
        // each new chunk's with them.
        let lookback = retriever
            .and_then(|r| r.gate())
            .map_or(1, |g| g.lookback().max(1));
        let mut before: Option<Neighbours> = None;
        let mut neighbours_at =
            |tokens: &[u32], t: usize, on_event: &mut dyn FnMut(Event)| -> Result<Retrieved> {
                let Some(r) = retriever else {
                    return Ok((None, None));
                };
                let Some(u) = schedule.and_then(|s| s.completes(t)) else {
                    return Ok((None, None));
                };
                let chunk = &tokens[t + 1 - cl..=t];
                let n = r.retrieve_after(&[chunk.to_vec()], None, Filter::None, before.as_ref())?;
                on_event(Event::Neighbours {
                    chunk: u,
                    tokens: chunk,
                    neighbours: &n,
                });
                let keep = n.keep_tensor(&device)?.map(|k| k.reshape(1)).transpose()?;
                let ret = n.to_tensor(&device)?.squeeze(1)?;
                before = Some(match before.take() {
                    Some(b) => b.followed_by(&n, lookback)?,
                    None => n,
                });
                Ok((Some(ret), keep))
            };
        let mut logits = None;
        for t in 0..tokens.len() {
            let (nb, keep) = neighbours_at(&tokens, t, on_event)?;
            logits = Some(model.step(&mut state, tokens[t], nb.as_ref(), keep.as_ref())?);
        }
        let mut out = vec![];
        for _ in 0..max_tokens {
            let row: Vec<f32> = logits
                .take()
                .expect("a step ran")
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let next = sample(&row, sampling, &mut rng);
            if Some(next) == model.eos() {
                break;
            }
            out.push(next);
            tokens.push(next);
            on_event(Event::Token(next));
            let t = tokens.len() - 1;
            let (nb, keep) = neighbours_at(&tokens, t, on_event)?;
            logits = Some(model.step(&mut state, next, nb.as_ref(), keep.as_ref())?);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 2.9, -1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 1);
        let bad = |f: fn(&mut Sampling)| {
            let mut s = Sampling::default();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(bad(|s| s.temperature = f64::NAN).contains("temperature"));
        assert!(bad(|s| s.temperature = -1.0).contains(">= 0"));
        assert!(bad(|s| s.top_k = Some(0)).contains("top_k"));
        assert!(bad(|s| s.top_p = Some(0.0)).contains("(0, 1]"));
        assert!(bad(|s| s.top_p = Some(2.0)).contains("top_p"));
        let s = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            ..Default::default()
        };
        for _ in 0..200 {
            assert!(matches!(sample(&logits, &s, &mut rng), 1 | 2));
        }
        let s = Sampling {
            temperature: 1.0,
            top_p: Some(0.3),
            ..Default::default()
        };
        for _ in 0..200 {
            assert_eq!(sample(&logits, &s, &mut rng), 1);
        }
        let s = Sampling {
            temperature: 5.0,
            ..Default::default()
        };
        let seen: std::collections::HashSet<u32> =
            (0..500).map(|_| sample(&logits, &s, &mut rng)).collect();
        assert_eq!(seen.len(), 4);
    }
}
