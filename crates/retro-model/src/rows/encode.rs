//! The neighbour encoder over rows: what [`NeighbourEncoder::forward`] and `norm_e` compute for
//! the neighbours of one completed chunk per sequence, `B x K` neighbours of `N` tokens. Its
//! `B x K x N` rows (64 for labml-small at batch 1) go through the six-row GEMM tiles of
//! [`RowLinear`](retro_kernels::decode::RowLinear) on both cores, with no tensor op between
//! them.
//!
//! [`NeighbourEncoder::forward`]: crate::encoder::NeighbourEncoder::forward

use super::blocks::{layers, CrossBlock, FfBlock, Rope, SelfBlock};
use crate::error::Result;
use crate::model::RetroModel;
use retro_kernels::decode::{RowNorm, TiledKvCache};
use retro_kernels::Float;
use std::collections::BTreeSet;

/// The encoder's weights in the rows' layout.
#[derive(Debug)]
pub(super) struct RowEncoder<T> {
    attn: Vec<SelfBlock<T>>,
    ffw: Vec<FfBlock<T>>,
    /// One per layer in `ca_layers`, in order.
    ca: Vec<CrossBlock<T>>,
    ca_layers: BTreeSet<usize>,
    norm_h: RowNorm<T>,
    norm_e: RowNorm<T>,
}

impl<T: Float> RowEncoder<T> {
    pub(super) fn new(m: &RetroModel) -> Result<Self> {
        let e = &m.encoder;
        let (attn, ffw, ca) = layers(&e.attn, &e.ffw, e.ca.iter().map(|a| &a.params))?;
        Ok(Self {
            attn,
            ffw,
            ca,
            ca_layers: e.ca_layers.clone(),
            norm_h: RowNorm::new(&e.norm_h)?,
            norm_e: RowNorm::new(&m.norm_e)?,
        })
    }

    /// The encoded neighbours `[B, K, N, d]` of `e` (their token embeddings, `[B, K, N, d]`),
    /// each sequence's K neighbours cross-attending to its chunk's rows `h [B, chunk_len, d]`.
    pub(super) fn forward(
        &self,
        mut e: Vec<T>,
        h: &[T],
        (k, n, d): (usize, usize, usize),
        rope: &Rope<T>,
    ) -> Vec<T> {
        let b = e.len() / (k * n * d).max(1);
        let mut h_normed = vec![T::zero(); h.len()];
        self.norm_h.forward(h, &mut h_normed);
        let mut i_ca = 0;
        for (p, (attn, ffw)) in self.attn.iter().zip(&self.ffw).enumerate() {
            // Each neighbour is a sequence of N rows, attending to all of them.
            let mut cache = TiledKvCache::new(b * k, attn.n_heads, attn.d_k);
            attn.forward(&mut e, n, rope, &mut cache, false);
            if self.ca_layers.contains(&p) {
                // All K neighbours of a sequence query its chunk's rows.
                let ca = &self.ca[i_ca];
                let y = ca.forward(&e, k * n, &ca.context(&h_normed, b));
                e.iter_mut().zip(&y).for_each(|(e, y)| *e += *y);
                i_ca += 1;
            }
            ffw.forward(&mut e);
        }
        let mut out = vec![T::zero(); e.len()];
        self.norm_e.forward(&e, &mut out);
        out
    }
}
