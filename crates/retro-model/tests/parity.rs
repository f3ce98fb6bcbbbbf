//! The model against the PyTorch reference (`tools/reference/make_fixtures.py`): logits of every
//! fixture case within 1e-4 of the float64 reference, RETRO[OFF] likewise, and the gradients.

mod common;

use candle_core::{DType, Device, Tensor};
use retro_model::{RetroConfig, RetroModel};
use std::collections::HashMap;
use std::path::PathBuf;

const CASES: [&str; 7] = [
    "plain",
    "t_not_multiple",
    "single_cca",
    "no_cca",
    "short",
    "heads_ne_dmodel",
    "labml_layout",
];

fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/model")
        .join(case)
}

fn load(case: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(case).join(file), &Device::Cpu).unwrap()
}

fn model(case: &str, dtype: DType) -> RetroModel {
    let dir = case_dir(case);
    let cfg = RetroConfig::from_json_file(&dir.join("config.json")).unwrap();
    RetroModel::from_safetensors(&cfg, &dir.join("weights.safetensors"), dtype, &Device::Cpu)
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn logits_match_the_float64_reference() {
    for case in CASES {
        let inputs = load(case, "inputs.safetensors");
        let expected = load(case, "expected.safetensors");
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-9)] {
            let m = model(case, dtype);
            let x = &inputs["x"];
            let on = m.forward(x, &inputs["ret"]).unwrap();
            let off = m.forward_without_retrieval(x).unwrap();
            let (d_on, d_off) = (
                max_abs(&on, &expected["logits"]),
                max_abs(&off, &expected["logits_off"]),
            );
            assert!(d_on < tol, "{case} {dtype:?}: logits differ by {d_on}");
            assert!(
                d_off < tol,
                "{case} {dtype:?}: RETRO[OFF] logits differ by {d_off}"
            );
            // The training forward computes the same thing.
            let tr = m.forward_train(x, Some(&inputs["ret"])).unwrap();
            let d_tr = max_abs(&tr, &expected["logits"]);
            assert!(
                d_tr < tol,
                "{case} {dtype:?}: training-forward logits differ by {d_tr}"
            );
        }
    }
}

#[test]
fn loss_and_gradients_match_the_reference() {
    for case in ["plain", "labml_layout"] {
        let inputs = load(case, "inputs.safetensors");
        let expected = load(case, "expected.safetensors");
        let grads_ref = load(case, "grads.safetensors");
        let m = model(case, DType::F64);
        let logits = m.forward_train(&inputs["x"], Some(&inputs["ret"])).unwrap();
        let loss =
            retro_model::train::cross_entropy(&logits.to_dtype(DType::F64).unwrap(), &inputs["y"])
                .unwrap();
        let d = max_abs(&loss, &expected["loss"].to_dtype(DType::F32).unwrap());
        assert!(d < 1e-5, "{case}: loss differs by {d}");
        // cross_entropy computes in f32; for the gradient use an f64 loss.
        let (b, t, v) = logits.dims3().unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * t, v)).unwrap(), 1).unwrap();
        let y = inputs["y"]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let loss64 = candle_nn::loss::nll(&lsm, &y).unwrap();
        let grads = loss64.backward().unwrap();
        let vars = m.named_vars();
        assert_eq!(vars.len(), grads_ref.len(), "{case}: parameter count");
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{case}: `{name}` has no gradient"));
            let r = &grads_ref[&name];
            let scale: f64 = r
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            let d = max_abs(g, r);
            assert!(
                d < 1e-9 + 1e-6 * scale,
                "{case}: gradient of `{name}` differs by {d} (scale {scale})"
            );
        }
    }
}

#[test]
fn these_tests_pass_with_the_avx2_and_baseline_kernels() {
    common::rerun_with_the_instruction_set_capped(
        "these_tests_pass_with_the_avx2_and_baseline_kernels",
    );
}
