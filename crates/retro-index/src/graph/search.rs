//! The layered walk: a greedy descent through the upper layers, then a beam of width `ef` on the
//! layer below. The build runs the same walk for every node it inserts.

use super::Graph;
use crate::distance::DotFn;
use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A node and its distance to the query, ordered by distance, then id.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) struct Cand(pub f32, pub u32);
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// The keys the graph links, row-major, with the dot product chosen for this CPU.
#[derive(Clone, Copy)]
pub(crate) struct Keys<'a> {
    rows: &'a [f32],
    dim: usize,
    dot: DotFn,
}

impl<'a> Keys<'a> {
    pub(crate) fn new(rows: &'a [f32], dim: usize) -> Self {
        Self {
            rows,
            dim,
            dot: crate::distance::dot_fn(),
        }
    }

    /// Rows (nodes).
    pub(crate) fn len(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    #[inline]
    pub(crate) fn row(&self, id: u32) -> &'a [f32] {
        let s = id as usize * self.dim;
        &self.rows[s..s + self.dim]
    }

    /// `1 - a·b`, not clamped: the walk orders by it; hits are clamped at 0 when returned.
    #[inline]
    pub(crate) fn dist(&self, q: &[f32], id: u32) -> f32 {
        1.0 - (self.dot)(q, self.row(id))
    }

    /// Between two nodes.
    #[inline]
    pub(crate) fn between(&self, a: u32, b: u32) -> f32 {
        1.0 - (self.dot)(self.row(a), self.row(b))
    }

    /// Asks for a row's cache lines, so that the walk's next distances do not each wait for
    /// memory (at 1M keys the rows are far outside the caches).
    #[inline]
    fn prefetch(&self, id: u32) {
        let row = self.row(id);
        retro_kernels::isa::prefetch(row.as_ptr() as *const u8, 4 * row.len())
    }

    /// The exact metric for query `q`.
    pub(crate) fn exact(self, q: &'a [f32]) -> Exact<'a> {
        Exact { keys: self, q }
    }
}

/// A query's distance to the graph's nodes: what the walk measures.
pub(crate) trait Metric {
    fn dist(&self, id: u32) -> f32;
    /// Asks for what `dist(id)` will read.
    fn prefetch(&self, id: u32);
}

/// `1 - q·key` over the f32 keys.
pub(crate) struct Exact<'a> {
    keys: Keys<'a>,
    q: &'a [f32],
}

impl Metric for Exact<'_> {
    #[inline]
    fn dist(&self, id: u32) -> f32 {
        self.keys.dist(self.q, id)
    }
    #[inline]
    fn prefetch(&self, id: u32) {
        self.keys.prefetch(id)
    }
}

/// Per thread, what a walk needs and would otherwise allocate each time: one visited byte per
/// node, valid when it equals the walk's generation (so a walk starts without clearing `n` bytes;
/// they are cleared once every 255 walks), the two heaps and the neighbour lists.
#[derive(Default)]
struct Scratch {
    marks: Vec<u8>,
    generation: u8,
    candidates: BinaryHeap<Reverse<Cand>>,
    results: BinaryHeap<Cand>,
    links: Vec<u32>,
    fresh: Vec<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch; with a fresh one when it is in use, as when a filtered
/// search's `keep` searches again.
fn scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Runs `f` with the scratch, its marks sized for `n` nodes, and the walk's generation.
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut Scratch, u8) -> R) -> R {
    scratch(|s| {
        if s.marks.len() < n {
            s.marks = vec![0; n];
            s.generation = 0;
        }
        s.generation = s.generation.wrapping_add(1);
        if s.generation == 0 {
            s.marks.fill(0);
            s.generation = 1;
        }
        let g = s.generation;
        f(s, g)
    })
}

