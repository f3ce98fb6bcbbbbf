//! The two parameterised building blocks: a Linear with bias (weights `[out, in]`, PyTorch's layout)
//! and a LayerNorm with affine weights.

use crate::kernels::Kernels;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl Linear {
    /// `x [.., in] -> [.., out]` as one 2-D GEMM over all leading dims (one big multi-threaded matmul
    /// instead of a batched one).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in.max(1);
        let d_out = self.weight.dim(0)?;
        let y = x
            .reshape((rows, d_in))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = d_out;
        y.reshape(out_dims)
    }
}

/// Several Linears of the same input as one GEMM: `x [.., in] -> [.., sum of outs]`, the i-th part's
/// output (scaled by its factor, folded into its weights) in the i-th slot. Differentiable: the
/// weights are concatenated per call (they are small next to the activations).
pub fn fused_linear(parts: &[(&Linear, f64)], x: &Tensor) -> Result<Tensor> {
    let scaled = |t: &Tensor, s: f64| if s == 1.0 { Ok(t.clone()) } else { t * s };
    let w = parts
        .iter()
        .map(|(l, s)| scaled(&l.weight, *s))
        .collect::<Result<Vec<_>>>()?;
    let b = parts
        .iter()
        .map(|(l, s)| scaled(&l.bias, *s))
        .collect::<Result<Vec<_>>>()?;
    Linear {
        weight: Tensor::cat(&w, 0)?,
        bias: Tensor::cat(&b, 0)?,
    }
    .forward(x)
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        k.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
