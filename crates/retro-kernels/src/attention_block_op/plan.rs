//! The op's geometry: the kinds of attention, the packed parameters' offsets, the attention's
//! groups and views, and the row moves around it (rotary embedding, CCA's shifted gather and
//! scatter).

use super::op::AttentionBlockOp;
use crate::cpu_storage::{contiguous, cpu};
use crate::float::Float;
use crate::fused_attention::{Dims, View};
use crate::fused_norm::rope_in_place;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Which attention, with the sizes and tables its geometry needs.
pub(super) enum Kind {
    SelfAttention {
        s: usize,
        causal: bool,
        cos: Tensor,
        sin: Tensor,
    },
    Cross {
        groups: usize,
        sq: usize,
        sk: usize,
    },
    Chunked {
        b: usize,
        t: usize,
        cl: usize,
        c: usize,
        sk: usize,
    },
}

impl Kind {
    pub(super) fn is_self(&self) -> bool {
        matches!(self, Kind::SelfAttention { .. })
    }
}

/// Offsets of the packed parameters: norm w, norm b, `W_qkv [3 da, d]`, `b_qkv`, `W_o [d, da]`, `b_o`.
pub(super) fn offsets(d: usize, da: usize) -> [usize; 7] {
    let mut o = [0; 7];
    for (i, len) in [d, d, 3 * da * d, 3 * da, d * da, d]
        .into_iter()
        .enumerate()
    {
        o[i + 1] = o[i] + len;
    }
    o
}

/// The attention's problem and where q, k, v, o and their gradients live.
pub(super) struct Plan {
    pub(super) dims: Dims,
    pub(super) qkv: [View; 3],
    pub(super) o: View,
}

impl AttentionBlockOp {
    fn dk(&self) -> usize {
        self.da / self.heads
    }

    /// `(groups, queries, keys)`: the attention runs per group (a sequence; a neighbour with its
    /// retrieving chunk; a chunk with its neighbours).
    fn groups(&self, rows_x: usize) -> (usize, usize, usize) {
        match self.kind {
            Kind::SelfAttention { s, .. } => (rows_x / s.max(1), s, s),
            Kind::Cross { groups, sq, sk } => (groups, sq, sk),
            Kind::Chunked { b, cl, c, sk, .. } => (b * c, cl, sk),
        }
    }

    /// Query rows and context rows.
    pub(super) fn rows(&self, rows_x: usize) -> (usize, usize) {
        let (g, sq, sk) = self.groups(rows_x);
        (g * sq, g * sk)
    }

    pub(super) fn plan(&self, rows_x: usize) -> Plan {
        let (da, dk, h) = (self.da, self.dk(), self.heads);
        let (g, sq, sk) = self.groups(rows_x);
        let (qkv, causal) = match self.kind {
            // q, k, v side by side in one projection [rows, 3 da].
            Kind::SelfAttention { causal, .. } => {
                let at = |off| View::new(off, sq * 3 * da, 3 * da, h, dk);
                ([at(0), at(da), at(2 * da)], causal.then_some(0))
            }
            // q [rows_q, da]; k, v side by side in [rows_c, 2 da].
            _ => {
                let kv = |off| View::new(off, sk * 2 * da, 2 * da, h, dk);
                ([View::new(0, sq * da, da, h, dk), kv(0), kv(da)], None)
            }
        };
        Plan {
            dims: Dims::new(g, h, (sq, sk, dk), causal),
            qkv,
            o: View::new(0, sq * da, da, h, dk),
        }
    }

    /// Rotates q and k of every row of `qkv [rows, 3 da]` (row r is position `r % s`).
    pub(super) fn rope<T: Float>(&self, qkv: &mut [T], trig: (&[T], &[T]), inverse: bool) {
        let Kind::SelfAttention { s, .. } = self.kind else {
            return;
        };
        let (da, dk) = (self.da, self.dk());
        let half = dk / 2;
        qkv.par_chunks_mut(3 * da)
            .enumerate()
            .with_min_len(32)
            .for_each(|(r, row)| {
                let pos = r % s;
                let (c, sn) = (&trig.0[pos * half..][..half], &trig.1[pos * half..][..half]);
                for head in row[..2 * da].chunks_exact_mut(dk) {
                    rope_in_place(head, c, sn, inverse);
                }
            });
    }

    /// CCA: row `r` of chunk-major query rows `[b, c * cl]` reads x row `cl - 1 + r` of its batch
    /// (when that is before `t`). Calls `f(query row, x row)` for every such pair.
    fn chunk_rows(&self, mut f: impl FnMut(usize, usize)) {
        if let Kind::Chunked { b, t, cl, c, .. } = self.kind {
            for bi in 0..b {
                let shift = crate::ChunkSchedule::new(cl).shift();
                for r in 0..t - shift {
                    f(bi * c * cl + r, bi * t + shift + r);
                }
            }
        }
    }

    /// CCA: the query rows `[rows_q, d]` gathered from `x`-shaped rows (zero past the end).
    pub(super) fn gather<T: Float>(&self, src: &[T], rows_q: usize) -> Vec<T> {
        let d = self.d;
        let mut out = vec![T::zero(); rows_q * d];
        self.chunk_rows(|q, r| out[q * d..(q + 1) * d].copy_from_slice(&src[r * d..(r + 1) * d]));
        out
    }

    /// CCA: query rows scattered back to `x`-shaped rows (zero for the first `chunk_len - 1`).
    pub(super) fn scatter<T: Float>(&self, src: &[T], rows_x: usize) -> Vec<T> {
        let d = self.d;
        let mut out = vec![T::zero(); rows_x * d];
        self.chunk_rows(|q, r| out[r * d..(r + 1) * d].copy_from_slice(&src[q * d..(q + 1) * d]));
        out
    }

    /// The rotary tables as slices, when this is self-attention.
    pub(super) fn with_trig<T: Float, R>(
        &self,
        f: impl FnOnce(Option<(&[T], &[T])>) -> Result<R>,
    ) -> Result<R> {
        let Kind::SelfAttention { cos, sin, .. } = &self.kind else {
            return f(None);
        };
        let (sc, lc) = cos.storage_and_layout();
        let (ss, ls) = sin.storage_and_layout();
        f(Some((
            contiguous::<T>(cpu(&sc)?, lc)?,
            contiguous::<T>(cpu(&ss)?, ls)?,
        )))
    }
}
