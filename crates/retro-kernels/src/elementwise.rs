//! Element-wise passes over activations, in parallel blocks.
//!
//! Per element through rayon's splitter (`par_iter_mut().for_each`) these ran as branchy scalar
//! code, a tenth of the labml-small train step; in blocks of [`BLOCK`] each task is one plain loop,
//! written as a select so that it vectorises.

use crate::float::Float;
use rayon::prelude::*;

/// Elements per task: 64 KB of f32.
const BLOCK: usize = 1 << 14;

/// `x = relu(x)`; NaN stays NaN.
pub(crate) fn relu_in_place<T: Float>(x: &mut [T]) {
    x.par_chunks_mut(BLOCK).for_each(|c| {
        for v in c {
            *v = if *v <= T::zero() { T::zero() } else { *v };
        }
    });
}

/// `g = 0` where `r <= 0`: the ReLU's backward from its output `r`.
pub(crate) fn relu_mask<T: Float>(g: &mut [T], r: &[T]) {
    assert_eq!(
        g.len(),
        r.len(),
        "relu_mask: gradient and output lengths differ"
    );
    g.par_chunks_mut(BLOCK)
        .zip(r.par_chunks(BLOCK))
        .for_each(|(g, r)| {
            for (g, &rv) in g.iter_mut().zip(r) {
                *g = if rv <= T::zero() { T::zero() } else { *g };
            }
        });
}

/// `y += x`.
pub(crate) fn add_in_place<T: Float>(y: &mut [T], x: &[T]) {
    assert_eq!(y.len(), x.len(), "add_in_place: lengths differ");
    y.par_chunks_mut(BLOCK)
        .zip(x.par_chunks(BLOCK))
        .for_each(|(y, x)| {
            for (a, &b) in y.iter_mut().zip(x) {
                *a += b;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_the_per_element_definitions_across_block_edges() {
        let n = 3 * BLOCK + 77;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                if i == 5 {
                    f32::NAN
                } else {
                    ((i * 7919) % 201) as f32 - 100.0
                }
            })
            .collect();
        let mut r = x.clone();
        relu_in_place(&mut r);
        for (i, (&a, &b)) in x.iter().zip(&r).enumerate() {
            if i == 5 {
                assert!(b.is_nan());
            } else {
                assert_eq!(b, a.max(0.0), "relu at {i}");
            }
        }
        let mut g: Vec<f32> = (0..n).map(|i| i as f32).collect();
        relu_mask(&mut g, &r);
        for (i, (&gv, &rv)) in g.iter().zip(&r).enumerate() {
            let want = if rv <= 0.0 { 0.0 } else { i as f32 };
            assert_eq!(gv, want, "mask at {i}");
        }
        let mut y = g.clone();
        add_in_place(&mut y, &x);
        for i in 0..n {
            assert_eq!(y[i].to_bits(), (g[i] + x[i]).to_bits(), "add at {i}");
        }
    }
}
