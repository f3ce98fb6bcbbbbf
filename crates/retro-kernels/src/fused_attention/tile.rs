//! The micro-kernels on padded per-head buffers: score, `P V` and outer-product tiles, row max and
//! exp, and the per-thread scratch the heads are copied into.

use super::layout::View;
use super::{L, R};
use crate::float::Float;

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};

/// Runs `$simd` (the `avx512` or `avx2` tile, on f32 slices) instead of the generic body when the
/// CPU has that instruction set and every slice named is f32.
macro_rules! simd_f32 {
    ($simd:ident($($a:ident),*; $($m:ident),*; $($x:expr),*)) => {
        #[cfg(target_arch = "x86_64")]
        if let ($(Some($a),)* $(Some($m),)*) = ($(T::f32s($a),)* $(T::f32s_mut($m),)*) {
            if crate::isa::avx512f() {
                // SAFETY: AVX-512F was detected; the tile asserts the slice bounds it relies on.
                return unsafe { avx512::$simd($($x),*) };
            }
            if crate::isa::avx2_fma() {
                // SAFETY: AVX2 and FMA were detected; the tile asserts its slice bounds.
                return unsafe { avx2::$simd($($x),*) };
            }
        }
    };
}

/// The slice bounds the SIMD versions of [`tile_scores`] rely on: they read and write through raw
/// pointers. Checked once per call, outside the hot loops, by both the AVX-512 and AVX2 tiles.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn check_scores<T>(
    qb: &[T],
    ldd: usize,
    d: usize,
    kt: &[T],
    ldk: usize,
    ncols: usize,
    s: &[T],
) {
    assert!(qb.len() >= (R - 1) * ldd + d && ncols <= ldk && ncols.is_multiple_of(L));
    assert!(kt.len() >= d * ncols && s.len() >= (R - 1) * ldk + ncols);
}

/// The slice bounds the SIMD versions of [`tile_pv`] rely on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn check_pv<T>(p: &[T], ldk: usize, nk: usize, v: &[T], ldd: usize, out: &[T]) {
    assert!(ldd.is_multiple_of(L) && nk <= ldk && p.len() >= R * ldk);
    assert!(v.len() >= nk * ldd && out.len() >= R * ldd);
}

/// The slice bounds the SIMD versions of [`tile_outer`] rely on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn check_outer<T>(w: &[T], ldk: usize, nk: usize, x: &[T], ldd: usize, acc: &[T]) {
    assert!(ldd.is_multiple_of(L) && nk <= ldk && w.len() >= R * ldk);
    assert!(x.len() >= R * ldd && acc.len() >= nk * ldd);
}

/// The slice bounds the SIMD versions of [`exp_row`] rely on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn check_exp_row<T>(s: &[T], lim: usize, end: usize) {
    assert!(lim <= end && end <= s.len() && end.is_multiple_of(L));
}

/// `s[r][jb..] = q_r . k[jb..]` for the `R` rows of `qb [R, ldd]` and `ncols` (multiple of L) keys
/// of `kt`, the keys transposed in blocks of `L` (`[ldk / L, d, L]`, as [`load_t`] writes them);
/// `s` is `[R, ldk]`.
#[inline(always)]
pub(super) fn tile_scores<T: Float>(
    qb: &[T],
    ldd: usize,
    d: usize,
    kt: &[T],
    ldk: usize,
    ncols: usize,
    s: &mut [T],
) {
    simd_f32!(tile_scores(qb, kt; s; qb, ldd, d, kt, ldk, ncols, s));
    let qb = &qb[..R * ldd];
    for jb in (0..ncols).step_by(L) {
        let mut acc = [[T::zero(); L]; R];
        let block = &kt[jb * d..][..d * L];
        for c in 0..d {
            let k: &[T; L] = block[c * L..][..L].try_into().unwrap();
            for r in 0..R {
                let qv = qb[r * ldd + c];
                for l in 0..L {
                    acc[r][l] += qv * k[l];
                }
            }
        }
        for r in 0..R {
            s[r * ldk + jb..][..L].copy_from_slice(&acc[r]);
        }
    }
}

