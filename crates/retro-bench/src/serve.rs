//! `retro bench serve`: a load generator for `retro serve` on 127.0.0.1. At each level, N clients
//! (threads) each stream completions one after another; the level ends when every client has
//! made its requests or the time bound passes. It reports the tokens/s of all clients together,
//! the time to first token and the time between tokens (p50, p99), and the errors.

use retro_server::client;
use serde::Serialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    /// Concurrent clients per level.
    pub levels: Vec<usize>,
    /// Requests each client makes per level.
    pub requests: usize,
    pub max_tokens: usize,
    pub prompts: Vec<String>,
    /// A level stops starting requests after this long.
    pub time_bound: Duration,
    /// Ask for RETRO\[OFF\] (`retrieval.enabled` false): decoding alone, no chunk retrieved.
    pub no_retrieval: bool,
}

/// One level's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
    /// All clients' completion tokens per second of the level's wall time.
    pub tokens_per_s: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
    /// The first error's message, if any.
    pub first_error: Option<String>,
}

/// What one streamed request measured.
#[derive(Default)]
struct Sample {
    ttft_ms: Option<f64>,
    gaps_ms: Vec<f64>,
    tokens: usize,
    error: Option<String>,
}

fn one_request(spec: &LoadSpec, prompt: &str, seed: u64) -> Sample {
    let body = json!({
        "prompt": prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
        "retrieval": {"enabled": !spec.no_retrieval},
    })
    .to_string();
    let t0 = Instant::now();
    let mut last: Option<Instant> = None;
    let mut s = Sample::default();
    let status = client::post_events(
        spec.addr,
        "/v1/completions",
        &body,
        spec.api_key.as_deref(),
        &mut |data| {
            if data == "[DONE]" {
                return true;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                s.error = Some(format!("not JSON: {data}"));
                return false;
            };
            if let Some(e) = v.get("error") {
                s.error = Some(e.to_string());
                return false;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                s.tokens = n as usize;
            }
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                let now = Instant::now();
                match last {
                    None => s.ttft_ms = Some((now - t0).as_secs_f64() * 1e3),
                    Some(l) => s.gaps_ms.push((now - l).as_secs_f64() * 1e3),
                }
                last = Some(now);
            }
            true
        },
    );
    match status {
        Ok(200) => {}
        Ok(code) => {
            s.error.get_or_insert(format!("HTTP {code}"));
        }
        Err(e) => s.error = Some(e.to_string()),
    }
    s
}

/// Latency percentile `p` (0..=1) of milliseconds.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs every level, one after another.
pub fn measure(spec: &LoadSpec, on_level: &mut dyn FnMut(&LevelReport)) -> Vec<LevelReport> {
    let mut out = vec![];
    for &n in &spec.levels {
        let t0 = Instant::now();
        let samples: Vec<Sample> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|c| {
                    scope.spawn(move || {
                        let mut mine = vec![];
                        for r in 0..spec.requests {
                            if t0.elapsed() > spec.time_bound {
                                break;
                            }
                            let prompt = &spec.prompts[(c + r) % spec.prompts.len()];
                            mine.push(one_request(spec, prompt, (c * 1000 + r) as u64));
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let seconds = t0.elapsed().as_secs_f64();
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let mut ttft: Vec<f64> = samples.iter().filter_map(|s| s.ttft_ms).collect();
        let mut gaps: Vec<f64> = samples.iter().flat_map(|s| s.gaps_ms.clone()).collect();
        let report = LevelReport {
            clients: n,
            requests: samples.len(),
            errors: samples.iter().filter(|s| s.error.is_some()).count(),
            completion_tokens: tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds,
            ttft_ms_p50: percentile(&mut ttft, 0.5),
            ttft_ms_p99: percentile(&mut ttft, 0.99),
            itl_ms_p50: percentile(&mut gaps, 0.5),
            itl_ms_p99: percentile(&mut gaps, 0.99),
            first_error: samples.iter().find_map(|s| s.error.clone()),
        };
        on_level(&report);
        out.push(report);
    }
    out
}

/// The table `retro bench serve` prints.
pub fn table(levels: &[LevelReport]) -> String {
    let mut s = String::from(
        "| clients | requests | errors | tokens | seconds | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for l in levels {
        s += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            l.clients,
            l.requests,
            l.errors,
            l.completion_tokens,
            l.seconds,
            l.tokens_per_s,
            l.ttft_ms_p50,
            l.ttft_ms_p99,
            l.itl_ms_p50,
            l.itl_ms_p99
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 51.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}
