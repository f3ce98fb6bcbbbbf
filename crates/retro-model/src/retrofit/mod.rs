//! RETRO-fitting (the paper's section 4.2): a frozen pretrained [`LlamaBase`] with chunked
//! cross-attention (CCA) added after the attention of some of its layers and a neighbour encoder
//! conditioned on the decoder state at the first CCA layer. Only the new blocks are trainable.
//!
//! The new blocks are the labml model's own ([`NeighbourEncoder`], [`ChunkedCrossAttention`]),
//! at the base's width, under the same `state_dict` names (`encoder.*`, `norm_e.*`, `cca.{i}.*`).
//! Each CCA's output starts at zero (its projection, or with `gated_output` a `tanh` gate), so a
//! freshly RETRO-fitted model predicts exactly what the base predicts; with retrieval off
//! (RETRO\[OFF\]) it runs the base's forward itself.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use retro_model::llama::{tensor_shapes, LlamaBase, LlamaConfig};
//! use retro_model::retrofit::{RetroFitted, RetrofitConfig};
//!
//! let config = LlamaConfig {
//!     vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 4,
//!     num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10_000.0,
//!     max_position_embeddings: 64, tie_word_embeddings: true, bos_token_id: None, eos_token_id: None,
//! };
//! let tensors = tensor_shapes(&config)
//!     .into_iter()
//!     .map(|(name, shape)| Ok((name, (Tensor::randn(0f32, 0.1, shape, &Device::Cpu)?))))
//!     .collect::<candle_core::Result<_>>()?;
//! let base = LlamaBase::from_tensors(&config, &tensors, DType::F32, &Device::Cpu)?;
//! let fit = RetrofitConfig { chunk_len: 4, ca_start: 1, ca_every: 2, enc_n_layers: 1, enc_d_ff: 32, enc_input_layers: 0, init_from_base: false, neighbour_states: Default::default(), cca_positions: true, gated_output: false };
//! let model = RetroFitted::new(base, &fit, 7)?;
//! let x = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu)?;  // 2 chunks of 4
//! let ret = Tensor::zeros((1, 2, 2, 8), DType::U32, &Device::Cpu)?;    // K = 2, N = 8
//! let on = model.forward(&x, Some(&ret), None)?;
//! let base_logits = model.base().forward(&x, 0, None)?;
//! // New blocks start at zero: exactly the base's predictions, retrieval on or off.
//! assert_eq!(on.flatten_all()?.to_vec1::<f32>()?, base_logits.flatten_all()?.to_vec1::<f32>()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::cca::ChunkedCrossAttention;
use crate::config::RetroConfig;
use crate::encoder::NeighbourEncoder;
use crate::error::{ModelError, Result};
use crate::kernels::Kernels;
use crate::layers::LayerNorm;
use crate::llama::{LayerHook, LlamaBase};
use crate::params::ParamBuilder;
use crate::rope::{self, RopeTables};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

mod decode;
pub use decode::RetroFitCache;

/// Where the new blocks go and how large the encoder is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrofitConfig {
    /// Tokens per chunk (the paper's 64).
    pub chunk_len: usize,
    /// The first layer (0-based) with CCA after its attention ...
    pub ca_start: usize,
    /// ... and then every `ca_every`-th layer (the paper's Table 12: every 3rd from the 6th).
    pub ca_every: usize,
    /// Layers of the neighbour encoder (the paper's 2).
    pub enc_n_layers: usize,
    /// The encoder's feed-forward width.
    pub enc_d_ff: usize,
    /// What the encoder reads of each neighbour: 0, the base's token embeddings (as the labml
    /// model does); `n`, the base's residual stream after its first `n` layers (frozen), the
    /// features the decoder's own CCA queries come from when `n` is `ca_start`.
    #[serde(default)]
    pub enc_input_layers: usize,
    /// Start each CCA as its layer's own self-attention reading the neighbours (query, key and
    /// value projections and the norm's weight copied from the base, the key/value heads repeated
    /// for each query head), and the encoder as the identity (its blocks' output projections at
    /// zero); the CCA's output still starts at zero (see `gated_output`), so the model starts
    /// exactly at the base. Otherwise the new blocks start from PyTorch's default initialisation.
    #[serde(default)]
    pub init_from_base: bool,
    /// What each CCA's keys and values read: the encoder's output (the paper's), or the frozen
    /// base's own view of the neighbours at that CCA's layer.
    #[serde(default)]
    pub neighbour_states: NeighbourStates,
    /// Rotary positions in each CCA, with the base's tables: the neighbour's tokens at `0..N`, the
    /// rows a chunk conditions at `N + j`, as if the neighbour preceded them in the base's context
    /// (the paper's CCA has relative positions too). Without, the CCA sees no positions (labml's).
    #[serde(default)]
    pub cca_positions: bool,
    /// Each CCA's output times `tanh(10 g)`, `g` a learned scalar (`cca.{i}.gate`) starting at 0
    /// (Flamingo's gated cross-attention): the model starts exactly at the base while the output
    /// projection starts from the base layer's own (with `init_from_base`) instead of zero, so the
    /// CCA starts as that layer's attention over the neighbours, turned off.
    #[serde(default)]
    pub gated_output: bool,
}

