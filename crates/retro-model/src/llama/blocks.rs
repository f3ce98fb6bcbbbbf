//! The Llama decoder's blocks: RMSNorm, grouped-query self-attention with rotary embeddings
//! (rotate-half, as Hugging Face's weights are laid out) and the SwiGLU feed-forward.
//! Each takes [`Kernels`]: fused candle kernels for inference, differentiable ops for training
//! through the frozen blocks (gradients reach the RETRO-fitted blocks below them).

use crate::kernels::Kernels;
use candle_core::{DType, Device, Result, Tensor, D};

/// `x / sqrt(mean(x^2) + eps) * weight`, over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, kern: Kernels) -> Result<Tensor> {
        match kern {
            Kernels::Fused => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32),
            Kernels::Differentiable => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
                    .broadcast_mul(&self.weight)
            }
        }
    }
}

/// Up to this many rows (decoding steps), [`project`] takes [`few_rows`].
const SMALL_ROWS: usize = 16;

/// `x @ w^T` for `x [.., in]` and `w [out, in]` (PyTorch's layout), no bias. The base is frozen:
/// differentiable kernels give `x` a gradient and `w` none (candle's matmul would compute both).
pub(crate) fn project(x: &Tensor, w: &Tensor, kern: Kernels) -> Result<Tensor> {
    if kern == Kernels::Differentiable {
        return retro_kernels::frozen_linear::frozen_linear(x, w);
    }
    let dims = x.dims();
    let (rows, inp) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let x = x.reshape((rows, inp))?;
    let y = if rows <= SMALL_ROWS {
        few_rows(&x, w)?
    } else {
        x.matmul(&w.t()?)?
    };
    let mut out = dims.to_vec();
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// `x w^T` for a few rows `x [rows, in]`, computed as `(w x^T)^T` with the weight's rows split
/// among rayon's threads. The gemm crate runs products this small on one thread, and packs the
/// whole weight as the right-hand side of `x w^T` on every call; a decoding step is nothing but
/// such products (twice as fast at one row on two cores, 1.7 times at eight). Each output is
/// the same dot product whatever the split, so a sequence decodes to the same logits alone or
/// batched.
fn few_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let out = w.dim(0)?;
    let rows = x.dim(0)?;
    // Two to seven columns run slower than eight on the gemm crate (two take four times one's
    // time): pad with zero rows, drop their outputs.
    let x = if rows > 1 && rows < 8 {
        Tensor::cat(
            &[
                x,
                &Tensor::zeros((8 - rows, x.dim(1)?), x.dtype(), x.device())?,
            ],
            0,
        )?
    } else {
        x.clone()
    };
    let xt = x.t()?.contiguous()?;
    let parts = rayon::current_num_threads().min(out / 64).max(1);
    if parts == 1 || !w.device().is_cpu() {
        return w.matmul(&xt)?.narrow(1, 0, rows)?.t()?.contiguous();
    }
    let step = out.div_ceil(parts);
    let pieces = (0..parts)
        .into_par_iter()
        .map(|p| {
            let start = p * step;
            w.narrow(0, start, step.min(out - start))?.matmul(&xt)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&pieces, 0)?
        .narrow(1, 0, rows)?
        .t()?
        .contiguous()
}

/// The rotary tables: `cos` and `sin` `[positions, head_dim / 2]`, frequencies
/// `base^(-2i / head_dim)` as Hugging Face's Llama computes them (in f32).
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(
        head_dim: usize,
        base: f64,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (base as f32).powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    pub fn positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Rotates `x [B, H, T, head_dim]` whose first row is at position `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize, kern: Kernels) -> Result<Tensor> {
        let t = x.dim(2)?;
        let (cos, sin) = (
            self.cos.narrow(0, offset, t)?,
            self.sin.narrow(0, offset, t)?,
        );
        match kern {
            Kernels::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin),
            Kernels::Differentiable => candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
        }
    }
}

/// Grouped-query self-attention: `n_heads` query heads share `n_kv_heads` key/value heads.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The keys (after RoPE) and values `[B, n_kv_heads, positions, head_dim]` of one layer.
pub type LayerKv = Option<(Tensor, Tensor)>;

impl SelfAttention {
    /// `x [B, T, d]` at positions `offset..offset + T`; `kv` holds the earlier positions' keys and
    /// values (it must cover exactly `0..offset`) and is extended with these.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        rotary: &Rotary,
        kv: Option<&mut LayerKv>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, kern)?;
        let y = self.attend(&q, &k, &v, offset, rotary, kv, kern)?;
        project(&y, &self.o, kern)
    }

    /// One token for each of B independent sequences `x [B, 1, d]`, sequence `i` at position
    /// `offsets[i]` on its own cache `kvs[i]`: the projections run once over the batch, the
    /// attention per sequence (continuous batching).
    pub fn forward_step(
        &self,
        x: &Tensor,
        offsets: &[usize],
        rotary: &Rotary,
        kvs: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let kern = Kernels::Fused;
        let (q, k, v) = self.qkv(x, kern)?;
        // Sequences attend over their own caches: one per thread.
        use rayon::prelude::*;
        let ys = offsets
            .par_iter()
            .zip(kvs.par_iter_mut())
            .enumerate()
            .map(|(i, (&offset, kv))| {
                let row = |t: &Tensor| t.narrow(0, i, 1);
                self.attend(
                    &row(&q)?,
                    &row(&k)?,
                    &row(&v)?,
                    offset,
                    rotary,
                    Some(kv),
                    kern,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        project(&Tensor::cat(&ys, 0)?, &self.o, kern)
    }

    /// The projections `q [B, T, h * hd]`, `k` and `v [B, T, hk * hd]` of `x [B, T, d]`.
    fn qkv(&self, x: &Tensor, kern: Kernels) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            project(x, &self.q, kern)?,
            project(x, &self.k, kern)?,
            project(x, &self.v, kern)?,
        ))
    }

    /// The attention of projected rows at positions `offset..offset + T`, before the output
    /// projection: `[B, T, h * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
        rotary: &Rotary,
        kv: Option<&mut LayerKv>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, hk, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: &Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let q = rotary.apply(&heads(q, h)?, offset, kern)?;
        let k = rotary.apply(&heads(k, hk)?, offset, kern)?;
        let v = heads(v, hk)?.contiguous()?;
        let (k, v) = match kv {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let s = k.dim(2)?;
        // Each key/value head serves n_heads / n_kv_heads query heads: group the queries
        // `[B, hk, rep * T, hd]` instead of copying the keys.
        let rep = h / hk;
        let q = q.reshape((b, hk, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = if t > 1 {
            let mask = causal_mask(t, offset, s, scores.dtype(), scores.device())?;
            scores
                .reshape((b, hk, rep, t, s))?
                .broadcast_add(&mask)?
                .reshape((b, hk, rep * t, s))?
        } else {
            scores
        };
        let p = match kern {
            Kernels::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
            Kernels::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        p.matmul(&v)?
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))
    }
}

/// `[T, S]`: 0 where query `offset + i` may see key `j` (`j <= offset + i`), -inf elsewhere.
fn causal_mask(t: usize, offset: usize, s: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (t, s), dev)?.to_dtype(dtype)
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl SwiGlu {
    pub fn forward(&self, x: &Tensor, kern: Kernels) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&project(x, &self.gate, kern)?)?;
        project(&(g * project(x, &self.up, kern)?)?, &self.down, kern)
    }
}

/// One decoder layer: `h + attn(norm(h))`, then `h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: RmsNorm,
    pub attn: SelfAttention,
    pub post_attention_norm: RmsNorm,
    pub mlp: SwiGlu,
}
