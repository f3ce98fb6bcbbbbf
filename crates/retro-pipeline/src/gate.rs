//! The gate: which chunks' neighbours condition the model. Where a chunk's neighbours are kept out,
//! the rows they would condition get RETRO\[OFF\]'s prediction
//! ([`retro_model::RetroModel::forward_gated`]), so a database with nothing worth reading costs
//! less. The paper has no gate: without one every neighbour is read. Two rules:
//!
//! - **distance**: the nearest neighbour lies within `max` of the chunk's key;
//! - **overlap**: some neighbour (chunk + continuation) shares a run of at least `min` x chunk_len
//!   tokens with the chunk it was retrieved for. This sees what the key's distance cannot: a
//!   16-character fragment of another text can share as many trigrams as another edition's
//!   spelling of the same line, but not as long a run (docs/QUALITY.md);
//! - **coherent**: one of the chunk's neighbours lies in the same document as a neighbour of one of
//!   the `lookback` chunks before it, at most `max_step` chunks on per chunk back. The database is
//!   then following the text the input follows, as another edition of it does; fragments that
//!   only look alike come from scattered places. It looks at chunks up to the current one only, so
//!   it is causal.

use crate::error::{PipelineError, Result};

/// Which chunks' neighbours the model reads.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Gate {
    /// Read when the nearest neighbour is at most `max_distance` away.
    Distance { max_distance: f32 },
    /// Read when some neighbour shares a token run of at least `min_overlap` x chunk_len with the
    /// chunk it was retrieved for.
    Overlap { min_overlap: f32 },
    /// Read when some neighbour lies in the same document as a neighbour of one of the
    /// `lookback` chunks before (`lag` chunks back), 0..=`max_step * lag` chunks after it. A
    /// text's first chunk has none before it and is not read.
    Coherent { max_step: usize, lookback: usize },
    /// Read nothing: RETRO\[OFF\] through the retrieval path.
    Closed,
}

impl Gate {
    /// Reads a chunk's neighbours when the nearest is at most `max_distance` away (a finite
    /// distance of the database's metric, so at least 0).
    pub fn distance(max_distance: f32) -> Result<Self> {
        if !(max_distance.is_finite() && max_distance >= 0.0) {
            return Err(PipelineError::invalid(
                "max_distance",
                max_distance,
                "must be a finite distance >= 0",
            ));
        }
        Ok(Self::Distance { max_distance })
    }

    /// Reads a chunk's neighbours when one of them shares a run of at least `min_overlap` x
    /// chunk_len tokens with the chunk (a fraction in 0..=1).
    pub fn overlap(min_overlap: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&min_overlap) {
            return Err(PipelineError::invalid(
                "min_overlap",
                min_overlap,
                "must be a fraction of the chunk in 0..=1",
            ));
        }
        Ok(Self::Overlap { min_overlap })
    }

    /// Reads a chunk's neighbours when one of them follows, in the same document, a neighbour of
    /// one of the `lookback` (at least 1) chunks before it, by at most `max_step` chunks per chunk
    /// back.
    pub fn coherent(max_step: usize, lookback: usize) -> Result<Self> {
        if lookback == 0 {
            return Err(PipelineError::invalid(
                "lookback",
                lookback,
                "must look at least 1 chunk back",
            ));
        }
        Ok(Self::Coherent { max_step, lookback })
    }

    pub fn closed() -> Self {
        Self::Closed
    }

    /// How many chunks before a chunk this rule reads the neighbours of (0: none), so that a
    /// caller retrieving one chunk at a time keeps that many ([`crate::Neighbours::followed_by`]).
    pub fn lookback(&self) -> usize {
        match *self {
            Self::Coherent { lookback, .. } => lookback,
            _ => 0,
        }
    }

    /// Whether this rule reads the chunk's tokens (and so needs them, not only its key).
    pub fn needs_tokens(&self) -> bool {
        matches!(self, Self::Overlap { .. })
    }

    /// 1 where a chunk's neighbours are read, else 0. `chunk` holds the chunk's tokens,
    /// `neighbours` the values of its non-padded neighbours and `distances` all K distances
    /// (padding is infinite); `follows` says whether one of its neighbours follows a neighbour of
    /// a chunk before it as the coherent rule asks ([`crate::Neighbours::follows`]).
    pub fn keep(
        &self,
        chunk: &[u32],
        neighbours: &[&[u32]],
        distances: &[f32],
        follows: bool,
    ) -> f32 {
        let read = match *self {
            Self::Distance { max_distance } => {
                distances.iter().copied().fold(f32::INFINITY, f32::min) <= max_distance
            }
            Self::Overlap { min_overlap } => {
                let need = (min_overlap * chunk.len() as f32).ceil() as usize;
                let best = neighbours
                    .iter()
                    .map(|v| longest_common_substring(chunk, v))
                    .max();
                best.is_some_and(|b| b >= need.max(1))
            }
            Self::Coherent { .. } => follows,
            Self::Closed => false,
        };
        if read {
            1.0
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Distance { max_distance } => write!(
                f,
                "neighbours read when the nearest is within {max_distance}"
            ),
            Self::Overlap { min_overlap } => write!(
                f,
                "neighbours read when one shares a run of {min_overlap} x chunk_len with the chunk"
            ),
            Self::Coherent { max_step, lookback } => write!(
                f,
                "neighbours read when one follows a neighbour of the {lookback} chunk(s) before by at most {max_step} chunk(s) per chunk back"
            ),
            Self::Closed => write!(f, "no neighbour read"),
        }
    }
}

