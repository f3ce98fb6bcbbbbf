//! The encoder's cross-attention: each neighbour attends to the input chunk that retrieved it.
//! Queries from the normed neighbour embeddings, keys and values from the (already normed) chunk;
//! no mask, no rotary embedding. Residual on the neighbour side.

use crate::attention_block_op::Attend;
use crate::attention_params::AttentionParams;
use crate::config::RetroConfig;
use crate::fused_attention::attention_heads;
use crate::kernels::Kernels;
use crate::layers::fused_linear;
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
        if kern == Kernels::Differentiable {
            let attend = Attend::Cross {
                ctx: h,
                groups: b * c,
            };
            if let Some(y) = self.params.train_block(e, attend)? {
                return Ok(y);
            }
        }
        let (_, _, cl, _) = h.dims4()?;
        let p = &self.params;
        let (nh, dk) = (p.n_heads, p.d_k);
        let scale = 1.0 / (dk as f64).sqrt();
        let x = p.norm.forward(e, kern)?;
        // [b*c, k*n, h, dk] viewed as [b*c, h, k*n, dk]
        let q = fused_linear(&[(&p.query, scale)], &x, kern)?
            .reshape((b * c, k * n, nh, dk))?
            .transpose(1, 2)?;
        // Keys and values of the chunk in one GEMM: [b*c, cl, 2, h, dk].
        let kv = fused_linear(&[(&p.key, 1.0), (&p.value, 1.0)], h, kern)?.reshape((
            b * c,
            cl,
            2,
            nh,
            dk,
        ))?;
        let part = |i: usize| kv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let out = attention_heads(&q, &part(0)?, &part(1)?, None, kern)? // [b*c, k*n, h, dk]
            .reshape((b, c, k, n, nh * dk))?;
        p.output.forward_k(&out, Some(e), kern)
    }
}
