//! Frozen BERT-family embedder loaded from a local Hugging Face directory: masked mean of the last
//! hidden state, L2-normalised when the model's modules.json says so. On the CPU it runs
//! [`PackedBert`] (no padding, fused kernels); elsewhere, or when asked, candle-transformers' BERT.

use crate::embed::{Embedder, EmbedderId};
use crate::error::{IndexError, Result};
use crate::packed_bert::PackedBert;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;

/// Options of [`BertEmbedder`].
#[derive(Debug, Clone)]
pub struct BertOptions {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Truncate inputs to this many tokens (special tokens included). `None`: the model's
    /// `sentence_bert_config.json` max_seq_length, else `min(max_position_embeddings, 512)`.
    pub max_len: Option<usize>,
    /// Run candle-transformers' `BertModel` (padded batches) even on the CPU, where
    /// [`PackedBert`] is the default.
    pub candle_transformers: bool,
}

impl Default for BertOptions {
    fn default() -> Self {
        Self {
            batch_size: 32,
            max_len: None,
            candle_transformers: false,
        }
    }
}

/// A frozen BERT encoder producing mean-pooled keys.
pub struct BertEmbedder {
    model: Engine,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    id: EmbedderId,
    normalize: bool,
    batch_size: usize,
    max_len: usize,
}

/// An encoding's ids without padding: the attention mask marks the real tokens (a prefix).
fn unpadded(enc: &tokenizers::Encoding) -> Vec<u32> {
    let n = enc.get_attention_mask().iter().filter(|&&m| m == 1).count();
    enc.get_ids()[..n].to_vec()
}

/// Which implementation runs the encoder.
enum Engine {
    Padded(BertModel),
    Packed(PackedBert),
}

fn e(path: &Path) -> impl Fn(candle_core::Error) -> IndexError + '_ {
    move |err| IndexError::Embedder(format!("{}: {err}", path.display()))
}

impl BertEmbedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, BertOptions::default())
    }

    pub fn load_with(dir: &Path, device: &Device, opts: BertOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(IndexError::missing(
                dir,
                "the embedder must be a BERT model directory (config.json, model.safetensors, \
                 tokenizer.json)",
            ));
        }
        let need = |f: &str| {
            let p = dir.join(f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(IndexError::missing(
                    p,
                    "a BERT model directory (a sentence-transformers folder: config.json, \
                     model.safetensors, tokenizer.json) is needed here",
                ))
            }
        };
        if opts.max_len == Some(0) {
            return Err(IndexError::invalid(
                "max_len",
                0,
                "must be at least 1 token (0 would give every chunk the same key)",
            ));
        }
        let config_path = need("config.json")?;
        let weights = need("model.safetensors")?;
        let tok_path = need("tokenizer.json")?;
        let config: Config = retro_format::read_json(&config_path)?;
        // sentence-transformers: a Normalize module means L2-normalised outputs.
        let normalize = match std::fs::read_to_string(dir.join("modules.json")) {
            Ok(s) => s.contains("sentence_transformers.models.Normalize"),
            Err(_) => false,
        };
        let st_max = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map(|m| m as usize);
        let max_len = opts
            .max_len
            .or(st_max)
            .unwrap_or(512)
            .min(config.max_position_embeddings)
            .max(2);
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|err| IndexError::Embedder(format!("{}: {err}", tok_path.display())))?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .unwrap_or(config.pad_token_id as u32);
        let pad_token = tokenizer
            .get_padding()
            .map(|p| p.pad_token.clone())
            .unwrap_or_else(|| "[PAD]".into());
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|err| IndexError::Embedder(format!("{}: {err}", tok_path.display())))?;
        // SAFETY: the weights file is only read; it must not be modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&weights),
                DType::F32,
                device,
            )
        }
        .map_err(e(&weights))?;
        let model = if matches!(device, Device::Cpu) && !opts.candle_transformers {
            Engine::Packed(PackedBert::load(vb, &config).map_err(e(&weights))?)
        } else {
            Engine::Padded(BertModel::load(vb, &config).map_err(e(&weights))?)
        };
        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bert".into());
        let id = EmbedderId {
            name: format!("bert:{name}"),
            weights_hash: retro_format::sha256_file(&weights)?,
            dim: config.hidden_size,
        };
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            id,
            normalize,
            batch_size: opts.batch_size.max(1),
            max_len,
        })
    }

    /// Token ids the model sees for a text (special tokens included, truncated, unpadded).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|err| IndexError::Embedder(err.to_string()))?;
        Ok(unpadded(&enc))
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let terr = |err: tokenizers::Error| IndexError::Embedder(err.to_string());
        let cerr = |err: candle_core::Error| IndexError::Embedder(err.to_string());
        let encs = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(terr)?;
        let model = match &self.model {
            Engine::Padded(model) => model,
            Engine::Packed(model) => {
                let ids: Vec<Vec<u32>> = encs.iter().map(unpadded).collect();
                let pooled = model.mean_pooled(&ids).map_err(cerr)?;
                return self.finish(pooled);
            }
        };
        let b = encs.len();
        let l = encs.first().map(|e| e.get_ids().len()).unwrap_or(0);
        let mut ids = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        for enc in &encs {
            ids.extend_from_slice(enc.get_ids());
            mask.extend_from_slice(enc.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (b, l), &self.device).map_err(cerr)?;
        let mask = Tensor::from_vec(mask, (b, l), &self.device).map_err(cerr)?;
        let types = ids.zeros_like().map_err(cerr)?;
        let hidden = model.forward(&ids, &types, Some(&mask)).map_err(cerr)?; // (b, l, h)
        let m = mask
            .to_dtype(DType::F32)
            .map_err(cerr)?
            .unsqueeze(2)
            .map_err(cerr)?;
        let summed = hidden
            .broadcast_mul(&m)
            .and_then(|x| x.sum(1))
            .map_err(cerr)?; // (b, h)
        let counts = m
            .sum(1)
            .and_then(|c| c.clamp(1e-9f32, f32::MAX))
            .map_err(cerr)?; // (b, 1)
        self.finish(summed.broadcast_div(&counts).map_err(cerr)?)
    }

    /// L2-normalises the pooled `[texts, hidden]` keys when the model says so; rows as vectors.
    fn finish(&self, mut pooled: Tensor) -> Result<Vec<Vec<f32>>> {
        let cerr = |err: candle_core::Error| IndexError::Embedder(err.to_string());
        if self.normalize {
            let norm = pooled
                .sqr()
                .and_then(|x| x.sum_keepdim(1))
                .and_then(|x| x.sqrt())
                .and_then(|x| x.clamp(1e-12f32, f32::MAX))
                .map_err(cerr)?;
            pooled = pooled.broadcast_div(&norm).map_err(cerr)?;
        }
        pooled
            .to_device(&Device::Cpu)
            .and_then(|p| p.to_vec2::<f32>())
            .map_err(cerr)
    }
}

impl Embedder for BertEmbedder {
    fn id(&self) -> EmbedderId {
        self.id.clone()
    }
    fn dim(&self) -> usize {
        self.id.dim
    }
    /// Batched; texts are grouped by length to limit padding, results come back in input order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        for group in order.chunks(self.batch_size) {
            let batch: Vec<&str> = group.iter().map(|&i| texts[i]).collect();
            for (&i, v) in group.iter().zip(self.embed_batch(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}
