//! The RETRO decoder: token embedding shared with the neighbours, causal self-attention layers, the
//! neighbour encoder run once before the first CCA layer, chunked cross-attention, feed-forward, `read`.

use crate::attention::{causal_mask, KvCache, SelfAttention};
use crate::cca::ChunkedCrossAttention;
use crate::config::RetroConfig;
use crate::encoder::NeighbourEncoder;
use crate::error::{ModelError, Result};
use crate::feed_forward::FeedForward;
use crate::hook::{LayerHook, NoHook};
use crate::kernels::Kernels;
use crate::layers::{LayerNorm, Linear};
use crate::params::ParamBuilder;
use crate::rope::{self, RopeTables};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// A RETRO model whose parameters live in a [`VarMap`] under the reference's `state_dict` names.
pub struct RetroModel {
    pub(crate) config: RetroConfig,
    pub(crate) varmap: VarMap,
    pub(crate) emb: Tensor,
    pub(crate) attn: Vec<SelfAttention>,
    pub(crate) cca: Vec<ChunkedCrossAttention>,
    pub(crate) ffw: Vec<FeedForward>,
    pub(crate) read: Linear,
    pub(crate) norm_e: LayerNorm,
    pub(crate) encoder: NeighbourEncoder,
    pub(crate) theta: Vec<f32>,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
}

