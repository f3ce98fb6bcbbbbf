//! Datasets with precomputed neighbours: filters over every chunk, held-out documents, reload checks.

mod common;

use retro_index::DocumentId;
use retro_pipeline::{Dataset, DatasetParams, Filter, Split};

#[test]
fn dataset_neighbours_obey_the_filters_and_batches_hold_the_right_tokens() {
    let f = common::fixture(6, 4000, 16);
    let store = f.db.store();
    let out = f.dir.path().join("ds");
    let held = store.documents()[4].id.clone();
    let params = DatasetParams {
        seq_len: 64,
        k: 2,
        seed: 7,
        held_out_ids: vec![held.clone()],
        ..Default::default()
    };
    let ds = Dataset::build(&f.db, &params, &out, &|_, _| {}).unwrap();
    let m = ds.meta();
    assert_eq!(m.filter, Filter::SameDocument);
    assert_eq!(m.held_out_documents, vec![(DocumentId(4), held)]);
    assert!(ds.len(Split::Train) > 10 && ds.len(Split::Valid) > 0);
    for split in [Split::Train, Split::Valid] {
        for i in 0..ds.len(split) {
            let o = ds.origin(split, i);
            assert_eq!(o.start % 16, 0);
            assert_eq!(o.document == DocumentId(4), split == Split::Valid);
            let nb = ds.neighbours(split, i);
            assert_eq!(nb.len(), 4 * 2);
            for (id, _) in nb {
                let d = store.document_of(id.expect("enough other documents"));
                assert_ne!(
                    d, o.document,
                    "{split:?} sequence {i} retrieved its own document"
                );
                assert_ne!(
                    d,
                    DocumentId(4),
                    "a held-out document served as a neighbour"
                );
            }
        }
    }
    let b = ds.batch(&f.db, Split::Train, &[0, 3]);
    let o = ds.origin(Split::Train, 3);
    let doc = store.document_tokens(o.document);
    assert_eq!(&b.x[64..128], &doc[o.start..o.start + 64]);
    assert_eq!(&b.y[64..128], &doc[o.start + 1..o.start + 65]);
    let first = ds.neighbours(Split::Train, 0)[0].0.unwrap();
    assert_eq!(b.ret.neighbour(0, 0), &store.neighbour(first)[..]);
    let (x, y, ret) = b.tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(
        (x.dims(), y.dims(), ret.dims()),
        (&[2, 64][..], &[2, 64][..], &[2, 4, 2, 32][..])
    );

    // Reproducible from the seed.
    let again = Dataset::build(&f.db, &params, &f.dir.path().join("ds2"), &|_, _| {}).unwrap();
    for i in 0..ds.len(Split::Train) {
        assert_eq!(ds.origin(Split::Train, i), again.origin(Split::Train, i));
        assert_eq!(
            ds.neighbours(Split::Train, i),
            again.neighbours(Split::Train, i)
        );
    }
    // Shuffled batches cover each sequence once per epoch.
    let mut seen: Vec<usize> = ds.epoch_batches(Split::Train, 3, 1, 0).concat();
    seen.sort();
    assert_eq!(seen.len(), ds.len(Split::Train) / 3 * 3);
    seen.dedup();
    assert_eq!(seen.len(), ds.len(Split::Train) / 3 * 3);
}

#[test]
fn a_dataset_refuses_another_database_and_damaged_files() {
    let f = common::fixture(4, 2000, 16);
    let g = common::fixture(3, 2000, 16);
    let out = f.dir.path().join("ds");
    let params = DatasetParams {
        seq_len: 32,
        ..Default::default()
    };
    Dataset::build(&f.db, &params, &out, &|_, _| {}).unwrap();
    let err = Dataset::open(&out, &g.db).err().unwrap().to_string();
    assert!(
        err.contains("dataset.json") && err.contains("built from database"),
        "{err}"
    );
    std::fs::write(out.join("train.neighbours"), b"abc").unwrap();
    let err = Dataset::open(&out, &f.db).err().unwrap().to_string();
    assert!(
        err.contains("train.neighbours") && err.contains("bytes"),
        "{err}"
    );
    std::fs::remove_file(out.join("dataset.json")).unwrap();
    assert!(Dataset::open(&out, &f.db)
        .err()
        .unwrap()
        .to_string()
        .contains("dataset.json"));
}

