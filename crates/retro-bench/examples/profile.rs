//! Where the forward's time goes: `profile [full|train|kernels]` (default: all), e.g.
//! `cargo run --release -p retro-bench --example profile -- train`; `ITERS=n` train steps (3);
//! `NO_ADAMW=1` leaves the optimizer step out of `train`.
use candle_core::{DType, Device, Tensor};
use retro_bench::model::ModelBenchSpec;
use retro_model::fused_attention::attention_heads;
use retro_model::train::{cross_entropy, loss_and_grads, AdamW, AdamWParams};
use retro_model::{Kernels, RetroModel};
use std::time::Instant;

// As the `retro` binary: mimalloc, never purging (`mi_option_purge_delay` = 15, set to -1).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> retro_model::Result<()> {
    // SAFETY: a process-wide option, no pointers.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let what = std::env::args().nth(1).unwrap_or_default();
    let all = what.is_empty();
    let spec = ModelBenchSpec::labml_small();
    let dev = Device::Cpu;
    let m = RetroModel::new(&spec.config, 0, DType::F32, &dev)?;
    let (x, y, ret) = spec.inputs(&dev)?;
    if all || what == "full" {
        for _ in 0..3 {
            let t = Instant::now();
            m.forward(&x, &ret)?;
            println!("full {:?}", t.elapsed());
            let t = Instant::now();
            m.forward_without_retrieval(&x)?;
            println!("off {:?}", t.elapsed());
        }
    }
    if all || what == "train" {
        let mut opt = AdamW::for_model(&m, AdamWParams::default())?;
        let iters = std::env::var("ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3);
        for _ in 0..iters {
            let t = Instant::now();
            cross_entropy(&m.forward_train(&x, Some(&ret))?, &y)?;
            let fwd = t.elapsed();
            let t = Instant::now();
            let (_, grads) = loss_and_grads(&m, &x, &y, Some(&ret))?;
            let fb = t.elapsed();
            if std::env::var_os("NO_ADAMW").is_none() {
                opt.step(&grads, 1e-4)?;
            }
            println!(
                "train forward {fwd:?}, forward+backward {fb:?}, + AdamW {:?}",
                t.elapsed()
            );
        }
    }
    if all || what == "kernels" {
        let (b, t, c, k, n) = (4, 512, 32, 2, 32);
        // [sequences, s, 3, heads, d_k] projections, heads as views.
        for (name, seqs, s, causal) in [
            ("decoder self-attention", b, t, Some(0)),
            ("encoder self-attention", b * c * k, n, None),
        ] {
            let x = Tensor::randn(0f32, 1., (seqs, s, 3, 16, 16), &dev)?;
            let part = |i: usize| x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
            for _ in 0..3 {
                let t = Instant::now();
                attention_heads(&part(0)?, &part(1)?, &part(2)?, causal, Kernels::Fused)?;
                println!("{name} {:?}", t.elapsed());
            }
            let xv = candle_core::Var::from_tensor(&x)?;
            let part = |i: usize| xv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
            let out = attention_heads(
                &part(0)?,
                &part(1)?,
                &part(2)?,
                causal,
                Kernels::Differentiable,
            )?;
            let loss = out.sum_all()?;
            for _ in 0..3 {
                let t = Instant::now();
                loss.backward()?;
                println!("{name} backward (with autograd) {:?}", t.elapsed());
            }
        }
    }
    Ok(())
}
