//! A pre-norm attention block, `x + W_o attention(q, k, v) + b_o` with the queries from `LN(x)`, as
//! one differentiable op. It serves all three of RETRO's attentions: rotary self-attention (decoder,
//! causal; encoder, bidirectional), the encoder's cross-attention from each neighbour to the chunk
//! that retrieved it, and chunked cross-attention (CCA) from each chunk to its neighbours.
//!
//! Composed from candle ops a block is about ten autograd nodes (the norm, the projections, the
//! head views, the attention, the output projection, the residual), most of them activation-sized,
//! and candle's backward costs each a zero-fill and an add. Here the block is one node whose backward
//! is written out: the output projection's GEMMs, the attention backward written straight into the
//! projection's gradient, the inverse rotation, the input projections' GEMMs, LayerNorm's backward.
//!
//! Here the API and its checks; `plan.rs` the op's geometry and row moves, `forward.rs` and
//! `backward.rs` its two passes, `op.rs` the candle glue.

use crate::fused_norm as fnorm;
use candle_core::{Result, Tensor};
use op::AttentionBlockOp;
use plan::Kind;
use std::sync::Mutex;

mod backward;
mod forward;
mod op;
mod plan;
#[cfg(test)]
mod tests;

/// The block's parameters, PyTorch layouts (`w* [out, in]`). The query's are unscaled: the op
/// folds `1 / sqrt(d_k)` into them.
pub struct AttentionBlockParams<'a> {
    pub norm_w: &'a Tensor,
    pub norm_b: &'a Tensor,
    pub wq: &'a Tensor,
    pub bq: &'a Tensor,
    pub wk: &'a Tensor,
    pub bk: &'a Tensor,
    pub wv: &'a Tensor,
    pub bv: &'a Tensor,
    pub wo: &'a Tensor,
    pub bo: &'a Tensor,
    pub eps: f64,
    pub n_heads: usize,
}

