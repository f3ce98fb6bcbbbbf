//! Databases whose keys live in a real Milvus server, against the same corpus in the embedded
//! hnsw_rs graph. Needs `--features milvus` and a server: `tools/milvus.sh start`, then
//! `RETRO_MILVUS_URL=milvus://127.0.0.1:PORT` (`.ci/run` does both, and sets
//! `RETRO_REQUIRE_MILVUS=1` so that these fail rather than skip there).
#![cfg(feature = "milvus")]

use retro_index::{
    testdata, BuildOptions, ChunkId, Corpus, Database, Document, DocumentId, Exclusion, Hit,
    KeyFilter, LexicalEmbedder, LmTokenizer, MilvusIndexParams, MilvusLocation, OpenOptions,
    Queries,
};
use retro_pipeline::{Dataset, DatasetParams, Split};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One test at a time: they share the server, and one of them restarts it.
static SERVER: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERVER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Twelve documents of real text (the Python docs when the shared data is there, else generated).
fn corpus() -> Corpus {
    let docs: Vec<Document> = match testdata::shared_path("data/python-3.11-docs.jsonl") {
        Some(p) => std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .take(12)
            .enumerate()
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Document {
                    id: v["id"].as_str().unwrap().into(),
                    source: "python-docs".into(),
                    text: v["text"]
                        .as_str()
                        .unwrap()
                        .chars()
                        .take(6000 - 200 * i)
                        .collect(),
                }
            })
            .collect(),
        None => (0..12)
            .map(|i| Document {
                id: format!("doc{i}"),
                source: "generated".into(),
                text: (0..700)
                    .map(|j| format!("w{} ", (i * 7 + j * 13) % 90))
                    .collect(),
            })
            .collect(),
    };
    Corpus::from_documents(docs)
}

fn build(
    corpus: &Corpus,
    out: &Path,
    store: Option<(&str, MilvusIndexParams)>,
    overwrite: bool,
) -> retro_index::Result<Database> {
    let tokenizer = LmTokenizer::char_from_corpus(corpus);
    let opts = BuildOptions {
        chunk_len: 16,
        overwrite,
        vector_store: store.map(|(u, p)| (MilvusLocation::parse(u).unwrap(), p)),
        ..Default::default()
    };
    Database::build(
        corpus,
        &tokenizer,
        &LexicalEmbedder::new(128).unwrap(),
        &opts,
        out,
    )
}

fn hnsw() -> MilvusIndexParams {
    MilvusIndexParams::hnsw(Default::default())
}

/// Both stores over one corpus; the collection is named after the test.
fn pair(url: &str, name: &str) -> (tempfile::TempDir, Database, Database, String) {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus();
    let embedded = build(&c, &dir.path().join("hnsw"), None, false).unwrap();
    let store = format!("{url}/{name}");
    let milvus = build(&c, &dir.path().join("milvus"), Some((&store, hnsw())), true).unwrap();
    (dir, embedded, milvus, store)
}

fn sample_keys(db: &Database, n: usize) -> (Vec<ChunkId>, Queries) {
    let total = db.store().len();
    let ids: Vec<ChunkId> = (0..n).map(|i| ChunkId(i * total / n)).collect();
    let rows: Vec<&[f32]> = ids.iter().map(|&i| db.embeddings().row(i)).collect();
    (ids, Queries::from_rows(&rows).unwrap())
}

/// The fraction of `b`'s hits that `a` also has, counting a hit at the distance of `a`'s last
/// as agreeing (equal keys tie, and either store may pick either).
fn agreement(a: &[Hit], b: &[Hit]) -> f64 {
    let last = a.last().map_or(0.0, |h| h.1);
    let same = b
        .iter()
        .filter(|h| a.iter().any(|x| x.0 == h.0) || h.1 <= last + 1e-5)
        .count();
    same as f64 / b.len().max(1) as f64
}

#[test]
fn milvus_and_hnsw_rs_agree_on_the_top_10() {
    let Some(url) = testdata::milvus_url() else {
        return;
    };
    let _g = lock();
    let (_dir, embedded, milvus, _) = pair(&url, "retro_test_agree");
    assert_eq!(milvus.index().len(), embedded.store().len());
    let d = milvus.index().describe();
    assert_eq!(
        (d.store.as_str(), d.dim, d.count),
        ("milvus", 128, embedded.store().len())
    );
    let (_, keys) = sample_keys(&embedded, 300);
    let a = embedded.search_batch(keys.clone(), 10, None).unwrap();
    let b = milvus.search_batch(keys.clone(), 10, None).unwrap();
    let mean = a.iter().zip(&b).map(|(x, y)| agreement(x, y)).sum::<f64>() / a.len() as f64;
    assert!(mean >= 0.9, "top-10 agreement {mean:.3}");
    // Both rank by 1 - cosine, so their first hits are as far. Both are approximate: on these
    // hashed lexical keys the embedded graph misses its own key for about 1 stored key in 2,000
    // at the default ef, so a few of the 300 may differ, not more.
    let mut differ = Vec::new();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(y.len(), 10);
        if (x[0].1 - y[0].1).abs() >= 1e-3 {
            differ.push((x[0], y[0]));
        }
    }
    assert!(differ.len() <= 3, "first hits differ: {differ:?}");
    milvus.index().drop_index().unwrap();
}

