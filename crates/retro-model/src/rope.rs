//! Rotary position embeddings (rotate-half layout, as the reference), as cos/sin tables built once per
//! forward and shared by every self-attention layer.

use candle_core::{DType, Device, Result, Tensor};

/// `theta_i = base^(-2i/d)`, computed in f32 as the reference's `nn.Parameter` holds it.
pub fn theta(d_k: usize, base: f64) -> Vec<f32> {
    (0..d_k / 2)
        .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / d_k as f32))
        .collect()
}

/// cos and sin of `position * theta_i` for positions `offset .. offset + len`, each `[len, d_k/2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(
        theta: &[f32],
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = theta.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in offset..offset + len {
            for &t in theta {
                // f64 angle: positions up to many thousands keep their precision.
                let a = pos as f64 * t as f64;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?,
        })
    }
}
