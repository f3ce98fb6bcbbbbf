//! Position-wise feed-forward: `h + lin2(relu(lin1(norm(h))))`.

use crate::config::RetroConfig;
use crate::feed_forward_op::{feed_forward, FeedForwardParams};
use crate::kernels::Kernels;
use crate::layers::{LayerNorm, Linear};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct FeedForward {
    pub(crate) norm: LayerNorm,
    pub(crate) lin1: Linear,
    pub(crate) lin2: Linear,
}

impl FeedForward {
    /// `{name}.lin1`, `.lin2` and `.norm`, in the reference's order.
    pub(crate) fn new(pb: &mut ParamBuilder, name: &str, c: &RetroConfig) -> Result<Self> {
        let d = c.d_model;
        Ok(Self {
            lin1: pb.linear(&format!("{name}.lin1"), d, c.d_ff)?,
            lin2: pb.linear(&format!("{name}.lin2"), c.d_ff, d)?,
            norm: pb.layer_norm(&format!("{name}.norm"), d, c.layer_norm_eps)?,
        })
    }

    pub fn forward(&self, h: &Tensor, kern: Kernels) -> Result<Tensor> {
        if kern == Kernels::Differentiable {
            // One autograd node with a written-out backward (CPU, f32/f64).
            let p = FeedForwardParams {
                norm_w: self.norm.weight(),
                norm_b: self.norm.bias(),
                w1: self.lin1.weight(),
                b1: self.lin1.bias(),
                w2: self.lin2.weight(),
                b2: self.lin2.bias(),
                eps: self.norm.eps(),
            };
            if let Some(y) = feed_forward(h, &p)? {
                return Ok(y);
            }
        }
        let x = self.norm.forward(h, kern)?;
        let hidden = self.lin1.forward_relu_k(&x, kern)?;
        self.lin2.forward_k(&hidden, Some(h), kern)
    }
}
