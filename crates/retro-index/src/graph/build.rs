//! Insertion (Malkov & Yashunin 2018, algorithms 1 and 4), in parallel: each thread inserts its own
//! nodes, holding one node's lock at a time while it rewrites that node's list, as hnswlib and
//! faiss do. Levels are drawn from a hash of the node's id, so they do not depend on the order of
//! insertion; with `deterministic`, nodes go in one at a time in id order and the graph is the same
//! on every build.

use super::search::{Cand, Keys, Metric};
use super::{Graph, MAX_LEVEL};
use rayon::prelude::*;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Nodes inserted between two progress reports.
const BLOCK: usize = 2048;
/// Node locks, striped: node `i` takes lock `i % LOCKS`. A thread holds one at a time, so
/// sharing cannot deadlock; with a handful of threads it rarely even waits.
const LOCKS: usize = 4096;
const LEVEL_SEED: u64 = 0x5245_5452_4f32_3032;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `floor(-ln(u) / ln(M))` for a uniform `u` drawn from the id: the paper's level distribution.
fn level_of(id: usize, m: usize) -> u8 {
    let u = (splitmix64(LEVEL_SEED ^ id as u64) >> 11) as f64 / (1u64 << 53) as f64;
    let level = (-(1.0 - u).ln() / (m as f64).ln()).floor();
    (level as usize).min(MAX_LEVEL) as u8
}

/// Two keys this close (`1 - cosine`) are the same key: repeated text gives identical keys.
const DUPLICATE: f32 = 1e-6;

/// The heuristic of the paper's algorithm 4 (hnswlib's `getNeighborsByHeuristic2`): from
/// candidates sorted nearest first, keep one only if it is nearer to the base than to every node
/// kept so far, up to `cap`. Fewer than `cap` candidates are all kept.
///
/// In both cases a candidate equal to a node already kept is dropped too: it points nowhere new.
/// Without that, a key repeated more than `cap` times (boilerplate chunks) fills its copies' lists
/// with each other, and a walk that enters them cannot leave: 2% of a lexical database's chunks
/// were not found by their own keys.
fn select(keys: &Keys, candidates: &[Cand], cap: usize) -> Vec<Cand> {
    let all = candidates.len() <= cap;
    let mut kept: Vec<Cand> = Vec::with_capacity(cap.min(candidates.len()));
    for &c in candidates {
        if kept.len() >= cap {
            break;
        }
        if kept.iter().all(|r| {
            let between = keys.between(c.1, r.1);
            between > DUPLICATE && (all || between >= c.0)
        }) {
            kept.push(c);
        }
    }
    kept
}

struct Builder<'a> {
    graph: &'a Graph,
    keys: Keys<'a>,
    ef_construction: usize,
    locks: Vec<Mutex<()>>,
    /// The entry point and the top layer so far.
    entry: Mutex<(u32, usize)>,
}

/// A lock's data is `()`: a thread that panicked holding it left nothing half-written that a
/// reader could not already see, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Builder<'_> {
    fn insert(&self, q: u32) {
        let g = self.graph;
        let level = g.level(q);
        let guard = lock(&self.entry);
        let (ep, top) = *guard;
        // A node that rises above the top keeps the entry locked while it links, as in hnswlib:
        // no other node may enter through it before it has links.
        let hold = (level > top).then_some(guard);
        let metric = self.keys.exact(self.keys.row(q));
        let mut cur = Cand(metric.dist(ep), ep);
        for l in (level + 1..=top).rev() {
            cur = g.greedy(&metric, cur, l);
        }
        for l in (0..=level.min(top)).rev() {
            let mut found = g.search_layer(&metric, cur, self.ef_construction, l, None);
            found.retain(|c| c.1 != q);
            if let Some(&nearest) = found.first() {
                cur = nearest;
            }
            let chosen = select(&self.keys, &found, g.capacity(l));
            {
                let _held = lock(&self.locks[q as usize % LOCKS]);
                g.set_links(q, l, chosen.iter().map(|c| c.1));
            }
            for c in &chosen {
                self.link_back(c.1, q, l, c.0);
            }
        }
        if let Some(mut guard) = hold {
            *guard = (q, level);
        }
    }

    /// Adds `q` (at distance `d`) to `e`'s list at `level`; a full list is pruned by [`select`].
    fn link_back(&self, e: u32, q: u32, level: usize, d: f32) {
        let g = self.graph;
        let cap = g.capacity(level);
        let _held = lock(&self.locks[e as usize % LOCKS]);
        let mut links = Vec::with_capacity(cap + 1);
        g.links_into(e, level, &mut links);
        if links.contains(&q) {
            return;
        }
        if links.len() < cap {
            links.push(q);
            g.set_links(e, level, links.into_iter());
            return;
        }
        let mut candidates: Vec<Cand> = links
            .iter()
            .map(|&x| Cand(self.keys.between(e, x), x))
            .chain([Cand(d, q)])
            .collect();
        candidates.sort();
        let chosen = select(&self.keys, &candidates, cap);
        g.set_links(e, level, chosen.iter().map(|c| c.1));
    }
}

