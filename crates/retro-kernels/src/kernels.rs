//! Which implementation of the normalising ops a forward uses.
//!
//! candle's fused `layer_norm`, `softmax_last_dim` and `rope` kernels are fast but record no backward
//! op, so everything upstream would silently get no gradient. Inference uses them; training uses the
//! differentiable compositions.

use candle_core::{Result, Tensor, D};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused candle kernels: inference only.
    Fused,
    /// Ops built from differentiable primitives: for training.
    Differentiable,
}

impl Kernels {
    pub fn layer_norm(self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            // candle's fused kernel off the CPU (it has none for f64). On the CPU ours is faster
            // (multiversioned; candle's is scalar code) and exact to the two-pass variance.
            Kernels::Fused
                if !x.device().is_cpu()
                    && x.is_contiguous()
                    && x.dtype() != candle_core::DType::F64 =>
            {
                candle_nn::ops::layer_norm(x, w, b, eps as f32)
            }
            // Falls back to `layer_norm_slow` off the CPU and for other dtypes.
            _ => crate::fused_norm::layer_norm(x, w, b, eps as f32),
        }
    }

    pub fn softmax(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Fused => candle_nn::ops::softmax_last_dim(x),
            Kernels::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
        }
    }

    /// Rotate-half rotary embedding of `x [b, h, s, d]` with tables `cos, sin [s, d/2]`.
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
            Kernels::Differentiable => candle_nn::rotary_emb::rope_slow(x, cos, sin),
        }
    }

    /// The same rotary embedding for `x [b, s, h, d]` (any strides), returning `[b, s, h, d]`.
    pub fn rope_bshd(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            // Ours reads the strided q/k views of the fused projection in place (candle's needs a
            // contiguous copy first); candle's covers other devices and dtypes.
            Kernels::Fused if !crate::fused_norm::cpu_ok(x) => {
                candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)
            }
            // Falls back to the rotate-half composition off the CPU and for other dtypes.
            _ => crate::fused_norm::rope_bshd(x, cos, sin),
        }
    }
}
