//! A KV cache written in place, and attention of new rows over it.

use super::MIN_ROWS_PER_TASK;
use crate::float::Float;
use crate::isa::multiversioned;
use rayon::prelude::*;

/// Capacity of a cache's first allocation, in positions.
const FIRST_CAPACITY: usize = 64;

/// The keys and values of `batch` sequences, `heads` heads of `d_k`, at every position so far.
/// Each head's keys are held in tiles of 16 positions, `[capacity / 16, d_k, 16]`, so a
/// query's scores for a tile are `d_k` vertical multiply-adds over one contiguous kilobyte; its
/// values are held by position, `[capacity, d_k]`, so the output accumulates `p_j v_j` row by row
/// with no horizontal sums. Both are read as streams: no stride of a power of two thrashes one
/// cache set, as the `[d_k, capacity]` layout did.
#[derive(Debug, Clone)]
pub struct TiledKvCache<T> {
    batch: usize,
    heads: usize,
    d_k: usize,
    len: usize,
    /// A multiple of TILE.
    capacity: usize,
    /// `[batch, heads, capacity / TILE, d_k, TILE]`.
    k: Vec<T>,
    /// `[batch, heads, capacity, d_k]`.
    v: Vec<T>,
}

/// Positions per key tile: one AVX-512 register of f32, two of AVX2.
pub(super) const TILE: usize = 16;

impl<T: Float> TiledKvCache<T> {
    /// An empty cache (nothing is allocated before the first append).
    pub fn new(batch: usize, heads: usize, d_k: usize) -> Self {
        Self {
            batch,
            heads,
            d_k,
            len: 0,
            capacity: 0,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions the cache holds before it next grows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `p` positions to every sequence: `k` and `v` are `[batch, p, heads * d_k]`.
    pub fn append(&mut self, k: &[T], v: &[T], p: usize) {
        let hd = self.heads * self.d_k;
        assert_eq!(
            k.len(),
            self.batch * p * hd,
            "keys are not [batch, p, heads * d_k]"
        );
        assert_eq!(v.len(), k.len(), "values are not [batch, p, heads * d_k]");
        self.append_with(p, |r| &k[r * hd..][..hd], |r| &v[r * hd..][..hd]);
    }

    /// Appends `p` positions to every sequence from `rows [batch, p, width]`, the output of a fused
    /// projection: each row holds its keys at `k_at .. k_at + heads * d_k` and its values at
    /// `v_at ..`. They are read in place.
    pub fn append_packed(&mut self, rows: &[T], width: usize, k_at: usize, v_at: usize, p: usize) {
        let hd = self.heads * self.d_k;
        assert_eq!(
            rows.len(),
            self.batch * p * width,
            "rows are not [batch, p, width]"
        );
        assert!(
            k_at.max(v_at) + hd <= width,
            "keys or values lie outside the rows"
        );
        self.append_with(
            p,
            |r| &rows[r * width + k_at..][..hd],
            |r| &rows[r * width + v_at..][..hd],
        );
    }

    /// Elements of one head's keys (and of its values).
    fn head_len(&self) -> usize {
        self.capacity * self.d_k
    }

    /// Appends `p` positions, row `r = b * p + i` reading its keys and values from the closures.
    fn append_with<'a>(
        &mut self,
        p: usize,
        keys: impl Fn(usize) -> &'a [T],
        values: impl Fn(usize) -> &'a [T],
    ) where
        T: 'a,
    {
        let dk = self.d_k;
        self.reserve(p);
        let head_len = self.head_len();
        for b in 0..self.batch {
            for i in 0..p {
                let pos = self.len + i;
                let (k, v) = (keys(b * p + i), values(b * p + i));
                for h in 0..self.heads {
                    let at = (b * self.heads + h) * head_len;
                    let tile = at + pos / TILE * dk * TILE + pos % TILE;
                    for c in 0..dk {
                        self.k[tile + c * TILE] = k[h * dk + c];
                    }
                    self.v[at + pos * dk..][..dk].copy_from_slice(&v[h * dk..][..dk]);
                }
            }
        }
        self.len += p;
    }

    /// Room for `extra` more positions; grows by doubling, moving what is cached once.
    fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.capacity {
            return;
        }
        let cap = need
            .max(2 * self.capacity)
            .max(FIRST_CAPACITY)
            .next_multiple_of(TILE);
        let (heads, dk) = (self.batch * self.heads, self.d_k);
        let (old, new) = (self.head_len(), cap * dk);
        // What each head holds: whole key tiles, and the values of every position.
        let used = self.len.next_multiple_of(TILE) * dk;
        let grow = |x: &[T]| {
            let mut y = vec![T::zero(); heads * new];
            for h in 0..heads {
                y[h * new..][..used].copy_from_slice(&x[h * old..][..used]);
            }
            y
        };
        (self.k, self.v) = (grow(&self.k), grow(&self.v));
        self.capacity = cap;
    }

