//! Cached decoding on the CPU over plain rows: what [`RetroModel::step`] and
//! [`RetroModel::prefill`] compute, with the decoder's per-token work in a few
//! [`retro_kernels::decode`] kernels instead of a hundred small tensor ops. The neighbour encoder,
//! run once per completed chunk, stays on tensors.
//!
//! A feed of `P` rows (one step, or a whole prompt) goes layer by layer over all of them: the
//! self-attention keys and values are appended to a preallocated [`KvCache`] and each row attends
//! causally; at the first CCA layer every chunk the rows complete is encoded before any row's
//! CCA reads it.

use crate::error::Result;
use crate::kernels::Kernels;
use crate::model::RetroModel;
use candle_core::{Device, Tensor};
use retro_kernels::decode::{rotate, values, KvCache, RowLinear, RowNorm};
use retro_kernels::Float;
use std::sync::Arc;

/// The decoder's weights, copied once per decoding state into the rows' layout.
#[derive(Debug)]
struct Weights<T> {
    emb: Vec<T>,
    layers: Vec<Layer<T>>,
    cca: Vec<Cca<T>>,
    read: RowLinear<T>,
}

#[derive(Debug)]
struct Layer<T> {
    norm: RowNorm<T>,
    /// query (scaled by 1/sqrt(d_k)), key and value as one projection.
    qkv: RowLinear<T>,
    output: RowLinear<T>,
    ff_norm: RowNorm<T>,
    lin1: RowLinear<T>,
    lin2: RowLinear<T>,
}

