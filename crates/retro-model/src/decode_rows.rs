//! Cached decoding on the CPU over plain rows: what [`RetroModel::step`] and
//! [`RetroModel::prefill`] compute, with the decoder's per-token work in a few
//! [`retro_kernels::decode`] kernels instead of a hundred small tensor ops. The neighbour encoder,
//! run once per completed chunk over its B x K x N rows, stays on tensors (GEMMs).
//!
//! A feed of `P` rows (one step, or a whole prompt) goes layer by layer over all of them: the
//! self-attention keys and values are appended to a preallocated [`KvCache`] and each row attends
//! causally; at the first CCA layer every chunk the rows complete is encoded before any row's
//! CCA reads it.

use crate::attention_params::AttentionParams;
use crate::error::Result;
use crate::feed_forward::FeedForward;
use crate::kernels::Kernels;
use crate::model::RetroModel;
use candle_core::{Device, Tensor};
use retro_kernels::decode::{rotate, values, KvCache, RowLinear, RowNorm};
use retro_kernels::Float;
use std::sync::Arc;

/// cos and sin of `position * theta_i` for `p` consecutive positions, each `[p, d_k / 2]`, with
/// the angle in f64 as [`crate::rope::RopeTables`] computes it.
struct Rope<T> {
    cos: Vec<T>,
    sin: Vec<T>,
    half: usize,
}

