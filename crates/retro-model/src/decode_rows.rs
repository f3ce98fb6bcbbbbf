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

/// A pre-norm self-attention block over rows: `h += output(attend(rope(q), rope(k), v))`.
#[derive(Debug)]
struct SelfBlock<T> {
    norm: RowNorm<T>,
    /// query (scaled by 1/sqrt(d_k)), key and value as one projection.
    qkv: RowLinear<T>,
    output: RowLinear<T>,
    d_k: usize,
}

impl<T: Float> SelfBlock<T> {
    fn new(p: &AttentionParams) -> Result<Self> {
        let scale = 1.0 / (p.d_k as f64).sqrt();
        Ok(Self {
            norm: RowNorm::new(&p.norm)?,
            qkv: RowLinear::fused(&[(&p.query, scale), (&p.key, 1.0), (&p.value, 1.0)])?,
            output: RowLinear::new(&p.output)?,
            d_k: p.d_k,
        })
    }

    /// `h [S, P, d]`: S sequences of P new rows, row i rotated by `rope.at(i)`. Their keys and values
    /// are appended to `cache` (of S sequences), and each row attends to the cached positions up to
    /// its own (`causal`) or to all of them.
    fn forward(&self, h: &mut [T], p: usize, rope: &Rope<T>, cache: &mut KvCache<T>, causal: bool) {
        let (d, hd, dk) = (self.qkv.n_in(), self.output.n_in(), self.d_k);
        let rows = h.len() / d;
        let mut x = vec![T::zero(); rows * d];
        self.norm.forward(h, &mut x);
        let mut qkv = vec![T::zero(); rows * 3 * hd];
        self.qkv.forward(&x, &mut qkv);
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(rows * hd),
            Vec::with_capacity(rows * hd),
            Vec::with_capacity(rows * hd),
        );
        for (r, row) in qkv.chunks_exact_mut(3 * hd).enumerate() {
            let (cos, sin) = rope.at(r % p);
            for head in row[..2 * hd].chunks_exact_mut(dk) {
                rotate(head, cos, sin);
            }
            q.extend_from_slice(&row[..hd]);
            k.extend_from_slice(&row[hd..2 * hd]);
            v.extend_from_slice(&row[2 * hd..]);
        }
        cache.append(&k, &v, p);
        let mut att = k; // reused: the keys are cached
        if causal {
            cache.attend_causal(&q, p, &mut att);
        } else {
            cache.attend_all(&q, p, &mut att);
        }
        self.output.forward_add(&att, h);
    }
}

/// A pre-norm cross-attention block: queries from rows, keys and values from a context's rows.
#[derive(Debug)]
struct CrossBlock<T> {
    norm: RowNorm<T>,
    query: RowLinear<T>,
    /// key and value as one projection.
    kv: RowLinear<T>,
    output: RowLinear<T>,
    n_heads: usize,
    d_k: usize,
}

impl<T: Float> CrossBlock<T> {
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

    /// The keys and values of `ctx [S, n, d]` (S sequences of n rows), as a cache of n positions.
    fn context(&self, ctx: &[T], s: usize) -> KvCache<T> {
        let (d, hd) = (self.kv.n_in(), self.output.n_in());
        let n = ctx.len() / (d * s).max(1);
        let mut kv = vec![T::zero(); s * n * 2 * hd];
        self.kv.forward(ctx, &mut kv);
        let (mut k, mut v) = (
            Vec::with_capacity(s * n * hd),
            Vec::with_capacity(s * n * hd),
        );
        for row in kv.chunks_exact(2 * hd) {
            k.extend_from_slice(&row[..hd]);
            v.extend_from_slice(&row[hd..]);
        }
        let mut cache = KvCache::new(s, self.n_heads, self.d_k);
        cache.append(&k, &v, n);
        cache
    }

