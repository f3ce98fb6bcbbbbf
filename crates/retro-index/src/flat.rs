//! A flat, read-only copy of an hnsw_rs graph for fast search: contiguous vectors, layer-0 links in
//! CSR arrays, a generation-stamped visited array per thread. hnsw_rs' own search walks `Arc`s and
//! `RwLock`s and spends most of its time outside the distance; this walks the same graph ~3x faster.

use crate::distance::DistUnitDot;
use hnsw_rs::prelude::{Distance, Hnsw};
use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

#[derive(Clone, Copy, PartialEq)]
struct Cand(f32, u32);
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

/// The graph of an [`Hnsw`], flattened (ids are the data ids 0..n).
pub struct FlatGraph {
    dim: usize,
    vectors: Vec<f32>,
    offsets: Vec<u32>,
    links: Vec<u32>,
    /// Links on layers >= 1, for the few points that have them: `upper[p][l - 1]`.
    upper: HashMap<u32, Vec<Vec<u32>>>,
    entry: u32,
    top_layer: usize,
}

thread_local! {
    static VISITED: RefCell<(Vec<u32>, u32)> = const { RefCell::new((Vec::new(), 0)) };
}

impl FlatGraph {
    /// Copies the graph and vectors out of `hnsw`, whose data ids must be exactly `0..n`.
    /// Returns `None` if they are not (then callers keep using hnsw_rs' search).
    pub fn from_hnsw(hnsw: &Hnsw<'_, f32, DistUnitDot>, dim: usize) -> Option<Self> {
        let n = hnsw.get_nb_point();
        if n == 0 || n > u32::MAX as usize {
            return None;
        }
        let mut vectors = vec![0f32; n * dim];
        let mut layer0: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut seen = vec![false; n];
        let mut upper = HashMap::new();
        let mut entry = None;
        let mut top_layer = 0;
        for p in hnsw.get_point_indexation() {
            let id = p.get_origin_id();
            let v = p.get_v();
            if id >= n || seen[id] || v.len() != dim {
                return None;
            }
            seen[id] = true;
            vectors[id * dim..(id + 1) * dim].copy_from_slice(v);
            let level = p.get_point_id().0 as usize;
            let nbh = p.get_neighborhood_id();
            for (l, layer) in nbh.iter().enumerate().take(level + 1) {
                let ids: Vec<u32> = layer
                    .iter()
                    .map(|nb| nb.d_id as u32)
                    .filter(|&x| (x as usize) < n)
                    .collect();
                if l == 0 {
                    layer0[id] = ids;
                } else {
                    upper
                        .entry(id as u32)
                        .or_insert_with(|| vec![Vec::new(); level])[l - 1] = ids;
                }
            }
            if entry.is_none()
                || level > top_layer
                || (level == top_layer && Some(id as u32) < entry)
            {
                entry = Some(id as u32);
                top_layer = level;
            }
        }
        if seen.iter().any(|s| !s) {
            return None;
        }
        let mut offsets = Vec::with_capacity(n + 1);
        let mut links = Vec::new();
        offsets.push(0u32);
        for l in layer0 {
            links.extend_from_slice(&l);
            offsets.push(links.len() as u32);
        }
        Some(Self {
            dim,
            vectors,
            offsets,
            links,
            upper,
            entry: entry?,
            top_layer,
        })
    }

    #[inline]
    fn dist(&self, q: &[f32], id: u32) -> f32 {
        let i = id as usize * self.dim;
        DistUnitDot.eval(q, &self.vectors[i..i + self.dim])
    }

    /// The `k` nearest data ids to `q` with breadth `ef` (>= k), nearest first.
    pub fn search(&self, q: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        let n = self.offsets.len() - 1;
        // Never wider than the graph: a huge `ef` (a flag, a hand-edited manifest) costs nothing more.
        let ef = ef.max(k).min(n.max(1));
        // greedy descent through the upper layers
        let mut ep = self.entry;
        let mut d_ep = self.dist(q, ep);
        for layer in (1..=self.top_layer).rev() {
            loop {
                let mut changed = false;
                if let Some(nbs) = self.upper.get(&ep).and_then(|u| u.get(layer - 1)) {
                    for &nb in nbs {
                        let d = self.dist(q, nb);
                        if d < d_ep {
                            d_ep = d;
                            ep = nb;
                            changed = true;
                        }
                    }
                }
                if !changed {
                    break;
                }
            }
        }
        VISITED.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (stamps, gen) = &mut *guard;
            if stamps.len() < n {
                stamps.clear();
                stamps.resize(n, 0);
                *gen = 0;
            }
            *gen = gen.wrapping_add(1);
            if *gen == 0 {
                stamps.iter_mut().for_each(|s| *s = 0);
                *gen = 1;
            }
            let g = *gen;
            let mut candidates: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef * 4);
            let mut results: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef + 1);
            stamps[ep as usize] = g;
            candidates.push(Reverse(Cand(d_ep, ep)));
            results.push(Cand(d_ep, ep));
            while let Some(Reverse(Cand(d, c))) = candidates.pop() {
                if results.len() >= ef && d > results.peek().map_or(f32::INFINITY, |w| w.0) {
                    break;
                }
                let (s, e) = (
                    self.offsets[c as usize] as usize,
                    self.offsets[c as usize + 1] as usize,
                );
                for &nb in &self.links[s..e] {
                    if stamps[nb as usize] == g {
                        continue;
                    }
                    stamps[nb as usize] = g;
                    let dn = self.dist(q, nb);
                    if results.len() < ef || dn < results.peek().map_or(f32::INFINITY, |w| w.0) {
                        candidates.push(Reverse(Cand(dn, nb)));
                        results.push(Cand(dn, nb));
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
            let mut out: Vec<(usize, f32)> = results
                .into_sorted_vec()
                .into_iter()
                .map(|c| (c.1 as usize, c.0))
                .collect();
            out.truncate(k);
            out
        })
    }
}
