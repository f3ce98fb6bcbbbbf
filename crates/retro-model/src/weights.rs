//! Checkpoints in safetensors under the reference's PyTorch `state_dict` names, so weights move both
//! ways between this crate and the labml model. Loading is strict: a missing, extra or wrongly shaped
//! tensor is an error that names it.

use crate::error::{ModelError, Result};
use crate::model::RetroModel;
use crate::rope;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

impl RetroModel {
    /// Names of the `rotary_pe.theta` buffers the reference keeps in its state_dict (not trainable).
    fn theta_names(&self) -> Vec<String> {
        let dec = (0..self.config.n_layers).map(|p| format!("attn.{p}.rotary_pe.theta"));
        let enc =
            (0..self.config.enc_n_layers).map(|p| format!("encoder.attn.{p}.rotary_pe.theta"));
        dec.chain(enc).collect()
    }

    /// The full state_dict: every trainable tensor plus the theta buffers.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let theta = Tensor::new(self.theta.as_slice(), &Device::Cpu)?;
        for name in self.theta_names() {
            out.insert(name, theta.clone());
        }
        Ok(out)
    }

    /// Fills the parameters from a state_dict (any float dtype, any device).
    pub fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let weight_err = |name: &str, msg: String| ModelError::Weight {
            name: name.to_string(),
            msg,
        };
        let vars = self.varmap.data().lock().unwrap();
        let thetas = self.theta_names();
        let expected_theta = rope::theta(self.config.d_k, self.config.rope_base);
        for name in tensors.keys() {
            if !vars.contains_key(name) && !thetas.contains(name) {
                return Err(weight_err(
                    name,
                    "unexpected tensor: the config has no such parameter".into(),
                ));
            }
        }
        let mut names: Vec<&String> = vars.keys().chain(thetas.iter()).collect();
        names.sort();
        for name in names {
            let t = tensors
                .get(name)
                .ok_or_else(|| weight_err(name, "missing from the checkpoint".into()))?;
            if !t.dtype().is_float() {
                return Err(weight_err(
                    name,
                    format!("dtype {:?} is not a float type", t.dtype()),
                ));
            }
            if let Some(var) = vars.get(name) {
                if t.dims() != var.dims() {
                    return Err(weight_err(
                        name,
                        format!(
                            "shape {:?} in the checkpoint, {:?} expected by the config",
                            t.dims(),
                            var.dims()
                        ),
                    ));
                }
                var.set(&t.to_device(&self.device)?.to_dtype(self.dtype)?)?;
            } else {
                // A theta buffer: it must be the one the config's rope_base implies.
                let got: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if t.dims() != [expected_theta.len()] {
                    return Err(weight_err(
                        name,
                        format!(
                            "shape {:?}, expected [{}] (d_k / 2)",
                            t.dims(),
                            expected_theta.len()
                        ),
                    ));
                }
                let off = got
                    .iter()
                    .zip(&expected_theta)
                    .any(|(a, b)| (a - b).abs() > 1e-6 * b.abs().max(1e-30));
                if off {
                    return Err(weight_err(
                        name,
                        format!(
                            "rotary theta differs from rope_base = {}",
                            self.config.rope_base
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Loads a safetensors checkpoint into this model (strict names and shapes).
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        load_file(path, |tensors| self.load_state_dict(tensors))
    }

    /// Builds a model from a config and a checkpoint.
    pub fn from_safetensors(
        config: &crate::RetroConfig,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let model = Self::new(config, 0, dtype, device)?;
        model.load_safetensors(path)?;
        Ok(model)
    }

    /// Writes the state_dict (float32) atomically: a temporary file in the same folder, then rename.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        save_f32(self.state_dict()?, path)
    }
}

/// Reads a safetensors file and hands its tensors to `load`; every error names the file.
pub(crate) fn load_file(
    path: &Path,
    load: impl FnOnce(&HashMap<String, Tensor>) -> Result<()>,
) -> Result<()> {
    let file = |msg: String| ModelError::File {
        path: path.to_owned(),
        msg,
    };
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| file(format!("cannot read safetensors: {e}")))?;
    load(&tensors).map_err(|e| file(e.to_string()))
}

/// Writes named tensors as float32 on the CPU, atomically.
pub(crate) fn save_f32(tensors: HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    write_atomically(path, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })
}

/// Writes through `write` into `path.tmp`, then renames it over `path`, so a reader never sees half a file.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file_err = |msg: String| ModelError::File {
        path: path.to_owned(),
        msg,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(e.to_string()));
    }
    std::fs::rename(&tmp, path).map_err(|e| file_err(format!("cannot rename into place: {e}")))
}
