//! Criterion benches of the retrieval index (small sizes, no shared data needed):
//! the SIMD dot distance, HNSW build and search on random unit vectors, lexical embedding.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use retro_bench::index::uniform_unit_vectors as unit_vectors;
use retro_index::{
    distance::dot, distance::dot_portable, Embedder, HnswIndex, HnswParams, LexicalEmbedder,
};
use std::hint::black_box;

fn distance(c: &mut Criterion) {
    let v = unit_vectors(2, 384, 1);
    let (a, b) = v.split_at(384);
    let mut g = c.benchmark_group("dot384");
    g.bench_function("simd", |bch| bch.iter(|| dot(black_box(a), black_box(b))));
    g.bench_function("portable", |bch| {
        bch.iter(|| dot_portable(black_box(a), black_box(b)))
    });
    g.finish();
}

fn hnsw(c: &mut Criterion) {
    let (n, dim) = (5000, 384);
    let v = unit_vectors(n, dim, 2);
    let mut g = c.benchmark_group("hnsw_5k_384");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("build_m16_efc200", |bch| {
        bch.iter(|| HnswIndex::build(black_box(&v), dim, HnswParams::default(), None).unwrap())
    });
    let index = HnswIndex::build(&v, dim, HnswParams::default(), None).unwrap();
    let queries = retro_index::Queries::new(unit_vectors(200, dim, 3), dim).unwrap();
    g.throughput(Throughput::Elements(queries.len() as u64));
    for ef in [32, 128] {
        g.bench_function(format!("search_k10_ef{ef}_one_thread"), |bch| {
            bch.iter(|| {
                for q in queries.iter() {
                    black_box(index.search(q, 10, Some(ef)).unwrap());
                }
            })
        });
        g.bench_function(format!("search_batch_k10_ef{ef}"), |bch| {
            bch.iter(|| index.search_batch(&queries, 10, Some(ef)).unwrap())
        });
    }
    g.finish();
}

fn lexical(c: &mut Criterion) {
    let e = LexicalEmbedder::new(384).unwrap();
    let texts: Vec<String> = (0..256)
        .map(|i| {
            format!("def function_{i}(x): return sorted(x, key=len) # chunk of python docs {i}")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut g = c.benchmark_group("lexical_embed");
    g.throughput(Throughput::Elements(refs.len() as u64));
    g.bench_function("256_texts", |bch| {
        bch.iter(|| e.embed(black_box(&refs)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, distance, hnsw, lexical);
criterion_main!(benches);