/// Longest common contiguous run of tokens of `a` and `b`.
pub fn longest_common_substring(a: &[u32], b: &[u32]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    let mut best = 0;
    for &x in a {
        for (j, &y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { 0 };
            best = best.max(cur[j + 1]);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_reads_the_nearest_neighbour() {
        let g = Gate::distance(0.3).unwrap();
        let none: &[&[u32]] = &[];
        assert_eq!(g.keep(&[], none, &[0.5, 0.2], false), 1.0);
        assert_eq!(g.keep(&[], none, &[0.5, 0.3], false), 1.0);
        assert_eq!(g.keep(&[], none, &[0.5, 0.4], false), 0.0);
        assert_eq!(
            g.keep(&[], none, &[f32::INFINITY, f32::INFINITY], false),
            0.0,
            "padding is never read"
        );
        assert_eq!(Gate::closed().keep(&[], none, &[0.0], false), 0.0);
    }

    #[test]
    fn overlap_reads_a_neighbour_with_a_long_enough_run() {
        let chunk = [1, 2, 3, 4, 5, 6, 7, 8];
        let g = Gate::overlap(0.5).unwrap();
        // A run of 4 of 8: read; 3 of 8: not, however many scattered tokens it shares.
        assert_eq!(g.keep(&chunk, &[&[9, 3, 4, 5, 6, 9]], &[0.9], false), 1.0);
        assert_eq!(
            g.keep(&chunk, &[&[1, 2, 3, 9, 5, 6, 7, 9]], &[0.0], false),
            0.0
        );
        assert_eq!(
            g.keep(
                &chunk,
                &[&[1, 2, 3, 9], &[9, 9, 5, 6, 7, 8]],
                &[0.1, 0.2],
                false
            ),
            1.0,
            "any neighbour may carry the run"
        );
        assert_eq!(
            g.keep(&chunk, &[], &[f32::INFINITY], false),
            0.0,
            "padding is never read"
        );
        assert_eq!(
            Gate::overlap(0.0)
                .unwrap()
                .keep(&chunk, &[&[10, 11]], &[0.5], false),
            0.0,
            "a threshold of 0 still needs one shared token"
        );
    }

    #[test]
    fn coherent_reads_what_the_neighbours_say_and_needs_a_lookback() {
        let g = Gate::coherent(2, 1).unwrap();
        let none: &[&[u32]] = &[];
        assert_eq!(
            g.keep(&[], none, &[0.9], true),
            1.0,
            "whatever the distance"
        );
        assert_eq!(g.keep(&[], none, &[0.0], false), 0.0, "however close");
        let e = Gate::coherent(1, 0).unwrap_err().to_string();
        assert!(e.contains("lookback"), "{e}");
    }

    #[test]
    fn thresholds_outside_their_range_are_errors() {
        for bad in [-0.1, f32::NAN, f32::INFINITY] {
            let e = Gate::distance(bad).unwrap_err().to_string();
            assert!(e.contains("max_distance"), "{e}");
        }
        for bad in [-0.1, 1.5, f32::NAN] {
            let e = Gate::overlap(bad).unwrap_err().to_string();
            assert!(e.contains("min_overlap"), "{e}");
        }
    }

    #[test]
    fn longest_common_substring_finds_the_longest_run() {
        assert_eq!(longest_common_substring(&[1, 2, 3, 4], &[9, 2, 3, 4, 1]), 3);
        assert_eq!(longest_common_substring(&[1, 2], &[3, 4]), 0);
        assert_eq!(longest_common_substring(&[], &[3, 4]), 0);
        assert_eq!(longest_common_substring(&[5, 5, 5], &[5, 5]), 2);
    }
}
