//! Chunked cross-attention (CCA): each input chunk attends to the encoded neighbours retrieved by the
//! chunk before it. The shift is done here, as in the reference: drop the first `chunk_len - 1`
//! positions, attend chunk-wise, shift back right by `chunk_len - 1` zero rows, truncate to T.

use crate::kernels::Kernels;
use crate::layers::{LayerNorm, Linear};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct ChunkedCrossAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) output: Linear,
    pub(crate) n_heads: usize,
    pub(crate) d_k: usize,
    pub(crate) chunk_len: usize,
}

impl ChunkedCrossAttention {
    /// `h [b, t, d_model]`, `e [b, c, k, n, d_model]` encoded neighbours with `c == t / chunk_len`.
    pub fn forward(&self, h: &Tensor, e: &Tensor, kern: Kernels) -> Result<Tensor> {
        let (b, c, k, n, _) = e.dims5()?;
        if c == 0 {
            return Ok(h.clone());
        }
        let (_, t, _) = h.dims3()?;
        let (nh, dk, cl) = (self.n_heads, self.d_k, self.chunk_len);
        let scale = 1.0 / (dk as f64).sqrt();
        let kept = t - (cl - 1);
        let x = self.norm.forward(&h.narrow(1, cl - 1, kept)?, kern)?;
        // Zero rows after the norm so the queries split into c whole chunks (they land past T).
        let x = x.pad_with_zeros(1, 0, c * cl - kept)?;
        let q = (self.query.forward(&x)? * scale)?
            .reshape((b, c, cl, nh, dk))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((b * c * nh, cl, dk))?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, c, k * n, nh, dk))?
                .permute((0, 1, 3, 2, 4))?
                .reshape((b * c * nh, k * n, dk))
        };
        let kk = split(self.key.forward(e)?)?;
        let v = split(self.value.forward(e)?)?;
        // Softmax jointly over all k * n neighbour positions.
        let attn = kern.softmax(&q.matmul(&kk.t()?)?)?;
        let out = attn
            .matmul(&v)? // [b*c*h, cl, dk]
            .reshape((b, c, nh, cl, dk))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((b, c * cl, nh * dk))?;
        let out = self.output.forward(&out.narrow(1, 0, kept)?)?;
        out.pad_with_zeros(1, cl - 1, 0)? + h
    }
}
