//! `metrics.jsonl`: a run's [`StepMetrics`], one JSON object a line, appended after every step.
//!
//! Each line carries its format version (`"v": 1`) and, last, a CRC-32 of the line's bytes before
//! it (`"crc32"`), so a line changed on disk is an error that names it rather than a silently wrong
//! loss curve.
//! The file is appended to, not replaced, so a kill can tear the last line: a last line with no
//! newline is dropped, as a write that never finished. Lines written before the version existed
//! (no `v`, no `crc32`) still read.

use crate::error::{PipelineError, Result};
use retro_format::write_atomic;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format version of a `metrics.jsonl` line.
pub const METRICS_VERSION: u32 = 1;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub valid_loss: Option<f64>,
}

/// A line as read: the version, the step's fields, their checksum.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<u32>,
    #[serde(flatten)]
    m: StepMetrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32: Option<String>,
}

/// Where a line's checksum starts; the CRC covers the bytes before it, as written, so it does not
/// depend on how floats parse back.
const CRC_KEY: &str = ",\"crc32\":\"";

fn crc(bytes: &str) -> String {
    format!("{:08x}", crc32fast::hash(bytes.as_bytes()))
}

impl StepMetrics {
    fn line(&self) -> String {
        let body = serde_json::to_string(&Line {
            v: Some(METRICS_VERSION),
            m: self.clone(),
            crc32: None,
        })
        .expect("metrics serialise");
        let body = body.strip_suffix('}').expect("a JSON object");
        format!("{body}{CRC_KEY}{}\"}}", crc(body))
    }

    /// One line of `path` (at 1-based `number`) read back and checked.
    fn parse(path: &Path, number: usize, text: &str) -> Result<Self> {
        let bad = |why: String| PipelineError::file(path, format!("line {number}: {why}"));
        let line: Line = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        match (line.v, line.crc32) {
            (None, None) => {} // written before lines had a version
            (Some(METRICS_VERSION), Some(c)) => {
                let summed = text.rfind(CRC_KEY).map(|end| crc(&text[..end]));
                if summed.as_deref() != Some(c.as_str()) {
                    return Err(bad(format!(
                        "checksum {c} does not match the line (changed after it was written)"
                    )));
                }
            }
            (Some(METRICS_VERSION), None) => return Err(bad("no crc32".into())),
            (Some(v), _) => {
                return Err(bad(format!(
                    "format version {v}; this build reads version {METRICS_VERSION}"
                )))
            }
            (None, Some(_)) => return Err(bad("a crc32 but no format version v".into())),
        }
        Ok(line.m)
    }
}

/// A run's `metrics.jsonl`, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// The steps up to `last_step` recorded in `path`, in file order. A missing file has none; a
    /// last line with no newline (a run killed mid-write) is dropped. Any other line that does
    /// not read, or whose checksum does not match, is an error naming the file and the line.
    pub fn read(path: &Path, last_step: usize) -> Result<Vec<StepMetrics>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(PipelineError::io(path, e)),
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut rows = vec![];
        for (i, l) in complete.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let m = StepMetrics::parse(path, i + 1, l)?;
            if m.step <= last_step {
                rows.push(m);
            }
        }
        Ok(rows)
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

    /// Appends `m` as one line, in one write: a kill leaves the line whole or torn at the end.
    pub fn push(&mut self, m: &StepMetrics) -> Result<()> {
        let line = m.line() + "\n";
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| PipelineError::io(&self.path, e))
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
        assert!(MetricsLog::read(&p, 10).unwrap().is_empty());
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
        let rows = MetricsLog::read(&p, 3).unwrap();
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows[1].valid_loss, Some(2.0));
        assert_eq!(rows[0].valid_loss, None);
        MetricsLog::rewrite(&p, &rows).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains("\"step\":5"));
    }

    #[test]
    fn a_changed_line_or_an_unknown_version_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        MetricsLog::rewrite(&p, &[m(1), m(2), m(3)]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text
            .lines()
            .all(|l| l.starts_with("{\"v\":1,") && l.contains("\"crc32\":")));
        // The loss of step 2 edited: its checksum no longer matches.
        let edited = text.replacen("\"loss\":0.5,", "\"loss\":0.25,", 1);
        assert_ne!(edited, text);
        std::fs::write(&p, &edited).unwrap();
        let e = MetricsLog::read(&p, 10).unwrap_err().to_string();
        assert!(
            e.contains("metrics.jsonl") && e.contains("line 2") && e.contains("checksum"),
            "{e}"
        );
        // A version this build does not know.
        std::fs::write(&p, text.replacen("{\"v\":1,", "{\"v\":7,", 1)).unwrap();
        let e = MetricsLog::read(&p, 10).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("version 7"), "{e}");
        // Garbage in the middle (not a torn last line).
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "not json";
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let e = MetricsLog::read(&p, 10).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn lines_written_before_the_version_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"step\":1,\"loss\":2.5,\"lr\":0.001,\"grad_norm\":0.5,\"tokens_per_s\":100.0}\n",
        )
        .unwrap();
        let rows = MetricsLog::read(&p, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].loss, 2.5);
    }

    #[test]
    fn every_line_reads_back_to_the_same_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let rows: Vec<StepMetrics> = (1..50)
            .map(|s| StepMetrics {
                loss: (s as f64).ln() / 3.0,
                lr: 1e-3 * (s as f64).sqrt() / 7.0,
                grad_norm: 1.0 / (s as f64 + 0.1),
                tokens_per_s: 12345.678 / s as f64,
                ..m(s)
            })
            .collect();
        MetricsLog::rewrite(&p, &rows).unwrap();
        assert_eq!(MetricsLog::read(&p, 100).unwrap(), rows);
    }
}
