//! The f32 tiles of the attention kernel written with AVX-512 intrinsics.
//!
//! LLVM's auto-vectoriser keeps the generic tiles' accumulators in registers only when the code is
//! just so (FMA contraction made it spill them); here each accumulator is one `zmm` register and
//! every multiply-add one FMA. Same contracts as the generic tiles in `tile.rs`; the caller checks
//! [`crate::isa::avx512f`], and each tile asserts the slice lengths with `tile.rs`'s `check_*`
//! (shared with the AVX2 tiles), outside the hot loops.
#![allow(unsafe_op_in_unsafe_fn)]

use super::tile::{check_exp_row, check_outer, check_pv, check_scores};
use super::{L, R};
use std::arch::x86_64::*;

/// See `tile_scores`: `s[r][jb..] = q_r . k[jb..]`, `R` rows, `ncols` a multiple of 16, `kt` in
/// blocks of 16 keys `[.., d, 16]`.
#[target_feature(enable = "avx512f")]
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
    let (q, k, out) = (qb.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    let mut jb = 0;
    // Two column blocks: 2 R independent FMA chains.
    while jb + 2 * L <= ncols {
        let mut acc = [_mm512_setzero_ps(); 2 * R];
        for c in 0..d {
            let k0 = _mm512_loadu_ps(k.add(jb * d + c * L));
            let k1 = _mm512_loadu_ps(k.add((jb + L) * d + c * L));
            for r in 0..R {
                let qv = _mm512_set1_ps(*q.add(r * ldd + c));
                acc[2 * r] = _mm512_fmadd_ps(qv, k0, acc[2 * r]);
                acc[2 * r + 1] = _mm512_fmadd_ps(qv, k1, acc[2 * r + 1]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out.add(r * ldk + jb), acc[2 * r]);
            _mm512_storeu_ps(out.add(r * ldk + jb + L), acc[2 * r + 1]);
        }
        jb += 2 * L;
    }
    if jb < ncols {
        let mut acc = [_mm512_setzero_ps(); R];
        for c in 0..d {
            let k0 = _mm512_loadu_ps(k.add(jb * d + c * L));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(r * ldd + c)), k0, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ldk + jb), *a);
        }
    }
}

/// See `tile_pv`: `out[r] = sum_{j < nk} p[r][j] * v[j]`, `ldd` a multiple of 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_pv(
    p: &[f32],
    ldk: usize,
    nk: usize,
    v: &[f32],
    ldd: usize,
    out: &mut [f32],
) {
    check_pv(p, ldk, nk, v, ldd, out);
    let (pp, vp, op) = (p.as_ptr(), v.as_ptr(), out.as_mut_ptr());
    for cb in (0..ldd).step_by(L) {
        // Even and odd keys in separate accumulators: 2 R independent FMA chains.
        let mut acc = [_mm512_setzero_ps(); 2 * R];
        let mut j = 0;
        while j + 2 <= nk {
            let v0 = _mm512_loadu_ps(vp.add(j * ldd + cb));
            let v1 = _mm512_loadu_ps(vp.add((j + 1) * ldd + cb));
            for r in 0..R {
                let p0 = _mm512_set1_ps(*pp.add(r * ldk + j));
                let p1 = _mm512_set1_ps(*pp.add(r * ldk + j + 1));
                acc[2 * r] = _mm512_fmadd_ps(p0, v0, acc[2 * r]);
                acc[2 * r + 1] = _mm512_fmadd_ps(p1, v1, acc[2 * r + 1]);
            }
            j += 2;
        }
        if j < nk {
            let v0 = _mm512_loadu_ps(vp.add(j * ldd + cb));
            for r in 0..R {
                let p0 = _mm512_set1_ps(*pp.add(r * ldk + j));
                acc[2 * r] = _mm512_fmadd_ps(p0, v0, acc[2 * r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(
                op.add(r * ldd + cb),
                _mm512_add_ps(acc[2 * r], acc[2 * r + 1]),
            );
        }
    }
}

/// See `tile_outer`: `acc[j] += sum_r w[r][j] * x[r]` for `j < nk`, `ldd` a multiple of 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_outer(
    w: &[f32],
    ldk: usize,
    nk: usize,
    x: &[f32],
    ldd: usize,
    acc: &mut [f32],
) {
    check_outer(w, ldk, nk, x, ldd, acc);
    let (wp, xp, ap) = (w.as_ptr(), x.as_ptr(), acc.as_mut_ptr());
    for cb in (0..ldd).step_by(L) {
        let mut xs = [_mm512_setzero_ps(); R];
        for (r, xr) in xs.iter_mut().enumerate() {
            *xr = _mm512_loadu_ps(xp.add(r * ldd + cb));
        }
        // Four keys at a time: four independent FMA chains instead of one (latency-bound) chain.
        let mut j = 0;
        while j + 4 <= nk {
            let rows = [0, 1, 2, 3].map(|u| ap.add((j + u) * ldd + cb));
            let mut a = rows.map(|p| _mm512_loadu_ps(p));
            for (r, xr) in xs.iter().enumerate() {
                let wr = wp.add(r * ldk + j);
                for (u, au) in a.iter_mut().enumerate() {
                    *au = _mm512_fmadd_ps(_mm512_set1_ps(*wr.add(u)), *xr, *au);
                }
            }
            for (p, au) in rows.into_iter().zip(a) {
                _mm512_storeu_ps(p, au);
            }
            j += 4;
        }
        for j in j..nk {
            let row = ap.add(j * ldd + cb);
            let mut a = _mm512_loadu_ps(row);
            for (r, xr) in xs.iter().enumerate() {
                a = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(r * ldk + j)), *xr, a);
            }
            _mm512_storeu_ps(row, a);
        }
    }
}

