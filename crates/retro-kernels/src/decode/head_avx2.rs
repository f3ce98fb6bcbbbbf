//! One query head's attention over the cache in AVX2 + FMA on f32: what the generic
//! `attend_head_body` computes, with the loops LLVM leaves scalar there (the max, the exp, the
//! horizontal sums) in registers.

#![cfg(target_arch = "x86_64")]

use super::cache::{ahead, AHEAD, BLOCK, TILE};
use crate::avx2::{exp8, hmax, hsum};
use crate::gelu::exp_f32;
use std::arch::x86_64::*;

/// `out = softmax(q K^T) V` over the first `n` positions, for `d_k = 8 C`; `k` holds the head's
/// key tiles `[.., d_k, TILE]` and `v` its values `[.., d_k]`. `P` partial sums of the output
/// over interleaved positions keep that many multiply-add chains in flight.
///
/// # Safety
/// The CPU has AVX2 and FMA. The slices' lengths are checked.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_head<const C: usize, const P: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dk = 8 * C;
    let tiles = n.div_ceil(TILE);
    assert!(q.len() == dk && out.len() == dk, "q and out are not [d_k]");
    assert!(
        scores.len() >= tiles * TILE,
        "scores do not hold whole tiles"
    );
    assert!(
        k.len() >= tiles * TILE * dk && v.len() >= n * dk,
        "k or v is short"
    );
    score_tiles::<C>(q, k, tiles, scores);
    ahead(v, 0, AHEAD * dk);

    let s = &mut scores[..n];
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut blocks = s.chunks_exact(8);
    for b in &mut blocks {
        max = _mm256_max_ps(max, _mm256_loadu_ps(b.as_ptr()));
    }
    let max = blocks.remainder().iter().fold(hmax(max), |m, &x| m.max(x));
    let (m8, mut sum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
    let mut blocks = s.chunks_exact_mut(8);
    for b in &mut blocks {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(b.as_ptr()), m8));
        _mm256_storeu_ps(b.as_mut_ptr(), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut total = hsum(sum);
    for x in blocks.into_remainder() {
        *x = exp_f32(*x - max);
        total += *x;
    }

    let vp = v.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); C]; P];
    let mut j = 0;
    while j + P <= n {
        ahead(v, (j + AHEAD) * dk, P * dk);
        for (t, a) in acc.iter_mut().enumerate() {
            let p = _mm256_set1_ps(s[j + t]);
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp.add((j + t) * dk + 8 * c)), *a);
            }
        }
        j += P;
    }
    for (jj, &sj) in s.iter().enumerate().skip(j) {
        let p = _mm256_set1_ps(sj);
        for (c, a) in acc[0].iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp.add(jj * dk + 8 * c)), *a);
        }
    }
    let inv = _mm256_set1_ps(1.0 / total);
    for c in 0..C {
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, a[c]));
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), _mm256_mul_ps(sum, inv));
    }
}

/// `scores[j] = q . k_j` for every position of the first `tiles` tiles.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn score_tiles<const C: usize>(q: &[f32], k: &[f32], tiles: usize, scores: &mut [f32]) {
    let dk = 8 * C;
    let (kp, sp) = (k.as_ptr(), scores.as_mut_ptr());
    let block = BLOCK * dk * TILE;
    ahead(k, 0, 2 * block);
    let mut t = 0;
    while t + BLOCK <= tiles {
        ahead(k, (t + 2 * BLOCK) * dk * TILE, block);
        let mut acc = [[_mm256_setzero_ps(); 2]; BLOCK];
        for (c, &qc) in q.iter().enumerate() {
            let qc = _mm256_set1_ps(qc);
            for (b, a) in acc.iter_mut().enumerate() {
                let at = kp.add(((t + b) * dk + c) * TILE);
                a[0] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(at), a[0]);
                a[1] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(at.add(8)), a[1]);
            }
        }
        for (b, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(sp.add((t + b) * TILE), a[0]);
            _mm256_storeu_ps(sp.add((t + b) * TILE + 8), a[1]);
        }
        t += BLOCK;
    }
    while t < tiles {
        let mut a = [_mm256_setzero_ps(); 2];
        for (c, &qc) in q.iter().enumerate() {
            let qc = _mm256_set1_ps(qc);
            let at = kp.add((t * dk + c) * TILE);
            a[0] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(at), a[0]);
            a[1] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(at.add(8)), a[1]);
        }
        _mm256_storeu_ps(sp.add(t * TILE), a[0]);
        _mm256_storeu_ps(sp.add(t * TILE + 8), a[1]);
        t += 1;
    }
}
