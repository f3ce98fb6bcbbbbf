//! The pre-norm blocks of the rows engine, over plain `[rows, d]` slices: attention (self or
//! cross) and feed-forward, with their weights copied once into [`retro_kernels::decode`]'s
//! layouts, and the rotary tables of a run of positions.

use crate::attention::SelfAttention;
use crate::attention_params::AttentionParams;
use crate::error::Result;
use crate::feed_forward::FeedForward;
use retro_kernels::decode::{rotate, RowLinear, RowNorm, TiledKvCache};
use retro_kernels::Float;

/// cos and sin of `position * theta_i` for `p` consecutive positions, each `[p, d_k / 2]`, with
/// the angle in f64 as [`crate::rope::RopeTables`] computes it.
pub(super) struct Rope<T> {
    cos: Vec<T>,
    sin: Vec<T>,
    half: usize,
}

impl<T: Float> Rope<T> {
    pub(super) fn new(theta: &[f32], t0: usize, p: usize) -> Self {
        let (mut cos, mut sin) = (Vec::with_capacity(p * theta.len()), Vec::new());
        for pos in t0..t0 + p {
            for &t in theta {
                let a = pos as f64 * t as f64;
                cos.push(T::from_f64(a.cos()));
                sin.push(T::from_f64(a.sin()));
            }
        }
        Self {
            cos,
            sin,
            half: theta.len(),
        }
    }

    /// The tables of the i-th position.
    fn at(&self, i: usize) -> (&[T], &[T]) {
        let h = self.half;
        (&self.cos[i * h..][..h], &self.sin[i * h..][..h])
    }
}

/// A stack's blocks in the rows' layout: self-attention and feed-forward per layer, and the
/// cross-attentions of the layers that have one.
pub(super) type Layers<T> = (Vec<SelfBlock<T>>, Vec<FfBlock<T>>, Vec<CrossBlock<T>>);

/// Copies a stack's weights (the decoder's, or the neighbour encoder's) into the rows' layout, once:
/// `cross` are CCA's parameters in the decoder, the attention to the chunk in the encoder.
pub(super) fn layers<'a, T: Float>(
    attn: &[SelfAttention],
    ffw: &[FeedForward],
    cross: impl IntoIterator<Item = &'a AttentionParams>,
) -> Result<Layers<T>> {
    Ok((
        attn.iter()
            .map(|a| SelfBlock::new(&a.params))
            .collect::<Result<_>>()?,
        ffw.iter().map(FfBlock::new).collect::<Result<_>>()?,
        cross
            .into_iter()
            .map(CrossBlock::new)
            .collect::<Result<_>>()?,
    ))
}

/// A pre-norm self-attention block over rows: the norm, the query (scaled by 1/sqrt(d_k)), key
/// and value in one projection, and the output.
#[derive(Debug)]
pub(super) struct SelfBlock<T> {
    norm: RowNorm<T>,
    qkv: RowLinear<T>,
    output: RowLinear<T>,
    pub(super) n_heads: usize,
    pub(super) d_k: usize,
}

/// `rows` rows of `x` projected by `lin`.
fn project<T: Float>(lin: &RowLinear<T>, x: &[T], rows: usize) -> Vec<T> {
    let mut y = vec![T::zero(); rows * lin.n_out()];
    lin.forward(x, &mut y);
    y
}

impl<T: Float> SelfBlock<T> {
    pub(super) fn new(p: &AttentionParams) -> Result<Self> {
        let scale = 1.0 / (p.d_k as f64).sqrt();
        Ok(Self {
            norm: RowNorm::new(&p.norm)?,
            qkv: RowLinear::fused(&[(&p.query, scale), (&p.key, 1.0), (&p.value, 1.0)])?,
            output: RowLinear::new(&p.output)?,
            n_heads: p.n_heads,
            d_k: p.d_k,
        })
    }

