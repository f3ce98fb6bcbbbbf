//! Differentiable fused LayerNorm and rotary embedding for training on CPU.
//!
//! candle's fused `layer_norm` and `rope` kernels record no backward op, so training used the
//! compositions `layer_norm_slow` / rotate-half, whose many elementwise ops dominated the train step.
//! These are candle custom ops with plain-Rust CPU kernels (f32 and f64, rayon over rows) *and* a
//! backward. Other devices and dtypes fall back to the compositions.
//!
//! LayerNorm over the last dim: `y = xhat * w + b`, `xhat = (x - mean) / sigma`,
//! `sigma = sqrt(var + eps)`. Backward: `dx = (g*w - mean(g*w) - xhat * mean(g*w*xhat)) / sigma`,
//! `dw = sum_rows g*xhat`, `db = sum_rows g`.
//!
//! RoPE (rotate-half) on `x [b, s, h, d]`: `y1 = x1 c - x2 s`, `y2 = x2 c + x1 s`; its backward is the
//! inverse rotation (`-theta`).

use crate::cpu_storage::{contiguous, cpu, dispatch, FloatKernel};
use crate::elementwise::add_in_place;
use crate::float::Float;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The CPU kernels here handle `x` (f32 or f64 on the CPU).
pub(crate) fn cpu_ok(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Rows per rayon task.
const ROWS: usize = 32;

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------

/// LayerNorm of `x [.., d]` with `w, b [d]` over the last dim, differentiable in all three.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !cpu_ok(x) || w.dtype() != x.dtype() || b.dtype() != x.dtype() || w.dims() != [d] {
        return candle_nn::ops::layer_norm_slow(x, w, b, eps);
    }
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    x.apply_op3(&w, &b, LayerNormOp { eps: eps as f64 })
}

struct LayerNormOp {
    eps: f64,
}

/// `sum_i f(r[i])` in eight partial sums: one dependent chain of adds would be latency-bound (on
/// d = 128, LayerNorm's row statistics ran at a quarter of the speed).
#[inline(always)]
fn sum8<T: Float>(r: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = r.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(T::zero(), |s, &v| s + f(v));
    for c in chunks {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Mean and `1 / sigma` of one row (two-pass, as `layer_norm_slow`).
#[inline(always)]
fn stats<T: Float>(r: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(r.len() as f64);
    let mean = sum8(r, |v| v) / n;
    let q = sum8(r, |v| (v - mean) * (v - mean));
    (mean, T::one() / (q / n + eps).sqrt_())
}

/// LayerNorm of the rows of `x [.., d]` into `y`.
#[inline(always)]
fn ln_rows_body<T: Float>(x: &[T], w: &[T], b: &[T], d: usize, eps: T, y: &mut [T]) {
    for (yr, xr) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let (mean, rs) = stats(xr, eps);
        for i in 0..d {
            yr[i] = (xr[i] - mean) * rs * w[i] + b[i];
        }
    }
}
crate::isa::multiversioned!(fn ln_rows<T: Float>(x: &[T], w: &[T], b: &[T], d: usize, eps: T, y: &mut [T]) => ln_rows_body);

pub(crate) fn ln_fwd<T: Float>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
    let eps = T::from_f64(eps);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d * ROWS)
        .zip(x.par_chunks(d * ROWS))
        .for_each(|(yc, xc)| ln_rows(xc, w, b, d, eps, yc));
    y
}

/// LayerNorm's backward over the rows of `x` and `g` (the output's gradient): writes `dx`, and adds
/// the rows' `dw` and `db` into `dwb [2 d]`.
#[inline(always)]
fn ln_bwd_rows_body<T: Float>(xwg: [&[T]; 3], d: usize, eps: T, dx: &mut [T], dwb: &mut [T]) {
    let [x, w, g] = xwg;
    let (dw, db) = dwb.split_at_mut(d);
    let n = T::from_f64(d as f64);
    let main = d - d % 8;
    for ((dxr, xr), gr) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(g.chunks_exact(d))
    {
        let (mean, rs) = stats(xr, eps);
        // s1 = sum g w, s2 = sum g w xhat, in eight partial sums each (see `sum8`).
        let (mut s1, mut s2) = ([T::zero(); 8], [T::zero(); 8]);
        let mut step = |i: usize, l: usize, s1: &mut [T; 8], s2: &mut [T; 8]| {
            let xh = (xr[i] - mean) * rs;
            let gw = gr[i] * w[i];
            s1[l] += gw;
            s2[l] += gw * xh;
            dw[i] += gr[i] * xh;
            db[i] += gr[i];
        };
        for i0 in (0..main).step_by(8) {
            for l in 0..8 {
                step(i0 + l, l, &mut s1, &mut s2);
            }
        }
        for i in main..d {
            step(i, 0, &mut s1, &mut s2);
        }
        let total = |s: [T; 8]| s.iter().fold(T::zero(), |a, &v| a + v);
        let (m1, m2) = (total(s1) / n, total(s2) / n);
        for i in 0..d {
            let xh = (xr[i] - mean) * rs;
            dxr[i] = (gr[i] * w[i] - m1 - xh * m2) * rs;
        }
    }
}
crate::isa::multiversioned!(fn ln_bwd_rows<T: Float>(xwg: [&[T]; 3], d: usize, eps: T, dx: &mut [T], dwb: &mut [T]) => ln_bwd_rows_body);

