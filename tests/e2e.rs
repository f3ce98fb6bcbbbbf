//! The whole RETRO loop through the `retro` binary at toy size: index, dataset, train (and resume),
//! baseline, eval with retrieval on/off, generation retrieving at every chunk boundary.

mod common;

use common::retro;
use std::path::Path;
use std::process::Command;

/// Runs retro expecting failure; returns stderr.
fn retro_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_retro"))
        .args(args)
        .output()
        .expect("run retro");
    assert!(!out.status.success(), "retro {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The text of document `i` of a JSONL corpus.
fn held_text_of(corpus: &str, i: usize) -> String {
    let line = std::fs::read_to_string(corpus)
        .unwrap()
        .lines()
        .nth(i)
        .unwrap()
        .to_string();
    serde_json::from_str::<serde_json::Value>(&line).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Six documents: Python docs when the shared data is there, else generated text.
fn write_corpus(dir: &Path) -> (String, String) {
    let docs: Vec<(String, String)> =
        match retro_index::testdata::shared_path("data/python-3.11-docs.jsonl") {
            Some(p) => std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .take(6)
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (
                        v["id"].as_str().unwrap().to_string(),
                        v["text"].as_str().unwrap().chars().take(4000).collect(),
                    )
                })
                .collect(),
            None => (0..6)
                .map(|i| {
                    (
                        format!("doc{i}"),
                        (0..500)
                            .map(|j| format!("w{} ", (i * 7 + j * 13) % 40))
                            .collect(),
                    )
                })
                .collect(),
        };
    let line = |(id, text): &(String, String)| {
        serde_json::json!({"id": id, "text": text}).to_string() + "\n"
    };
    std::fs::write(
        dir.join("corpus.jsonl"),
        docs[..5].iter().map(line).collect::<String>(),
    )
    .unwrap();
    // The character tokenizer knows only the database's characters.
    let known: std::collections::HashSet<char> =
        docs[..5].iter().flat_map(|d| d.1.chars()).collect();
    let held = (
        docs[5].0.clone(),
        docs[5].1.chars().filter(|c| known.contains(c)).collect(),
    );
    std::fs::write(dir.join("heldout.jsonl"), line(&held)).unwrap();
    (docs[0].0.clone(), docs[0].1.chars().take(20).collect())
}

