//! `metrics.jsonl`: a run's [`StepMetrics`], one JSON object a line, appended after every step.

use crate::error::{PipelineError, Result};
use retro_index::fsutil::write_atomic;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub valid_loss: Option<f64>,
}

impl StepMetrics {
    fn line(&self) -> String {
        serde_json::to_string(self).expect("metrics serialise")
    }
}

/// A run's `metrics.jsonl`, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// The steps up to `last_step` recorded in `path`, in file order. A missing file has none;
    /// lines that do not parse are skipped (a run killed mid-write leaves a torn last line).
    pub fn read(path: &Path, last_step: usize) -> Vec<StepMetrics> {
        std::fs::read_to_string(path)
            .map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
                    .filter(|m| m.step <= last_step)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replaces `path` with exactly `rows`, atomically: a resumed run drops the lines of steps
    /// it trains again, so the file holds each step once.
    pub fn rewrite(path: &Path, rows: &[StepMetrics]) -> Result<()> {
        Ok(write_atomic(path, |w| {
            for m in rows {
                writeln!(w, "{}", m.line())?;
            }
            Ok(())
        })?)
    }

    /// Opens `path` for appending, creating it if needed.
    pub fn append_to(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| PipelineError::io(path, e))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    pub fn push(&mut self, m: &StepMetrics) -> Result<()> {
        writeln!(self.file, "{}", m.line()).map_err(|e| PipelineError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: usize) -> StepMetrics {
        StepMetrics {
            step,
            loss: 1.0 / step as f64,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_s: 100.0,
            valid_loss: step.is_multiple_of(2).then_some(2.0),
        }
    }

    #[test]
    fn appended_lines_read_back_up_to_a_step_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        assert!(MetricsLog::read(&p, 10).is_empty());
        let mut log = MetricsLog::append_to(&p).unwrap();
        for s in 1..=4 {
            log.push(&m(s)).unwrap();
        }
        drop(log);
        // A run killed mid-line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"step\":5,\"lo")
            .unwrap();
        let rows = MetricsLog::read(&p, 3);
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows[1].valid_loss, Some(2.0));
        assert_eq!(rows[0].valid_loss, None);
        MetricsLog::rewrite(&p, &rows).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains("\"step\":5"));
    }
}
