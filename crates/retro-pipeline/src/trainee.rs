//! What the training loop needs of a model, so one loop trains both kinds of run: a labml
//! [`RetroModel`] (from scratch, or RETRO-fitting its own checkpoint) and a [`RetroFitted`]
//! Llama base, of which only the new blocks train.

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use retro_model::retrofit::RetroFitted;
use retro_model::train::{cross_entropy, loss_and_grads};
use retro_model::RetroModel;
use std::path::Path;

pub trait Trainee {
    /// The variables the optimizer updates, sorted by name.
    fn trainable(&self, freeze_base: bool) -> Vec<(String, Var)>;
    /// One batch's mean loss and gradients (training kernels); `ret = None` is RETRO\[OFF\].
    fn loss_and_grads(
        &self,
        x: &Tensor,
        y: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<(Tensor, GradStore)>;
    /// Logits with inference kernels.
    fn logits(&self, x: &Tensor, ret: Option<&Tensor>) -> Result<Tensor>;
    /// Whether the model reads neighbours at all.
    fn retrieval(&self) -> bool;
    /// Writes what a checkpoint keeps of the model (atomically).
    fn save(&self, path: &Path) -> Result<()>;
    /// Restores what [`Trainee::save`] wrote.
    fn load(&self, path: &Path) -> Result<()>;
    fn device(&self) -> &Device;
}

fn is_retrieval_param(name: &str) -> bool {
    name.starts_with("cca.") || name.starts_with("encoder.") || name.starts_with("norm_e.")
}

impl Trainee for RetroModel {
    fn trainable(&self, freeze_base: bool) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(n, _)| !freeze_base || is_retrieval_param(n))
            .collect()
    }
    fn loss_and_grads(
        &self,
        x: &Tensor,
        y: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        Ok(loss_and_grads(self, x, y, ret)?)
    }
    fn logits(&self, x: &Tensor, ret: Option<&Tensor>) -> Result<Tensor> {
        Ok(match ret {
            Some(ret) if !self.config().ca_layers.is_empty() => self.forward(x, ret)?,
            _ => self.forward_without_retrieval(x)?,
        })
    }
    fn retrieval(&self) -> bool {
        !self.config().ca_layers.is_empty()
    }
    fn save(&self, path: &Path) -> Result<()> {
        Ok(self.save_safetensors(path)?)
    }
    fn load(&self, path: &Path) -> Result<()> {
        Ok(self.load_safetensors(path)?)
    }
    fn device(&self) -> &Device {
        RetroModel::device(self)
    }
}

impl Trainee for RetroFitted {
    /// The new blocks only, whatever `freeze_base` says: the base is never a variable.
    fn trainable(&self, _freeze_base: bool) -> Vec<(String, Var)> {
        self.named_vars()
    }
    fn loss_and_grads(
        &self,
        x: &Tensor,
        y: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        retro_model::device::on_pool(self.base().device(), || {
            let loss = cross_entropy(&self.forward_train(x, ret)?, y)?;
            let grads = loss.backward()?;
            Ok((loss, grads))
        })
    }
    fn logits(&self, x: &Tensor, ret: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward(x, ret, None)?)
    }
    fn retrieval(&self) -> bool {
        true
    }
    fn save(&self, path: &Path) -> Result<()> {
        Ok(self.save_safetensors(path)?)
    }
    fn load(&self, path: &Path) -> Result<()> {
        Ok(self.load_safetensors(path)?)
    }
    fn device(&self) -> &Device {
        self.base().device()
    }
}
