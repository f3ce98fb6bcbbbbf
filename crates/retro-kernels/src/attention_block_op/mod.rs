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

use crate::cpu_storage::{contiguous, cpu};
use crate::float::Float;
use crate::fused_attention::{Dims, View};
use crate::fused_norm::{self as fnorm, rope_in_place};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::any::Any;
use std::sync::Mutex;

mod backward;
mod forward;

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
        saved: Mutex::new(None),
    };
    let x = x.contiguous()?;
    Ok(Some(match ctx {
        None => x.apply_op2(&packed, op)?,
        Some(ctx) => x.apply_op3(&ctx.contiguous()?, &packed, op)?,
    }))
}

impl Kind {
    fn is_self(&self) -> bool {
        matches!(self, Kind::SelfAttention { .. })
    }
}

enum Kind {
    SelfAttention {
        s: usize,
        causal: bool,
        cos: Tensor,
        sin: Tensor,
    },
    Cross {
        groups: usize,
        sq: usize,
        sk: usize,
    },
    Chunked {
        b: usize,
        t: usize,
        cl: usize,
        c: usize,
        sk: usize,
    },
}

struct AttentionBlockOp {
    kind: Kind,
    d: usize,
    /// `n_heads * d_k`.
    da: usize,
    heads: usize,
    eps: f64,
    /// A `Saved<T>` from the forward, for the backward.
    saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

/// What the backward needs from the forward.
struct Saved<T> {
    /// The normed query rows, `[rows_q, d]` (CCA: shifted, zero rows past the end).
    xq: Vec<T>,
    /// Self-attention: q (rotated), k (rotated), v as `[rows, 3 da]`; cross: q as `[rows_q, da]`.
    proj: Vec<T>,
    /// Cross: k, v as `[rows_c, 2 da]`.
    kv: Vec<T>,
    /// The attention output `[rows_q, da]` and its rows' log-sum-exp.
    o: Vec<T>,
    lse: Vec<T>,
}

/// Offsets of the packed parameters: norm w, norm b, `W_qkv [3 da, d]`, `b_qkv`, `W_o [d, da]`, `b_o`.
fn offsets(d: usize, da: usize) -> [usize; 7] {
    let mut o = [0; 7];
    for (i, len) in [d, d, 3 * da * d, 3 * da, d * da, d]
        .into_iter()
        .enumerate()
    {
        o[i + 1] = o[i] + len;
    }
    o
}

/// The attention's problem and where q, k, v, o and their gradients live.
struct Plan {
    dims: Dims,
    qkv: [View; 3],
    o: View,
}

impl AttentionBlockOp {
    fn dk(&self) -> usize {
        self.da / self.heads
    }

    /// `(groups, queries, keys)`: the attention runs per group (a sequence; a neighbour with its
    /// retrieving chunk; a chunk with its neighbours).
    fn groups(&self, rows_x: usize) -> (usize, usize, usize) {
        match self.kind {
            Kind::SelfAttention { s, .. } => (rows_x / s.max(1), s, s),
            Kind::Cross { groups, sq, sk } => (groups, sq, sk),
            Kind::Chunked { b, cl, c, sk, .. } => (b * c, cl, sk),
        }
    }

    /// Query rows and context rows.
    fn rows(&self, rows_x: usize) -> (usize, usize) {
        let (g, sq, sk) = self.groups(rows_x);
        (g * sq, g * sk)
    }

    fn plan(&self, rows_x: usize) -> Plan {
        let (da, dk, h) = (self.da, self.dk(), self.heads);
        let (g, sq, sk) = self.groups(rows_x);
        let (qkv, causal) = match self.kind {
            // q, k, v side by side in one projection [rows, 3 da].
            Kind::SelfAttention { causal, .. } => {
                let at = |off| View::new(off, sq * 3 * da, 3 * da, h, dk);
                ([at(0), at(da), at(2 * da)], causal.then_some(0))
            }
            // q [rows_q, da]; k, v side by side in [rows_c, 2 da].
            _ => {
                let kv = |off| View::new(off, sk * 2 * da, 2 * da, h, dk);
                ([View::new(0, sq * da, da, h, dk), kv(0), kv(da)], None)
            }
        };
        Plan {
            dims: Dims::new(g, h, (sq, sk, dk), causal),
            qkv,
            o: View::new(0, sq * da, da, h, dk),
        }
    }

