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
use retro_model::{ChunkSchedule, NeighbourBlock};

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

/// Picks a token from one row of logits. Only what top-k or top-p needs is sorted: a whole
/// vocabulary sorted per token (49,152 entries for SmolLM2) cost more than a batched model step.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    // Descending logits, ties by id: one total order, whichever way it is reached.
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let argmax = || {
        (0..logits.len())
            .min_by(|a, b| order(a, b))
            .map_or(0, |i| i as u32)
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if let Some(k) = s.top_k.filter(|&k| k < idx.len()) {
        idx.select_nth_unstable_by(k.max(1) - 1, order);
        idx.truncate(k.max(1));
    }
    if s.top_p.is_some() || s.top_k.is_some() {
        idx.sort_unstable_by(order);
    }
    let max = logits[argmax() as usize] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    if let Some(top_p) = s.top_p {
        let sum: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p / sum;
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

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The model's end-of-text token came, or the caller stopped it (a stop sequence).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The caller cancelled it (a client gone).
    Cancelled,
    /// Retrieval or the model failed for this sequence; the message says why.
    Failed(String),
}

/// One model step of one sequence: the token fed and, when it completes a chunk, that chunk's
/// neighbours `[1, 1, K, N]` and their gate `[1]`.
#[derive(Debug, Clone)]
pub struct StepInput {
    pub token: u32,
    pub neighbours: Option<NeighbourBlock>,
    pub keep: Option<Tensor>,
}

/// One sequence being generated, one token at a time: the prompt's tokens are fed first, then
/// each sampled token, with the neighbours of every chunk as soon as it completes (the partial
/// last chunk has none yet). [`generate`] drives one; a server drives many, their model steps
/// batched by [`step_together`]. Either way a sequence sees the same inputs and draws the same
/// samples.
pub struct Generation<'a, D: Decoder> {
    model: &'a D,
    retriever: Option<Retriever<'a>>,
    sampling: Sampling,
    rng: rand::rngs::StdRng,
    schedule: Option<ChunkSchedule>,
    /// How many chunks back the coherent gate compares with (1 without a gate).
    lookback: usize,
    /// The neighbours of the last chunks, as many as the gate looks back over.
    before: Option<Neighbours>,
    state: D::State,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens fed to the model so far.
    fed: usize,
    max_tokens: usize,
    /// The next token's logits, once every token so far is fed.
    logits: Option<Tensor>,
    finish: Option<Finish>,
}

impl<'a, D: Decoder> Generation<'a, D> {
    /// Checks the settings and the prompt (it must encode to at least one token and leave room
    /// for `max_tokens` in the model's context). With `retriever` None (or a model that reads no
    /// neighbours) it generates without retrieval.
    pub fn new(
        model: &'a D,
        retriever: Option<&Retriever<'a>>,
        tokenizer: &LmTokenizer,
        prompt: &str,
        max_tokens: usize,
        sampling: &Sampling,
    ) -> Result<Self> {
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
        let tokens = tokenizer.encode(prompt)?;
        if tokens.is_empty() {
            return Err(PipelineError::invalid(
                "prompt",
                format!("{prompt:?}"),
                "encodes to no token",
            ));
        }
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
        Ok(Self {
            model,
            retriever: retriever.cloned(),
            sampling: *sampling,
            rng: rand::rngs::StdRng::seed_from_u64(sampling.seed),
            schedule: retriever.map(|_| ChunkSchedule::new(cl)),
            lookback: retriever
                .and_then(|r| r.gate())
                .map_or(1, |g| g.lookback().max(1)),
            before: None,
            state: model.start(retriever.is_some()),
            prompt_len: tokens.len(),
            tokens,
            fed: 0,
            max_tokens,
            logits: None,
            finish: None,
        })
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }
    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<&Finish> {
        self.finish.as_ref()
    }
    /// Ends it (a stop sequence, a client gone); a finished generation stays as it ended.
    pub fn finish(&mut self, why: Finish) {
        self.finish.get_or_insert(why);
    }

