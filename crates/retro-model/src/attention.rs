//! Multi-head self-attention with rotary embeddings: causal in the decoder, bidirectional in the
//! neighbour encoder. Pre-norm, residual. An optional KV cache serves incremental decoding.

use crate::kernels::Kernels;
use crate::layers::{LayerNorm, Linear};
use crate::rope::RopeTables;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) output: Linear,
    pub(crate) n_heads: usize,
    pub(crate) d_k: usize,
    pub(crate) causal: bool,
}

/// Keys (after RoPE) and values of the positions seen so far, `[b, n_heads, seen, d_k]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `0` where key j may be seen by query i (absolute positions `offset + i >= j`), `-inf` elsewhere.
pub fn causal_mask(
    queries: usize,
    offset: usize,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let keys = offset + queries;
    let mask: Vec<f32> = (0..queries)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (queries, keys), device)?.to_dtype(dtype)
}

impl SelfAttention {
    /// Splits `[b, s, h*d_k]` into heads `[b, h, s, d_k]`.
    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.n_heads, self.d_k))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `h [b, s, d_model]`; `rope` covers the absolute positions of these s rows; `mask` is
    /// `[s, seen + s]` for causal attention (None when no query can see a future key, e.g. s == 1).
    pub fn forward(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (b, s, _) = h.dims3()?;
        let x = self.norm.forward(h, kern)?;
        let scale = 1.0 / (self.d_k as f64).sqrt();
        let q = kern.rope(&self.heads(&self.query.forward(&x)?)?, &rope.cos, &rope.sin)?;
        let q = (q * scale)?;
        let mut k = kern.rope(&self.heads(&self.key.forward(&x)?)?, &rope.cos, &rope.sin)?;
        let mut v = self.heads(&self.value.forward(&x)?)?;
        if let Some(cache) = cache {
            if let (Some(pk), Some(pv)) = (&cache.k, &cache.v) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            cache.k = Some(k.clone());
            cache.v = Some(v.clone());
        }
        let mut attn = q.matmul(&k.t()?)?;
        if self.causal {
            if let Some(mask) = mask {
                attn = attn.broadcast_add(mask)?;
            }
        }
        let attn = kern.softmax(&attn)?;
        let out = attn.matmul(&v)?; // [b, h, s, d_k]
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.n_heads * self.d_k))?;
        self.output.forward(&out)? + h
    }
}
