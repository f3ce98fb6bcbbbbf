//! RETRO must learn to copy: every training document has a twin in another document, so the
//! neighbour's continuation holds the text to predict. Random words are unpredictable without
//! retrieval, so the model can only do well by reading its neighbours. On a held-out document whose
//! twin is in the database (the related condition), retrieval on must score far below retrieval off;
//! with no twin (novel), retrieval cannot help. A RETRO whose CCA cannot learn this is broken.

use candle_core::Device;
use rand::{Rng, SeedableRng};
use retro_index::{
    BuildOptions, Corpus, Database, Document, DocumentId, LexicalEmbedder, LmTokenizer,
};
use retro_model::RetroConfig;
use retro_pipeline::{
    evaluate, generate, train, Condition, Dataset, DatasetParams, EvalOptions, Filter, Gate,
    Origin, Retriever, Run, Sampling, Schedule, Start, TrainConfig, TrainData,
};
use std::collections::HashSet;

/// Random lowercase words: about 4.2 bits per character that no model can predict without the twin.
fn random_text(rng: &mut rand::rngs::StdRng, chars: usize) -> String {
    let mut s = String::new();
    while s.len() < chars {
        let len = rng.random_range(2..7);
        for _ in 0..len {
            s.push((b'a' + rng.random_range(0..16u8)) as char);
        }
        s.push(if rng.random_bool(0.1) { '\n' } else { ' ' });
    }
    s
}