/// `(dx, dw, db)`.
pub(crate) fn ln_bwd<T: Float>(
    x: &[T],
    w: &[T],
    g: &[T],
    d: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let eps = T::from_f64(eps);
    let mut dx = vec![T::zero(); x.len()];
    // Per block of rows, its own dw and db, added in block order: the same on any thread count.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(d * ROWS)
        .zip(x.par_chunks(d * ROWS).zip(g.par_chunks(d * ROWS)))
        .map(|(dxc, (xc, gc))| {
            let mut dwb = vec![T::zero(); 2 * d];
            ln_bwd_rows([xc, w, gc], d, eps, dxc, &mut dwb);
            dwb
        })
        .collect();
    let mut dw = vec![T::zero(); d];
    let mut db = vec![T::zero(); d];
    for p in partials {
        for i in 0..d {
            dw[i] += p[i];
            db[i] += p[d + i];
        }
    }
    (dx, dw, db)
}

/// The input gradient of a pre-norm residual block `y = x + f(LN(x))`: LayerNorm's backward of
/// `g` (the gradient of `LN(x)`) plus `dy` (the residual's); the norm's `dw` and `db` go to
/// `dnorm[..d]` and `dnorm[d..2 d]`.
pub(crate) fn pre_norm_bwd<T: Float>(
    x: &[T],
    w: &[T],
    g: &[T],
    dy: &[T],
    d: usize,
    eps: f64,
    dnorm: &mut [T],
) -> Vec<T> {
    let (mut dx, dw, db) = ln_bwd(x, w, g, d, eps);
    dnorm[..d].copy_from_slice(&dw);
    dnorm[d..2 * d].copy_from_slice(&db);
    add_in_place(&mut dx, dy);
    dx
}

