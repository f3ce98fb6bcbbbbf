//! The Llama base: one forward with an optional KV cache, as candle-transformers' models take
//! `forward(x, index_pos, cache)`. A RETRO-fitted model adds blocks through [`LayerHook`]; it
//! never needs a forward of its own.

use super::blocks::{project, Block, LayerKv, RmsNorm, Rotary, SelfAttention, SwiGlu};
use super::config::LlamaConfig;
use crate::error::{ModelError, Result};
pub use crate::hook::{LayerHook, NoHook};
use crate::kernels::Kernels;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A pretrained Llama decoder, read-only: its weights are never written by training.
#[derive(Debug, Clone)]
pub struct LlamaBase {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// The output projection `[vocab, d]`: the embedding itself when tied.
    lm_head: Tensor,
    rotary: Rotary,
    device: Device,
}

/// The keys and values of every layer for the positions fed so far, one batch of sequences.
#[derive(Debug, Clone, Default)]
pub struct LlamaCache {
    layers: Vec<LayerKv>,
    position: usize,
}

impl LlamaCache {
    /// Number of positions cached: the position of the next token.
    pub fn position(&self) -> usize {
        self.position
    }
}

/// The tensor names and shapes of a config, as Hugging Face's `LlamaForCausalLM` names them.
pub fn tensor_shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (d, kv, ff) = (
        c.hidden_size,
        c.num_key_value_heads * c.head_dim(),
        c.intermediate_size,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.mlp.gate_proj.weight"), vec![ff, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![ff, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, ff]),
        ]);
    }
    out.push(("model.norm.weight".into(), vec![d]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![c.vocab_size, d]));
    }
    out
}

