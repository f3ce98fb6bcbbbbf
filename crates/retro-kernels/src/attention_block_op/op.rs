//! The candle glue: the op's state (its geometry, and what the forward keeps for the backward) and
//! the `CustomOp2` (self-attention) and `CustomOp3` (with a context) impls over it.

use super::plan::{offsets, Kind};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::any::Any;
use std::sync::Mutex;

/// The candle op: `x` (and the context), then the packed parameters, in; `x`'s shape out.
pub(super) struct AttentionBlockOp {
    pub(super) kind: Kind,
    pub(super) d: usize,
    /// `n_heads * d_k`.
    pub(super) da: usize,
    pub(super) heads: usize,
    pub(super) eps: f64,
    /// No backward will run: the forward keeps nothing and skips the log-sum-exp.
    pub(super) inference: bool,
    /// A `Saved<T>` from the forward, for the backward.
    pub(super) saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

/// What the backward needs from the forward.
pub(super) struct Saved<T> {
    /// The normed query rows, `[rows_q, d]` (CCA: shifted, zero rows past the end).
    pub(super) xq: Vec<T>,
    /// Self-attention: q (rotated), k (rotated), v as `[rows, 3 da]`; cross: q as `[rows_q, da]`.
    pub(super) proj: Vec<T>,
    /// Cross: k, v as `[rows_c, 2 da]`.
    pub(super) kv: Vec<T>,
    /// The attention output `[rows_q, da]` and its rows' log-sum-exp.
    pub(super) o: Vec<T>,
    pub(super) lse: Vec<T>,
}

impl AttentionBlockOp {
    /// The packed parameters have the length `d` and `da` give, and `x` rows of `d`.
    pub(super) fn check(&self, lx: &Layout, lp: &Layout) -> Result<()> {
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
