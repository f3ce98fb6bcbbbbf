//! The decoder over rows: what [`RetroModel::step`] and [`RetroModel::prefill`] compute.
//!
//! A feed of `P` rows (one step, or a whole prompt) goes layer by layer over all of them: the
//! self-attention keys and values are appended to a preallocated [`TiledKvCache`] and each row attends
//! causally; at the first CCA layer every chunk the rows complete is encoded before any row's
//! CCA reads it.

use super::blocks::{layers, CrossBlock, FfBlock, Rope, SelfBlock};
use super::encode::RowEncoder;
use crate::error::Result;
use crate::model::RetroModel;
use crate::neighbour_block::NeighbourBlock;
use candle_core::{Device, Tensor};
use retro_kernels::decode::{values, RowLinear, TiledKvCache};
use retro_kernels::ChunkSchedule;
use retro_kernels::Float;
use std::sync::Arc;

/// The model's weights, copied once per decoding state into the rows' layout.
#[derive(Debug)]
struct Weights<T> {
    emb: Vec<T>,
    attn: Vec<SelfBlock<T>>,
    ffw: Vec<FfBlock<T>>,
    cca: Vec<CrossBlock<T>>,
    read: RowLinear<T>,
    enc: RowEncoder<T>,
}

impl<T: Float> Weights<T> {
    /// The embedding rows `[ids, d]` of token ids (checked against the vocabulary by the caller).
    fn embed(&self, ids: &[u32], d: usize) -> Vec<T> {
        let mut rows = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            rows.extend_from_slice(&self.emb[id as usize * d..][..d]);
        }
        rows
    }
}

/// The row decoder's state for a batch of B sequences.
#[derive(Debug, Clone)]
pub(crate) struct RowDecode<T> {
    w: Arc<Weights<T>>,
    /// One self-attention cache per decoder layer.
    caches: Vec<TiledKvCache<T>>,
    /// Per sequence, the hidden rows `[rows, d]` (after the first CCA layer's self-attention) of
    /// the chunk in progress.
    chunk_h: Vec<Vec<T>>,
    /// Per completed chunk, its gate `[B]` (`None`: kept).
    keep: Vec<Option<Vec<T>>>,
    /// Per CCA layer, the chunk last attended to and its neighbours' keys and values.
    cca_kv: Vec<Option<(usize, TiledKvCache<T>)>>,
}

/// What a feed needs of each chunk its rows complete: `ret [B, 1, K, N]` and `keep [B, 1, 1]`.
pub(crate) struct ChunkEnd {
    pub ret: NeighbourBlock,
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
        let mut h = w.embed(tokens, d);
        let rope = Rope::new(&m.theta, t0, p);
        let use_cca = retrieval && !c.ca_layers.is_empty();
        let first_cca = c.ca_layers.first().copied();
        let mut i_ca = 0;
        for (l, (attn, ffw)) in w.attn.iter().zip(&w.ffw).enumerate() {
            attn.forward(&mut h, p, &rope, &mut self.caches[l], true);
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
        self.caches.get(p).map(TiledKvCache::len)
    }
    fn clone_box(&self) -> Box<dyn RowsEngine> {
        Box::new(self.clone())
    }
}

impl<T: Float> RowDecode<T> {
    pub(crate) fn new(m: &RetroModel, batch: usize) -> Result<Self> {
        let c = &m.config;
        let (attn, ffw, cca) = layers(&m.attn, &m.ffw, m.cca.iter().map(|a| &a.params))?;
        let w = Weights {
            emb: values(&m.emb)?,
            attn,
            ffw,
            cca,
            read: RowLinear::new(&m.read)?,
            enc: RowEncoder::new(m)?,
        };
        Ok(Self {
            w: Arc::new(w),
            caches: (0..c.n_layers)
                .map(|_| TiledKvCache::new(batch, c.n_heads, c.d_k))
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
            if ChunkSchedule::new(cl).completes(t0 + i).is_some() {
                let end = ends
                    .next()
                    .expect("the caller passes one entry per completed chunk");
                let rows: Vec<T> = self.chunk_h.iter_mut().flat_map(std::mem::take).collect();
                let [_, _, k, n] = end.ret.shape();
                let emb = self.w.embed(end.ret.as_slice(), d);
                let rope = Rope::new(&m.theta, 0, n);
                let encoded = self.w.enc.forward(emb, &rows, (k, n, d), &rope);
                e.push(Tensor::from_vec(encoded, (b, 1, k, n, d), &Device::Cpu)?);
                self.keep
                    .push(end.keep.as_ref().map(values::<T>).transpose()?);
            }
        }
        Ok(())
    }

    /// CCA layer `i_ca` for the rows at positions `t0 .. t0 + P`: position t reads the neighbours
    /// `e[u]` of the chunk that conditions it ([`ChunkSchedule::conditioned_by`]), through its gate.
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
        let sched = ChunkSchedule::new(cl);
        let mut i0 = sched.shift().saturating_sub(t0).min(p);
        while i0 < p {
            let u = sched.conditioned_by(t0 + i0).expect("at or past the shift");
            let i1 = (sched.conditioned_rows(u).end - t0).min(p);
            let g = i1 - i0;
            if self.cca_kv[i_ca].as_ref().map(|(cu, _)| *cu) != Some(u) {
                self.cca_kv[i_ca] = Some((u, w.context(&values(&e[u])?, b)));
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
        Ok(())
    }
}
