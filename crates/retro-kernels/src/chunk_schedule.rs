//! RETRO's chunk rule, in one place: which chunk a token completes, and which chunk's neighbours
//! condition it (the CCA's shift by `chunk_len - 1`).
//!
//! With chunks of `cl` tokens, chunk `u` holds positions `u*cl .. (u+1)*cl`. The token at the
//! chunk's last position `u*cl + cl - 1` completes it; its neighbours are retrieved then, and
//! condition that position and the next chunk's first `cl - 1`: positions
//! `u*cl + cl - 1 ..= u*cl + 2*cl - 2`. The first `cl - 1` positions see no neighbour.
//!
//! ```
//! use retro_kernels::ChunkSchedule;
//! let s = ChunkSchedule::new(4);
//! assert_eq!(s.completes(3), Some(0));
//! assert_eq!(s.completes(4), None);
//! assert_eq!(s.conditioned_by(2), None);
//! assert_eq!((s.conditioned_by(3), s.conditioned_by(6), s.conditioned_by(7)), (Some(0), Some(0), Some(1)));
//! assert_eq!(s.conditioned_rows(1), 7..11);
//! assert_eq!(s.completed_between(2, 9), 0..2); // positions 2..9 complete chunks 0 and 1
//! ```

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSchedule {
    chunk_len: usize,
}

impl ChunkSchedule {
    /// `chunk_len` must be at least 1.
    pub fn new(chunk_len: usize) -> Self {
        assert!(chunk_len > 0, "chunk_len must be > 0");
        Self { chunk_len }
    }

    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// How far a chunk's neighbours are shifted: the first position any neighbour conditions.
    pub fn shift(&self) -> usize {
        self.chunk_len - 1
    }

    /// The chunk the token at position `t` completes, if it is a chunk's last.
    pub fn completes(&self, t: usize) -> Option<usize> {
        (t % self.chunk_len == self.chunk_len - 1).then_some(t / self.chunk_len)
    }

    /// The chunk whose neighbours condition position `t` (none before `chunk_len - 1`).
    pub fn conditioned_by(&self, t: usize) -> Option<usize> {
        (t >= self.shift()).then(|| (t - self.shift()) / self.chunk_len)
    }

    /// The positions chunk `u`'s neighbours condition.
    pub fn conditioned_rows(&self, u: usize) -> Range<usize> {
        let start = u * self.chunk_len + self.shift();
        start..start + self.chunk_len
    }

    /// The positions of chunk `u`.
    pub fn rows(&self, u: usize) -> Range<usize> {
        u * self.chunk_len..(u + 1) * self.chunk_len
    }

    /// Number of complete chunks in the first `t` positions.
    pub fn complete_chunks(&self, t: usize) -> usize {
        t / self.chunk_len
    }

    /// The chunks that positions `t0..t1` complete.
    pub fn completed_between(&self, t0: usize, t1: usize) -> Range<usize> {
        self.complete_chunks(t0)..self.complete_chunks(t1.max(t0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_agree_with_each_other() {
        for cl in [1, 2, 3, 16] {
            let s = ChunkSchedule::new(cl);
            for t in 0..5 * cl {
                // A position is conditioned by u exactly when it lies in u's conditioned rows.
                if let Some(u) = s.conditioned_by(t) {
                    assert!(s.conditioned_rows(u).contains(&t), "cl {cl} t {t}");
                }
                // The token completing u is the first that u's neighbours condition.
                if let Some(u) = s.completes(t) {
                    assert_eq!(s.conditioned_rows(u).start, t);
                    assert!(s.rows(u).contains(&t));
                    assert_eq!(s.completed_between(t, t + 1), u..u + 1);
                }
            }
            assert_eq!(s.completed_between(0, 5 * cl).len(), 5);
        }
    }
}