/// Lanes `< n` of a 16-lane block.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= L {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// The largest of `s[..lim]` (`lim > 0`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn row_max(s: &[f32]) -> f32 {
    let p = s.as_ptr();
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j < s.len() {
        let x = _mm512_mask_loadu_ps(m, lanes(s.len() - j), p.add(j));
        m = _mm512_max_ps(m, x);
        j += L;
    }
    _mm512_reduce_max_ps(m)
}

/// `exp(x)` for 16 lanes (Cephes' polynomial, as the generic `exp_`; 2^n applied by `scalef`).
#[target_feature(enable = "avx512f")]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(crate::gelu::EXP_POLY[0]);
    for &c in &crate::gelu::EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(y, n)
}

/// See `exp_row`: `s[j] = exp(s[j] - shift)` for `j < lim`, 0 up to `end` (a multiple of 16);
/// returns the sum.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_row(s: &mut [f32], lim: usize, end: usize, shift: f32) -> f32 {
    check_exp_row(s, lim, end);
    let p = s.as_mut_ptr();
    let sh = _mm512_set1_ps(shift);
    let mut sum = _mm512_setzero_ps();
    let mut j = 0;
    while j < lim {
        let m = lanes(lim - j);
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(j)), sh));
        let e = _mm512_maskz_mov_ps(m, e);
        _mm512_storeu_ps(p.add(j), e);
        sum = _mm512_add_ps(sum, e);
        j += L;
    }
    while j < end {
        _mm512_storeu_ps(p.add(j), _mm512_setzero_ps());
        j += L;
    }
    _mm512_reduce_add_ps(sum)
}

/// See `load_t`: keys `0..nk` of one head, `ss` elements apart from `x[at..]`, transposed in blocks
/// of `L` keys into `dst [.., d, L]`, each block's feature `c` one gather of its `L` keys (the
/// scalar scatter was a fifth of the encoder's attention, whose heads hold 32 keys). Lanes past
/// `nk` are left as they are.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn load_t(x: &[f32], at: usize, ss: usize, nk: usize, d: usize, dst: &mut [f32]) {
    if nk == 0 || d == 0 {
        return;
    }
    assert!(
        at + (nk - 1) * ss + d <= x.len() && dst.len() >= nk.div_ceil(L) * d * L,
        "load_t: keys or destination out of bounds"
    );
    assert!(
        (L - 1) * ss <= i32::MAX as usize,
        "load_t: row stride too large to gather"
    );
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(ss as i32),
    );
    let (xp, dp) = (x.as_ptr(), dst.as_mut_ptr());
    let mut jb = 0;
    while jb < nk {
        let m = lanes(nk - jb);
        let (src, out) = (xp.add(at + jb * ss), dp.add(jb * d));
        for c in 0..d {
            // SAFETY (bounds): lane i reads x[at + (jb + i) ss + c], i < nk - jb, asserted above.
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, idx, src.add(c));
            _mm512_mask_storeu_ps(out.add(c * L), m, v);
        }
        jb += L;
    }
}
