//! The two parameterised building blocks: a Linear with bias (weights `[out, in]`, PyTorch's layout)
//! and a LayerNorm with affine weights.

use crate::attention_block_op::AttentionBlockParams;
use crate::kernels::Kernels;
use crate::linear_op::{linear, linear_inference};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl Linear {
    /// `x [.., in] -> [.., out]`, differentiable: one 2-D GEMM over all leading dims (one big
    /// multi-threaded matmul instead of a batched one), one autograd node on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, &self.bias)
    }

    /// `x W^T + b (+ residual)`. With `Kernels::Fused` on the CPU: one GEMM accumulating into the
    /// bias (and residual), no backward; otherwise [`Linear::forward`] (differentiable).
    pub fn forward_k(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        kern: Kernels,
    ) -> Result<Tensor> {
        match kern {
            Kernels::Fused => linear_inference(x, &self.weight, &self.bias, residual),
            Kernels::Differentiable => match residual {
                Some(r) => self.forward(x)? + r,
                None => self.forward(x),
            },
        }
    }
}

/// Several Linears of the same input as one GEMM: `x [.., in] -> [.., sum of outs]`, the i-th part's
/// output (scaled by its factor, folded into its weights) in the i-th slot. Differentiable: the
/// weights are concatenated per call (they are small next to the activations).
pub fn fused_linear(parts: &[(&Linear, f64)], x: &Tensor, kern: Kernels) -> Result<Tensor> {
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
    .forward_k(x, None, kern)
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

/// The parameters of a pre-norm attention block (self, cross or chunked) for the one-node
/// training op.
pub(crate) fn block_params<'a>(
    norm: &'a LayerNorm,
    [query, key, value, output]: [&'a Linear; 4],
    n_heads: usize,
) -> AttentionBlockParams<'a> {
    AttentionBlockParams {
        norm_w: &norm.weight,
        norm_b: &norm.bias,
        wq: &query.weight,
        bq: &query.bias,
        wk: &key.weight,
        bk: &key.bias,
        wv: &value.weight,
        bv: &value.bias,
        wo: &output.weight,
        bo: &output.bias,
        eps: norm.eps,
        n_heads,
    }
}
