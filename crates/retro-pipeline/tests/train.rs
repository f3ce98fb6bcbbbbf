//! Training at toy size: the loss falls, checkpoints reload to identical logits, resume continues the
//! same curve, RETRO-fitting touches only the retrieval parameters.

mod common;

use candle_core::Device;
use retro_model::RetroConfig;
use retro_pipeline::{
    train, Dataset, DatasetParams, Run, Schedule, Split, Start, StepMetrics, TrainConfig, TrainData,
};

fn model_config(vocab: usize) -> RetroConfig {
    RetroConfig {
        n_vocab: vocab,
        d_model: 32,
        n_layers: 2,
        ca_layers: [1].into(),
        chunk_len: 8,
        n_heads: 2,
        d_k: 16,
        d_ff: 64,
        enc_n_layers: 1,
        enc_ca_layers: [0].into(),
        layer_norm_eps: 1e-5,
        rope_base: 10_000.0,
    }
}

fn losses(run: &std::path::Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn loss_falls_checkpoints_reload_and_resume_continues_the_same_curve() {
    let f = common::fixture(5, 3000, 8);
    let ds = Dataset::build(
        &f.db,
        &DatasetParams {
            seq_len: 32,
            ..Default::default()
        },
        &f.dir.path().join("ds"),
        &|_, _| {},
    )
    .unwrap();
    let cfg = model_config(f.tokenizer.vocab_size());
    let tc = TrainConfig {
        steps: 60,
        batch_size: 4,
        lr: 3e-3,
        warmup: 10,
        schedule: Schedule::Cosine,
        eval_every: 20,
        eval_batches: 2,
        checkpoint_every: 30,
        ..Default::default()
    };
    let dev = Device::Cpu;
    let full = f.dir.path().join("full");
    train(
        &full,
        &cfg,
        &tc,
        TrainData {
            dataset: &ds,
            database: &f.db,
            device: &dev,
        },
        Start::Fresh,
        &mut |_, _| {},
    )
    .unwrap();
    let m = losses(&full);
    assert_eq!(m.len(), 60);
    let first: f64 = m[..5].iter().map(|m| m.loss).sum::<f64>() / 5.0;
    let last: f64 = m[55..].iter().map(|m| m.loss).sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "loss did not fall: {first} -> {last}");
    assert!(m[59].valid_loss.is_some() && m[19].valid_loss.is_some());
    assert!(full.join("loss.png").exists());

    // Stop at 30 (time-bounded runs stop the same way), then resume to 60: the same curve.
    let half = f.dir.path().join("half");
    let tc_half = TrainConfig {
        stop_after: Some(30),
        ..tc.clone()
    };
    let state = train(
        &half,
        &cfg,
        &tc_half,
        TrainData {
            dataset: &ds,
            database: &f.db,
            device: &dev,
        },
        Start::Fresh,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(state.step, 30);
    let state = train(
        &half,
        &cfg,
        &tc,
        TrainData {
            dataset: &ds,
            database: &f.db,
            device: &dev,
        },
        Start::Resume,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(state.step, 60);
    let h = losses(&half);
    assert_eq!(h.len(), 60);
    for (a, b) in m.iter().zip(&h).skip(30) {
        assert!(
            (a.loss - b.loss).abs() < 1e-5,
            "step {}: {} vs resumed {}",
            a.step,
            a.loss,
            b.loss
        );
    }

    // Reloaded checkpoints give identical logits.
    let run = Run::open(&full).unwrap();
    let a = run.load_model(&dev).unwrap();
    let b = Run::open(&half).unwrap().load_model(&dev).unwrap();
    let (x, _, ret) = ds.batch(&f.db, Split::Valid, &[0]).tensors(&dev).unwrap();
    let la = a
        .forward(&x, &ret)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let lb = b
        .forward(&x, &ret)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let d = la
        .iter()
        .zip(&lb)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "resumed run's weights differ: {d}");
    let again = retro_model::RetroModel::from_safetensors(
        &cfg,
        &run.weights_path().unwrap(),
        candle_core::DType::F32,
        &dev,
    )
    .unwrap();
    let lc = again
        .forward(&x, &ret)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(la, lc);

    // RETRO-fitting: only cca.*, encoder.* and norm_e.* move.
    let fit = f.dir.path().join("fit");
    let tc_fit = TrainConfig {
        steps: 5,
        freeze_base: true,
        eval_every: 0,
        ..tc.clone()
    };
    train(
        &fit,
        &cfg,
        &tc_fit,
        TrainData {
            dataset: &ds,
            database: &f.db,
            device: &dev,
        },
        Start::From(&run.weights_path().unwrap()),
        &mut |_, _| {},
    )
    .unwrap();
    let fitted = Run::open(&fit).unwrap().load_model(&dev).unwrap();
    let (sa, sb) = (a.state_dict().unwrap(), fitted.state_dict().unwrap());
    let mut moved = 0;
    for (name, t) in &sa {
        let diff = (t - &sb[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let retrieval =
            name.starts_with("cca.") || name.starts_with("encoder.") || name.starts_with("norm_e.");
        if !retrieval {
            assert_eq!(diff, 0.0, "frozen `{name}` moved");
        } else if diff > 0.0 {
            moved += 1;
        }
    }
    assert!(moved > 10);
}
