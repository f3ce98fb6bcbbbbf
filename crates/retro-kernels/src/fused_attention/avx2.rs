//! The f32 tiles of the attention kernel written with AVX2 + FMA intrinsics, for CPUs without
//! AVX-512.
//!
//! Rust never contracts `a * b + c` into an FMA, and the generic tiles' `R x L` accumulators (16
//! `ymm` registers) spill, so LLVM's AVX2 version of them ran at a third of these. A 16-lane block
//! is two `ymm` registers here, and each tile works on half of the `R` rows at a time so that its
//! accumulators, operands and broadcast fit the 16 registers. Same contracts as the generic tiles
//! in `tile.rs`; the caller checks [`crate::isa::avx2_fma`], and each tile asserts the slice
//! lengths with `tile.rs`'s `check_*` (shared with the AVX-512 tiles), outside the hot loops.
#![allow(unsafe_op_in_unsafe_fn)]

use super::tile::{check_exp_row, check_outer, check_pv, check_scores};
use super::{L, R};
use crate::avx2::{exp8, hmax, hsum};
use std::arch::x86_64::*;

/// Rows per half tile.
const H: usize = R / 2;
/// Lanes per register.
const W: usize = 8;

/// See `tile_scores`: `s[r][jb..] = q_r . k[jb..]`, `R` rows, `ncols` a multiple of 16, `kt` in
/// blocks of 16 keys `[.., d, 16]`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_scores(
    qb: &[f32],
    ldd: usize,
    d: usize,
    kt: &[f32],
    ldk: usize,
    ncols: usize,
    s: &mut [f32],
) {
    check_scores(qb, ldd, d, kt, ldk, ncols, s);
    let (k, out) = (kt.as_ptr(), s.as_mut_ptr());
    for half in 0..2 {
        let q = qb.as_ptr().add(half * H * ldd);
        let out = out.add(half * H * ldk);
        for jb in (0..ncols).step_by(L) {
            // 4 rows x 16 keys: 8 independent FMA chains.
            let mut acc = [_mm256_setzero_ps(); 2 * H];
            for c in 0..d {
                let k0 = _mm256_loadu_ps(k.add(jb * d + c * L));
                let k1 = _mm256_loadu_ps(k.add(jb * d + c * L + W));
                for r in 0..H {
                    let qv = _mm256_broadcast_ss(&*q.add(r * ldd + c));
                    acc[2 * r] = _mm256_fmadd_ps(qv, k0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(qv, k1, acc[2 * r + 1]);
                }
            }
            for r in 0..H {
                _mm256_storeu_ps(out.add(r * ldk + jb), acc[2 * r]);
                _mm256_storeu_ps(out.add(r * ldk + jb + W), acc[2 * r + 1]);
            }
        }
    }
}

/// See `tile_pv`: `out[r] = sum_{j < nk} p[r][j] * v[j]`, `ldd` a multiple of 16.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_pv(
    p: &[f32],
    ldk: usize,
    nk: usize,
    v: &[f32],
    ldd: usize,
    out: &mut [f32],
) {
    check_pv(p, ldk, nk, v, ldd, out);
    let vp = v.as_ptr();
    for half in 0..2 {
        let pp = p.as_ptr().add(half * H * ldk);
        let op = out.as_mut_ptr().add(half * H * ldd);
        for cb in (0..ldd).step_by(L) {
            let mut acc = [_mm256_setzero_ps(); 2 * H];
            for j in 0..nk {
                let v0 = _mm256_loadu_ps(vp.add(j * ldd + cb));
                let v1 = _mm256_loadu_ps(vp.add(j * ldd + cb + W));
                for r in 0..H {
                    let pr = _mm256_broadcast_ss(&*pp.add(r * ldk + j));
                    acc[2 * r] = _mm256_fmadd_ps(pr, v0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(pr, v1, acc[2 * r + 1]);
                }
            }
            for r in 0..H {
                _mm256_storeu_ps(op.add(r * ldd + cb), acc[2 * r]);
                _mm256_storeu_ps(op.add(r * ldd + cb + W), acc[2 * r + 1]);
            }
        }
    }
}

/// See `tile_outer`: `acc[j] += sum_r w[r][j] * x[r]` for `j < nk`, `ldd` a multiple of 16.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_outer(
    w: &[f32],
    ldk: usize,
    nk: usize,
    x: &[f32],
    ldd: usize,
    acc: &mut [f32],
) {
    check_outer(w, ldk, nk, x, ldd, acc);
    let ap = acc.as_mut_ptr();
    for half in 0..2 {
        let wp = w.as_ptr().add(half * H * ldk);
        let xp = x.as_ptr().add(half * H * ldd);
        for cb in (0..ldd).step_by(L) {
            let mut xs = [_mm256_setzero_ps(); 2 * H];
            for r in 0..H {
                xs[2 * r] = _mm256_loadu_ps(xp.add(r * ldd + cb));
                xs[2 * r + 1] = _mm256_loadu_ps(xp.add(r * ldd + cb + W));
            }
            // Two keys at a time: four independent FMA chains of 4 rows each.
            let mut j = 0;
            while j + 2 <= nk {
                let rows = [ap.add(j * ldd + cb), ap.add((j + 1) * ldd + cb)];
                let mut a = [
                    _mm256_loadu_ps(rows[0]),
                    _mm256_loadu_ps(rows[0].add(W)),
                    _mm256_loadu_ps(rows[1]),
                    _mm256_loadu_ps(rows[1].add(W)),
                ];
                for r in 0..H {
                    let w0 = _mm256_broadcast_ss(&*wp.add(r * ldk + j));
                    let w1 = _mm256_broadcast_ss(&*wp.add(r * ldk + j + 1));
                    a[0] = _mm256_fmadd_ps(w0, xs[2 * r], a[0]);
                    a[1] = _mm256_fmadd_ps(w0, xs[2 * r + 1], a[1]);
                    a[2] = _mm256_fmadd_ps(w1, xs[2 * r], a[2]);
                    a[3] = _mm256_fmadd_ps(w1, xs[2 * r + 1], a[3]);
                }
                _mm256_storeu_ps(rows[0], a[0]);
                _mm256_storeu_ps(rows[0].add(W), a[1]);
                _mm256_storeu_ps(rows[1], a[2]);
                _mm256_storeu_ps(rows[1].add(W), a[3]);
                j += 2;
            }
            if j < nk {
                let row = ap.add(j * ldd + cb);
                let (mut a0, mut a1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(W)));
                for r in 0..H {
                    let w0 = _mm256_broadcast_ss(&*wp.add(r * ldk + j));
                    a0 = _mm256_fmadd_ps(w0, xs[2 * r], a0);
                    a1 = _mm256_fmadd_ps(w0, xs[2 * r + 1], a1);
                }
                _mm256_storeu_ps(row, a0);
                _mm256_storeu_ps(row.add(W), a1);
            }
        }
    }
}

