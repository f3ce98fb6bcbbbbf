//! The neighbour encoder: bidirectional self-attention over each neighbour, cross-attention to the input
//! chunk that retrieved it (at the encoder's CA layers), feed-forward. All chunks and neighbours at once.

use crate::attention::SelfAttention;
use crate::config::RetroConfig;
use crate::cross_attention::CrossAttention;
use crate::feed_forward::FeedForward;
use crate::kernels::Kernels;
use crate::layers::LayerNorm;
use crate::params::ParamBuilder;
use crate::rope::RopeTables;
use candle_core::{Result, Tensor};
use std::collections::BTreeSet;

#[derive(Debug, Clone)]
pub struct NeighbourEncoder {
    pub(crate) attn: Vec<SelfAttention>,
    pub(crate) ca: Vec<CrossAttention>,
    pub(crate) ffw: Vec<FeedForward>,
    pub(crate) norm_h: LayerNorm,
    pub(crate) ca_layers: BTreeSet<usize>,
    pub(crate) chunk_len: usize,
}

impl NeighbourEncoder {
    /// `{name}.ca.*`, `.attn.*`, `.ffw.*` and `.norm_h`, in the reference's registration order.
    pub(crate) fn new(pb: &mut ParamBuilder, name: &str, c: &RetroConfig) -> Result<Self> {
        let ca = (0..c.enc_ca_layers.len())
            .map(|i| CrossAttention::new(pb, &format!("{name}.ca.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let attn = (0..c.enc_n_layers)
            .map(|p| SelfAttention::new(pb, &format!("{name}.attn.{p}"), c, false))
            .collect::<Result<Vec<_>>>()?;
        let ffw = (0..c.enc_n_layers)
            .map(|p| FeedForward::new(pb, &format!("{name}.ffw.{p}"), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            attn,
            ca,
            ffw,
            norm_h: pb.layer_norm(&format!("{name}.norm_h"), c.d_model, c.layer_norm_eps)?,
            ca_layers: c.enc_ca_layers.clone(),
            chunk_len: c.chunk_len,
        })
    }

    /// `e [b, c, k, n, d]` neighbour token embeddings, `h [b, t, d]` the decoder's hidden state;
    /// `rope` covers positions `0..n`.
    pub fn forward(
        &self,
        e: &Tensor,
        h: &Tensor,
        rope: &RopeTables,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (b, c, _, _, d) = e.dims5()?;
        let h_split = h
            .narrow(1, 0, c * self.chunk_len)?
            .reshape((b, c, self.chunk_len, d))?;
        let h_split = self.norm_h.forward(&h_split, kern)?;
        let mut e = e.clone();
        let mut p_ca = 0;
        for (p, attn) in self.attn.iter().enumerate() {
            // Each neighbour is a sequence: [b, c, k] lead, n rows.
            e = attn.forward(&e, rope, None, None, kern)?;
            if self.ca_layers.contains(&p) {
                e = self.ca[p_ca].forward(&e, &h_split, kern)?;
                p_ca += 1;
            }
            e = self.ffw[p].forward(&e, kern)?;
        }
        Ok(e)
    }
}
