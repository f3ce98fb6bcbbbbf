//! # retro-kernels
//!
//! The CPU kernels under the RETRO model and the index's BERT encoder, as candle ops: attention
//! with an implicit causal mask that reads strided heads (`fused_attention`, forward and backward),
//! LayerNorm and rotary embeddings with backward (`fused_norm`), `x W^T + b (+ r)` as one GEMM
//! (`linear_op`), exact GELU (`gelu`), the training blocks as single autograd nodes with written-out
//! backwards (`attention_block_op`: pre-norm self-, cross- and chunked cross-attention;
//! `feed_forward_op`), and the switch between inference and differentiable versions (`Kernels`).
//! f32 and f64 on the CPU; other devices and dtypes fall back to candle's ops.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use retro_kernels::fused_attention::attention;
//!
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?; // [sequences, queries, d]
//! let k = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
//! let out = attention(&q, &k, &v, Some(0))?; // causal
//! // The first query sees only the first key: its output is that key's value.
//! let d = (out.narrow(1, 0, 1)? - v.narrow(1, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(d < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod attention_block_op;
mod cpu_storage;
pub mod feed_forward_op;
mod float;
pub mod fused_attention;
pub mod fused_norm;
pub mod gelu;
mod isa;
pub mod kernels;
pub mod linear_op;

pub use kernels::Kernels;

#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{DType, Tensor};

    /// The largest absolute difference of two tensors of one shape, in f64.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}
