use candle_core::{DType, Device, Tensor};
use retro_model::bench::ModelBenchSpec;
use retro_model::RetroModel;
use std::time::Instant;
fn main() -> retro_model::Result<()> {
    let spec = ModelBenchSpec::labml_small();
    let dev = Device::Cpu;
    let m = RetroModel::new(&spec.config, 0, DType::F32, &dev)?;
    let (x, _y, ret) = spec.inputs(&dev)?;
    for _ in 0..2 {
        let t = Instant::now();
        m.forward(&x, &ret)?;
        println!("full {:?}", t.elapsed());
        let t = Instant::now();
        m.forward_without_retrieval(&x)?;
        println!("off {:?}", t.elapsed());
    }
    let q = Tensor::randn(0f32, 1., (64, 512, 16), &dev)?;
    let k = Tensor::randn(0f32, 1., (64, 512, 16), &dev)?;
    let t = Instant::now();
    let s = q.matmul(&k.t()?)?;
    println!("dec scores {:?}", t.elapsed());
    let t = Instant::now();
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    println!("softmax {:?}", t.elapsed());
    let t = Instant::now();
    let _ = p.matmul(&k)?;
    println!("pv {:?}", t.elapsed());
    let q = Tensor::randn(0f32, 1., (131072, 32, 16), &dev)?;
    let t = Instant::now();
    let s = q.matmul(&q.t()?)?;
    println!("enc scores {:?}", t.elapsed());
    let t = Instant::now();
    let _ = s.matmul(&q)?;
    println!("enc pv {:?}", t.elapsed());
    let a = Tensor::randn(0f32, 1., (8192, 128), &dev)?;
    let w = Tensor::randn(0f32, 1., (256, 128), &dev)?;
    let t = Instant::now();
    let _ = a.matmul(&w.t()?)?;
    println!("enc linear {:?}", t.elapsed());
    let h = Tensor::randn(0f32, 1., (4, 512, 16, 16), &dev)?;
    let t = Instant::now();
    let _ = h.transpose(1, 2)?.contiguous()?;
    println!("transpose {:?}", t.elapsed());
    Ok(())
}
