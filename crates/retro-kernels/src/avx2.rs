//! AVX2 + FMA building blocks on f32 registers of 8 lanes: exp (the same Cephes polynomial as the
//! generic [`exp_f32`](crate::gelu)), and the horizontal max and sum of a register.
//!
//! Every function is `#[target_feature(enable = "avx2,fma")]`: callers check
//! [`isa::avx2_fma`](crate::isa) first.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// `exp(x)` for 8 lanes: x clamped to [-87, 88], `2^n (1 + r + r^2 p(r))` with `n = round(x
/// log2 e)`. `n` comes from the 1.5 * 2^23 shifter (its low mantissa bits are then `n`, which also
/// gives `2^n` without a conversion), and `p` is evaluated by Estrin's scheme: three levels of FMA
/// instead of Horner's five in a row. Relative error within 1.2e-7 of f64's exp on [-87, 87].
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let shifter = _mm256_set1_ps(12_582_912.0);
    let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), shifter);
    let n = _mm256_sub_ps(t, shifter);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let c = |i: usize| _mm256_set1_ps(crate::gelu::EXP_POLY[i]);
    // p = (c5 + c4 r) + (c3 + c2 r) r^2 + (c1 + c0 r) r^4, EXP_POLY[0] the highest power.
    let r2 = _mm256_mul_ps(r, r);
    let lo = _mm256_fmadd_ps(c(4), r, c(5));
    let mid = _mm256_fmadd_ps(c(2), r, c(3));
    let hi = _mm256_fmadd_ps(c(0), r, c(1));
    let p = _mm256_fmadd_ps(_mm256_fmadd_ps(hi, r2, mid), r2, lo);
    let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // t's bits are 0x4B40_0000 + n; shifted into the exponent field with the bias 127.
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_castps_si256(t),
        _mm256_set1_epi32(127 - 0x4B40_0000),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// The largest of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hmax(x: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// The sum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hsum(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp8_equals_the_scalar_exp_within_its_rounding() {
        if !crate::isa::avx2_fma() {
            return;
        }
        let xs: Vec<f32> = (-1000..=1000).map(|i| i as f32 * 0.09).collect();
        for x in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
            for (&x, g) in x.iter().zip(got) {
                let want = (x as f64).clamp(-87.0, 88.0).exp();
                assert!(
                    ((g as f64 - want) / want).abs() < 2e-7,
                    "exp({x}) = {g}, want {want}"
                );
            }
            // SAFETY: as above.
            let (m, s) = unsafe {
                let v = _mm256_loadu_ps(x.as_ptr());
                (hmax(v), hsum(v))
            };
            assert_eq!(m, x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
            let want: f64 = x.iter().map(|&x| x as f64).sum();
            let scale: f64 = x.iter().map(|&x| (x as f64).abs()).sum();
            assert!(
                (s as f64 - want).abs() <= 1e-6 * scale,
                "sum {s}, want {want}"
            );
        }
    }
}
