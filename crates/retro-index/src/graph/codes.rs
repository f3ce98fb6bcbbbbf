//! 8-bit codes of the keys, for the walk. A key of 384 dims is 1,536 bytes in f32 and 384 here:
//! the walk is bound by memory, not arithmetic, so it reads a quarter as many bytes per hop. The
//! nodes it finds are then measured again on the f32 keys (see [`super::Graph::search`]), so
//! hits carry exact distances and are ranked by them. Codes are derived from the keys, never stored.
//!
//! Each dimension `d` gets its own range over the keys: `x ≈ low[d] + step[d] * code`, so
//! `q · x ≈ q · low + (q ⊙ step) · code`. Where the CPU has AVX-512 VNNI, `q ⊙ step` is quantised
//! to i8 as well and one instruction multiplies 64 dimensions; elsewhere it stays f32.

use super::search::Metric;
use crate::distance::{dot_u8_fn, dot_u8_i8_fn, DotU8Fn, DotU8I8Fn};
use rayon::prelude::*;
use retro_kernels::isa::prefetch;

pub(crate) struct Codes {
    dim: usize,
    low: Vec<f32>,
    step: Vec<f32>,
    codes: Vec<u8>,
}

/// A query against the codes.
pub(crate) struct Quantized<'a> {
    codes: &'a Codes,
    /// `q · low`
    offset: f32,
    scaled: Scaled,
}

/// `q ⊙ step`, in the form the CPU multiplies against bytes fastest.
enum Scaled {
    F32(Vec<f32>, DotU8Fn),
    /// Where the CPU multiplies bytes (AVX-512 VNNI): quantised to i8, with its scale. The walk
    /// then costs one instruction per 64 dimensions.
    I8(Vec<i8>, f32, DotU8I8Fn),
}

impl Codes {
    /// Codes of `rows` (`dim` wide, finite).
    pub(crate) fn new(rows: &[f32], dim: usize) -> Self {
        let (low, high) = rows
            .par_chunks(dim.max(1) * 1024)
            .map(|block| {
                let mut lo = vec![f32::INFINITY; dim];
                let mut hi = vec![f32::NEG_INFINITY; dim];
                for r in block.chunks_exact(dim) {
                    for ((l, h), &x) in lo.iter_mut().zip(&mut hi).zip(r) {
                        *l = l.min(x);
                        *h = h.max(x);
                    }
                }
                (lo, hi)
            })
            .reduce(
                || (vec![f32::INFINITY; dim], vec![f32::NEG_INFINITY; dim]),
                |(mut lo, mut hi), (l2, h2)| {
                    lo.iter_mut().zip(l2).for_each(|(a, b)| *a = a.min(b));
                    hi.iter_mut().zip(h2).for_each(|(a, b)| *a = a.max(b));
                    (lo, hi)
                },
            );
        let low: Vec<f32> = low
            .into_iter()
            .map(|l| if l.is_finite() { l } else { 0.0 })
            .collect();
        let step: Vec<f32> = high
            .iter()
            .zip(&low)
            .map(|(&h, &l)| {
                if h.is_finite() && h > l {
                    (h - l) / 255.0
                } else {
                    0.0
                }
            })
            .collect();
        let mut codes = vec![0u8; rows.len()];
        codes
            .par_chunks_mut(dim.max(1) * 1024)
            .zip(rows.par_chunks(dim.max(1) * 1024))
            .for_each(|(out, rows)| {
                for (r, c) in rows.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
                    for (d, (&x, c)) in r.iter().zip(c).enumerate() {
                        *c = if step[d] > 0.0 {
                            ((x - low[d]) / step[d]).round().clamp(0.0, 255.0) as u8
                        } else {
                            0
                        };
                    }
                }
            });
        Self {
            dim,
            low,
            step,
            codes,
        }
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.codes.len() + 8 * self.dim
    }

    fn row(&self, id: u32) -> &[u8] {
        let s = id as usize * self.dim;
        &self.codes[s..s + self.dim]
    }

    /// The walk's metric for query `q`.
    pub(crate) fn metric(&self, q: &[f32]) -> Quantized<'_> {
        let scaled: Vec<f32> = q.iter().zip(&self.step).map(|(a, b)| a * b).collect();
        let scaled = match dot_u8_i8_fn() {
            Some(f) => {
                let top = scaled.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if top > 0.0 { top / 127.0 } else { 1.0 };
                let qi = scaled.iter().map(|x| (x / scale).round() as i8).collect();
                Scaled::I8(qi, scale, f)
            }
            None => Scaled::F32(scaled, dot_u8_fn()),
        };
        Quantized {
            codes: self,
            offset: q.iter().zip(&self.low).map(|(a, b)| a * b).sum(),
            scaled,
        }
    }
}

impl Metric for Quantized<'_> {
    #[inline]
    fn dist(&self, id: u32) -> f32 {
        let row = self.codes.row(id);
        let dot = match &self.scaled {
            Scaled::I8(qi, scale, f) => scale * f(row, qi) as f32,
            Scaled::F32(scaled, f) => f(scaled, row),
        };
        1.0 - (self.offset + dot)
    }
    #[inline]
    fn prefetch(&self, id: u32) {
        let row = self.codes.row(id);
        prefetch(row.as_ptr(), row.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_reconstruct_within_half_a_step_and_distances_follow() {
        let dim = 8;
        let rows: Vec<f32> = (0..400)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * if i % 8 == 3 { 0.0 } else { 1.0 })
            .collect();
        let c = Codes::new(&rows, dim);
        for (i, r) in rows.chunks_exact(dim).enumerate() {
            for (d, &want) in r.iter().enumerate() {
                let x = c.low[d] + c.step[d] * c.row(i as u32)[d] as f32;
                assert!(
                    (x - want).abs() <= c.step[d] / 2.0 + 1e-6,
                    "row {i} dim {d}"
                );
            }
        }
        // A constant dimension (3) has step 0 and reconstructs exactly.
        assert_eq!(c.step[3], 0.0);
        let q: Vec<f32> = (0..dim).map(|d| (d as f32 - 3.5) / 4.0).collect();
        let m = c.metric(&q);
        for (i, r) in rows.chunks_exact(dim).enumerate() {
            let exact = 1.0 - q.iter().zip(r).map(|(a, b)| a * b).sum::<f32>();
            // The codes' rounding, plus the i8 query's where the bytes kernel runs: half its step
            // on each dimension, times a code of at most 255.
            let bytes = match &m.scaled {
                Scaled::I8(_, scale, _) => scale / 2.0 * 255.0 * dim as f32,
                Scaled::F32(..) => 0.0,
            };
            let bound: f32 = q
                .iter()
                .zip(&c.step)
                .map(|(a, s)| a.abs() * s / 2.0)
                .sum::<f32>()
                + bytes;
            assert!((m.dist(i as u32) - exact).abs() <= bound + 1e-5, "row {i}");
        }
    }
}
