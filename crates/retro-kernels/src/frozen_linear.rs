//! `x W^T` with `W` frozen: differentiable in `x` only.
//!
//! candle's matmul backward computes the gradient of both operands, whether or not anything
//! asks for the weight's. Through a frozen base (RETRO-fitting: gradients flow through every
//! layer above the first trainable block to reach it) that is one wasted GEMM per projection, as
//! large as the one for `dx`, and a weight-sized tensor per projection and step. Here the weight
//! is held by the op, not passed as an input, so the backward computes `dx = dy W` and nothing else.

use crate::cpu_storage::{contiguous, cpu, dispatch, FloatKernel};
use crate::float::Float;
use crate::linear_op::matmul_new;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

/// `x [.., in] W^T` for `w [out, in]` (PyTorch's layout), with a gradient for `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some(&d_in) = dims.last() else {
        candle_core::bail!("frozen_linear: x is a scalar");
    };
    let (d_out, w_in) = w.dims2()?;
    if w_in != d_in {
        candle_core::bail!("frozen_linear: x {dims:?} against w {:?}", w.dims());
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = d_out;
    let cpu_ok = matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && w.dtype() == x.dtype()
        && x.elem_count() > 0;
    if !cpu_ok {
        // Other devices: the composition (its backward also computes the discarded dW).
        let rows = x.elem_count() / d_in.max(1);
        return x
            .reshape((rows, d_in))?
            .matmul(&w.detach().t()?)?
            .reshape(out_dims);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.detach() })
}

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let (sw, lw) = self.w.storage_and_layout();
        let k = lx.dims().last().copied().unwrap_or(0);
        let mut out = lx.dims().to_vec();
        let n = lw.dims()[0];
        *out.last_mut().unwrap() = n;
        let y = dispatch(
            "frozen_linear",
            sx,
            Matmul {
                a: (sx, lx),
                b: (cpu(&sw)?, lw),
                rows: lx.shape().elem_count() / k.max(1),
            },
        )?;
        Ok((y, Shape::from(out)))
    }

    /// `dx = dy W` (candle's GEMM on a detached weight: the result holds no graph).
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let n = self.w.dim(0)?;
        let rows = dy.elem_count() / n.max(1);
        let dx = dy.contiguous()?.reshape((rows, n))?.matmul(&self.w)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `a [rows, k] * w^T` for `w [n, k]` strided.
struct Matmul<'a> {
    a: (&'a CpuStorage, &'a Layout),
    b: (&'a CpuStorage, &'a Layout),
    rows: usize,
}

impl FloatKernel for Matmul<'_> {
    type Output = CpuStorage;
    fn run<T: Float>(self) -> Result<CpuStorage> {
        let a = contiguous::<T>(self.a.0, self.a.1)?;
        let w = &T::cpu_storage_as_slice(self.b.0)?[self.b.1.start_offset()..];
        let (n, k) = (self.b.1.dims()[0], self.b.1.dims()[1]);
        let sw = self.b.1.stride();
        // w^T [k, n]: its row stride is w's column stride.
        let y = matmul_new((a, k, 1), (w, sw[1], sw[0]), (self.rows, n, k));
        Ok(T::to_cpu_storage_owned(y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::{DType, Var};

    #[test]
    fn values_and_input_gradient_equal_the_composition() {
        seed(3);
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
            let x = Var::from_tensor(&randn(&[2, 3, 5, 7], dt)).unwrap();
            // A transposed view as the weight: strided weights are read in place.
            let w = randn(&[7, 4], dt).t().unwrap();
            let up = randn(&[2, 3, 5, 4], dt);
            let got = frozen_linear(&x, &w).unwrap();
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), &[2, 3, 5, 4]);
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, c) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert!(max_diff(a, c) < tol, "{dt:?}: gradient of x");
        }
    }

    #[test]
    fn the_weight_gets_no_gradient_even_as_a_variable() {
        seed(4);
        let x = Var::from_tensor(&randn(&[3, 5], DType::F32)).unwrap();
        let w = Var::from_tensor(&randn(&[2, 5], DType::F32)).unwrap();
        let g = frozen_linear(&x, &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&w).is_none(), "a frozen weight must not be trained");
    }

    #[test]
    fn mismatched_widths_are_an_error() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap();
        let e = frozen_linear(&x, &w).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");
    }
}
