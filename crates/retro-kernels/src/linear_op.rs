//! `x W^T + b (+ r)` as one GEMM on the CPU.
//!
//! candle's matmul zero-fills its output and the bias and residual adds are two more passes, each
//! with a fresh allocation. Here the output starts as `b (+ r)` and the GEMM accumulates into it.
//! For training, [`linear`] is one autograd node with its own backward instead of the five
//! (reshape, transpose, matmul, broadcast add, reshape) of the composition, each of which costs
//! candle a full-size gradient accumulation.

use crate::cpu_storage::{contiguous, cpu, dispatch, FloatKernel};
use crate::float::Float;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// The CPU kernel handles these (f32 or f64 on the CPU, one dtype, at least one row).
fn kernel_ok(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && b.dtype() == x.dtype()
        && x.elem_count() > 0
}

/// The candle composition (any device): one 2-D GEMM over all leading dims, then the bias.
fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let rows = x.elem_count() / d_in.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    x.reshape((rows, d_in))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?
        .reshape(out_dims)
}

/// `x [.., in] W^T + b` (`w [out, in]`, `b [out]`), differentiable in all three.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !kernel_ok(x, w, b) {
        return composed(x, w, b);
    }
    x.contiguous()?.apply_op3(
        w,
        &b.contiguous()?,
        LinearOp {
            residual: None,
            relu: false,
        },
    )
}

/// `x [.., in]`, `w [out, in]`, `b [out]`, `residual [.., out]` -> `[.., out]`.
pub fn linear_inference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    linear_inference_with(x, w, b, residual, false)
}

/// `relu(x [.., in] W^T + b)`, the ReLU applied in place to the GEMM's output (candle's `relu`
/// would write a second `[rows, out]` tensor: 16 MiB per layer for the labml-small encoder's
/// hidden).
pub fn linear_relu_inference(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_inference_with(x, w, b, None, true)
}

fn linear_inference_with(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let rows = x.elem_count() / d_in.max(1);
    let d_out = w.dim(0)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = d_out;
    let residual_ok =
        residual.is_none_or(|r| r.dtype() == x.dtype() && r.dims() == out_dims.as_slice());
    if !kernel_ok(x, w, b) || !residual_ok {
        let y = composed(x, w, b)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        return if relu { y.relu() } else { Ok(y) };
    }
    let op = LinearOp {
        residual: residual
            .map(|r| r.contiguous()?.reshape((rows, d_out)))
            .transpose()?,
        relu,
    };
    x.contiguous()?.apply_op3_no_bwd(w, &b.contiguous()?, &op)
}

/// `dst [m, n]` (row-major) `= (dst if accumulate) + lhs [m, k] * rhs [k, n]`; each operand is
/// `(pointer, row stride, column stride)`, run on rayon's threads.
///
/// # Safety
/// Every element the strides address for those sizes must lie inside its allocation.
pub(crate) unsafe fn gemm_into<T: WithDType + 'static>(
    dst: &mut [T],
    accumulate: bool,
    lhs: (*const T, isize, isize),
    rhs: (*const T, isize, isize),
    (m, n, k): (usize, usize, usize),
) {
    assert!(dst.len() >= m * n);
    gemm_raw(dst.as_mut_ptr(), accumulate, lhs, rhs, (m, n, k))
}

/// [`gemm_into`] on a raw destination: without `accumulate` it is only written, so it may be
/// uninitialised.
///
/// # Safety
/// `dst` must be valid for `m * n` writes (and reads, with `accumulate`); the operands as for
/// [`gemm_into`].
unsafe fn gemm_raw<T: WithDType + 'static>(
    dst: *mut T,
    accumulate: bool,
    lhs: (*const T, isize, isize),
    rhs: (*const T, isize, isize),
    (m, n, k): (usize, usize, usize),
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    )
}

/// A matrix operand: `(data, row stride, column stride)`.
pub(crate) type Operand<'a, T> = (&'a [T], usize, usize);

/// Every element of an `r x c` operand lies inside its slice.
fn fits<T>((x, rs, cs): Operand<'_, T>, r: usize, c: usize) -> bool {
    r == 0 || c == 0 || (r - 1) * rs + (c - 1) * cs < x.len()
}

