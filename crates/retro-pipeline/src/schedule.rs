//! Learning-rate schedules with warm-up: labml's Noam, cosine decay, or constant.

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// `peak * min(step / warmup, sqrt(warmup / step))` (labml's Noam, expressed by its peak).
    Noam,
    /// Linear warm-up, then cosine decay to a tenth of the peak at the end of the run: the last
    /// step, or the end of the time budget when that comes first.
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
        self.lr_within(peak, warmup, step, total, None)
    }

    /// Learning rate of 1-based `step` out of `total` in a run that has also spent `budget_spent`
    /// (0 to 1) of a time budget: a decaying schedule follows whichever ends the run first, so a
    /// run stopped by its clock still ends decayed.
    pub fn lr_within(
        self,
        peak: f64,
        warmup: usize,
        step: usize,
        total: usize,
        budget_spent: Option<f64>,
    ) -> f64 {
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
                let p = ((s - w) / span).max(budget_spent.unwrap_or(0.0)).min(1.0);
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

    #[test]
    fn cosine_follows_the_time_budget_when_it_ends_the_run_first() {
        let cos = |step, spent| Schedule::Cosine.lr_within(1e-3, 10, step, 1_000_000, spent);
        // Half the budget spent at step 50 of a million: halfway down (0.1 + 0.9 / 2 of the peak).
        assert!((cos(50, Some(0.5)) - 5.5e-4).abs() < 1e-12);
        assert!((cos(90, Some(1.0)) - 1e-4).abs() < 1e-12);
        assert!(
            (cos(90, Some(3.0)) - 1e-4).abs() < 1e-12,
            "past the budget: the floor"
        );
        // Without a budget, or with the steps ahead of it, the steps decide.
        assert!(cos(50, None) > 9.99e-4);
        let steps = Schedule::Cosine.lr(1e-3, 10, 505, 1000);
        assert_eq!(
            Schedule::Cosine.lr_within(1e-3, 10, 505, 1000, Some(0.1)),
            steps
        );
        // Warm-up stays by step; constant and Noam ignore the budget.
        assert!((cos(5, Some(0.9)) - 5e-4).abs() < 1e-12);
        assert_eq!(
            Schedule::Constant.lr_within(1e-3, 10, 50, 100, Some(0.9)),
            1e-3
        );
        assert_eq!(
            Schedule::Noam.lr_within(1e-3, 10, 40, 100, Some(0.9)),
            Schedule::Noam.lr(1e-3, 10, 40, 100)
        );
    }
}