impl RetroModel {
    /// A freshly initialised model (PyTorch's default initialisation, drawn from `seed`).
    pub fn new(config: &RetroConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let c = config;
        let varmap = VarMap::new();
        let mut pb = ParamBuilder::new(&varmap, seed, dtype, device);
        let (d, eps) = (c.d_model, c.layer_norm_eps);
        // Created in the reference's registration order, so a seed means the same thing everywhere.
        let encoder = NeighbourEncoder::new(&mut pb, "encoder", c)?;
        let emb = pb.embedding("emb", c.n_vocab, d)?;
        let cca = (0..c.ca_layers.len())
            .map(|i| ChunkedCrossAttention::new(&mut pb, &format!("cca.{i}"), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attn = (0..c.n_layers)
            .map(|p| SelfAttention::new(&mut pb, &format!("attn.{p}"), c, true))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ffw = (0..c.n_layers)
            .map(|p| FeedForward::new(&mut pb, &format!("ffw.{p}"), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let read = pb.linear("read", d, c.n_vocab)?;
        let norm_e = pb.layer_norm("norm_e", d, eps)?;
        Ok(Self {
            config: c.clone(),
            encoder,
            varmap,
            emb,
            attn,
            cca,
            ffw,
            read,
            norm_e,
            theta: rope::theta(c.d_k, c.rope_base),
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &RetroConfig {
        &self.config
    }
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `x [B, T]` token ids and `ret [B, C, K, N]` neighbour token ids (`C == T / chunk_len`) ->
    /// logits `[B, T, n_vocab]`. Inference kernels: no gradient flows.
    pub fn forward(&self, x: &Tensor, ret: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Some(ret), None, Kernels::Fused)
    }

    /// [`RetroModel::forward`] with the neighbours of each chunk gated: `keep [B, C]` (0 or 1, any
    /// float dtype). Where it is 0, the positions chunk u's neighbours would condition get no CCA
    /// update, as in RETRO\[OFF\]; all zeros computes RETRO\[OFF\], all ones [`RetroModel::forward`].
    /// The pipeline gates neighbours that are too far from their chunk to help.
    pub fn forward_gated(&self, x: &Tensor, ret: &Tensor, keep: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Some(ret), Some(keep), Kernels::Fused)
    }

    /// RETRO\[OFF\]: the same decoder with the encoder and every CCA skipped.
    pub fn forward_without_retrieval(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None, Kernels::Fused)
    }

    /// The forward for training: every op records its backward. `ret = None` skips retrieval.
    pub fn forward_train(&self, x: &Tensor, ret: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(x, ret, None, Kernels::Differentiable)
    }

    /// Checks `keep [B, C]` against `ret [B, C, K, N]` and returns it in the model's dtype.
    pub(crate) fn check_keep(&self, at: &str, keep: &Tensor, b: usize, c: usize) -> Result<Tensor> {
        keep_gate(at, keep, (b, c), self.dtype, &self.device)
    }
}

/// Checks a gate `keep [B, C]` (one 0 or 1 float per chunk) and returns it in `dtype` on `device`.
pub(crate) fn keep_gate(
    at: &str,
    keep: &Tensor,
    (b, c): (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if keep.dims() != [b, c] {
        return Err(ModelError::shape(
            at,
            "keep",
            format!("must be [B, C] = [{b}, {c}] (one gate per chunk)"),
            format!("{:?}", keep.dims()),
        ));
    }
    if !keep.dtype().is_float() {
        return Err(ModelError::shape(
            at,
            "keep",
            "must hold floats 0 or 1",
            format!("dtype {:?}", keep.dtype()),
        ));
    }
    Ok(keep.to_device(device)?.to_dtype(dtype)?)
}

impl RetroModel {
    /// Checks ids and shapes and returns `(x, ret)` as u32 ids on the model's device.
    pub(crate) fn check_inputs(
        &self,
        x: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = x.dims2().map_err(|_| {
            ModelError::shape("forward", "x", "must be [B, T]", format!("{:?}", x.dims()))
        })?;
        let x = self.ids(x, "x")?;
        let ret = match ret {
            None => None,
            Some(ret) => {
                let c = t / self.config.chunk_len;
                let ok = matches!(ret.dims(), &[rb, rc, rk, rn] if rb == b && rc == c && (c == 0 || (rk > 0 && rn > 0)));
                if !ok {
                    return Err(ModelError::shape(
                        "forward",
                        "ret",
                        format!(
                            "must be [B, C, K, N] with B = {b} and C = T / chunk_len = {t} / {} = {c}",
                            self.config.chunk_len
                        ),
                        format!("{:?} for x {:?}", ret.dims(), x.dims()),
                    ));
                }
                Some(self.ids(ret, "ret")?)
            }
        };
        Ok((x, ret))
    }

    pub(crate) fn ids(&self, t: &Tensor, input: &'static str) -> Result<Tensor> {
        let t = t.to_device(&self.device)?;
        if t.dtype() == DType::U32 && t.device().is_cpu() {
            // The common case (every decoding step): one pass over the ids, no tensor ops.
            self.check_max_id(input, t.flatten_all()?.to_vec1::<u32>()?.into_iter().max())?;
            return Ok(t);
        }
        if t.elem_count() > 0 {
            let flat = t.flatten_all()?.to_dtype(DType::I64)?;
            let (lo, hi) = (
                flat.min(0)?.to_scalar::<i64>()?,
                flat.max(0)?.to_scalar::<i64>()?,
            );
            if lo < 0 {
                return Err(ModelError::TokenOutOfRange {
                    input,
                    id: lo as u64,
                    n_vocab: self.config.n_vocab,
                });
            }
            self.check_max_id(input, Some(hi as u64))?;
        }
        Ok(t.to_dtype(DType::U32)?)
    }

    /// The largest id of `input` (none when it is empty) is below the vocabulary.
    pub(crate) fn check_max_id(
        &self,
        input: &'static str,
        hi: Option<impl Into<u64>>,
    ) -> Result<()> {
        match hi.map(Into::into) {
            Some(id) if id >= self.config.n_vocab as u64 => Err(ModelError::TokenOutOfRange {
                input,
                id,
                n_vocab: self.config.n_vocab,
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        dims.push(self.config.d_model);
        Ok(self.emb.index_select(&flat, 0)?.reshape(dims)?)
    }

    pub(crate) fn rope(&self, offset: usize, len: usize) -> Result<RopeTables> {
        Ok(RopeTables::new(
            &self.theta,
            offset,
            len,
            self.dtype,
            &self.device,
        )?)
    }

    /// Encodes the neighbours `ret [B, C, K, N]` conditioned on the decoder state `h` and applies
    /// `norm_e`: what every CCA layer attends to.
    pub(crate) fn encode_neighbours(
        &self,
        ret: &Tensor,
        h: &Tensor,
        kern: Kernels,
    ) -> Result<Tensor> {
        let n = ret.dim(3)?;
        let e = self.embed(ret)?;
        let e = self.encoder.forward(&e, h, &self.rope(0, n)?, kern)?;
        Ok(self.norm_e.forward(&e, kern)?)
    }

    fn forward_with(
        &self,
        x: &Tensor,
        ret: Option<&Tensor>,
        keep: Option<&Tensor>,
        kern: Kernels,
    ) -> Result<Tensor> {
        crate::device::on_pool(&self.device, || self.forward_on(x, ret, keep, kern))
    }

    fn forward_on(
        &self,
        x: &Tensor,
        ret: Option<&Tensor>,
        keep: Option<&Tensor>,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (x, ret) = self.check_inputs(x, ret)?;
        let (b, t) = x.dims2()?;
        let c = t / self.config.chunk_len;
        let keep = keep
            .map(|k| self.check_keep("forward", k, b, c))
            .transpose()?;
        // With no complete chunk there is nothing to attend to: CCA is the identity.
        match ret.filter(|_| c > 0 && !self.config.ca_layers.is_empty()) {
            None => self.decoder_forward(&x, 0, None, &mut NoHook, kern),
            Some(ret) => {
                let mut hook = Cca {
                    model: self,
                    ret: &ret,
                    keep: keep.as_ref(),
                    e: None,
                    kern,
                };
                self.decoder_forward(&x, 0, None, &mut hook, kern)
            }
        }
    }

    /// The decoder over the ids `x [B, P]` at positions `t0..t0 + P`: each layer's self-attention
    /// (reading the positions before `t0` from `caches`, one per layer, when given), then `hook`,
    /// then its feed-forward; returns the readout's logits `[B, P, n_vocab]`. The full forward,
    /// training and the tensor decoder all run this one; the CCA and the encoder come in through
    /// `hook` ([`Cca`] here, the cached one in `incremental.rs`). The rows engine is the CPU fast
    /// path beside it.
    pub(crate) fn decoder_forward(
        &self,
        x: &Tensor,
        t0: usize,
        mut caches: Option<&mut [KvCache]>,
        hook: &mut dyn LayerHook,
        kern: Kernels,
    ) -> Result<Tensor> {
        let p = x.dim(1)?;
        let mut h = self.embed(x)?;
        let rope = self.rope(t0, p)?;
        // One query row on a cache sees every cached key: no mask.
        let mask = (caches.is_none() || p > 1)
            .then(|| causal_mask(p, t0, self.dtype, &self.device))
            .transpose()?;
        for (layer, attn) in self.attn.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[layer]);
            h = attn.forward(&h, &rope, mask.as_ref(), cache, kern)?;
            h = hook.after_attention(layer, h, t0)?;
            h = self.ffw[layer].forward(&h, kern)?;
        }
        Ok(self.read.forward_k(&h, None, kern)?)
    }
}

/// The full forward's CCA: the neighbours `ret [B, C, K, N]` encoded at the first CCA layer
/// (conditioned on the decoder's rows there), then read by each CCA layer.
struct Cca<'a> {
    model: &'a RetroModel,
    ret: &'a Tensor,
    keep: Option<&'a Tensor>,
    e: Option<Tensor>,
    kern: Kernels,
}

impl LayerHook for Cca<'_> {
    fn after_attention(&mut self, layer: usize, h: Tensor, _offset: usize) -> Result<Tensor> {
        let model = self.model;
        let Some(i) = model.config.cca_index(layer) else {
            return Ok(h);
        };
        if self.e.is_none() {
            self.e = Some(model.encode_neighbours(self.ret, &h, self.kern)?);
        }
        let e = self.e.as_ref().expect("encoded above");
        Ok(model.cca[i].forward(&h, e, self.keep, self.kern)?)
    }
}
