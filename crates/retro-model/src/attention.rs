//! Multi-head self-attention with rotary embeddings: causal in the decoder, bidirectional in the
//! neighbour encoder. Pre-norm, residual. An optional KV cache serves incremental decoding.

use crate::attention_block_op::Attend;
use crate::attention_params::AttentionParams;
use crate::config::RetroConfig;
use crate::fused_attention::attention_heads;
use crate::kernels::Kernels;
use crate::layers::fused_linear;
use crate::params::ParamBuilder;
use crate::rope::RopeTables;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub(crate) params: AttentionParams,
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
    /// `{name}.*`, causal in the decoder, bidirectional in the encoder.
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        name: &str,
        c: &RetroConfig,
        causal: bool,
    ) -> Result<Self> {
        Ok(Self {
            params: AttentionParams::new(pb, name, c)?,
            causal,
        })
    }

    /// `h [.., s, d_model]` (leading dims are sequences); `rope` covers the absolute positions of
    /// these s rows; `mask` is `[s, seen + s]` for causal attention (None when no query can see a
    /// future key, e.g. s == 1). The mask must be [`causal_mask`]`(s, seen)`: the fused kernel
    /// applies it implicitly.
    pub fn forward(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        kern: Kernels,
    ) -> Result<Tensor> {
        if cache.is_none() {
            let attend = Attend::SelfAttention {
                cos: &rope.cos,
                sin: &rope.sin,
                causal: self.causal && mask.is_some(),
            };
            if let Some(y) = self.params.block(h, attend, kern)? {
                return Ok(y);
            }
        }
        if h.rank() != 3 {
            // [.., s, d] as [sequences, s, d] and back.
            let (s, d) = (h.dim(h.rank() - 2)?, h.dim(h.rank() - 1)?);
            let flat = h.reshape(((), s, d))?;
            return self
                .forward(&flat, rope, mask, cache, kern)?
                .reshape(h.dims());
        }
        let (b, s, _) = h.dims3()?;
        let p = &self.params;
        let (nh, dk) = (p.n_heads, p.d_k);
        let x = p.norm.forward(h, kern)?;
        let scale = 1.0 / (dk as f64).sqrt();
        // One GEMM for q, k, v; heads are views of it: [b, s, 3, h, dk].
        let qkv = fused_linear(
            &[(&p.query, scale), (&p.key, 1.0), (&p.value, 1.0)],
            &x,
            kern,
        )?
        .reshape((b, s, 3, nh, dk))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
        // RoPE is linear: the scale folded into the query weights commutes with it.
        let q = kern
            .rope_bshd(&part(0)?, &rope.cos, &rope.sin)?
            .transpose(1, 2)?;
        let mut k = kern
            .rope_bshd(&part(1)?, &rope.cos, &rope.sin)?
            .transpose(1, 2)?;
        let mut v = part(2)?.transpose(1, 2)?; // [b, h, s, dk] views
        if let Some(cache) = cache {
            if let (Some(pk), Some(pv)) = (&cache.k, &cache.v) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            } else {
                k = k.contiguous()?;
                v = v.contiguous()?;
            }
            cache.k = Some(k.clone());
            cache.v = Some(v.clone());
        }
        let seen = k.dim(2)? - s;
        let causal = (self.causal && mask.is_some()).then_some(seen);
        let out = attention_heads(&q, &k, &v, causal, kern)?; // [b, s, h, dk]
        p.output
            .forward_k(&out.reshape((b, s, nh * dk))?, Some(h), kern)
    }
}
