//! The embedded graph's scale curve behind `retro bench scale`: build time, peak RSS, bytes on
//! disk, query latency and recall@k at several sizes of clustered synthetic keys. Each size runs
//! in its own process (`retro bench index --synthetic N --only embedded --json`), so that each
//! peak RSS is that size's alone.

use crate::store::StoreRun;
use retro_pipeline::plot::{panels, Line, Panel};
use std::path::Path;
use std::process::Command;

/// Runs `exe bench index --synthetic N --only embedded --json` for each of `sizes`, with `extra`
/// arguments (`--sample`, `--m`, ...), and reads each run back.
pub fn measure(exe: &Path, sizes: &[usize], extra: &[String]) -> anyhow::Result<Vec<StoreRun>> {
    let mut runs = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let out = Command::new(exe)
            .args(["bench", "index", "--synthetic", &n.to_string()])
            .args(["--only", "embedded", "--json"])
            .args(extra)
            .output()
            .map_err(|e| anyhow::anyhow!("{}: cannot run: {e}", exe.display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "`bench index --synthetic {n}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let run: StoreRun = serde_json::from_value(report["runs"][0].clone())
            .map_err(|e| anyhow::anyhow!("`bench index --synthetic {n}` printed no run: {e}"))?;
        runs.push(run);
    }
    Ok(runs)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Issue 13's memory budget: 1.5 x (the raw keys + 4 bytes a link).
pub fn memory_budget_mb(r: &StoreRun) -> Option<f64> {
    let f = r.footprint.as_ref()?;
    Some(1.5 * (f.keys_mb + mib(4 * f.links as u64)))
}

/// `y0 * g(n) / g(n0)`: a growth law through the first point.
fn law(runs: &[StoreRun], y: impl Fn(&StoreRun) -> f64, g: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    let (n0, y0) = (first.keys as f64, y(first));
    runs.iter()
        .map(|r| (r.keys as f64, y0 * g(r.keys as f64) / g(n0)))
        .collect()
}

fn n_log_n(n: f64) -> f64 {
    n * n.ln()
}

fn measured(label: &str, runs: &[StoreRun], y: impl Fn(&StoreRun) -> Option<f64>) -> Line {
    Line {
        label: label.into(),
        points: runs
            .iter()
            .filter_map(|r| Some((r.keys as f64, y(r)?)))
            .collect(),
        reference: false,
    }
}

/// The four charts, as a PNG: build time against n log n, query latency against log n, memory and
/// disk against the budget, recall.
pub fn figure(runs: &[StoreRun], title: &str, out: &Path) -> anyhow::Result<()> {
    let keys = "keys (log)";
    let reference = |label: &str, points| Line {
        label: label.into(),
        points,
        reference: true,
    };
    let charts = [
        Panel {
            title: "Build".into(),
            x_desc: keys.into(),
            y_desc: "seconds (log)".into(),
            lines: vec![
                measured("build time", runs, |r| Some(r.build_s)),
                reference(
                    "n log n through the first point",
                    law(runs, |r| r.build_s, n_log_n),
                ),
            ],
        },
        Panel {
            title: "Query, batch 1".into(),
            x_desc: keys.into(),
            y_desc: "p50 latency, ms (log)".into(),
            lines: vec![
                measured("p50 latency", runs, |r| Some(r.latency_ms_p50)),
                reference(
                    "log n through the first point",
                    law(runs, |r| r.latency_ms_p50, f64::ln),
                ),
            ],
        },
        Panel {
            title: "Memory and disk".into(),
            x_desc: keys.into(),
            y_desc: "MiB (log)".into(),
            lines: vec![
                measured("peak RSS", runs, |r| r.peak_rss_mb),
                measured("on disk: graph.links + embeddings.bin", runs, |r| {
                    let f = r.footprint.as_ref()?;
                    Some(mib(f.graph_file_bytes + f.keys_file_bytes))
                }),
                Line {
                    reference: true,
                    ..measured("budget: 1.5 x (keys + 4 B a link)", runs, memory_budget_mb)
                },
            ],
        },
        Panel {
            title: "Recall".into(),
            x_desc: keys.into(),
            y_desc: "recall@k (log)".into(),
            lines: vec![measured("recall@k at the default ef", runs, |r| {
                Some(r.recall)
            })],
        },
    ];
    panels(title, &charts, 2, out)?;
    Ok(())
}

/// A Markdown table of the runs, with each step's growth against n log n and log n.
pub fn table(runs: &[StoreRun]) -> String {
    let mut t = String::from(
        "| keys | build s | keys/s | build growth (n log n) | p50 ms | p50 growth (log n) | q/s batch 1 | q/s batch 64 | recall@k | peak RSS MiB | budget MiB | graph.links MiB | embeddings.bin MiB |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (i, r) in runs.iter().enumerate() {
        let growth = |y: fn(&StoreRun) -> f64, g: fn(f64) -> f64| match i.checked_sub(1) {
            Some(p) => {
                let prev = &runs[p];
                format!(
                    "{:.1}x ({:.1}x)",
                    y(r) / y(prev),
                    g(r.keys as f64) / g(prev.keys as f64)
                )
            }
            None => "-".into(),
        };
        let f = r.footprint.as_ref();
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        t.push_str(&format!(
            "| {} | {:.1} | {:.0} | {} | {:.3} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {} | {} |\n",
            r.keys,
            r.build_s,
            r.keys_per_s,
            growth(|r| r.build_s, n_log_n),
            r.latency_ms_p50,
            growth(|r| r.latency_ms_p50, f64::ln),
            r.queries_per_s_batch1,
            r.queries_per_s_batch64,
            r.recall,
            opt(r.peak_rss_mb),
            opt(memory_budget_mb(r)),
            opt(f.map(|f| mib(f.graph_file_bytes))),
            opt(f.map(|f| mib(f.keys_file_bytes))),
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Footprint;

    fn run(keys: usize, build_s: f64, p50: f64) -> StoreRun {
        StoreRun {
            store: "embedded graph".into(),
            params: String::new(),
            keys,
            dim: 4,
            build_s,
            keys_per_s: keys as f64 / build_s,
            latency_ms_p50: p50,
            latency_ms_p99: p50,
            queries_per_s_batch1: 1.0 / p50,
            queries_per_s_batch64: 1.0,
            recall: 0.99,
            k: 10,
            peak_rss_mb: Some(10.0),
            footprint: Some(Footprint {
                links: keys * 10,
                graph_memory_mb: 1.0,
                keys_mb: mib(keys as u64 * 16),
                graph_file_bytes: 1 << 20,
                keys_file_bytes: 2 << 20,
            }),
        }
    }

    #[test]
    fn growth_is_set_against_the_laws() {
        let runs = [run(10, 1.0, 1.0), run(100, 20.0, 2.0)];
        let t = table(&runs);
        let last = t.lines().last().unwrap();
        // 100 log 100 / 10 log 10 = 20; ln 100 / ln 10 = 2.
        assert!(
            last.contains("20.0x (20.0x)") && last.contains("2.0x (2.0x)"),
            "{last}"
        );
        let law = law(&runs, |r| r.build_s, n_log_n);
        assert!((law[1].1 - 20.0).abs() < 1e-9);
        // keys 100 x 16 B and 1,000 links of 4 B, times 1.5
        let b = memory_budget_mb(&runs[1]).unwrap();
        assert!((b - 1.5 * mib(1600 + 4000)).abs() < 1e-12);
    }

    #[test]
    fn the_figure_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("scale.png");
        let runs = [
            run(10, 1.0, 1.0),
            run(100, 20.0, 2.0),
            run(1000, 300.0, 3.0),
        ];
        figure(&runs, "test", &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
