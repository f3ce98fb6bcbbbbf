//! The retriever on a small real corpus: neighbour values, document boundaries, filters, shapes.

mod common;

use retro_index::{ChunkId, DocumentId, Embedder};
use retro_pipeline::{Filter, Gate, Origin, Retriever};

#[test]
fn neighbours_are_the_stored_chunk_plus_its_continuation_within_its_document() {
    let f = common::fixture(6, 3000, 16);
    let store = f.db.store();
    let r = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 3).unwrap();
    let doc = store.document_tokens(DocumentId(1));
    let x = vec![doc[..80].to_vec(), doc[40..120].to_vec()];
    let out = r.retrieve(&x, None, Filter::None).unwrap();
    assert_eq!(
        (out.batch(), out.chunks(), out.k(), out.neighbour_len()),
        (2, 5, 3, 32)
    );
    for (i, id) in out.chunk_ids.iter().enumerate() {
        let id = id.expect("the database has plenty of chunks");
        let d = store.document_of(id);
        let tokens = store.document_tokens(d);
        let start = store.chunk_start(id);
        let got = &out.tokens.as_slice()[i * 32..(i + 1) * 32];
        for (j, &tok) in got.iter().enumerate() {
            let expect = tokens.get(start + j).copied().unwrap_or(store.pad_id());
            assert_eq!(
                tok, expect,
                "neighbour {i} (chunk {id} of doc {d}), token {j}"
            );
        }
    }
    // Nearest first.
    for row in out.distances.chunks(3) {
        assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    }
}

#[test]
fn the_last_chunks_of_a_document_are_padded_not_continued_into_the_next() {
    let f = common::fixture(4, 1000, 16);
    let store = f.db.store();
    for d in (0..store.documents().len()).map(DocumentId) {
        let last = ChunkId(store.chunks_of_document(d).end - 1);
        let v = store.neighbour(last);
        let len = store.document_tokens(d).len();
        let start = store.chunk_start(last);
        assert!(
            v[len - start..].iter().all(|&t| t == store.pad_id()),
            "doc {d}"
        );
    }
}

#[test]
fn same_document_filter_never_returns_the_sequences_document_over_every_chunk() {
    let f = common::fixture(5, 2000, 16);
    let store = f.db.store();
    let r = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 2).unwrap();
    for d in (0..store.documents().len()).map(DocumentId) {
        let tokens = store.document_tokens(d);
        let t = tokens.len() / 16 * 16;
        let out = r
            .retrieve(
                &[tokens[..t].to_vec()],
                Some(&[Origin {
                    document: d,
                    start: 0,
                }]),
                Filter::SameDocument,
            )
            .unwrap();
        assert_eq!(out.padded, 0);
        for id in out.chunk_ids.iter().flatten() {
            assert_ne!(store.document_of(*id), d, "document {d} retrieved itself");
        }
    }
    // Without the filter, a chunk finds itself.
    let tokens = store.document_tokens(DocumentId(2));
    let out = r
        .retrieve(&[tokens[..64].to_vec()], None, Filter::None)
        .unwrap();
    assert!(out
        .chunk_ids
        .iter()
        .flatten()
        .any(|&id| store.document_of(id) == DocumentId(2)));
}

#[test]
fn window_filter_never_returns_a_chunk_inside_the_window() {
    let f = common::fixture(1, 6000, 16);
    let store = f.db.store();
    let r = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 4).unwrap();
    let tokens = store.document_tokens(DocumentId(0));
    for start in [0usize, 160, 1000] {
        let x = vec![tokens[start..start + 128].to_vec()];
        let out = r
            .retrieve(
                &x,
                Some(&[Origin {
                    document: DocumentId(0),
                    start,
                }]),
                Filter::Window(32),
            )
            .unwrap();
        for (i, id) in out.chunk_ids.iter().enumerate() {
            let q = start + (i / 4) * 16;
            let c = store.chunk_start(id.unwrap());
            assert!(
                c.abs_diff(q) >= 32,
                "chunk at {c} inside the window of query chunk at {q}"
            );
        }
    }
}