impl Graph {
    /// Greedy descent on `level` from `start`: moves to the nearest neighbour while it is nearer.
    pub(crate) fn greedy(&self, metric: &impl Metric, start: Cand, level: usize) -> Cand {
        // Only the neighbour list: no generation is used up.
        scratch(|s| {
            let mut cur = start;
            loop {
                self.links_into(cur.1, level, &mut s.links);
                let mut moved = false;
                for &nb in &s.links {
                    let d = metric.dist(nb);
                    if d < cur.0 {
                        cur = Cand(d, nb);
                        moved = true;
                    }
                }
                if !moved {
                    return cur;
                }
            }
        })
    }

    /// The beam search of width `ef` on `level` from `entry`: the `ef` nearest nodes found, nearest
    /// first. With `keep`, the walk still goes through every node, but only kept nodes are
    /// answers; it stops once `ef` kept nodes are nearer than the rest, or the graph is exhausted.
    pub(crate) fn search_layer(
        &self,
        metric: &impl Metric,
        entry: Cand,
        ef: usize,
        level: usize,
        keep: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<Cand> {
        with_scratch(self.n, |s, g| {
            let Scratch {
                marks,
                candidates,
                results,
                links,
                fresh,
                ..
            } = s;
            candidates.clear();
            results.clear();
            let kept = |id: u32| keep.is_none_or(|f| f(id));
            marks[entry.1 as usize] = g;
            candidates.push(Reverse(entry));
            if kept(entry.1) {
                results.push(entry);
            }
            while let Some(Reverse(c)) = candidates.pop() {
                let worst = |r: &BinaryHeap<Cand>| r.peek().map_or(f32::INFINITY, |w| w.0);
                if results.len() >= ef && c.0 > worst(results) {
                    break;
                }
                // The next node to expand is most often the nearest candidate now: its list is
                // fetched while this one's neighbours are measured.
                if let Some(Reverse(next)) = candidates.peek() {
                    self.prefetch_links(next.1, level);
                }
                self.links_into(c.1, level, links);
                // Without a branch per neighbour: visited or not is a coin flip the predictor
                // misses, and each miss would wait for its mark's cache line in turn.
                fresh.clear();
                fresh.resize(links.len(), 0);
                let mut len = 0;
                for &nb in links.iter() {
                    let mark = &mut marks[nb as usize];
                    fresh[len] = nb;
                    len += (*mark != g) as usize;
                    *mark = g;
                }
                fresh.truncate(len);
                for &nb in fresh.iter() {
                    metric.prefetch(nb);
                }
                for &nb in fresh.iter() {
                    let d = metric.dist(nb);
                    if results.len() < ef || d < worst(results) {
                        candidates.push(Reverse(Cand(d, nb)));
                        if kept(nb) {
                            results.push(Cand(d, nb));
                            if results.len() > ef {
                                results.pop();
                            }
                        }
                    }
                }
            }
            let mut found: Vec<Cand> = results.drain().collect();
            found.sort();
            found
        })
    }

    /// The `k` nearest nodes with breadth `ef` (raised to `k`, capped at the graph's size),
    /// nearest first, as `(node, 1 - cosine clamped at 0)`. The walk measures with `metric`; with
    /// `rerank`, the `ef` nodes it found are measured again with that one and the best `k` kept
    /// (a walk over 8-bit codes answers with exact distances).
    pub(crate) fn search(
        &self,
        metric: &impl Metric,
        rerank: Option<&Exact>,
        k: usize,
        ef: usize,
        keep: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(u32, f32)> {
        if k == 0 || self.n == 0 {
            return Vec::new();
        }
        let ef = ef.max(k).min(self.n);
        let mut ep = Cand(metric.dist(self.entry), self.entry);
        for level in (1..=self.top).rev() {
            ep = self.greedy(metric, ep, level);
        }
        let mut found = self.search_layer(metric, ep, ef, 0, keep);
        if let Some(exact) = rerank {
            for c in &found {
                exact.prefetch(c.1);
            }
            for c in &mut found {
                c.0 = exact.dist(c.1);
            }
            found.sort();
        }
        found.truncate(k);
        found.into_iter().map(|c| (c.1, c.0.max(0.0))).collect()
    }
}
