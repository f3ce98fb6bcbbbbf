//! Creates the model's trainable variables in a `VarMap` under the reference's `state_dict` names,
//! initialised as PyTorch does (Linear: U(±1/sqrt(in)); Embedding: N(0, 1); LayerNorm: 1 and 0) from a
//! seeded generator, so that `retro model init --seed S` is reproducible on every device.

use crate::layers::{LayerNorm, Linear};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct ParamBuilder<'a> {
    varmap: &'a VarMap,
    device: Device,
    dtype: DType,
    rng: StdRng,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(varmap: &'a VarMap, seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            varmap,
            device: device.clone(),
            dtype,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn var(&mut self, name: String, shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        let mut data = self.varmap.data().lock().unwrap();
        if data.insert(name.clone(), var).is_some() {
            candle_core::bail!("parameter `{name}` created twice");
        }
        Ok(tensor)
    }

    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect()
    }

    pub fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = self.uniform(d_out * d_in, bound);
        let b = self.uniform(d_out, bound);
        Ok(Linear::new(
            self.var(format!("{name}.weight"), &[d_out, d_in], w)?,
            self.var(format!("{name}.bias"), &[d_out], b)?,
        ))
    }

    pub fn layer_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm::new(
            self.var(format!("{name}.weight"), &[d], vec![1.0; d])?,
            self.var(format!("{name}.bias"), &[d], vec![0.0; d])?,
            eps,
        ))
    }

    /// A learned scalar `[1]` starting at `value` (a CCA's output gate).
    pub fn scalar(&mut self, name: &str, value: f32) -> Result<Tensor> {
        self.var(name.to_string(), &[1], vec![value])
    }

    pub fn embedding(&mut self, name: &str, n: usize, d: usize) -> Result<Tensor> {
        let values = (0..n * d)
            .map(|_| {
                // Box-Muller: N(0, 1) without another dependency.
                let u1: f32 = self.rng.random_range(f32::EPSILON..1.0);
                let u2: f32 = self.rng.random::<f32>();
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        self.var(format!("{name}.weight"), &[n, d], values)
    }
}
