//! Mutation tests of the pipeline's loaders (dataset files, a run's JSON, checkpoints): opening
//! must give `Ok` or an error, never a panic or a hang. And what the checksums are for: a damaged
//! checkpoint is never trained on, a rebuilt dataset is never silently resumed on.

mod common;

use candle_core::Device;
use retro_format::sha256_bytes;
use retro_index::testdata::mutate;
use retro_model::RetroConfig;
use retro_pipeline::{
    train, Dataset, DatasetMeta, DatasetParams, Run, Split, Start, TrainConfig, TrainData,
};
use std::path::Path;
use std::time::Duration;

const CASES: usize = 2000;
const BUDGET: Duration = Duration::from_secs(6);

fn dataset(f: &common::Fixture, name: &str, seq_len: usize) -> Dataset {
    Dataset::build(
        &f.db,
        &DatasetParams {
            seq_len,
            ..Default::default()
        },
        &f.dir.path().join(name),
        &|_, _| {},
    )
    .unwrap()
}

/// Uses a dataset that opened: batches of both splits.
fn exercise(ds: &Dataset, f: &common::Fixture) {
    for s in [Split::Train, Split::Valid] {
        let n = ds.len(s);
        if n > 0 {
            let b = ds.batch(&f.db, s, &[0, n - 1]);
            assert_eq!(b.x.len(), 2 * ds.meta().seq_len);
        }
    }
}

#[test]
fn every_dataset_file_damaged_as_found_and_behind_agreeing_checksums() {
    let f = common::fixture(5, 3000, 8);
    let ds = dataset(&f, "ds", 32);
    let dir = ds.dir().to_owned();
    let mut names: Vec<String> = ds.meta().files.names().cloned().collect();
    names.push("dataset.json".into());
    drop(ds);
    let meta_path = dir.join("dataset.json");
    let meta_bytes = std::fs::read(&meta_path).unwrap();
    let meta: DatasetMeta = serde_json::from_slice(&meta_bytes).unwrap();
    for (i, name) in names.iter().enumerate() {
        for agree in [false, true] {
            if agree && name == "dataset.json" {
                continue;
            }
            let path = dir.join(name);
            let original = std::fs::read(&path).unwrap();
            let label = format!("{name} (agree {agree})");
            let (ran, _) = mutate::run(&label, 50 + i as u64, CASES, BUDGET, |_, rng| {
                let bad = if name.ends_with(".json") {
                    mutate::json(rng, &original)
                } else {
                    mutate::bytes(rng, &original)
                };
                std::fs::write(&path, &bad).unwrap();
                if agree {
                    let mut m = meta.clone();
                    let e = m.files.get_mut(name).unwrap();
                    e.bytes = bad.len() as u64;
                    e.sha256 = sha256_bytes(&bad);
                    std::fs::write(&meta_path, serde_json::to_vec(&m).unwrap()).unwrap();
                }
                match Dataset::open(&dir, &f.db) {
                    Ok(ds) => {
                        exercise(&ds, &f);
                        true
                    }
                    Err(e) => {
                        assert!(
                            e.to_string().contains("ds"),
                            "the error names the dataset: {e}"
                        );
                        false
                    }
                }
            });
            std::fs::write(&path, &original).unwrap();
            std::fs::write(&meta_path, &meta_bytes).unwrap();
            assert!(ran >= 200, "{label}: {ran} cases");
        }
    }
    Dataset::open(&dir, &f.db).expect("restored");
}

fn tiny(vocab: usize) -> RetroConfig {
    RetroConfig {
        n_vocab: vocab,
        chunk_len: 8,
        ..RetroConfig::tiny()
    }
}

fn train_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 2,
        warmup: 2,
        eval_every: 0,
        checkpoint_every: 2,
        ..Default::default()
    }
}

fn run_train(
    run: &Path,
    cfg: &RetroConfig,
    tc: &TrainConfig,
    ds: &Dataset,
    f: &common::Fixture,
    resume: bool,
) -> retro_pipeline::Result<retro_pipeline::RunState> {
    train(
        run,
        cfg,
        tc,
        TrainData {
            dataset: ds,
            database: &f.db,
            device: &Device::Cpu,
        },
        if resume { Start::Resume } else { Start::Fresh },
        &mut |_, _| {},
    )
}

