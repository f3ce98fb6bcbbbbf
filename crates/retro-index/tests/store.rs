//! Chunking, padding, neighbours and the memory-mapped round trip.

use retro_index::{ChunkId, ChunkStore, DocumentId};

#[test]
fn chunks_never_cross_documents_and_pad() {
    let dir = tempfile::tempdir().unwrap();
    let pad = 999;
    // documents of 10, 4, 0, 8 and 5 tokens; chunk_len 4
    let docs: Vec<Vec<u32>> = vec![
        (0..10).collect(),
        (100..104).collect(),
        vec![],
        (200..208).collect(),
        (300..305).collect(),
    ];
    let ids = ["a", "b", "empty", "c", "d"];
    let counts = ChunkStore::write(
        dir.path(),
        ids.iter()
            .zip(&docs)
            .map(|(id, t)| (*id, "src", t.as_slice())),
        4,
        pad,
    )
    .unwrap();
    assert_eq!(counts.documents, 5);
    assert_eq!(counts.tokens, 27);
    assert_eq!(counts.chunks, 8); // 3 + 1 + 0 + 2 + 2

    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.len(), 8);
    assert_eq!(s.chunk_len(), 4);
    assert_eq!(s.pad_id(), pad);
    // every chunk lies inside its document
    for i in 0..s.len() {
        let d = s.document_of(ChunkId(i));
        let doc = s.document_tokens(d);
        let start = s.chunk_start(ChunkId(i));
        assert_eq!(
            s.chunk_tokens(ChunkId(i)),
            &doc[start..(start + 4).min(doc.len())]
        );
        assert!(s.chunks_of_document(d).contains(&i));
        assert_eq!(s.chunk_padded(ChunkId(i)).len(), 4);
        let nb = s.neighbour(ChunkId(i));
        assert_eq!(nb.len(), 8);
        // chunk + continuation = the document's tokens from start, then padding; never another document
        let real: Vec<u32> = doc[start..(start + 8).min(doc.len())].to_vec();
        let mut expect = s.chunk_tokens(ChunkId(i)).to_vec();
        expect.resize(4, pad);
        expect.extend_from_slice(&real[s.chunk_tokens(ChunkId(i)).len()..]);
        expect.resize(8, pad);
        assert_eq!(nb, expect, "chunk {i}");
    }
    // spot checks
    assert_eq!(s.chunk_tokens(ChunkId(2)), &[8, 9]);
    assert_eq!(s.chunk_padded(ChunkId(2)), vec![8, 9, pad, pad]);
    assert_eq!(s.neighbour(ChunkId(0)), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(s.neighbour(ChunkId(1)), vec![4, 5, 6, 7, 8, 9, pad, pad]);
    assert_eq!(
        s.neighbour(ChunkId(2)),
        vec![8, 9, pad, pad, pad, pad, pad, pad]
    );
    assert_eq!(
        s.neighbour(ChunkId(3)),
        vec![100, 101, 102, 103, pad, pad, pad, pad]
    ); // not 200..
    assert_eq!(s.chunks_of_document(DocumentId(2)), 4..4);
    assert_eq!(s.document_of(ChunkId(4)), DocumentId(3));
    assert_eq!(s.chunk_start(ChunkId(5)), 4);
    assert_eq!(s.documents()[3].id, "c");
    assert_eq!(s.document_tokens(DocumentId(4)), &[300, 301, 302, 303, 304]);
}

#[test]
fn truncated_store_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let t: Vec<u32> = (0..50).collect();
    ChunkStore::write(dir.path(), [("x", "s", t.as_slice())], 8, 0).unwrap();
    let p = dir.path().join("tokens.bin");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
    let e = ChunkStore::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokens.bin"), "{e}");
    std::fs::write(&p, b"garbage").unwrap();
    assert!(ChunkStore::open(dir.path()).is_err());
}
