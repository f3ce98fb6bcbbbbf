//! `x W^T + b` and LayerNorm over a few rows, with weights copied once into the layout the row
//! loops read.

use super::{values, MIN_ROWS_PER_TASK};
use crate::float::Float;
use crate::isa::multiversioned;
use crate::layers::{LayerNorm, Linear};
use candle_core::Result;
use rayon::prelude::*;

/// Outputs accumulated in registers at once: 32 f32 are two AVX-512 or four AVX2 registers.
pub(super) const BLOCK: usize = 32;
/// Partial sums per block, over interleaved inputs.
const PARTIALS: usize = 4;

/// A Linear `[out, in]` with bias, held as column panels `[out / BLOCK, in, BLOCK]` (the last
/// padded with zero weights): a block of BLOCK outputs reads its weights as one contiguous stream,
/// where a transposed `[in, out]` matrix would be read BLOCK columns at a stride of `out`.
#[derive(Debug, Clone)]
pub struct RowLinear<T> {
    panels: Vec<T>,
    /// `[out]` padded to whole panels.
    b: Vec<T>,
    n_in: usize,
    n_out: usize,
}

impl<T: Float> RowLinear<T> {
    /// A copy of `linear`'s weights and bias.
    pub fn new(linear: &Linear) -> Result<Self> {
        Self::fused(&[(linear, 1.0)])
    }

    /// Several Linears of one input as one, each part's outputs scaled by its factor, side by side
    /// in the order given (what [`fused_linear`](crate::layers::fused_linear) computes).
    pub fn fused(parts: &[(&Linear, f64)]) -> Result<Self> {
        let fused = Linear::fuse(parts)?;
        let (n_out, n_in) = fused.weight().dims2()?;
        let w = values::<T>(fused.weight())?;
        let padded = n_out.next_multiple_of(BLOCK);
        let mut panels = vec![T::zero(); padded * n_in];
        for o in 0..n_out {
            let (p, k) = (o / BLOCK, o % BLOCK);
            for i in 0..n_in {
                panels[(p * n_in + i) * BLOCK + k] = w[o * n_in + i];
            }
        }
        let mut b = values::<T>(fused.bias())?;
        b.resize(padded, T::zero());
        Ok(Self {
            panels,
            b,
            n_in,
            n_out,
        })
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// `y[r] = x[r] W^T + b` for every row `r` of `x [rows, in]`; `y` is `[rows, out]`.
    pub fn forward(&self, x: &[T], y: &mut [T]) {
        self.rows(x, y, false)
    }

    /// `y[r] += x[r] W^T + b`: the projection added to a residual.
    pub fn forward_add(&self, x: &[T], y: &mut [T]) {
        self.rows(x, y, true)
    }

    fn rows(&self, x: &[T], y: &mut [T], accumulate: bool) {
        let (n_in, n_out) = (self.n_in, self.n_out);
        assert_eq!(x.len() % n_in.max(1), 0, "x is not [rows, {n_in}]");
        let rows = x.len() / n_in.max(1);
        assert_eq!(rows * n_out, y.len(), "y is not [rows, {n_out}]");
        // f32 rows go through the widest micro-kernel the CPU has (on AVX-512 the generic
        // four-row block keeps too few chains in flight; on AVX2 it spills its sums).
        let tile = Tile::pick(T::f32s(x).is_some());
        // One task per thread while that is at most TASK_UNITS tiles of rows (64 encoder rows on
        // two threads: 32 each, where tasks of whole tiles would leave one thread 16 rows
        // more), more tasks past it.
        let per_task = rows
            .div_ceil(rayon::current_num_threads())
            .clamp(MIN_ROWS_PER_TASK, TASK_UNITS * tile.rows());
        let one = |(x, y): (&[T], &mut [T])| {
            linear_rows(&self.panels, &self.b, (n_in, n_out), x, y, accumulate, tile)
        };
        let (tx, ty) = (per_task * n_in.max(1), per_task * n_out);
        let panels = self.b.len() / BLOCK;
        if rows == 1 && panels >= 2 && rayon::current_num_threads() > 1 {
            // One row: each core takes half of the panels (half of the outputs).
            let half = panels / 2;
            let (w0, w1) = self.panels.split_at(half * n_in * BLOCK);
            let (b0, b1) = self.b.split_at(half * BLOCK);
            let (y0, y1) = y.split_at_mut(half * BLOCK);
            let part = |w, b, n, y| linear_rows(w, b, (n_in, n), x, y, accumulate, tile);
            super::pair::join(
                || part(w0, b0, half * BLOCK, y0),
                || part(w1, b1, n_out - half * BLOCK, y1),
            );
        } else if per_task >= rows || rows < MIN_ROWS_PER_TASK * 2 {
            one((x, y));
        } else if rayon::current_num_threads() == 2 {
            // Two threads: half of the rows each, the second half on the pair's spinning helper
            // (rayon's idle worker would first have to be woken).
            super::pair::halves(x, y, rows, |_, x, y| one((x, y)));
        } else {
            x.par_chunks(tx).zip(y.par_chunks_mut(ty)).for_each(one);
        }
    }
}

/// Rows computed together by the generic loop, each panel row loaded once for all of them.
const GROUP: usize = 4;
/// Tiles (or GROUPs) of rows one task takes at most.
const TASK_UNITS: usize = 4;

/// The micro-kernel that takes f32 rows several at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tile {
    /// The generic loop, GROUP rows at a time.
    Generic,
    /// `linear_avx2::panel_rows`, up to six rows.
    Avx2,
    /// `linear_avx512::panel_rows`, up to twelve rows.
    Avx512,
}

