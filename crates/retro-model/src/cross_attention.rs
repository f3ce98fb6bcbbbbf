//! The encoder's cross-attention: each neighbour attends to the input chunk that retrieved it.
//! Queries from the normed neighbour embeddings, keys and values from the (already normed) chunk;
//! no mask, no rotary embedding. Residual on the neighbour side.

use crate::attention_block_op::{attention_block, Attend};
use crate::fused_attention::attention_heads;
use crate::kernels::Kernels;
use crate::layers::{block_params, fused_linear, LayerNorm, Linear};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct CrossAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) output: Linear,
    pub(crate) n_heads: usize,
    pub(crate) d_k: usize,
}

impl CrossAttention {
    /// `e [b, c, k, n, d_model]` neighbours, `h [b, c, chunk_len, d_model]` normed input chunks.
    pub fn forward(&self, e: &Tensor, h: &Tensor, kern: Kernels) -> Result<Tensor> {
        let (b, c, k, n, _) = e.dims5()?;
        if kern == Kernels::Differentiable {
            // Training: the whole block as one autograd node (CPU, f32/f64).
            let attend = Attend::Cross {
                ctx: h,
                groups: b * c,
            };
            let parts = [&self.query, &self.key, &self.value, &self.output];
            if let Some(y) =
                attention_block(e, attend, &block_params(&self.norm, parts, self.n_heads))?
            {
                return Ok(y);
            }
        }
        let (_, _, cl, _) = h.dims4()?;
        let (nh, dk) = (self.n_heads, self.d_k);
        let scale = 1.0 / (dk as f64).sqrt();
        let x = self.norm.forward(e, kern)?;
        // [b*c, k*n, h, dk] viewed as [b*c, h, k*n, dk]
        let q = fused_linear(&[(&self.query, scale)], &x, kern)?
            .reshape((b * c, k * n, nh, dk))?
            .transpose(1, 2)?;
        // Keys and values of the chunk in one GEMM: [b*c, cl, 2, h, dk].
        let kv = fused_linear(&[(&self.key, 1.0), (&self.value, 1.0)], h, kern)?.reshape((
            b * c,
            cl,
            2,
            nh,
            dk,
        ))?;
        let part = |i: usize| kv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let out = attention_heads(&q, &part(0)?, &part(1)?, None, kern)? // [b*c, k*n, h, dk]
            .reshape((b, c, k, n, nh * dk))?;
        self.output.forward_k(&out, Some(e), kern)
    }
}
