//! Chunked cross-attention (CCA): each input chunk attends to the encoded neighbours retrieved by the
//! chunk before it. The shift is done here, as in the reference: drop the first `chunk_len - 1`
//! positions, attend chunk-wise, shift back right by `chunk_len - 1` zero rows, truncate to T.

use crate::attention_block_op::Attend;
use crate::attention_params::{AttentionParams, CcaPositions};
use crate::config::RetroConfig;
use crate::kernels::Kernels;
use crate::llama::blocks::Rotary;
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};
use retro_kernels::ChunkSchedule;

#[derive(Debug, Clone)]
pub struct ChunkedCrossAttention {
    pub(crate) params: AttentionParams,
    pub(crate) chunk_len: usize,
    /// Rotary positions (a RETRO-fit's option, see [`CcaPositions`]); the labml CCA has none.
    pub(crate) rotary: Option<Rotary>,
    /// A learned scalar `g` (`{name}.gate`, a RETRO-fit's option): the output is multiplied by
    /// `tanh(GATE_GAIN * g)`, Flamingo's gated cross-attention; the labml CCA has none.
    pub(crate) gate: Option<Tensor>,
}

/// AdamW moves every parameter by about its learning rate per step, whatever its gradient's
/// size: a bare scalar gate would open by 0.1 in 100 steps at 1e-3. The gain lets it open in
/// tens of steps, as the projections it scales move.
pub(crate) const GATE_GAIN: f64 = 10.0;

impl ChunkedCrossAttention {
    pub(crate) fn new(pb: &mut ParamBuilder, name: &str, c: &RetroConfig) -> Result<Self> {
        Ok(Self {
            params: AttentionParams::new(pb, name, c)?,
            chunk_len: c.chunk_len,
            rotary: None,
            gate: None,
        })
    }

    /// The output of attention rows `att` (heads merged): the projection, times the gate if
    /// gated, times `keep` (`[b, 1, 1]` or broadcastable) if given, plus `residual` if given.
    pub(crate) fn output(
        &self,
        att: &Tensor,
        residual: Option<&Tensor>,
        keep: Option<&Tensor>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let out = &self.params.output;
        if self.gate.is_none() && keep.is_none() {
            return out.forward_k(att, residual, kern);
        }
        let mut y = out.forward_k(att, None, kern)?;
        if let Some(g) = &self.gate {
            y = y.broadcast_mul(&(g * GATE_GAIN)?.tanh()?)?;
        }
        if let Some(k) = keep {
            y = y.broadcast_mul(k)?;
        }
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// The positions of query rows from the `first_row`-th a chunk conditions, against
    /// neighbours of `neighbour_len` tokens (`None` without positions).
    pub(crate) fn positions(
        &self,
        neighbour_len: usize,
        first_row: usize,
    ) -> Option<CcaPositions<'_>> {
        self.rotary.as_ref().map(|rotary| CcaPositions {
            rotary,
            neighbour_len,
            first_row,
        })
    }

    /// `h [b, t, d_model]`, `e [b, c, k, n, d_model]` encoded neighbours with `c == t / chunk_len`.
    /// `keep [b, c]` (0 or 1, the model's dtype) gates each chunk's neighbours: where it is 0 the
    /// rows that chunk conditions get no CCA update, as in RETRO\[OFF\].
    pub fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        keep: Option<&Tensor>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (b, c, k, n, _) = e.dims5()?;
        if c == 0 {
            return Ok(h.clone());
        }
        // The fused block knows no positions and no gate.
        if keep.is_none() && self.rotary.is_none() && self.gate.is_none() {
            let attend = Attend::Chunked {
                ctx: e,
                chunk_len: self.chunk_len,
            };
            if let Some(y) = self.params.block(h, attend, kern)? {
                return Ok(y);
            }
        }
        let (_, t, _) = h.dims3()?;
        let p = &self.params;
        let cl = self.chunk_len;
        let shift = ChunkSchedule::new(cl).shift();
        let kept = t - shift;
        let x = p.norm.forward(&h.narrow(1, shift, kept)?, kern)?;
        // Zero rows after the norm so the queries split into c whole chunks (they land past T).
        let x = x.pad_with_zeros(1, 0, c * cl - kept)?;
        // Softmax jointly over all k * n neighbour positions.
        let out = p
            .attend(&x, e, (b * c, cl, k * n), self.positions(n, 0), kern)? // [b*c, cl, h, dk]
            .reshape((b, c * cl, p.n_heads * p.d_k))?;
        let out = self.output(&out.narrow(1, 0, kept)?, None, None, kern)?;
        let out = match keep {
            None => out,
            // After the output projection: its bias must not reach a gated row either.
            Some(keep) => {
                let d = out.dim(2)?;
                out.pad_with_zeros(1, 0, c * cl - kept)?
                    .reshape((b, c, cl, d))?
                    .broadcast_mul(&keep.reshape((b, c, 1, 1))?)?
                    .reshape((b, c * cl, d))?
                    .narrow(1, 0, kept)?
            }
        };
        out.pad_with_zeros(1, shift, 0)? + h
    }
}
