//! Criterion bench of the retrieval pipeline over a small in-memory corpus with the lexical
//! embedder (no shared data needed): `Retriever::retrieve` (decode + embed + search + gather) and
//! `Retriever::search` (stored keys: search + gather) for one batch of 4 x 512 tokens, K = 2.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use retro_bench::pipeline::cut_batches;
use retro_index::{BuildOptions, Corpus, Database, Document, LexicalEmbedder, LmTokenizer};
use retro_pipeline::{Filter, Retriever};
use std::hint::black_box;

/// Deterministic pseudo-English documents (a few hundred chunks of 64 characters each).
fn corpus(docs: usize, words: usize) -> Corpus {
    const VOCAB: [&str; 24] = [
        "the",
        "index",
        "chunk",
        "neighbour",
        "python",
        "module",
        "returns",
        "a",
        "list",
        "of",
        "values",
        "when",
        "called",
        "with",
        "function",
        "object",
        "string",
        "file",
        "is",
        "and",
        "retrieval",
        "model",
        "token",
        "database",
    ];
    let mut state = 0x2545f4914f6cdd1du64;
    Corpus::from_documents((0..docs).map(|d| {
        let text = (0..words)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                VOCAB[(state % VOCAB.len() as u64) as usize]
            })
            .collect::<Vec<_>>()
            .join(" ");
        Document {
            id: format!("doc{d}"),
            source: "mem".into(),
            text: format!("{text}. "),
        }
    }))
}

fn pipeline(c: &mut Criterion) {
    let corpus = corpus(24, 400);
    let tokenizer = LmTokenizer::char_from_corpus(&corpus);
    let embedder = LexicalEmbedder::new(256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        chunk_len: 64,
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
    let retriever = Retriever::new(&db, &embedder, &tokenizer, 2).unwrap();
    let batch = cut_batches(&db, 4, 512, 1).unwrap().remove(0);
    let rows: Vec<&[f32]> = batch
        .chunk_ids
        .iter()
        .map(|&id| db.embeddings().row(id))
        .collect();
    let keys = retro_index::Queries::from_rows(&rows).unwrap();
    let chunks = 512 / 64;
    let mut g = c.benchmark_group(format!("pipeline_{}chunks_b4_t512_k2", db.store().len()));
    g.throughput(Throughput::Elements(keys.len() as u64));
    for filter in [Filter::None, Filter::SameDocument] {
        g.bench_function(format!("retrieve_{filter}"), |bch| {
            bch.iter(|| {
                black_box(
                    retriever
                        .retrieve(black_box(&batch.x), Some(&batch.origins), filter)
                        .unwrap(),
                )
            })
        });
        g.bench_function(format!("search_{filter}"), |bch| {
            bch.iter(|| {
                black_box(
                    retriever
                        .search(
                            black_box(keys.clone()),
                            4,
                            chunks,
                            Some(&batch.origins),
                            filter,
                        )
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