    /// Rotates q and k of every row of `qkv [rows, 3 da]` (row r is position `r % s`).
    fn rope<T: Float>(&self, qkv: &mut [T], trig: (&[T], &[T]), inverse: bool) {
        let Kind::SelfAttention { s, .. } = self.kind else {
            return;
        };
        let (da, dk) = (self.da, self.dk());
        let half = dk / 2;
        qkv.par_chunks_mut(3 * da)
            .enumerate()
            .with_min_len(32)
            .for_each(|(r, row)| {
                let pos = r % s;
                let (c, sn) = (&trig.0[pos * half..][..half], &trig.1[pos * half..][..half]);
                for head in row[..2 * da].chunks_exact_mut(dk) {
                    rope_in_place(head, c, sn, inverse);
                }
            });
    }

    /// CCA: row `r` of chunk-major query rows `[b, c * cl]` reads x row `cl - 1 + r` of its batch
    /// (when that is before `t`). Calls `f(query row, x row)` for every such pair.
    fn chunk_rows(&self, mut f: impl FnMut(usize, usize)) {
        if let Kind::Chunked { b, t, cl, c, .. } = self.kind {
            for bi in 0..b {
                for r in 0..t + 1 - cl {
                    f(bi * c * cl + r, bi * t + cl - 1 + r);
                }
            }
        }
    }

    /// CCA: the query rows `[rows_q, d]` gathered from `x`-shaped rows (zero past the end).
    fn gather<T: Float>(&self, src: &[T], rows_q: usize) -> Vec<T> {
        let d = self.d;
        let mut out = vec![T::zero(); rows_q * d];
        self.chunk_rows(|q, r| out[q * d..(q + 1) * d].copy_from_slice(&src[r * d..(r + 1) * d]));
        out
    }

    /// CCA: query rows scattered back to `x`-shaped rows (zero for the first `chunk_len - 1`).
    fn scatter<T: Float>(&self, src: &[T], rows_x: usize) -> Vec<T> {
        let d = self.d;
        let mut out = vec![T::zero(); rows_x * d];
        self.chunk_rows(|q, r| out[r * d..(r + 1) * d].copy_from_slice(&src[q * d..(q + 1) * d]));
        out
    }

    /// The rotary tables as slices, when this is self-attention.
    fn with_trig<T: Float, R>(
        &self,
        f: impl FnOnce(Option<(&[T], &[T])>) -> Result<R>,
    ) -> Result<R> {
        let Kind::SelfAttention { cos, sin, .. } = &self.kind else {
            return f(None);
        };
        let (sc, lc) = cos.storage_and_layout();
        let (ss, ls) = sin.storage_and_layout();
        f(Some((
            contiguous::<T>(cpu(&sc)?, lc)?,
            contiguous::<T>(cpu(&ss)?, ls)?,
        )))
    }