/// What a RETRO-fit's CCAs read of the neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeighbourStates {
    /// The paper's: a trained encoder over the neighbours (see `enc_input_layers`), conditioned on
    /// the decoder at the first CCA layer, read by every CCA.
    #[default]
    Encoder,
    /// No encoder: the CCA of layer `l` reads each neighbour as the frozen base's residual stream
    /// entering layer `l` (RMS-normalised), the states the base's own attention at `l` would read
    /// had the neighbour been in its context. Started from the base (`init_from_base`), each CCA is
    /// then that attention, without positions; only the CCAs train.
    BaseLayers,
}

impl RetrofitConfig {
    /// The paper's settings: chunk 64, CCA every 3rd layer from layer 6, a 2-layer encoder.
    pub fn paper(enc_d_ff: usize) -> Self {
        Self {
            chunk_len: 64,
            ca_start: 6,
            ca_every: 3,
            enc_n_layers: 2,
            enc_d_ff,
            enc_input_layers: 6,
            init_from_base: true,
            neighbour_states: NeighbourStates::Encoder,
            cca_positions: false,
            gated_output: false,
        }
    }

    /// The layers with CCA, for a base of `n_layers`.
    pub fn ca_layers(&self, n_layers: usize) -> BTreeSet<usize> {
        (self.ca_start..n_layers)
            .step_by(self.ca_every.max(1))
            .collect()
    }

    /// How many parameters the new blocks have on a base of this config (they are built to count
    /// them: exact, and a few hundred ms).
    pub fn num_new_parameters(&self, base: &crate::llama::LlamaConfig) -> Result<usize> {
        let blocks = self.blocks(base)?;
        let varmap = VarMap::new();
        let mut pb = ParamBuilder::new(
            &varmap,
            0,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
        NewBlocks::new(&mut pb, &blocks, self)?;
        Ok(varmap.all_vars().iter().map(|v| v.elem_count()).sum())
    }

    /// The new blocks' sizes as the labml model's config names them (its decoder fields describe
    /// the base, which the blocks read from).
    pub fn blocks(&self, base: &crate::llama::LlamaConfig) -> Result<RetroConfig> {
        if self.ca_every == 0 {
            return Err(ModelError::Config("`ca_every` must be > 0".into()));
        }
        let ca_layers = self.ca_layers(base.num_hidden_layers);
        if ca_layers.is_empty() {
            return Err(ModelError::Config(format!(
                "`ca_start` = {} leaves no CCA layer in a base of {} layers",
                self.ca_start, base.num_hidden_layers
            )));
        }
        if self.enc_n_layers == 0 {
            return Err(ModelError::Config("`enc_n_layers` must be > 0".into()));
        }
        if self.enc_input_layers > base.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "`enc_input_layers` = {} is beyond the base's {} layers",
                self.enc_input_layers, base.num_hidden_layers
            )));
        }
        let c = RetroConfig {
            n_vocab: base.vocab_size,
            d_model: base.hidden_size,
            n_layers: base.num_hidden_layers,
            ca_layers,
            chunk_len: self.chunk_len,
            n_heads: base.num_attention_heads,
            d_k: base.head_dim(),
            d_ff: self.enc_d_ff,
            enc_n_layers: self.enc_n_layers,
            // The encoder reads the decoder's chunk in its last layer.
            enc_ca_layers: [self.enc_n_layers - 1].into(),
            layer_norm_eps: 1e-5,
            rope_base: 10_000.0,
        };
        c.validate()?;
        Ok(c)
    }
}

