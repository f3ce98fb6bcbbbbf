//! What every attention block has (self, cross and chunked): a pre-norm, the query, key, value and
//! output projections, and the head split. Created in the reference's order: query, key, value,
//! norm, output.

use crate::attention_block_op::{
    attention_block, attention_block_inference, Attend, AttentionBlockParams,
};
use crate::config::RetroConfig;
use crate::fused_attention::attention_heads;
use crate::kernels::Kernels;
use crate::layers::{fused_linear, LayerNorm, Linear};
use crate::llama::blocks::Rotary;
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// Positions in a RETRO-fit's CCA, with the base's rotary tables: each neighbour's tokens at
/// `0..N`, the rows a chunk conditions at `N + j` (`j` from 0). Row `j` stands where the
/// neighbour's token `chunk_len - 1 + j` stands in its text, so a row and the neighbour token in
/// its place are always `N - chunk_len + 1` apart, as if the neighbour preceded the chunk in the
/// base's context: the base's own query and key projections keep the meaning they have in its
/// self-attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CcaPositions<'a> {
    pub(crate) rotary: &'a Rotary,
    /// Tokens per neighbour (chunk + continuation).
    pub(crate) neighbour_len: usize,
    /// The index `j` of the first query row among the rows its chunk conditions.
    pub(crate) first_row: usize,
}

#[derive(Debug, Clone)]
pub struct AttentionParams {
    pub(crate) norm: LayerNorm,
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) output: Linear,
    pub(crate) n_heads: usize,
    pub(crate) d_k: usize,
}

impl AttentionParams {
    /// The parameters `{name}.query`, `.key`, `.value`, `.norm` and `.output`.
    pub(crate) fn new(pb: &mut ParamBuilder, name: &str, c: &RetroConfig) -> Result<Self> {
        let (d, da) = (c.d_model, c.d_attn());
        Ok(Self {
            query: pb.linear(&format!("{name}.query"), d, da)?,
            key: pb.linear(&format!("{name}.key"), d, da)?,
            value: pb.linear(&format!("{name}.value"), d, da)?,
            norm: pb.layer_norm(&format!("{name}.norm"), d, c.layer_norm_eps)?,
            output: pb.linear(&format!("{name}.output"), da, d)?,
            n_heads: c.n_heads,
            d_k: c.d_k,
        })
    }

    /// The unmasked attention of the cross-attentions (the encoder's and CCA) as tensor ops: `x`'s
    /// rows (already normed) as `groups` groups of `sq`, each attending to its group of `sk` rows
    /// of `ctx`. The query projection carries `1 / sqrt(d_k)`; keys and values come from one GEMM.
    /// Returns `[groups, sq, n_heads, d_k]`: the heads merge with a reshape. `positions` rotates
    /// queries and keys (a RETRO-fit's CCA, see [`CcaPositions`]); the labml blocks have none.
    pub(crate) fn attend(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        (groups, sq, sk): (usize, usize, usize),
        positions: Option<CcaPositions>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (nh, dk) = (self.n_heads, self.d_k);
        let scale = 1.0 / (dk as f64).sqrt();
        // [groups, sq, h, dk] viewed as [groups, h, sq, dk].
        let q = fused_linear(&[(&self.query, scale)], x, kern)?
            .reshape((groups, sq, nh, dk))?
            .transpose(1, 2)?;
        // Keys and values in one GEMM: [groups, sk, 2, h, dk].
        let kv = fused_linear(&[(&self.key, 1.0), (&self.value, 1.0)], ctx, kern)?
            .reshape((groups, sk, 2, nh, dk))?;
        let part = |i: usize| kv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let (q, k) = match positions {
            None => (q, part(0)?),
            Some(pos) => {
                let n = pos.neighbour_len;
                let q = pos.rotary.apply(&q, n + pos.first_row, kern)?;
                // Each of the sk / n neighbours at positions 0..n.
                let k = part(0)?
                    .contiguous()?
                    .reshape((groups, nh * (sk / n), n, dk))?;
                let k = pos
                    .rotary
                    .apply(&k, 0, kern)?
                    .reshape((groups, nh, sk, dk))?;
                (q, k)
            }
        };
        attention_heads(&q, &k, &part(1)?, None, kern)
    }

    /// The whole block (norm, projections, attention, output, residual) as one op: for training
    /// (`Differentiable`) an autograd node with a written-out backward, for inference (`Fused`)
    /// the same forward keeping nothing; `None` where that op does not apply (not CPU f32/f64).
    pub(crate) fn block(
        &self,
        x: &Tensor,
        attend: Attend,
        kern: Kernels,
    ) -> Result<Option<Tensor>> {
        let p = AttentionBlockParams {
            norm_w: self.norm.weight(),
            norm_b: self.norm.bias(),
            wq: self.query.weight(),
            bq: self.query.bias(),
            wk: self.key.weight(),
            bk: self.key.bias(),
            wv: self.value.weight(),
            bv: self.value.bias(),
            wo: self.output.weight(),
            bo: self.output.bias(),
            eps: self.norm.eps(),
            n_heads: self.n_heads,
        };
        match kern {
            Kernels::Differentiable => attention_block(x, attend, &p),
            Kernels::Fused => attention_block_inference(x, attend, &p),
        }
    }
}