/// What the queries attend to.
pub enum Attend<'a> {
    /// The rows of their own sequence (`x`'s second-to-last dim), keys and values from `LN(x)` too,
    /// q and k rotated by `cos, sin [>= s, d_k / 2]`; causal or bidirectional.
    SelfAttention {
        cos: &'a Tensor,
        sin: &'a Tensor,
        causal: bool,
    },
    /// `x`'s rows split into `groups` equal groups; each attends to the same group of `ctx`'s
    /// rows (keys and values from `ctx` as it is: the encoder normed it already).
    Cross { ctx: &'a Tensor, groups: usize },
    /// CCA: `x [b, t, d]`; `ctx [b, c, .., d]` the encoded neighbours of the `c = t / chunk_len`
    /// chunks. Query rows are shifted by `chunk_len - 1` (the last token of a chunk and the next
    /// chunk's first `chunk_len - 1` attend to that chunk's neighbours); the first `chunk_len - 1`
    /// rows get no attention.
    Chunked { ctx: &'a Tensor, chunk_len: usize },
}

/// The block on `x [.., d]`: `x + out(attention(..))`, same shape, differentiable in `x`, the
/// context and every parameter. f32/f64 on the CPU; `None` elsewhere (the caller composes it).
pub fn attention_block(
    x: &Tensor,
    attend: Attend<'_>,
    p: &AttentionBlockParams<'_>,
) -> Result<Option<Tensor>> {
    block(x, attend, p, false)
}

/// The same block for inference: one op with no backward, nothing kept for one, the rotary
/// embedding applied in place to the fused projection (the tensor composition wrote rotated
/// copies of q and k, 16 MiB per layer for the labml-small encoder) and no log-sum-exp. `None`
/// where [`attention_block`] is.
pub fn attention_block_inference(
    x: &Tensor,
    attend: Attend<'_>,
    p: &AttentionBlockParams<'_>,
) -> Result<Option<Tensor>> {
    block(x, attend, p, true)
}

fn block(
    x: &Tensor,
    attend: Attend<'_>,
    p: &AttentionBlockParams<'_>,
    inference: bool,
) -> Result<Option<Tensor>> {
    let (da, d) = p.wq.dims2()?;
    let heads = p.n_heads;
    let ctx = match &attend {
        Attend::SelfAttention { .. } => None,
        Attend::Cross { ctx, .. } | Attend::Chunked { ctx, .. } => Some(*ctx),
    };
    let params = [
        p.norm_w, p.norm_b, p.wq, p.bq, p.wk, p.bk, p.wv, p.bv, p.wo, p.bo,
    ];
    let ok = fnorm::cpu_ok(x)
        && x.rank() >= 2
        && x.dims().last() == Some(&d)
        && heads > 0
        && da.is_multiple_of(heads)
        && (da / heads).is_multiple_of(2)
        && params.iter().all(|t| t.dtype() == x.dtype())
        && ctx.is_none_or(|c| {
            c.dtype() == x.dtype()
                && c.device().same_device(x.device())
                && c.dims().last() == Some(&d)
        });
    if !ok {
        return Ok(None);
    }
    let rows = x.elem_count() / d;
    let kind = match attend {
        Attend::SelfAttention { cos, sin, causal } => {
            let s = x.dim(x.rank() - 2)?;
            Kind::SelfAttention {
                s,
                causal,
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
            }
        }
        Attend::Cross { ctx, groups } => {
            let rows_c = ctx.elem_count() / d;
            if groups == 0 || !rows.is_multiple_of(groups) || !rows_c.is_multiple_of(groups) {
                candle_core::bail!(
                    "attention block: {rows} query rows and {rows_c} context rows do not split into {groups} groups"
                );
            }
            Kind::Cross {
                groups,
                sq: rows / groups,
                sk: rows_c / groups,
            }
        }
        Attend::Chunked { ctx, chunk_len } => {
            let (b, t, _) = x.dims3()?;
            let c = t / chunk_len.max(1);
            let rows_c = ctx.elem_count() / d;
            if chunk_len == 0
                || c == 0
                || ctx.rank() < 3
                || ctx.dim(0)? != b
                || ctx.dim(1)? != c
                || !rows_c.is_multiple_of(b * c)
            {
                candle_core::bail!(
                    "attention block: CCA on x {:?} with chunk_len {chunk_len} cannot use neighbours {:?}",
                    x.dims(),
                    ctx.dims()
                );
            }
            Kind::Chunked {
                b,
                t,
                cl: chunk_len,
                c,
                sk: rows_c / (b * c),
            }
        }
    };
    if let Kind::SelfAttention { s, cos, sin, .. } = &kind {
        let need = [*s, da / heads / 2];
        if cos.dims2()?.0 < need[0] || cos.dims2()?.1 != need[1] || sin.dims() != cos.dims() {
            candle_core::bail!(
                "attention block: rotary tables {:?} do not cover {need:?}",
                cos.dims()
            );
        }
    }
    let scale = 1.0 / ((da / heads) as f64).sqrt();
    let packed = Tensor::cat(
        &[
            p.norm_w.clone(),
            p.norm_b.clone(),
            (p.wq * scale)?.flatten_all()?,
            p.wk.flatten_all()?,
            p.wv.flatten_all()?,
            (p.bq * scale)?,
            p.bk.clone(),
            p.bv.clone(),
            p.wo.flatten_all()?,
            p.bo.clone(),
        ],
        0,
    )?;
    let op = AttentionBlockOp {
        kind,
        d,
        da,
        heads,
        eps: p.eps,
        inference,
        saved: Mutex::new(None),
    };
    let x = x.contiguous()?;
    Ok(Some(match (ctx, inference) {
        (None, false) => x.apply_op2(&packed, op)?,
        (None, true) => x.apply_op2_no_bwd(&packed, &op)?,
        (Some(ctx), false) => x.apply_op3(&ctx.contiguous()?, &packed, op)?,
        (Some(ctx), true) => x.apply_op3_no_bwd(&ctx.contiguous()?, &packed, &op)?,
    }))
}
