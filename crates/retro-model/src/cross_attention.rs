//! The encoder's cross-attention: each neighbour attends to the input chunk that retrieved it.
//! Queries from the normed neighbour embeddings, keys and values from the (already normed) chunk;
//! no mask, no rotary embedding. Residual on the neighbour side.

use crate::kernels::Kernels;
use crate::layers::{LayerNorm, Linear};
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
        let (_, _, cl, _) = h.dims4()?;
        let (nh, dk) = (self.n_heads, self.d_k);
        let scale = 1.0 / (dk as f64).sqrt();
        let x = self.norm.forward(e, kern)?;
        // [b, c, k*n, h, dk] -> [b*c*h, k*n, dk]
        let q = (self.query.forward(&x)? * scale)?
            .reshape((b, c, k * n, nh, dk))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((b * c * nh, k * n, dk))?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, c, cl, nh, dk))?
                .permute((0, 1, 3, 2, 4))?
                .reshape((b * c * nh, cl, dk))
        };
        let kk = split(self.key.forward(h)?)?;
        let v = split(self.value.forward(h)?)?;
        let attn = kern.softmax(&q.matmul(&kk.t()?)?)?;
        let out = attn
            .matmul(&v)? // [b*c*h, k*n, dk]
            .reshape((b, c, nh, k * n, dk))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((b, c, k, n, nh * dk))?;
        self.output.forward(&out)? + e
    }
}