/// The largest of `s` (`s` not empty).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn row_max(s: &[f32]) -> f32 {
    let chunks = s.chunks_exact(W);
    let tail = chunks.remainder();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for ch in chunks {
        m = _mm256_max_ps(m, _mm256_loadu_ps(ch.as_ptr()));
    }
    tail.iter().fold(hmax(m), |b, &x| if x > b { x } else { b })
}

/// See `exp_row`: `s[j] = exp(s[j] - shift)` for `j < lim`, 0 up to `end` (a multiple of 16);
/// returns the sum.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_row(s: &mut [f32], lim: usize, end: usize, shift: f32) -> f32 {
    check_exp_row(s, lim, end);
    let p = s.as_mut_ptr();
    let sh = _mm256_set1_ps(shift);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut sum = [_mm256_setzero_ps(); 2];
    let mut j = 0;
    // Whole 16-lane blocks up to `end` (in bounds); lanes at or past `lim` are zeroed. Two
    // registers a step: exp8 is one long dependent chain, and two interleaved keep both FMA
    // pipes busy.
    while j < lim {
        for (u, acc) in sum.iter_mut().enumerate() {
            let at = j + u * W;
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(at)), sh));
            let left = lim.saturating_sub(at).min(W) as i32;
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);
            let e = _mm256_and_ps(e, _mm256_castsi256_ps(keep));
            _mm256_storeu_ps(p.add(at), e);
            *acc = _mm256_add_ps(*acc, e);
        }
        j += L;
    }
    let sum = _mm256_add_ps(sum[0], sum[1]);
    while j < end {
        _mm256_storeu_ps(p.add(j), _mm256_setzero_ps());
        j += W;
    }
    hsum(sum)
}
