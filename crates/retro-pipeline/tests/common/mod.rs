//! A small real multi-document corpus (Python docs when the shared data is present, else generated text)
//! and a database over it with the weight-free lexical embedder.

#![allow(dead_code)]

use retro_index::{BuildOptions, Corpus, Database, Document, LexicalEmbedder, LmTokenizer};

pub fn corpus(docs: usize, max_chars: usize) -> Corpus {
    let documents = match retro_index::testdata::shared_path("data/python-3.11-docs.jsonl") {
        Some(p) => std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .take(docs)
            .enumerate()
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let text: String = v["text"]
                    .as_str()
                    .unwrap()
                    .chars()
                    .take(max_chars - 37 * i)
                    .collect();
                Document {
                    id: v["id"].as_str().unwrap().into(),
                    source: "python-docs".into(),
                    text,
                }
            })
            .collect::<Vec<_>>(),
        None => (0..docs)
            .map(|i| Document {
                id: format!("doc{i}"),
                source: "generated".into(),
                text: (0..max_chars / 8)
                    .map(|j| format!("w{} ", (i * 7 + j * 13) % 50))
                    .collect(),
            })
            .collect(),
    };
    Corpus::from_documents(documents)
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub db: Database,
    pub tokenizer: LmTokenizer,
    pub embedder: LexicalEmbedder,
}

pub fn fixture(docs: usize, max_chars: usize, chunk_len: usize) -> Fixture {
    let corpus = corpus(docs, max_chars);
    let tokenizer = LmTokenizer::char_from_corpus(&corpus);
    let embedder = LexicalEmbedder::new(128).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        chunk_len,
        ..Default::default()
    };
    let db = Database::build(
        &corpus,
        &tokenizer,
        &embedder,
        &opts,
        &dir.path().join("db"),
    )
    .unwrap();
    Fixture {
        dir,
        db,
        tokenizer,
        embedder,
    }
}
