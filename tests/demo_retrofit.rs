//! `retro demo retrofit` end to end on the shared data (SmolLM2's GGUF, two Bible translations,
//! MiniLM) at toy size: every step runs, the base is never written, the reports hold each
//! condition, and the table printed at the end is those reports' numbers.

use retro_index::testdata::shared_path;
use std::process::Command;

#[test]
fn the_retrofit_demo_runs_end_to_end_on_the_shared_data() {
    let (Some(gguf), Some(bible), Some(minilm)) = (
        shared_path("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
        shared_path("data/bible"),
        shared_path("models/all-MiniLM-L6-v2"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let run = Command::new(env!("CARGO_BIN_EXE_retro"))
        .args(["demo", "retrofit", "--out", &s(&out), "--gguf", &s(&gguf)])
        .args(["--bible", &s(&bible), "--embedder", &s(&minilm)])
        // The shared data has ASV and WEB: ASV in the database, WEB scored.
        .args([
            "--translations",
            "asv",
            "--books",
            "Jonah",
            "--score",
            "Jonah",
        ])
        .args(["--novel", "Obadiah", "--prompt-verse", "2:1"])
        .args([
            "--max-steps",
            "2",
            "--eval-tokens",
            "128",
            "--generate-tokens",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The database holds ASV's Jonah and Obadiah; training never reads Obadiah.
    let corpus = std::fs::read_to_string(out.join("corpus.jsonl")).unwrap();
    let ids: Vec<String> = corpus
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    assert_eq!(ids, ["\"asv/Jonah\"", "\"asv/Obadiah\""]);
    let ds = std::fs::read_to_string(out.join("dataset/dataset.json")).unwrap();
    assert!(
        ds.contains("asv/Obadiah"),
        "the novel book is held out: {ds}"
    );

    // Each eval report has the conditions the table names, and the table prints their numbers.
    let report = |book: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(out.join(format!("eval-{book}.json"))).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let (jonah, obadiah) = (report("Jonah"), report("Obadiah"));
    let names = |r: &serde_json::Value| -> Vec<String> {
        r["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["condition"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&jonah), ["related"]);
    assert_eq!(names(&obadiah), ["related", "novel"]);
    let bpb = |r: &serde_json::Value, i: usize, what: &str| {
        r["conditions"][i][what]["bits_per_byte"].as_f64().unwrap()
    };
    // The novel condition reads no Obadiah: in-context retrieval then has nothing to copy and
    // the related one does.
    assert!(bpb(&obadiah, 0, "in_context") < bpb(&obadiah, 1, "in_context"));
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Jonah, related"))
        .unwrap_or_else(|| panic!("no summary row for Jonah:\n{stdout}"));
    let off = jonah["retrieval_off"]["bits_per_byte"].as_f64().unwrap();
    for v in [bpb(&jonah, 0, "on"), off, bpb(&jonah, 0, "in_context")] {
        assert!(line.contains(&format!("{v:.4}")), "{v:.4} not in {line:?}");
    }
    // Generation read the parallel verses of the prompt's chunk.
    assert!(stdout.contains("retrieved:") && stdout.contains("of asv/Jonah"));
    assert!(stdout.contains("demo finished in"));
}