    /// `output(attend(query(norm(h)), ctx))` for `h [S, P, d]`, each sequence reading its context.
    fn forward(&self, h: &[T], p: usize, ctx: &KvCache<T>) -> Vec<T> {
        let (d, hd) = (self.kv.n_in(), self.output.n_in());
        let rows = h.len() / d;
        let mut x = vec![T::zero(); rows * d];
        self.norm.forward(h, &mut x);
        let mut q = vec![T::zero(); rows * hd];
        self.query.forward(&x, &mut q);
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
    attn: Vec<SelfBlock<T>>,
    ffw: Vec<FfBlock<T>>,
    cca: Vec<CrossBlock<T>>,
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
    /// Per completed chunk, its encoded neighbours `[B, K * N, d]`.
    e: Vec<Vec<T>>,
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

impl<T: Float> RowDecode<T> {
    pub(crate) fn new(m: &RetroModel, batch: usize) -> Result<Self> {
        let c = &m.config;
        let w = Weights {
            emb: values(&m.emb)?,
            attn: m
                .attn
                .iter()
                .map(|a| SelfBlock::new(&a.params))
                .collect::<Result<_>>()?,
            ffw: m.ffw.iter().map(FfBlock::new).collect::<Result<_>>()?,
            cca: m
                .cca
                .iter()
                .map(|a| CrossBlock::new(&a.params))
                .collect::<Result<_>>()?,
            read: RowLinear::new(&m.read)?,
        };
        Ok(Self {
            w: Arc::new(w),
            caches: (0..c.n_layers)
                .map(|_| KvCache::new(batch, c.n_heads, c.d_k))
                .collect(),
            chunk_h: vec![Vec::new(); batch],
            e: Vec::new(),
            keep: Vec::new(),
            cca_kv: vec![None; c.ca_layers.len()],
        })
    }

    /// Numbers of decoder and CCA layers this state was made for.
    pub(crate) fn layout(&self) -> (usize, usize) {
        (self.caches.len(), self.cca_kv.len())
    }

    /// Positions cached by decoder layer `p`.
    pub(crate) fn cached(&self, p: usize) -> Option<usize> {
        self.caches.get(p).map(KvCache::len)
    }

    /// Feeds `tokens [B, P]` (row-major) at positions `t0 .. t0 + P` and returns the logits
    /// `[B, P, n_vocab]`. `ends` holds, in order, one entry per chunk these positions complete
    /// (empty with retrieval off); `e` collects their encoded neighbours as tensors.
    pub(crate) fn feed(
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
            attn.forward(&mut h, p, &rope, &mut self.caches[l], true);
            if use_cca {
                if Some(l) == first_cca {
                    self.encode_chunks(m, e, &h, t0, p, ends)?;
                }
                if c.ca_layers.contains(&l) {
                    self.cca(m, i_ca, &mut h, t0, p);
                }
            }
            if c.ca_layers.contains(&l) {
                i_ca += 1;
            }
            ffw.forward(&mut h);
        }
        let mut logits = vec![T::zero(); b * p * c.n_vocab];
        w.read.forward(&h, &mut logits);
        Ok(Tensor::from_vec(logits, (b, p, c.n_vocab), &Device::Cpu)?)
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
                let encoded = m.encode_neighbours(&end.ret, &h_chunk, Kernels::Fused)?;
                self.e.push(values(&encoded)?);
                e.push(encoded);
                self.keep
                    .push(end.keep.as_ref().map(values::<T>).transpose()?);
            }
        }
        Ok(())
    }

    /// CCA layer `i_ca` for the rows at positions `t0 .. t0 + P`: position t reads the neighbours
    /// of chunk `(t + 1 - cl) / cl` (none before `cl - 1`), through its gate.
    fn cca(&mut self, m: &RetroModel, i_ca: usize, h: &mut [T], t0: usize, p: usize) {
        let (b, d, cl) = (self.chunk_h.len(), m.config.d_model, m.config.chunk_len);
        let w = &self.w.cca[i_ca];
        // Rows of one chunk's neighbours go together: i0 .. i1 read chunk u.
        let mut i0 = (cl - 1).saturating_sub(t0).min(p);
        while i0 < p {
            let u = (t0 + i0 + 1 - cl) / cl;
            let i1 = ((u + 2) * cl - 1 - t0).min(p);
            let g = i1 - i0;
            if self.cca_kv[i_ca].as_ref().map(|(cu, _)| *cu) != Some(u) {
                self.cca_kv[i_ca] = Some((u, w.context(&self.e[u], b)));
            }
            let (_, ctx) = self.cca_kv[i_ca].as_ref().expect("just set");
            let mut x = Vec::with_capacity(b * g * d);
            for s in 0..b {
                x.extend_from_slice(&h[(s * p + i0) * d..][..g * d]);
            }
            let y = w.forward(&x, g, ctx);
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
    }
}