impl Tile {
    /// The widest the CPU runs, for f32 rows (`f32`); the generic loop otherwise.
    fn pick(f32: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if f32 {
            return match crate::isa::isa() {
                crate::isa::Isa::Avx512 => Tile::Avx512,
                crate::isa::Isa::Avx2 => Tile::Avx2,
                _ => Tile::Generic,
            };
        }
        let _ = f32;
        Tile::Generic
    }

    /// Rows the kernel takes at once.
    fn rows(self) -> usize {
        match self {
            Tile::Generic => GROUP,
            #[cfg(target_arch = "x86_64")]
            Tile::Avx2 => super::linear_avx2::ROWS,
            #[cfg(target_arch = "x86_64")]
            Tile::Avx512 => super::linear_avx512::ROWS,
            #[cfg(not(target_arch = "x86_64"))]
            _ => GROUP,
        }
    }
}

multiversioned!(fn linear_rows<T: Float>(panels: &[T], b: &[T], dims: (usize, usize), x: &[T], y: &mut [T], accumulate: bool, tile: Tile) => linear_rows_body);

/// Every row of `x`, panel by panel: up to twelve (AVX-512) or six (AVX2) rows at a time by a
/// micro-kernel (`tile`), or GROUP rows at a time; then one by one. `dims` is `(n_in, n_out)`.
#[inline(always)]
fn linear_rows_body<T: Float>(
    panels: &[T],
    b: &[T],
    (n_in, n_out): (usize, usize),
    x: &[T],
    y: &mut [T],
    accumulate: bool,
    tile: Tile,
) {
    let rows = y.len() / n_out.max(1);
    for (p, (panel, bias)) in panels
        .chunks_exact(n_in * BLOCK)
        .zip(b.chunks_exact(BLOCK))
        .enumerate()
    {
        let bias: &[T; BLOCK] = bias.try_into().expect("a block");
        let (j0, width) = (p * BLOCK, BLOCK.min(n_out - p * BLOCK));
        let mut put = |r: usize, acc: &[T; BLOCK]| {
            let out = &mut y[r * n_out + j0..][..width];
            if accumulate {
                out.iter_mut().zip(acc).for_each(|(o, v)| *o += *v);
            } else {
                out.copy_from_slice(&acc[..width]);
            }
        };
        let mut r0 = 0;
        #[cfg(target_arch = "x86_64")]
        if let (Tile::Avx2 | Tile::Avx512, Some(panel), Some(bias), Some(x)) =
            (tile, T::f32s(panel), T::f32s(bias), T::f32s(x))
        {
            let bias: &[f32; BLOCK] = bias.try_into().expect("a block");
            let mut out = [[0f32; BLOCK]; super::linear_avx512::ROWS];
            let most = tile.rows();
            while rows - r0 >= 2 {
                let r = (rows - r0).min(most);
                let x = &x[r0 * n_in..];
                // SAFETY: `tile` names an instruction set the CPU has (`Tile::pick`); the
                // kernels check the slices' lengths.
                unsafe {
                    match tile {
                        Tile::Avx512 => {
                            super::linear_avx512::panel_rows(r, panel, bias, n_in, x, &mut out)
                        }
                        _ => {
                            let out = out.first_chunk_mut().expect("12 rows hold 6");
                            super::linear_avx2::panel_rows(r, panel, bias, n_in, x, out)
                        }
                    }
                }
                for (i, o) in out[..r].iter().enumerate() {
                    let o: [T; BLOCK] = std::array::from_fn(|k| T::from_f64(o[k] as f64));
                    put(r0 + i, &o);
                }
                r0 += r;
            }
        }
        let full = r0 + (rows - r0) / GROUP * GROUP;
        for r0 in (r0..full).step_by(GROUP) {
            let mut acc = [*bias; GROUP];
            for (i, w) in panel.chunks_exact(BLOCK).enumerate() {
                let w: &[T; BLOCK] = w.try_into().expect("a block");
                for (r, a) in acc.iter_mut().enumerate() {
                    let xi = x[(r0 + r) * n_in + i];
                    for k in 0..BLOCK {
                        a[k] = xi.mul_add_(w[k], a[k]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                put(r0 + r, a);
            }
        }
        for r in full..rows {
            put(r, &panel_row(panel, bias, &x[r * n_in..][..n_in]));
        }
    }
}

/// One row's BLOCK outputs of one panel: PARTIALS sums over interleaved inputs keep that many
/// add chains in flight.
#[inline(always)]
fn panel_row<T: Float>(panel: &[T], bias: &[T; BLOCK], x: &[T]) -> [T; BLOCK] {
    let mut part = [[T::zero(); BLOCK]; PARTIALS];
    let mut ws = panel.chunks_exact(PARTIALS * BLOCK);
    let mut xs = x.chunks_exact(PARTIALS);
    for (w, xc) in (&mut ws).zip(&mut xs) {
        for (t, p) in part.iter_mut().enumerate() {
            let (xi, w) = (xc[t], &w[t * BLOCK..][..BLOCK]);
            for k in 0..BLOCK {
                p[k] = xi.mul_add_(w[k], p[k]);
            }
        }
    }
    let mut acc = *bias;
    for (w, &xi) in ws.remainder().chunks_exact(BLOCK).zip(xs.remainder()) {
        for k in 0..BLOCK {
            acc[k] = xi.mul_add_(w[k], acc[k]);
        }
    }
    for p in &part {
        for k in 0..BLOCK {
            acc[k] += p[k];
        }
    }
    acc
}

/// LayerNorm over the last dimension with affine weights, as a copy of a [`LayerNorm`]'s.
#[derive(Debug, Clone)]
pub struct RowNorm<T> {
    w: Vec<T>,
    b: Vec<T>,
    eps: T,
}

impl<T: Float> RowNorm<T> {
    pub fn new(norm: &LayerNorm) -> Result<Self> {
        Ok(Self {
            w: values(norm.weight())?,
            b: values(norm.bias())?,
            eps: T::from_f64(norm.eps()),
        })
    }

    /// `y[r] = (x[r] - mean) / sqrt(var + eps) * w + b` for every row of `x [rows, d]`.
    pub fn forward(&self, x: &[T], y: &mut [T]) {
        let d = self.w.len();
        assert_eq!(x.len(), y.len(), "x and y differ in length");
        for (x, y) in x.chunks(d).zip(y.chunks_mut(d)) {
            let n = T::from_f64(d as f64);
            let mean = x.iter().fold(T::zero(), |s, &v| s + v) / n;
            let var = x
                .iter()
                .fold(T::zero(), |s, &v| s + (v - mean) * (v - mean))
                / n;
            let inv = T::one() / (var + self.eps).sqrt_();
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(&self.w).zip(&self.b) {
                *y = (x - mean) * inv * w + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernels;
    use crate::layers::fused_linear;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::{DType, Device, Tensor};

    fn check<T: Float>(dtype: DType, tol: f64) {
        seed(3);
        // 47 outputs: one full register block and a partial one; 64: two full blocks.
        for (n_in, outs) in [(9, [40, 7]), (6, [32, 32])] {
            let lin = |o: usize| Linear::new(randn(&[o, n_in], dtype), randn(&[o], dtype));
            let (a, b) = (lin(outs[0]), lin(outs[1]));
            let rows = RowLinear::<T>::fused(&[(&a, 0.5), (&b, 1.0)]).unwrap();
            let n_out = outs[0] + outs[1];
            assert_eq!((rows.n_in(), rows.n_out()), (n_in, n_out));
            let norm = LayerNorm::new(randn(&[n_in], dtype), randn(&[n_in], dtype), 1e-5);
            let row_norm = RowNorm::<T>::new(&norm).unwrap();
            // One row, two, a group of four, six (one AVX2 tile), eleven (two halves, each one
            // tile), 25 (a twelve-row AVX-512 tile and one row left) and 64 (halves of whole
            // tiles and a partial one).
            for r in [1, 2, 4, 6, 11, 25, 64] {
                let x = randn(&[r, n_in], dtype);
                let xv = x.flatten_all().unwrap().to_vec1::<T>().unwrap();
                let want =
                    fused_linear(&[(&a, 0.5), (&b, 1.0)], &x, Kernels::Differentiable).unwrap();
                let mut y = vec![T::zero(); r * n_out];
                rows.forward(&xv, &mut y);
                let got = Tensor::from_vec(y.clone(), (r, n_out), &Device::Cpu).unwrap();
                assert!(max_diff(&got, &want) < tol, "{dtype:?} forward, {r} rows");
                rows.forward_add(&xv, &mut y);
                let got = Tensor::from_vec(y, (r, n_out), &Device::Cpu).unwrap();
                assert!(
                    max_diff(&got, &(&want * 2.0).unwrap()) < tol,
                    "{dtype:?} forward_add"
                );

                let want = norm.forward(&x, Kernels::Differentiable).unwrap();
                let mut y = vec![T::zero(); r * n_in];
                row_norm.forward(&xv, &mut y);
                let got = Tensor::from_vec(y, (r, n_in), &Device::Cpu).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < tol, "{dtype:?} norm, {r} rows: {d}");
            }
        }
    }

    #[test]
    fn rows_equal_the_tensor_layers() {
        check::<f32>(DType::F32, 1e-5);
        check::<f64>(DType::F64, 1e-10);
    }
}
