//! HNSW recall against brute force, reload, damaged files, older databases' hnsw_rs dumps, and
//! degenerate vectors.

use rand::{Rng, SeedableRng};
use retro_index::{
    brute_force, recall_at_k, ChunkId, DistUnitDot, Embeddings, Hit, HnswIndex, HnswParams,
    Queries, Walk,
};

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

fn mean_recall(v: &[f32], dim: usize, queries: &Queries, approx: &[Vec<Hit>]) -> f64 {
    queries
        .iter()
        .zip(approx)
        .map(|(q, a)| recall_at_k(&brute_force(v, dim, q, 10), a, 10))
        .sum::<f64>()
        / queries.len() as f64
}

fn queries(n: usize, dim: usize, seed: u64) -> Queries {
    Queries::new(random_unit(n, dim, seed), dim).unwrap()
}

#[test]
fn recall_at_10_and_reload() {
    let (n, dim) = (3000, 32);
    let v = random_unit(n, dim, 7);
    let params = HnswParams::default();
    let idx = HnswIndex::build(&v, dim, params, None).unwrap();
    assert_eq!(idx.len(), n);
    let queries = queries(200, dim, 8);
    let approx = idx.search_batch(&queries, 10, None).unwrap();
    let recall = mean_recall(&v, dim, &queries, &approx);
    assert!(recall >= 0.95, "recall@10 = {recall}");
    // Every node has links, and no list is over its capacity (2M on layer 0).
    assert!(idx.link_count() >= n, "{} links", idx.link_count());

    // The default walk goes over 8-bit codes, but its hits carry the exact f32 distances.
    for (q, hits) in queries.iter().zip(&approx) {
        for &(id, d) in hits {
            let row = &v[id.0 * dim..(id.0 + 1) * dim];
            let exact = (1.0 - row.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()).max(0.0);
            assert!((d - exact).abs() < 1e-5, "{id}: {d} vs {exact}");
        }
    }
    // The walk over the f32 keys finds as much.
    let mut over_f32 = HnswIndex::build(&v, dim, params, None).unwrap();
    over_f32.set_walk(Walk::Exact);
    let r32 = mean_recall(
        &v,
        dim,
        &queries,
        &over_f32.search_batch(&queries, 10, None).unwrap(),
    );
    assert!(
        r32 >= 0.95 && (recall - r32).abs() < 0.02,
        "codes {recall}, f32 {r32}"
    );

    // single search = batch search
    assert_eq!(idx.search(queries.get(0), 10, None).unwrap(), approx[0]);

    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g");
    let base = idx.save(&g).unwrap();
    let keys = || Embeddings::from_vec(v.clone(), dim).unwrap();
    let re = HnswIndex::load(&g, &base, keys(), params).unwrap();
    assert_eq!(re.search_batch(&queries, 10, None).unwrap(), approx);
    assert_eq!(re.link_count(), idx.link_count());
    // wrong expectations are errors, not panics
    let fewer = Embeddings::from_vec(v[..(n - 1) * dim].to_vec(), dim).unwrap();
    let e = HnswIndex::load(&g, &base, fewer, params).err().unwrap();
    assert!(e.to_string().contains("expected 2999 nodes"), "{e}");
    let other_m = HnswParams { m: 8, ..params };
    assert!(HnswIndex::load(&g, &base, keys(), other_m).is_err());
    assert!(HnswIndex::load(&g, "nope", keys(), params).is_err());

    // filtered search: only even ids
    let even = idx
        .search_filtered(queries.get(1), 10, None, &|id| id.0 % 2 == 0)
        .unwrap();
    assert_eq!(even.len(), 10);
    assert!(even.iter().all(|(id, _)| id.0 % 2 == 0));
    // The filtered answer is the exact one among even ids, as the unfiltered answer is overall.
    let exact_even: Vec<Hit> = brute_force(&v, dim, queries.get(1), n)
        .into_iter()
        .filter(|h| h.0 .0 % 2 == 0)
        .take(10)
        .collect();
    assert!(recall_at_k(&exact_even, &even, 10) >= 0.9);
    // A filter may itself search the index (the walk inside gets its own scratch).
    let nested = idx
        .search_filtered(queries.get(1), 10, None, &|id| {
            id.0 % 2 == 0 && !idx.search(queries.get(3), 1, None).unwrap().is_empty()
        })
        .unwrap();
    assert_eq!(nested, even);
    // Only 3 kept keys: all 3 are found, nearest first, even with a narrow beam.
    let few = idx
        .search_filtered(queries.get(2), 10, Some(4), &|id| id.0 % 1000 == 1)
        .unwrap();
    let ids: Vec<usize> = few.iter().map(|h| h.0 .0).collect();
    let mut want: Vec<(usize, f32)> = [1, 1001, 2001]
        .iter()
        .map(|&i| (i, few.iter().find(|h| h.0 .0 == i).expect("all three").1))
        .collect();
    want.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(ids, want.iter().map(|w| w.0).collect::<Vec<_>>());
}