#[test]
fn a_one_document_corpus_never_lets_a_neighbour_hold_its_own_sequence_or_the_validation_tail() {
    let f = common::fixture(1, 8000, 16);
    let store = f.db.store();
    let params = DatasetParams {
        seq_len: 64,
        k: 2,
        ..Default::default()
    };
    let ds = Dataset::build(&f.db, &params, &f.dir.path().join("ds"), &|_, _| {}).unwrap();
    assert_eq!(ds.meta().filter, Filter::Sequence(64));
    let max_train = (0..ds.len(Split::Train))
        .map(|i| ds.origin(Split::Train, i).start)
        .max()
        .unwrap();
    let min_valid = (0..ds.len(Split::Valid))
        .map(|i| ds.origin(Split::Valid, i).start)
        .min()
        .unwrap();
    assert!(max_train < min_valid);
    let mut checked = 0;
    for i in 0..ds.len(Split::Train) {
        let o = ds.origin(Split::Train, i);
        // What the model reads or predicts: the sequence, its targets, and the chunk after it.
        let span = o.start..o.start + 64 + 16;
        for (id, _) in ds.neighbours(Split::Train, i) {
            let start = store.chunk_start(id.unwrap());
            let value = start..start + 2 * 16;
            assert!(
                value.end <= span.start || value.start >= span.end,
                "sequence at {}: neighbour value {value:?} overlaps {span:?}",
                o.start
            );
            assert!(
                value.end <= min_valid,
                "a training neighbour reads the validation tail"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
    // The older window rule is still there for datasets that name it, and parses back.
    assert_eq!(
        "sequence:64".parse::<Filter>().unwrap(),
        Filter::Sequence(64)
    );
    assert_eq!("window:32".parse::<Filter>().unwrap(), Filter::Window(32));
}

#[test]
fn hold_out_matching_that_matches_nothing_is_an_error() {
    let f = common::fixture(4, 2000, 16);
    let params = DatasetParams {
        seq_len: 64,
        held_out_matching: vec!["no-such-play".into()],
        ..Default::default()
    };
    let e = Dataset::build(&f.db, &params, &f.dir.path().join("ds"), &|_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no-such-play") && e.contains("held_out_matching"),
        "{e}"
    );
}

#[test]
fn rebuilding_a_dataset_needs_overwrite_and_never_replaces_other_folders() {
    let f = common::fixture(4, 2000, 16);
    let params = DatasetParams {
        seq_len: 64,
        ..Default::default()
    };
    let out = f.dir.path().join("ds");
    Dataset::build(&f.db, &params, &out, &|_, _| {}).unwrap();
    let e = Dataset::build(&f.db, &params, &out, &|_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--overwrite"), "{e}");
    let k3 = DatasetParams {
        k: 3,
        ..params.clone()
    };
    let ds = Dataset::build_with(&f.db, &k3, &out, true, &|_, _| {}).unwrap();
    assert_eq!(ds.meta().k, 3);
    let mine = f.dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep").unwrap();
    let e = Dataset::build_with(&f.db, &params, &mine, true, &|_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a retro dataset"), "{e}");
    assert!(mine.join("notes.txt").is_file());
}

#[test]
fn the_loader_yields_the_seeded_epochs_in_order_and_resumes_mid_run() {
    let f = common::fixture(4, 3000, 16);
    let params = DatasetParams {
        seq_len: 32,
        ..Default::default()
    };
    let ds = Dataset::build(&f.db, &params, &f.dir.path().join("ds"), &|_, _| {}).unwrap();
    let per_epoch = ds.len(Split::Train) / 3;
    let steps = 2 * per_epoch + 2;
    let mut all = vec![];
    ds.for_each_train_batch(&f.db, 3, 5, 0..steps, &mut |b| {
        all.push(b.origins.clone());
        Ok(true)
    })
    .unwrap();
    assert_eq!(all.len(), steps);
    let expected: Vec<_> = (0..3)
        .flat_map(|e| ds.epoch_batches(Split::Train, 3, 5, e))
        .take(steps)
        .map(|idx| {
            idx.iter()
                .map(|&i| ds.origin(Split::Train, i))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(all, expected);
    // Resuming at any step continues with the same batches; returning false stops.
    let mut tail = vec![];
    ds.for_each_train_batch(&f.db, 3, 5, per_epoch - 1..steps, &mut |b| {
        tail.push(b.origins.clone());
        Ok(tail.len() < 3)
    })
    .unwrap();
    assert_eq!(tail, all[per_epoch - 1..per_epoch + 2].to_vec());
}

#[test]
fn novel_neighbours_come_from_outside_each_chunks_nearest_document() {
    let f = common::fixture(6, 4000, 16);
    let store = f.db.store();
    let params = |novel_fraction| DatasetParams {
        seq_len: 64,
        k: 2,
        seed: 3,
        held_out_ids: vec![store.documents()[5].id.clone()],
        novel_fraction,
        ..Default::default()
    };
    let dir = f.dir.path();
    let plain = Dataset::build(&f.db, &params(0.0), &dir.join("plain"), &|_, _| {}).unwrap();
    let novel = Dataset::build(&f.db, &params(0.5), &dir.join("novel"), &|_, _| {}).unwrap();
    let n = plain.len(Split::Train);
    let want = (n as f64 * 0.5).round() as usize;
    assert_eq!(novel.meta().train.novel_sequences, want);
    assert_eq!(plain.meta().train.novel_sequences, 0);
    assert_eq!(
        novel.meta().valid.novel_sequences,
        0,
        "validation stays as evaluation sees it"
    );
    assert_ne!(plain.meta().dataset_id, novel.meta().dataset_id);
    for i in 0..n {
        // The same seed cuts and orders the same sequences.
        let o = plain.origin(Split::Train, i);
        assert_eq!(novel.origin(Split::Train, i), o);
        let (p, v) = (
            plain.neighbours(Split::Train, i),
            novel.neighbours(Split::Train, i),
        );
        if i >= want {
            assert_eq!(p, v, "sequence {i} is not among the novel ones");
            continue;
        }
        for (u, (pc, vc)) in p.chunks(2).zip(v.chunks(2)).enumerate() {
            let nearest = store.document_of(pc[0].0.expect("enough documents"));
            for (id, _) in vc {
                let d = store.document_of(id.expect("enough documents"));
                assert_ne!(
                    d, nearest,
                    "sequence {i} chunk {u} kept its nearest document"
                );
                assert_ne!(
                    d, o.document,
                    "sequence {i} chunk {u} retrieved its own document"
                );
                assert_ne!(
                    d,
                    DocumentId(5),
                    "a held-out document served as a neighbour"
                );
            }
            // Without the nearest document the best remaining neighbour is no closer.
            assert!(
                vc[0].1 >= pc[0].1 - 1e-6,
                "sequence {i} chunk {u}: {vc:?} vs {pc:?}"
            );
        }
    }
    let bad = Dataset::build(&f.db, &params(1.5), &dir.join("bad"), &|_, _| {})
        .err()
        .expect("a fraction above 1")
        .to_string();
    assert!(bad.contains("novel_fraction"), "{bad}");
}
