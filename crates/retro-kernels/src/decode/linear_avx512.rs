//! Several rows times one weight panel in AVX-512 on f32: the micro-kernel of
//! [`RowLinear`](super::RowLinear) for two to twelve rows (the neighbour encoder's 64 rows, a
//! prompt's). AVX-512 has 32 registers: twelve rows by the panel's 32 outputs is 24 sums, two
//! weight registers and a broadcast, so each pair of weight loads serves 24 multiply-adds (the
//! generic four-row block keeps eight chains, too few to hide the FMA's latency).

#![cfg(target_arch = "x86_64")]

use super::linear::BLOCK;
use std::arch::x86_64::*;

/// Rows a call takes at most.
pub(super) const ROWS: usize = 12;

/// `out[r] = x[r] W_panel^T + bias` for the `rows` (2 ..= ROWS) rows of `x [rows, n_in]`, with
/// `panel [n_in, BLOCK]`.
///
/// # Safety
/// The CPU has AVX-512F. The slices' lengths are checked.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn panel_rows(
    rows: usize,
    panel: &[f32],
    bias: &[f32; BLOCK],
    n_in: usize,
    x: &[f32],
    out: &mut [[f32; BLOCK]; ROWS],
) {
    assert!(panel.len() >= n_in * BLOCK && x.len() >= rows * n_in);
    by_rows!(
        rows,
        tile(panel, bias, n_in, x, out),
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    )
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize>(
    panel: &[f32],
    bias: &[f32; BLOCK],
    n_in: usize,
    x: &[f32],
    out: &mut [[f32; BLOCK]; ROWS],
) {
    let (wp, xp) = (panel.as_ptr(), x.as_ptr());
    let b0 = _mm512_loadu_ps(bias.as_ptr());
    let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
    let mut acc = [[b0, b1]; R];
    for i in 0..n_in {
        let w0 = _mm512_loadu_ps(wp.add(i * BLOCK));
        let w1 = _mm512_loadu_ps(wp.add(i * BLOCK + 16));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*xp.add(r * n_in + i));
            a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out[r].as_mut_ptr(), a[0]);
        _mm512_storeu_ps(out[r].as_mut_ptr().add(16), a[1]);
    }
}