#[test]
fn the_same_document_filter_runs_inside_milvus_and_returns_exactly_k() {
    let Some(url) = testdata::milvus_url() else {
        return;
    };
    let _g = lock();
    let (_dir, embedded, milvus, _) = pair(&url, "retro_test_filter");
    let store = milvus.store();
    let (ids, keys) = sample_keys(&milvus, 60);
    let filters: Vec<KeyFilter> = ids
        .iter()
        .map(|&c| KeyFilter {
            exclude: vec![Exclusion::document(store.document_of(c))],
        })
        .collect();
    let hits = milvus
        .search_filtered(keys.clone(), 10, None, &filters)
        .unwrap();
    for (&c, h) in ids.iter().zip(&hits) {
        assert_eq!(h.len(), 10, "query chunk {c}");
        assert!(h
            .iter()
            .all(|x| store.document_of(x.0) != store.document_of(c)));
    }
    // A filter that leaves two documents: over-fetching the nearest and dropping would come
    // back short; Milvus filters inside the search.
    let n_docs = store.documents().len();
    let keep = [DocumentId(n_docs - 2), DocumentId(n_docs - 1)];
    let two = KeyFilter {
        exclude: (0..n_docs)
            .map(DocumentId)
            .filter(|d| !keep.contains(d))
            .map(Exclusion::document)
            .collect(),
    };
    let available: usize = keep
        .iter()
        .map(|&d| store.chunks_of_document(d).len())
        .sum();
    let k = 12.min(available);
    for db in [&embedded, &milvus] {
        let hits = db
            .search_filtered(keys.first(5), k, None, &vec![two.clone(); 5])
            .unwrap();
        for h in &hits {
            assert_eq!(h.len(), k);
            assert!(h.iter().all(|x| keep.contains(&store.document_of(x.0))));
        }
    }
    // Starts within a document: the sequence filter's shape.
    let d0 = store.document_of(ids[0]);
    let window = KeyFilter {
        exclude: vec![Exclusion {
            document: d0,
            starts: 0..160,
        }],
    };
    let h = milvus
        .search_filtered(keys.first(1), 20, None, std::slice::from_ref(&window))
        .unwrap();
    assert_eq!(h[0].len(), 20);
    assert!(h[0]
        .iter()
        .all(|x| window.keeps(store.document_of(x.0), store.chunk_start(x.0))));
    milvus.index().drop_index().unwrap();
}

#[test]
fn a_dataset_built_on_milvus_passes_the_filter_audit() {
    let Some(url) = testdata::milvus_url() else {
        return;
    };
    let _g = lock();
    let (dir, embedded, milvus, _) = pair(&url, "retro_test_dataset");
    let held = milvus.store().documents()[3].id.clone();
    let params = DatasetParams {
        seq_len: 64,
        k: 2,
        seed: 3,
        held_out_ids: vec![held],
        ..Default::default()
    };
    let a = Dataset::build(&embedded, &params, &dir.path().join("ds-h"), &|_, _| {}).unwrap();
    let b = Dataset::build(&milvus, &params, &dir.path().join("ds-m"), &|_, _| {}).unwrap();
    let store = milvus.store();
    let (mut same, mut all) = (0usize, 0usize);
    for split in [Split::Train, Split::Valid] {
        assert_eq!(a.len(split), b.len(split));
        for i in 0..b.len(split) {
            let o = b.origin(split, i);
            assert_eq!(o, a.origin(split, i));
            for ((id, _), (other, _)) in b.neighbours(split, i).iter().zip(a.neighbours(split, i)) {
                let id = id.expect("k neighbours exist");
                let d = store.document_of(id);
                assert_ne!(d, o.document, "{split:?} {i}: its own document");
                assert_ne!(d, DocumentId(3), "{split:?} {i}: a held-out document");
                same += usize::from(Some(id) == other);
                all += 1;
            }
        }
    }
    // Ties between equal keys may go either way; most neighbours are the same chunk.
    assert!(same * 10 >= all * 8, "{same} of {all} neighbours agree");
    milvus.index().drop_index().unwrap();
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/milvus.sh")
}