    /// What the model is fed next, sampling the next token first once the prompt is in (and
    /// announcing it as [`Event::Token`]); None once finished.
    pub fn next_input(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<Option<StepInput>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.fed == self.tokens.len() {
            if self.generated().len() == self.max_tokens {
                self.finish = Some(Finish::Length);
                return Ok(None);
            }
            let row: Vec<f32> = self
                .logits
                .take()
                .expect("every token fed has its logits")
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let next = sample(&row, &self.sampling, &mut self.rng);
            if Some(next) == self.model.eos() {
                self.finish = Some(Finish::Stop);
                return Ok(None);
            }
            self.tokens.push(next);
            on_event(Event::Token(next));
            if self.generated().len() == self.max_tokens {
                // Nothing reads the logits after the last token.
                self.finish = Some(Finish::Length);
                return Ok(None);
            }
        }
        let t = self.fed;
        let (neighbours, keep) = self.neighbours_at(t, on_event)?;
        Ok(Some(StepInput {
            token: self.tokens[t],
            neighbours,
            keep,
        }))
    }

    /// Takes the model's logits `[vocab]` for the input [`Generation::next_input`] gave.
    pub fn accept(&mut self, logits: Tensor) {
        self.fed += 1;
        self.logits = Some(logits);
    }

    /// Neighbours `[1, 1, K, N]` of the chunk that ends at position t, if any, and their gate `[1]`.
    fn neighbours_at(
        &mut self,
        t: usize,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(Option<NeighbourBlock>, Option<Tensor>)> {
        let (Some(r), Some(u)) = (&self.retriever, self.schedule.and_then(|s| s.completes(t)))
        else {
            return Ok((None, None));
        };
        let chunk = &self.tokens[t + 1 - r.chunk_len()..=t];
        let n = r.retrieve_after(&[chunk.to_vec()], None, Filter::None, self.before.as_ref())?;
        on_event(Event::Neighbours {
            chunk: u,
            tokens: chunk,
            neighbours: &n,
        });
        let device = self.model.device();
        let keep = n.keep_tensor(device)?.map(|k| k.reshape(1)).transpose()?;
        let ret = n.tokens.clone();
        self.before = Some(match self.before.take() {
            Some(b) => b.followed_by(&n, self.lookback)?,
            None => n,
        });
        Ok((Some(ret), keep))
    }
}

/// Advances every unfinished generation in `gens` by one model step, the steps batched into one
/// call of [`Decoder::step_batch`]; `on_event(i, ..)` hears generation `i`. A generation whose
/// retrieval fails ends as [`Finish::Failed`] without stopping the others; a failed model step
/// fails them all. Returns how many were stepped.
pub fn step_together<D: Decoder>(
    model: &D,
    gens: &mut [Generation<'_, D>],
    on_event: &mut dyn FnMut(usize, Event),
) -> Result<usize> {
    let mut inputs = vec![];
    let mut who = vec![];
    for (i, g) in gens.iter_mut().enumerate() {
        match g.next_input(&mut |e| on_event(i, e)) {
            Ok(Some(input)) => {
                inputs.push(input);
                who.push(i);
            }
            Ok(None) => {}
            Err(e) => g.finish(Finish::Failed(e.to_string())),
        }
    }
    if inputs.is_empty() {
        return Ok(0);
    }
    let logits = {
        let mut states: Vec<&mut D::State> = gens
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| who.contains(i))
            .map(|(_, g)| &mut g.state)
            .collect();
        retro_model::device::on_pool(model.device(), || model.step_batch(&mut states, &inputs))
    };
    match logits {
        Ok(logits) => {
            for (i, l) in who.iter().zip(logits) {
                gens[*i].accept(l);
            }
            Ok(who.len())
        }
        Err(e) => {
            for &i in &who {
                gens[i].finish(Finish::Failed(e.to_string()));
            }
            Err(e)
        }
    }
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
        let mut g = Generation::new(model, retriever, tokenizer, prompt, max_tokens, sampling)?;
        while let Some(input) = g.next_input(on_event)? {
            let logits = model.step(
                &mut g.state,
                input.token,
                input.neighbours.as_ref(),
                input.keep.as_ref(),
            )?;
            g.accept(logits);
        }
        Ok(g.generated().to_vec())
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