    /// Self-attention: `h [S, P, d]` is S sequences of P new rows, row i rotated by `rope.at(i)`.
    /// Their keys and values are appended to `cache` (of S sequences); each row attends to the
    /// cached positions up to its own (`causal`) or to all of them; `h` gets the output added.
    pub(super) fn forward(
        &self,
        h: &mut [T],
        p: usize,
        rope: &Rope<T>,
        cache: &mut TiledKvCache<T>,
        causal: bool,
    ) {
        let (d, hd, dk) = (self.qkv.n_in(), self.output.n_in(), self.d_k);
        let rows = h.len() / d;
        let mut x = vec![T::zero(); rows * d];
        self.norm.forward(h, &mut x);
        let mut qkv = project(&self.qkv, &x, rows);
        let mut q = Vec::with_capacity(rows * hd);
        for (r, row) in qkv.chunks_exact_mut(3 * hd).enumerate() {
            let (cos, sin) = rope.at(r % p);
            for head in row[..2 * hd].chunks_exact_mut(dk) {
                rotate(head, cos, sin);
            }
            q.extend_from_slice(&row[..hd]);
        }
        cache.append_packed(&qkv, 3 * hd, hd, 2 * hd, p);
        let mut att = vec![T::zero(); rows * hd];
        if causal {
            cache.attend_causal(&q, p, &mut att);
        } else {
            cache.attend_all(&q, p, &mut att);
        }
        self.output.forward_add(&att, h);
    }
}

/// A pre-norm cross-attention block over rows (CCA, and the encoder's attention to its chunk):
/// the norm and the query (scaled by 1/sqrt(d_k)) of the rows, the key and value (one
/// projection) of the context, and the output.
#[derive(Debug)]
pub(super) struct CrossBlock<T> {
    norm: RowNorm<T>,
    query: RowLinear<T>,
    kv: RowLinear<T>,
    output: RowLinear<T>,
    n_heads: usize,
    d_k: usize,
}

impl<T: Float> CrossBlock<T> {
    pub(super) fn new(p: &AttentionParams) -> Result<Self> {
        let scale = 1.0 / (p.d_k as f64).sqrt();
        Ok(Self {
            norm: RowNorm::new(&p.norm)?,
            query: RowLinear::fused(&[(&p.query, scale)])?,
            kv: RowLinear::fused(&[(&p.key, 1.0), (&p.value, 1.0)])?,
            output: RowLinear::new(&p.output)?,
            n_heads: p.n_heads,
            d_k: p.d_k,
        })
    }

    /// The keys and values of `ctx [S, n, d]` (S sequences of n rows), as a cache of n positions.
    pub(super) fn context(&self, ctx: &[T], s: usize) -> TiledKvCache<T> {
        let (d, hd) = (self.kv.n_in(), self.output.n_in());
        let n = ctx.len() / (d * s).max(1);
        let mut cache = TiledKvCache::new(s, self.n_heads, self.d_k);
        cache.append_packed(&project(&self.kv, ctx, s * n), 2 * hd, 0, hd, n);
        cache
    }

    /// `output(attend(query(norm(h)), ctx))` for `h [S, P, d]`, each sequence reading its
    /// context.
    pub(super) fn forward(&self, h: &[T], p: usize, ctx: &TiledKvCache<T>) -> Vec<T> {
        let (d, hd) = (self.kv.n_in(), self.output.n_in());
        let rows = h.len() / d;
        let mut x = vec![T::zero(); rows * d];
        self.norm.forward(h, &mut x);
        let q = project(&self.query, &x, rows);
        let mut att = vec![T::zero(); rows * hd];
        ctx.attend_all(&q, p, &mut att);
        self.output.forward(&att, &mut x);
        x
    }
}

/// Feed-forward over rows: `h += lin2(relu(lin1(norm(h))))`.
#[derive(Debug)]
pub(super) struct FfBlock<T> {
    norm: RowNorm<T>,
    lin1: RowLinear<T>,
    lin2: RowLinear<T>,
}

impl<T: Float> FfBlock<T> {
    pub(super) fn new(f: &FeedForward) -> Result<Self> {
        Ok(Self {
            norm: RowNorm::new(&f.norm)?,
            lin1: RowLinear::new(&f.lin1)?,
            lin2: RowLinear::new(&f.lin2)?,
        })
    }

    pub(super) fn forward(&self, h: &mut [T]) {
        let rows = h.len() / self.lin1.n_in();
        let mut x = vec![T::zero(); h.len()];
        self.norm.forward(h, &mut x);
        let mut hidden = vec![T::zero(); rows * self.lin1.n_out()];
        self.lin1.forward(&x, &mut hidden);
        // A select, not a conditional store, so that the loop vectorises.
        hidden
            .iter_mut()
            .for_each(|z| *z = if *z < T::zero() { T::zero() } else { *z });
        self.lin2.forward_add(&hidden, h);
    }
}
