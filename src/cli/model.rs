//! `retro model forward | init`: run or create checkpoints in the reference's safetensors names.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Subcommand;
use retro_model::{RetroConfig, RetroModel};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    /// Logits of a checkpoint for given inputs (x [B,T], ret [B,C,K,N] int64/int32/uint32).
    Forward {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        /// safetensors holding `x` and, unless --no-retrieval, `ret`.
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors to write float32 `logits` into.
        #[arg(long)]
        out: PathBuf,
        /// RETRO[OFF]: skip the encoder and every CCA.
        #[arg(long)]
        no_retrieval: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Writes a freshly initialised checkpoint (PyTorch's default initialisation, seeded).
    Init {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn ids(t: &Tensor, name: &str, file: &std::path::Path) -> Result<Tensor> {
    match t.dtype() {
        DType::I64 | DType::U32 => Ok(t.clone()),
        // int32 is read as i64 via f64-free widening: candle has no i32 ops, so convert through u32
        // only after checking the sign.
        d => bail!(
            "{}: `{name}` has dtype {d:?}; expected int64, int32 or uint32",
            file.display()
        ),
    }
}

/// safetensors with int32 tensors: candle cannot hold i32, so read those through the safetensors crate.
fn load_inputs(path: &std::path::Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let t = match view.dtype() {
            safetensors::Dtype::I32 => {
                let v: Vec<i64> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    .collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            _ => candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

impl ModelCmd {
    pub fn run(self) -> Result<()> {
        match self {
            ModelCmd::Forward {
                config,
                weights,
                inputs,
                out,
                no_retrieval,
                device,
                dtype,
            } => {
                let cfg = RetroConfig::from_json_file(&config)?;
                let device = retro_model::device_from_name(&device)?;
                let dtype = retro_model::dtype_from_name(&dtype)?;
                let model = RetroModel::from_safetensors(&cfg, &weights, dtype, &device)?;
                let tensors = load_inputs(&inputs)?;
                let get = |name: &str| -> Result<Tensor> {
                    let t = tensors
                        .get(name)
                        .with_context(|| format!("{}: no tensor `{name}`", inputs.display()))?;
                    ids(t, name, &inputs)
                };
                let x = get("x")?;
                let logits = if no_retrieval {
                    model.forward_without_retrieval(&x)?
                } else {
                    model.forward(&x, &get("ret")?)?
                };
                let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                let map = HashMap::from([("logits".to_string(), logits.clone())]);
                retro_model::weights::write_atomically(&out, |tmp| {
                    Ok(candle_core::safetensors::save(&map, tmp)?)
                })?;
                println!("wrote logits {:?} to {}", logits.dims(), out.display());
            }
            ModelCmd::Init { config, seed, out } => {
                let cfg = RetroConfig::from_json_file(&config)?;
                let model = RetroModel::new(&cfg, seed, DType::F32, &Device::Cpu)?;
                model.save_safetensors(&out)?;
                println!(
                    "wrote {} parameters (seed {seed}) to {}",
                    model.num_parameters(),
                    out.display()
                );
            }
        }
        Ok(())
    }
}