    /// Causal attention of the `p` newest positions of each sequence: row `i` of `q [batch, p,
    /// heads * d_k]` (scaled already) is position `len - p + i` and sees positions `0 ..= len - p + i`.
    /// Writes `out [batch, p, heads * d_k]`.
    pub fn attend_causal(&self, q: &[T], p: usize, out: &mut [T]) {
        assert!(
            p <= self.len,
            "{p} new rows, but only {} positions cached",
            self.len
        );
        self.attend(q, p, out, true)
    }

    /// Every row of `q [batch, rows, heads * d_k]` attends to all cached positions.
    pub fn attend_all(&self, q: &[T], rows: usize, out: &mut [T]) {
        self.attend(q, rows, out, false)
    }

    fn attend(&self, q: &[T], rows: usize, out: &mut [T], causal: bool) {
        let hd = self.heads * self.d_k;
        assert_eq!(
            q.len(),
            self.batch * rows * hd,
            "queries are not [batch, rows, heads * d_k]"
        );
        assert_eq!(out.len(), q.len(), "out is not [batch, rows, heads * d_k]");
        let head_len = self.head_len();
        // Row `r`'s heads `h0 ..` (as many as `out` holds) into `out`.
        let heads = |r: usize, h0: usize, q: &[T], out: &mut [T]| {
            let (b, i) = (r / rows.max(1), r % rows.max(1));
            let seen = if causal {
                self.len - rows + i + 1
            } else {
                self.len
            };
            // Whole tiles of scores: the positions past `seen` are computed and ignored.
            let mut scores = vec![T::zero(); seen.next_multiple_of(TILE)];
            let dk = self.d_k;
            for (h, out) in (h0..).zip(out.chunks_exact_mut(dk)) {
                let at = (b * self.heads + h) * head_len;
                attend_head(
                    &q[h * dk..][..dk],
                    &self.k[at..][..head_len],
                    &self.v[at..][..head_len],
                    seen,
                    &mut scores,
                    out,
                );
            }
        };
        let one = |(r, (q, out)): (usize, (&[T], &mut [T]))| heads(r, 0, q, out);
        if self.batch * rows == 1 && self.heads >= 2 && rayon::current_num_threads() > 1 {
            // One row: each core takes half of the heads.
            let half = self.heads / 2;
            let (o0, o1) = out.split_at_mut(half * self.d_k);
            super::pair::join(|| heads(0, 0, q, o0), || heads(0, half, q, o1));
        } else if self.batch * rows < 2 * MIN_ROWS_PER_TASK {
            q.chunks(hd)
                .zip(out.chunks_mut(hd))
                .enumerate()
                .for_each(one);
        } else if rayon::current_num_threads() == 2 {
            // Two threads: half of the rows each, as in `RowLinear`.
            super::pair::halves(q, out, self.batch * rows, |r0, q, out| {
                (r0..)
                    .zip(q.chunks(hd).zip(out.chunks_mut(hd)))
                    .for_each(one)
            });
        } else {
            q.par_chunks(hd)
                .zip(out.par_chunks_mut(hd))
                .enumerate()
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(one);
        }
    }
}

multiversioned!(fn attend_head<T: Float>(q: &[T], k: &[T], v: &[T], n: usize, scores: &mut [T], out: &mut [T]) => attend_head_body);

