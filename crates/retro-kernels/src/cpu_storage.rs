//! Reading the CPU storage behind a tensor, for the custom ops' kernels.

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