impl LlamaBase {
    /// From named tensors (see [`tensor_shapes`]): a missing, extra or misshapen tensor is an
    /// error that names it. Tensors are converted to `dtype` on `device`.
    pub fn from_tensors(
        config: &LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let shapes = tensor_shapes(config);
        let err = |name: &str, msg: String| ModelError::Weight {
            name: name.to_string(),
            msg,
        };
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !shapes.iter().any(|(n, _)| n == *k))
            .collect();
        extra.sort();
        if let Some(name) = extra.first() {
            return Err(err(
                name,
                "unexpected tensor: the config has no such parameter".into(),
            ));
        }
        let mut got = HashMap::new();
        for (name, shape) in &shapes {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(name, "missing".into()))?;
            if t.dims() != shape.as_slice() {
                return Err(err(
                    name,
                    format!("shape {:?}, the config needs {shape:?}", t.dims()),
                ));
            }
            if !t.dtype().is_float() {
                return Err(err(name, format!("dtype {:?} is not a float", t.dtype())));
            }
            got.insert(name.as_str(), t.to_device(device)?.to_dtype(dtype)?);
        }
        let take = |n: String| got[n.as_str()].clone();
        let c = config;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Block {
                    input_norm: RmsNorm {
                        weight: take(format!("{p}.input_layernorm.weight")),
                        eps: c.rms_norm_eps,
                    },
                    attn: SelfAttention {
                        q: take(format!("{p}.self_attn.q_proj.weight")),
                        k: take(format!("{p}.self_attn.k_proj.weight")),
                        v: take(format!("{p}.self_attn.v_proj.weight")),
                        o: take(format!("{p}.self_attn.o_proj.weight")),
                        n_heads: c.num_attention_heads,
                        n_kv_heads: c.num_key_value_heads,
                        head_dim: c.head_dim(),
                    },
                    post_attention_norm: RmsNorm {
                        weight: take(format!("{p}.post_attention_layernorm.weight")),
                        eps: c.rms_norm_eps,
                    },
                    mlp: SwiGlu {
                        gate: take(format!("{p}.mlp.gate_proj.weight")),
                        up: take(format!("{p}.mlp.up_proj.weight")),
                        down: take(format!("{p}.mlp.down_proj.weight")),
                    },
                }
            })
            .collect();
        let embed = take("model.embed_tokens.weight".into());
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight".into())
        };
        Ok(Self {
            rotary: Rotary::new(
                c.head_dim(),
                c.rope_theta,
                c.max_position_embeddings,
                dtype,
                device,
            )?,
            config: c.clone(),
            embed,
            layers,
            norm: RmsNorm {
                weight: take("model.norm.weight".into()),
                eps: c.rms_norm_eps,
            },
            lm_head,
            device: device.clone(),
        })
    }

    /// Reads `config.json` and `model.safetensors` from a folder (checksums are the caller's:
    /// the pipeline's base folder verifies them first).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = LlamaConfig::from_json_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let tensors =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| ModelError::File {
                path: path.clone(),
                msg: format!("unreadable safetensors: {e}"),
            })?;
        Self::from_tensors(&config, &tensors, dtype, device)
    }

    /// The named tensors, as [`LlamaBase::from_tensors`] takes them.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.embed.clone());
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, t) in [
                ("input_layernorm", &l.input_norm.weight),
                ("self_attn.q_proj", &l.attn.q),
                ("self_attn.k_proj", &l.attn.k),
                ("self_attn.v_proj", &l.attn.v),
                ("self_attn.o_proj", &l.attn.o),
                ("post_attention_layernorm", &l.post_attention_norm.weight),
                ("mlp.gate_proj", &l.mlp.gate),
                ("mlp.up_proj", &l.mlp.up),
                ("mlp.down_proj", &l.mlp.down),
            ] {
                out.insert(format!("{p}.{n}.weight"), t.clone());
            }
        }
        out.insert("model.norm.weight".into(), self.norm.weight.clone());
        if !self.config.tie_word_embeddings {
            out.insert("lm_head.weight".into(), self.lm_head.clone());
        }
        out
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    /// The rotary tables of every layer's attention.
    pub(crate) fn rotary(&self) -> &Rotary {
        &self.rotary
    }

    /// Layer `i`'s weights.
    pub fn block(&self, i: usize) -> &Block {
        &self.layers[i]
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> LlamaCache {
        LlamaCache {
            layers: vec![None; self.layers.len()],
            position: 0,
        }
    }

    /// `x [B, T]` token ids at positions `index_pos..index_pos + T` -> logits `[B, T, vocab]`.
    /// With a cache, it must hold exactly the positions before `index_pos`, and is extended;
    /// without one, `index_pos` must be 0.
    pub fn forward(
        &self,
        x: &Tensor,
        index_pos: usize,
        cache: Option<&mut LlamaCache>,
    ) -> Result<Tensor> {
        self.forward_hooked(x, index_pos, cache, &mut NoHook, Kernels::Fused)
    }

    /// [`LlamaBase::forward`] with a hook after every layer's attention, and the kernels chosen
    /// (differentiable ones when gradients must flow through the frozen blocks).
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        index_pos: usize,
        mut cache: Option<&mut LlamaCache>,
        hook: &mut dyn LayerHook,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (_, t) = x.dims2().map_err(|_| {
            ModelError::shape(
                "llama forward",
                "x",
                "must be [B, T]",
                format!("{:?}", x.dims()),
            )
        })?;
        let at = || format!("llama forward at position {index_pos}");
        let cached = cache.as_ref().map_or(0, |c| c.position);
        if cached != index_pos {
            return Err(ModelError::shape(
                at(),
                "cache",
                format!("must hold the {index_pos} positions before `index_pos`"),
                format!("{cached} cached positions"),
            ));
        }
        if index_pos + t > self.rotary.positions() {
            return Err(ModelError::shape(
                at(),
                "x",
                format!(
                    "must end within the context of {} positions",
                    self.rotary.positions()
                ),
                format!("{t} tokens from position {index_pos}"),
            ));
        }
        let h = self.embed(x, "x")?;
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
        }
        let h = self.layers_through(
            h,
            0..self.layers.len(),
            kern,
            &mut |i, attn, x| {
                let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                attn.forward(x, index_pos, &self.rotary, kv, kern)
            },
            &mut |i, h| hook.after_attention(i, h, index_pos),
        )?;
        if let Some(c) = cache {
            c.position += t;
        }
        Ok(project(&self.norm.forward(&h, kern)?, &self.lm_head, kern)?)
    }

    /// The residual stream `h` through layers `layers`: each layer's attention is
    /// `attend(i, attention, norm(h))` (one cache, per-sequence caches, or none), its output
    /// added to `h` and passed through `hook(i, h)`, then the feed-forward. The one layer loop of
    /// [`LlamaBase::forward_hooked`], [`LlamaBase::step_batch`] and [`LlamaBase::hidden_after`].
    fn layers_through(
        &self,
        mut h: Tensor,
        layers: std::ops::Range<usize>,
        kern: Kernels,
        attend: &mut dyn FnMut(usize, &SelfAttention, &Tensor) -> candle_core::Result<Tensor>,
        hook: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        for (i, layer) in self.layers[layers.clone()].iter().enumerate() {
            let i = layers.start + i;
            let a = attend(i, &layer.attn, &layer.input_norm.forward(&h, kern)?)?;
            h = hook(i, (h + a)?)?;
            let m = layer
                .mlp
                .forward(&layer.post_attention_norm.forward(&h, kern)?, kern)?;
            h = (h + m)?;
        }
        Ok(h)
    }

    /// One token for each of B independent sequences, each on its own cache at its own position
    /// (continuous batching, as a server decodes its requests): `tokens[i]` goes at
    /// `caches[i].position()` and `hooks[i]` is sequence `i`'s hook. Returns the logits
    /// `[B, vocab]`: row `i` is what [`LlamaBase::forward_hooked`] gives that token alone on
    /// `caches[i]`, up to the rounding of the batched projections.
    pub fn step_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut LlamaCache],
        hooks: &mut [&mut dyn LayerHook],
    ) -> Result<Tensor> {
        let b = tokens.len();
        if caches.len() != b || hooks.len() != b {
            return Err(ModelError::shape(
                "llama step_batch",
                "caches",
                format!("must be one cache and one hook per token ({b})"),
                format!("{} caches, {} hooks", caches.len(), hooks.len()),
            ));
        }
        let offsets: Vec<usize> = caches.iter().map(|c| c.position).collect();
        if let Some(&at) = offsets.iter().find(|&&p| p >= self.rotary.positions()) {
            return Err(ModelError::shape(
                "llama step_batch",
                "caches",
                format!(
                    "must end within the context of {} positions",
                    self.rotary.positions()
                ),
                format!("a token at position {at}"),
            ));
        }
        let x = Tensor::from_vec(tokens.to_vec(), (b, 1), &Device::Cpu)?;
        let h = self.embed(&x, "tokens")?;
        for c in caches.iter_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
        }
        let kern = Kernels::Fused;
        let h = self.layers_through(
            h,
            0..self.layers.len(),
            kern,
            &mut |i, attn, x| {
                let mut kvs: Vec<&mut LayerKv> =
                    caches.iter_mut().map(|c| &mut c.layers[i]).collect();
                attn.forward_step(x, &offsets, &self.rotary, &mut kvs)
            },
            // Each sequence's hook sees its own row at its own position.
            &mut |i, h| {
                let rows = hooks
                    .iter_mut()
                    .zip(&offsets)
                    .enumerate()
                    .map(|(r, (hook, &at))| hook.after_attention(i, h.narrow(0, r, 1)?, at))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&rows, 0)?)
            },
        )?;
        for c in caches.iter_mut() {
            c.position += 1;
        }
        Ok(project(&self.norm.forward(&h, kern)?, &self.lm_head, kern)?.squeeze(1)?)
    }

    /// The residual stream `[B, T, d]` of `x [B, T]` (positions from 0) after its first `layers`
    /// layers: features of text for blocks that read it, such as a RETRO-fit's neighbour encoder.
    pub fn hidden_after(&self, x: &Tensor, layers: usize, kern: Kernels) -> Result<Tensor> {
        Ok(self.hiddens_after(x, &[layers], kern)?.remove(0))
    }

    /// [`LlamaBase::hidden_after`] at several depths in one pass: `depths` ascending, one
    /// `[B, T, d]` each.
    pub fn hiddens_after(
        &self,
        x: &Tensor,
        depths: &[usize],
        kern: Kernels,
    ) -> Result<Vec<Tensor>> {
        let (_, t) = x.dims2().map_err(|_| {
            ModelError::shape(
                "llama hidden",
                "x",
                "must be [B, T]",
                format!("{:?}", x.dims()),
            )
        })?;
        let deepest = depths.last().copied().unwrap_or(0);
        if t > self.rotary.positions()
            || deepest > self.layers.len()
            || depths.windows(2).any(|w| w[0] > w[1])
        {
            return Err(ModelError::shape(
                "llama hidden",
                "x",
                format!(
                    "must fit the context of {} positions, through at most {} layers (depths ascending)",
                    self.rotary.positions(),
                    self.layers.len()
                ),
                format!("{t} tokens through layers {depths:?}"),
            ));
        }
        let mut h = self.embed(x, "ret")?;
        let mut from = 0;
        let mut out = Vec::with_capacity(depths.len());
        for &to in depths {
            h = self.layers_through(
                h,
                from..to,
                kern,
                &mut |_, attn, x| attn.forward(x, 0, &self.rotary, None, kern),
                &mut |_, h| Ok(h),
            )?;
            out.push(h.clone());
            from = to;
        }
        Ok(out)
    }

    /// Token embeddings `[.., hidden_size]` of ids of any shape, checked against the vocabulary
    /// (`input` names them in the error).
    pub fn embed(&self, ids: &Tensor, input: &'static str) -> Result<Tensor> {
        let ids = self.ids(ids, input)?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.config.hidden_size);
        Ok(self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(dims)?)
    }

    fn ids(&self, x: &Tensor, input: &'static str) -> Result<Tensor> {
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::U32)?;
        let n = self.config.vocab_size;
        if let Some(&hi) = x
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&id| id as usize >= n)
        {
            return Err(ModelError::TokenOutOfRange {
                input,
                id: hi as u64,
                n_vocab: n,
            });
        }
        Ok(x.to_device(&self.device)?)
    }
}