/// `dst [m, n]` (row-major, `dst.len() >= m * n`) `= (dst if accumulate) + a [m, k] b [k, n]`, the
/// operands strided as given; panics if a stride reaches outside its slice.
pub(crate) fn matmul_into<T: WithDType + 'static>(
    dst: &mut [T],
    accumulate: bool,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    (m, n, k): (usize, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n && fits(a, m, k) && fits(b, k, n));
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    // SAFETY: the assert keeps every addressed element inside its slice.
    unsafe {
        gemm_into(
            dst,
            accumulate,
            (a.0.as_ptr(), a.1 as isize, a.2 as isize),
            (b.0.as_ptr(), b.1 as isize, b.2 as isize),
            (m, n, k),
        )
    }
}

/// A new row-major `a [m, k] b [k, n]`, never zero-filled first: the GEMM writes every element.
pub(crate) fn matmul_new<T: WithDType + 'static>(
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    (m, n, k): (usize, usize, usize),
) -> Vec<T> {
    assert!(fits(a, m, k) && fits(b, k, n));
    if m == 0 || n == 0 || k == 0 {
        return vec![T::zero(); m * n];
    }
    let mut dst: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the assert keeps every operand element in bounds; `dst` has room for m * n, which
    // the GEMM (without `accumulate`) writes, all of them, so the length may then be set.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            false,
            (a.0.as_ptr(), a.1 as isize, a.2 as isize),
            (b.0.as_ptr(), b.1 as isize, b.2 as isize),
            (m, n, k),
        );
        dst.set_len(m * n);
    }
    dst
}

/// The backward of `y = x W^T + b` on row-major slices (`g [rows, n]` the gradient of `y`,
/// `x [rows, k]`, `w [n, k]`): writes `dW = g^T x` and `db` = the column sums of `g`, returns
/// `dx = g W` as `[rows, k]`.
pub(crate) fn linear_bwd<T: WithDType + 'static>(
    g: &[T],
    x: &[T],
    w: &[T],
    (rows, n, k): (usize, usize, usize),
    dw: &mut [T],
    db: &mut [T],
) -> Vec<T> {
    matmul_into(dw, false, (g, 1, n), (x, k, 1), (n, k, rows));
    db.copy_from_slice(&col_sums(g, n));
    matmul_new((g, n, 1), (w, k, 1), (rows, k, n))
}