#[test]
fn shapes_for_partial_and_short_inputs_and_padding_when_k_cannot_be_met() {
    let f = common::fixture(2, 200, 16);
    let store = f.db.store();
    let r = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 2).unwrap();
    let tokens = store.document_tokens(DocumentId(0)).to_vec();
    let out = r
        .retrieve(&[tokens[..37].to_vec()], None, Filter::None)
        .unwrap();
    assert_eq!(
        out.to_tensor(&candle_core::Device::Cpu).unwrap().dims(),
        &[1, 2, 2, 32]
    );
    let out = r
        .retrieve(&[tokens[..5].to_vec()], None, Filter::None)
        .unwrap();
    assert_eq!(
        out.to_tensor(&candle_core::Device::Cpu).unwrap().dims(),
        &[1, 0, 2, 32]
    );
    // Excluding every other document leaves nothing for the same-document filter: pad and count.
    let big = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 2)
        .unwrap()
        .with_excluded_documents([DocumentId(1)].into());
    let out = big
        .retrieve(
            &[tokens[..32].to_vec()],
            Some(&[Origin {
                document: DocumentId(0),
                start: 0,
            }]),
            Filter::SameDocument,
        )
        .unwrap();
    assert_eq!(out.padded, 4);
    assert!(out.tokens.as_slice().iter().all(|&t| t == store.pad_id()));
    // A filter that needs origins without them is an error, not a guess.
    assert!(r
        .retrieve(&[tokens[..32].to_vec()], None, Filter::SameDocument)
        .is_err());
}

#[test]
fn the_gate_keeps_exactly_the_chunks_whose_nearest_neighbour_is_close() {
    let f = common::fixture(6, 3000, 16);
    let doc = f.db.store().document_tokens(DocumentId(2)).to_vec();
    let x = vec![doc[..160].to_vec()];
    let plain = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 3).unwrap();
    let out = plain.retrieve(&x, None, Filter::None).unwrap();
    assert!(out.keep.is_none(), "no gate, no keep");
    // A threshold at the median nearest distance splits the chunks.
    let mut nearest: Vec<f32> = out.distances.chunks(3).map(|d| d[0]).collect();
    nearest.sort_by(f32::total_cmp);
    let m = nearest[nearest.len() / 2];
    let gated = plain.clone().with_gate(Some(Gate::distance(m).unwrap()));
    let out = gated.retrieve(&x, None, Filter::None).unwrap();
    let keep = out.keep.clone().unwrap();
    assert_eq!(keep.len(), out.chunks());
    for (u, d) in out.distances.chunks(3).enumerate() {
        assert_eq!(
            keep[u],
            if d[0] <= m { 1.0 } else { 0.0 },
            "chunk {u}: {d:?}"
        );
    }
    assert!(keep.contains(&1.0) && keep.contains(&0.0), "{keep:?}");
    let t = out.keep_tensor(&candle_core::Device::Cpu).unwrap().unwrap();
    assert_eq!(t.dims(), &[1, out.chunks()]);
}

/// The longest run shared by `a` and `b`, by trying every window of `a` (the slow way).
fn longest_shared_run(a: &[u32], b: &[u32]) -> usize {
    (1..=a.len())
        .rev()
        .find(|&l| a.windows(l).any(|w| b.windows(l).any(|v| v == w)))
        .unwrap_or(0)
}

