//! Mutation tests of every loader of the database: a valid file is truncated, bit-flipped,
//! overwritten or (JSON) edited field by field, and opening must give `Ok` or an error, never a
//! panic or a hang (`retro_index::testdata::mutate`). Two ways per file:
//! - as it would arrive (the manifest's sizes and checksums then catch most damage);
//! - with the manifest rewritten to agree with the damaged file, so that the parser behind the
//!   checksums is reached (a file damaged before its checksum was taken, or a hand-edited one).
//!
//! When a damaged database opens, it is used: searched, its chunks and neighbours read and decoded.

use rand::Rng;
use retro_format::sha256_bytes;
use retro_index::database::{Manifest, MANIFEST_FILE};
use retro_index::testdata::mutate;
use retro_index::{
    read_npy, write_npy, BuildOptions, ChunkId, Corpus, Database, Document, DocumentId, Exclusion,
    KeyFilter, LexicalEmbedder, LmTokenizer,
};
use std::path::Path;
use std::time::Duration;

const CASES: usize = 2000;
const BUDGET: Duration = Duration::from_secs(6);

fn build(dir: &Path) -> Database {
    let docs = (0..12).map(|i| Document {
        id: format!("doc{i}"),
        source: "mem".into(),
        text: format!("the tide number {i} turns; bread rises {} ", i * 7).repeat(2 + i % 3),
    });
    let c = Corpus::from_documents(docs);
    let tokenizer = &LmTokenizer::char_from_corpus(&c);
    let e = LexicalEmbedder::new(16).unwrap();
    let opts = BuildOptions {
        chunk_len: 8,
        ..Default::default()
    };
    Database::build(&c, tokenizer, &e, &opts, dir).unwrap()
}

/// Uses a database that opened: nothing here may panic either.
fn exercise(db: &Database) {
    let dim = db.manifest().dim;
    let q: Vec<f32> = (0..dim).map(|i| (i as f32).sin()).collect();
    let _ = db.search(&q, 5);
    let _ = db.search_filtered(
        retro_index::Queries::one(&q),
        3,
        None,
        &[KeyFilter {
            exclude: vec![Exclusion::document(DocumentId(0))],
        }],
    );
    let tok = db.tokenizer();
    let store = db.store();
    for i in [0, store.len() / 2, store.len().saturating_sub(1)] {
        if i < store.len() {
            let _ = tok.decode(store.chunk_tokens(ChunkId(i)));
            let _ = tok.decode(&store.neighbour(ChunkId(i)));
            let _ = store.document_of(ChunkId(i));
        }
    }
    let _ = db.recall(4, 2, None);
}

fn fuzz_file(db_dir: &Path, name: &str, json: bool, agree: bool, seed: u64) {
    let path = db_dir.join(name);
    let original = std::fs::read(&path).unwrap();
    let manifest_path = db_dir.join(MANIFEST_FILE);
    let manifest_bytes = std::fs::read(&manifest_path).unwrap();
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    let label = format!(
        "{name} ({})",
        if agree { "manifest agrees" } else { "as found" }
    );
    let (ran, opened) = mutate::run(&label, seed, CASES, BUDGET, |_, rng| {
        let bad = if json {
            mutate::json(rng, &original)
        } else {
            mutate::bytes(rng, &original)
        };
        // The graph file carries its own CRC-32 (bytes 12..16) over the rest: agreeing means
        // that too, so the checks behind it are reached.
        let bad = if agree && name.ends_with(".links") && bad.len() >= 16 {
            let mut b = bad;
            let crc = crc32fast::hash(&b[16..]);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
            b
        } else {
            bad
        };
        std::fs::write(&path, &bad).unwrap();
        if agree && name != MANIFEST_FILE {
            let mut m = manifest.clone();
            let f = m.files.get_mut(name).expect("listed");
            f.bytes = bad.len() as u64;
            f.sha256 = sha256_bytes(&bad);
            std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
        }
        let ok = match Database::open(db_dir) {
            Ok(db) => {
                exercise(&db);
                true
            }
            Err(e) => {
                // Every error names a file, field or value.
                let msg = e.to_string();
                assert!(!msg.is_empty());
                false
            }
        };
        // Sometimes verify too.
        if rng.random_range(0..8) == 0 {
            let _ = Database::open_with(
                db_dir,
                retro_index::OpenOptions {
                    verify_checksums: true,
                    ..Default::default()
                },
            );
        }
        ok
    });
    std::fs::write(&path, &original).unwrap();
    std::fs::write(&manifest_path, &manifest_bytes).unwrap();
    eprintln!("{label}: {ran} cases, {opened} opened");
    assert!(ran >= 200, "{label}: only {ran} cases in the time budget");
    Database::open(db_dir).expect("restored");
}

/// A fresh database and its files (name, is JSON), the manifest last.
fn database() -> (tempfile::TempDir, std::path::PathBuf, Vec<(String, bool)>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("db");
    let db = build(&dir);
    let mut names: Vec<(String, bool)> = db
        .manifest()
        .files
        .names()
        .map(|k| (k.clone(), k.ends_with(".json")))
        .collect();
    names.push((MANIFEST_FILE.to_string(), true));
    (tmp, dir, names)
}

#[test]
fn every_database_file_damaged_as_found() {
    let (_tmp, dir, names) = database();
    for (i, (name, json)) in names.iter().enumerate() {
        fuzz_file(&dir, name, *json, false, 1000 + i as u64);
    }
}

#[test]
fn every_database_file_damaged_behind_agreeing_checksums() {
    let (_tmp, dir, names) = database();
    for (i, (name, json)) in names.iter().enumerate() {
        // The graph file included: its reader checks every count and link, so a graph forged
        // together with both checksums is an error or a graph that walks within bounds.
        if name != MANIFEST_FILE {
            fuzz_file(&dir, name, *json, true, 2000 + i as u64);
        }
    }
}

#[test]
fn npy_and_tokenizer_json_loaders() {
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("k.npy");
    let v: Vec<f32> = (0..48).map(|i| i as f32 * 0.5).collect();
    write_npy(&npy, &v, 16).unwrap();
    assert_eq!(read_npy(&npy).unwrap(), (3, 16, v));
    let original = std::fs::read(&npy).unwrap();
    let bad = tmp.path().join("bad.npy");
    let (ran, _) = mutate::run("npy", 7, CASES, BUDGET, |_, rng| {
        std::fs::write(&bad, mutate::bytes(rng, &original)).unwrap();
        read_npy(&bad).is_ok()
    });
    assert!(ran >= 200);

    // A byte-level BPE tokenizer.json, trained here (the shared GPT-2 one is tested elsewhere).
    let corpus = Corpus::from_documents([Document {
        id: "a".into(),
        source: "mem".into(),
        text: "To be, or not to be: that is the question! ".repeat(20),
    }]);
    let tok_path = tmp.path().join("tokenizer.json");
    retro_index::train_bpe(&corpus, 300, &tok_path).unwrap();
    let json = std::fs::read_to_string(&tok_path).unwrap();
    let (ran, _) = mutate::run("tokenizer.json", 8, CASES, BUDGET, |_, rng| {
        let bad = mutate::json(rng, json.as_bytes());
        let Ok(text) = String::from_utf8(bad) else {
            return false;
        };
        match LmTokenizer::from_json(&text) {
            Ok(t) => {
                if let Ok(ids) = t.encode("To be! or not") {
                    let _ = t.decode(&ids);
                }
                let _ = t.decode(&[0, 1, u32::MAX, t.pad_id()]);
                true
            }
            Err(_) => false,
        }
    });
    assert!(ran >= 200);
}
