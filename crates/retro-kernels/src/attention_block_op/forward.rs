//! The block's forward: LayerNorm, the projections (rotated for self-attention), the attention,
//! the output projection and the residual; what the backward needs is kept.

use super::op::{AttentionBlockOp, Saved};
use super::plan::{offsets, Kind};
use crate::cpu_storage::{contiguous, dispatch, FloatKernel};
use crate::elementwise::add_in_place;
use crate::float::Float;
use crate::fused_attention::forward_cpu;
use crate::fused_norm::ln_fwd;
use crate::linear_op::affine;
use candle_core::{CpuStorage, Layout, Result, Shape};

impl AttentionBlockOp {
    fn fwd<T: Float>(
        &self,
        x: &[T],
        ctx: Option<&[T]>,
        p: &[T],
        trig: Option<(&[T], &[T])>,
    ) -> (Vec<T>, Saved<T>) {
        let (d, da) = (self.d, self.da);
        let o_ = offsets(d, da);
        let (w, bias) = (&p[o_[2]..o_[3]], &p[o_[3]..o_[4]]);
        let rows_x = x.len() / d;
        let (rows_q, rows_c) = self.rows(rows_x);
        let xn = ln_fwd(x, &p[o_[0]..o_[1]], &p[o_[1]..o_[2]], d, self.eps);
        let xq = match self.kind {
            Kind::Chunked { .. } => self.gather(&xn, rows_q),
            _ => xn,
        };
        let (proj, kv) = match (self.kind.is_self(), ctx) {
            (true, _) => {
                let mut qkv = affine(&xq, (rows_q, d), w, (3 * da, [d, 1]), bias, None);
                if let Some(trig) = trig {
                    self.rope(&mut qkv, trig, false);
                }
                (qkv, Vec::new())
            }
            (false, ctx) => {
                let ctx = ctx.expect("cross-attention has a context");
                let q = affine(
                    &xq,
                    (rows_q, d),
                    &w[..da * d],
                    (da, [d, 1]),
                    &bias[..da],
                    None,
                );
                let kv = affine(
                    ctx,
                    (rows_c, d),
                    &w[da * d..],
                    (2 * da, [d, 1]),
                    &bias[da..],
                    None,
                );
                (q, kv)
            }
        };
        let plan = self.plan(rows_x);
        let kv_src: &[T] = if self.kind.is_self() { &proj } else { &kv };
        let (o, lse) = forward_cpu(
            [&proj, kv_src, kv_src],
            plan.qkv,
            plan.dims,
            !self.inference,
        );
        let (wo, bo) = (&p[o_[4]..o_[5]], &p[o_[5]..o_[6]]);
        let y = match self.kind {
            Kind::Chunked { .. } => {
                // y = x, plus the projected attention on the shifted rows.
                let out = affine(&o, (rows_q, da), wo, (d, [da, 1]), bo, None);
                let mut y = self.scatter(&out, rows_x);
                add_in_place(&mut y, x);
                y
            }
            _ => affine(&o, (rows_q, da), wo, (d, [da, 1]), bo, Some(x)),
        };
        let saved = Saved {
            xq,
            proj,
            kv,
            o,
            lse,
        };
        (y, saved)
    }

    pub(super) fn cpu_forward(
        &self,
        (sx, lx): (&CpuStorage, &Layout),
        ctx: Option<(&CpuStorage, &Layout)>,
        (sp, lp): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        self.check(lx, lp)?;
        let y = dispatch(
            "attention block",
            sx,
            Forward {
                op: self,
                x: (sx, lx),
                ctx,
                p: (sp, lp),
            },
        )?;
        Ok((y, lx.shape().clone()))
    }
}

/// The forward at one dtype; keeps a `Saved<T>` for the backward.
struct Forward<'a> {
    op: &'a AttentionBlockOp,
    x: (&'a CpuStorage, &'a Layout),
    ctx: Option<(&'a CpuStorage, &'a Layout)>,
    p: (&'a CpuStorage, &'a Layout),
}

impl FloatKernel for Forward<'_> {
    type Output = CpuStorage;
    fn run<T: Float>(self) -> Result<CpuStorage> {
        let op = self.op;
        let x = contiguous::<T>(self.x.0, self.x.1)?;
        let c = self.ctx.map(|(s, l)| contiguous::<T>(s, l)).transpose()?;
        let p = contiguous::<T>(self.p.0, self.p.1)?;
        let (y, saved) = op.with_trig::<T, _>(|trig| Ok(op.fwd(x, c, p, trig)))?;
        if !op.inference {
            *op.saved.lock().unwrap() = Some(Box::new(saved));
        }
        Ok(T::to_cpu_storage_owned(y))
    }
}
