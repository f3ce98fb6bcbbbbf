//! Properties of the model that hold for any weights: causality, gradients, checkpoints, errors.

use candle_core::{DType, Device, Tensor};
use retro_model::train::{cross_entropy, AdamW, AdamWParams};
use retro_model::{RetroConfig, RetroModel};

fn config() -> RetroConfig {
    RetroConfig {
        n_vocab: 13,
        d_model: 16,
        n_layers: 3,
        ca_layers: [1, 2].into(),
        chunk_len: 4,
        n_heads: 2,
        d_k: 6,
        d_ff: 24,
        enc_n_layers: 2,
        enc_ca_layers: [0].into(),
        layer_norm_eps: 1e-5,
        rope_base: 10_000.0,
    }
}

fn ids(v: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn pseudo(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % vocab)
        .collect()
}

/// Max |a - b| per position t of `[1, T, V]` logits.
fn diff_per_position(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(2)
        .unwrap()
        .squeeze(0)
        .unwrap();
    d.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn changing_x_t_changes_only_positions_from_t() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    let t = 14; // C = 3
    let x = pseudo(t, 1, 13);
    let ret = ids(&pseudo(3 * 2 * 8, 2, 13), &[1, 3, 2, 8]);
    let base = model.forward(&ids(&x, &[1, t]), &ret).unwrap();
    for pos in [0, 3, 4, 7, 13] {
        let mut x2 = x.clone();
        x2[pos] = (x2[pos] + 5) % 13;
        let out = model.forward(&ids(&x2, &[1, t]), &ret).unwrap();
        let d = diff_per_position(&base, &out);
        for (p, &dp) in d.iter().enumerate() {
            if p < pos {
                assert!(
                    dp < 1e-12,
                    "x[{pos}] changed logits at earlier position {p} by {dp}"
                );
            }
        }
        assert!(d[pos] > 1e-6, "x[{pos}] did not change its own logits");
    }
}

#[test]
fn changing_ret_u_changes_only_positions_from_the_end_of_chunk_u() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 4, DType::F64, &Device::Cpu).unwrap();
    let (t, c, k, n) = (15, 3, 2, 8);
    let x = ids(&pseudo(t, 5, 13), &[1, t]);
    let ret_v = pseudo(c * k * n, 6, 13);
    let base = model.forward(&x, &ids(&ret_v, &[1, c, k, n])).unwrap();
    for u in 0..c {
        let mut r2 = ret_v.clone();
        for j in 0..k * n {
            r2[u * k * n + j] = (r2[u * k * n + j] + 3) % 13;
        }
        let out = model.forward(&x, &ids(&r2, &[1, c, k, n])).unwrap();
        let d = diff_per_position(&base, &out);
        let first = u * cfg.chunk_len + cfg.chunk_len - 1;
        for (p, &dp) in d.iter().enumerate() {
            if p < first {
                assert!(
                    dp < 1e-12,
                    "ret[:, {u}] changed logits at position {p} < {first} by {dp}"
                );
            }
        }
        assert!(
            d[first] > 1e-6,
            "ret[:, {u}] did not reach position {first}"
        );
    }
}

#[test]
fn every_trainable_variable_gets_a_gradient_that_matches_finite_differences() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    let t = 13;
    let x = ids(&pseudo(t, 7, 13), &[1, t]);
    let y = ids(&pseudo(t, 8, 13), &[1, t]);
    let ret = ids(&pseudo(3 * 2 * 8, 9, 13), &[1, 3, 2, 8]);
    let loss_of = |m: &RetroModel| -> f64 {
        let logits = m
            .forward_train(&x, Some(&ret))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let (b, t, v) = logits.dims3().unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * t, v)).unwrap(), 1).unwrap();
        let nll = candle_nn::loss::nll(&lsm, &y.flatten_all().unwrap()).unwrap();
        nll.to_scalar::<f64>().unwrap()
    };
    let logits = model.forward_train(&x, Some(&ret)).unwrap();
    let (b, tt, v) = logits.dims3().unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * tt, v)).unwrap(), 1).unwrap();
    let loss = candle_nn::loss::nll(&lsm, &y.flatten_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("`{name}` got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "`{name}` got an all-zero gradient");
        // Finite differences on the first element of each tensor.
        let flat: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-5;
        let mut fd = [0f64; 2];
        for (s, slot) in [(1.0, 0), (-1.0, 1)] {
            let mut w = flat.clone();
            w[0] += s * eps;
            var.set(&Tensor::from_vec(w, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            fd[slot] = loss_of(&model);
        }
        var.set(&Tensor::from_vec(flat, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let numeric = (fd[0] - fd[1]) / (2.0 * eps);
        let analytic = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!(
            (numeric - analytic).abs() < 1e-6 + 1e-4 * analytic.abs(),
            "`{name}`[0]: backprop {analytic} vs finite differences {numeric}"
        );
    }
}

#[test]
fn training_lowers_the_loss_on_a_fixed_batch() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 6, DType::F32, &Device::Cpu).unwrap();
    let t = 16;
    let x = ids(&pseudo(t, 10, 13), &[1, t]);
    let y = ids(&pseudo(t, 11, 13), &[1, t]);
    let ret = ids(&pseudo(4 * 2 * 8, 12, 13), &[1, 4, 2, 8]);
    let mut opt = AdamW::for_model(&model, AdamWParams::default()).unwrap();
    let mut losses = vec![];
    for _ in 0..30 {
        let loss = cross_entropy(&model.forward_train(&x, Some(&ret)).unwrap(), &y).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&loss.backward().unwrap(), 3e-3).unwrap();
    }
    assert!(
        losses[29] < 0.5 * losses[0],
        "loss did not fall: {losses:?}"
    );
}

#[test]
fn fused_and_differentiable_kernels_agree() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    let x = ids(&pseudo(9, 13, 13), &[1, 9]);
    let ret = ids(&pseudo(2 * 2 * 8, 14, 13), &[1, 2, 2, 8]);
    let a = model.forward(&x, &ret).unwrap();
    let b = model.forward_train(&x, Some(&ret)).unwrap();
    let d = diff_per_position(&a, &b).into_iter().fold(0f64, f64::max);
    assert!(d < 1e-4, "fused vs differentiable: {d}");
}