impl<T: Float> Rope<T> {
    fn new(theta: &[f32], t0: usize, p: usize) -> Self {
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

/// A pre-norm attention block over rows (self-attention, or CCA's cross-attention): the norm,
/// the query (scaled by 1/sqrt(d_k)), key and value (one projection), and the output.
#[derive(Debug)]
struct AttnBlock<T> {
    norm: RowNorm<T>,
    query: RowLinear<T>,
    kv: RowLinear<T>,
    output: RowLinear<T>,
    n_heads: usize,
    d_k: usize,
}

impl<T: Float> AttnBlock<T> {
    fn new(p: &AttentionParams) -> Result<Self> {
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

    /// `rows` rows of `x` projected by `lin`.
    fn project(lin: &RowLinear<T>, x: &[T], rows: usize) -> Vec<T> {
        let mut y = vec![T::zero(); rows * lin.n_out()];
        lin.forward(x, &mut y);
        y
    }

    /// Self-attention: `h [S, P, d]` is S sequences of P new rows, row i rotated by `rope.at(i)`.
    /// Their keys and values are appended to `cache` (of S sequences); each row attends to the
    /// cached positions up to its own (`causal`) or to all of them; `h` gets the output added.
    fn self_attend(
        &self,
        h: &mut [T],
        p: usize,
        rope: &Rope<T>,
        cache: &mut KvCache<T>,
        causal: bool,
    ) {
        let (d, hd, dk) = (self.kv.n_in(), self.output.n_in(), self.d_k);
        let rows = h.len() / d;
        let mut x = vec![T::zero(); rows * d];
        self.norm.forward(h, &mut x);
        let mut q = Self::project(&self.query, &x, rows);
        let mut kv = Self::project(&self.kv, &x, rows);
        for (r, (q, kv)) in q
            .chunks_exact_mut(hd)
            .zip(kv.chunks_exact_mut(2 * hd))
            .enumerate()
        {
            let (cos, sin) = rope.at(r % p);
            for head in q.chunks_exact_mut(dk).chain(kv[..hd].chunks_exact_mut(dk)) {
                rotate(head, cos, sin);
            }
        }
        cache.append_packed(&kv, 2 * hd, 0, hd, p);
        let mut att = vec![T::zero(); rows * hd];
        if causal {
            cache.attend_causal(&q, p, &mut att);
        } else {
            cache.attend_all(&q, p, &mut att);
        }
        self.output.forward_add(&att, h);
    }

    /// The keys and values of `ctx [S, n, d]` (S sequences of n rows), as a cache of n positions.
    fn context(&self, ctx: &[T], s: usize) -> KvCache<T> {
        let (d, hd) = (self.kv.n_in(), self.output.n_in());
        let n = ctx.len() / (d * s).max(1);
        let mut cache = KvCache::new(s, self.n_heads, self.d_k);
        cache.append_packed(&Self::project(&self.kv, ctx, s * n), 2 * hd, 0, hd, n);
        cache
    }

    /// Cross-attention: `output(attend(query(norm(h)), ctx))` for `h [S, P, d]`, each sequence
    /// reading its context.
    fn cross(&self, h: &[T], p: usize, ctx: &KvCache<T>) -> Vec<T> {
        let (d, hd) = (self.kv.n_in(), self.output.n_in());
        let rows = h.len() / d;
        let mut x = vec![T::zero(); rows * d];
        self.norm.forward(h, &mut x);
        let q = Self::project(&self.query, &x, rows);
        let mut att = vec![T::zero(); rows * hd];
        ctx.attend_all(&q, p, &mut att);
        self.output.forward(&att, &mut x);
        x
    }
}

/// Feed-forward over rows: `h += lin2(relu(lin1(norm(h))))`.
#[derive(Debug)]
struct FfBlock<T> {
    norm: RowNorm<T>,
    lin1: RowLinear<T>,
    lin2: RowLinear<T>,
}

impl<T: Float> FfBlock<T> {
    fn new(f: &FeedForward) -> Result<Self> {
        Ok(Self {
            norm: RowNorm::new(&f.norm)?,
            lin1: RowLinear::new(&f.lin1)?,
            lin2: RowLinear::new(&f.lin2)?,
        })
    }

    fn forward(&self, h: &mut [T]) {
        let rows = h.len() / self.lin1.n_in();
        let mut x = vec![T::zero(); h.len()];
        self.norm.forward(h, &mut x);
        let mut hidden = vec![T::zero(); rows * self.lin1.n_out()];
        self.lin1.forward(&x, &mut hidden);
        hidden.iter_mut().for_each(|z| {
            if *z < T::zero() {
                *z = T::zero()
            }
        });
        self.lin2.forward_add(&hidden, h);
    }
}

/// The model's weights, copied once per decoding state into the rows' layout.
#[derive(Debug)]
struct Weights<T> {
    emb: Vec<T>,
    attn: Vec<AttnBlock<T>>,
    ffw: Vec<FfBlock<T>>,
    cca: Vec<AttnBlock<T>>,
    read: RowLinear<T>,
}

/// The row decoder's state for a batch of B sequences.
#[derive(Debug, Clone)]
pub(crate) struct RowDecode<T> {
    w: Arc<Weights<T>>,
    /// One self-attention cache per decoder layer.
    caches: Vec<KvCache<T>>,
    /// Per sequence, the hidden rows `[rows, d]` (after the first CCA layer's self-attention) of
    /// the chunk in progress.
    chunk_h: Vec<Vec<T>>,
    /// Per completed chunk, its gate `[B]` (`None`: kept).
    keep: Vec<Option<Vec<T>>>,
    /// Per CCA layer, the chunk last attended to and its neighbours' keys and values.
    cca_kv: Vec<Option<(usize, KvCache<T>)>>,
}

/// What a feed needs of each chunk its rows complete: `ret [B, 1, K, N]` and `keep [B, 1, 1]`.
pub(crate) struct ChunkEnd {
    pub ret: Tensor,
    pub keep: Option<Tensor>,
}

/// The rows engine whatever its element type: what a decoding state holds.
pub(crate) trait RowsEngine: std::fmt::Debug + Send + Sync {
    /// Feeds `tokens [B, P]` (row-major) at positions `t0 .. t0 + P` and returns the logits
    /// `[B, P, n_vocab]`. `ends` holds, in order, one entry per chunk these positions complete
    /// (empty with retrieval off); `e` collects their encoded neighbours as tensors.
    fn feed(
        &mut self,
        m: &RetroModel,
        retrieval: bool,
        e: &mut Vec<Tensor>,
        t0: usize,
        tokens: &[u32],
        ends: &[ChunkEnd],
    ) -> Result<Tensor>;
    /// Numbers of decoder and CCA layers this state was made for.
    fn layout(&self) -> (usize, usize);
    /// Positions cached by decoder layer `p`.
    fn cached(&self, p: usize) -> Option<usize>;
    fn clone_box(&self) -> Box<dyn RowsEngine>;
}

impl Clone for Box<dyn RowsEngine> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl<T: Float> RowsEngine for RowDecode<T> {
    fn feed(
        &mut self,
        m: &RetroModel,
        retrieval: bool,
        e: &mut Vec<Tensor>,
        t0: usize,
        tokens: &[u32],
        ends: &[ChunkEnd],
    ) -> Result<Tensor> {
        let c = &m.config;
        let (b, d) = (self.chunk_h.len(), c.d_model);
        let p = tokens.len() / b;
        let w = Arc::clone(&self.w);
        let mut h = Vec::with_capacity(b * p * d);
        for &tok in tokens {
            h.extend_from_slice(&w.emb[tok as usize * d..][..d]);
        }
        let rope = Rope::new(&m.theta, t0, p);
        let use_cca = retrieval && !c.ca_layers.is_empty();
        let first_cca = c.ca_layers.first().copied();
        let mut i_ca = 0;
        for (l, (attn, ffw)) in w.attn.iter().zip(&w.ffw).enumerate() {
            attn.self_attend(&mut h, p, &rope, &mut self.caches[l], true);
            let is_ca = c.ca_layers.contains(&l);
            if use_cca {
                if Some(l) == first_cca {
                    self.encode_chunks(m, e, &h, t0, p, ends)?;
                }
                if is_ca {
                    self.cca(m, e, i_ca, &mut h, t0, p)?;
                }
            }
            if is_ca {
                i_ca += 1;
            }
            ffw.forward(&mut h);
        }
        let mut logits = vec![T::zero(); b * p * c.n_vocab];
        w.read.forward(&h, &mut logits);
        Ok(Tensor::from_vec(logits, (b, p, c.n_vocab), &Device::Cpu)?)
    }
    fn layout(&self) -> (usize, usize) {
        (self.caches.len(), self.cca_kv.len())
    }
    fn cached(&self, p: usize) -> Option<usize> {
        self.caches.get(p).map(KvCache::len)
    }
    fn clone_box(&self) -> Box<dyn RowsEngine> {
        Box::new(self.clone())
    }
}

impl<T: Float> RowDecode<T> {
    pub(crate) fn new(m: &RetroModel, batch: usize) -> Result<Self> {
        let c = &m.config;
        let w = Weights {
            emb: values(&m.emb)?,
            attn: m
                .attn
                .iter()
                .map(|a| AttnBlock::new(&a.params))
                .collect::<Result<_>>()?,
            ffw: m.ffw.iter().map(FfBlock::new).collect::<Result<_>>()?,
            cca: m
                .cca
                .iter()
                .map(|a| AttnBlock::new(&a.params))
                .collect::<Result<_>>()?,
            read: RowLinear::new(&m.read)?,
        };
        Ok(Self {
            w: Arc::new(w),
            caches: (0..c.n_layers)
                .map(|_| KvCache::new(batch, c.n_heads, c.d_k))
                .collect(),
            chunk_h: vec![Vec::new(); batch],
            keep: Vec::new(),
            cca_kv: vec![None; c.ca_layers.len()],
        })
    }

    /// Collects the rows `h [B, P, d]` of the chunk in progress; every chunk they complete is
    /// encoded with its neighbours (the neighbour encoder reads that chunk's rows).
    fn encode_chunks(
        &mut self,
        m: &RetroModel,
        e: &mut Vec<Tensor>,
        h: &[T],
        t0: usize,
        p: usize,
        ends: &[ChunkEnd],
    ) -> Result<()> {
        let (b, d, cl) = (self.chunk_h.len(), m.config.d_model, m.config.chunk_len);
        let mut ends = ends.iter();
        for i in 0..p {
            for (s, rows) in self.chunk_h.iter_mut().enumerate() {
                rows.extend_from_slice(&h[(s * p + i) * d..][..d]);
            }
            if (t0 + i) % cl == cl - 1 {
                let end = ends
                    .next()
                    .expect("the caller passes one entry per completed chunk");
                // The encoder stays on tensors: its B x K x N rows a chunk are GEMM-sized.
                let rows: Vec<T> = self.chunk_h.iter_mut().flat_map(std::mem::take).collect();
                let h_chunk = Tensor::from_vec(rows, (b, cl, d), &Device::Cpu)?;
                e.push(m.encode_neighbours(&end.ret, &h_chunk, Kernels::Fused)?);
                self.keep
                    .push(end.keep.as_ref().map(values::<T>).transpose()?);
            }
        }
        Ok(())
    }

    /// CCA layer `i_ca` for the rows at positions `t0 .. t0 + P`: position t reads the neighbours
    /// `e[u]` of chunk `u = (t + 1 - cl) / cl` (none before `cl - 1`), through its gate.
    fn cca(
        &mut self,
        m: &RetroModel,
        e: &[Tensor],
        i_ca: usize,
        h: &mut [T],
        t0: usize,
        p: usize,
    ) -> Result<()> {
        let (b, d, cl) = (self.chunk_h.len(), m.config.d_model, m.config.chunk_len);
        let w = &self.w.cca[i_ca];
        // Rows of one chunk's neighbours go together: i0 .. i1 read chunk u.
        let mut i0 = (cl - 1).saturating_sub(t0).min(p);
        while i0 < p {
            let u = (t0 + i0 + 1 - cl) / cl;
            let i1 = ((u + 2) * cl - 1 - t0).min(p);
            let g = i1 - i0;
            if self.cca_kv[i_ca].as_ref().map(|(cu, _)| *cu) != Some(u) {
                self.cca_kv[i_ca] = Some((u, w.context(&values(&e[u])?, b)));
            }
            let (_, ctx) = self.cca_kv[i_ca].as_ref().expect("just set");
            let mut x = Vec::with_capacity(b * g * d);
            for s in 0..b {
                x.extend_from_slice(&h[(s * p + i0) * d..][..g * d]);
            }
            let y = w.cross(&x, g, ctx);
            let keep = self.keep[u].as_ref();
            for s in 0..b {
                let gate = keep.map_or(T::one(), |k| k[s]);
                if gate != T::zero() {
                    let rows = &mut h[(s * p + i0) * d..][..g * d];
                    for (hv, y) in rows.iter_mut().zip(&y[s * g * d..][..g * d]) {
                        *hv += gate * *y;
                    }
                }
            }
            i0 = i1;
        }
        Ok(())
    }
}