/// Reads three tensors' CPU storages (made contiguous by the caller) and runs `f` on them.
fn with_cpu3<R>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl FnOnce([&CpuStorage; 3], [&Layout; 3]) -> Result<R>,
) -> Result<R> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (sc, lc) = c.storage_and_layout();
    f([cpu(&sa)?, cpu(&sb)?, cpu(&sc)?], [la, lb, lc])
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = *l1.dims().last().unwrap_or(&1);
        let out = dispatch(
            "fused-layer-norm",
            s1,
            LnForward {
                s: [s1, s2, s3],
                l: [l1, l2, l3],
                d,
                eps: self.eps,
            },
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.detach().contiguous()?;
        let d = x.dim(D::Minus1)?;
        let eps = self.eps;
        let dev = x.device().clone();
        let (xs, ws) = (x.shape().clone(), w.shape().clone());
        let (dx, dw, db) = with_cpu3(x, w, &g, |s, l| {
            let shapes = (&xs, &ws);
            let kernel = LnBackward {
                s,
                l,
                d,
                eps,
                shapes,
                dev: &dev,
            };
            dispatch("fused-layer-norm", s[0], kernel)
        })?;
        let _ = b;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm's forward at one dtype: `y` for `x, w, b`.
struct LnForward<'a> {
    s: [&'a CpuStorage; 3],
    l: [&'a Layout; 3],
    d: usize,
    eps: f64,
}

impl FloatKernel for LnForward<'_> {
    type Output = CpuStorage;
    fn run<T: Float>(self) -> Result<CpuStorage> {
        let (s, l) = (self.s, self.l);
        let (x, w, b) = (
            contiguous::<T>(s[0], l[0])?,
            contiguous::<T>(s[1], l[1])?,
            contiguous::<T>(s[2], l[2])?,
        );
        Ok(T::to_cpu_storage_owned(ln_fwd(x, w, b, self.d, self.eps)))
    }
}

/// LayerNorm's backward at one dtype: `(dx, dw, db)` for `x, w, g`.
struct LnBackward<'a> {
    s: [&'a CpuStorage; 3],
    l: [&'a Layout; 3],
    d: usize,
    eps: f64,
    /// `x`'s and `w`'s.
    shapes: (&'a Shape, &'a Shape),
    dev: &'a Device,
}

impl FloatKernel for LnBackward<'_> {
    type Output = (Tensor, Tensor, Tensor);
    fn run<T: Float>(self) -> Result<Self::Output> {
        let (s, l, shapes, dev) = (self.s, self.l, self.shapes, self.dev);
        let (x, w, g) = (
            contiguous::<T>(s[0], l[0])?,
            contiguous::<T>(s[1], l[1])?,
            contiguous::<T>(s[2], l[2])?,
        );
        let (a, b, c) = ln_bwd(x, w, g, self.d, self.eps);
        Ok((
            Tensor::from_vec(a, shapes.0, dev)?,
            Tensor::from_vec(b, shapes.1, dev)?,
            Tensor::from_vec(c, shapes.1, dev)?,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

/// Rotate-half rotary embedding of `x [b, s, h, d]` (any strides with a unit feature stride) with
/// tables `cos, sin [>= s, d/2]`, returning a contiguous `[b, s, h, d]`; differentiable in `x`.
pub fn rope_bshd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, s, _, d) = x.dims4()?;
    let ok = cpu_ok(x)
        && cos.dtype() == x.dtype()
        && sin.dtype() == x.dtype()
        && d % 2 == 0
        && cos.dims2()? == (cos.dim(0)?, d / 2)
        && sin.dims() == cos.dims()
        && cos.dim(0)? >= s;
    if !ok {
        return rope_bshd_slow(x, cos, sin);
    }
    let x = if d > 1 && x.stride()[3] != 1 {
        x.contiguous()?
    } else {
        x.clone()
    };
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    x.apply_op3(&cos, &sin, RopeOp { inverse: false })
}

/// The rotate-half composition, differentiable by candle's autograd.
pub fn rope_bshd_slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, s, _, d) = x.dims4()?;
    let full = |t: &Tensor| -> Result<Tensor> {
        Tensor::cat(&[t, t], D::Minus1)?
            .narrow(0, 0, s)?
            .reshape((1, s, 1, d))
    };
    let (cos, sin) = (full(cos)?, full(sin)?);
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

struct RopeOp {
    /// Rotate by `-theta` (the backward).
    inverse: bool,
}

fn rope_cpu<T: Float>(x: &[T], l: &Layout, cos: &[T], sin: &[T], inverse: bool) -> Vec<T> {
    let (dims, st) = (l.dims(), l.stride());
    let (b, s, h, d) = (dims[0], dims[1], dims[2], dims[3]);
    let (sb, ss, sh) = (st[0], st[1], st[2]);
    let off = l.start_offset();
    let half = d / 2;
    let n = b * s * h * d;
    if n == 0 {
        return Vec::new();
    }
    // `rope_bshd` checked that d is even: `rope_row` writes all of each head's row, so `y` is
    // never zero-filled first (on the encoder's 8,192 rows that fill was a pass of its own).
    let mut y = Vec::with_capacity(n);
    // One `(b, s)` row (all heads) is only h*d elements: hand rayon blocks of rows.
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(h * d)
        .enumerate()
        .with_min_len(64)
        .for_each(|(r, yr)| {
            let (bi, si) = (r / s, r % s);
            let (c, sn) = (&cos[si * half..][..half], &sin[si * half..][..half]);
            for hi in 0..h {
                let xr = &x[off + bi * sb + si * ss + hi * sh..][..d];
                rope_row(xr, c, sn, &mut yr[hi * d..][..d], inverse);
            }
        });
    // SAFETY: every row of every head was written above.
    unsafe { y.set_len(n) };
    y
}

/// One head's row: rotate `x` by theta (or by -theta for the backward) into `y`, every element of
/// which is written (straight from `x`: a copy first was a call to memmove per row).
#[inline(always)]
fn rope_row<T: Float>(
    x: &[T],
    c: &[T],
    sn: &[T],
    y: &mut [std::mem::MaybeUninit<T>],
    inverse: bool,
) {
    let half = c.len();
    assert!(x.len() == 2 * half && y.len() == 2 * half && sn.len() == half);
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for i in 0..half {
        let (a, b, s) = (
            x1[i],
            x2[i],
            if inverse { T::zero() - sn[i] } else { sn[i] },
        );
        y1[i].write(a * c[i] - b * s);
        y2[i].write(b * c[i] + a * s);
    }
}

/// One head's row rotated in place by theta (by -theta when `inverse`: the backward).
#[inline(always)]
pub(crate) fn rope_in_place<T: Float>(x: &mut [T], c: &[T], sn: &[T], inverse: bool) {
    let half = c.len();
    let (x1, x2) = x.split_at_mut(half);
    let (x2, sn) = (&mut x2[..half], &sn[..half]);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        if inverse {
            x1[i] = a * c[i] + b * sn[i];
            x2[i] = b * c[i] - a * sn[i];
        } else {
            x1[i] = a * c[i] - b * sn[i];
            x2[i] = b * c[i] + a * sn[i];
        }
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope-bshd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims().len() != 4 || (l1.dims()[3] > 1 && l1.stride()[3] != 1) {
            candle_core::bail!("fused-rope: bad layout {l1:?}");
        }
        let out = dispatch(
            "fused-rope",
            s1,
            RopeForward {
                s: [s1, s2, s3],
                l: [l1, l2, l3],
                inverse: self.inverse,
            },
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.detach();
        let dx = g.apply_op3_no_bwd(
            cos,
            sin,
            &RopeOp {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// The rotation at one dtype: `x` (strided `[b, s, h, d]`) by the tables `cos, sin`.
struct RopeForward<'a> {
    s: [&'a CpuStorage; 3],
    l: [&'a Layout; 3],
    inverse: bool,
}

impl FloatKernel for RopeForward<'_> {
    type Output = CpuStorage;
    fn run<T: Float>(self) -> Result<CpuStorage> {
        let (s, l) = (self.s, self.l);
        let x = T::cpu_storage_as_slice(s[0])?;
        let (c, sn) = (contiguous::<T>(s[1], l[1])?, contiguous::<T>(s[2], l[2])?);
        Ok(T::to_cpu_storage_owned(rope_cpu(
            x,
            l[0],
            c,
            sn,
            self.inverse,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::Var;

    fn rand(shape: &[usize], dtype: DType) -> Tensor {
        randn(shape, dtype)
    }

    fn check_ln(shape: &[usize], dtype: DType, tol: f64) {
        let d = *shape.last().unwrap();
        let x = Var::from_tensor(&rand(shape, dtype)).unwrap();
        let w = Var::from_tensor(&(rand(&[d], dtype) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&rand(&[d], dtype)).unwrap();
        let gy = rand(shape, dtype);
        let run = |fused: bool| {
            let y = if fused {
                layer_norm(&x, &w, &b, 1e-5).unwrap()
            } else {
                candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap()
            };
            let grads = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (y, g(&x), g(&w), g(&b))
        };
        let (a, b_) = (run(true), run(false));
        for (p, q) in [(&a.0, &b_.0), (&a.1, &b_.1), (&a.2, &b_.2), (&a.3, &b_.3)] {
            assert_eq!(p.dims(), q.dims());
            let e = max_diff(p, q);
            assert!(e < tol, "{shape:?} {dtype:?}: {e}");
        }
    }

    #[test]
    fn layer_norm_matches_slow_f64() {
        seed(1);
        check_ln(&[3, 37, 16], DType::F64, 1e-12);
        check_ln(&[70, 128], DType::F64, 1e-12);
        check_ln(&[1, 1, 5], DType::F64, 1e-12);
    }

    #[test]
    fn layer_norm_matches_slow_f32() {
        seed(2);
        check_ln(&[3, 37, 16], DType::F32, 1e-4);
        check_ln(&[70, 128], DType::F32, 1e-4);
    }

    #[test]
    fn layer_norm_strided_input() {
        seed(3);
        let x = rand(&[8, 6], DType::F64).t().unwrap();
        let (w, b) = (rand(&[8], DType::F64), rand(&[8], DType::F64));
        let e = max_diff(
            &layer_norm(&x, &w, &b, 1e-5).unwrap(),
            &candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap(),
        );
        assert!(e < 1e-12);
    }

    fn check_rope(dtype: DType, tol: f64) {
        let (b, s, h, d, smax) = (2, 7, 3, 8, 10);
        // A copied [b, s, h, d] tensor, and a strided view (heads of a wider GEMM output).
        let base = Var::from_tensor(&rand(&[b, s, 2 * h * d], dtype)).unwrap();
        let x = base
            .narrow(2, h * d, h * d)
            .unwrap()
            .reshape((b, s, h, d))
            .unwrap();
        let base4 = base.reshape((b, s, 2 * h, d)).unwrap();
        let xv = base4.narrow(2, h, h).unwrap();
        assert!(!xv.is_contiguous());
        let cos = rand(&[smax, d / 2], dtype);
        let sin = rand(&[smax, d / 2], dtype);
        let gy = rand(&[b, s, h, d], dtype);
        for x in [&x, &xv] {
            let run = |fused: bool| {
                let y = if fused {
                    rope_bshd(x, &cos, &sin).unwrap()
                } else {
                    rope_bshd_slow(x, &cos, &sin).unwrap()
                };
                let grads = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
                (y, grads.get(base.as_tensor()).unwrap().clone())
            };
            let (p, q) = (run(true), run(false));
            assert!(max_diff(&p.0, &q.0) < tol);
            assert!(max_diff(&p.1, &q.1) < tol);
        }
    }

    #[test]
    fn rope_matches_slow() {
        seed(4);
        check_rope(DType::F64, 1e-12);
        check_rope(DType::F32, 1e-5);
    }
}
