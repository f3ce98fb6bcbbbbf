//! `1 - dot` on L2-normalised vectors, clamped at 0, with AVX-512 and AVX2/FMA kernels chosen at
//! run time. Unlike anndists' `DistDot` it never asserts and never returns NaN (hnsw_rs, which reads
//! the graphs of older databases, panics on NaN).

use hnsw_rs::prelude::Distance;

/// Dot-product distance for unit vectors: `max(0, 1 - a·b)`; NaN inputs give 0, never NaN.
#[derive(Debug, Default, Clone, Copy)]
pub struct DistUnitDot;

impl Distance<f32> for DistUnitDot {
    #[inline]
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        let d = 1.0 - dot(a, b);
        if d > 0.0 {
            d
        } else {
            0.0
        }
    }
}

/// `$name(a, b)`: the `unsafe` kernel `$kernel` over the two slices' common length, made safe to
/// call because the choosers (`dot_fn`, `dot_u8_fn`, `dot_u8_i8_fn`) hand it out only after they
/// detected the instruction sets it is compiled for.
macro_rules! checked {
    ($name:ident => $kernel:ident(&[$a:ty], &[$b:ty]) -> $r:ty) => {
        #[cfg(target_arch = "x86_64")]
        fn $name(a: &[$a], b: &[$b]) -> $r {
            let n = a.len().min(b.len());
            // SAFETY: only the choosers return this, and only when the CPU has what `$kernel` is
            // compiled for.
            unsafe { $kernel(&a[..n], &b[..n]) }
        }
    };
}

checked!(dot_avx512_checked => dot_avx512(&[f32], &[f32]) -> f32);
checked!(dot_avx2_checked => dot_avx2(&[f32], &[f32]) -> f32);
checked!(dot_u8_avx512_checked => dot_u8_avx512(&[f32], &[u8]) -> f32);
checked!(dot_u8_avx2_checked => dot_u8_avx2(&[f32], &[u8]) -> f32);
checked!(dot_u8_i8_vnni_checked => dot_u8_i8_vnni(&[u8], &[i8]) -> i32);

/// Dot product, SIMD where the CPU allows.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_fn()(a, b)
}

/// A dot product over the first `min(a.len(), b.len())` components.
pub type DotFn = fn(&[f32], &[f32]) -> f32;

/// The fastest dot product this CPU runs, chosen once: the graph's walks call it through this
/// pointer instead of detecting the CPU at every distance.
pub fn dot_fn() -> DotFn {
    static CHOSEN: std::sync::OnceLock<DotFn> = std::sync::OnceLock::new();
    #[cfg(target_arch = "x86_64")]
    return *CHOSEN.get_or_init(|| {
        widest::<DotFn>(dot_avx512_checked, dot_avx2_checked, dot_portable_checked)
    });
    #[cfg(not(target_arch = "x86_64"))]
    *CHOSEN.get_or_init(|| dot_portable_checked)
}

/// The kernel for the widest instruction set this CPU has (`retro_kernels::isa`, where the
/// kernels detect theirs): AVX-512F, AVX2 with FMA, or none.
#[cfg(target_arch = "x86_64")]
fn widest<F>(avx512: F, avx2: F, portable: F) -> F {
    use retro_kernels::isa::{isa, Isa};
    match isa() {
        Isa::Avx512 => avx512,
        Isa::Avx2 => avx2,
        Isa::Base => portable,
    }
}

/// `q · c` for a query in f32 and a key's 8-bit codes, over the shorter length.
pub type DotU8Fn = fn(&[f32], &[u8]) -> f32;

/// The fastest [`DotU8Fn`] this CPU runs, chosen once.
pub fn dot_u8_fn() -> DotU8Fn {
    static CHOSEN: std::sync::OnceLock<DotU8Fn> = std::sync::OnceLock::new();
    #[cfg(target_arch = "x86_64")]
    return *CHOSEN.get_or_init(|| {
        widest::<DotU8Fn>(dot_u8_avx512_checked, dot_u8_avx2_checked, dot_u8_portable)
    });
    #[cfg(not(target_arch = "x86_64"))]
    *CHOSEN.get_or_init(|| dot_u8_portable)
}

/// `c · q` in integers, for a key's 8-bit codes and a query quantised to i8.
pub type DotU8I8Fn = fn(&[u8], &[i8]) -> i32;

/// The AVX-512 VNNI kernel (64 products an instruction) where the CPU has it; `None` elsewhere,
/// where the f32 query against the codes ([`dot_u8_fn`]) is as fast as integers would be.
pub fn dot_u8_i8_fn() -> Option<DotU8I8Fn> {
    static CHOSEN: std::sync::OnceLock<Option<DotU8I8Fn>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if retro_kernels::isa::avx512_vnni() {
            return Some(dot_u8_i8_vnni_checked as DotU8I8Fn);
        }
        None
    })
}

/// [`DotU8I8Fn`] without SIMD intrinsics (the tests' reference).
pub fn dot_u8_i8_portable(c: &[u8], q: &[i8]) -> i32 {
    c.iter().zip(q).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Sums of 4 products per lane in i32: at most 255 x 128 x 4 a lane and instruction, so no
/// overflow below 2^31 / 130,560 = 16,000 instructions (a million dimensions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_u8_i8_vnni(c: &[u8], q: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = c.len();
    let mut acc = _mm512_setzero_si512();
    let mut i = 0;
    while i + 64 <= n {
        let a = _mm512_loadu_si512(c.as_ptr().add(i).cast());
        let b = _mm512_loadu_si512(q.as_ptr().add(i).cast());
        acc = _mm512_dpbusd_epi32(acc, a, b);
        i += 64;
    }
    if i < n {
        // The tail, masked: lanes past the end read nothing.
        let mask: __mmask64 = (1u64 << (n - i)) - 1;
        let a = _mm512_maskz_loadu_epi8(mask, c.as_ptr().add(i).cast());
        let b = _mm512_maskz_loadu_epi8(mask, q.as_ptr().add(i));
        acc = _mm512_dpbusd_epi32(acc, a, b);
    }
    _mm512_reduce_add_epi32(acc)
}