#[test]
fn retro_learns_to_copy_from_a_twin_in_another_document() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut documents = vec![];
    for i in 0..24 {
        let text = random_text(&mut rng, 1200);
        // The twin is a near-duplicate, as another edition is: its line breaks are spaces.
        for (twin, t) in [("a", text.clone()), ("b", text.replace('\n', " "))] {
            documents.push(Document {
                id: format!("{twin}{i:02}"),
                source: "generated".into(),
                text: t,
            });
        }
    }
    // The scored text is a00's with a word more: a near copy, which evaluation must find.
    let scored = Corpus::from_documents([Document {
        id: "scored".into(),
        source: "generated".into(),
        text: format!("{}abc ", documents[0].text),
    }]);
    let corpus = Corpus::from_documents(documents);
    let tokenizer = LmTokenizer::char_from_corpus(&corpus);
    let embedder = LexicalEmbedder::new(128).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chunk_len = 8;
    let db = Database::build(
        &corpus,
        &tokenizer,
        &embedder,
        &BuildOptions {
            chunk_len,
            ..Default::default()
        },
        &dir.path().join("db"),
    )
    .unwrap();
    // Both twins of pair 0 held out: never trained on, never a training neighbour.
    let ds = Dataset::build(
        &db,
        &DatasetParams {
            seq_len: 64,
            k: 2,
            held_out_ids: vec!["a00".into(), "b00".into()],
            ..Default::default()
        },
        &dir.path().join("ds"),
        &|_, _| {},
    )
    .unwrap();
    let cfg = RetroConfig {
        n_vocab: tokenizer.vocab_size(),
        d_model: 32,
        n_layers: 2,
        ca_layers: [1].into(),
        chunk_len,
        n_heads: 2,
        d_k: 16,
        d_ff: 64,
        enc_n_layers: 1,
        enc_ca_layers: [0].into(),
        layer_norm_eps: 1e-5,
        rope_base: 10_000.0,
    };
    let tc = TrainConfig {
        steps: 400,
        batch_size: 8,
        lr: 5e-3,
        warmup: 20,
        schedule: Schedule::Constant,
        eval_every: 0,
        checkpoint_every: 0,
        ..Default::default()
    };
    let run_dir = dir.path().join("run");
    let dev = Device::Cpu;
    train(
        &run_dir,
        &cfg,
        &tc,
        TrainData {
            dataset: &ds,
            database: &db,
            device: &dev,
        },
        Start::Fresh,
        &mut |_, _| {},
    )
    .unwrap();
    let run = Run::open(&run_dir).unwrap();
    let model = run.load_model(&dev).unwrap();
    let retriever = Retriever::new(&db, &embedder, &tokenizer, 2).unwrap();
    // A gate between the twins' distances and the strangers': the nearest distance that keeps 90% of
    // a training document's chunks (their twins are in the database) is below most strangers'. The
    // document itself is filtered out, or each chunk would find its own key at distance 0.
    let probe = retriever
        .retrieve(
            &[db.store().document_tokens(DocumentId(2))[..512].to_vec()],
            Some(&[Origin {
                document: DocumentId(2),
                start: 0,
            }]),
            Filter::SameDocument,
        )
        .unwrap();
    let mut nearest: Vec<f32> = probe.distances.chunks(2).map(|d| d[0]).collect();
    nearest.sort_by(f32::total_cmp);
    let gate = Gate::distance(nearest[nearest.len() * 9 / 10]).unwrap();
    let retriever = retriever.with_gate(Some(gate));
    let docs = db.store().documents();
    let (held, trained): (HashSet<DocumentId>, HashSet<DocumentId>) = (0..docs.len())
        .map(DocumentId)
        .partition(|&d| docs[d.0].id.ends_with("00"));
    let eval = |r: &Retriever| {
        evaluate(
            &model,
            None,
            None,
            Some(r),
            &tokenizer,
            &scored,
            &EvalOptions {
                seq_len: 64,
                held_out_set: held.clone(),
                training_documents: trained.clone(),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let report = eval(&retriever);
    let off = report.retrieval_off.bits_per_byte;
    let related = report.condition(Condition::Related).unwrap();
    let novel = report.condition(Condition::Novel).unwrap();
    // The scored text is a00's near copy: found by content, though its id is "scored".
    assert_eq!(related.excluded_documents, ["a00"]);
    // Every scored chunk is counted once, in one bucket: ceil(t / chunk_len) per window.
    let n = tokenizer.encode(&scored.documents[0].text).unwrap().len();
    let expected: usize = (0..n.saturating_sub(1))
        .step_by(64)
        .map(|s| (n - 1 - s).min(64).div_ceil(chunk_len))
        .sum();
    for c in [related, novel] {
        let counted: usize = c.overlap.iter().map(|b| b.chunks).sum();
        assert_eq!(
            counted, expected,
            "{:?}: chunks in the overlap table",
            c.condition
        );
    }
    assert_eq!(novel.excluded_documents, ["a00", "b00"]);
    assert!(
        related.on.bits_per_byte < 0.5 * off,
        "retrieval did not help with the twin in the database: ON {} vs OFF {off}",
        related.on.bits_per_byte
    );
    assert!(
        novel.on.bits_per_byte > 0.8 * off,
        "retrieval helped without any twin in the database (a leak?): ON {} vs OFF {off}",
        novel.on.bits_per_byte
    );
    // The gate keeps the twins' neighbours and drops the strangers': related still gains, and novel
    // reads almost nothing, so it scores as RETRO[OFF] does.
    let (rg, ng) = (
        related.gated.as_ref().unwrap(),
        novel.gated.as_ref().unwrap(),
    );
    assert!(rg.on.bits_per_byte < 0.5 * off, "{rg:?} vs OFF {off}");
    assert!(rg.kept_chunks * 10 > rg.chunks * 8, "{rg:?}");
    assert!(ng.kept_chunks * 10 < ng.chunks, "{ng:?}");
    assert!(
        (ng.on.bits_per_byte - off).abs() < (novel.on.bits_per_byte - off).abs().max(0.01 * off),
        "gated novel {ng:?} is no closer to OFF {off} than ungated {}",
        novel.on.bits_per_byte
    );
    assert_eq!(report.bits_per_byte.on_gated, Some(rg.on.bits_per_byte));
    // The overlap gate needs no threshold measured on the data: a twin shares runs of half a chunk
    // and more, a stranger's random words do not.
    let by_overlap = retriever
        .clone()
        .with_gate(Some(Gate::overlap(0.5).unwrap()));
    let report2 = eval(&by_overlap);
    let (ro, no) = (
        report2
            .condition(Condition::Related)
            .unwrap()
            .gated
            .clone()
            .unwrap(),
        report2
            .condition(Condition::Novel)
            .unwrap()
            .gated
            .clone()
            .unwrap(),
    );
    assert!(ro.on.bits_per_byte < 0.5 * off, "{ro:?} vs OFF {off}");
    assert!(ro.kept_chunks * 10 > ro.chunks * 8, "{ro:?}");
    assert!(no.kept_chunks * 20 < no.chunks, "{no:?}");
    // The few strangers' chunks it reads (3 of 150 in one run) are copied wrongly, so novel stays
    // near OFF rather than equal to it.
    assert!(
        (no.on.bits_per_byte - off).abs() < 0.1 * off,
        "{no:?} vs OFF {off}"
    );
    // The coherent gate needs no threshold either: a twin's chunks follow one another as the
    // scored text's do, strangers' chunks come from scattered places.
    let coherent = retriever
        .clone()
        .with_gate(Some(Gate::coherent(2, 8).unwrap()));
    let report3 = eval(&coherent);
    let gated = |c| report3.condition(c).unwrap().gated.clone().unwrap();
    let (rc, nc) = (gated(Condition::Related), gated(Condition::Novel));
    assert!(rc.on.bits_per_byte < 0.5 * off, "{rc:?} vs OFF {off}");
    assert!(rc.kept_chunks * 10 > rc.chunks * 8, "{rc:?}");
    assert!(nc.kept_chunks * 20 < nc.chunks, "{nc:?}");
    // A stranger's chunk that happens to follow another's (3 of 150 in one run) is copied wrongly,
    // so novel comes near OFF, closer than reading every neighbour, not equal to it.
    assert!(
        (nc.on.bits_per_byte - off).abs() < 0.1 * off
            && (nc.on.bits_per_byte - off).abs() < (novel.on.bits_per_byte - off).abs(),
        "{nc:?} vs OFF {off} and every neighbour read {}",
        novel.on.bits_per_byte
    );
    // The gate of each chunk a prompt completes, when generating through Gate::coherent(1, lookback).
    let gates_of = |prompt: &str, lookback: usize| {
        let gated = Retriever::new(&db, &embedder, &tokenizer, 2)
            .unwrap()
            .with_gate(Some(Gate::coherent(1, lookback).unwrap()));
        let mut kept = vec![];
        generate(
            &model,
            Some(&gated),
            &tokenizer,
            prompt,
            0,
            &Sampling::default(),
            &mut |e| {
                if let retro_pipeline::Event::Neighbours { neighbours, .. } = e {
                    kept.push(neighbours.keep.clone().unwrap()[0]);
                }
            },
        )
        .unwrap();
        kept
    };
    // Generating, the gate compares each chunk's neighbours with the last chunk's: a prompt from
    // a stored document finds that document chunk after chunk, so only the first chunk is unread.
    let text = &corpus.documents[2].text;
    assert_eq!(
        gates_of(&text[..5 * chunk_len], 1),
        [0.0, 1.0, 1.0, 1.0, 1.0]
    );
    // And over as many chunks as it looks back: in chunks [0, 5, 2, 7, 4, 9] of the document each
    // follows the one two back (by 2) and none the one before.
    let zigzag: String = [0, 5, 2, 7, 4, 9]
        .iter()
        .map(|&p| &text[p * chunk_len..(p + 1) * chunk_len])
        .collect();
    assert_eq!(gates_of(&zigzag, 2), [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    // Generation through a gate that reads nothing is RETRO[OFF]'s; through one that reads all, the
    // ungated model's.
    let greedy = |r: Option<&Retriever>| {
        let prompt = &corpus.documents[2].text[..40];
        generate(
            &model,
            r,
            &tokenizer,
            prompt,
            24,
            &Sampling::default(),
            &mut |_| {},
        )
        .unwrap()
    };
    let plain = Retriever::new(&db, &embedder, &tokenizer, 2).unwrap();
    let none = plain.clone().with_gate(Some(Gate::closed()));
    let all = plain
        .clone()
        .with_gate(Some(Gate::distance(f32::MAX).unwrap()));
    assert_eq!(greedy(Some(&none)), greedy(None));
    assert_eq!(greedy(Some(&all)), greedy(Some(&plain)));
    assert_ne!(
        greedy(Some(&plain)),
        greedy(None),
        "retrieval changes what a copier generates"
    );
    // The chunks that overlap their neighbours most are where ON gains.
    let top = related.overlap.last().unwrap();
    assert!(top.chunks > 0, "{:?}", related.overlap);
    assert!(top.on.unwrap().bits_per_byte < 0.5 * top.off.unwrap().bits_per_byte);
}