#[test]
fn the_overlap_gate_keeps_exactly_the_chunks_a_neighbour_shares_a_long_run_with() {
    let f = common::fixture(6, 3000, 16);
    let doc = f.db.store().document_tokens(DocumentId(2)).to_vec();
    let x = vec![doc[..320].to_vec()];
    // Other documents only: the chunk's own copy would always share all 16 tokens.
    let origin = Origin {
        document: DocumentId(2),
        start: 0,
    };
    let plain = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 3).unwrap();
    let out = plain
        .retrieve(&x, Some(&[origin]), Filter::SameDocument)
        .unwrap();
    let (k, cl) = (out.k(), 16);
    let runs: Vec<usize> = (0..out.chunks())
        .map(|u| {
            (0..k)
                .map(|j| {
                    let v = out.tokens.neighbour(u, j);
                    longest_shared_run(&x[0][u * cl..(u + 1) * cl], v)
                })
                .max()
                .unwrap()
        })
        .collect();
    let mut sorted = runs.clone();
    sorted.sort();
    let need = sorted[sorted.len() / 2].max(1);
    let gate = Gate::overlap(need as f32 / cl as f32).unwrap();
    let gated = plain.clone().with_gate(Some(gate));
    let out = gated
        .retrieve(&x, Some(&[origin]), Filter::SameDocument)
        .unwrap();
    let keep = out.keep.clone().unwrap();
    for (u, &r) in runs.iter().enumerate() {
        assert_eq!(
            keep[u],
            if r >= need { 1.0 } else { 0.0 },
            "chunk {u}: run {r}, need {need}"
        );
    }
    assert!(keep.contains(&1.0) && keep.contains(&0.0), "{runs:?}");
    // A search by keys has no chunk tokens to compare: an error, not a guess.
    let keys = retro_index::Queries::one(&vec![0.0f32; f.embedder.dim()]);
    let e = gated
        .search(keys, 1, 1, None, Filter::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gate"), "{e}");
}

#[test]
fn the_coherent_gate_keeps_chunks_whose_neighbour_follows_the_previous_chunks() {
    let f = common::fixture(6, 3000, 16);
    let store = f.db.store();
    let cl = 16;
    // K = 1 and no filter: a stored text's chunk retrieves itself, so a document's consecutive
    // chunks retrieve consecutive chunks of it (step 1).
    let r = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 1)
        .unwrap()
        .with_gate(Some(Gate::coherent(1, 1).unwrap()));
    let doc = store.document_tokens(DocumentId(2)).to_vec();
    let first = r
        .retrieve(&[doc[..10 * cl].to_vec()], None, Filter::None)
        .unwrap();
    let own = store.chunks_of_document(DocumentId(2)).start;
    let ids: Vec<ChunkId> = first.chunk_ids.iter().map(|c| c.unwrap()).collect();
    assert_eq!(
        ids,
        (own..own + 10).map(ChunkId).collect::<Vec<_>>(),
        "the premise: each chunk finds itself"
    );
    let mut want = [1.0; 10];
    want[0] = 0.0; // no chunk before the first
    assert_eq!(first.keep.as_deref(), Some(&want[..]));
    // The text that follows: its first chunk follows the last chunk of `first`.
    let next = r
        .retrieve_after(
            &[doc[10 * cl..20 * cl].to_vec()],
            None,
            Filter::None,
            Some(&first),
        )
        .unwrap();
    assert_eq!(next.keep.as_deref(), Some(&[1.0; 10][..]));
    // Chunks of two documents in turn: each neighbour is in the other document from the last.
    let (a, b) = (
        store.document_tokens(DocumentId(1)),
        store.document_tokens(DocumentId(3)),
    );
    let mixed: Vec<u32> = (0..10)
        .flat_map(|u| {
            let d = if u % 2 == 0 { a } else { b };
            d[u * cl..(u + 1) * cl].to_vec()
        })
        .collect();
    let out = r.retrieve(&[mixed], None, Filter::None).unwrap();
    assert_eq!(out.keep.as_deref(), Some(&[0.0; 10][..]));
    // A step of 2 is too far for max_step 1, and near enough for 2.
    let skip: Vec<u32> = (0..5)
        .flat_map(|u| doc[2 * u * cl..(2 * u + 1) * cl].to_vec())
        .collect();
    let far = r
        .retrieve(std::slice::from_ref(&skip), None, Filter::None)
        .unwrap();
    assert_eq!(far.keep.as_deref(), Some(&[0.0; 5][..]));
    let near = r
        .clone()
        .with_gate(Some(Gate::coherent(2, 1).unwrap()))
        .retrieve(&[skip], None, Filter::None)
        .unwrap();
    assert_eq!(near.keep.as_deref(), Some(&[0.0, 1.0, 1.0, 1.0, 1.0][..]));
    // Looking two chunks back: in chunks [0, 5, 2, 7, 4, 9] of the document, each chunk follows
    // the one two back by 2 chunks (within 2 x 1) and none follows the one before.
    let of_doc = |positions: &[usize]| -> Vec<u32> {
        positions
            .iter()
            .flat_map(|&p| doc[p * cl..(p + 1) * cl].to_vec())
            .collect()
    };
    let zigzag = of_doc(&[0, 5, 2, 7, 4, 9]);
    let one_back = r
        .retrieve(std::slice::from_ref(&zigzag), None, Filter::None)
        .unwrap();
    assert_eq!(one_back.keep.as_deref(), Some(&[0.0; 6][..]));
    let two_back = r.clone().with_gate(Some(Gate::coherent(1, 2).unwrap()));
    let zz = two_back.retrieve(&[zigzag], None, Filter::None).unwrap();
    assert_eq!(
        zz.keep.as_deref(),
        Some(&[0.0, 0.0, 1.0, 1.0, 1.0, 1.0][..])
    );
    // Across rows: chunks 6 and 11 look two back into `before` (chunks 4 and 9).
    let cont = two_back
        .retrieve_after(&[of_doc(&[6, 11])], None, Filter::None, Some(&zz))
        .unwrap();
    assert_eq!(cont.keep.as_deref(), Some(&[1.0, 1.0][..]));
}