/// `out[r] = sum_{j < nk} p[r][j] * v[j]` for `p [R, ldk]`, `v [.., ldd]`, `out [R, ldd]`.
#[inline(always)]
pub(super) fn tile_pv<T: Float>(
    p: &[T],
    ldk: usize,
    nk: usize,
    v: &[T],
    ldd: usize,
    out: &mut [T],
) {
    simd_f32!(tile_pv(p, v; out; p, ldk, nk, v, ldd, out));
    let p = &p[..R * ldk];
    let v = &v[..nk * ldd];
    for cb in (0..ldd).step_by(L) {
        let mut acc = [[T::zero(); L]; R];
        for j in 0..nk {
            let vv: &[T; L] = v[j * ldd + cb..][..L].try_into().unwrap();
            for r in 0..R {
                let pv = p[r * ldk + j];
                for l in 0..L {
                    acc[r][l] += pv * vv[l];
                }
            }
        }
        for r in 0..R {
            out[r * ldd + cb..][..L].copy_from_slice(&acc[r]);
        }
    }
}

/// `acc[j] += sum_r w[r][j] * x[r]` for `j < nk`: `w [R, ldk]`, `x [R, ldd]`, `acc [.., ldd]`.
#[inline(always)]
pub(super) fn tile_outer<T: Float>(
    w: &[T],
    ldk: usize,
    nk: usize,
    x: &[T],
    ldd: usize,
    acc: &mut [T],
) {
    simd_f32!(tile_outer(w, x; acc; w, ldk, nk, x, ldd, acc));
    let x = &x[..R * ldd];
    for j in 0..nk {
        let row = &mut acc[j * ldd..][..ldd];
        for (r, xr) in x.chunks_exact(ldd).enumerate() {
            let wr = w[r * ldk + j];
            for (a, &xv) in row.iter_mut().zip(xr) {
                *a += wr * xv;
            }
        }
    }
}

/// `x . y` with eight partial sums (one dependent chain would be latency-bound).
#[inline(always)]
pub(super) fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: T = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .fold(T::zero(), |s, (&a, &b)| s + a * b);
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

#[inline(always)]
pub(super) fn row_max<T: Float>(s: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = T::f32s(s) {
        if crate::isa::avx512f() {
            // SAFETY: AVX-512F was detected.
            return T::from_f64(unsafe { avx512::row_max(x) } as f64);
        }
        if crate::isa::avx2_fma() {
            // SAFETY: AVX2 and FMA were detected.
            return T::from_f64(unsafe { avx2::row_max(x) } as f64);
        }
    }
    let mut m = [T::NEG_INF; L];
    let chunks = s.chunks_exact(L);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..L {
            m[l] = if ch[l] > m[l] { ch[l] } else { m[l] };
        }
    }
    let mut best = T::NEG_INF;
    for &x in m.iter().chain(rem) {
        if x > best {
            best = x;
        }
    }
    best
}

/// `s[j] = exp(s[j] - shift)` for `j < lim`, 0 for `lim <= j < end`; returns the sum.
#[inline(always)]
pub(super) fn exp_row<T: Float>(s: &mut [T], lim: usize, end: usize, shift: T) -> T {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = T::f32s_mut(s) {
        let shift = shift.to_f64() as f32;
        if crate::isa::avx512f() {
            // SAFETY: AVX-512F was detected; the tile asserts its bounds.
            return T::from_f64(unsafe { avx512::exp_row(x, lim, end, shift) } as f64);
        }
        if crate::isa::avx2_fma() {
            // SAFETY: AVX2 and FMA were detected; the tile asserts its bounds.
            return T::from_f64(unsafe { avx2::exp_row(x, lim, end, shift) } as f64);
        }
    }
    for x in s[..lim].iter_mut() {
        *x = (*x - shift).exp_();
    }
    for x in s[lim..end].iter_mut() {
        *x = T::zero();
    }
    let mut acc = [T::zero(); L];
    let chunks = s[..lim].chunks_exact(L);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..L {
            acc[l] += ch[l];
        }
    }
    let mut sum = T::zero();
    for &x in acc.iter().chain(rem) {
        sum += x;
    }
    sum
}