/// The new blocks, created in one order (encoder, CCAs, `norm_e`), so that a seed means the same
/// thing wherever they are built.
struct NewBlocks {
    /// The encoder and its final norm (`None`: [`NeighbourStates::BaseLayers`]).
    encoder: Option<(NeighbourEncoder, LayerNorm)>,
    cca: Vec<ChunkedCrossAttention>,
}

impl NewBlocks {
    fn new(
        pb: &mut ParamBuilder,
        blocks: &RetroConfig,
        fit: &RetrofitConfig,
    ) -> candle_core::Result<Self> {
        let encoder = match fit.neighbour_states {
            NeighbourStates::Encoder => Some(NeighbourEncoder::new(pb, "encoder", blocks)?),
            NeighbourStates::BaseLayers => None,
        };
        let mut cca = (0..blocks.ca_layers.len())
            .map(|i| ChunkedCrossAttention::new(pb, &format!("cca.{i}"), blocks))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if fit.gated_output {
            for (i, c) in cca.iter_mut().enumerate() {
                c.gate = Some(pb.scalar(&format!("cca.{i}.gate"), 0.0)?);
            }
        }
        let encoder = match encoder {
            Some(enc) => Some((
                enc,
                pb.layer_norm("norm_e", blocks.d_model, blocks.layer_norm_eps)?,
            )),
            None => None,
        };
        Ok(Self { encoder, cca })
    }
}

/// A frozen base with trainable CCA and neighbour encoder.
pub struct RetroFitted {
    pub(crate) base: LlamaBase,
    pub(crate) config: RetrofitConfig,
    pub(crate) blocks: RetroConfig,
    varmap: VarMap,
    encoder: Option<(NeighbourEncoder, LayerNorm)>,
    pub(crate) cca: Vec<ChunkedCrossAttention>,
    theta: Vec<f32>,
}

impl RetroFitted {
    /// New blocks on `base`, drawn from `seed` (PyTorch's default initialisation), with every
    /// CCA's output at zero (its projection, or its gate).
    pub fn new(base: LlamaBase, config: &RetrofitConfig, seed: u64) -> Result<Self> {
        let blocks = config.blocks(base.config())?;
        let varmap = VarMap::new();
        let mut pb = ParamBuilder::new(&varmap, seed, base.dtype(), base.device());
        let NewBlocks { encoder, mut cca } = NewBlocks::new(&mut pb, &blocks, config)?;
        if config.cca_positions {
            for c in &mut cca {
                c.rotary = Some(base.rotary().clone());
            }
        }
        {
            let vars = varmap.data().lock().unwrap();
            let zero = |name: String| -> Result<()> {
                let v = &vars[&name];
                Ok(v.set(&v.as_tensor().zeros_like()?)?)
            };
            // Gated, the gate at zero starts the model at the base; otherwise the output.
            if !config.gated_output {
                for i in 0..cca.len() {
                    zero(format!("cca.{i}.output.weight"))?;
                    zero(format!("cca.{i}.output.bias"))?;
                }
            }
            if config.init_from_base {
                let set = |name: String, t: Tensor| -> Result<()> {
                    Ok(vars[&name].set(&t.to_dtype(base.dtype())?)?)
                };
                for (i, &layer) in blocks.ca_layers.iter().enumerate() {
                    let b = base.block(layer);
                    let w = &b.input_norm.weight;
                    let rep = blocks.n_heads / b.attn.n_kv_heads;
                    // Keys and values read norm_e's output: the base's norm weight folded in.
                    let kv = |m: &Tensor| -> Result<Tensor> {
                        let (rows, cols) = m.dims2()?;
                        let heads =
                            m.reshape((b.attn.n_kv_heads, 1, rows / b.attn.n_kv_heads, cols))?;
                        let heads = heads.repeat((1, rep, 1, 1))?.reshape((rows * rep, cols))?;
                        Ok(heads.broadcast_mul(&w.unsqueeze(0)?)?)
                    };
                    set(format!("cca.{i}.query.weight"), b.attn.q.clone())?;
                    set(format!("cca.{i}.key.weight"), kv(&b.attn.k)?)?;
                    set(format!("cca.{i}.value.weight"), kv(&b.attn.v)?)?;
                    set(format!("cca.{i}.norm.weight"), w.clone())?;
                    for p in ["query", "key", "value", "norm", "output"] {
                        zero(format!("cca.{i}.{p}.bias"))?;
                    }
                    if config.gated_output {
                        set(format!("cca.{i}.output.weight"), b.attn.o.clone())?;
                    }
                }
                for p in 0..blocks.enc_n_layers * usize::from(encoder.is_some()) {
                    for name in [
                        format!("encoder.attn.{p}.output"),
                        format!("encoder.ffw.{p}.lin2"),
                    ] {
                        zero(format!("{name}.weight"))?;
                        zero(format!("{name}.bias"))?;
                    }
                }
                for i in 0..blocks.enc_ca_layers.len() * usize::from(encoder.is_some()) {
                    zero(format!("encoder.ca.{i}.output.weight"))?;
                    zero(format!("encoder.ca.{i}.output.bias"))?;
                }
            }
        }
        Ok(Self {
            theta: rope::theta(blocks.d_k, blocks.rope_base),
            base,
            config: config.clone(),
            blocks,
            varmap,
            encoder,
            cca,
        })
    }

