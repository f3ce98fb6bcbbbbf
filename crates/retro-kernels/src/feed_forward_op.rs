//! The pre-norm feed-forward block `h + W2 relu(W1 LN(h) + b1) + b2` as one differentiable op.
//!
//! Built from candle ops the block is eight autograd nodes, most of them `[rows, d_ff]` wide, each
//! costing a full-size gradient accumulation; this is one node whose backward is written out
//! (four GEMMs, the ReLU mask, LayerNorm's backward). The block's six parameters travel as one
//! concatenated tensor: candle's `cat` backward hands each `Var` its slice of the gradient.

use crate::cpu_storage::{contiguous, cpu, dispatch, FloatKernel};
use crate::elementwise::{relu_in_place, relu_mask};
use crate::float::Float;
use crate::fused_norm::{ln_fwd, pre_norm_bwd};
use crate::linear_op::{affine, linear_bwd};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// The block's parameters (PyTorch layouts: `w1 [d_ff, d]`, `w2 [d, d_ff]`).
pub struct FeedForwardParams<'a> {
    pub norm_w: &'a Tensor,
    pub norm_b: &'a Tensor,
    pub w1: &'a Tensor,
    pub b1: &'a Tensor,
    pub w2: &'a Tensor,
    pub b2: &'a Tensor,
    pub eps: f64,
}

/// `h [.., d] -> h + lin2(relu(lin1(norm(h))))`, differentiable in `h` and every parameter.
/// f32/f64 on the CPU; `None` elsewhere (the caller composes the block from candle ops).
pub fn feed_forward(h: &Tensor, p: &FeedForwardParams<'_>) -> Result<Option<Tensor>> {
    let (d_ff, d) = p.w1.dims2()?;
    let ok = matches!(h.device(), Device::Cpu)
        && matches!(h.dtype(), DType::F32 | DType::F64)
        && [p.norm_w, p.norm_b, p.w1, p.b1, p.w2, p.b2]
            .iter()
            .all(|t| t.dtype() == h.dtype())
        && h.dims().last() == Some(&d)
        && p.w2.dims() == [d, d_ff];
    if !ok {
        return Ok(None);
    }
    let packed = Tensor::cat(
        &[
            p.norm_w,
            p.norm_b,
            &p.w1.flatten_all()?,
            p.b1,
            &p.w2.flatten_all()?,
            p.b2,
        ],
        0,
    )?;
    let op = FeedForwardOp {
        d,
        d_ff,
        eps: p.eps,
        saved: Mutex::new(None),
    };
    Ok(Some(h.contiguous()?.apply_op2(&packed, op)?))
}

struct FeedForwardOp {
    d: usize,
    d_ff: usize,
    eps: f64,
    /// `LN(h)` and `relu(a)` from the forward, for the backward.
    saved: Mutex<Option<(CpuStorage, CpuStorage)>>,
}

/// Offsets of the six parameters in the packed tensor.
fn offsets(d: usize, f: usize) -> [usize; 7] {
    let mut o = [0; 7];
    for (i, len) in [d, d, f * d, f, d * f, d].into_iter().enumerate() {
        o[i + 1] = o[i] + len;
    }
    o
}

impl FeedForwardOp {
    fn fwd<T: Float>(&self, h: &[T], p: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (d, f) = (self.d, self.d_ff);
        let o = offsets(d, f);
        let rows = h.len() / d.max(1);
        let x = ln_fwd(h, &p[o[0]..o[1]], &p[o[1]..o[2]], d, self.eps);
        let (w1, b1, w2, b2) = (
            &p[o[2]..o[3]],
            &p[o[3]..o[4]],
            &p[o[4]..o[5]],
            &p[o[5]..o[6]],
        );
        // w1 [f, d] and w2 [d, f] are row-major.
        let mut a = affine(&x, (rows, d), w1, (f, [d, 1]), b1, None);
        relu_in_place(&mut a);
        let y = affine(&a, (rows, f), w2, (d, [f, 1]), b2, Some(h));
        (y, x, a)
    }

    /// `(dh, dpacked)` from `dy`.
    fn bwd<T: Float>(&self, h: &[T], p: &[T], x: &[T], r: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let (d, f) = (self.d, self.d_ff);
        let o = offsets(d, f);
        let rows = h.len() / d.max(1);
        let (w1, w2) = (&p[o[2]..o[3]], &p[o[4]..o[5]]);
        let mut dp = vec![T::zero(); o[6]];
        let (dw1, rest) = dp[o[2]..].split_at_mut(f * d);
        let (db1, rest) = rest.split_at_mut(f);
        let (dw2, db2) = rest.split_at_mut(d * f);
        // lin2's backward from dy, then the ReLU mask: da [rows, f].
        let mut da = linear_bwd(dy, r, w2, (rows, d, f), dw2, db2);
        relu_mask(&mut da, r);
        // lin1's backward: dx [rows, d].
        let dx = linear_bwd(&da, x, w1, (rows, f, d), dw1, db1);
        let dh = pre_norm_bwd(h, &p[o[0]..o[1]], &dx, dy, d, self.eps, &mut dp[..o[2]]);
        (dh, dp)
    }
}

fn slices<'a, T: Float>(s: [&'a CpuStorage; 2], l: [&Layout; 2]) -> Result<(&'a [T], &'a [T])> {
    Ok((contiguous::<T>(s[0], l[0])?, contiguous::<T>(s[1], l[1])?))
}