#[test]
fn run_files_and_checkpoints_fuzzed_and_a_damaged_checkpoint_is_never_used() {
    let f = common::fixture(5, 3000, 8);
    let ds = dataset(&f, "ds", 32);
    let cfg = tiny(f.tokenizer.vocab_size());
    let run = f.dir.path().join("run");
    let state = run_train(&run, &cfg, &train_cfg(4), &ds, &f, false).unwrap();
    assert_eq!(state.step, 4);
    let ck = run.join(&state.checkpoint);

    // The JSON files of a run and the checkpoint's safetensors: never a panic.
    for (i, name) in [
        "config.json",
        "train.json",
        "state.json",
        "checkpoint-0000004/checkpoint.json",
        "checkpoint-0000004/model.safetensors",
        "checkpoint-0000004/optimizer.safetensors",
    ]
    .iter()
    .enumerate()
    {
        let path = run.join(name);
        let original = std::fs::read(&path).unwrap();
        let (ran, _) = mutate::run(name, 90 + i as u64, CASES, BUDGET, |_, rng| {
            let bad = if name.ends_with(".json") {
                mutate::json(rng, &original)
            } else {
                mutate::bytes(rng, &original)
            };
            std::fs::write(&path, &bad).unwrap();
            let Ok(r) = Run::open(&run) else {
                return false;
            };
            // Loading the weights, directly too (bypassing the checksums).
            let _ = r.load_model(&Device::Cpu);
            // (A valid but large config is a model the machine may well build: not the point here.)
            let small = r.model_config.d_model * r.model_config.d_ff <= 1 << 16;
            if !small {
                return false;
            }
            if let Ok(m) = retro_model::RetroModel::new(
                &r.model_config,
                0,
                candle_core::DType::F32,
                &Device::Cpu,
            ) {
                let _ = m.load_safetensors(&ck.join("model.safetensors"));
            }
            r.resume_point().is_ok()
        });
        std::fs::write(&path, &original).unwrap();
        assert!(ran >= 100, "{name}: {ran} cases");
    }

    // 64 flipped bytes in the latest checkpoint's weights: evaluation refuses it, and resuming
    // falls back to the previous intact checkpoint, says so, and ends where an undamaged run ends.
    let weights = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 64..] {
        *b ^= 0x5A;
    }
    std::fs::write(&weights, &bytes).unwrap();
    let r = Run::open(&run).unwrap();
    let e = r.weights_path().unwrap_err().to_string();
    assert!(
        e.contains("damaged") && e.contains("checkpoint-0000002"),
        "{e}"
    );
    let point = r.resume_point().unwrap();
    assert_eq!(point.state.step, 2);
    assert!(
        point.notes[0].contains("checkpoint-0000004"),
        "{:?}",
        point.notes
    );
    let resumed = run_train(&run, &cfg, &train_cfg(6), &ds, &f, true).unwrap();
    assert_eq!(resumed.step, 6);
    assert!(!resumed.notes.is_empty());
    let reference = f.dir.path().join("reference");
    run_train(&reference, &cfg, &train_cfg(6), &ds, &f, false).unwrap();
    let a = std::fs::read(run.join("checkpoint-0000006/model.safetensors")).unwrap();
    let b = std::fs::read(reference.join("checkpoint-0000006/model.safetensors")).unwrap();
    assert!(
        a == b,
        "resuming past a damaged checkpoint is not bit-exact"
    );
    let steps: Vec<usize> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap() as usize
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6], "each step once in metrics.jsonl");
}

