//! `x W^T + b` and LayerNorm over a few rows, with weights copied once into the layout the row
//! loops read.

use super::{values, MIN_ROWS_PER_TASK};
use crate::float::Float;
use crate::isa::multiversioned;
use crate::layers::{LayerNorm, Linear};
use candle_core::Result;
use rayon::prelude::*;

/// Outputs accumulated in registers at once: 32 f32 are two AVX-512 or four AVX2 registers.
const BLOCK: usize = 32;
/// Partial sums per block, over interleaved inputs.
const PARTIALS: usize = 4;

/// A Linear `[out, in]` with bias, held transposed (`[in, out]`) so that each input scales one
/// contiguous row of weights.
#[derive(Debug, Clone)]
pub struct RowLinear<T> {
    w_t: Vec<T>,
    b: Vec<T>,
    n_in: usize,
}

impl<T: Float> RowLinear<T> {
    /// A copy of `linear`'s weights and bias.
    pub fn new(linear: &Linear) -> Result<Self> {
        Self::fused(&[(linear, 1.0)])
    }

    /// Several Linears of one input as one, each part's outputs scaled by its factor, side by side
    /// in the order given (what [`fused_linear`](crate::layers::fused_linear) computes).
    pub fn fused(parts: &[(&Linear, f64)]) -> Result<Self> {
        let fused = Linear::fuse(parts)?;
        Ok(Self {
            n_in: fused.weight().dim(1)?,
            w_t: values(&fused.weight().t()?.contiguous()?)?,
            b: values(fused.bias())?,
        })
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }
    pub fn n_out(&self) -> usize {
        self.b.len()
    }

    /// `y[r] = x[r] W^T + b` for every row `r` of `x [rows, in]`; `y` is `[rows, out]`.
    pub fn forward(&self, x: &[T], y: &mut [T]) {
        self.rows(x, y, false)
    }

    /// `y[r] += x[r] W^T + b`: the projection added to a residual.
    pub fn forward_add(&self, x: &[T], y: &mut [T]) {
        self.rows(x, y, true)
    }

    fn rows(&self, x: &[T], y: &mut [T], accumulate: bool) {
        let (n_in, n_out) = (self.n_in, self.n_out());
        assert_eq!(x.len() % n_in.max(1), 0, "x is not [rows, {n_in}]");
        assert_eq!(
            x.len() / n_in.max(1) * n_out,
            y.len(),
            "y is not [rows, {n_out}]"
        );
        // Groups of GROUP rows share each load of the weights.
        let one = |(x, y): (&[T], &mut [T])| linear_group(&self.w_t, &self.b, x, y, accumulate);
        let (gx, gy) = (GROUP * n_in.max(1), GROUP * n_out);
        if y.len() <= gy {
            one((x, y));
        } else {
            x.par_chunks(gx)
                .zip(y.par_chunks_mut(gy))
                .with_min_len(MIN_ROWS_PER_TASK.div_ceil(GROUP))
                .for_each(one);
        }
    }
}

/// Rows computed together, each weight block loaded once for all of them.
const GROUP: usize = 4;

multiversioned!(fn linear_group<T: Float>(w_t: &[T], b: &[T], x: &[T], y: &mut [T], accumulate: bool) => linear_group_body);

