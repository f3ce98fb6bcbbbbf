//! What the training loop needs of a model, so one loop trains both kinds of run: a labml
//! [`RetroModel`] (from scratch, or RETRO-fitting its own checkpoint) and a [`RetroFitted`]
//! Llama base, of which only the new blocks train. Validation scores through [`Scorer`].

use crate::error::Result;
use crate::eval::Scorer;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use retro_model::retrofit::RetroFitted;
use retro_model::train::loss_and_grads;
use retro_model::RetroModel;
use std::path::Path;

pub trait Trainee: Scorer {
    /// The variables the optimizer updates, sorted by name.
    fn trainable(&self, freeze_base: bool) -> Vec<(String, Var)>;
    /// One batch's mean loss and gradients (training kernels); `ret = None` is RETRO\[OFF\].
    fn loss_and_grads(
        &self,
        x: &Tensor,
        y: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<(Tensor, GradStore)>;
    /// Writes what a checkpoint keeps of the model (atomically).
    fn save(&self, path: &Path) -> Result<()>;
    /// Restores what [`Trainee::save`] wrote.
    fn load(&self, path: &Path) -> Result<()>;
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
    fn save(&self, path: &Path) -> Result<()> {
        Ok(self.save_safetensors(path)?)
    }
    fn load(&self, path: &Path) -> Result<()> {
        Ok(self.load_safetensors(path)?)
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
        Ok(RetroFitted::loss_and_grads(self, x, y, ret)?)
    }
    fn save(&self, path: &Path) -> Result<()> {
        Ok(self.save_safetensors(path)?)
    }
    fn load(&self, path: &Path) -> Result<()> {
        Ok(self.load_safetensors(path)?)
    }
}