#[test]
fn resume_refuses_a_rebuilt_dataset_and_changed_flags() {
    let f = common::fixture(5, 3000, 8);
    let ds = dataset(&f, "ds", 32);
    let cfg = tiny(f.tokenizer.vocab_size());
    let run = f.dir.path().join("run");
    run_train(&run, &cfg, &train_cfg(2), &ds, &f, false).unwrap();

    // The same folder rebuilt with another seq_len and K.
    let rebuilt = Dataset::build_with(
        &f.db,
        &DatasetParams {
            seq_len: 16,
            k: 3,
            ..Default::default()
        },
        ds.dir(),
        true,
        &|_, _| {},
    )
    .unwrap();
    let e = run_train(&run, &cfg, &train_cfg(4), &rebuilt, &f, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rebuilt") && e.contains("seq_len 16"), "{e}");

    let ds = Dataset::build_with(
        &f.db,
        &DatasetParams {
            seq_len: 32,
            ..Default::default()
        },
        ds.dir(),
        true,
        &|_, _| {},
    )
    .unwrap();
    // Same parameters, same seed: the same dataset id, so the run resumes.
    let changed = TrainConfig {
        lr: 0.5,
        ..train_cfg(4)
    };
    let e = run_train(&run, &cfg, &changed, &ds, &f, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lr") && e.contains("keeps its training config"),
        "{e}"
    );
    // --steps may grow.
    assert_eq!(
        run_train(&run, &cfg, &train_cfg(4), &ds, &f, true)
            .unwrap()
            .step,
        4
    );
    let tc: TrainConfig =
        serde_json::from_slice(&std::fs::read(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(tc.steps, 4);
}

#[test]
fn dataset_json_fields_are_checked_against_the_database() {
    let f = common::fixture(5, 3000, 8);
    let ds = dataset(&f, "ds", 32);
    let dir = ds.dir().to_owned();
    drop(ds);
    let path = dir.join("dataset.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (field, value, expect) in [
        ("chunk_len", serde_json::json!(0), "chunk_len = 0"),
        ("neighbour_len", serde_json::json!(8), "neighbour_len = 8"),
        ("neighbour_len", serde_json::json!(64), "neighbour_len = 64"),
        ("k", serde_json::json!(0), "k = 0"),
        ("seq_len", serde_json::json!(4), "seq_len = 4"),
        ("format_version", serde_json::json!(1), "format_version 1"),
        (
            "database_id",
            serde_json::json!("0123456789abcdef"),
            "built from database",
        ),
    ] {
        let mut v = original.clone();
        v[field] = value;
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = Dataset::open(&dir, &f.db)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(expect), "{field}: {e:?}");
    }
    let mut v = original.clone();
    v["chunk_len"] = serde_json::json!(4);
    v["neighbour_len"] = serde_json::json!(8);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = Dataset::open(&dir, &f.db)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("chunk_len = 4, but the database's is 8"), "{e}");
    // dataset.json files written before the field took the paper's spelling still open, and
    // their value is still checked.
    let mut v = original.clone();
    let n = v.as_object_mut().unwrap().remove("neighbour_len").unwrap();
    v["neighbor_len"] = n;
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let old = Dataset::open(&dir, &f.db).unwrap();
    assert_eq!(old.meta().neighbour_len, 16);
    drop(old);
    v["neighbor_len"] = serde_json::json!(8);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = Dataset::open(&dir, &f.db)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("neighbour_len = 8"), "{e}");
    std::fs::write(&path, serde_json::to_vec(&original).unwrap()).unwrap();
    // A damaged neighbour file is found on open.
    let n = dir.join("train.neighbours");
    let mut b = std::fs::read(&n).unwrap();
    b[0] ^= 1;
    std::fs::write(&n, &b).unwrap();
    let e = Dataset::open(&dir, &f.db)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("train.neighbours") && e.contains("SHA-256"),
        "{e}"
    );
    // A database folder given as a dataset is named as such.
    let e = Dataset::read_meta(f.db.dir()).unwrap_err().to_string();
    assert!(e.contains("is a retro database, not a dataset"), "{e}");
}

#[test]
fn dataset_k_out_of_range_is_refused() {
    let f = common::fixture(3, 2000, 8);
    let e = Dataset::build(
        &f.db,
        &DatasetParams {
            seq_len: 32,
            k: 1000,
            ..Default::default()
        },
        &f.dir.path().join("k"),
        &|_, _| {},
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.contains("k = 1000") && e.contains("between 1 and 64"),
        "{e}"
    );
}
