//! The forward: per head and block of query rows, scores, softmax and `P V`, keeping the log-sum-exp.

use super::layout::{round_up, Dims, SendPtr, View};
use super::tile::{exp_row, load_rows, load_t, row_max, scratch, tile_pv, tile_scores, Scratch};
use super::{L, R};
use crate::float::Float;
use crate::isa::multiversioned;
use rayon::prelude::*;

struct FwdArgs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    qv: View,
    kv: View,
    vv: View,
    dims: Dims,
    out: &'a SendPtr<T>,
    /// Where the rows' log-sum-exp go, when the backward will need them.
    lse: Option<&'a SendPtr<T>>,
}

/// One forward task: head `n`, query rows `r0..r1`.
#[inline(always)]
fn fwd_task_body<T: Float>(
    a: &FwdArgs<'_, T>,
    n: usize,
    r0: usize,
    r1: usize,
    sc: &mut Scratch<T>,
) {
    let Dims { d, .. } = a.dims;
    let ldd = round_up(d, L);
    let nk = a.dims.lim(r1 - 1);
    let ldk = round_up(nk.max(1), L);
    let padded = ldd != d || ldk != nk;
    // Short heads (the encoder's 32 rows): ask for the next head's rows now. Each row of a head
    // is one line of a wide projection row, so rows sit a page apart and the hardware's
    // prefetchers miss them; the copies below waited on memory for a sixth of this task.
    if r0 == 0 && r1 == a.dims.sq && nk <= 4 * L && n + 1 < a.dims.nh {
        ask_rows(a.q, &a.qv, n + 1, r1, d);
        ask_rows(a.k, &a.kv, n + 1, nk, d);
        ask_rows(a.v, &a.vv, n + 1, nk, d);
    }
    let kt = scratch(&mut sc.a, d * ldk, padded);
    load_t(a.k, &a.kv, n, nk, d, ldk, kt);
    let vb = scratch(&mut sc.b, nk * ldd, padded);
    load_rows(a.v, &a.vv, n, 0..nk, d, ldd, vb);
    let qb = scratch(&mut sc.c, R * ldd, padded);
    let s = scratch(&mut sc.d, R * ldk, padded);
    let ob = scratch(&mut sc.e, R * ldd, padded);
    let mut i0 = r0;
    while i0 < r1 {
        let rows = (r1 - i0).min(R);
        if padded || rows < R {
            qb.fill(T::zero());
        }
        load_rows(a.q, &a.qv, n, i0..i0 + rows, d, ldd, qb);
        let lmax = a.dims.lim(i0 + rows - 1);
        let ncols = round_up(lmax.max(1), L);
        tile_scores(qb, ldd, d, kt, ldk, ncols, s);
        let mut sums = [T::zero(); R];
        for r in 0..R {
            let lim = if r < rows { a.dims.lim(i0 + r) } else { 0 };
            let row = &mut s[r * ldk..r * ldk + ncols];
            let m = if lim > 0 {
                row_max(&row[..lim])
            } else {
                T::zero()
            };
            sums[r] = exp_row(row, lim, ncols, m);
            if let (true, Some(lse_out)) = (r < rows, a.lse) {
                let lse = if sums[r] > T::zero() {
                    m + sums[r].ln_()
                } else {
                    T::NEG_INF
                };
                // SAFETY: row (n, i0 + r) belongs to this task only.
                unsafe { lse_out.slice(n * a.dims.sq + i0 + r, 1)[0] = lse };
            }
        }
        tile_pv(s, ldk, lmax, vb, ldd, ob);
        for r in 0..rows {
            let inv = if sums[r] > T::zero() {
                T::one() / sums[r]
            } else {
                T::zero()
            };
            // SAFETY: output row (n, i0 + r) belongs to this task only.
            let dst = unsafe { a.out.uninit(a.dims.out_row(n, i0 + r), d) };
            for (o, &x) in dst.iter_mut().zip(&ob[r * ldd..r * ldd + d]) {
                o.write(x * inv);
            }
        }
        i0 += rows;
    }
}

/// Prefetches rows `0..rows` of head `n` of `x`.
#[inline(always)]
fn ask_rows<T>(x: &[T], vw: &View, n: usize, rows: usize, d: usize) {
    for i in 0..rows {
        let at = vw.row(n, i);
        if at < x.len() {
            crate::isa::prefetch(x[at..].as_ptr() as *const u8, d * std::mem::size_of::<T>());
        }
    }
}

multiversioned!(
    /// [`fwd_task_body`] compiled for the widest instruction set the CPU has.
    fn fwd_task<T: Float>(a: &FwdArgs<'_, T>, n: usize, r0: usize, r1: usize, sc: &mut Scratch<T>) => fwd_task_body
);

/// The output as contiguous `[b, sq, h, d]` and, with `want_lse`, the rows' log-sum-exp `[b*h, sq]`.
pub(crate) fn forward_cpu<T: Float>(
    [q, k, v]: [&[T]; 3],
    [qv, kv, vv]: [View; 3],
    dims: Dims,
    want_lse: bool,
) -> (Vec<T>, Vec<T>) {
    // Never zero-filled: the tasks write every row of every head (8 MiB a layer for the
    // labml-small encoder).
    let len = dims.nh * dims.sq * dims.d;
    let mut out: Vec<T> = Vec::with_capacity(len);
    let mut lse = vec![T::NEG_INF; if want_lse { dims.nh * dims.sq } else { 0 }];
    let (op, lp) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let args = FwdArgs {
        q,
        k,
        v,
        qv,
        kv,
        vv,
        dims,
        out: &op,
        lse: want_lse.then_some(&lp),
    };
    // Enough tasks to keep every thread busy even with a handful of heads.
    let want = 8 * rayon::current_num_threads();
    let per_head = want.div_ceil(dims.nh.max(1)).max(1);
    let rb = round_up(dims.sq.div_ceil(per_head).max(16), R).min(dims.sq.max(1));
    let blocks = dims.sq.div_ceil(rb);
    (0..dims.nh * blocks)
        .into_par_iter()
        .with_min_len(if blocks == 1 { 16 } else { 1 })
        .for_each_init(Scratch::<T>::default, |sc, t| {
            let (n, blk) = (t / blocks, t % blocks);
            let r0 = blk * rb;
            let r1 = (r0 + rb).min(dims.sq);
            if r0 < r1 {
                fwd_task(&args, n, r0, r1, sc);
            }
        });
    // SAFETY: the tasks cover rows 0..sq of every head, and `fwd_task` writes all `d` features
    // of each of its rows (`out_row` maps them onto `[b, sq, h, d]` one to one).
    unsafe { out.set_len(len) };
    (out, lse)
}
