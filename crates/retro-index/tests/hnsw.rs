//! HNSW recall against brute force, reload, and degenerate vectors.

use rand::{Rng, SeedableRng};
use retro_index::{brute_force, recall_at_k, HnswIndex, HnswParams};

fn random_unit(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v: Vec<f32> = (0..n * dim)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    for r in v.chunks_exact_mut(dim) {
        retro_index::l2_normalize(r);
    }
    v
}

#[test]
fn recall_at_10_and_reload() {
    let (n, dim) = (3000, 32);
    let v = random_unit(n, dim, 7);
    let params = HnswParams::default();
    let idx = HnswIndex::build(&v, dim, params, None).unwrap();
    assert_eq!(idx.len(), n);
    let queries: Vec<Vec<f32>> = random_unit(200, dim, 8)
        .chunks_exact(dim)
        .map(|q| q.to_vec())
        .collect();
    let approx = idx.search_batch(&queries, 10, None).unwrap();
    let recall: f64 = queries
        .iter()
        .zip(&approx)
        .map(|(q, a)| recall_at_k(&brute_force(&v, dim, q, 10), a, 10))
        .sum::<f64>()
        / queries.len() as f64;
    assert!(recall >= 0.95, "recall@10 = {recall}");

    // the flat search walks the same graph as hnsw_rs' own search: recall at least as good
    let rs: f64 = queries
        .iter()
        .map(|q| {
            recall_at_k(
                &brute_force(&v, dim, q, 10),
                &idx.search_hnsw_rs(q, 10, None).unwrap(),
                10,
            )
        })
        .sum::<f64>()
        / queries.len() as f64;
    assert!(recall >= rs - 0.01, "flat {recall} vs hnsw_rs {rs}");

    // single search = batch search
    assert_eq!(idx.search(&queries[0], 10, None).unwrap(), approx[0]);

    let dir = tempfile::tempdir().unwrap();
    let base = idx.save(&dir.path().join("g")).unwrap();
    let re = HnswIndex::load(&dir.path().join("g"), &base, dim, params, n).unwrap();
    assert_eq!(re.search_batch(&queries, 10, None).unwrap(), approx);
    // wrong expectations are errors, not panics
    assert!(HnswIndex::load(&dir.path().join("g"), &base, dim, params, n + 1).is_err());
    assert!(HnswIndex::load(&dir.path().join("g"), "nope", dim, params, n).is_err());

    // filtered search: only even ids
    let even = idx
        .search_filtered(&queries[1], 10, None, &|id| id.0 % 2 == 0)
        .unwrap();
    assert_eq!(even.len(), 10);
    assert!(even.iter().all(|(id, _)| id.0 % 2 == 0));
}

#[test]
fn zero_and_nan_vectors_do_not_panic() {
    let dim = 16;
    let mut v = random_unit(200, dim, 3);
    v[..dim].iter_mut().for_each(|x| *x = 0.0); // a zero vector is accepted
    let idx = HnswIndex::build(&v, dim, HnswParams::default(), None).unwrap();
    let hits = idx.search(&vec![0.0; dim], 5, None).unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| (h.1 - 1.0).abs() < 1e-6));
    let mut q = v[dim..2 * dim].to_vec();
    q[3] = f32::NAN;
    assert!(idx.search(&q, 5, None).is_err());
    assert!(idx.search(&[1.0; 3], 5, None).is_err());
    let mut bad = v.clone();
    bad[5 * dim] = f32::INFINITY;
    assert!(HnswIndex::build(&bad, dim, HnswParams::default(), None).is_err());
    // a vector already in the index finds itself at distance ~0
    let me = idx.search(&v[7 * dim..8 * dim], 1, None).unwrap();
    assert_eq!(me[0].0 .0, 7);
    assert!(me[0].1 >= 0.0 && me[0].1 < 1e-5);
    assert!(idx.search(&v[..dim], 0, None).unwrap().is_empty());
}

#[test]
fn brute_force_is_a_full_sort_truncated_and_holds_only_k() {
    let (n, dim) = (2000, 16);
    let mut v = random_unit(n, dim, 11);
    // Duplicated rows give tied distances: ties go to the smaller id.
    let copy = v[5 * dim..6 * dim].to_vec();
    v[1500 * dim..1501 * dim].copy_from_slice(&copy);
    for q in [v[5 * dim..6 * dim].to_vec(), random_unit(1, dim, 12)] {
        let mut all: Vec<(usize, f32)> = v
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, r)| {
                let dot: f32 = r.iter().zip(&q).map(|(a, b)| a * b).sum();
                (i, (1.0 - dot).max(0.0))
            })
            .collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        for k in [0, 1, 10, n, n + 5] {
            let got = brute_force(&v, dim, &q, k);
            assert_eq!(got.len(), k.min(n));
            assert!(got.capacity() <= k.min(n) + 1, "k {k}: {}", got.capacity());
            for (g, e) in got.iter().zip(&all) {
                assert_eq!(g.0 .0, e.0, "k {k}");
                assert!((g.1 - e.1).abs() < 1e-5, "k {k}: {} vs {}", g.1, e.1);
            }
        }
    }
}
