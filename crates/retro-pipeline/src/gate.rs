//! The distance gate: a chunk's neighbours condition the model only when the nearest of them lies
//! within `max_distance` of the chunk's key. Farther neighbours then leave RETRO[OFF]'s prediction
//! for the rows they would condition ([`retro_model::RetroModel::forward_gated`]), so a database with
//! nothing close to the text costs less. The paper has no gate: without one every neighbour is read.

use crate::error::{PipelineError, Result};

/// Which chunks' neighbours the model reads.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DistanceGate {
    max_distance: f32,
}

impl DistanceGate {
    /// Reads a chunk's neighbours when the nearest is at most `max_distance` away (a finite
    /// distance of the database's metric, so at least 0).
    pub fn new(max_distance: f32) -> Result<Self> {
        if !(max_distance.is_finite() && max_distance >= 0.0) {
            return Err(PipelineError::invalid(
                "max_distance",
                max_distance,
                "must be a finite distance >= 0",
            ));
        }
        Ok(Self { max_distance })
    }

    /// Reads no neighbour: RETRO[OFF] through the retrieval path.
    pub fn closed() -> Self {
        Self {
            max_distance: f32::NEG_INFINITY,
        }
    }

    pub fn max_distance(&self) -> f32 {
        self.max_distance
    }

    /// 1 where the nearest of a chunk's `distances` (padding is infinite) is within the threshold.
    pub fn keep(&self, distances: &[f32]) -> f32 {
        let nearest = distances.iter().copied().fold(f32::INFINITY, f32::min);
        if nearest <= self.max_distance {
            1.0
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for DistanceGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.max_distance.is_finite() {
            write!(
                f,
                "neighbours read when the nearest is within {}",
                self.max_distance
            )
        } else {
            write!(f, "no neighbour read")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_reads_the_nearest_neighbour() {
        let g = DistanceGate::new(0.3).unwrap();
        assert_eq!(g.keep(&[0.5, 0.2]), 1.0);
        assert_eq!(g.keep(&[0.5, 0.3]), 1.0);
        assert_eq!(g.keep(&[0.5, 0.4]), 0.0);
        assert_eq!(
            g.keep(&[f32::INFINITY, f32::INFINITY]),
            0.0,
            "padding is never read"
        );
        assert_eq!(DistanceGate::closed().keep(&[0.0]), 0.0);
    }

    #[test]
    fn thresholds_outside_the_metric_are_errors() {
        for bad in [-0.1, f32::NAN, f32::INFINITY] {
            let e = DistanceGate::new(bad).unwrap_err().to_string();
            assert!(e.contains("max_distance"), "{e}");
        }
    }
}
