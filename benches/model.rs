//! Criterion bench of the labml-small RETRO model on CPU (f32): a forward and a training step
//! (forward, cross-entropy, backward, AdamW), at a reduced batch (B 1, T 128, K 2, N 32) so the
//! whole bench runs in about a minute. `cargo bench --bench model`.

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use retro_bench::model::ModelBenchSpec;
use retro_model::train::{loss_and_grads, AdamW, AdamWParams};
use retro_model::RetroModel;
use std::time::Duration;

fn model(c: &mut Criterion) {
    let mut spec = ModelBenchSpec::labml_small();
    spec.batch = 1;
    spec.seq_len = 128;
    let dev = Device::Cpu;
    let m = RetroModel::new(&spec.config, 0, DType::F32, &dev).unwrap();
    let (x, y, ret) = spec.inputs(&dev).unwrap();
    let mut g = c.benchmark_group("labml-small B1 T128");
    g.throughput(Throughput::Elements(spec.tokens() as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    g.bench_function("forward", |b| b.iter(|| m.forward(&x, &ret).unwrap()));
    let mut opt = AdamW::for_model(&m, AdamWParams::default()).unwrap();
    g.bench_function("train step", |b| {
        b.iter(|| {
            let (_, grads) = loss_and_grads(&m, &x, &y, Some(&ret)).unwrap();
            opt.step(&grads, 1e-4).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
