//! A BERT encoder over packed sequences, for inference on the CPU.
//!
//! The texts of a batch are concatenated row-wise (no padding, so no mask): every Linear is one
//! GEMM over all their tokens (bias and residual accumulated in place), attention runs per text with
//! the fused kernel, GELU is the vectorised exact one. It computes what candle-transformers'
//! `BertModel` computes (post-LayerNorm BERT, absolute positions, token type 0) from the same
//! weights; `bert.rs` checks both against the reference embeddings.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use retro_kernels::fused_attention::attention_heads;
use retro_kernels::gelu::gelu_erf;
use retro_kernels::layers::{LayerNorm, Linear};
use retro_kernels::Kernels;

/// `{name}.weight [out, inp]` and `{name}.bias [out]`.
fn dense(vb: &VarBuilder, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out, inp), &format!("{name}.weight"))?,
        vb.get(out, &format!("{name}.bias"))?,
    ))
}

fn norm(vb: &VarBuilder, name: &str, h: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(h, &format!("{name}.weight"))?,
        vb.get(h, &format!("{name}.bias"))?,
        eps,
    ))
}

/// Inference only: one GEMM with bias and residual accumulated in place.
const KERN: Kernels = Kernels::Fused;

struct Layer {
    /// Query (scaled by 1/sqrt(head_dim)), key and value projections as one.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// BERT's encoder stack with its embeddings; see the module docs.
pub struct PackedBert {
    word: Tensor,
    position: Tensor,
    /// Token type 0's embedding, `[1, hidden]`.
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
}

impl PackedBert {
    /// The weights of `BertModel` (with or without a `bert.` prefix), f32.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !h.is_multiple_of(heads) {
            candle_core::bail!("bert: hidden_size {h} is not a multiple of {heads} heads");
        }
        let head_dim = h / heads;
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let scale = 1.0 / (head_dim as f64).sqrt();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let part = |n: &str| dense(&l, &format!("attention.self.{n}"), h, h);
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                Ok(Layer {
                    qkv: Linear::new(
                        Tensor::cat(&[&(q.weight() * scale)?, k.weight(), v.weight()], 0)?,
                        Tensor::cat(&[&(q.bias() * scale)?, k.bias(), v.bias()], 0)?,
                    ),
                    attn_out: dense(&l, "attention.output.dense", h, h)?,
                    attn_norm: norm(&l, "attention.output.LayerNorm", h, eps)?,
                    inter: dense(&l, "intermediate.dense", config.intermediate_size, h)?,
                    out: dense(&l, "output.dense", h, config.intermediate_size)?,
                    out_norm: norm(&l, "output.LayerNorm", h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: e.get((config.vocab_size, h), "word_embeddings.weight")?,
            position: e.get(
                (config.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type: e
                .get((config.type_vocab_size, h), "token_type_embeddings.weight")?
                .narrow(0, 0, 1)?,
            emb_norm: norm(&e, "LayerNorm", h, eps)?,
            layers,
            heads,
            head_dim,
            act: config.hidden_act,
        })
    }

    /// The mean over each text's tokens of the last hidden state: `[texts, hidden]`. Each text is
    /// its token ids, special tokens included, unpadded; at most `max_position_embeddings` long.
    pub fn mean_pooled(&self, texts: &[Vec<u32>]) -> Result<Tensor> {
        let dev = self.word.device();
        let lens: Vec<usize> = texts.iter().map(Vec::len).collect();
        if lens.contains(&0) {
            candle_core::bail!("bert: an empty token sequence");
        }
        let max_pos = self.position.dim(0)?;
        if let Some(&l) = lens.iter().find(|&&l| l > max_pos) {
            candle_core::bail!("bert: {l} tokens exceed max_position_embeddings {max_pos}");
        }
        let ids: Vec<u32> = texts.concat();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, dev)?;
        let positions = Tensor::from_vec(positions, total, dev)?;
        let x = (self.word.index_select(&ids, 0)? + self.position.index_select(&positions, 0)?)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.emb_norm.forward(&x, KERN)?;
        for layer in &self.layers {
            let ctx = self.attention(&layer.qkv.forward_k(&x, None, KERN)?, &lens)?;
            let a = layer
                .attn_norm
                .forward(&layer.attn_out.forward_k(&ctx, Some(&x), KERN)?, KERN)?;
            let inter = layer.inter.forward_k(&a, None, KERN)?;
            let inter = match self.act {
                HiddenAct::Gelu => gelu_erf(&inter)?,
                HiddenAct::GeluApproximate => inter.gelu()?,
                HiddenAct::Relu => inter.relu()?,
            };
            x = layer
                .out_norm
                .forward(&layer.out.forward_k(&inter, Some(&a), KERN)?, KERN)?;
        }
        let mut start = 0;
        let pooled = lens
            .iter()
            .map(|&l| {
                let m = x.narrow(0, start, l)?.mean_keepdim(0);
                start += l;
                m
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&pooled, 0)
    }

    /// Bidirectional attention of each text over its own tokens: `qkv [total, 3 * hidden]`.
    fn attention(&self, qkv: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        let mut start = 0;
        let outs = lens
            .iter()
            .map(|&l| {
                let t = qkv.narrow(0, start, l)?.reshape((1, l, 3, h, d))?;
                start += l;
                let part = |i: usize| t.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
                attention_heads(&part(0)?, &part(1)?, &part(2)?, None, KERN)?.reshape((l, h * d))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }

    pub fn dtype(&self) -> DType {
        self.word.dtype()
    }
}
