//! A pretrained Llama-architecture decoder as RETRO's frozen base (the paper's RETRO-fitting,
//! section 4.2): imported from a GGUF file ([`gguf::import`]), run with or without a KV cache
//! through one forward ([`LlamaBase::forward`]), and extended by hooks after each layer's
//! attention ([`LayerHook`]), which is where chunked cross-attention goes.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use retro_model::llama::{tensor_shapes, LlamaBase, LlamaConfig};
//!
//! let config = LlamaConfig {
//!     vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2,
//!     num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10_000.0,
//!     max_position_embeddings: 64, tie_word_embeddings: true, bos_token_id: None, eos_token_id: None,
//! };
//! let tensors = tensor_shapes(&config)
//!     .into_iter()
//!     .map(|(name, shape)| Ok((name, (Tensor::randn(0f32, 0.1, shape, &Device::Cpu)?))))
//!     .collect::<candle_core::Result<_>>()?;
//! let base = LlamaBase::from_tensors(&config, &tensors, DType::F32, &Device::Cpu)?;
//! let x = Tensor::new(&[[3u32, 1, 4, 1, 5]], &Device::Cpu)?;
//! let full = base.forward(&x, 0, None)?;                      // [1, 5, 32]
//! // The same logits, token by token on a KV cache:
//! let mut cache = base.new_cache();
//! base.forward(&x.narrow(1, 0, 4)?, 0, Some(&mut cache))?;
//! let last = base.forward(&x.narrow(1, 4, 1)?, 4, Some(&mut cache))?;
//! let diff = (last - full.narrow(1, 4, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod blocks;
pub mod config;
pub mod gguf;
pub mod model;

pub use blocks::Block;
pub use config::LlamaConfig;
pub use gguf::{GgufImport, GgufVocab};
pub use model::{tensor_shapes, LayerHook, LlamaBase, LlamaCache, NoHook};