#[derive(Debug)]
struct Cca<T> {
    norm: RowNorm<T>,
    query: RowLinear<T>,
    /// key and value of the encoded neighbours, as one projection.
    kv: RowLinear<T>,
    output: RowLinear<T>,
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
    /// Per CCA layer, the chunk last attended to and its projected neighbours as a cache of K*N
    /// positions.
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
        let scale = 1.0 / (c.d_k as f64).sqrt();
        let layers = m
            .attn
            .iter()
            .zip(&m.ffw)
            .map(|(a, f)| {
                let p = &a.params;
                Ok(Layer {
                    norm: RowNorm::new(&p.norm)?,
                    qkv: RowLinear::fused(&[(&p.query, scale), (&p.key, 1.0), (&p.value, 1.0)])?,
                    output: RowLinear::new(&p.output)?,
                    ff_norm: RowNorm::new(&f.norm)?,
                    lin1: RowLinear::new(&f.lin1)?,
                    lin2: RowLinear::new(&f.lin2)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cca = m
            .cca
            .iter()
            .map(|a| {
                let p = &a.params;
                Ok(Cca {
                    norm: RowNorm::new(&p.norm)?,
                    query: RowLinear::fused(&[(&p.query, scale)])?,
                    kv: RowLinear::fused(&[(&p.key, 1.0), (&p.value, 1.0)])?,
                    output: RowLinear::new(&p.output)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let w = Weights {
            emb: values(&m.emb)?,
            layers,
            cca,
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
    /// (empty with retrieval off); `e` collects their encoded neighbours.
    #[allow(clippy::too_many_arguments)]
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
        let (nh, dk) = (c.n_heads, c.d_k);
        let hd = nh * dk;
        let w = Arc::clone(&self.w);
        let mut h = Vec::with_capacity(b * p * d);
        for &tok in tokens {
            h.extend_from_slice(&w.emb[tok as usize * d..][..d]);
        }
        let (cos, sin) = rope_rows::<T>(&m.theta, t0, p);
        let half = dk / 2;
        let use_cca = retrieval && !c.ca_layers.is_empty();
        let first_cca = c.ca_layers.first().copied();
        let mut x = vec![T::zero(); b * p * d];
        let mut qkv = vec![T::zero(); b * p * 3 * hd];
        let rows = || vec![T::zero(); b * p * hd];
        let (mut q, mut k, mut v, mut att) = (rows(), rows(), rows(), rows());
        let mut hidden = vec![T::zero(); b * p * c.d_ff];
        let mut i_ca = 0;
        for (l, layer) in w.layers.iter().enumerate() {
            // Self-attention: norm, one projection, RoPE on q and k, append, attend, residual.
            layer.norm.forward(&h, &mut x);
            layer.qkv.forward(&x, &mut qkv);
            for r in 0..b * p {
                let i = r % p;
                let row = &qkv[r * 3 * hd..][..3 * hd];
                q[r * hd..][..hd].copy_from_slice(&row[..hd]);
                k[r * hd..][..hd].copy_from_slice(&row[hd..2 * hd]);
                v[r * hd..][..hd].copy_from_slice(&row[2 * hd..]);
                let (cs, sn) = (&cos[i * half..][..half], &sin[i * half..][..half]);
                for head in 0..nh {
                    rotate(&mut q[r * hd + head * dk..][..dk], cs, sn);
                    rotate(&mut k[r * hd + head * dk..][..dk], cs, sn);
                }
            }
            self.caches[l].append(&k, &v, p);
            self.caches[l].attend_causal(&q, p, &mut att);
            layer.output.forward_add(&att, &mut h);

            if use_cca {
                if Some(l) == first_cca {
                    self.encode_chunks(m, e, &h, t0, p, ends)?;
                }
                if c.ca_layers.contains(&l) {
                    self.cca(m, e, i_ca, &mut h, t0, p)?;
                }
            }
            if c.ca_layers.contains(&l) {
                i_ca += 1;
            }
            // Feed-forward: norm, lin1, ReLU, lin2, residual.
            layer.ff_norm.forward(&h, &mut x);
            layer.lin1.forward(&x, &mut hidden);
            hidden.iter_mut().for_each(|z| {
                if *z < T::zero() {
                    *z = T::zero()
                }
            });
            layer.lin2.forward_add(&hidden, &mut h);
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
    /// of chunk `(t + 1 - cl) / cl` (none before `cl - 1`), through its gate.
    fn cca(
        &mut self,
        m: &RetroModel,
        e: &[Tensor],
        i_ca: usize,
        h: &mut [T],
        t0: usize,
        p: usize,
    ) -> Result<()> {
        let c = &m.config;
        let (b, d, cl) = (self.chunk_h.len(), c.d_model, c.chunk_len);
        let (nh, dk) = (c.n_heads, c.d_k);
        let hd = nh * dk;
        let w = &self.w.cca[i_ca];
        // Rows of one chunk's neighbours go together: i0 .. i1 read chunk u.
        let mut i0 = (cl - 1).saturating_sub(t0).min(p);
        while i0 < p {
            let u = (t0 + i0 + 1 - cl) / cl;
            let i1 = ((u + 2) * cl - 1 - t0).min(p);
            let g = i1 - i0;
            if self.cca_kv[i_ca].as_ref().map(|(cu, _)| *cu) != Some(u) {
                let (_, _, kk, n, _) = e[u].dims5()?;
                let s = kk * n;
                let en = values::<T>(&e[u])?; // [B, S, d]
                let mut kv = vec![T::zero(); b * s * 2 * hd];
                w.kv.forward(&en, &mut kv);
                let (mut ks, mut vs) = (
                    Vec::with_capacity(b * s * hd),
                    Vec::with_capacity(b * s * hd),
                );
                for row in kv.chunks(2 * hd) {
                    ks.extend_from_slice(&row[..hd]);
                    vs.extend_from_slice(&row[hd..]);
                }
                let mut cache = KvCache::new(b, nh, dk);
                cache.append(&ks, &vs, s);
                self.cca_kv[i_ca] = Some((u, cache));
            }
            let (_, cache) = self.cca_kv[i_ca].as_ref().expect("just set");
            let mut x = vec![T::zero(); b * g * d];
            for s in 0..b {
                w.norm.forward(
                    &h[(s * p + i0) * d..][..g * d],
                    &mut x[s * g * d..][..g * d],
                );
            }
            let mut q = vec![T::zero(); b * g * hd];
            w.query.forward(&x, &mut q);
            let mut att = vec![T::zero(); b * g * hd];
            cache.attend_all(&q, g, &mut att);
            w.output.forward(&att, &mut x);
            let keep = self.keep[u].as_ref();
            for s in 0..b {
                let gate = keep.map_or(T::one(), |k| k[s]);
                let rows = &mut h[(s * p + i0) * d..][..g * d];
                if gate != T::zero() {
                    for (hv, y) in rows.iter_mut().zip(&x[s * g * d..][..g * d]) {
                        *hv += gate * *y;
                    }
                }
            }
            i0 = i1;
        }
        Ok(())
    }
}

/// cos and sin of `position * theta_i` for positions `t0 .. t0 + p`, each `[p, d_k / 2]`, with the
/// angle in f64 as [`crate::rope::RopeTables`] computes it.
fn rope_rows<T: Float>(theta: &[f32], t0: usize, p: usize) -> (Vec<T>, Vec<T>) {
    let mut cos = Vec::with_capacity(p * theta.len());
    let mut sin = Vec::with_capacity(p * theta.len());
    for pos in t0..t0 + p {
        for &t in theta {
            let a = pos as f64 * t as f64;
            cos.push(T::from_f64(a.cos()));
            sin.push(T::from_f64(a.sin()));
        }
    }
    (cos, sin)
}