/// Per-thread scratch buffers.
#[derive(Default)]
pub(super) struct Scratch<T> {
    pub(super) a: Vec<T>,
    pub(super) b: Vec<T>,
    pub(super) c: Vec<T>,
    pub(super) d: Vec<T>,
    pub(super) e: Vec<T>,
    pub(super) f: Vec<T>,
    pub(super) g: Vec<T>,
    pub(super) h: Vec<T>,
}

pub(super) fn zeroed<T: Float>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    v.clear();
    v.resize(len, T::zero());
    &mut v[..]
}

/// `len` elements of scratch: zero-filled when the tiles will read padding, else left as they are
/// (every element read is written first). Zeroing ~18 KB per head was a tenth of the backward of
/// the encoder's 32 x 32 heads.
pub(super) fn scratch<T: Float>(v: &mut Vec<T>, len: usize, padded: bool) -> &mut [T] {
    if padded {
        return zeroed(v, len);
    }
    if v.len() < len {
        v.resize(len, T::zero());
    }
    &mut v[..len]
}

/// Copies `rows` rows of head `n` of `x` into `dst [rows, ldd]` (zero padded).
#[inline(always)]
pub(super) fn load_rows<T: Float>(
    x: &[T],
    vw: &View,
    n: usize,
    rows: std::ops::Range<usize>,
    d: usize,
    ldd: usize,
    dst: &mut [T],
) {
    for (r, i) in rows.enumerate() {
        let at = vw.row(n, i);
        copy_row(&mut dst[r * ldd..r * ldd + d], &x[at..at + d]);
    }
}

/// `dst = src` for one head's row. At the widths heads have the copy is a few vector moves; a
/// run-time length is a call to memmove, whose overhead is most of the copy's cost at d_k 16.
#[inline(always)]
fn copy_row<T: Copy>(dst: &mut [T], src: &[T]) {
    fn fixed<T: Copy, const N: usize>(dst: &mut [T], src: &[T]) {
        let (d, s): (&mut [T; N], &[T; N]) = (
            dst.try_into().expect("lengths match"),
            src.try_into().expect("lengths match"),
        );
        *d = *s;
    }
    match src.len() {
        16 => fixed::<T, 16>(dst, src),
        32 => fixed::<T, 32>(dst, src),
        64 => fixed::<T, 64>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// Copies keys `0..nk` of head `n` transposed in blocks of `L` keys into `dst [ldk / L, d, L]` (zero
/// padded): a score tile reads one contiguous block. (Transposed whole, as `[d, ldk]`, the 16 rows
/// a tile reads sat `4 * ldk` bytes apart, a multiple of 4 KB on the decoder's 512 keys: all in two
/// L1 sets.)
#[inline(always)]
pub(super) fn load_t<T: Float>(
    x: &[T],
    vw: &View,
    n: usize,
    nk: usize,
    d: usize,
    ldk: usize,
    dst: &mut [T],
) {
    assert!(dst.len() >= d * ldk && nk <= ldk);
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(x), Some(dst)) = (crate::isa::avx512f(), T::f32s(x), T::f32s_mut(dst)) {
        if nk > 0 {
            // SAFETY: AVX-512F was detected; the tile checks its bounds.
            unsafe { super::avx512::load_t(x, vw.row(n, 0), vw.ss, nk, d, dst) };
        }
        return;
    }
    for j in 0..nk {
        let at = vw.row(n, j);
        let block = &mut dst[(j / L) * d * L + j % L..];
        for (c, &val) in x[at..at + d].iter().enumerate() {
            block[c * L] = val;
        }
    }
}
