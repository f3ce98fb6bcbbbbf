//! The HNSW graph of Malkov & Yashunin (2018), built here in parallel and walked in place.
//!
//! - `build`: insertion with one lock per node (as hnswlib and faiss do), so both cores insert
//!   at once; the neighbour heuristic keeps links that point in different directions.
//! - `search`: the layered walk, shared by the build and by queries; visited marks are
//!   generation-stamped bytes per thread, and the keys of a node's unvisited neighbours are
//!   prefetched before their distances are computed.
//! - `codes`: 8-bit codes of the keys, which queries walk over (a quarter of the bytes a hop)
//!   before the nodes found are measured again on the f32 keys.
//! - `file`: the links on disk (`graph.links`, versioned and checksummed).
//! - `legacy`: the graphs of older databases, written by hnsw_rs, read into this layout.
//!
//! The graph holds links only: the keys stay in [`crate::Embeddings`] (mapped from the database's
//! `embeddings.bin`, or in memory while building), so 1M keys of 384 dims cost their 1,465 MiB once
//! plus 4 bytes a link.

mod build;
mod codes;
mod file;
mod legacy;
mod search;

pub(crate) use build::build;
pub(crate) use codes::Codes;
pub(crate) use file::{read, write, LINKS_EXTENSION};
pub(crate) use legacy::from_hnsw_rs;
pub(crate) use search::Keys;

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// The highest layer a node can get (1 in 16^16 nodes would go above it at M 16).
pub(crate) const MAX_LEVEL: usize = 16;

/// Links per node and layer, in fixed slots: `[count, id, id, ...]`. Slots are atomics so that
/// threads can read a list while another thread, holding that node's lock, rewrites it; a
/// reader sees valid node ids either way. Relaxed loads compile to plain loads.
pub(crate) struct Graph {
    n: usize,
    /// Capacity of a list above layer 0 (`M`); layer 0 holds `2 * M`.
    m: usize,
    levels: Vec<u8>,
    /// `n * (2M + 1)` slots.
    layer0: Vec<AtomicU32>,
    /// Per node, where its layer-1 list starts in `upper` (`u32::MAX` for layer-0-only nodes);
    /// its layer `l` list starts `(l - 1) * (M + 1)` slots further.
    upper_start: Vec<u32>,
    upper: Vec<AtomicU32>,
    entry: u32,
    top: usize,
}

impl Graph {
    /// An unlinked graph for nodes of the given levels, entered at the first highest node.
    fn empty(m: usize, levels: Vec<u8>) -> Self {
        let n = levels.len();
        let mut upper_start = Vec::with_capacity(n);
        let mut total = 0usize;
        for &l in &levels {
            if l == 0 {
                upper_start.push(u32::MAX);
            } else {
                upper_start.push(total as u32);
                total += l as usize * (m + 1);
            }
        }
        let (entry, top) = levels
            .iter()
            .enumerate()
            .fold((0u32, 0usize), |(e, t), (i, &l)| {
                if (l as usize) > t {
                    (i as u32, l as usize)
                } else {
                    (e, t)
                }
            });
        Self {
            n,
            m,
            layer0: (0..n * (2 * m + 1)).map(|_| AtomicU32::new(0)).collect(),
            upper: (0..total).map(|_| AtomicU32::new(0)).collect(),
            levels,
            upper_start,
            entry,
            top,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// How many links a node's list holds at `level`.
    fn capacity(&self, level: usize) -> usize {
        if level == 0 {
            2 * self.m
        } else {
            self.m
        }
    }

    /// The slots `[count, ids...]` of `node`'s list at `level` (which must be <= its level).
    fn slots(&self, node: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = 2 * self.m + 1;
            &self.layer0[node as usize * w..(node as usize + 1) * w]
        } else {
            let w = self.m + 1;
            let s = self.upper_start[node as usize] as usize + (level - 1) * w;
            &self.upper[s..s + w]
        }
    }

    /// Asks for the cache lines of `node`'s list at `level` ahead of [`Graph::links_into`].
    #[inline]
    fn prefetch_links(&self, node: u32, level: usize) {
        let slots = self.slots(node, level);
        retro_kernels::isa::prefetch(slots.as_ptr() as *const u8, 4 * slots.len());
    }

    /// `node`'s neighbours at `level`, copied into `out` (cleared first).
    fn links_into(&self, node: u32, level: usize, out: &mut Vec<u32>) {
        out.clear();
        let slots = self.slots(node, level);
        // A concurrent rewrite may change the count under us: never read past the capacity.
        let count = (slots[0].load(Relaxed) as usize).min(slots.len() - 1);
        out.extend(slots[1..=count].iter().map(|s| s.load(Relaxed)));
    }

    /// Replaces `node`'s list at `level` (the caller holds the node's lock, or owns the graph).
    fn set_links(&self, node: u32, level: usize, ids: impl ExactSizeIterator<Item = u32>) {
        let slots = self.slots(node, level);
        let count = ids.len().min(slots.len() - 1);
        for (slot, id) in slots[1..].iter().zip(ids) {
            slot.store(id, Relaxed);
        }
        slots[0].store(count as u32, Relaxed);
    }

    fn level(&self, node: u32) -> usize {
        self.levels[node as usize] as usize
    }

    /// Total links, all layers (for reports and tests).
    pub(crate) fn link_count(&self) -> usize {
        (0..self.n as u32)
            .map(|i| {
                (0..=self.level(i))
                    .map(|l| self.slots(i, l)[0].load(Relaxed) as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Bytes the graph holds in memory (links, levels and offsets; not the keys).
    pub(crate) fn memory_bytes(&self) -> usize {
        (self.layer0.len() + self.upper.len() + self.upper_start.len()) * 4 + self.levels.len()
    }
}
