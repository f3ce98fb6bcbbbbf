//! Exact (erf) GELU for inference, vectorised on the CPU.
//!
//! candle's `gelu_erf` evaluates a scalar f64 `erf` per element (a seventh of a BERT forward on
//! 2 cores); this is a branch-free f32 erf (Abramowitz & Stegun 7.1.26, absolute error <= 1.5e-7)
//! that the compiler vectorises. No backward.

use crate::cpu_storage::contiguous;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x * (1 + erf(x / sqrt(2))) / 2`; f32 on the CPU here, candle's `gelu_erf` elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// Cephes' `expf` polynomial in `r = x - n ln 2`, highest power first: `exp(x) = 2^n (1 + r + r^2
/// p(r))`. The AVX2 and AVX-512 versions evaluate the same polynomial (AVX2 by Estrin's scheme).
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Cephes' `expf` (about 1 ulp), branch-free so loops over it vectorise. Arguments outside
/// `[-87, 88]` are clamped (the result flushes towards 0 below).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * exp_f32(-z * z);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

#[inline(always)]
fn gelu_block_body(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = gelu(v);
    }
}

crate::isa::multiversioned!(
    /// The block loop compiled for the widest instruction set the CPU has (no FMA contraction:
    /// every version computes the same values).
    fn gelu_block(x: &[f32], y: &mut [f32]) => gelu_block_body
);

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l)?;
        let mut y = vec![0f32; x.len()];
        const BLOCK: usize = 4096;
        y.par_chunks_mut(BLOCK)
            .zip(x.par_chunks(BLOCK))
            .for_each(|(yb, xb)| gelu_block(xb, yb));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candles_f64_erf_gelu() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.005).collect();
        let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let got = gelu_erf(&x).unwrap().to_vec1::<f32>().unwrap();
        let want = x
            .to_dtype(DType::F64)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for ((g, w), v) in got.iter().zip(&want).zip(&xs) {
            assert!(
                (*g as f64 - w).abs() < 3e-7 * (1.0 + v.abs() as f64),
                "gelu({v}) = {g}, want {w}"
            );
        }
        // Large arguments: identity and zero.
        let big = Tensor::new(&[-30f32, 30.0, 0.0], &Device::Cpu).unwrap();
        assert_eq!(
            gelu_erf(&big).unwrap().to_vec1::<f32>().unwrap(),
            vec![-0.0, 30.0, 0.0]
        );
    }
}
