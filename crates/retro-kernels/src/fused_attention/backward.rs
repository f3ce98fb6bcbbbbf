//! The backward: recomputes `P` from the saved log-sum-exp and writes dQ, dK and dV per head.

use super::layout::{round_up, Dims, SendPtr, View};
use super::tile::{
    dot, exp_row, load_rows, load_t, scratch, tile_outer, tile_pv, tile_scores, zeroed, Scratch,
};
use super::{L, R};
use crate::float::Float;
use crate::isa::multiversioned;
use rayon::prelude::*;

struct BwdArgs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    o: &'a [T],
    go: &'a [T],
    lse: &'a [T],
    qv: View,
    kv: View,
    vv: View,
    ov: View,
    gov: View,
    dims: Dims,
    dq: &'a SendPtr<T>,
    dk: &'a SendPtr<T>,
    dv: &'a SendPtr<T>,
    /// Where the rows of dQ, dK and dV go.
    dst: [View; 3],
}

/// Backward of head `n`, all rows.
#[inline(always)]
fn bwd_task_body<T: Float>(a: &BwdArgs<'_, T>, n: usize, sc: &mut Scratch<T>) {
    let Dims { d, sq, .. } = a.dims;
    let ldd = round_up(d, L);
    let nk = a.dims.lim(sq.max(1) - 1).min(a.dims.sk);
    let ldk = round_up(nk.max(1), L);
    let sqp = round_up(sq, R);
    let padded = ldd != d || ldk != nk || sqp != sq;
    let qb = scratch(&mut sc.a, sqp * ldd, padded);
    load_rows(a.q, &a.qv, n, 0..sq, d, ldd, qb);
    let gob = scratch(&mut sc.b, sqp * ldd, padded);
    load_rows(a.go, &a.gov, n, 0..sq, d, ldd, gob);
    let kb = scratch(&mut sc.c, nk * ldd, padded);
    load_rows(a.k, &a.kv, n, 0..nk, d, ldd, kb);
    let kt = scratch(&mut sc.d, d * ldk, padded);
    load_t(a.k, &a.kv, n, nk, d, ldk, kt);
    let vt = scratch(&mut sc.e, d * ldk, padded);
    load_t(a.v, &a.vv, n, nk, d, ldk, vt);
    // dK and dV accumulate over all rows: [nk, ldd]; p and ds tiles [R, ldk] side by side.
    let dkv = zeroed(&mut sc.f, 2 * nk * ldd);
    let (dk, dv) = dkv.split_at_mut(nk * ldd);
    let pd = scratch(&mut sc.g, 2 * R * ldk, padded);
    let (p, ds) = pd.split_at_mut(R * ldk);
    let dqb = scratch(&mut sc.h, R * ldd, padded);
    for i0 in (0..sq).step_by(R) {
        let rows = (sq - i0).min(R);
        let qt = &qb[i0 * ldd..(i0 + R) * ldd];
        let got = &gob[i0 * ldd..(i0 + R) * ldd];
        let lmax = a.dims.lim(i0 + rows - 1);
        let ncols = round_up(lmax.max(1), L);
        tile_scores(qt, ldd, d, kt, ldk, ncols, p);
        tile_scores(got, ldd, d, vt, ldk, ncols, ds);
        for r in 0..R {
            let (lim, lse, delta) = if r < rows {
                let i = i0 + r;
                let (at, ot) = (a.gov.row(n, i), a.ov.row(n, i));
                let delta = dot(&a.go[at..at + d], &a.o[ot..ot + d]);
                (a.dims.lim(i), a.lse[n * sq + i], delta)
            } else {
                (0, T::zero(), T::zero())
            };
            let lim = if lse == T::NEG_INF { 0 } else { lim };
            let prow = &mut p[r * ldk..r * ldk + ncols];
            exp_row(prow, lim, ncols, lse);
            let dsrow = &mut ds[r * ldk..r * ldk + ncols];
            for (x, &pj) in dsrow.iter_mut().zip(prow.iter()) {
                *x = pj * (*x - delta);
            }
        }
        tile_pv(ds, ldk, lmax, kb, ldd, dqb);
        tile_outer(ds, ldk, lmax, qt, ldd, dk);
        tile_outer(p, ldk, lmax, got, ldd, dv);
        for r in 0..rows {
            // SAFETY: rows of head n belong to this task only.
            let dst = unsafe { a.dq.slice(a.dst[0].row(n, i0 + r), d) };
            dst.copy_from_slice(&dqb[r * ldd..r * ldd + d]);
        }
    }
    let sk = a.dims.sk;
    for j in 0..sk {
        // SAFETY: rows of head n belong to this task only.
        let (gk, gv) = unsafe {
            (
                a.dk.slice(a.dst[1].row(n, j), d),
                a.dv.slice(a.dst[2].row(n, j), d),
            )
        };
        if j < nk {
            gk.copy_from_slice(&dk[j * ldd..j * ldd + d]);
            gv.copy_from_slice(&dv[j * ldd..j * ldd + d]);
        } else {
            gk.fill(T::zero());
            gv.fill(T::zero());
        }
    }
}