/// Column sums of `x [rows, n]`. Blocks of 64 rows in parallel, the blocks' sums added in order:
/// the same result on any number of threads (a rayon `reduce` would pair them as the work was
/// stolen, and a resumed training run would drift from an uninterrupted one).
pub(crate) fn col_sums<T: WithDType>(x: &[T], n: usize) -> Vec<T> {
    let partials: Vec<Vec<T>> = x
        .par_chunks(n.max(1) * 64)
        .map(|c| {
            let mut s = vec![T::zero(); n];
            for row in c.chunks_exact(n.max(1)) {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    let mut sums = vec![T::zero(); n];
    for p in partials {
        for (a, v) in sums.iter_mut().zip(p) {
            *a += v;
        }
    }
    sums
}

struct LinearOp {
    /// `[rows, out]`, contiguous.
    residual: Option<Tensor>,
    /// `relu` of the output, in place (inference only).
    relu: bool,
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    Ok(&T::cpu_storage_as_slice(s)?[l.start_offset()..])
}

/// `x [rows, k] W^T + b (+ r)` as a new row-major `[rows, n]`: the output starts as `b (+ r)`,
/// written once (never zero-filled first), and the GEMM accumulates into it. `w` is `[n, k]` with
/// strides `sw` (along n, along k); `r` is `[rows, n]` row-major.
pub(crate) fn affine<T: WithDType + 'static>(
    x: &[T],
    (rows, k): (usize, usize),
    w: &[T],
    (n, sw): (usize, [usize; 2]),
    b: &[T],
    residual: Option<&[T]>,
) -> Vec<T> {
    assert!(b.len() >= n && residual.is_none_or(|r| r.len() >= rows * n));
    if residual.is_none() && k > 0 && n > 2 * (k + 1) && rows >= BIAS_COLUMN_ROWS {
        return affine_bias_column(x, (rows, k), w, (n, sw), b);
    }
    let mut dst: Vec<T> = Vec::with_capacity(rows * n);
    dst.spare_capacity_mut()[..rows * n]
        .par_chunks_mut(n.max(1))
        .enumerate()
        .with_min_len(64)
        .for_each(|(i, row)| match residual {
            Some(r) => {
                for ((d, &bj), &rj) in row.iter_mut().zip(b).zip(&r[i * n..(i + 1) * n]) {
                    d.write(bj + rj);
                }
            }
            None => {
                for (d, &bj) in row.iter_mut().zip(b) {
                    d.write(bj);
                }
            }
        });
    // SAFETY: every one of the rows * n elements was written above (b has n elements).
    unsafe { dst.set_len(rows * n) };
    // x [rows, k] row-major; w [n, k] with strides sw, read as w^T [k, n].
    matmul_into(&mut dst, true, (x, k, 1), (w, sw[1], sw[0]), (rows, n, k));
    dst
}

/// Rows from which [`affine`] folds a wide output's bias into the GEMM.
const BIAS_COLUMN_ROWS: usize = 256;

/// [`affine`] without a residual, for outputs much wider than their input (q/k/v, the FFN's
/// hidden): the bias rides in the GEMM as one more input column, ones in `x` and `b` in `w`, so
/// the output is written once by the GEMM. Writing `b` into every row first was a pass over the
/// whole output (25 MiB per layer for the labml-small encoder's q/k/v) where copying `x` with its
/// extra column is a sixth of it.
fn affine_bias_column<T: WithDType + 'static>(
    x: &[T],
    (rows, k): (usize, usize),
    w: &[T],
    (n, sw): (usize, [usize; 2]),
    b: &[T],
) -> Vec<T> {
    let ka = k + 1;
    let mut xa: Vec<T> = Vec::with_capacity(rows * ka);
    xa.spare_capacity_mut()[..rows * ka]
        .par_chunks_mut(ka)
        .zip(x[..rows * k].par_chunks(k.max(1)))
        .with_min_len(64)
        .for_each(|(dst, src)| {
            for (d, &v) in dst.iter_mut().zip(src) {
                d.write(v);
            }
            dst[k].write(T::from_f64(1.0));
        });
    // SAFETY: each row's k inputs and its one were written above.
    unsafe { xa.set_len(rows * ka) };
    // w [n, k] strided, as wa [n, k + 1] row-major with the bias last.
    let wa: Vec<T> = (0..n)
        .flat_map(|j| (0..k).map(move |c| w[j * sw[0] + c * sw[1]]).chain([b[j]]))
        .collect();
    matmul_new((&xa, ka, 1), (&wa, 1, ka), (rows, n, ka))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias-residual"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, kw) = lw.shape().dims2()?;
        let k = lx.dims().last().copied().unwrap_or(0);
        if k != kw || lb.dims() != [n] || !lx.is_contiguous() || !lb.is_contiguous() {
            candle_core::bail!("linear: x {lx:?}, w {lw:?}, b {lb:?} do not fit");
        }
        let mut out_dims = lx.dims().to_vec();
        *out_dims.last_mut().unwrap() = n;
        let res = self.residual.as_ref().map(|r| r.storage_and_layout());
        let res = match &res {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cpu(c) => Some((c, *l)),
                _ => candle_core::bail!("linear: the residual is not on the CPU"),
            },
            None => None,
        };
        let out = dispatch(
            "linear",
            sx,
            Forward {
                s: [sx, sw, sb],
                l: [lx, lw, lb],
                res,
                relu: self.relu,
            },
        )?;
        Ok((out, Shape::from(out_dims)))
    }

    /// `linear_bwd`: dx = dy W, dW = dy^T x, db = the column sums of dy (never with a residual:
    /// `linear` has none).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let (w, dy) = (w.contiguous()?, dy.contiguous()?);
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sg, lg) = dy.storage_and_layout();
        let sx = cpu(&sx)?;
        // Fresh tensors from the slices: the gradients keep no graph (x's activations) alive.
        let (dx, dw, db) = dispatch(
            "linear",
            sx,
            Backward {
                x: (sx, lx),
                w: (cpu(&sw)?, lw),
                dy: (cpu(&sg)?, lg),
                sizes: (rows, n, k),
                like: x,
            },
        )?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The forward at one dtype: `x W^T + b (+ r)`, `w` strided.
struct Forward<'a> {
    s: [&'a CpuStorage; 3],
    l: [&'a Layout; 3],
    res: Option<(&'a CpuStorage, &'a Layout)>,
    relu: bool,
}

impl FloatKernel for Forward<'_> {
    type Output = CpuStorage;
    fn run<T: Float>(self) -> Result<CpuStorage> {
        let (s, l) = (self.s, self.l);
        let r = self.res.map(|(s, l)| slice::<T>(s, l)).transpose()?;
        let (x, w, b) = (
            slice::<T>(s[0], l[0])?,
            slice::<T>(s[1], l[1])?,
            slice::<T>(s[2], l[2])?,
        );
        let k = l[0].dims().last().copied().unwrap_or(0);
        let rows = l[0].shape().elem_count() / k.max(1);
        let (n, sw) = (l[1].dims()[0], l[1].stride());
        let mut y = affine(x, (rows, k), w, (n, [sw[0], sw[1]]), b, r);
        if self.relu {
            crate::elementwise::relu_in_place(&mut y);
        }
        Ok(T::to_cpu_storage_owned(y))
    }
}

