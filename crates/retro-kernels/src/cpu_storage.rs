//! Reading the CPU storage behind a tensor, for the custom ops' kernels, and running a kernel at
//! its storage's dtype.

use crate::float::Float;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, WithDType};

/// The contiguous data of `s` under layout `l` (an error for a strided layout).
pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let v = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("non-contiguous input {l:?} to a CPU kernel"),
    }
}

/// The CPU storage, or an error for another device.
pub(crate) fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("a CPU kernel was given a tensor on another device"),
    }
}

/// A kernel call generic over the element type: the inputs it holds are read as `T` in `run`.
/// A trait because closures cannot be generic; [`dispatch`] picks `T`.
pub(crate) trait FloatKernel {
    type Output;
    fn run<T: Float>(self) -> Result<Self::Output>;
}

/// Runs `kernel` as f32 or f64 after the dtype of `s` (one of its inputs); another dtype is an
/// error that names `op`. The one place the crate's CPU kernels match on a dtype.
pub(crate) fn dispatch<K: FloatKernel>(op: &str, s: &CpuStorage, kernel: K) -> Result<K::Output> {
    match s {
        CpuStorage::F32(_) => kernel.run::<f32>(),
        CpuStorage::F64(_) => kernel.run::<f64>(),
        _ => candle_core::bail!("{op}: f32 and f64 only, not {:?}", s.dtype()),
    }
}
