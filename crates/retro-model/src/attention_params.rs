//! What every attention block has (self, cross and chunked): a pre-norm, the query, key, value and
//! output projections, and the head split. Created in the reference's order: query, key, value,
//! norm, output.

use crate::attention_block_op::{attention_block, Attend, AttentionBlockParams};
use crate::config::RetroConfig;
use crate::layers::{LayerNorm, Linear};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

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

    /// Training: the whole block (norm, projections, attention, output, residual) as one autograd
    /// node with a written-out backward; `None` where that op does not apply (not CPU f32/f64).
    pub(crate) fn train_block(&self, x: &Tensor, attend: Attend) -> Result<Option<Tensor>> {
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
        attention_block(x, attend, &p)
    }
}
