//! A KV cache written in place, and attention of new rows over it.

use super::MIN_ROWS_PER_TASK;
use crate::float::Float;
use crate::isa::multiversioned;
use rayon::prelude::*;

/// Capacity of a cache's first allocation, in positions.
const FIRST_CAPACITY: usize = 64;

/// The keys and values of `batch` sequences, `heads` heads of `d_k`, at every position so far.
/// Both are held transposed, `[batch, heads, d_k, capacity]`: a query's scores for 16 positions
/// at a time, and its output's `d_k` sums over the positions, then accumulate in registers.
#[derive(Debug, Clone)]
pub struct KvCache<T> {
    batch: usize,
    heads: usize,
    d_k: usize,
    len: usize,
    capacity: usize,
    k_t: Vec<T>,
    v_t: Vec<T>,
}

impl<T: Float> KvCache<T> {
    /// An empty cache (nothing is allocated before the first append).
    pub fn new(batch: usize, heads: usize, d_k: usize) -> Self {
        Self {
            batch,
            heads,
            d_k,
            len: 0,
            capacity: 0,
            k_t: Vec::new(),
            v_t: Vec::new(),
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
        let cap = self.capacity;
        for b in 0..self.batch {
            for i in 0..p {
                let pos = self.len + i;
                let (k, v) = (keys(b * p + i), values(b * p + i));
                for h in 0..self.heads {
                    let at = ((b * self.heads + h) * dk) * cap + pos;
                    for c in 0..dk {
                        self.k_t[at + c * cap] = k[h * dk + c];
                        self.v_t[at + c * cap] = v[h * dk + c];
                    }
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
        let cap = need.max(2 * self.capacity).max(FIRST_CAPACITY);
        let (rows, old, len) = (self.batch * self.heads * self.d_k, self.capacity, self.len);
        let grow = |x: &[T]| {
            let mut y = vec![T::zero(); rows * cap];
            for r in 0..rows {
                y[r * cap..][..len].copy_from_slice(&x[r * old..][..len]);
            }
            y
        };
        (self.k_t, self.v_t) = (grow(&self.k_t), grow(&self.v_t));
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
        let one = |(r, (q, out)): (usize, (&[T], &mut [T]))| {
            let (b, i) = (r / rows.max(1), r % rows.max(1));
            let seen = if causal {
                self.len - rows + i + 1
            } else {
                self.len
            };
            let mut scores = vec![T::zero(); seen];
            for h in 0..self.heads {
                let dk = self.d_k;
                let at = (b * self.heads + h) * dk * self.capacity;
                attend_head(
                    &q[h * dk..][..dk],
                    &self.k_t[at..],
                    &self.v_t[at..],
                    self.capacity,
                    &mut scores,
                    &mut out[h * dk..][..dk],
                );
            }
        };
        if self.batch * rows < 2 * MIN_ROWS_PER_TASK {
            q.chunks(hd)
                .zip(out.chunks_mut(hd))
                .enumerate()
                .for_each(one);
        } else {
            q.par_chunks(hd)
                .zip(out.par_chunks_mut(hd))
                .enumerate()
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(one);
        }
    }
}

multiversioned!(fn attend_head<T: Float>(q: &[T], k_t: &[T], v_t: &[T], capacity: usize, scores: &mut [T], out: &mut [T]) => attend_head_body);

/// One head of one query over the first `scores.len()` positions: `out = softmax(q K^T) V`, with
/// `k_t` and `v_t` the head's `[d_k, capacity]` keys and values.
#[inline(always)]
fn attend_head_body<T: Float>(
    q: &[T],
    k_t: &[T],
    v_t: &[T],
    capacity: usize,
    scores: &mut [T],
    out: &mut [T],
) {
    let n = scores.len();
    // Scores BLOCKS x 16 positions at a time, summed over d_k in registers (independent chains,
    // so the adds do not wait on each other), then 16 at a time, then one by one.
    let wide = n / (BLOCKS * LANES) * (BLOCKS * LANES);
    for j0 in (0..wide).step_by(BLOCKS * LANES) {
        score_block::<T, { BLOCKS * LANES }>(q, k_t, capacity, j0, scores);
    }
    let narrow = n / LANES * LANES;
    for j0 in (wide..narrow).step_by(LANES) {
        score_block::<T, LANES>(q, k_t, capacity, j0, scores);
    }
    for (j, s) in scores.iter_mut().enumerate().skip(narrow) {
        *s = q
            .iter()
            .enumerate()
            .fold(T::zero(), |a, (c, &qc)| a + qc * k_t[c * capacity + j]);
    }
    let max = lanes(scores, T::NEG_INF, |a, b| if b > a { b } else { a });
    scores.iter_mut().for_each(|s| *s = (*s - max).exp_());
    let inv = T::one() / lanes(scores, T::zero(), |a, b| a + b);
    for (c, o) in out.iter_mut().enumerate() {
        let v = &v_t[c * capacity..][..n];
        *o = dot(scores, v) * inv;
    }
}

/// The scores of positions `j0 .. j0 + W`: `q . k_j` summed over d_k in W registers' lanes.
#[inline(always)]
fn score_block<T: Float, const W: usize>(
    q: &[T],
    k_t: &[T],
    capacity: usize,
    j0: usize,
    scores: &mut [T],
) {
    let mut acc = [T::zero(); W];
    for (c, &qc) in q.iter().enumerate() {
        let k: &[T; W] = k_t[c * capacity + j0..][..W].try_into().expect("a block");
        for l in 0..W {
            acc[l] = qc.mul_add_(k[l], acc[l]);
        }
    }
    scores[j0..j0 + W].copy_from_slice(&acc);
}

/// Positions a score block covers, and lanes of the reductions: one AVX-512 register of f32.
const LANES: usize = 16;
/// Independent accumulators of LANES each: enough to hide the latency of an add.
const BLOCKS: usize = 4;

/// `sum a_j b_j` in BLOCKS x LANES independent lanes, then LANES, then one by one.
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    const W: usize = BLOCKS * LANES;
    let n = a.len().min(b.len());
    let (wide, narrow) = (n / W * W, n / LANES * LANES);
    let mut acc = [T::zero(); W];
    for (x, y) in a[..wide].chunks_exact(W).zip(b[..wide].chunks_exact(W)) {
        for l in 0..W {
            acc[l] = x[l].mul_add_(y[l], acc[l]);
        }
    }
    for (x, y) in a[wide..narrow]
        .chunks_exact(LANES)
        .zip(b[wide..narrow].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] = x[l].mul_add_(y[l], acc[l]);
        }
    }
    let tail = a[narrow..n]
        .iter()
        .zip(&b[narrow..n])
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(tail, |s, &x| s + x)
}

/// A reduction in BLOCKS x LANES independent lanes, so that it vectorises and its chains overlap.
#[inline(always)]
fn lanes<T: Float>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    const W: usize = BLOCKS * LANES;
    let mut acc = [init; W];
    let mut chunks = x.chunks_exact(W);
    for c in &mut chunks {
        for k in 0..W {
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

    fn check<T: Float>(dtype: DType, tol: f64) {
        seed(7);
        let (b, h, dk) = (2, 3, 5);
        let mut cache = KvCache::<T>::new(b, h, dk);
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
        check::<f32>(DType::F32, 1e-5);
        check::<f64>(DType::F64, 1e-12);
    }
}