fn server(cmd: &str) -> String {
    let out = Command::new(script()).arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "tools/milvus.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_stopped_server_gives_a_clear_error_and_the_next_call_works() {
    let Some(url) = testdata::milvus_url() else {
        return;
    };
    let _g = lock();
    // Only a server this script runs can be stopped and started here.
    let ours = Command::new(script()).arg("status").output().unwrap();
    if String::from_utf8_lossy(&ours.stdout).trim() != url {
        assert!(
            std::env::var("RETRO_REQUIRE_MILVUS").is_err(),
            "RETRO_MILVUS_URL {url} is not the server tools/milvus.sh runs"
        );
        eprintln!("SKIPPED: {url} is not run by tools/milvus.sh");
        return;
    }
    let (dir, _embedded, milvus, store) = pair(&url, "retro_test_restart");
    let (_, keys) = sample_keys(&milvus, 4);
    let before = milvus.search_batch(keys.clone(), 5, None).unwrap();
    server("stop");
    let e = milvus
        .search_batch(keys.clone(), 5, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&store) && e.contains("attempts"), "{e}");
    let e = Database::open(&dir.path().join("milvus"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&url) && e.contains("server running"), "{e}");
    assert_eq!(server("start"), url);
    // The same handle reconnects; a fresh open works too. (The reloaded index need not
    // answer bit for bit as before: Milvus rebuilds its segments' search state on load.)
    let again = Database::open_with(&dir.path().join("milvus"), OpenOptions::default()).unwrap();
    for after in [
        milvus.search_batch(keys.clone(), 5, None).unwrap(),
        again.search_batch(keys.clone(), 5, None).unwrap(),
    ] {
        assert_eq!(after.len(), before.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.len(), 5);
            // Each query is a stored key: it finds itself (or an equal key) first.
            assert!(a[0].1.abs() < 1e-5 && b[0].1.abs() < 1e-5, "{a:?}");
            assert!(agreement(b, a) >= 0.6, "before {b:?} after {a:?}");
        }
    }
    milvus.index().drop_index().unwrap();
}

#[test]
fn a_manifest_and_collection_that_disagree_are_refused() {
    let Some(url) = testdata::milvus_url() else {
        return;
    };
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let c = corpus();
    let store = format!("{url}/retro_test_disagree");
    let db_dir = dir.path().join("a");
    build(&c, &db_dir, Some((&store, hnsw())), true).unwrap();
    // An existing collection needs --overwrite.
    let e = build(&c, &dir.path().join("b"), Some((&store, hnsw())), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&store) && e.contains("--overwrite"), "{e}");
    // Another database rebuilt into the same collection.
    let fewer = Corpus::from_documents(c.documents[..6].to_vec());
    let other = build(&fewer, &dir.path().join("c"), Some((&store, hnsw())), true).unwrap();
    let e = Database::open(&db_dir).unwrap_err().to_string();
    assert!(
        e.contains("retro_test_disagree") && e.contains("another database"),
        "{e}"
    );
    // The manifest edited: its count no longer matches its own chunks.
    let m = dir.path().join("c/manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    v["vector_store"]["count"] = serde_json::json!(7);
    std::fs::write(&m, serde_json::to_string(&v).unwrap()).unwrap();
    let e = Database::open(&dir.path().join("c"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vector_store") && e.contains("count 7"), "{e}");
    // The collection dropped.
    other.index().drop_index().unwrap();
    let e = Database::open(&db_dir).unwrap_err().to_string();
    assert!(
        e.contains("retro_test_disagree") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn the_cli_builds_queries_and_describes_a_milvus_database() {
    let Some(url) = testdata::milvus_url() else {
        return;
    };
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    std::fs::create_dir(&corpus_dir).unwrap();
    for d in &corpus().documents[..6] {
        std::fs::write(
            corpus_dir.join(format!("{}.txt", d.id.replace('/', "_"))),
            &d.text,
        )
        .unwrap();
    }
    let db = dir.path().join("db");
    let store = format!("{url}/retro_test_cli");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_retro"))
            .args(args)
            .output()
            .unwrap()
    };
    let retro = |args: &[&str]| {
        let out = run(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let c = corpus_dir.to_str().unwrap();
    let d = db.to_str().unwrap();
    let build = [
        "index",
        "build",
        "--corpus",
        c,
        "--tokenizer",
        "char",
        "--lexical-embedder",
        "64",
        "--chunk-len",
        "16",
        "--out",
        d,
        "--quiet",
        "--vector-store",
        &store,
        "--milvus-index",
        "ivf-flat",
        "--nlist",
        "16",
        "--nprobe",
        "16",
        "--overwrite",
    ];
    let (ok, out) = retro(&build);
    assert!(ok, "{out}");
    let (ok, out) = retro(&["index", "info", d]);
    assert!(
        ok && out.contains("milvus") && out.contains(&store) && out.contains("IVF_FLAT"),
        "{out}"
    );
    let out = run(&["index", "query", d, "def", "-k", "3", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["hits"].as_array().map(Vec::len), Some(3), "{v}");
    let (ok, out) = retro(&["index", "recall", d, "--sample", "50", "-k", "10"]);
    assert!(ok && out.contains("recall"), "{out}");
    // A malformed URL names itself.
    let mut bad = build.to_vec();
    let i = bad.iter().position(|a| *a == store.as_str()).unwrap();
    bad[i] = "milvus://127.0.0.1/nocollection";
    let (ok, out) = retro(&bad);
    assert!(
        !ok && out.contains("milvus://127.0.0.1/nocollection"),
        "{out}"
    );
    let db = Database::open(&db).unwrap();
    db.index().drop_index().unwrap();
}
