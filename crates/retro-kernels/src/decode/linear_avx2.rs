//! Several rows times one weight panel in AVX2 + FMA on f32: the micro-kernel of
//! [`RowLinear`](super::RowLinear) for two to six rows. AVX2 has 16 registers: six rows by 16
//! outputs is twelve sums, two weight registers and a broadcast, so each weight load serves
//! twelve multiply-adds (the generic four-rows-by-32 block spills its sums there).

#![cfg(target_arch = "x86_64")]

use super::linear::BLOCK;
use std::arch::x86_64::*;

/// Rows a call takes at most.
pub(super) const ROWS: usize = 6;

/// `out[r] = x[r] W_panel^T + bias` for the `rows` (2 ..= ROWS) rows of `x [rows, n_in]`, with
/// `panel [n_in, BLOCK]`.
///
/// # Safety
/// The CPU has AVX2 and FMA. The slices' lengths are checked.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_rows(
    rows: usize,
    panel: &[f32],
    bias: &[f32; BLOCK],
    n_in: usize,
    x: &[f32],
    out: &mut [[f32; BLOCK]; ROWS],
) {
    assert!(panel.len() >= n_in * BLOCK && x.len() >= rows * n_in);
    by_rows!(rows, tile(panel, bias, n_in, x, out), [2, 3, 4, 5, 6])
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    panel: &[f32],
    bias: &[f32; BLOCK],
    n_in: usize,
    x: &[f32],
    out: &mut [[f32; BLOCK]; ROWS],
) {
    let (wp, xp) = (panel.as_ptr(), x.as_ptr());
    // The panel's two halves of 16 outputs in turn.
    for half in [0, 16] {
        let b0 = _mm256_loadu_ps(bias.as_ptr().add(half));
        let b1 = _mm256_loadu_ps(bias.as_ptr().add(half + 8));
        let mut acc = [[b0, b1]; R];
        for i in 0..n_in {
            let w0 = _mm256_loadu_ps(wp.add(i * BLOCK + half));
            let w1 = _mm256_loadu_ps(wp.add(i * BLOCK + half + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = _mm256_set1_ps(*xp.add(r * n_in + i));
                a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out[r].as_mut_ptr().add(half), a[0]);
            _mm256_storeu_ps(out[r].as_mut_ptr().add(half + 8), a[1]);
        }
    }
}
