//! Device and dtype selection by name, for command lines and configs; where CPU work runs.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda` or `cuda:N` (CUDA needs the crate's `cuda` feature).
pub fn device_from_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    ModelError::Config(format!("device `{name}`: bad CUDA ordinal"))
                })?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::Config(format!(
                    "device `{name}`: this build has no CUDA support (rebuild with `--features cuda`)"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        _ => Err(ModelError::Config(format!(
            "unknown device `{name}` (expected cpu, cuda or cuda:N)"
        ))),
    }
}

/// `f32` (default), `f64`, `bf16` or `f16`.
pub fn dtype_from_name(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "f64" | "float64" => Ok(DType::F64),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(ModelError::Config(format!(
            "unknown dtype `{name}` (expected f32, f64, bf16 or f16)"
        ))),
    }
}

/// Runs `f` on a worker of rayon's global pool when `device` is the CPU. The CPU kernels' parallel
/// loops then fork inside the pool instead of waking it from outside for every op: a labml-small
/// train step makes 6x fewer context switches and takes ~10% less CPU time.
///
/// Public so that a loop of many small calls (generation: one [`RetroModel::step`] a token) can
/// run whole on one worker, instead of handing each call to the pool: 6-13% more tokens/s at
/// batch 1 on a 2-core Intel Xeon (2026-12-05, `retro bench generate`, three alternated pairs).
/// Calls nested inside it run in place.
///
/// [`RetroModel::step`]: crate::RetroModel::step
pub fn on_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}
