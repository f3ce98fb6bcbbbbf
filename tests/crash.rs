//! Crash safety through the binary: `kill -9` during `index build`, `index build --overwrite`,
//! `dataset build`, `dataset build --overwrite` and `train`, at points spread over each command's
//! measured run time. After every kill the previous state is intact (`--verify` passes), a rerun
//! succeeds, and a resumed run ends bit-exactly where an uninterrupted one does. Also determinism:
//! the same corpus and options give the same database id and the same neighbours.

mod common;

use common::retro;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_retro"))
}

/// Runs to completion, returning the wall time.
fn timed(args: &[&str]) -> Duration {
    let t = Instant::now();
    retro(args);
    t.elapsed()
}

/// Starts `args`, kills it with SIGKILL after `after`; 1 if it was still running then, else 0.
fn kill_after(args: &[&str], after: Duration) -> usize {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn retro");
    std::thread::sleep(after);
    let running = child.try_wait().expect("wait").is_none();
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
    running as usize
}

/// Points spread over a run of `total`, from early (setup) to late (the final rename).
fn points(total: Duration) -> Vec<Duration> {
    [0.05, 0.2, 0.4, 0.6, 0.8, 0.95]
        .iter()
        .map(|f| total.mul_f64(*f))
        .collect()
}

/// Calls `round(at)` (a kill at `at`, then its checks; 1 if the kill landed while the command
/// ran) at `points(total)`. On a loaded machine a run can end well before the timed one did
/// (CI runs these tests side by side on 2 cores), so while fewer than three kills have landed it
/// tries again at earlier points, halving each time. At least three must land: kills that all
/// come after the command ended would test nothing.
fn kill_rounds(total: Duration, mut round: impl FnMut(Duration) -> usize) {
    let mut killed: usize = points(total).into_iter().map(&mut round).sum();
    let mut at = total / 2;
    for _ in 0..8 {
        if killed >= 3 {
            break;
        }
        killed += round(at);
        at /= 2;
    }
    assert!(
        killed >= 3,
        "only {killed} of the kills landed while the command ran"
    );
}

fn corpus(dir: &Path, variant: usize) -> PathBuf {
    let p = dir.join(format!("corpus{variant}.jsonl"));
    let text: String = (0..60)
        .map(|i| {
            let body: String = (0..700)
                .map(|j| format!("w{} ", (i * 7 + j * 13 + variant) % 90))
                .collect();
            serde_json::json!({"id": format!("doc{i}"), "text": body}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn index_args<'a>(corpus: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "index",
        "build",
        "--corpus",
        s(corpus),
        "--tokenizer",
        "char",
        "--lexical-embedder",
        "64",
        "--chunk-len",
        "16",
        "--out",
        s(out),
    ];
    v.extend_from_slice(extra);
    v
}

fn db_id(db: &Path) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(db.join("manifest.json")).unwrap()).unwrap();
    m["database_id"].as_str().unwrap().to_string()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".building-") || n.contains(".old-"))
        .collect()
}

#[test]
fn kill_9_during_index_build_and_overwrite_leaves_the_old_or_the_new_database() {
    let tmp = tempfile::tempdir().unwrap();
    let (c0, c1) = (corpus(tmp.path(), 0), corpus(tmp.path(), 1));
    let db = tmp.path().join("db");
    let total = timed(&index_args(&c0, &db, &[]));
    let first_id = db_id(&db);
    std::fs::remove_dir_all(&db).unwrap();

    // Into a new folder: afterwards there is no database, or a whole one.
    kill_rounds(total, |at| {
        let landed = kill_after(&index_args(&c0, &db, &[]), at);
        if db.exists() {
            retro(&["index", "info", s(&db), "--verify"]);
            std::fs::remove_dir_all(&db).unwrap();
        }
        retro(&index_args(&c0, &db, &[]));
        assert_eq!(
            db_id(&db),
            first_id,
            "a rerun after a crash gives the same database"
        );
        assert!(
            leftovers(tmp.path()).is_empty(),
            "{:?}",
            leftovers(tmp.path())
        );
        std::fs::remove_dir_all(&db).unwrap();
        landed
    });

    // Replacing a database: afterwards the old one or the new one, verified; never neither.
    retro(&index_args(&c0, &db, &[]));
    let new_id = {
        let other = tmp.path().join("other");
        retro(&index_args(&c1, &other, &[]));
        db_id(&other)
    };
    kill_rounds(total, |at| {
        let landed = kill_after(&index_args(&c1, &db, &["--overwrite"]), at);
        retro(&["index", "info", s(&db), "--verify"]);
        let id = db_id(&db);
        assert!(id == first_id || id == new_id, "{id}");
        // Back to the old one for the next round.
        retro(&index_args(&c0, &db, &["--overwrite"]));
        assert_eq!(db_id(&db), first_id);
        assert!(
            leftovers(tmp.path()).is_empty(),
            "{:?}",
            leftovers(tmp.path())
        );
        landed
    });
}

fn dataset_args<'a>(
    db: &'a Path,
    out: &'a Path,
    seq_len: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "dataset",
        "build",
        "--db",
        s(db),
        "--seq-len",
        seq_len,
        "--k",
        "2",
        "--out",
        s(out),
    ];
    v.extend_from_slice(extra);
    v
}