    pub fn base(&self) -> &LlamaBase {
        &self.base
    }
    pub fn config(&self) -> &RetrofitConfig {
        &self.config
    }
    /// The new blocks' sizes (see [`RetrofitConfig::blocks`]).
    pub fn blocks(&self) -> &RetroConfig {
        &self.blocks
    }
    pub fn chunk_len(&self) -> usize {
        self.config.chunk_len
    }

    /// The trainable variables (the new blocks only), sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        crate::train::sorted_vars(&self.varmap)
    }

    /// Number of trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The new blocks' tensors under their `state_dict` names.
    pub fn state_dict(&self) -> HashMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Fills the new blocks from a state_dict: a missing, extra or misshapen tensor is an error
    /// that names it.
    pub fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let err = |name: &str, msg: String| ModelError::Weight {
            name: name.to_string(),
            msg,
        };
        let vars = self.varmap.data().lock().unwrap();
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
        extra.sort();
        if let Some(name) = extra.first() {
            return Err(err(
                name,
                "unexpected tensor: the RETRO-fit config has no such parameter".into(),
            ));
        }
        for (name, var) in vars.iter() {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(name, "missing".into()))?;
            if t.dims() != var.dims() {
                return Err(err(
                    name,
                    format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Writes the new blocks (f32, atomically): the base is not copied.
    pub fn save_safetensors(&self, path: &std::path::Path) -> Result<()> {
        crate::weights::save_f32(self.state_dict(), path)
    }

    /// Reads what [`RetroFitted::save_safetensors`] wrote.
    pub fn load_safetensors(&self, path: &std::path::Path) -> Result<()> {
        crate::weights::load_file(path, |tensors| self.load_state_dict(tensors))
    }

    /// One batch's mean cross-entropy against `y` and its gradients (the training forward, the
    /// new blocks' variables only), as [`crate::train::loss_and_grads`] runs the labml model's.
    pub fn loss_and_grads(
        &self,
        x: &Tensor,
        y: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        crate::train::loss_and_grads_of(self.base.device(), y, || self.forward_train(x, ret))
    }

    /// `x [B, T]` -> logits `[B, T, vocab]`, inference kernels. `ret [B, C, K, N]` holds the
    /// neighbours of each complete chunk (`C = T / chunk_len`); `None` is RETRO\[OFF\]: the base's
    /// own forward. `keep [B, C]` gates each chunk's neighbours as in
    /// [`crate::RetroModel::forward_gated`].
    pub fn forward(
        &self,
        x: &Tensor,
        ret: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with(x, ret, keep, Kernels::Fused)
    }

    /// The forward for training: every op records its backward, through the frozen base too,
    /// so the gradients reach the new blocks below the last layer.
    pub fn forward_train(&self, x: &Tensor, ret: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(x, ret, None, Kernels::Differentiable)
    }

    fn forward_with(
        &self,
        x: &Tensor,
        ret: Option<&Tensor>,
        keep: Option<&Tensor>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let Some(ret) = ret else {
            return self
                .base
                .forward_hooked(x, 0, None, &mut crate::llama::NoHook, kern);
        };
        let (b, t) = x.dims2().map_err(|_| {
            ModelError::shape(
                "retrofit forward",
                "x",
                "must be [B, T]",
                format!("{:?}", x.dims()),
            )
        })?;
        let c = t / self.config.chunk_len;
        if !matches!(ret.dims(), &[rb, rc, rk, rn] if rb == b && rc == c && rk > 0 && rn > 0) {
            return Err(ModelError::shape(
                "retrofit forward",
                "ret",
                format!(
                    "must be [B, C, K, N] with B = {b} and C = T / chunk_len = {t} / {} = {c}",
                    self.config.chunk_len
                ),
                format!("{:?}", ret.dims()),
            ));
        }
        let keep = keep
            .map(|k| {
                crate::model::keep_gate(
                    "retrofit forward",
                    k,
                    (b, c),
                    self.base.dtype(),
                    self.base.device(),
                )
            })
            .transpose()?;
        let mut hook = Cca {
            model: self,
            ret: (c > 0).then_some(ret),
            keep: keep.as_ref(),
            e: None,
            kern,
        };
        self.base.forward_hooked(x, 0, None, &mut hook, kern)
    }

    /// The neighbours `ret [B, C, K, N]` as the CCAs read them, `[B, C, K, N, d]` each: one
    /// tensor that every CCA reads (the encoder's output after `norm_e`, conditioned on the decoder
    /// state `h [B, T, d]` at the first CCA layer), or one per CCA
    /// ([`NeighbourStates::BaseLayers`]); [`Encoded::for_cca`] picks.
    pub(crate) fn encode(&self, ret: &Tensor, h: &Tensor, kern: Kernels) -> Result<Encoded> {
        let (b, c, k, n) = ret.dims4()?;
        let shape = (b, c, k, n, self.blocks.d_model);
        let flat = || ret.reshape((b * c * k, n));
        let Some((encoder, norm_e)) = &self.encoder else {
            // Frozen and below every trainable block: no gradient needed.
            let layers: Vec<usize> = self.blocks.ca_layers.iter().copied().collect();
            let states = self.base.hiddens_after(&flat()?, &layers, Kernels::Fused)?;
            return Ok(Encoded(
                states
                    .into_iter()
                    .map(|s| Ok(rms_normalise(&s.detach())?.reshape(shape)?))
                    .collect::<Result<_>>()?,
            ));
        };
        let e = match self.config.enc_input_layers {
            0 => self.base.embed(ret, "ret")?,
            layers => self
                .base
                .hidden_after(&flat()?, layers, Kernels::Fused)?
                .detach()
                .reshape(shape)?,
        };
        let rope = RopeTables::new(&self.theta, 0, n, self.base.dtype(), self.base.device())?;
        let e = encoder.forward(&e, h, &rope, kern)?;
        Ok(Encoded(vec![norm_e.forward(&e, kern)?]))
    }
}

/// The neighbours of some chunks as the CCAs read them (see [`RetroFitted::encode`]).
#[derive(Debug, Clone)]
pub(crate) struct Encoded(Vec<Tensor>);

impl Encoded {
    /// What the `i`-th CCA reads.
    pub(crate) fn for_cca(&self, i: usize) -> &Tensor {
        &self.0[i.min(self.0.len() - 1)]
    }
}

/// `x / rms(x)` over the last dimension: the base's RMSNorm without its weight, which each CCA's
/// key and value projections carry instead.
fn rms_normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    x.broadcast_div(&(ms + 1e-5)?.sqrt()?)
}

/// The hook of a full-sequence forward: the encoder at the first CCA layer, then each CCA.
struct Cca<'a> {
    model: &'a RetroFitted,
    ret: Option<&'a Tensor>,
    keep: Option<&'a Tensor>,
    e: Option<Encoded>,
    kern: Kernels,
}

impl LayerHook for Cca<'_> {
    fn after_attention(&mut self, layer: usize, h: Tensor, _offset: usize) -> Result<Tensor> {
        let Some(ret) = self.ret else { return Ok(h) };
        let Some(i) = self.model.blocks.cca_index(layer) else {
            return Ok(h);
        };
        if self.e.is_none() {
            self.e = Some(self.model.encode(ret, &h, self.kern)?);
        }
        let e = self.e.as_ref().expect("encoded above").for_cca(i);
        Ok(self.model.cca[i].forward(&h, e, self.keep, self.kern)?)
    }
}
