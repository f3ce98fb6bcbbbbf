//! The candle `CustomOp3` glue: layouts in, the forward's log-sum-exp kept, gradients out.

use super::backward::{backward_cpu, Grads};
use super::forward::forward_cpu;
use super::layout::{Dims, View};
use crate::cpu_storage::{cpu, dispatch, FloatKernel};
use crate::float::Float;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// The candle op: inputs `[b, h, s, d]` (strided), output `[b, sq, h, d]`.
pub(crate) struct FusedAttention {
    causal: Option<usize>,
    /// Log-sum-exp per row `[b*h, sq]`, kept from the forward for the backward when training.
    lse: Option<Mutex<Option<CpuStorage>>>,
}

impl FusedAttention {
    pub(crate) fn new(causal: Option<usize>, save: bool) -> Self {
        Self {
            causal,
            lse: save.then(|| Mutex::new(None)),
        }
    }

    fn dims(&self, lq: &Layout, lk: &Layout) -> Dims {
        let q = lq.dims();
        Dims {
            nh: q[0] * q[1],
            heads: q[1],
            sq: q[2],
            sk: lk.dims()[2],
            d: q[3],
            causal: self.causal,
        }
    }
}

fn slice<T: Float>(s: &CpuStorage) -> Result<&[T]> {
    T::cpu_storage_as_slice(s)
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        for l in [l1, l2, l3] {
            if l.dims().len() != 4 || (l.dims()[3] > 1 && l.stride()[3] != 1) {
                candle_core::bail!("fused-attention: bad layout {l:?}");
            }
        }
        let dims = self.dims(l1, l2);
        let (vq, vk, vv) = (View::bhsd(l1), View::bhsd(l2), View::bhsd(l3));
        let want = self.lse.is_some();
        let (out, lse) = dispatch(
            "fused-attention",
            s1,
            Forward {
                s: [s1, s2, s3],
                views: [vq, vk, vv],
                dims,
                want_lse: want,
            },
        )?;
        if let Some(slot) = &self.lse {
            *slot.lock().unwrap() = Some(lse);
        }
        let q = l1.dims();
        Ok((out, Shape::from((q[0], q[2], q[1], q[3]))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.lse.as_ref().and_then(|s| s.lock().unwrap().take());
        let lse = match saved {
            Some(lse) => lse,
            None => {
                // Not saved (applied twice, or by hand): recompute the forward.
                let op = FusedAttention::new(self.causal, true);
                q.apply_op3_no_bwd(k, v, &op)?;
                let lse = op.lse.as_ref().and_then(|s| s.lock().unwrap().take());
                lse.ok_or_else(|| candle_core::Error::Msg("fused-attention: no lse".into()))?
            }
        };
        let go_t = grad_res.detach();
        let (sq_, lq) = q.storage_and_layout();
        let (sk_, lk) = k.storage_and_layout();
        let (sv_, lv) = v.storage_and_layout();
        let (so_, lo) = res.storage_and_layout();
        let (sg_, lg) = go_t.storage_and_layout();
        let (cq, ck, cv, co, cg) = (cpu(&sq_)?, cpu(&sk_)?, cpu(&sv_)?, cpu(&so_)?, cpu(&sg_)?);
        if lg.stride()[3] != 1 && lg.dims()[3] > 1 {
            candle_core::bail!("fused-attention: strided gradient");
        }
        let dims = self.dims(lq, lk);
        let views = [
            View::bhsd(lq),
            View::bhsd(lk),
            View::bhsd(lv),
            View::bshd(lo),
            View::bshd(lg),
        ];
        let (dq, dk, dv) = dispatch(
            "fused-attention",
            cq,
            Backward {
                c: [cq, ck, cv, co, cg, &lse],
                views,
                dims,
                b: lq.dims()[0],
                dev: q.device(),
            },
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The forward at one dtype: `(output, log-sum-exp)` storages.
struct Forward<'a> {
    s: [&'a CpuStorage; 3],
    views: [View; 3],
    dims: Dims,
    want_lse: bool,
}

impl FloatKernel for Forward<'_> {
    type Output = (CpuStorage, CpuStorage);
    fn run<T: Float>(self) -> Result<Self::Output> {
        let s = self.s;
        let (o, lse) = forward_cpu(
            [slice::<T>(s[0])?, slice::<T>(s[1])?, slice::<T>(s[2])?],
            self.views,
            self.dims,
            self.want_lse,
        );
        Ok((T::to_cpu_storage_owned(o), T::to_cpu_storage_owned(lse)))
    }
}

/// The backward at one dtype: dQ, dK, dV as `[b, h, s, d]` views of contiguous `[b, s, h, d]`
/// tensors, from q, k, v, o, dO and the log-sum-exp.
struct Backward<'a> {
    c: [&'a CpuStorage; 6],
    views: [View; 5],
    dims: Dims,
    b: usize,
    dev: &'a Device,
}

impl FloatKernel for Backward<'_> {
    type Output = (Tensor, Tensor, Tensor);
    fn run<T: Float>(self) -> Result<Self::Output> {
        let c = self.c;
        let src = [
            slice::<T>(c[0])?,
            slice::<T>(c[1])?,
            slice::<T>(c[2])?,
            slice::<T>(c[3])?,
            slice::<T>(c[4])?,
        ];
        let (dq, dk, dv): Grads<T> = backward_cpu(src, slice::<T>(c[5])?, self.views, self.dims);
        let Dims {
            heads, sq, sk, d, ..
        } = self.dims;
        let mk = |x: Vec<T>, s: usize| -> Result<Tensor> {
            Tensor::from_vec(x, (self.b, s, heads, d), self.dev)?.transpose(1, 2)
        };
        Ok((mk(dq, sq)?, mk(dk, sk)?, mk(dv, sk)?))
    }
}