/// One head of one query over its first `n` positions: `out = softmax(q K^T) V`, with `k` the
/// head's key tiles and `v` its values by position. `scores` has room for whole tiles.
#[inline(always)]
fn attend_head_body<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    n: usize,
    scores: &mut [T],
    out: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx2_fma() {
        if let (Some(q), Some(k), Some(v), Some(s), Some(o)) = (
            T::f32s(q),
            T::f32s(k),
            T::f32s(v),
            T::f32s_mut(scores),
            T::f32s_mut(out),
        ) {
            use super::head_avx2::attend_head as avx2;
            // SAFETY: AVX2 and FMA were detected; the kernel checks the slices' lengths.
            unsafe {
                match q.len() {
                    8 => return avx2::<1, 4>(q, k, v, n, s, o),
                    16 => return avx2::<2, 4>(q, k, v, n, s, o),
                    32 => return avx2::<4, 2>(q, k, v, n, s, o),
                    64 => return avx2::<8, 1>(q, k, v, n, s, o),
                    _ => {}
                }
            }
        }
    }
    match q.len() {
        16 => attend_head_dk::<T, 16>(q, k, v, n, scores, out),
        32 => attend_head_dk::<T, 32>(q, k, v, n, scores, out),
        64 => attend_head_dk::<T, 64>(q, k, v, n, scores, out),
        _ => {
            score_tiles(q, k, n, scores);
            let inv = softmax_in_place(&mut scores[..n]);
            out.iter_mut().for_each(|o| *o = T::zero());
            for (j, &s) in scores[..n].iter().enumerate() {
                let row = &v[j * q.len()..][..q.len()];
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = s.mul_add_(x, *o);
                }
            }
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// [`attend_head_body`] for a `d_k` known at compile time, so that the output's `D` sums stay in
/// registers.
#[inline(always)]
fn attend_head_dk<T: Float, const D: usize>(
    q: &[T],
    k: &[T],
    v: &[T],
    n: usize,
    scores: &mut [T],
    out: &mut [T],
) {
    score_tiles(q, k, n, scores);
    ahead(v, 0, AHEAD * D);
    let inv = softmax_in_place(&mut scores[..n]);
    // PARTS sums over interleaved positions, so the multiply-adds do not wait on each other.
    let mut part = [[T::zero(); D]; PARTS];
    let mut rows = v[..n * D].chunks_exact(PARTS * D);
    let mut ps = scores[..n].chunks_exact(PARTS);
    for (j, (vs, ps)) in (&mut rows).zip(&mut ps).enumerate() {
        ahead(v, (j * PARTS + AHEAD) * D, PARTS * D);
        for (t, acc) in part.iter_mut().enumerate() {
            let (p, row) = (ps[t], &vs[t * D..][..D]);
            for c in 0..D {
                acc[c] = p.mul_add_(row[c], acc[c]);
            }
        }
    }
    for (row, &p) in rows.remainder().chunks_exact(D).zip(ps.remainder()) {
        for c in 0..D {
            part[0][c] = p.mul_add_(row[c], part[0][c]);
        }
    }
    for c in 0..D {
        let sum = part.iter().fold(T::zero(), |s, acc| s + acc[c]);
        out[c] = sum * inv;
    }
}

/// The scores `q . k_j` of the tiles covering positions `0 .. n`, BLOCK tiles at a time (their
/// sums are independent chains), then one by one.
#[inline(always)]
fn score_tiles<T: Float>(q: &[T], k: &[T], n: usize, scores: &mut [T]) {
    let dk = q.len();
    let tiles = n.div_ceil(TILE);
    let wide = tiles / BLOCK * BLOCK;
    let block = BLOCK * dk * TILE;
    ahead(k, 0, 2 * block);
    for t0 in (0..wide).step_by(BLOCK) {
        ahead(k, (t0 / BLOCK + 2) * block, block);
        let mut acc = [[T::zero(); TILE]; BLOCK];
        for (c, &qc) in q.iter().enumerate() {
            for (b, a) in acc.iter_mut().enumerate() {
                let kt: &[T; TILE] = k[((t0 + b) * dk + c) * TILE..][..TILE]
                    .try_into()
                    .expect("a tile");
                for l in 0..TILE {
                    a[l] = qc.mul_add_(kt[l], a[l]);
                }
            }
        }
        for (b, a) in acc.iter().enumerate() {
            scores[(t0 + b) * TILE..][..TILE].copy_from_slice(a);
        }
    }
    for t in wide..tiles {
        let mut acc = [T::zero(); TILE];
        for (c, &qc) in q.iter().enumerate() {
            let kt: &[T; TILE] = k[(t * dk + c) * TILE..][..TILE].try_into().expect("a tile");
            for l in 0..TILE {
                acc[l] = qc.mul_add_(kt[l], acc[l]);
            }
        }
        scores[t * TILE..][..TILE].copy_from_slice(&acc);
    }
}

/// Asks for `x[at .. at + len]` (what lies past the end is not asked for): the cache is read
/// as a stream that crosses a page every few tiles, where the hardware's prefetchers start over.
#[inline(always)]
pub(super) fn ahead<T>(x: &[T], at: usize, len: usize) {
    if at < x.len() {
        let len = len.min(x.len() - at);
        crate::isa::prefetch(
            x[at..].as_ptr() as *const u8,
            len * std::mem::size_of::<T>(),
        );
    }
}

/// Positions of values asked for ahead of the one being read.
pub(super) const AHEAD: usize = 32;

/// `scores <- exp(scores - max)`; returns `1 / sum`.
#[inline(always)]
fn softmax_in_place<T: Float>(scores: &mut [T]) -> T {
    let max = lanes(scores, T::NEG_INF, |a, b| if b > a { b } else { a });
    scores.iter_mut().for_each(|s| *s = (*s - max).exp_());
    T::one() / lanes(scores, T::zero(), |a, b| a + b)
}

/// Key tiles scored at once: their sums are independent chains.
pub(super) const BLOCK: usize = 4;
/// Interleaved partial sums of the output.
const PARTS: usize = 4;
/// Lanes of the reductions: BLOCK tiles' worth, enough to hide the latency of an add.
const LANES: usize = BLOCK * TILE;

/// A reduction in LANES independent lanes, so that it vectorises and its chains overlap.
#[inline(always)]
fn lanes<T: Float>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = f(acc[k], c[k]);
        }
    }
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    acc.iter().fold(tail, |a, &b| f(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_diff, randn, seed};
    use candle_core::{DType, Device, Tensor, D};

    /// `softmax(q k^T + causal mask) v` by candle's ops, per `[batch, heads]`: q `[B, H, p, dk]`
    /// at positions `len - p ..`, k and v `[B, H, len, dk]`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
        let (p, len) = (q.dim(2).unwrap(), k.dim(2).unwrap());
        let mask: Vec<f64> = (0..p)
            .flat_map(|i| {
                (0..len).map(move |j| {
                    if causal && j > len - p + i {
                        f64::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (p, len), &Device::Cpu)
            .unwrap()
            .to_dtype(q.dtype())
            .unwrap();
        let s = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    /// `[B, H, s, dk]` as the cache's `[B, s, H * dk]` rows.
    fn rows<T: Float>(t: &Tensor) -> Vec<T> {
        super::super::values(&t.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap()
    }

    fn check<T: Float>(dtype: DType, tol: f64, (b, h, dk): (usize, usize, usize)) {
        seed(7);
        let mut cache = TiledKvCache::<T>::new(b, h, dk);
        let (mut ks, mut vs) = (vec![], vec![]);
        // Appends of 1, 3, 70, 1 and 130 positions: the third grows the cache past its first
        // capacity and the last twice more, so what was cached must survive the moves; 130 and
        // more positions cover the 64-wide score blocks and their tail.
        for p in [1, 3, 70, 1, 130] {
            let (k, v) = (randn(&[b, h, p, dk], dtype), randn(&[b, h, p, dk], dtype));
            cache.append(&rows::<T>(&k), &rows::<T>(&v), p);
            ks.push(k);
            vs.push(v);
            let (k, v) = (Tensor::cat(&ks, 2).unwrap(), Tensor::cat(&vs, 2).unwrap());
            assert_eq!(cache.len(), k.dim(2).unwrap());
            for (causal, rows_) in [(true, p), (false, 4)] {
                let q = randn(&[b, h, rows_, dk], dtype);
                let mut out = vec![T::zero(); b * rows_ * h * dk];
                if causal {
                    cache.attend_causal(&rows::<T>(&q), rows_, &mut out);
                } else {
                    cache.attend_all(&rows::<T>(&q), rows_, &mut out);
                }
                let want = reference(&q, &k, &v, causal).transpose(1, 2).unwrap();
                let got = Tensor::from_vec(out, (b, rows_, h, dk), &Device::Cpu).unwrap();
                let d = max_diff(&got, &want);
                assert!(
                    d < tol,
                    "{dtype:?} causal {causal} after {} positions: {d}",
                    cache.len()
                );
            }
        }
        assert!(cache.capacity() >= 205);
    }

    #[test]
    fn attention_over_the_cache_equals_candles_composition() {
        // d_k 5 takes the general loop; 16 and 32 the ones compiled for their width.
        for shape in [(2, 3, 5), (1, 2, 16), (2, 1, 32)] {
            check::<f32>(DType::F32, 1e-5, shape);
            check::<f64>(DType::F64, 1e-12, shape);
        }
    }
}
