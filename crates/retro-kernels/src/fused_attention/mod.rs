//! Fused scaled-dot-product attention: `softmax(q k^T + mask) v` in one pass per query row, without
//! materialising the `[n, sq, sk]` score tensor, on CPU (f32 and f64), with a backward.
//!
//! The CPU kernel is a candle [`CustomOp3`] in plain Rust, parallelised with rayon over heads (and over
//! row blocks when there are few heads). Per head it copies K transposed (`[d, sk]`) and V (`[sk, d]`),
//! both zero-padded to multiples of `L`, then works on tiles of `R` query rows: scores as an
//! `R x L` register tile, the softmax on the row (at most `sk` values: they stay in L1), and `P V` as an
//! `R x L` tile over features. The row is the streaming unit: its max, sum and log-sum-exp are kept per
//! row, and the log-sum-exp is saved for the backward, which recomputes `P` from it
//! (`dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`, `dQ = dS K`, `dK = dS^T Q`).
//! Causal rows only touch the keys they may see, so a causal attention does half the work.
//!
//! The kernel reads strided inputs (only the feature dim must be contiguous): heads can be passed as
//! `[b, h, s, d]` views of a `[b, s, h, d]` projection, and the output is written as `[b, s, h, d]`, the
//! layout the output projection wants. [`attention_heads`] is that interface; [`attention`] is the plain
//! `[n, s, d]` one. Other devices and dtypes use the matmul + softmax composition.
//!
//! [`CustomOp3`]: candle_core::CustomOp3

use crate::kernels::Kernels;
use candle_core::{DType, Device, Result, Tensor};
use op::FusedAttention;
use std::sync::Arc;

pub(crate) use backward::backward_into;
pub(crate) use forward::forward_cpu;
pub(crate) use layout::{Dims, View};

/// Query rows per micro-tile (8 rather than 4: K and V rows loaded once serve twice the queries, and
/// dK/dV accumulate half as often; attention forward and backward 15-25% faster on labml-small).
const R: usize = 8;
/// Lanes per micro-tile: keys in the score tile, features in the `P V` tile. Buffers are padded to it.
const L: usize = 16;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod backward;
mod forward;
mod layout;
mod op;
mod tile;

/// `softmax(q k^T + mask) v` for `q [n, sq, d]`, `k, v [n, sk, d]` (q already scaled), `[n, sq, d]`.
/// With `causal_offset = Some(o)` query i sees key j iff `j <= i + o`. Differentiable.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
) -> Result<Tensor> {
    let (n, sq, d) = q.dims3()?;
    let out = attention_heads(
        &q.unsqueeze(1)?,
        &k.unsqueeze(1)?,
        &v.unsqueeze(1)?,
        causal_offset,
        Kernels::Differentiable,
    )?;
    out.reshape((n, sq, d))
}

/// Multi-head form: `q [b, h, sq, d]`, `k, v [b, h, sk, d]` with any strides (typically transposed
/// views of `[b, s, h, d]` projections) -> `[b, sq, h, d]` contiguous, i.e. heads already merged for
/// a reshape to `[b, sq, h*d]`. `kern = Fused` records no backward (inference).
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
    kern: Kernels,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (kb, kh, _, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let cpu_ok = matches!(q.device(), Device::Cpu)
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if !cpu_ok {
        return fallback(q, k, v, causal_offset, kern);
    }
    let unit = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[3] == 1 || t.dim(3)? <= 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (unit(q)?, unit(k)?, unit(v)?);
    match kern {
        Kernels::Fused => q.apply_op3_no_bwd(&k, &v, &FusedAttention::new(causal_offset, false)),
        Kernels::Differentiable => q.apply_op3_arc(
            &k,
            &v,
            Arc::new(Box::new(FusedAttention::new(causal_offset, true))),
        ),
    }
}

