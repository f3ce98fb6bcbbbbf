//! Locating the shared test data (never copied into the repository).
//!
//! `RETRO_SHARED` names the folder; by default it is `../shared` beside the workspace root.
//! When a file is missing a test skips with a visible message (and each test binary ends by
//! counting its skips), unless `RETRO_REQUIRE_SHARED=1` (CI),
//! in which case it panics naming what is missing.

use std::path::PathBuf;

/// The shared data folder (it may not exist).
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("RETRO_SHARED") {
        // A relative path is relative to the workspace root, where the README's command runs
        // (each test binary runs in its own crate's folder).
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(p)
            }
        }
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")),
    }
}

/// Whether missing shared data must fail tests (`RETRO_REQUIRE_SHARED=1`).
pub fn shared_required() -> bool {
    std::env::var("RETRO_REQUIRE_SHARED").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// `shared_dir()/rel` if it exists; otherwise prints a skip message and returns `None`,
/// or panics when [`shared_required`].
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    let p = shared_dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    if shared_required() {
        panic!("shared test data missing: {} (RETRO_REQUIRE_SHARED=1; set RETRO_SHARED to the shared folder)", p.display());
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    raw_stderr(&format!(
        "SKIPPED {test}: shared test data {} not found (set RETRO_SHARED)\n",
        p.display()
    ));
    record_skip(test);
    None
}

/// The Milvus server for the integration tests: `RETRO_MILVUS_URL` (`milvus://127.0.0.1:PORT`, as
/// `tools/milvus.sh start` prints it). Without it the test skips with a message, unless
/// `RETRO_REQUIRE_MILVUS=1` (CI), which makes it fail.
pub fn milvus_url() -> Option<String> {
    if let Ok(u) = std::env::var("RETRO_MILVUS_URL") {
        if !u.is_empty() {
            return Some(u.trim_end_matches('/').to_string());
        }
    }
    if std::env::var("RETRO_REQUIRE_MILVUS").is_ok_and(|v| v == "1") {
        panic!("RETRO_REQUIRE_MILVUS=1 but RETRO_MILVUS_URL is not set (start a server with tools/milvus.sh start)");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    raw_stderr(&format!(
        "SKIPPED {test}: no Milvus server (run tools/milvus.sh start and set RETRO_MILVUS_URL)\n"
    ));
    record_skip(test);
    None
}

/// Tests skipped in this process for missing data, counted at exit.
static SKIPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

extern "C" fn print_skip_count() {
    let skipped = SKIPPED.lock().map(|s| s.clone()).unwrap_or_default();
    if !skipped.is_empty() {
        raw_stderr(&format!(
            "SKIPPED {} test(s) of {} for missing shared data (set RETRO_SHARED; CI sets RETRO_REQUIRE_SHARED=1 so that they fail): {}\n",
            skipped.len(),
            std::env::args().next().unwrap_or_default(),
            skipped.join(", ")
        ));
    }
}

/// Straight to file descriptor 2: the test harness captures `eprintln!` of passing tests, and a
/// skip must be seen.
fn raw_stderr(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(msg.as_bytes());
}

fn record_skip(what: String) {
    let mut s = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if s.is_empty() {
        // SAFETY: registers a plain `extern "C" fn` to run at process exit.
        unsafe { libc::atexit(print_skip_count) };
    }
    s.push(what);
}

/// Mutation tests of the loaders: valid files truncated, bit-flipped, overwritten and (for JSON)
/// edited field by field, seeded so that a failing case can be replayed by its number.
pub mod mutate {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// One mutation of `bytes`, chosen by `rng`.
    pub fn bytes(rng: &mut StdRng, bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        match rng.random_range(0..5) {
            0 => b.truncate(rng.random_range(0..=b.len())),
            1 => {
                for _ in 0..rng.random_range(1..=8) {
                    if !b.is_empty() {
                        let i = rng.random_range(0..b.len());
                        b[i] ^= 1 << rng.random_range(0..8);
                    }
                }
            }
            2 => {
                // Overwrite a run with bytes that make lengths and ids extreme.
                if !b.is_empty() {
                    let i = rng.random_range(0..b.len());
                    let v = [0x00, 0xFF, 0x7F, 0x80][rng.random_range(0..4)];
                    let n = rng.random_range(1..=16).min(b.len() - i);
                    b[i..i + n].fill(v);
                }
            }
            3 => {
                // Grow: duplicate a slice, or append garbage.
                let i = rng.random_range(0..=b.len());
                let tail: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                b.splice(i..i, tail);
            }
            _ => {
                // Swap two regions (valid values in the wrong place).
                if b.len() >= 8 {
                    let n = rng.random_range(1..=b.len() / 2);
                    let i = rng.random_range(0..=b.len() - n);
                    let j = rng.random_range(0..=b.len() - n);
                    for k in 0..n.min(i.abs_diff(j)) {
                        b.swap(i + k, j + k);
                    }
                }
            }
        }
        b
    }

    fn leaves(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(path.clone());
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    path.push(k.clone());
                    leaves(x, path, out);
                    path.pop();
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate().take(64) {
                    path.push(i.to_string());
                    leaves(x, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    fn odd_value(rng: &mut StdRng) -> serde_json::Value {
        use serde_json::json;
        match rng.random_range(0..12) {
            0 => json!(0),
            1 => json!(-1),
            2 => json!(u64::MAX),
            3 => json!(1e300),
            4 => json!(""),
            5 => json!("../../etc/passwd"),
            6 => json!(null),
            7 => json!([]),
            8 => json!({}),
            9 => json!(true),
            10 => json!(rng.random_range(0..100_000)),
            _ => json!("zz"),
        }
    }

    /// A JSON document with one field replaced, removed or given a neighbour's value; falls back to
    /// byte mutations a quarter of the time.
    pub fn json(rng: &mut StdRng, bytes: &[u8]) -> Vec<u8> {
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return self::bytes(rng, bytes);
        };
        if rng.random_range(0..4) == 0 {
            return self::bytes(rng, bytes);
        }
        let mut all = vec![];
        leaves(&v, &mut vec![], &mut all);
        let path = all[rng.random_range(0..all.len())].clone();
        let remove = rng.random_range(0..4) == 0;
        let new = odd_value(rng);
        let mut cur = &mut v;
        for (i, key) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            cur = match cur {
                serde_json::Value::Object(m) if last && remove => {
                    m.remove(key);
                    break;
                }
                serde_json::Value::Object(m) => m.get_mut(key).expect("path from leaves"),
                serde_json::Value::Array(a) => &mut a[key.parse::<usize>().expect("index")],
                _ => break,
            };
        }
        if !remove {
            *cur = new;
        }
        serde_json::to_vec(&v).expect("serialise")
    }

    /// Runs `case(i, &mut rng)` for `i` in `0..cases` or until `budget` is spent, whichever comes
    /// first. A case that panics fails the test with its number; a case that runs for over 60 s is
    /// a hang, and aborts the process. Returns how many cases ran and how many `case` judged to be
    /// opened successfully (`Ok(true)`).
    pub fn run(
        name: &str,
        seed: u64,
        cases: usize,
        budget: Duration,
        mut case: impl FnMut(usize, &mut StdRng) -> bool,
    ) -> (usize, usize) {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let epoch = Instant::now();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = {
            let done = done.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let started = STARTED.load(Ordering::Relaxed);
                    if started > 0
                        && (epoch.elapsed().as_millis() as u64).saturating_sub(started) > 60_000
                    {
                        eprintln!("{name}: a case ran for over 60 s: a hang");
                        std::process::abort();
                    }
                }
            })
        };
        let start = Instant::now();
        let (mut ran, mut ok) = (0, 0);
        for i in 0..cases {
            if start.elapsed() > budget {
                break;
            }
            let mut rng =
                StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            STARTED.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(i, &mut rng)));
            STARTED.store(0, Ordering::Relaxed);
            match r {
                Ok(true) => ok += 1,
                Ok(false) => {}
                Err(_) => {
                    done.store(true, Ordering::Relaxed);
                    panic!("{name}: case {i} (seed {seed}) panicked instead of returning an error");
                }
            }
            ran += 1;
        }
        done.store(true, Ordering::Relaxed);
        let _ = watch.join();
        (ran, ok)
    }
}