#[test]
fn the_whole_loop_at_toy_size() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n).to_string_lossy().into_owned();
    let (first_id, prompt) = write_corpus(tmp.path());
    let corpus = d("corpus.jsonl");
    retro(&[
        "index",
        "build",
        "--corpus",
        &corpus,
        "--tokenizer",
        "char",
        "--lexical-embedder",
        "128",
        "--chunk-len",
        "16",
        "--out",
        &d("db"),
    ]);
    let info = retro(&["index", "info", &d("db")]);
    assert!(info.contains("5") && info.contains("chunk"), "{info}");
    retro(&[
        "dataset",
        "build",
        "--db",
        &d("db"),
        "--seq-len",
        "64",
        "--k",
        "2",
        "--hold-out",
        &first_id,
        "--out",
        &d("ds"),
    ]);
    let show = retro(&["dataset", "show", &d("ds"), "--sample", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["chunks"].as_array().unwrap().len(), 4);

    let ds = d("ds");
    let train = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "train",
            "--dataset",
            &ds,
            "--preset",
            "tiny",
            "--steps",
            "120",
            "--batch-size",
            "4",
        ];
        a.extend([
            "--lr",
            "3e-3",
            "--warmup",
            "10",
            "--schedule",
            "cosine",
            "--eval-every",
            "40",
            "--checkpoint-every",
            "60",
            "--out",
            out,
        ]);
        a.extend(extra);
        retro(&a)
    };
    train(&d("run"), &[]);
    let l = losses(Path::new(&d("run")));
    assert_eq!(l.len(), 120);
    let (first, last) = (
        l[..5].iter().sum::<f64>() / 5.0,
        l[115..].iter().sum::<f64>() / 5.0,
    );
    assert!(last < 0.75 * first, "loss did not fall: {first} -> {last}");
    assert!(Path::new(&d("run")).join("loss.png").exists());

    // Interrupted at 60, resumed: the same curve.
    train(&d("half"), &["--stop-after", "60"]);
    assert_eq!(losses(Path::new(&d("half"))).len(), 60);
    retro(&["train", "--dataset", &d("ds"), "--resume", &d("half")]);
    let h = losses(Path::new(&d("half")));
    for s in 60..120 {
        assert!(
            (l[s] - h[s]).abs() < 1e-4,
            "step {}: {} vs resumed {}",
            s + 1,
            l[s],
            h[s]
        );
    }

    // Baseline without retrieval, then eval: on, off and baseline.
    train(&d("base"), &["--no-retrieval"]);
    let eval = retro(&[
        "eval",
        "--run",
        &d("run"),
        "--data",
        &d("heldout.jsonl"),
        "--baseline",
        &d("base"),
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_str(&eval).unwrap();
    for key in ["on", "off", "baseline"] {
        let bpb = e["bits_per_byte"][key].as_f64().unwrap_or(f64::NAN);
        assert!(bpb.is_finite() && bpb > 0.0 && bpb < 8.0, "{key}: {eval}");
    }
    assert_eq!(e["k"], 2, "{eval}");
    assert!(
        e["database_id"].as_str().is_some_and(|s| s.len() == 16),
        "{eval}"
    );
    let conditions = e["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 2, "{eval}");
    assert_eq!(conditions[0]["condition"], "related");
    assert_eq!(conditions[0]["overlap"].as_array().unwrap().len(), 5);
    // The held-out document is not in the database; its held-out twin of the dataset is excluded
    // only in the novel condition.
    assert_eq!(
        conditions[0]["excluded_documents"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(conditions[1]["excluded_documents"][0], first_id.as_str());
    let table = retro(&[
        "eval",
        "--run",
        &d("run"),
        "--data",
        &d("heldout.jsonl"),
        "--k",
        "3",
    ]);
    assert!(
        table.contains("RETRO (retrieval on)")
            && table.contains("RETRO[OFF]")
            && table.contains("K = 3")
            && table.contains("related database")
            && table.contains("novel database"),
        "{table}"
    );
    assert!(tmp.path().join("run/eval-overlap.png").is_file());
    // Through the coherent gate: both scores, and what the gate read.
    let eval_gated = |lookback: &str| {
        vec![
            "eval".to_string(),
            "--run".into(),
            d("run"),
            "--data".into(),
            d("heldout.jsonl"),
            "--coherent".into(),
            "2".into(),
            "--coherent-lookback".into(),
            lookback.into(),
        ]
    };
    let gated = retro(
        &eval_gated("8")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        gated.contains("RETRO (on, every neighbour read)")
            && gated.contains("RETRO (on, gated)")
            && gated.contains("gated: ON / OFF = ")
            && gated.contains("follows a neighbour of the 8 chunk(s) before"),
        "{gated}"
    );
    let refused = retro_fails(
        &eval_gated("0")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(refused.contains("lookback"), "{refused}");
    // A training document is refused, unless asked for; the database's copy of it is found by its
    // content, whatever its file is called.
    let trained =
        serde_json::json!({"id": "renamed", "text": held_text_of(&corpus, 1)}).to_string();
    std::fs::write(d("trained.jsonl"), trained + "\n").unwrap();
    let refused = retro_fails(&["eval", "--run", &d("run"), "--data", &d("trained.jsonl")]);
    assert!(
        refused.contains("trained on") && refused.contains("--allow-training-documents"),
        "{refused}"
    );
    let allowed = retro(&[
        "eval",
        "--run",
        &d("run"),
        "--data",
        &d("trained.jsonl"),
        "--allow-training-documents",
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_str(&allowed).unwrap();
    assert_eq!(
        e["conditions"][0]["excluded_documents"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{allowed}"
    );

    // Generation retrieves at every chunk boundary: 20 prompt + 40 new tokens = chunks 0, 1, 2.
    let g = retro(&[
        "generate",
        "--run",
        &d("run"),
        &prompt,
        "--max-tokens",
        "40",
        "--show-neighbours",
    ]);
    assert_eq!(g.matches("[chunk ").count(), 3, "{g}");
    for u in 0..3 {
        assert!(g.contains(&format!("[chunk {u} ")), "{g}");
    }
    // A prompt shorter than one chunk works.
    retro(&["generate", "--run", &d("run"), "ab", "--max-tokens", "5"]);
}