/// The composition of tensor ops the kernel replaces (any device), same shapes as [`attention_heads`].
pub fn fallback(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
    kern: Kernels,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut s = q.matmul(&k.t()?)?;
    if let Some(off) = causal_offset {
        let (sq, sk) = (q.dim(2)?, k.dim(2)?);
        let mask: Vec<f32> = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| if j <= i + off { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (sq, sk), q.device())?.to_dtype(q.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    kern.softmax(&s)?.matmul(&v)?.transpose(1, 2)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::Var;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, off: Option<usize>) -> Result<Tensor> {
        // [n, s, d] through the fallback's formula.
        let out = fallback(
            &q.unsqueeze(1)?,
            &k.unsqueeze(1)?,
            &v.unsqueeze(1)?,
            off,
            Kernels::Differentiable,
        )?;
        out.squeeze(2)
    }

    fn check(n: usize, sq: usize, sk: usize, d: usize, off: Option<usize>, dtype: DType, tol: f64) {
        let r = |s: usize| Var::from_tensor(&randn(&[n, s, d], dtype)).unwrap();
        let (q, k, v) = (r(sq), r(sk), r(sk));
        let w = randn(&[n, sq, d], dtype);
        let got = attention(&q, &k, &v, off).unwrap();
        let want = reference(&q, &k, &v, off).unwrap();
        assert!(
            max_diff(&got, &want) < tol,
            "values {n} {sq} {sk} {d} {off:?}"
        );
        let g1 = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (g1.get(x).unwrap(), g2.get(x).unwrap());
            assert_eq!(a.dims(), b.dims());
            // Gradients sum over up to sq * d products: both sides round in proportion to their size
            // (random inputs reach |dq| ~ 10 in f32), so the bound scales with the largest entry.
            let scale = 1.0 + max_diff(b, &b.zeros_like().unwrap());
            let diff = max_diff(a, b);
            assert!(
                diff < tol * scale,
                "d{name} {n} {sq} {sk} {d} {off:?}: {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn matches_the_tensor_formula_f64() {
        seed(1);
        for &(n, sq, sk, d) in &[
            (3, 7, 7, 5),
            (2, 33, 33, 16),
            (5, 16, 40, 16),
            (1, 1, 9, 8),
            (70, 4, 3, 17),
            // No padding anywhere (scratch reused unzeroed across heads).
            (40, 32, 32, 16),
            (20, 16, 64, 16),
        ] {
            check(n, sq, sk, d, None, DType::F64, 1e-12);
            if sk >= sq {
                check(n, sq, sk, d, Some(sk - sq), DType::F64, 1e-12);
            }
            check(n, sq, sk, d, Some(0), DType::F64, 1e-12);
            check(n, sq, sk, d, Some(2), DType::F64, 1e-12);
        }
    }

    #[test]
    fn matches_the_tensor_formula_f32() {
        seed(2);
        // On AVX-512 and AVX2 machines these run the hand-vectorised tiles: odd widths, odd key counts
        // and rows that end inside a 16-lane block included.
        for &(n, sq, sk, d) in &[(3, 7, 7, 5), (2, 33, 33, 16), (1, 1, 9, 8), (70, 4, 3, 17)] {
            check(n, sq, sk, d, None, DType::F32, 1e-5);
            check(n, sq, sk, d, Some(0), DType::F32, 1e-5);
            check(n, sq, sk, d, Some(2), DType::F32, 1e-5);
        }
        check(4, 50, 50, 16, Some(0), DType::F32, 1e-5);
        check(3, 20, 37, 16, None, DType::F32, 1e-5);
        check(2, 3, 70, 32, Some(67), DType::F32, 1e-5);
        // No padding anywhere (scratch reused unzeroed across heads).
        check(40, 32, 32, 16, None, DType::F32, 1e-5);
        check(40, 32, 32, 16, Some(0), DType::F32, 1e-5);
        check(20, 16, 64, 16, None, DType::F32, 1e-5);
    }

    #[test]
    fn strided_heads_in_and_merged_heads_out() {
        seed(3);
        let (b, s, h, d) = (2, 19, 3, 8);
        let x = randn(&[b, s, 3, h, d], DType::F64);
        let part = |i: usize| {
            x.narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        for kern in [Kernels::Fused, Kernels::Differentiable] {
            let got = attention_heads(&q, &k, &v, Some(0), kern).unwrap();
            let want = fallback(&q, &k, &v, Some(0), kern).unwrap();
            assert_eq!(got.dims(), &[b, s, h, d]);
            assert!(max_diff(&got, &want) < 1e-12);
        }
    }
}