impl CustomOp2 for FeedForwardOp {
    fn name(&self) -> &'static str {
        "feed-forward-block"
    }

    fn cpu_fwd(
        &self,
        sh: &CpuStorage,
        lh: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !lh.is_contiguous()
            || !lp.is_contiguous()
            || lp.dims() != [offsets(self.d, self.d_ff)[6]]
        {
            candle_core::bail!("feed-forward: bad layouts {lh:?}, {lp:?}");
        }
        let y = dispatch(
            "feed-forward",
            sh,
            Forward {
                op: self,
                h: (sh, lh),
                p: (sp, lp),
            },
        )?;
        Ok((y, lh.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((x, r)) = self.saved.lock().unwrap().take() else {
            candle_core::bail!("feed-forward: backward without a saved forward");
        };
        let dy = dy.contiguous()?;
        let (sh, lh) = h.storage_and_layout();
        let (sp, lp) = p.storage_and_layout();
        let (sg, lg) = dy.storage_and_layout();
        let (sh, sp, sg) = (cpu(&sh)?, cpu(&sp)?, cpu(&sg)?);
        let (dh, dp) = dispatch(
            "feed-forward",
            sh,
            Backward {
                op: self,
                h: (sh, lh),
                p: (sp, lp),
                dy: (sg, lg),
                saved: (&x, &r),
                like: (h, p),
            },
        )?;
        Ok((Some(dh), Some(dp)))
    }
}

/// The forward at one dtype; keeps `LN(h)` and `relu(a)` for the backward.
struct Forward<'a> {
    op: &'a FeedForwardOp,
    h: (&'a CpuStorage, &'a Layout),
    p: (&'a CpuStorage, &'a Layout),
}

impl FloatKernel for Forward<'_> {
    type Output = CpuStorage;
    fn run<T: Float>(self) -> Result<CpuStorage> {
        let (h, p) = slices::<T>([self.h.0, self.p.0], [self.h.1, self.p.1])?;
        let (y, x, a) = self.op.fwd(h, p);
        *self.op.saved.lock().unwrap() =
            Some((T::to_cpu_storage_owned(x), T::to_cpu_storage_owned(a)));
        Ok(T::to_cpu_storage_owned(y))
    }
}

/// The backward at one dtype: `(dh, dpacked)` shaped as `h` and the packed parameters.
struct Backward<'a> {
    op: &'a FeedForwardOp,
    h: (&'a CpuStorage, &'a Layout),
    p: (&'a CpuStorage, &'a Layout),
    dy: (&'a CpuStorage, &'a Layout),
    /// `LN(h)` and `relu(a)` from the forward.
    saved: (&'a CpuStorage, &'a CpuStorage),
    /// `h` and the packed parameters: the gradients take their shapes and device.
    like: (&'a Tensor, &'a Tensor),
}

impl FloatKernel for Backward<'_> {
    type Output = (Tensor, Tensor);
    fn run<T: Float>(self) -> Result<Self::Output> {
        let (h, p) = self.like;
        let (hv, pv) = slices::<T>([self.h.0, self.p.0], [self.h.1, self.p.1])?;
        let g = contiguous::<T>(self.dy.0, self.dy.1)?;
        let (xv, rv) = (
            T::cpu_storage_as_slice(self.saved.0)?,
            T::cpu_storage_as_slice(self.saved.1)?,
        );
        let (dh, dp) = self.op.bwd(hv, pv, xv, rv, g);
        Ok((
            Tensor::from_vec(dh, h.shape(), h.device())?,
            Tensor::from_vec(dp, p.shape(), p.device())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{randn, rel_diff, seed};
    use candle_core::Var;

    fn composed(h: &Tensor, p: &FeedForwardParams<'_>) -> Tensor {
        let x = candle_nn::ops::layer_norm_slow(h, p.norm_w, p.norm_b, p.eps as f32).unwrap();
        let a = x
            .broadcast_matmul(&p.w1.t().unwrap())
            .unwrap()
            .broadcast_add(p.b1)
            .unwrap();
        let y = a
            .relu()
            .unwrap()
            .broadcast_matmul(&p.w2.t().unwrap())
            .unwrap();
        (y.broadcast_add(p.b2).unwrap() + h).unwrap()
    }

    #[test]
    fn values_and_gradients_equal_the_composition() {
        seed(1);
        let (d, f) = (6, 10);
        for (dt, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let var = |shape: &[usize], mean: f64| {
                Var::from_tensor(&(randn(shape, dt) + mean).unwrap()).unwrap()
            };
            let h = var(&[2, 7, d], 0.0);
            let (nw, nb, w1, b1, w2, b2) = (
                var(&[d], 1.0),
                var(&[d], 0.0),
                var(&[f, d], 0.0),
                var(&[f], 0.0),
                var(&[d, f], 0.0),
                var(&[d], 0.0),
            );
            let p = FeedForwardParams {
                norm_w: &nw,
                norm_b: &nb,
                w1: &w1,
                b1: &b1,
                w2: &w2,
                b2: &b2,
                eps: 1e-5,
            };
            let got = feed_forward(&h, &p).unwrap().unwrap();
            let want = composed(&h, &p);
            assert!(rel_diff(&got, &want) < tol, "{dt:?} values");
            let up = randn(&[2, 7, d], dt);
            let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [
                ("h", &h),
                ("norm_w", &nw),
                ("norm_b", &nb),
                ("w1", &w1),
                ("b1", &b1),
                ("w2", &w2),
                ("b2", &b2),
            ] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(a.dims(), v.dims(), "{name}");
                let e = rel_diff(a, b);
                assert!(e < tol, "{dt:?}: gradient of {name}: {e}");
            }
        }
    }
}