fn dataset_id(ds: &Path) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ds.join("dataset.json")).unwrap()).unwrap();
    m["dataset_id"].as_str().unwrap().to_string()
}

#[test]
fn kill_9_during_dataset_build_and_overwrite_and_train_then_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let c0 = corpus(tmp.path(), 0);
    let db = tmp.path().join("db");
    retro(&index_args(&c0, &db, &[]));
    let ds = tmp.path().join("ds");
    let total = timed(&dataset_args(&db, &ds, "64", &[]));
    let id64 = dataset_id(&ds);
    std::fs::remove_dir_all(&ds).unwrap();
    kill_rounds(total, |at| {
        let landed = kill_after(&dataset_args(&db, &ds, "64", &[]), at);
        if ds.exists() {
            retro(&["dataset", "info", s(&ds)]);
            std::fs::remove_dir_all(&ds).unwrap();
        }
        landed
    });
    retro(&dataset_args(&db, &ds, "64", &[]));
    assert_eq!(
        dataset_id(&ds),
        id64,
        "the same dataset after crashes and a rerun"
    );
    let other = tmp.path().join("ds32");
    retro(&dataset_args(&db, &other, "32", &[]));
    let id32 = dataset_id(&other);
    kill_rounds(total, |at| {
        let landed = kill_after(&dataset_args(&db, &ds, "32", &["--overwrite"]), at);
        retro(&["dataset", "info", s(&ds)]);
        let id = dataset_id(&ds);
        assert!(id == id64 || id == id32, "{id}");
        retro(&dataset_args(&db, &ds, "64", &["--overwrite"]));
        assert!(
            leftovers(tmp.path()).is_empty(),
            "{:?}",
            leftovers(tmp.path())
        );
        landed
    });

    // Training: killed at points over its run time, resumed each time; ends where an
    // uninterrupted run ends, bit for bit.
    let train = |out: &Path, resume: bool| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--dataset", s(&ds)].map(String::from).to_vec();
        if resume {
            v.extend(["--resume".into(), s(out).into()]);
        } else {
            v.extend(
                [
                    "--preset",
                    "tiny",
                    "--steps",
                    "40",
                    "--batch-size",
                    "2",
                    "--warmup",
                    "5",
                    "--eval-every",
                    "20",
                    "--checkpoint-every",
                    "5",
                    "--out",
                ]
                .map(String::from),
            );
            v.push(s(out).into());
        }
        v
    };
    let reference = tmp.path().join("reference");
    let args = train(&reference, false);
    let total = timed(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let run = tmp.path().join("run");
    let mut started = false;
    kill_rounds(total, |at| {
        let args = train(&run, started);
        let landed = kill_after(&args.iter().map(String::as_str).collect::<Vec<_>>(), at);
        started = run.join("state.json").exists();
        if !started && run.exists() {
            // Killed before the first checkpoint: the run folder holds no state; start over.
            std::fs::remove_dir_all(&run).unwrap();
        }
        landed
    });
    let args = train(&run, started);
    retro(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let w = |r: &Path| std::fs::read(r.join("checkpoint-0000040/model.safetensors")).unwrap();
    assert!(
        w(&run) == w(&reference),
        "resumed weights differ from an uninterrupted run's"
    );
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=40).collect::<Vec<_>>(),
        "each step once in metrics.jsonl"
    );
    let stale: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n.contains(".building-") || n.contains(".old-"))
        .collect();
    assert!(
        stale.is_empty(),
        "half-written checkpoints left behind: {stale:?}"
    );
}

#[test]
fn the_same_corpus_and_options_give_the_same_database_and_neighbours() {
    let tmp = tempfile::tempdir().unwrap();
    let c0 = corpus(tmp.path(), 0);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // Parallel insertion: the graph may differ, the id (inputs + parameters) does not.
    retro(&index_args(&c0, &a, &[]));
    retro(&index_args(&c0, &b, &[]));
    assert_eq!(db_id(&a), db_id(&b));
    let ds_a = tmp.path().join("ds_a");
    retro(&dataset_args(&a, &ds_a, "64", &[]));
    // A dataset built on one build opens with the other.
    retro(&["dataset", "info", s(&ds_a), "--db", s(&b)]);

    // --deterministic: the same graph, so the same neighbours and the same datasets.
    let (c, d) = (tmp.path().join("c"), tmp.path().join("d"));
    retro(&index_args(&c0, &c, &["--deterministic"]));
    retro(&index_args(&c0, &d, &["--deterministic"]));
    let graph = "hnsw/graph.links";
    assert!(
        std::fs::read(c.join(graph)).unwrap() == std::fs::read(d.join(graph)).unwrap(),
        "{graph} differs between two --deterministic builds"
    );
    let q = |db: &Path| {
        retro(&[
            "index",
            "query",
            s(db),
            "w3 w16 w29 w42 w55",
            "-k",
            "8",
            "--json",
        ])
    };
    assert_eq!(q(&c), q(&d));
    let (dc, dd) = (tmp.path().join("dc"), tmp.path().join("dd"));
    retro(&dataset_args(&c, &dc, "64", &[]));
    retro(&dataset_args(&d, &dd, "64", &[]));
    assert_eq!(dataset_id(&dc), dataset_id(&dd));
}
