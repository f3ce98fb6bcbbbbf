//! Position-wise feed-forward: `h + lin2(relu(lin1(norm(h))))`.

use crate::feed_forward_op::{feed_forward, FeedForwardParams};
use crate::kernels::Kernels;
use crate::layers::{LayerNorm, Linear};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct FeedForward {
    pub(crate) norm: LayerNorm,
    pub(crate) lin1: Linear,
    pub(crate) lin2: Linear,
}

impl FeedForward {
    pub fn forward(&self, h: &Tensor, kern: Kernels) -> Result<Tensor> {
        if kern == Kernels::Differentiable {
            // One autograd node with a written-out backward (CPU, f32/f64).
            let p = FeedForwardParams {
                norm_w: &self.norm.weight,
                norm_b: &self.norm.bias,
                w1: &self.lin1.weight,
                b1: &self.lin1.bias,
                w2: &self.lin2.weight,
                b2: &self.lin2.bias,
                eps: self.norm.eps,
            };
            if let Some(y) = feed_forward(h, &p)? {
                return Ok(y);
            }
        }
        let x = self.norm.forward(h, kern)?;
        let hidden = self.lin1.forward_k(&x, None, kern)?.relu()?;
        self.lin2.forward_k(&hidden, Some(h), kern)
    }
}
