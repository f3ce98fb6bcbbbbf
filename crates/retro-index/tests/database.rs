//! Building, reopening and refusing broken or mismatched databases.

use retro_format::FormatError;
use retro_index::{
    BuildOptions, ChunkId, Corpus, Database, Document, Embedder, Exclusion, IndexError, KeyFilter,
    LexicalEmbedder, LmTokenizer, OpenOptions, Queries,
};
use std::path::Path;

fn corpus() -> Corpus {
    let topics = [
        "cats purr and sleep on warm mats",
        "rust borrows and lifetimes",
        "the ocean tides follow the moon",
        "bread rises with yeast and time",
    ];
    let mut docs: Vec<Document> = (0..40)
        .map(|i| Document {
            id: format!("doc{i}"),
            source: "mem".into(),
            text: format!("{} number {i}. ", topics[i % 4]).repeat(1 + i % 5),
        })
        .collect();
    docs.push(Document {
        id: "blank".into(),
        source: "mem".into(),
        text: "  ".into(),
    });
    Corpus::from_documents(docs)
}

fn build(dir: &Path) -> (Corpus, LmTokenizer, LexicalEmbedder, Database) {
    let c = corpus();
    let t = LmTokenizer::char_from_corpus(&c);
    let e = LexicalEmbedder::new(64).unwrap();
    let opts = BuildOptions {
        chunk_len: 16,
        batch_size: 50,
        ..Default::default()
    };
    let db = Database::build(&c, &t, &e, &opts, dir).unwrap();
    (c, t, e, db)
}