#[test]
fn parallel_and_deterministic_builds_agree_in_quality() {
    let (n, dim) = (4000, 24);
    let v = random_unit(n, dim, 21);
    let queries = queries(200, dim, 22);
    let det = HnswParams {
        deterministic: true,
        ..HnswParams::default()
    };
    let a = HnswIndex::build(&v, dim, det, None).unwrap();
    let b = HnswIndex::build(&v, dim, det, None).unwrap();
    let answers = a.search_batch(&queries, 10, None).unwrap();
    // One key at a time in id order: the same graph, so the same answers and the same file.
    assert_eq!(answers, b.search_batch(&queries, 10, None).unwrap());
    let dir = tempfile::tempdir().unwrap();
    a.save(&dir.path().join("a")).unwrap();
    b.save(&dir.path().join("b")).unwrap();
    let bytes = |d: &str| std::fs::read(dir.path().join(d).join("graph.links")).unwrap();
    assert_eq!(bytes("a"), bytes("b"));
    let par = HnswIndex::build(&v, dim, HnswParams::default(), None).unwrap();
    let (r_det, r_par) = (
        mean_recall(&v, dim, &queries, &answers),
        mean_recall(
            &v,
            dim,
            &queries,
            &par.search_batch(&queries, 10, None).unwrap(),
        ),
    );
    assert!(r_det >= 0.95 && r_par >= 0.95, "{r_det} {r_par}");
    assert!((r_det - r_par).abs() < 0.03, "{r_det} {r_par}");
}

#[test]
fn stored_keys_find_themselves_among_many_repeated_keys() {
    // Repeated text gives identical keys: 2 keys repeated 150 times each among 3,000 distinct
    // ones. Copies that fill each other's lists would trap every walk that enters them.
    let dim = 32;
    let distinct = random_unit(3000, dim, 51);
    let repeated = random_unit(2, dim, 52);
    let mut v = Vec::new();
    for i in 0..3300 {
        match i % 11 {
            0 => v.extend_from_slice(&repeated[..dim]),
            1 => v.extend_from_slice(&repeated[dim..]),
            _ => {}
        }
        if i < 3000 {
            v.extend_from_slice(&distinct[i * dim..(i + 1) * dim]);
        }
    }
    let n = v.len() / dim;
    let params = HnswParams {
        deterministic: true,
        ..HnswParams::default()
    };
    let idx = HnswIndex::build(&v, dim, params, None).unwrap();
    let missed = (0..n)
        .filter(|&i| {
            let hits = idx.search(&v[i * dim..(i + 1) * dim], 1, None).unwrap();
            hits[0].1 > 1e-5
        })
        .count();
    assert!(
        missed <= n / 1000,
        "{missed} of {n} keys did not find a copy of themselves"
    );
}

#[test]
fn a_damaged_graph_file_is_an_error_naming_it() {
    let (n, dim) = (500, 16);
    let v = random_unit(n, dim, 31);
    let params = HnswParams::default();
    let idx = HnswIndex::build(&v, dim, params, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = idx.save(dir.path()).unwrap();
    let path = dir.path().join("graph.links");
    let good = std::fs::read(&path).unwrap();
    let keys = || Embeddings::from_vec(v.clone(), dim).unwrap();
    let load = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        HnswIndex::load(dir.path(), &base, keys(), params)
            .err()
            .map(|e| e.to_string())
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let e = load(&flipped).expect("a flipped byte is caught");
    assert!(e.contains("graph.links") && e.contains("checksum"), "{e}");
    let e = load(&good[..good.len() - 4]).expect("a truncated file is caught");
    assert!(e.contains("graph.links"), "{e}");
    let mut version = good.clone();
    version[8] = 9;
    let e = load(&version).expect("another format version is caught");
    assert!(e.contains("version"), "{e}");
    let e = load(b"not a graph").expect("garbage is caught");
    assert!(e.contains("graph.links"), "{e}");
    assert!(load(&good).is_none(), "the good file loads again");
}

#[test]
fn an_hnsw_rs_dump_of_an_older_database_loads_and_answers() {
    use hnsw_rs::prelude::{AnnT, Hnsw};
    let (n, dim) = (2000, 16);
    let v = random_unit(n, dim, 41);
    let params = HnswParams::default();
    let mut old = Hnsw::new(params.m, n, 16, params.ef_construction, DistUnitDot);
    for (i, r) in v.chunks_exact(dim).enumerate() {
        old.insert_slice((r, i));
    }
    old.set_searching_mode(true);
    let dir = tempfile::tempdir().unwrap();
    let base = old.file_dump(dir.path(), "graph").unwrap();
    let keys = Embeddings::from_vec(v.clone(), dim).unwrap();
    let idx = HnswIndex::load(dir.path(), &base, keys, params).unwrap();
    assert_eq!(idx.len(), n);
    let queries = queries(100, dim, 42);
    let ours = mean_recall(
        &v,
        dim,
        &queries,
        &idx.search_batch(&queries, 10, None).unwrap(),
    );
    let theirs: Vec<Vec<Hit>> = queries
        .iter()
        .map(|q| {
            old.search(q, 10, params.ef_search)
                .into_iter()
                .map(|nb| (ChunkId(nb.d_id), nb.distance))
                .collect()
        })
        .collect();
    let theirs = mean_recall(&v, dim, &queries, &theirs);
    // The same links walked: recall within noise of hnsw_rs' own walk.
    assert!(ours >= theirs - 0.01 && ours >= 0.95, "{ours} vs {theirs}");
    // A missing half of the dump is an error, not a panic.
    std::fs::remove_file(dir.path().join(format!("{base}.hnsw.data"))).unwrap();
    let keys = Embeddings::from_vec(v, dim).unwrap();
    assert!(HnswIndex::load(dir.path(), &base, keys, params).is_err());
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