/// Up to GROUP rows of `x` (all of them at once when there are GROUP), each as
/// [`linear_row_body`] would.
#[inline(always)]
fn linear_group_body<T: Float>(w_t: &[T], b: &[T], x: &[T], y: &mut [T], accumulate: bool) {
    let (n_out, n_in) = (b.len(), w_t.len() / b.len().max(1));
    let rows = y.len() / n_out.max(1);
    if rows != GROUP || n_out % BLOCK != 0 {
        for (x, y) in x.chunks(n_in.max(1)).zip(y.chunks_mut(n_out.max(1))) {
            linear_row_body(w_t, b, x, y, accumulate);
        }
        return;
    }
    for j0 in (0..n_out).step_by(BLOCK) {
        let bias: &[T; BLOCK] = b[j0..j0 + BLOCK].try_into().expect("a block");
        let mut acc = [*bias; GROUP];
        for i in 0..n_in {
            let w: &[T; BLOCK] = w_t[i * n_out + j0..][..BLOCK].try_into().expect("a block");
            for (r, a) in acc.iter_mut().enumerate() {
                let xi = x[r * n_in + i];
                for k in 0..BLOCK {
                    a[k] = xi.mul_add_(w[k], a[k]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let out = &mut y[r * n_out + j0..][..BLOCK];
            if accumulate {
                out.iter_mut().zip(a).for_each(|(o, v)| *o += *v);
            } else {
                out.copy_from_slice(a);
            }
        }
    }
}

#[inline(always)]
fn linear_row_body<T: Float>(w_t: &[T], b: &[T], x: &[T], y: &mut [T], accumulate: bool) {
    let n_out = b.len();
    let mut j0 = 0;
    while j0 < n_out {
        let width = BLOCK.min(n_out - j0);
        let mut acc = [T::zero(); BLOCK];
        acc[..width].copy_from_slice(&b[j0..j0 + width]);
        if width == BLOCK {
            // A fixed trip count keeps the block in registers across all inputs; PARTIALS sums
            // over interleaved inputs keep that many add chains in flight.
            let mut part = [[T::zero(); BLOCK]; PARTIALS];
            let mut xs = x.chunks_exact(PARTIALS);
            let mut i = 0;
            for xc in &mut xs {
                for (p, &xi) in part.iter_mut().zip(xc) {
                    let w: &[T; BLOCK] =
                        w_t[i * n_out + j0..][..BLOCK].try_into().expect("a block");
                    for k in 0..BLOCK {
                        p[k] = xi.mul_add_(w[k], p[k]);
                    }
                    i += 1;
                }
            }
            for &xi in xs.remainder() {
                let w = &w_t[i * n_out + j0..][..BLOCK];
                for k in 0..BLOCK {
                    acc[k] = xi.mul_add_(w[k], acc[k]);
                }
                i += 1;
            }
            for p in &part {
                for k in 0..BLOCK {
                    acc[k] += p[k];
                }
            }
        } else {
            for (i, &xi) in x.iter().enumerate() {
                let w = &w_t[i * n_out + j0..][..width];
                for k in 0..width {
                    acc[k] = xi.mul_add_(w[k], acc[k]);
                }
            }
        }
        let out = &mut y[j0..j0 + width];
        if accumulate {
            out.iter_mut().zip(&acc).for_each(|(o, a)| *o += *a);
        } else {
            out.copy_from_slice(&acc[..width]);
        }
        j0 += width;
    }
}

/// LayerNorm over the last dimension with affine weights, as a copy of a [`LayerNorm`]'s.
#[derive(Debug, Clone)]
pub struct RowNorm<T> {
    w: Vec<T>,
    b: Vec<T>,
    eps: T,
}

impl<T: Float> RowNorm<T> {
    pub fn new(norm: &LayerNorm) -> Result<Self> {
        Ok(Self {
            w: values(norm.weight())?,
            b: values(norm.bias())?,
            eps: T::from_f64(norm.eps()),
        })
    }

    /// `y[r] = (x[r] - mean) / sqrt(var + eps) * w + b` for every row of `x [rows, d]`.
    pub fn forward(&self, x: &[T], y: &mut [T]) {
        let d = self.w.len();
        assert_eq!(x.len(), y.len(), "x and y differ in length");
        for (x, y) in x.chunks(d).zip(y.chunks_mut(d)) {
            let n = T::from_f64(d as f64);
            let mean = x.iter().fold(T::zero(), |s, &v| s + v) / n;
            let var = x
                .iter()
                .fold(T::zero(), |s, &v| s + (v - mean) * (v - mean))
                / n;
            let inv = T::one() / (var + self.eps).sqrt_();
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(&self.w).zip(&self.b) {
                *y = (x - mean) * inv * w + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernels;
    use crate::layers::fused_linear;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::{DType, Device, Tensor};

    fn check<T: Float>(dtype: DType, tol: f64) {
        seed(3);
        // 47 outputs: one full register block and a partial one; 64: two full blocks.
        for (n_in, outs) in [(9, [40, 7]), (6, [32, 32])] {
            let lin = |o: usize| Linear::new(randn(&[o, n_in], dtype), randn(&[o], dtype));
            let (a, b) = (lin(outs[0]), lin(outs[1]));
            let rows = RowLinear::<T>::fused(&[(&a, 0.5), (&b, 1.0)]).unwrap();
            let n_out = outs[0] + outs[1];
            assert_eq!((rows.n_in(), rows.n_out()), (n_in, n_out));
            let norm = LayerNorm::new(randn(&[n_in], dtype), randn(&[n_in], dtype), 1e-5);
            let row_norm = RowNorm::<T>::new(&norm).unwrap();
            // One row, a group of four, and eleven (parallel groups and a partial one).
            for r in [1, 4, 11] {
                let x = randn(&[r, n_in], dtype);
                let xv = x.flatten_all().unwrap().to_vec1::<T>().unwrap();
                let want =
                    fused_linear(&[(&a, 0.5), (&b, 1.0)], &x, Kernels::Differentiable).unwrap();
                let mut y = vec![T::zero(); r * n_out];
                rows.forward(&xv, &mut y);
                let got = Tensor::from_vec(y.clone(), (r, n_out), &Device::Cpu).unwrap();
                assert!(max_diff(&got, &want) < tol, "{dtype:?} forward, {r} rows");
                rows.forward_add(&xv, &mut y);
                let got = Tensor::from_vec(y, (r, n_out), &Device::Cpu).unwrap();
                assert!(
                    max_diff(&got, &(&want * 2.0).unwrap()) < tol,
                    "{dtype:?} forward_add"
                );

                let want = norm.forward(&x, Kernels::Differentiable).unwrap();
                let mut y = vec![T::zero(); r * n_in];
                row_norm.forward(&xv, &mut y);
                let got = Tensor::from_vec(y, (r, n_in), &Device::Cpu).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < tol, "{dtype:?} norm, {r} rows: {d}");
            }
        }
    }

    #[test]
    fn rows_equal_the_tensor_layers() {
        check::<f32>(DType::F32, 1e-5);
        check::<f64>(DType::F64, 1e-10);
    }
}