/// Gives every layer-0 node that no list points to (its in-links were pruned away as nearer nodes
/// arrived, as happens to some early nodes) a link from its nearest neighbour. A full list gives
/// up its farthest link whose target has another in-link. Without this, about 1 in 1,600 keys of
/// a lexical database could not be found even by itself.
fn link_orphans(graph: &Graph, keys: &Keys, entry: u32) {
    let n = graph.len();
    let mut indegree = vec![0u32; n];
    let mut links = Vec::with_capacity(graph.capacity(0));
    for i in 0..n as u32 {
        graph.links_into(i, 0, &mut links);
        for &x in &links {
            indegree[x as usize] += 1;
        }
    }
    let mut theirs = Vec::with_capacity(graph.capacity(0) + 1);
    for q in 0..n as u32 {
        if indegree[q as usize] > 0 || q == entry {
            continue;
        }
        graph.links_into(q, 0, &mut links);
        let mut near: Vec<Cand> = links.iter().map(|&e| Cand(keys.between(q, e), e)).collect();
        near.sort();
        for Cand(_, e) in near {
            graph.links_into(e, 0, &mut theirs);
            if theirs.len() < graph.capacity(0) {
                theirs.push(q);
            } else {
                let far = theirs
                    .iter()
                    .enumerate()
                    .filter(|&(_, &x)| indegree[x as usize] > 1)
                    .map(|(j, &x)| (keys.between(e, x), j))
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                let Some((_, j)) = far else { continue };
                indegree[theirs[j] as usize] -= 1;
                theirs[j] = q;
            }
            indegree[q as usize] += 1;
            graph.set_links(e, 0, theirs.iter().copied());
            break;
        }
    }
}

/// Builds the graph over `keys`' rows (node i = row i). `progress(done, total)` follows each block.
pub(crate) fn build(
    keys: &Keys,
    m: usize,
    ef_construction: usize,
    deterministic: bool,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> Graph {
    let n = keys.len();
    let levels: Vec<u8> = (0..n).map(|i| level_of(i, m)).collect();
    let mut graph = Graph::empty(m, levels);
    if n == 0 {
        return graph;
    }
    let builder = Builder {
        graph: &graph,
        keys: *keys,
        ef_construction,
        locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
        entry: Mutex::new((0, graph.level(0))),
    };
    let mut done = 1;
    let mut next = 1u32;
    while (next as usize) < n {
        let end = (next as usize + BLOCK).min(n) as u32;
        if deterministic {
            (next..end).for_each(|q| builder.insert(q));
        } else {
            (next..end).into_par_iter().for_each(|q| builder.insert(q));
        }
        done += (end - next) as usize;
        next = end;
        if let Some(p) = progress {
            p(done, n);
        }
    }
    let (entry, top) = *lock(&builder.entry);
    link_orphans(&graph, keys, entry);
    drop(builder);
    graph.entry = entry;
    graph.top = top;
    graph
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_papers_distribution() {
        // P(level >= l) = M^-l: at M 16, 1/16 of the nodes reach layer 1 and 1/256 layer 2.
        let n = 200_000;
        let count = |min: u8| (0..n).filter(|&i| level_of(i, 16) >= min).count() as f64;
        let (one, two) = (count(1) / n as f64, count(2) / n as f64);
        assert!((one - 1.0 / 16.0).abs() < 0.003, "layer 1: {one}");
        assert!((two - 1.0 / 256.0).abs() < 0.001, "layer 2: {two}");
    }

    #[test]
    fn the_heuristic_drops_a_candidate_behind_a_kept_one() {
        // Base at the origin direction e0; b lies beyond a in the same direction, c elsewhere.
        let dim = 3;
        let rows = [
            1.0f32, 0.0, 0.0, // 0: the base
            0.8, 0.6, 0.0, // 1: a
            0.6, 0.8, 0.0, // 2: b, nearer to a than to the base
            0.6, 0.0, 0.8, // 3: c, another direction
        ];
        let keys = Keys::new(&rows, dim);
        let cands: Vec<Cand> = {
            let mut v: Vec<Cand> = (1..4).map(|i| Cand(keys.between(0, i), i)).collect();
            v.sort();
            v
        };
        let kept: Vec<u32> = select(&keys, &cands, 2).iter().map(|c| c.1).collect();
        assert_eq!(kept, vec![1, 3]);
        // Room for all: all are kept, nearest first.
        let all: Vec<u32> = select(&keys, &cands, 3).iter().map(|c| c.1).collect();
        assert_eq!(all, vec![1, 2, 3]);
    }
}
