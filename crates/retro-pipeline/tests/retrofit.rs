//! RETRO-fitting the imported SmolLM2 base through the pipeline: a run trains only the new
//! blocks, resumes, reloads, leaves RETRO[OFF] equal to the base bit for bit, refuses a database
//! of another tokenizer, and evaluates beside in-context retrieval.

use candle_core::{Device, Tensor};
use retro_index::{bible, testdata, BuildOptions, Corpus, Database, LexicalEmbedder, LmTokenizer};
use retro_model::retrofit::RetrofitConfig;
use retro_pipeline::{
    evaluate, import_gguf, train_retrofit, BaseDir, Condition, Dataset, DatasetParams, EvalOptions,
    Retriever, Run, Schedule, Split, Start, TrainConfig, TrainData,
};

const GGUF: &str = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Ruth in two translations: a few thousand tokens.
fn ruth() -> Option<Corpus> {
    let mut docs = vec![];
    for t in ["web", "asv"] {
        let p = testdata::shared_path(&format!("data/bible/{t}_plain_text_bible.py"))?;
        docs.extend(
            bible::read_pythonbible(&p, t)
                .unwrap()
                .into_iter()
                .filter(|d| d.id.ends_with("/Ruth")),
        );
    }
    Some(Corpus::from_documents(docs))
}

#[test]
fn a_retrofit_run_trains_the_new_blocks_only_and_evaluates_beside_in_context_retrieval() {
    let (Some(gguf), Some(corpus)) = (testdata::shared_path(GGUF), ruth()) else {
        return;
    };
    assert_eq!(corpus.documents.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let base = import_gguf(&gguf, &dir.path().join("base"), false).unwrap();
    let base = BaseDir::open(&base.dir).unwrap();
    let tokenizer = base.tokenizer().unwrap();
    let embedder = LexicalEmbedder::new(256).unwrap();
    let opts = BuildOptions {
        chunk_len: 16,
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
    let ds = Dataset::build(
        &db,
        &DatasetParams {
            seq_len: 64,
            k: 2,
            max_train_sequences: Some(8),
            ..Default::default()
        },
        &dir.path().join("ds"),
        &|_, _| {},
    )
    .unwrap();
    assert!(ds.len(Split::Train) >= 2);
    let fit = RetrofitConfig {
        chunk_len: 16,
        ca_start: 20,
        ca_every: 5,
        enc_n_layers: 1,
        enc_d_ff: 256,
        enc_input_layers: 2,
        init_from_base: false,
        neighbour_states: Default::default(),
        cca_positions: true,
        gated_output: true,
    };
    let tc = TrainConfig {
        steps: 3,
        batch_size: 1,
        lr: 1e-3,
        warmup: 1,
        schedule: Schedule::Constant,
        eval_every: 0,
        checkpoint_every: 2,
        ..Default::default()
    };
    let dev = Device::Cpu;
    let data = TrainData {
        dataset: &ds,
        database: &db,
        device: &dev,
    };
    let run_dir = dir.path().join("run");
    let stop = TrainConfig {
        stop_after: Some(2),
        ..tc.clone()
    };
    train_retrofit(
        &run_dir,
        &base,
        &fit,
        &stop,
        data,
        Start::Fresh,
        &mut |_, _| {},
    )
    .unwrap();
    let state = train_retrofit(
        &run_dir,
        &base,
        &fit,
        &tc,
        data,
        Start::Resume,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(state.step, 3);

    let run = Run::open(&run_dir).unwrap();
    assert_eq!(run.retrofit.as_ref().unwrap().fit, fit);
    assert!(run
        .load_model(&dev)
        .err()
        .unwrap()
        .to_string()
        .contains("RETRO-fitted"));
    let model = run.load_retrofit(&dev).unwrap();
    // The checkpoint holds the new blocks only, and they moved from their start.
    let ck = candle_core::safetensors::load(run.weights_path().unwrap(), &dev).unwrap();
    assert_eq!(ck.len(), model.named_vars().len());
    assert!(ck
        .keys()
        .all(|k| k.starts_with("cca.") || k.starts_with("encoder.") || k.starts_with("norm_e.")));
    let out = &ck["cca.0.output.weight"];
    assert!(
        out.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    // RETRO[OFF] is the base bit for bit; the base folder is untouched.
    let x = Tensor::new(
        &db.store().document_tokens(retro_index::DocumentId(0))[..48],
        &dev,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let fresh = base.load(&dev).unwrap();
    let bits = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        bits(model.forward(&x, None, None).unwrap()),
        bits(fresh.forward(&x, 0, None).unwrap())
    );
    BaseDir::open(&base.dir).unwrap();

    // A database of another tokenizer is refused, naming it.
    let chars = LmTokenizer::char_from_corpus(&corpus);
    let cdb = Database::build(&corpus, &chars, &embedder, &opts, &dir.path().join("cdb")).unwrap();
    let cds = Dataset::build(
        &cdb,
        &DatasetParams {
            seq_len: 64,
            ..Default::default()
        },
        &dir.path().join("cds"),
        &|_, _| {},
    )
    .unwrap();
    let e = train_retrofit(
        &dir.path().join("run2"),
        &base,
        &fit,
        &tc,
        TrainData {
            dataset: &cds,
            database: &cdb,
            device: &dev,
        },
        Start::Fresh,
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("tokenizer"), "{e}");

    // Generation retrieves for each chunk as it completes (chunk_len 16: a 20-token prompt and
    // 20 tokens more complete chunks 0 and 1), and stops at most at max_tokens.
    let retriever = Retriever::new(&db, &embedder, &tokenizer, 2).unwrap();
    let mut chunks = vec![];
    let prompt = "1:1 In the days when the judges judged, there was a famine in the land.";
    let out = retro_pipeline::generate(
        &model,
        Some(&retriever),
        &tokenizer,
        prompt,
        20,
        &retro_pipeline::Sampling::default(),
        &mut |e| {
            if let retro_pipeline::Event::Neighbours {
                chunk, neighbours, ..
            } = e
            {
                chunks.push((chunk, neighbours.chunk_ids.len()));
            }
        },
    )
    .unwrap();
    let n = tokenizer.encode(prompt).unwrap().len() + out.len();
    assert_eq!(chunks, (0..n / 16).map(|u| (u, 2)).collect::<Vec<_>>());

    // Evaluation: the web text, with ASV's Ruth to retrieve from.
    let scored = Corpus::from_documents(
        corpus
            .documents
            .iter()
            .filter(|d| d.id == "web/Ruth")
            .cloned(),
    );
    let retriever = Retriever::new(&db, &embedder, &tokenizer, 2).unwrap();
    let r = evaluate(
        &model,
        None,
        Some(model.base()),
        Some(&retriever),
        &tokenizer,
        &scored,
        &EvalOptions {
            seq_len: 64,
            max_tokens: Some(256),
            allow_training_documents: true,
            ..Default::default()
        },
    )
    .unwrap();
    let related = r.condition(Condition::Related).unwrap();
    assert_eq!(related.excluded_documents, ["web/Ruth"]);
    let ic = related.in_context.unwrap();
    assert!(ic.bits_per_byte.is_finite() && related.in_context_tokens_per_s.unwrap() > 0.0);
    // Chunk 0 sees no neighbour: in-context retrieval is the base there, as RETRO[OFF] is.
    let first = &related.overlap[0];
    let (a, b) = (first.in_context.unwrap().loss, first.off.unwrap().loss);
    assert!(
        (a - b).abs() < 1e-4 * b.abs().max(1.0),
        "first chunks: in-context {a} vs OFF {b}"
    );
}