#[test]
fn checkpoint_round_trip_gives_identical_logits_and_bad_checkpoints_name_the_tensor() {
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let model = RetroModel::new(&cfg, 8, DType::F32, &Device::Cpu).unwrap();
    model.save_safetensors(&path).unwrap();
    let back = RetroModel::from_safetensors(&cfg, &path, DType::F32, &Device::Cpu).unwrap();
    let x = ids(&pseudo(12, 15, 13), &[1, 12]);
    let ret = ids(&pseudo(3 * 2 * 8, 16, 13), &[1, 3, 2, 8]);
    let a = model
        .forward(&x, &ret)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = back
        .forward(&x, &ret)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);

    let mut sd = model.state_dict().unwrap();
    sd.remove("cca.1.output.weight");
    let err = back.load_state_dict(&sd).unwrap_err().to_string();
    assert!(
        err.contains("cca.1.output.weight") && err.contains("missing"),
        "{err}"
    );

    let mut sd = model.state_dict().unwrap();
    sd.insert(
        "cca.2.output.weight".into(),
        Tensor::zeros((16, 12), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = back.load_state_dict(&sd).unwrap_err().to_string();
    assert!(
        err.contains("cca.2.output.weight") && err.contains("unexpected"),
        "{err}"
    );

    let mut sd = model.state_dict().unwrap();
    sd.insert(
        "attn.0.query.weight".into(),
        Tensor::zeros((12, 15), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = back.load_state_dict(&sd).unwrap_err().to_string();
    assert!(
        err.contains("attn.0.query.weight") && err.contains("shape"),
        "{err}"
    );

    let other = RetroConfig {
        d_ff: 32,
        ..cfg.clone()
    };
    let err = RetroModel::from_safetensors(&other, &path, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("ffw.0.lin1.") && err.contains("w.safetensors") && err.contains("[32]"),
        "{err}"
    );
}

#[test]
fn wrong_shapes_and_ids_are_errors_that_name_them() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 9, DType::F32, &Device::Cpu).unwrap();
    let x = ids(&pseudo(12, 1, 13), &[1, 12]);
    let bad_c = ids(&[0; 2 * 2 * 8], &[1, 2, 2, 8]);
    let err = model.forward(&x, &bad_c).unwrap_err().to_string();
    assert!(
        err.contains("C = T / chunk_len") && err.contains("[1, 2, 2, 8]"),
        "{err}"
    );
    let big = ids(&[1, 2, 13, 0], &[1, 4]);
    let err = model
        .forward_without_retrieval(&big)
        .unwrap_err()
        .to_string();
    assert!(err.contains("13") && err.contains("n_vocab 13"), "{err}");
    let neg = Tensor::new(&[[1i64, -1, 2, 3]], &Device::Cpu).unwrap();
    assert!(model.forward_without_retrieval(&neg).is_err());
}

#[test]
fn short_inputs_skip_retrieval() {
    let cfg = config();
    let model = RetroModel::new(&cfg, 10, DType::F32, &Device::Cpu).unwrap();
    let x = ids(&[1, 2, 3], &[1, 3]);
    let ret = Tensor::zeros((1, 0, 2, 8), DType::U32, &Device::Cpu).unwrap();
    let a = model.forward(&x, &ret).unwrap();
    let b = model.forward_without_retrieval(&x).unwrap();
    assert_eq!(a.dims(), &[1, 3, 13]);
    assert_eq!(
        diff_per_position(&a, &b).into_iter().fold(0f64, f64::max),
        0.0
    );
}