#[test]
fn followed_by_keeps_each_rows_last_chunks() {
    let f = common::fixture(6, 3000, 16);
    let r = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 2).unwrap();
    let (a, b) = (
        f.db.store().document_tokens(DocumentId(1)).to_vec(),
        f.db.store().document_tokens(DocumentId(2)).to_vec(),
    );
    let first = r
        .retrieve(&[a[..64].to_vec(), b[..64].to_vec()], None, Filter::None)
        .unwrap();
    let next = r
        .retrieve(
            &[a[64..96].to_vec(), b[64..96].to_vec()],
            None,
            Filter::None,
        )
        .unwrap();
    let both = first.followed_by(&next, 3).unwrap();
    assert_eq!((both.batch(), both.chunks(), both.k()), (2, 3, 2));
    let (k, n) = (2, both.neighbour_len());
    for row in 0..2 {
        // Row `row`: chunk 3 of `first`, then chunks 0 and 1 of `next`.
        let want: Vec<_> = first.chunk_ids[(row * 4 + 3) * k..(row * 4 + 4) * k]
            .iter()
            .chain(&next.chunk_ids[row * 2 * k..(row + 1) * 2 * k])
            .copied()
            .collect();
        assert_eq!(&both.chunk_ids[row * 3 * k..(row + 1) * 3 * k], &want[..]);
        assert_eq!(
            &both.tokens.as_slice()[(row * 3 + 1) * k * n..(row * 3 + 3) * k * n],
            &next.tokens.as_slice()[row * 2 * k * n..(row + 1) * 2 * k * n]
        );
    }
    let other = Retriever::new(&f.db, &f.embedder, &f.tokenizer, 3).unwrap();
    let three = other
        .retrieve(&[a[..16].to_vec(), b[..16].to_vec()], None, Filter::None)
        .unwrap();
    assert!(first.followed_by(&three, 3).is_err(), "another K");
}
