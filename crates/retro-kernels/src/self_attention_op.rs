//! Rotary self-attention straight from the fused q/k/v projection, as one autograd node.
//!
//! Taking q, k and v as three `narrow`s of the projection and roping two of them gave candle eight
//! nodes whose backward pads each part back to the projection's full size (zeros + cat) and
//! accumulates it (zeros + add). Here the forward runs on a detached copy of the graph's inputs and
//! one node maps the output gradient to the projection's gradient: the attention backward, the
//! inverse rotation of dq and dk, and one stack.

use crate::fused_attention::FusedAttention;
use crate::fused_norm::rope_bshd;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

/// `qkv [b, s, 3, h, d]` (q already scaled) -> `softmax(rope(q) rope(k)^T) v` as `[b, s, h, d]`,
/// causal when `causal` (with `seen` earlier keys: `Some(seen)`), differentiable in `qkv`; `cos, sin
/// [>= s, d/2]`. f32/f64 on the CPU; `None` elsewhere (the caller composes it).
pub fn self_attention_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    causal: Option<usize>,
) -> Result<Option<Tensor>> {
    let cpu = matches!(qkv.device(), Device::Cpu)
        && matches!(qkv.dtype(), DType::F32 | DType::F64)
        && qkv.rank() == 5
        && qkv.dim(2)? == 3;
    if !cpu {
        return Ok(None);
    }
    let det = qkv.detach();
    let part = |i: usize| det.narrow(2, i, 1)?.squeeze(2); // [b, s, h, d]
                                                           // [b, h, s, d] views, as the attention kernel takes them.
    let q = rope_bshd(&part(0)?, cos, sin)?.transpose(1, 2)?;
    let k = rope_bshd(&part(1)?, cos, sin)?.transpose(1, 2)?;
    let v = part(2)?.transpose(1, 2)?;
    let attn = FusedAttention::new(causal, true);
    let y = q.apply_op3_no_bwd(&k, &v, &attn)?; // [b, s, h, d], log-sum-exp kept in `attn`
    let op = QkvAttention {
        attn,
        q,
        k,
        v,
        cos: cos.clone(),
        sin_neg: sin.neg()?,
    };
    Ok(Some(qkv.apply_op2(&y, op)?))
}

struct QkvAttention {
    attn: FusedAttention,
    /// The roped, detached inputs of the forward (`[b, h, s, d]` views).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    /// `-sin`: rotating by `-theta` undoes the rotary embedding (its backward).
    sin_neg: Tensor,
}

impl CustomOp2 for QkvAttention {
    fn name(&self) -> &'static str {
        "rotary-self-attention-qkv"
    }

    /// The output was computed before the node was made: pass it through.
    fn cpu_fwd(
        &self,
        _qkv: &CpuStorage,
        _lq: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !ly.is_contiguous() || ly.start_offset() != 0 {
            candle_core::bail!("qkv-attention: the output must be contiguous");
        }
        Ok((y.clone(), ly.shape().clone()))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use candle_core::CustomOp3;
        let (dq, dk, dv) = self
            .attn
            .bwd(&self.q, &self.k, &self.v, y, &dy.contiguous()?)?;
        let missing = || candle_core::Error::Msg("qkv-attention: no gradient".into());
        let unrope = |g: Option<Tensor>| -> Result<Tensor> {
            rope_bshd(
                &g.ok_or_else(missing)?.transpose(1, 2)?,
                &self.cos,
                &self.sin_neg,
            )
        };
        let dv = dv.ok_or_else(missing)?.transpose(1, 2)?;
        let dqkv = Tensor::stack(&[unrope(dq)?, unrope(dk)?, dv], 2)?;
        debug_assert_eq!(dqkv.dims(), qkv.dims());
        Ok((Some(dqkv), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused_attention::attention_heads;
    use crate::testutil::max_diff;
    use crate::Kernels;
    use candle_core::Var;

    fn composed(qkv: &Tensor, cos: &Tensor, sin: &Tensor, causal: Option<usize>) -> Tensor {
        let part = |i: usize| qkv.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
        let q = crate::fused_norm::rope_bshd_slow(&part(0), cos, sin).unwrap();
        let k = crate::fused_norm::rope_bshd_slow(&part(1), cos, sin).unwrap();
        let t = |x: Tensor| x.transpose(1, 2).unwrap();
        attention_heads(&t(q), &t(k), &t(part(2)), causal, Kernels::Differentiable).unwrap()
    }

    #[test]
    fn values_and_gradient_equal_the_composition() {
        let dev = Device::Cpu;
        let (b, s, h, d) = (2, 9, 3, 8);
        for (dt, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let qkv = Var::from_tensor(
                &Tensor::randn(0f64, 1.0, (b, s, 3, h, d), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let theta: Vec<f64> = (0..s * d / 2).map(|i| 0.1 * i as f64).collect();
            let theta = Tensor::from_vec(theta, (s, d / 2), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
            for causal in [None, Some(0)] {
                let got = self_attention_qkv(&qkv, &cos, &sin, causal)
                    .unwrap()
                    .unwrap();
                let want = composed(&qkv, &cos, &sin, causal);
                assert!(max_diff(&got, &want) < tol, "{dt:?} {causal:?} values");
                let up = Tensor::randn(0f64, 1.0, (b, s, h, d), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let (a, c) = (g1.get(&qkv).unwrap(), g2.get(&qkv).unwrap());
                assert_eq!(a.dims(), qkv.dims());
                assert!(
                    max_diff(a, c) < tol,
                    "{dt:?} {causal:?} gradient: {}",
                    max_diff(a, c)
                );
            }
        }
    }
}
