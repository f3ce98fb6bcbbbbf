//! What generation needs of a model beside what evaluation does ([`Scorer`]): a decoding state
//! fed one token at a time, with the neighbours of the chunk that token completes. One loop
//! ([`crate::generate()`]) drives the labml model, a RETRO-fitted base and a base alone.

use crate::error::Result;
use crate::eval::Scorer;
use crate::generate::StepInput;
use candle_core::Tensor;
use retro_model::llama::{LlamaBase, LlamaCache};
use retro_model::retrofit::{RetroFitCache, RetroFitted};
use retro_model::{DecodeState, NeighbourBlock, RetroModel};

pub trait Decoder: Scorer {
    type State: Send;
    /// A state for one sequence; `retrieval` false decodes RETRO\[OFF\].
    fn start(&self, retrieval: bool) -> Self::State;
    /// Feeds `token` and returns the next token's logits `[vocab]`. `neighbours [1, 1, K, N]`
    /// (and their gate `keep [1]`) come with the token that completes a chunk.
    fn step(
        &self,
        state: &mut Self::State,
        token: u32,
        neighbours: Option<&NeighbourBlock>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// One step of each of several sequences (a server's requests): `inputs[i]` feeds
    /// `states[i]`; returns each one's next-token logits `[vocab]`. One sequence after another
    /// unless the model batches them (the Llama base and a RETRO-fit of it do: their
    /// projections run once over the batch).
    fn step_batch(
        &self,
        states: &mut [&mut Self::State],
        inputs: &[StepInput],
    ) -> Result<Vec<Tensor>> {
        states
            .iter_mut()
            .zip(inputs)
            .map(|(s, i)| self.step(s, i.token, i.neighbours.as_ref(), i.keep.as_ref()))
            .collect()
    }
    /// The token that ends a text, where the model has one.
    fn eos(&self) -> Option<u32>;
    /// The most positions the model reads, where it has a limit.
    fn context(&self) -> Option<usize> {
        None
    }
}

impl Decoder for RetroModel {
    type State = DecodeState;
    fn start(&self, retrieval: bool) -> DecodeState {
        self.start_decoding(1, retrieval)
    }
    fn step(
        &self,
        state: &mut DecodeState,
        token: u32,
        neighbours: Option<&NeighbourBlock>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = Tensor::new(&[token], RetroModel::device(self))?;
        Ok(self.step_block(state, &x, neighbours, keep)?.squeeze(0)?)
    }
    fn eos(&self) -> Option<u32> {
        None
    }
}

impl Decoder for RetroFitted {
    type State = RetroFitCache;
    fn start(&self, retrieval: bool) -> RetroFitCache {
        self.new_cache(retrieval)
    }
    fn step(
        &self,
        state: &mut RetroFitCache,
        token: u32,
        neighbours: Option<&NeighbourBlock>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let device = self.base().device();
        let x = Tensor::new(&[[token]], device)?;
        let ret = neighbours.map(|n| n.to_tensor(device)).transpose()?;
        let keep = keep.map(|k| k.reshape((1, 1))).transpose()?;
        let logits = self.forward_cached(&x, state, ret.as_ref(), keep.as_ref())?;
        Ok(logits.flatten_all()?)
    }
    fn step_batch(
        &self,
        states: &mut [&mut RetroFitCache],
        inputs: &[StepInput],
    ) -> Result<Vec<Tensor>> {
        let tokens: Vec<u32> = inputs.iter().map(|i| i.token).collect();
        let device = self.base().device();
        let rets = inputs
            .iter()
            .map(|i| {
                i.neighbours
                    .as_ref()
                    .map(|n| n.to_tensor(device))
                    .transpose()
            })
            .collect::<retro_model::Result<Vec<_>>>()?;
        let keeps = inputs
            .iter()
            .map(|i| i.keep.as_ref().map(|k| k.reshape((1, 1))).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        rows(&self.step_batch(&tokens, states, &rets, &keeps)?)
    }
    fn eos(&self) -> Option<u32> {
        self.base().config().eos_token_id
    }
    fn context(&self) -> Option<usize> {
        Some(self.base().config().max_position_embeddings)
    }
}

impl Decoder for LlamaBase {
    type State = LlamaCache;
    fn start(&self, _retrieval: bool) -> LlamaCache {
        self.new_cache()
    }
    fn step(
        &self,
        state: &mut LlamaCache,
        token: u32,
        _neighbours: Option<&NeighbourBlock>,
        _keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = Tensor::new(&[[token]], LlamaBase::device(self))?;
        let pos = state.position();
        Ok(self.forward(&x, pos, Some(state))?.flatten_all()?)
    }
    fn step_batch(
        &self,
        states: &mut [&mut LlamaCache],
        inputs: &[StepInput],
    ) -> Result<Vec<Tensor>> {
        let tokens: Vec<u32> = inputs.iter().map(|i| i.token).collect();
        let mut none = vec![retro_model::llama::NoHook; tokens.len()];
        let mut hooks: Vec<&mut dyn retro_model::llama::LayerHook> = none
            .iter_mut()
            .map(|h| h as &mut dyn retro_model::llama::LayerHook)
            .collect();
        rows(&LlamaBase::step_batch(self, &tokens, states, &mut hooks)?)
    }
    fn eos(&self) -> Option<u32> {
        self.config().eos_token_id
    }
    fn context(&self) -> Option<usize> {
        Some(self.config().max_position_embeddings)
    }
}

/// The rows `[vocab]` of batched logits `[B, vocab]`, one per sequence.
fn rows(logits: &Tensor) -> Result<Vec<Tensor>> {
    Ok((0..logits.dim(0)?)
        .map(|i| logits.get(i))
        .collect::<candle_core::Result<_>>()?)
}