/// The backward at one dtype: `(dx, dW, db)`.
struct Backward<'a> {
    x: (&'a CpuStorage, &'a Layout),
    w: (&'a CpuStorage, &'a Layout),
    dy: (&'a CpuStorage, &'a Layout),
    /// `(rows, n, k)`.
    sizes: (usize, usize, usize),
    /// `x`: `dx` takes its shape, all three its device.
    like: &'a Tensor,
}

impl FloatKernel for Backward<'_> {
    type Output = (Tensor, Tensor, Tensor);
    fn run<T: Float>(self) -> Result<Self::Output> {
        let ((rows, n, k), x, dev) = (self.sizes, self.like, self.like.device());
        let (xs, ws, g) = (
            contiguous::<T>(self.x.0, self.x.1)?,
            contiguous::<T>(self.w.0, self.w.1)?,
            contiguous::<T>(self.dy.0, self.dy.1)?,
        );
        let (mut dw, mut db) = (vec![T::default(); n * k], vec![T::default(); n]);
        let dx = linear_bwd(g, xs, ws, (rows, n, k), &mut dw, &mut db);
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, (n, k), dev)?,
            Tensor::from_vec(db, n, dev)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::Var;

    #[test]
    fn linear_values_and_gradients_equal_the_composition() {
        seed(1);
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
            let x = Var::from_tensor(&randn(&[2, 3, 5, 7], dt)).unwrap();
            let w = Var::from_tensor(&randn(&[4, 7], dt)).unwrap();
            let b = Var::from_tensor(&randn(&[4], dt)).unwrap();
            let up = randn(&[2, 3, 5, 4], dt);
            let got = linear(&x, &w, &b).unwrap();
            let want = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            assert_eq!(got.dims(), &[2, 3, 5, 4]);
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(a.dims(), v.dims());
                assert!(max_diff(a, c) < tol, "{dt:?}: gradient of {:?}", v.dims());
            }
        }
    }

    #[test]
    fn column_sums_do_not_depend_on_the_thread_count() {
        let (rows, n) = (20_000, 7);
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 2_654_435_761usize) % 10_007) as f32 / 997.0 - 5.0)
            .collect();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| col_sums(&x, n))
        };
        let one = on(1);
        let exact: Vec<f64> = (0..n)
            .map(|j| (0..rows).map(|i| x[i * n + j] as f64).sum())
            .collect();
        for (a, b) in one.iter().zip(&exact) {
            assert!((*a as f64 - b).abs() < 1e-2 * b.abs().max(1.0));
        }
        for threads in [2, 3, 8] {
            let got = on(threads);
            assert!(
                got.iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads: {got:?} vs {one:?}"
            );
        }
    }

    #[test]
    fn equals_the_composition() {
        seed(2);
        for dt in [DType::F64, DType::F32] {
            let x = randn(&[2, 5, 7], dt);
            // A transposed view, as fused weights or `w.t()` give.
            let w = randn(&[7, 3], dt).t().unwrap();
            let b = randn(&[3], dt);
            let r = randn(&[2, 5, 3], dt);
            let want = (x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                + &r)
                .unwrap();
            let got = linear_inference(&x, &w, &b, Some(&r)).unwrap();
            let diff = max_diff(&got, &want);
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(diff < tol, "{dt:?}: {diff}");
            let no_res = linear_inference(&x, &w, &b, None).unwrap();
            assert!(max_diff(&(no_res + &r).unwrap(), &want) < tol);
            // Enough rows, and an output wide enough, for the bias to ride in the GEMM.
            let (xw, ww) = (randn(&[300, 7], dt), randn(&[20, 7], dt));
            let bw = randn(&[20], dt);
            let want_w = xw
                .matmul(&ww.t().unwrap())
                .unwrap()
                .broadcast_add(&bw)
                .unwrap();
            let got_w = linear_inference(&xw, &ww, &bw, None).unwrap();
            assert!(max_diff(&got_w, &want_w) < tol, "{dt:?} bias column");
            // The ReLU in place: about half of these outputs are negative.
            let relu = linear_relu_inference(&x, &w, &b).unwrap();
            let want = (want - &r).unwrap().relu().unwrap();
            assert!(max_diff(&relu, &want) < tol, "{dt:?} relu");
        }
    }
}