multiversioned!(
    /// [`bwd_task_body`] compiled for the widest instruction set the CPU has.
    fn bwd_task<T: Float>(a: &BwdArgs<'_, T>, n: usize, sc: &mut Scratch<T>) => bwd_task_body
);

pub(super) type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// The backward into `dq, dk, dv` at the rows `dst` gives.
///
/// # Safety
/// `dq`, `dk`, `dv` must be valid for writes at every row `dst` addresses for `dims`, and no two
/// rows may overlap.
unsafe fn backward_raw<T: Float>(
    [q, k, v, o, go]: [&[T]; 5],
    lse: &[T],
    [qv, kv, vv, ov, gov]: [View; 5],
    dims: Dims,
    [dq, dk, dv]: [SendPtr<T>; 3],
    dst: [View; 3],
) {
    let args = BwdArgs {
        q,
        k,
        v,
        o,
        go,
        lse,
        qv,
        kv,
        vv,
        ov,
        gov,
        dims,
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dst,
    };
    (0..dims.nh)
        .into_par_iter()
        .with_min_len(16)
        .for_each_init(Scratch::<T>::default, |sc, n| {
            if dims.sq > 0 {
                bwd_task(&args, n, sc);
            }
        });
}

/// dQ, dK, dV as contiguous `[b, s, h, d]`.
pub(super) fn backward_cpu<T: Float>(
    src: [&[T]; 5],
    lse: &[T],
    views: [View; 5],
    dims: Dims,
) -> Grads<T> {
    let mut dq = vec![T::zero(); dims.nh * dims.sq * dims.d];
    let mut dk = vec![T::zero(); dims.nh * dims.sk * dims.d];
    let mut dv = vec![T::zero(); dims.nh * dims.sk * dims.d];
    let (h, d) = (dims.heads, dims.d);
    let merged = |s: usize| View::new(0, s * h * d, h * d, h, d);
    let ptrs = [&mut dq, &mut dk, &mut dv].map(|x| SendPtr(x.as_mut_ptr()));
    // SAFETY: each buffer is one contiguous [b, s, h, d] tensor, the layout `merged` addresses.
    unsafe {
        backward_raw(
            src,
            lse,
            views,
            dims,
            ptrs,
            [merged(dims.sq), merged(dims.sk), merged(dims.sk)],
        )
    };
    (dq, dk, dv)
}

/// The backward into one buffer: the rows of dQ, dK and dV go where `dst` says (rows the views
/// skip are left as they are). Panics if a view reaches outside `out`.
///
/// # Safety
/// No two rows the three views address for `dims` may overlap: heads are written in parallel.
pub(crate) unsafe fn backward_into<T: Float>(
    src: [&[T]; 5],
    lse: &[T],
    views: [View; 5],
    dims: Dims,
    out: &mut [T],
    dst: [View; 3],
) {
    let groups = dims.nh / dims.heads.max(1);
    for (vw, rows) in dst.iter().zip([dims.sq, dims.sk, dims.sk]) {
        assert!(vw.heads == dims.heads && vw.end(groups * vw.heads, rows, dims.d) <= out.len());
    }
    let p = out.as_mut_ptr();
    // SAFETY: the asserts keep every addressed row inside `out`; the caller vouches that no two
    // overlap.
    unsafe {
        backward_raw(
            src,
            lse,
            views,
            dims,
            [SendPtr(p), SendPtr(p), SendPtr(p)],
            dst,
        )
    }
}
