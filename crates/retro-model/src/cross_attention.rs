//! The encoder's cross-attention: each neighbour attends to the input chunk that retrieved it.
//! Queries from the normed neighbour embeddings, keys and values from the (already normed) chunk;
//! no mask, no rotary embedding. Residual on the neighbour side.

use crate::attention_block_op::Attend;
use crate::attention_params::AttentionParams;
use crate::config::RetroConfig;
use crate::kernels::Kernels;
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct CrossAttention {
    pub(crate) params: AttentionParams,
}

impl CrossAttention {
    pub(crate) fn new(pb: &mut ParamBuilder, name: &str, c: &RetroConfig) -> Result<Self> {
        Ok(Self {
            params: AttentionParams::new(pb, name, c)?,
        })
    }

    /// `e [b, c, k, n, d_model]` neighbours, `h [b, c, chunk_len, d_model]` normed input chunks.
    pub fn forward(&self, e: &Tensor, h: &Tensor, kern: Kernels) -> Result<Tensor> {
        let (b, c, k, n, _) = e.dims5()?;
        let attend = Attend::Cross {
            ctx: h,
            groups: b * c,
        };
        if let Some(y) = self.params.block(e, attend, kern)? {
            return Ok(y);
        }
        let (_, _, cl, _) = h.dims4()?;
        let p = &self.params;
        let x = p.norm.forward(e, kern)?;
        let out = p
            .attend(&x, h, (b * c, k * n, cl), None, kern)? // [b*c, k*n, h, dk]
            .reshape((b, c, k, n, p.n_heads * p.d_k))?;
        p.output.forward_k(&out, Some(e), kern)
    }
}
