//! What a training step needs from the model side: the loss, global-norm gradient clipping, and an AdamW
//! whose moments can be saved and restored (so a resumed run continues exactly).

use crate::error::{ModelError, Result};
use crate::model::RetroModel;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Mean cross-entropy of `logits [B, T, V]` against `targets [B, T]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logits = logits.reshape((b * t, v))?.to_dtype(DType::F32)?;
    let targets = targets.reshape(b * t)?.to_dtype(DType::U32)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

/// One batch's mean cross-entropy and its gradients: the training forward, the loss, the backward
/// (on the CPU, all of it on a worker of rayon's pool). `ret = None` trains RETRO\[OFF\].
pub fn loss_and_grads(
    model: &RetroModel,
    x: &Tensor,
    y: &Tensor,
    ret: Option<&Tensor>,
) -> Result<(Tensor, GradStore)> {
    loss_and_grads_of(model.device(), y, || model.forward_train(x, ret))
}

/// The mean cross-entropy of what `forward` computes against `y`, and its gradients, all of it on
/// a worker of rayon's pool on the CPU: what every model's training step runs.
pub(crate) fn loss_and_grads_of(
    device: &candle_core::Device,
    y: &Tensor,
    forward: impl FnOnce() -> Result<Tensor> + Send,
) -> Result<(Tensor, GradStore)> {
    crate::device::on_pool(device, || {
        let loss = cross_entropy(&forward()?, y)?;
        let grads = loss.backward()?;
        Ok((loss, grads))
    })
}

/// Scales every gradient so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(vars: &[(String, Var)], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm.is_finite() && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g.detach() * s)?);
            }
        }
    }
    Ok(norm)
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        // PyTorch's AdamW defaults.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (decoupled weight decay, as `torch.optim.AdamW`), with its moments exposed for checkpoints.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            params,
        })
    }

    /// Every trainable variable of the model, sorted by name.
    pub fn for_model(model: &RetroModel, params: AdamWParams) -> Result<Self> {
        Self::new(model.named_vars(), params)
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients can carry the op graph that computed them (and through it the step's
            // activations); the moments outlive the step, so they must not hold on to it.
            let g = &g.detach();
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) plus the step, for a checkpoint.
    pub fn state_dict(&self) -> Result<(HashMap<String, Tensor>, usize)> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        Ok((out, self.step))
    }

    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| ModelError::Weight {
                    name: key.clone(),
                    msg: "missing from the optimizer state".into(),
                })?;
                if t.dims() != var.dims() {
                    return Err(ModelError::Weight {
                        name: key,
                        msg: format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                    });
                }
                *slot = t.to_device(var.device())?.to_dtype(var.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

impl RetroModel {
    /// Trainable variables with their state_dict names, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.varmap)
    }
}

/// A var map's variables with their names, sorted by name.
pub(crate) fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RetroConfig, RetroModel};
    use candle_core::Device;

    /// The moments outlive the step: if they were computed from gradients that still carry their
    /// op graph, every step's activations would stay alive (memory grew by ~1 GB a step).
    #[test]
    fn moments_hold_no_graph_after_a_step() {
        let config = RetroConfig {
            n_vocab: 11,
            d_model: 16,
            n_layers: 2,
            ca_layers: [1].into(),
            chunk_len: 4,
            n_heads: 2,
            d_k: 8,
            d_ff: 32,
            enc_n_layers: 1,
            enc_ca_layers: [0].into(),
            layer_norm_eps: 1e-5,
            rope_base: 10_000.0,
        };
        let dev = Device::Cpu;
        let model = RetroModel::new(&config, 3, DType::F32, &dev).unwrap();
        let x = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &dev).unwrap();
        let ret = Tensor::new(
            &[[[[1u32, 2, 3, 4, 5, 6, 7, 8]], [[2u32, 3, 4, 5, 6, 7, 8, 9]]]],
            &dev,
        )
        .unwrap();
        let mut opt = AdamW::for_model(&model, AdamWParams::default()).unwrap();
        for _ in 0..2 {
            let logits = model.forward_train(&x, Some(&ret)).unwrap();
            let loss = cross_entropy(&logits, &x).unwrap();
            opt.step(&loss.backward().unwrap(), 1e-3).unwrap();
        }
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
    }

    /// candle's own matmul backward yields a gradient that still tracks its op: AdamW detaches it.
    #[test]
    fn adamw_detaches_a_tracked_gradient() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 2), &dev).unwrap()).unwrap();
        let grads = a.matmul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(&w).unwrap().track_op(),
            "the premise: a tracked gradient"
        );
        let mut opt = AdamW::new(vec![("w".into(), w)], AdamWParams::default()).unwrap();
        opt.step(&grads, 1e-3).unwrap();
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
    }
}
