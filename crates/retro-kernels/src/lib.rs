//! # retro-kernels
//!
//! The CPU kernels under the RETRO model and the index's BERT encoder, as candle ops: attention
//! with an implicit causal mask that reads strided heads (`fused_attention`, forward and backward),
//! LayerNorm and rotary embeddings with backward (`fused_norm`), `x W^T + b (+ r)` as one GEMM
//! (`linear_op`), exact GELU (`gelu`), the training blocks as single autograd nodes with written-out
//! backwards (`attention_block_op`: pre-norm self-, cross- and chunked cross-attention;
//! `feed_forward_op`), the switch between inference and differentiable versions (`Kernels`), and
//! the CPU's instruction sets, detected once for every kernel that picks a version (`isa`).
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
mod avx2;
pub mod chunk_schedule;
mod cpu_storage;
pub mod decode;
mod elementwise;
pub mod feed_forward_op;
mod float;
pub mod frozen_linear;
pub mod fused_attention;
pub mod fused_norm;
pub mod gelu;
pub mod isa;
pub mod kernels;
pub mod layers;
pub mod linear_op;

pub use chunk_schedule::ChunkSchedule;
pub use float::Float;
pub use kernels::Kernels;

#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{DType, Device, Tensor};

    /// Seeded standard-normal tensors, so that a failing comparison fails on every run with the
    /// same inputs (candle's `Tensor::randn` on the CPU draws from an unseeded thread RNG).
    struct Gaussian(u64);

    impl Gaussian {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
        }

        /// splitmix64, as a uniform in (0, 1].
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + f64::EPSILON
        }

        /// N(0, 1) entries by Box-Muller, in `dtype`.
        fn tensor(&mut self, shape: &[usize], dtype: DType) -> Tensor {
            let n = shape.iter().product::<usize>();
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    let (u, w) = (self.uniform(), self.uniform());
                    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        }
    }

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

    thread_local! {
        static DRAWS: std::cell::RefCell<Option<Gaussian>> = const { std::cell::RefCell::new(None) };
    }

    /// Starts this test's draws of [`randn`] at `seed`.
    pub fn seed(seed: u64) {
        DRAWS.with(|d| *d.borrow_mut() = Some(Gaussian::new(seed)));
    }

    /// The next seeded N(0, 1) tensor of this test; a test that did not call [`seed`] panics,
    /// so no comparison runs on inputs a rerun cannot reproduce.
    pub fn randn(shape: &[usize], dtype: DType) -> Tensor {
        DRAWS.with(|d| {
            d.borrow_mut()
                .as_mut()
                .expect("call testutil::seed at the start of the test")
                .tensor(shape, dtype)
        })
    }

    /// `max_diff` over the reference's own largest magnitude (at least 1): a tolerance that
    /// holds for a gradient of 1e3 as well as for one of 1e-3.
    pub fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
        max_diff(got, want) / max_diff(want, &want.zeros_like().unwrap()).max(1.0)
    }
}