#[test]
fn build_open_search_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("db");
    let (c, t, e, db) = build(&dir);
    let m = db.manifest().clone();
    assert_eq!(m.counts.documents, 40);
    assert_eq!(m.counts.empty_skipped, 1);
    let tokens: usize = c.documents.iter().map(|d| d.text.chars().count()).sum();
    assert_eq!(m.counts.tokens, tokens);
    let chunks: usize = c
        .documents
        .iter()
        .map(|d| d.text.chars().count().div_ceil(16))
        .sum();
    assert_eq!(m.counts.chunks, chunks);
    assert_eq!(db.store().len(), chunks);
    assert_eq!(db.embeddings().len(), chunks);
    // no temporary directories left beside it
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    let hits = db
        .search_texts(&e, &["ocean tides and the moon"], 5, None)
        .unwrap();
    let top = hits[0][0].0;
    assert!(
        t.decode(db.store().chunk_tokens(top))
            .unwrap()
            .contains("oce")
            || t.decode(&db.store().neighbour(top))
                .unwrap()
                .contains("moon")
    );
    // a stored key finds its own chunk (or an identical one) at distance ~0
    let own = db.search(db.embeddings().row(ChunkId(10)), 1).unwrap();
    assert!(own[0].1 < 1e-5);
    // self-retrieval filter
    let d = db.store().document_of(ChunkId(10));
    let other = db
        .search_filtered(
            Queries::one(db.embeddings().row(ChunkId(10))),
            5,
            None,
            &[KeyFilter {
                exclude: vec![Exclusion::document(d)],
            }],
        )
        .unwrap()
        .remove(0);
    assert_eq!(other.len(), 5);
    assert!(other.iter().all(|h| db.store().document_of(h.0) != d));

    let r = db.recall(100, 10, None).unwrap();
    assert!(r.recall >= 0.95, "{r:?}");

    // reopen: same id, same answers, checksums verify
    let re = Database::open_with(
        &dir,
        OpenOptions {
            verify_checksums: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(re.id(), db.id());
    assert_eq!(
        re.search(db.embeddings().row(ChunkId(3)), 8).unwrap(),
        db.search(db.embeddings().row(ChunkId(3)), 8).unwrap()
    );
    re.check_compatible(&t).unwrap();
    re.check_embedder(&e).unwrap();
    assert_eq!(re.load_tokenizer().unwrap().fingerprint(), t.fingerprint());

    // building over an existing database needs overwrite
    let opts = BuildOptions {
        chunk_len: 16,
        ..Default::default()
    };
    assert!(Database::build(&c, &t, &e, &opts, &dir).is_err());
    let opts = BuildOptions {
        chunk_len: 8,
        overwrite: true,
        ..Default::default()
    };
    let db8 = Database::build(&c, &t, &e, &opts, &dir).unwrap();
    assert_eq!(db8.chunk_len(), 8);
    assert!(db8.check_chunk_len(16).is_err());
}

#[test]
fn mismatches_and_corruption_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("db");
    let (c, _t, _e, db) = build(&dir);
    drop(db);

    // another tokenizer / embedder
    let other = LmTokenizer::char_from_corpus(&Corpus::from_documents([Document {
        id: "x".into(),
        source: "m".into(),
        text: "xyz".into(),
    }]));
    let db = Database::open(&dir).unwrap();
    assert!(matches!(
        db.check_compatible(&other),
        Err(IndexError::Mismatch {
            field: "tokenizer",
            ..
        })
    ));
    let e2 = LexicalEmbedder::new(32).unwrap();
    assert!(matches!(
        db.check_embedder(&e2),
        Err(IndexError::Mismatch {
            field: "embedder",
            ..
        })
    ));
    assert!(db.search_texts(&e2, &["x"], 1, None).is_err());
    assert!(db.search(&[f32::NAN; 64], 3).is_err());
    assert_eq!(db.search(&[0.0; 64], 3).unwrap().len(), 3);
    drop(db);

    let copy = |name: &str| {
        let d = tmp.path().join(name);
        copy_dir(&dir, &d);
        d
    };
    let d = copy("no-manifest");
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    assert!(matches!(
        Database::open(&d),
        Err(IndexError::Format(FormatError::Missing { .. }))
    ));

    let d = copy("bad-manifest");
    std::fs::write(d.join("manifest.json"), "{ not json").unwrap();
    let e = Database::open(&d).unwrap_err();
    assert!(
        matches!(e, IndexError::Format(FormatError::Corrupt { .. }))
            && e.to_string().contains("manifest.json"),
        "{e}"
    );

    let d = copy("future");
    let m = std::fs::read_to_string(d.join("manifest.json"))
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 99");
    std::fs::write(d.join("manifest.json"), m).unwrap();
    assert!(matches!(
        Database::open(&d),
        Err(IndexError::Format(FormatError::Version { found: 99, .. }))
    ));

    let d = copy("no-graph");
    for f in std::fs::read_dir(d.join("hnsw")).unwrap() {
        let p = f.unwrap().path();
        if p.to_string_lossy().ends_with("graph.links") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let e = Database::open(&d).unwrap_err();
    assert!(
        matches!(e, IndexError::Format(FormatError::Missing { .. }))
            && e.to_string().contains("graph.links"),
        "{e}"
    );

    let d = copy("short-store");
    let p = d.join("tokens.bin");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 8]).unwrap();
    let e = Database::open(&d).unwrap_err();
    assert!(
        matches!(e, IndexError::Format(FormatError::Corrupt { .. }))
            && e.to_string().contains("tokens.bin"),
        "{e}"
    );

    // same size, garbage graph: sizes pass, the graph reader must not panic
    let d = copy("garbage-graph");
    for f in std::fs::read_dir(d.join("hnsw")).unwrap() {
        let p = f.unwrap().path();
        let n = std::fs::metadata(&p).unwrap().len() as usize;
        std::fs::write(&p, vec![0xabu8; n]).unwrap();
    }
    assert!(Database::open(&d).is_err());
    let e = Database::open_with(
        &d,
        OpenOptions {
            verify_checksums: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");

    // flipped byte in the embeddings: a small file, so every open checks its checksum
    let d = copy("flipped");
    let p = d.join("embeddings.bin");
    let mut b = std::fs::read(&p).unwrap();
    b[100] ^= 1;
    std::fs::write(&p, b).unwrap();
    let e = Database::open(&d).unwrap_err().to_string();
    assert!(e.contains("embeddings.bin") && e.contains("SHA-256"), "{e}");
    assert!(Database::open_with(
        &d,
        OpenOptions {
            verify_checksums: true,
            ..Default::default()
        }
    )
    .is_err());

    // empty corpus
    let empty = Corpus::from_documents([Document {
        id: "e".into(),
        source: "m".into(),
        text: String::new(),
    }]);
    let t = LmTokenizer::char_from_corpus(&c);
    let e = LexicalEmbedder::new(8).unwrap();
    assert!(matches!(
        Database::build(
            &empty,
            &t,
            &e,
            &BuildOptions::default(),
            &tmp.path().join("e")
        ),
        Err(IndexError::EmptyCorpus { empty_skipped: 1 })
    ));
    assert!(!tmp.path().join("e").exists());
    let _ = e.id();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// A BERT directory without sentence-transformers' Normalize module (plain BERT, as in the paper)
/// gives raw mean-pooled vectors; the database must still store unit keys, or the graph's distance
/// would rank by vector norm and many keys would tie.
#[test]
fn keys_of_a_model_without_normalize_are_stored_as_unit_vectors() {
    let Some(model) = retro_index::testdata::shared_path("models/all-MiniLM-L6-v2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain-bert");
    std::fs::create_dir(&plain).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(model.join(f), plain.join(f)).unwrap();
    }
    let e = retro_index::BertEmbedder::load(&plain, &retro_index::Device::Cpu).unwrap();
    assert!(!e.normalizes());
    let raw = e.embed(&["cats purr on warm mats"]).unwrap();
    let norm = raw[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 0.05,
        "the model's own output is raw: norm {norm}"
    );
    let c = Corpus::from_documents((0..6).map(|i| {
        Document {
            id: format!("d{i}"),
            source: "mem".into(),
            text: [
                "cats purr on warm mats. ",
                "tides follow the moon. ",
                "yeast makes bread rise. ",
            ][i % 3]
                .repeat(3),
        }
    }));
    let t = LmTokenizer::char_from_corpus(&c);
    let db = Database::build(
        &c,
        &t,
        &e,
        &BuildOptions {
            chunk_len: 24,
            ..Default::default()
        },
        &tmp.path().join("db"),
    )
    .unwrap();
    assert_eq!(db.manifest().key_metric.as_deref(), Some("unit-l2"));
    for i in 0..db.embeddings().len() {
        let n = db
            .embeddings()
            .row(ChunkId(i))
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt();
        assert!((n - 1.0).abs() < 1e-4, "key {i} has norm {n}");
    }
    // Chunks of the same text are at distance ~0; chunks of the other topics are not: no ties at 0
    // between keys of other directions.
    let n = db.embeddings().len();
    let hits = db.search(db.embeddings().row(ChunkId(0)), n).unwrap();
    assert!(hits[0].1 < 1e-4, "{hits:?}");
    let far = hits.iter().filter(|h| h.1 > 0.05).count();
    assert!(far >= n / 2, "{hits:?}");
}

#[test]
fn overwrite_never_deletes_a_folder_that_is_not_a_database() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus();
    let t = LmTokenizer::char_from_corpus(&c);
    let e = LexicalEmbedder::new(64).unwrap();
    let opts = BuildOptions {
        chunk_len: 16,
        overwrite: true,
        ..Default::default()
    };
    // A folder of the user's files.
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("thesis.txt"), "years of work").unwrap();
    let err = Database::build(&c, &t, &e, &opts, &mine)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a retro database"), "{err}");
    assert_eq!(
        std::fs::read_to_string(mine.join("thesis.txt")).unwrap(),
        "years of work"
    );
    // The corpus folder itself.
    let corpus_dir = tmp.path().join("corpus");
    std::fs::create_dir(&corpus_dir).unwrap();
    std::fs::write(corpus_dir.join("a.txt"), "some text to index here").unwrap();
    let files = retro_index::read_corpus(&corpus_dir, &Default::default()).unwrap();
    let t2 = LmTokenizer::char_from_corpus(&files);
    let err = Database::build(&files, &t2, &e, &opts, &corpus_dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corpus"), "{err}");
    assert!(corpus_dir.join("a.txt").is_file());
    // A database is replaced; without overwrite it is refused; no temporary folder is left.
    let db_dir = tmp.path().join("db");
    Database::build(&c, &t, &e, &opts, &db_dir).unwrap();
    let no = BuildOptions {
        overwrite: false,
        ..opts.clone()
    };
    let err = Database::build(&c, &t, &e, &no, &db_dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--overwrite"), "{err}");
    // A leftover of a build that died (its process is gone) is cleaned up by the next build.
    let stale = tmp.path().join(".db.building-4000000-1");
    std::fs::create_dir(&stale).unwrap();
    Database::build(&c, &t, &e, &opts, &db_dir).unwrap();
    assert!(!stale.exists());
    let hidden: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
