//! What generation needs of a model beside what evaluation does ([`Scorer`]): a decoding state
//! fed one token at a time, with the neighbours of the chunk that token completes. One loop
//! ([`crate::generate()`]) drives the labml model, a RETRO-fitted base and a base alone.

use crate::error::Result;
use crate::eval::Scorer;
use candle_core::Tensor;
use retro_model::llama::{LlamaBase, LlamaCache};
use retro_model::retrofit::{RetroFitCache, RetroFitted};
use retro_model::{DecodeState, RetroModel};

pub trait Decoder: Scorer {
    type State: Send;
    /// A state for one sequence; `retrieval` false decodes RETRO\[OFF\].
    fn start(&self, retrieval: bool) -> Self::State;
    /// Feeds `token` and returns the next token's logits `[vocab]`. `neighbours [1, K, N]` (and
    /// their gate `keep [1]`) come with the token that completes a chunk.
    fn step(
        &self,
        state: &mut Self::State,
        token: u32,
        neighbours: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor>;
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
        neighbours: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = Tensor::new(&[token], RetroModel::device(self))?;
        Ok(self.step_gated(state, &x, neighbours, keep)?.squeeze(0)?)
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
        neighbours: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = Tensor::new(&[[token]], self.base().device())?;
        let ret = neighbours.map(|n| n.unsqueeze(1)).transpose()?;
        let keep = keep.map(|k| k.reshape((1, 1))).transpose()?;
        let logits = self.forward_cached(&x, state, ret.as_ref(), keep.as_ref())?;
        Ok(logits.flatten_all()?)
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
        _neighbours: Option<&Tensor>,
        _keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = Tensor::new(&[[token]], LlamaBase::device(self))?;
        let pos = state.position();
        Ok(self.forward(&x, pos, Some(state))?.flatten_all()?)
    }
    fn eos(&self) -> Option<u32> {
        self.config().eos_token_id
    }
    fn context(&self) -> Option<usize> {
        Some(self.config().max_position_embeddings)
    }
}
