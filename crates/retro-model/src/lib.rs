//! # retro-model
//!
//! The RETRO decoder (Borgeaud et al. 2022) with chunked cross-attention (CCA) and the neighbour
//! encoder, in candle, computing what the labml.ai reference computes and loading and saving its
//! PyTorch `state_dict` names.
//!
//! Shapes: `x [B, T]` token ids; `ret [B, C, K, N]` neighbour token ids with `C = T / chunk_len`
//! complete chunks, `ret[:, u]` holding the neighbours retrieved *with* input chunk u (the CCA shifts
//! them so they first condition position `u * chunk_len + chunk_len - 1`); logits `[B, T, n_vocab]`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use retro_model::{RetroConfig, RetroModel};
//!
//! let config = RetroConfig {
//!     n_vocab: 11, d_model: 16, n_layers: 2, ca_layers: [1].into(), chunk_len: 4,
//!     n_heads: 2, d_k: 8, d_ff: 32, enc_n_layers: 1, enc_ca_layers: [0].into(),
//!     layer_norm_eps: 1e-5, rope_base: 10_000.0,
//! };
//! let model = RetroModel::new(&config, 42, DType::F32, &Device::Cpu)?;
//! let x = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10]], &Device::Cpu)?; // T = 10: C = 2
//! let ret = Tensor::zeros((1, 2, 3, 8), DType::U32, &Device::Cpu)?;         // K = 3, N = 8
//! let logits = model.forward(&x, &ret)?;
//! assert_eq!(logits.dims(), &[1, 10, 11]);
//! let off = model.forward_without_retrieval(&x)?; // RETRO[OFF]
//! // The first chunk_len - 1 positions see no neighbour: both agree there.
//! let diff = (logits.narrow(1, 0, 3)? - off.narrow(1, 0, 3)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod attention;
mod attention_params;
pub mod cca;
pub mod config;
pub mod cross_attention;
pub mod device;
pub mod encoder;
pub mod error;
pub mod feed_forward;
pub mod hook;
pub mod incremental;
pub mod llama;
pub mod model;
pub mod neighbour_block;
mod params;
pub mod retrofit;
pub mod rope;
mod rows;
pub mod train;
pub mod weights;

// The kernels live in retro-kernels (the index's BERT encoder uses them too).
pub use retro_kernels::{
    attention_block_op, feed_forward_op, fused_attention, fused_norm, kernels, layers, linear_op,
};

pub use config::RetroConfig;
pub use device::{device_from_name, dtype_from_name};
pub use error::{ModelError, Result};
pub use incremental::{DecodeEngine, DecodeState};
pub use kernels::Kernels;
pub use model::RetroModel;
pub use neighbour_block::NeighbourBlock;
pub use retro_kernels::ChunkSchedule;
