//! Reads a Llama-architecture GGUF file (llama.cpp's format): the config from its metadata, the
//! weights dequantised to f32 under Hugging Face's names, and the vocabulary for the tokenizer.
//!
//! GGUF stores the query and key projections with the rows of each head interleaved for
//! llama.cpp's pairwise RoPE (the converter's `permute`); they are put back in Hugging Face's
//! layout, so the rotate-half RoPE of [`super::blocks::Rotary`] applies and the weights read as
//! theirs.

use super::config::LlamaConfig;
use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The tokenizer as the GGUF file describes it (`tokenizer.ggml.*`).
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` is byte-level BPE.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name in llama.cpp (`smollm`, `gpt2`, ...).
    pub pre: String,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 3 control, 4 user-defined, 6 byte.
    pub token_types: Vec<i32>,
    /// `"left right"` pairs, in merge order.
    pub merges: Vec<String>,
    pub add_bos: bool,
}

/// What a GGUF file holds, read and converted.
#[derive(Debug)]
pub struct GgufImport {
    pub config: LlamaConfig,
    /// f32 tensors under Hugging Face's names ([`super::model::tensor_shapes`]).
    pub tensors: HashMap<String, Tensor>,
    pub vocab: GgufVocab,
    /// `general.name`, `general.license` and the like, as text.
    pub general: Vec<(String, String)>,
    /// GGML type of each source tensor (`Q4_1`, `Q8_0`, `F32`, ...), by Hugging Face name.
    pub source_types: HashMap<String, String>,
}

fn bad(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

/// Reads and converts a GGUF file of architecture `llama`.
pub fn import(path: &Path) -> Result<GgufImport> {
    let mut file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let content = Content::read(&mut file)
        .map_err(|e| bad(path, format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    let get = |key: &str| {
        md.get(key)
            .ok_or_else(|| bad(path, format!("GGUF metadata lacks `{key}`")))
    };
    let field = |key: &str, e: candle_core::Error| bad(path, format!("GGUF metadata `{key}`: {e}"));
    let uint = |key: &str| -> Result<usize> {
        let v = get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| field(key, e))
    };
    let float = |key: &str| -> Result<f64> {
        let v = get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| field(key, e))
    };
    let text =
        |key: &str| -> Result<String> { get(key)?.to_string().cloned().map_err(|e| field(key, e)) };
    let opt_id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let arch = text("general.architecture")?;
    if arch != "llama" {
        return Err(bad(
            path,
            format!("`general.architecture` is `{arch}`: only `llama` bases are supported"),
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        get(key)?
            .to_vec()
            .map_err(|e| field(key, e))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| field(key, e)))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let token_types = match md.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .to_vec()
            .map_err(|e| field("tokenizer.ggml.token_type", e))?
            .iter()
            .map(|v| {
                v.to_i32()
                    .map_err(|e| field("tokenizer.ggml.token_type", e))
            })
            .collect::<Result<_>>()?,
    };
    let vocab = GgufVocab {
        model: text("tokenizer.ggml.model")?,
        pre: md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".into()),
        merges: strings("tokenizer.ggml.merges")?,
        add_bos: md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        tokens,
        token_types,
    };
    let n_heads = uint("llama.attention.head_count")?;
    let embed_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad(path, "GGUF holds no `token_embd.weight`"))?;
    let config = LlamaConfig {
        vocab_size: embed_info.shape.dims()[0],
        hidden_size: uint("llama.embedding_length")?,
        intermediate_size: uint("llama.feed_forward_length")?,
        num_hidden_layers: uint("llama.block_count")?,
        num_attention_heads: n_heads,
        num_key_value_heads: md
            .get("llama.attention.head_count_kv")
            .map_or(Ok(n_heads), |_| uint("llama.attention.head_count_kv"))?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: md
            .get("llama.rope.freq_base")
            .map_or(Ok(10_000.0), |_| float("llama.rope.freq_base"))?,
        max_position_embeddings: uint("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: opt_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: opt_id("tokenizer.ggml.eos_token_id"),
    };
    config.validate().map_err(|e| bad(path, e.to_string()))?;
    if vocab.tokens.len() != config.vocab_size {
        return Err(bad(
            path,
            format!(
                "`tokenizer.ggml.tokens` lists {} tokens, the embedding has {} rows",
                vocab.tokens.len(),
                config.vocab_size
            ),
        ));
    }
    if let Some(rot) = md.get("llama.rope.dimension_count") {
        let rot = rot
            .to_u32()
            .map_err(|e| field("llama.rope.dimension_count", e))? as usize;
        if rot != config.head_dim() {
            return Err(bad(path, format!(
                "`llama.rope.dimension_count` = {rot}: partial rotary embeddings are not supported (head width {})",
                config.head_dim()
            )));
        }
    }
    if let Some(kind) = md
        .get("llama.rope.scaling.type")
        .and_then(|v| v.to_string().ok())
    {
        if kind != "none" {
            return Err(bad(
                path,
                format!("`llama.rope.scaling.type` = `{kind}` is not supported"),
            ));
        }
    }
    let mut tensors = HashMap::new();
    let mut source_types = HashMap::new();
    let kv = config.num_key_value_heads;
    for (hf, gg) in name_map(&config) {
        let q = content
            .tensor(&mut file, &gg, &Device::Cpu)
            .map_err(|e| bad(path, format!("tensor `{gg}`: {e}")))?;
        source_types.insert(hf.clone(), format!("{:?}", q.dtype()));
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(path, format!("tensor `{gg}`: {e}")))?;
        if gg.ends_with("attn_q.weight") {
            t = unpermute(&t, n_heads)?;
        } else if gg.ends_with("attn_k.weight") {
            t = unpermute(&t, kv)?;
        }
        tensors.insert(hf, t);
    }
    let general = {
        let mut g: Vec<(String, String)> = md
            .iter()
            .filter(|(k, _)| k.starts_with("general."))
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k.clone(), s.clone())),
                _ => None,
            })
            .collect();
        g.sort();
        g
    };
    Ok(GgufImport {
        config,
        tensors,
        vocab,
        general,
        source_types,
    })
}

/// Hugging Face name -> GGUF name of every tensor of the config.
fn name_map(c: &LlamaConfig) -> Vec<(String, String)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        "token_embd.weight".to_string(),
    )];
    for i in 0..c.num_hidden_layers {
        for (hf, gg) in [
            ("input_layernorm", "attn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            out.push((
                format!("model.layers.{i}.{hf}.weight"),
                format!("blk.{i}.{gg}.weight"),
            ));
        }
    }
    out.push(("model.norm.weight".into(), "output_norm.weight".into()));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), "output.weight".into()));
    }
    out
}

/// Undoes llama.cpp's `permute(w, n_head)`: within each head, GGUF row `2i + j` is Hugging
/// Face's row `j * head_dim / 2 + i`.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of the converter's `permute` (its Python, transcribed): reshape to
    /// `(n_head, 2, half, cols)`, swap axes 1 and 2.
    fn permute(w: &Tensor, n_head: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_the_converters_permute() {
        let w = Tensor::arange(0f32, 3.0 * 8.0 * 5.0, &Device::Cpu)
            .unwrap()
            .reshape((24, 5))
            .unwrap();
        let back = unpermute(&permute(&w, 3), 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Row 1 of a head in GGUF is Hugging Face's row `half` of that head (8 rows a head, so 4).
        let p = permute(&w, 3).to_vec2::<f32>().unwrap();
        assert_eq!(p[1], w.to_vec2::<f32>().unwrap()[4]);
    }
}