/// [`DotU8Fn`] without SIMD intrinsics.
pub fn dot_u8_portable(q: &[f32], c: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let (cq, cc) = (q.chunks_exact(8), c.chunks_exact(8));
    let (rq, rc) = (cq.remainder(), cc.remainder());
    for (x, y) in cq.zip(cc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k] as f32;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, &y) in rq.iter().zip(rc) {
        s += x * y as f32;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_u8_avx512(q: &[f32], c: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len();
    let (pq, pc) = (q.as_ptr(), c.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = i + 16 * j;
            let bytes = _mm_loadu_si128(pc.add(o) as *const __m128i);
            let codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
            *acc = _mm512_fmadd_ps(codes, _mm512_loadu_ps(pq.add(o)), *acc);
        }
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    while i < n {
        s += *pq.add(i) * *pc.add(i) as f32;
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_u8_avx2(q: &[f32], c: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len();
    let (pq, pc) = (q.as_ptr(), c.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = i + 8 * j;
            let bytes = _mm_loadl_epi64(pc.add(o) as *const __m128i);
            let codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            *acc = _mm256_fmadd_ps(codes, _mm256_loadu_ps(pq.add(o)), *acc);
        }
        i += 16;
    }
    let v = _mm256_add_ps(acc[0], acc[1]);
    let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    while i < n {
        s += *pq.add(i) * *pc.add(i) as f32;
        i += 1;
    }
    s
}

fn dot_portable_checked(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    dot_portable(&a[..n], &b[..n])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let o = i + 16 * j;
            *acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i)),
            _mm512_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 16;
    }
    if i < n {
        // The tail, masked: lanes past the end read nothing.
        let mask: __mmask16 = (1u16 << (n - i)) - 1;
        acc[1] = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(mask, pa.add(i)),
            _mm512_maskz_loadu_ps(mask, pb.add(i)),
            acc[1],
        );
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}

/// Portable dot with 8 independent accumulators (vectorises on any SIMD width).
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut acc2 = _mm256_setzero_ps();
    let mut acc3 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            acc1,
        );
        acc2 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 16)),
            _mm256_loadu_ps(pb.add(i + 16)),
            acc2,
        );
        acc3 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 24)),
            _mm256_loadu_ps(pb.add(i + 24)),
            acc3,
        );
        i += 32;
    }
    while i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s4 = _mm_add_ps(hi, lo);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    let mut s = _mm_cvtss_f32(s1);
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn simd_matches_scalar_and_never_nan() {
        for n in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 10.0).collect();
            let s: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - s).abs() < 1e-4, "n={n}");
            assert!((dot_portable(&a, &b) - s).abs() < 1e-4, "n={n}");
            assert!((dot_portable_checked(&a, &b) - s).abs() < 1e-4, "n={n}");
            #[cfg(target_arch = "x86_64")]
            {
                if retro_kernels::isa::avx512f() {
                    assert!((dot_avx512_checked(&a, &b) - s).abs() < 1e-4, "n={n}");
                }
                if retro_kernels::isa::avx2_fma() {
                    assert!((dot_avx2_checked(&a, &b) - s).abs() < 1e-4, "n={n}");
                }
            }
        }
        for n in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 384, 385] {
            let q: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
            let c: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let s: f32 = q.iter().zip(&c).map(|(x, &y)| x * y as f32).sum();
            let tol = 1e-4 * s.abs().max(1.0);
            assert!((dot_u8_portable(&q, &c) - s).abs() < tol, "n={n}");
            assert!((dot_u8_fn()(&q, &c) - s).abs() < tol, "n={n}");
            #[cfg(target_arch = "x86_64")]
            {
                if retro_kernels::isa::avx512f() {
                    assert!((dot_u8_avx512_checked(&q, &c) - s).abs() < tol, "n={n}");
                }
                if retro_kernels::isa::avx2_fma() {
                    assert!((dot_u8_avx2_checked(&q, &c) - s).abs() < tol, "n={n}");
                }
            }
        }
        for n in [0usize, 1, 63, 64, 65, 127, 384, 385] {
            let c: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let q: Vec<i8> = (0..n)
                .map(|i| ((i * 53 % 256) as i32 - 128) as i8)
                .collect();
            let want = dot_u8_i8_portable(&c, &q);
            if let Some(f) = dot_u8_i8_fn() {
                assert_eq!(f(&c, &q), want, "n={n}");
            }
        }
        // The extremes: every product at 255 x -128 adds up exactly.
        let (c, q) = (vec![255u8; 384], vec![-128i8; 384]);
        if let Some(f) = dot_u8_i8_fn() {
            assert_eq!(f(&c, &q), 384 * 255 * -128);
        }
        let nan = vec![f32::NAN; 16];
        assert_eq!(DistUnitDot.eval(&nan, &nan), 0.0);
        let z = vec![0f32; 16];
        assert_eq!(DistUnitDot.eval(&z, &z), 1.0);
    }
}
