//! The f32 training kernels (AVX-512 tiles where the CPU has them) at the shapes the demo trains on,
//! against the same weights in f64: every gradient must agree. The float64 parity fixtures never reach
//! the f32 tiles, and the tiny shapes of the unit tests never reach their full-width paths.

use candle_core::{DType, Device, Tensor};
use retro_model::train::cross_entropy;
use retro_model::{RetroConfig, RetroModel};

fn pseudo(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            (i.wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503)))
                >> 7
        })
        .map(|v| v % vocab)
        .collect()
}

#[test]
fn f32_gradients_match_f64_at_the_demo_shapes() {
    // The demo's model (the tiny preset) at the 64-token chunks the old demo trained with.
    let cfg = RetroConfig {
        n_vocab: 67,
        chunk_len: 64,
        ..RetroConfig::tiny()
    };
    let (b, t, k, n) = (2, 256, 2, 128);
    let c = t / cfg.chunk_len;
    let dev = Device::Cpu;
    let m32 = RetroModel::new(&cfg, 11, DType::F32, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    m32.save_safetensors(&w).unwrap();
    let m64 = RetroModel::from_safetensors(&cfg, &w, DType::F64, &dev).unwrap();
    let x = Tensor::from_vec(pseudo(b * t, 1, 67), (b, t), &dev).unwrap();
    let y = Tensor::from_vec(pseudo(b * t, 2, 67), (b, t), &dev).unwrap();
    let ret = Tensor::from_vec(pseudo(b * c * k * n, 3, 67), (b, c, k, n), &dev).unwrap();
    let g32 = cross_entropy(&m32.forward_train(&x, Some(&ret)).unwrap(), &y)
        .unwrap()
        .backward()
        .unwrap();
    let g64 = cross_entropy(&m64.forward_train(&x, Some(&ret)).unwrap(), &y)
        .unwrap()
        .backward()
        .unwrap();
    let vars64: std::collections::HashMap<_, _> = m64.named_vars().into_iter().collect();
    let mut worst = (0f64, String::new());
    for (name, v32) in m32.named_vars() {
        let a = g32
            .get(v32.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let bb = g64.get(vars64[&name].as_tensor()).unwrap();
        let scale = bb
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let diff = (&a - bb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // Key biases get a gradient that is zero up to rounding (softmax ignores a shift of every
        // score): measure those against a floor, not their own ~1e-19 scale.
        let rel = diff / scale.max(1e-6);
        println!("{name:40} scale {scale:.3e} rel {rel:.2e}");
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    assert!(
        worst.0 < 1e-3,
        "worst f32 gradient: {} ({:.2e})",
        worst.1,
        worst.0
    );
}
