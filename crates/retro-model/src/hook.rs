//! What a decoder calls after each layer's self-attention. Both architectures run one forward
//! (full sequence or cached, training or inference); chunked cross-attention and the neighbour
//! encoder come in through a hook, so a new way of reading neighbours is a new hook, not a new
//! forward.

use crate::error::Result;
use candle_core::Tensor;

/// Called after each layer's self-attention with the residual stream `h [B, T, d]` at positions
/// `offset..offset + T`; returns the stream the layer goes on with. RETRO's chunked
/// cross-attention is such a hook.
pub trait LayerHook {
    fn after_attention(&mut self, layer: usize, h: Tensor, offset: usize) -> Result<Tensor>;
}

/// The hook of a decoder without retrieval (RETRO\[OFF\], or a base alone): the identity.
#[derive(Debug, Clone, Copy)]
pub struct NoHook;

impl LayerHook for NoHook {
    fn after_attention(&mut self, _: usize, h: Tensor, _: usize) -> Result<Tensor> {
        Ok(h)
    }
}
