//! Position-wise feed-forward: `h + lin2(relu(lin1(norm(h))))`.

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
        let x = self.norm.forward(h, kern)?;
        let hidden = self.lin1.forward_k(&x, None, kern)?.relu()?;
        self.lin2.forward_k(&hidden, Some(h), kern)
    }
}
