//! Learning-rate schedules with warm-up: labml's Noam, cosine decay, or constant.

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// `peak * min(step / warmup, sqrt(warmup / step))` (labml's Noam, expressed by its peak).
    Noam,
    /// Linear warm-up, then cosine decay to a tenth of the peak at the last step.
    Cosine,
    /// Linear warm-up, then constant.
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "noam" => Ok(Schedule::Noam),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!(
                "unknown schedule `{s}` (expected noam, cosine or constant)"
            )),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Noam => "noam",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        })
    }
}

impl Schedule {
    /// Learning rate of 1-based `step` out of `total`.
    pub fn lr(self, peak: f64, warmup: usize, step: usize, total: usize) -> f64 {
        let s = step.max(1) as f64;
        let w = warmup.max(1) as f64;
        if s < w {
            return peak * s / w;
        }
        match self {
            Schedule::Noam => peak * (w / s).sqrt(),
            Schedule::Constant => peak,
            Schedule::Cosine => {
                let span = (total as f64 - w).max(1.0);
                let p = ((s - w) / span).min(1.0);
                peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_follow_their_shape() {
        for s in [Schedule::Noam, Schedule::Cosine, Schedule::Constant] {
            assert!((s.lr(1e-3, 100, 50, 1000) - 5e-4).abs() < 1e-12);
            assert!((s.lr(1e-3, 100, 100, 1000) - 1e-3).abs() < 1e-12);
        }
        assert!((Schedule::Noam.lr(1e-3, 100, 400, 1000) - 5e-4).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1e-3, 100, 1000, 1000) - 1e-4).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(1e-3, 100, 900, 1000), 1e-3);
    }
}