    fn check(&self, lx: &Layout, lp: &Layout) -> Result<()> {
        if lp.dims() != [offsets(self.d, self.da)[6]] || lx.dims().last() != Some(&self.d) {
            candle_core::bail!("attention block: bad layouts {lx:?}, {lp:?}");
        }
        Ok(())
    }
}

impl CustomOp2 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((sx, lx), None, (sp, lp))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, _, dp) = self.backward(x, None, p, dy)?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "cross-attention-block"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((sx, lx), Some((sc, lc)), (sp, lp))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dc, dp) = self.backward(x, Some(ctx), p, dy)?;
        Ok((Some(dx), dc, Some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_diff, randn, rel_diff, seed};
    use candle_core::{DType, Device, Var, D};

    fn rand(shape: &[usize], dt: DType) -> Var {
        Var::from_tensor(&randn(shape, dt)).unwrap()
    }

    struct Block {
        vars: Vec<Var>,
        heads: usize,
    }

    impl Block {
        fn new(d: usize, heads: usize, dk: usize, dt: DType) -> Self {
            let da = heads * dk;
            let shapes: [&[usize]; 10] = [
                &[d],
                &[d],
                &[da, d],
                &[da],
                &[da, d],
                &[da],
                &[da, d],
                &[da],
                &[d, da],
                &[d],
            ];
            let vars = shapes.iter().map(|s| rand(s, dt)).collect();
            Self { vars, heads }
        }
        fn params(&self) -> AttentionBlockParams<'_> {
            let v = &self.vars;
            AttentionBlockParams {
                norm_w: &v[0],
                norm_b: &v[1],
                wq: &v[2],
                bq: &v[3],
                wk: &v[4],
                bk: &v[5],
                wv: &v[6],
                bv: &v[7],
                wo: &v[8],
                bo: &v[9],
                eps: 1e-5,
                n_heads: self.heads,
            }
        }
        fn lin(&self, x: &Tensor, i: usize) -> Tensor {
            let (w, b) = (&self.vars[i], &self.vars[i + 1]);
            x.broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(b)
                .unwrap()
        }
        fn norm(&self, x: &Tensor) -> Tensor {
            candle_nn::ops::layer_norm_slow(x, &self.vars[0], &self.vars[1], 1e-5).unwrap()
        }
        /// Plain attention of `q [g, sq, da]`, `k, v [g, sk, da]` over heads, from candle ops.
        fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
            let (g, sq, da) = q.dims3().unwrap();
            let sk = k.dim(1).unwrap();
            let dk = da / self.heads;
            let heads = |t: &Tensor, s: usize| {
                t.reshape((g, s, self.heads, dk))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (heads(q, sq), heads(k, sk), heads(v, sk));
            let mut s = (q.matmul(&k.t().unwrap()).unwrap() / (dk as f64).sqrt()).unwrap();
            if causal {
                let m: Vec<f64> = (0..sq * sk)
                    .map(|i| {
                        if i % sk <= i / sk {
                            0.0
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = Tensor::from_vec(m, (sq, sk), &Device::Cpu)
                    .unwrap()
                    .to_dtype(s.dtype())
                    .unwrap();
                s = s.broadcast_add(&m).unwrap();
            }
            let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
            p.matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((g, sq, da))
                .unwrap()
        }
    }

    /// Values and the gradients of `x`, `ctx` and every parameter agree with `want`.
    fn check(got: Tensor, want: Tensor, inputs: &[&Var], block: &Block, tol: f64, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        assert!(
            max_diff(&got, &want) < tol,
            "{what}: values {}",
            max_diff(&got, &want)
        );
        let up = randn(got.dims(), got.dtype());
        let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().copied().chain(&block.vars).enumerate() {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert_eq!(a.dims(), v.dims());
            // Relative to the gradient's scale: random unit weights make some gradients large.
            let diff = rel_diff(a, b);
            assert!(diff < tol, "{what}: gradient {i} {:?}: {diff}", v.dims());
        }
    }

    const TYPES: [(DType, f64); 2] = [(DType::F64, 1e-9), (DType::F32, 2e-3)];

    #[test]
    fn self_attention_equals_the_composition() {
        seed(1);
        let (g, s, d, heads, dk) = (3, 7, 8, 2, 4);
        for (dt, tol) in TYPES {
            let block = Block::new(d, heads, dk, dt);
            let x = rand(&[g, s, d], dt);
            let theta: Vec<f64> = (0..s * dk / 2).map(|i| 0.3 * i as f64).collect();
            let theta = Tensor::from_vec(theta, (s, dk / 2), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
            for causal in [false, true] {
                let attend = Attend::SelfAttention {
                    cos: &cos,
                    sin: &sin,
                    causal,
                };
                let got = attention_block(&x, attend, &block.params())
                    .unwrap()
                    .unwrap();
                let xn = block.norm(&x);
                let rope = |t: Tensor| {
                    let t = t.reshape((g, s, heads, dk)).unwrap();
                    crate::fused_norm::rope_bshd_slow(&t, &cos, &sin)
                        .unwrap()
                        .reshape((g, s, heads * dk))
                        .unwrap()
                };
                let (q, k) = (rope(block.lin(&xn, 2)), rope(block.lin(&xn, 4)));
                let o = block.attend(&q, &k, &block.lin(&xn, 6), causal);
                let want = (block.lin(&o, 8) + &*x).unwrap();
                check(
                    got,
                    want,
                    &[&x],
                    &block,
                    tol,
                    &format!("{dt:?} causal {causal}"),
                );
            }
        }
    }

    #[test]
    fn cross_attention_equals_the_composition() {
        seed(2);
        // x as the encoder has it, [b, c, k, n, d]; the context [b, c, chunk, d].
        let (b, c, k, n, cl, d, heads, dk) = (2, 3, 2, 4, 5, 8, 2, 4);
        for (dt, tol) in TYPES {
            let block = Block::new(d, heads, dk, dt);
            let x = rand(&[b, c, k, n, d], dt);
            let ctx = rand(&[b, c, cl, d], dt);
            let attend = Attend::Cross {
                ctx: &ctx,
                groups: b * c,
            };
            let got = attention_block(&x, attend, &block.params())
                .unwrap()
                .unwrap();
            let xn = block.norm(&x).reshape((b * c, k * n, d)).unwrap();
            let cg = ctx.reshape((b * c, cl, d)).unwrap();
            let o = block.attend(
                &block.lin(&xn, 2),
                &block.lin(&cg, 4),
                &block.lin(&cg, 6),
                false,
            );
            let want = (block.lin(&o, 8).reshape((b, c, k, n, d)).unwrap() + &*x).unwrap();
            check(got, want, &[&x, &ctx], &block, tol, &format!("{dt:?}"));
        }
    }

    #[test]
    fn chunked_cross_attention_equals_the_composition() {
        seed(3);
        let (b, cl, kn, d, heads, dk) = (2, 3, 4, 8, 2, 4);
        // t a multiple of the chunk, one more, and two more (the last chunk partly cut).
        for t in [6, 7, 8] {
            for (dt, tol) in TYPES {
                let c = t / cl;
                let block = Block::new(d, heads, dk, dt);
                let x = rand(&[b, t, d], dt);
                let e = rand(&[b, c, 2, kn / 2, d], dt);
                let attend = Attend::Chunked {
                    ctx: &e,
                    chunk_len: cl,
                };
                let got = attention_block(&x, attend, &block.params())
                    .unwrap()
                    .unwrap();
                // As the reference: drop cl - 1 rows, norm, pad, attend chunk-wise, shift back.
                let kept = t - (cl - 1);
                let xs = block
                    .norm(&x.narrow(1, cl - 1, kept).unwrap())
                    .pad_with_zeros(1, 0, c * cl - kept)
                    .unwrap()
                    .reshape((b * c, cl, d))
                    .unwrap();
                let eg = e.reshape((b * c, kn, d)).unwrap();
                let o = block
                    .attend(
                        &block.lin(&xs, 2),
                        &block.lin(&eg, 4),
                        &block.lin(&eg, 6),
                        false,
                    )
                    .reshape((b, c * cl, heads * dk))
                    .unwrap()
                    .narrow(1, 0, kept)
                    .unwrap();
                let want = (block.lin(&o, 8).pad_with_zeros(1, cl - 1, 0).unwrap() + &*x).unwrap();
                check(got, want, &[&x, &e], &block, tol, &format!("{dt:?} t {t}"));
            }
        }
    }

    #[test]
    fn a_context_that_does_not_split_is_an_error() {
        seed(4);
        let block = Block::new(8, 2, 4, DType::F32);
        let x = rand(&[2, 6, 8], DType::F32);
        let e = rand(&[2, 3, 4, 8], DType::F32); // 3 chunks' neighbours for t = 6, chunk 3: c = 2
        let err = attention_block(
            &x,
            Attend::Chunked {
                ctx: &e,
                chunk_len: 3,
            },
            &block.params(),
        );
        assert!(format!("{}", err.err().unwrap()).contains("chunk_len 3"));
        let err = attention_block(&x, Attend::Cross { ctx: &e, groups: 5 }, &block.params());
        assert!(format!("{}", err.err().unwrap()).contains("5 groups"));
    }
}
