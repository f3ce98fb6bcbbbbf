//! The two parameterised building blocks the RETRO model and the index's BERT share: a Linear with
//! bias (weights `[out, in]`, PyTorch's layout) and a LayerNorm with affine weights.

use crate::kernels::Kernels;
use crate::linear_op::{linear, linear_inference, linear_relu_inference};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `weight [out, in]`, `bias [out]`.
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self { weight, bias }
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Several Linears of the same input as one: `[sum of outs, in]` weights, the i-th part's
    /// weights and bias scaled by its factor, in the i-th slot.
    pub fn fuse(parts: &[(&Linear, f64)]) -> Result<Linear> {
        let scaled = |t: &Tensor, s: f64| if s == 1.0 { Ok(t.clone()) } else { t * s };
        let w = parts
            .iter()
            .map(|(l, s)| scaled(&l.weight, *s))
            .collect::<Result<Vec<_>>>()?;
        let b = parts
            .iter()
            .map(|(l, s)| scaled(&l.bias, *s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear::new(Tensor::cat(&w, 0)?, Tensor::cat(&b, 0)?))
    }

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

    /// `relu(x W^T + b)`: with `Kernels::Fused` on the CPU the ReLU is applied in place to the
    /// GEMM's output; otherwise differentiable.
    pub fn forward_relu_k(&self, x: &Tensor, kern: Kernels) -> Result<Tensor> {
        match kern {
            Kernels::Fused => linear_relu_inference(x, &self.weight, &self.bias),
            Kernels::Differentiable => self.forward(x)?.relu(),
        }
    }
}

/// Several Linears of the same input as one GEMM: `x [.., in] -> [.., sum of outs]`, the i-th part's
/// output (scaled by its factor, folded into its weights) in the i-th slot. Differentiable: the
/// weights are concatenated per call (they are small next to the activations).
pub fn fused_linear(parts: &[(&Linear, f64)], x: &Tensor, kern: Kernels) -> Result<Tensor> {
    Linear::fuse(parts)?.forward_k(x, None, kern)
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight [d]`, `bias [d]`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        k.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
