//! The block's written-out backward: the output projection's GEMMs, the attention backward
//! straight into the projections' gradient, the inverse rotation, the input projections' GEMMs and
//! LayerNorm's.

use super::op::{AttentionBlockOp, Saved};
use super::plan::{offsets, Kind};
use crate::cpu_storage::{contiguous, cpu, dispatch, FloatKernel};
use crate::float::Float;
use crate::fused_attention::backward_into;
use crate::fused_norm::pre_norm_bwd;
use crate::linear_op::linear_bwd;
use candle_core::{CpuStorage, Layout, Result, Tensor};
use std::any::Any;

impl AttentionBlockOp {
    /// `(dx, dctx, dpacked)`.
    fn bwd<T: Float>(
        &self,
        x: &[T],
        ctx: Option<&[T]>,
        p: &[T],
        trig: Option<(&[T], &[T])>,
        s: Saved<T>,
        dy: &[T],
    ) -> (Vec<T>, Option<Vec<T>>, Vec<T>) {
        let (d, da) = (self.d, self.da);
        let o_ = offsets(d, da);
        let w = &p[o_[2]..o_[3]];
        let wo = &p[o_[4]..o_[5]];
        let rows_x = x.len() / d;
        let (rows_q, rows_c) = self.rows(rows_x);
        let mut dp = vec![T::zero(); o_[6]];
        // The gradient of the output projection's rows (CCA: gathered from the shifted rows).
        let gathered;
        let dout: &[T] = match self.kind {
            Kind::Chunked { .. } => {
                gathered = self.gather(dy, rows_q);
                &gathered
            }
            _ => dy,
        };
        // The output projection's backward: do [rows_q, da].
        let (dwo, dbo) = dp[o_[4]..].split_at_mut(d * da);
        let d_o = linear_bwd(dout, &s.o, wo, (rows_q, d, da), dwo, dbo);
        // The attention backward, straight into the projections' gradient.
        let plan = self.plan(rows_x);
        let kv_src: &[T] = if self.kind.is_self() { &s.proj } else { &s.kv };
        let src = [&s.proj[..], kv_src, kv_src, &s.o, &d_o];
        let views = [plan.qkv[0], plan.qkv[1], plan.qkv[2], plan.o, plan.o];
        let dxq;
        let mut dctx = None;
        if self.kind.is_self() {
            let mut dqkv = vec![T::zero(); rows_q * 3 * da];
            // SAFETY: q, k and v of a row sit side by side in dqkv, each head's d_k columns once.
            unsafe { backward_into(src, &s.lse, views, plan.dims, &mut dqkv, plan.qkv) };
            if let Some(trig) = trig {
                self.rope(&mut dqkv, trig, true);
            }
            let (dw, db) = dp[o_[2]..o_[4]].split_at_mut(3 * da * d);
            dxq = linear_bwd(&dqkv, &s.xq, w, (rows_q, 3 * da, d), dw, db);
        } else {
            let ctx = ctx.expect("cross-attention has a context");
            // dq [rows_q, da] then dk, dv interleaved as [rows_c, 2 da], in one buffer.
            let mut buf = vec![T::zero(); rows_q * da + rows_c * 2 * da];
            let dst = [
                plan.qkv[0],
                plan.qkv[1].shifted(rows_q * da),
                plan.qkv[2].shifted(rows_q * da),
            ];
            // SAFETY: dq fills buf's first rows_q * da elements, dk and dv the halves of each row
            // of the [rows_c, 2 da] rest.
            unsafe { backward_into(src, &s.lse, views, plan.dims, &mut buf, dst) };
            let (dq, dkv) = buf.split_at(rows_q * da);
            let (dw, db) = dp[o_[2]..o_[4]].split_at_mut(3 * da * d);
            let (dw_q, dw_kv) = dw.split_at_mut(da * d);
            let (db_q, db_kv) = db.split_at_mut(da);
            let (w_q, w_kv) = w.split_at(da * d);
            dxq = linear_bwd(dq, &s.xq, w_q, (rows_q, da, d), dw_q, db_q);
            dctx = Some(linear_bwd(
                dkv,
                ctx,
                w_kv,
                (rows_c, 2 * da, d),
                dw_kv,
                db_kv,
            ));
        }
        // LayerNorm's backward (CCA: the query rows scattered back to x's rows), plus the residual.
        let dxn = match self.kind {
            Kind::Chunked { .. } => self.scatter(&dxq, rows_x),
            _ => dxq,
        };
        let dx = pre_norm_bwd(x, &p[o_[0]..o_[1]], &dxn, dy, d, self.eps, &mut dp[..o_[2]]);
        (dx, dctx, dp)
    }

    /// `(dx, dctx, dpacked)` as tensors.
    pub(super) fn backward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        p: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let saved = self.saved.lock().unwrap().take();
        let Some(saved) = saved else {
            candle_core::bail!("attention block: backward without a saved forward");
        };
        let dy = dy.contiguous()?;
        let (sx, lx) = x.storage_and_layout();
        let (sp, lp) = p.storage_and_layout();
        let (sg, lg) = dy.storage_and_layout();
        let sl_ctx = ctx.map(|c| c.storage_and_layout());
        let c = match (ctx, &sl_ctx) {
            (Some(c), Some((s, l))) => Some((c, cpu(s)?, *l)),
            _ => None,
        };
        let sx = cpu(&sx)?;
        dispatch(
            "attention block",
            sx,
            Backward {
                op: self,
                saved,
                x: (x, sx, lx),
                ctx: c,
                p: (p, cpu(&sp)?, lp),
                dy: (cpu(&sg)?, lg),
            },
        )
    }
}

/// The backward at one dtype, from the forward's `Saved<T>`: `(dx, dctx, dpacked)` shaped as
/// their tensors.
struct Backward<'a> {
    op: &'a AttentionBlockOp,
    saved: Box<dyn Any + Send + Sync>,
    x: (&'a Tensor, &'a CpuStorage, &'a Layout),
    ctx: Option<(&'a Tensor, &'a CpuStorage, &'a Layout)>,
    p: (&'a Tensor, &'a CpuStorage, &'a Layout),
    dy: (&'a CpuStorage, &'a Layout),
}

impl FloatKernel for Backward<'_> {
    type Output = (Tensor, Option<Tensor>, Tensor);
    fn run<T: Float>(self) -> Result<Self::Output> {
        let Ok(saved) = self.saved.downcast::<Saved<T>>() else {
            candle_core::bail!("attention block: saved forward of another dtype");
        };
        let (op, (x, sx, lx), (p, sp, lp)) = (self.op, self.x, self.p);
        let xs = contiguous::<T>(sx, lx)?;
        let ps = contiguous::<T>(sp, lp)?;
        let g = contiguous::<T>(self.dy.0, self.dy.1)?;
        let cs = match self.ctx {
            Some((_, s, l)) => Some(contiguous::<T>(s, l)?),
            None => None,
        };
        let (dx, dc, dp) = op.with_trig::<T, _>(|trig| Ok(op.bwd(xs, cs, ps, trig, *saved, g)))?;
        let dc = match (dc, self.ctx) {
            (Some(v), Some((c, _, _))) => Some(Tensor::from_vec(v, c.shape(), c.device())?),
            _ => None,
        };
        Ok((
            Tensor::from_vec(dx, x.shape(), x.device())?,
            dc,
            Tensor::from_vec(dp, p.shape(), p.device())?,
        ))
    }
}
