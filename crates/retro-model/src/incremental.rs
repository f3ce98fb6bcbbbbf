//! Incremental decoding with a KV cache: one token per [`RetroModel::step`], each computing exactly
//! the logits the full [`RetroModel::forward`] computes at that position.
//!
//! What a step at position `t` keeps so that the next one need not recompute the past:
//! - per decoder layer, the self-attention keys (after RoPE) and values of positions `0..=t`;
//! - the decoder's hidden rows at the first CCA layer for the chunk in progress: the neighbour encoder's
//!   cross-attention reads `norm_h(h[:, u*cl .. u*cl + cl])` there;
//! - the encoded neighbours `e[u]` (after `norm_e`) of every completed chunk u, and, per CCA layer, the
//!   keys and values projected from the chunk now being attended to.
//!
//! Retrieval follows the data flow of generation: the token at a position `t` with
//! `t % chunk_len == chunk_len - 1` completes chunk `u = t / chunk_len`, so the caller (who now knows that
//! chunk's tokens) retrieves its neighbours and passes them with that same step. They are encoded, once,
//! as soon as the hidden row of `t` exists at the first CCA layer, and condition position `t` itself and
//! the next chunk (the CCA's shift by `chunk_len - 1`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use retro_model::{RetroConfig, RetroModel};
//!
//! let config = RetroConfig {
//!     n_vocab: 11, d_model: 16, n_layers: 2, ca_layers: [1].into(), chunk_len: 4,
//!     n_heads: 2, d_k: 8, d_ff: 32, enc_n_layers: 1, enc_ca_layers: [0].into(),
//!     layer_norm_eps: 1e-5, rope_base: 10_000.0,
//! };
//! let model = RetroModel::new(&config, 42, DType::F32, &Device::Cpu)?;
//! let mut state = model.start_decoding(1, true);
//! let prompt = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu)?;   // one complete chunk + 1
//! let ret = Tensor::zeros((1, 1, 3, 8), DType::U32, &Device::Cpu)?; // its neighbours, K = 3, N = 8
//! let logits = model.prefill(&mut state, &prompt, Some(&ret))?;      // [1, 5, 11]
//! let next = logits.narrow(1, 4, 1)?.squeeze(1)?.argmax(1)?;         // [1]
//! let logits = model.step(&mut state, &next, None)?;                 // position 5: [1, 11]
//! assert_eq!(logits.dims(), &[1, 11]);
//! assert_eq!(state.position(), 6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::attention::KvCache;
use crate::cca::ChunkedCrossAttention;
use crate::error::{ModelError, Result};
use crate::hook::{LayerHook, NoHook};
use crate::kernels::Kernels;
use crate::model::RetroModel;
use crate::neighbour_block::NeighbourBlock;
use crate::rows::{ChunkEnd, RowDecode, RowsEngine};
use candle_core::{DType, Tensor};
use retro_kernels::ChunkSchedule;

const KERN: Kernels = Kernels::Fused;

/// Keys `[B, n_heads, d_k, K*N]` (transposed for the matmul) and values `[B, n_heads, K*N, d_k]` of one
/// CCA layer, projected from the encoded neighbours of chunk `u`.
#[derive(Debug, Clone)]
struct CcaKv {
    u: usize,
    k_t: Tensor,
    v: Tensor,
}

/// Which implementation a decoding state runs; both compute the same logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeEngine {
    /// The decoder over plain rows (`rows`): CPU, f32 and f64. The default there.
    Rows,
    /// The decoder as tensor ops, on any device and dtype.
    Tensors,
}

/// The decoding state of a batch of B sequences, all at the same position. It reads the model's
/// weights as they were when decoding started.
#[derive(Debug, Clone)]
pub struct DecodeState {
    batch: usize,
    /// Position of the next token.
    t: usize,
    retrieval: bool,
    /// `[B, 1, K, N, d_model]` encoded neighbours (after `norm_e`) of each completed chunk.
    e: Vec<Tensor>,
    engine: Engine,
}

#[derive(Debug, Clone)]
enum Engine {
    Tensors(TensorDecode),
    /// f32 or f64, behind one interface.
    Rows(Box<dyn RowsEngine>),
}

/// The tensor decoder's caches.
#[derive(Debug, Clone)]
struct TensorDecode {
    /// One self-attention cache per decoder layer.
    caches: Vec<KvCache>,
    /// `[B, 1, d_model]` hidden rows (after the self-attention of the first CCA layer) of the chunk in
    /// progress.
    chunk_h: Vec<Tensor>,
    /// `[B, 1, 1]` gate of each completed chunk's neighbours (`None`: all kept).
    keep: Vec<Option<Tensor>>,
    /// Per CCA layer, the projected keys and values of the chunk last attended to.
    cca_kv: Vec<Option<CcaKv>>,
}

impl DecodeState {
    /// Number of sequences decoded together.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Position of the next token (the number of tokens fed so far).
    pub fn position(&self) -> usize {
        self.t
    }
    /// Whether retrieval is on (off: RETRO\[OFF\], CCA and the encoder skipped).
    pub fn retrieval(&self) -> bool {
        self.retrieval
    }
    /// The implementation this state runs.
    pub fn engine(&self) -> DecodeEngine {
        match self.engine {
            Engine::Tensors(_) => DecodeEngine::Tensors,
            _ => DecodeEngine::Rows,
        }
    }
    /// Number of completed chunks whose neighbours are encoded.
    pub fn completed_chunks(&self) -> usize {
        self.e.len()
    }
    /// The encoded neighbours `[B, K, N, d_model]` (after `norm_e`) of completed chunk `u`.
    pub fn encoded_neighbours(&self, u: usize) -> Option<Tensor> {
        self.e.get(u).and_then(|e| e.squeeze(1).ok())
    }
    /// Numbers of decoder and CCA layers the state was made for.
    fn layout(&self) -> (usize, usize) {
        match &self.engine {
            Engine::Tensors(s) => (s.caches.len(), s.cca_kv.len()),
            Engine::Rows(r) => r.layout(),
        }
    }
    /// Positions held by the self-attention cache of decoder layer `p`.
    pub fn cached_positions(&self, p: usize) -> Option<usize> {
        match &self.engine {
            Engine::Tensors(s) => s.caches.get(p).map(KvCache::len),
            Engine::Rows(r) => r.cached(p),
        }
    }
}

impl RetroModel {
    /// A fresh decoding state for `batch` sequences starting at position 0. With `retrieval` off the
    /// steps compute RETRO\[OFF\] (what [`RetroModel::forward_without_retrieval`] computes). On the
    /// CPU in f32 or f64 it runs [`DecodeEngine::Rows`], elsewhere [`DecodeEngine::Tensors`].
    pub fn start_decoding(&self, batch: usize, retrieval: bool) -> DecodeState {
        self.start_decoding_with(batch, retrieval, DecodeEngine::Rows)
            .or_else(|_| self.start_decoding_with(batch, retrieval, DecodeEngine::Tensors))
            .expect("the tensor engine starts on every device")
    }

    /// [`RetroModel::start_decoding`] with the engine chosen: `Rows` off the CPU or in another
    /// dtype than f32 and f64 is an error.
    pub fn start_decoding_with(
        &self,
        batch: usize,
        retrieval: bool,
        engine: DecodeEngine,
    ) -> Result<DecodeState> {
        let engine = match (engine, self.device.is_cpu(), self.dtype) {
            (DecodeEngine::Tensors, ..) => Engine::Tensors(TensorDecode {
                caches: vec![KvCache::default(); self.config.n_layers],
                chunk_h: Vec::with_capacity(self.config.chunk_len),
                keep: Vec::new(),
                cca_kv: vec![None; self.config.ca_layers.len()],
            }),
            (DecodeEngine::Rows, true, DType::F32) => {
                Engine::Rows(Box::new(RowDecode::<f32>::new(self, batch)?))
            }
            (DecodeEngine::Rows, true, DType::F64) => {
                Engine::Rows(Box::new(RowDecode::<f64>::new(self, batch)?))
            }
            (DecodeEngine::Rows, ..) => {
                return Err(ModelError::shape(
                    "start_decoding",
                    "engine",
                    "Rows runs on the CPU in f32 or f64",
                    format!("{:?} on {:?}", self.dtype, self.device),
                ))
            }
        };
        Ok(DecodeState {
            batch,
            t: 0,
            retrieval,
            e: Vec::new(),
            engine,
        })
    }

    /// Feeds `tokens [B]` at position `state.position()` and returns that position's logits
    /// `[B, n_vocab]`. `neighbours [B, K, N]` are the ids retrieved for the chunk this token completes:
    /// required (with retrieval on) exactly when `t % chunk_len == chunk_len - 1`, an error otherwise.
    /// The state is left unchanged when a check fails.
    pub fn step(
        &self,
        state: &mut DecodeState,
        tokens: &Tensor,
        neighbours: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.step_gated(state, tokens, neighbours, None)
    }

    /// [`RetroModel::step`] with the neighbours of the completed chunk gated per row: `keep [B]` (0 or
    /// 1, any float dtype), passed with them. What [`RetroModel::forward_gated`] computes.
    pub fn step_gated(
        &self,
        state: &mut DecodeState,
        tokens: &Tensor,
        neighbours: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        crate::device::on_pool(&self.device, || {
            self.step_on(state, tokens, neighbours.map(Ids::Tensor), keep)
        })
    }

    /// [`RetroModel::step_gated`] with the neighbours as a block `[B, 1, K, N]`, as a retriever
    /// returns them: the rows engine reads their ids where they are, no tensor in between.
    pub fn step_block(
        &self,
        state: &mut DecodeState,
        tokens: &Tensor,
        neighbours: Option<&NeighbourBlock>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        crate::device::on_pool(&self.device, || {
            self.step_on(state, tokens, neighbours.map(Ids::Block), keep)
        })
    }

    fn step_on(
        &self,
        state: &mut DecodeState,
        tokens: &Tensor,
        neighbours: Option<Ids>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cl = self.config.chunk_len;
        let t = state.t;
        let b = state.batch;
        let (layers, cca_layers) = state.layout();
        if layers != self.config.n_layers || cca_layers != self.config.ca_layers.len() {
            return Err(ModelError::shape(
                format!("step at t = {t}"),
                "decode state",
                format!(
                    "must be made for this model ({} decoder layers, {} CCA layers)",
                    self.config.n_layers,
                    self.config.ca_layers.len()
                ),
                format!(
                    "one for {} decoder layers and {} CCA layers",
                    layers, cca_layers
                ),
            ));
        }
        match tokens.dims() {
            &[tb] if tb == b => {}
            d => {
                return Err(ModelError::shape(
                    format!("step at t = {t}"),
                    "tokens",
                    format!("must be [B] with B = {b}"),
                    format!("{d:?}"),
                ))
            }
        }
        let sched = ChunkSchedule::new(cl);
        let chunk_end = sched.completes(t).is_some();
        let neighbours = match (state.retrieval, chunk_end, neighbours) {
            (false, _, Some(n)) => {
                return Err(ModelError::shape(
                    format!("step at t = {t}"),
                    "neighbours",
                    "must be absent: retrieval is off for this decode state",
                    n.dims(),
                ))
            }
            (true, false, Some(n)) => {
                return Err(ModelError::shape(
                    format!("step at t = {t}"),
                    "neighbours",
                    format!(
                    "come with the last token of a chunk (t % chunk_len == {}, chunk_len = {cl}); \
                         t does not complete a chunk",
                    sched.shift()
                ),
                    n.dims(),
                ))
            }
            (true, true, None) => {
                return Err(ModelError::shape(
                    format!("step at t = {t}"),
                    "neighbours",
                    format!(
                        "of chunk {}, which this token completes, must come with it as [B, K, N] \
                         (retrieval is on)",
                        sched.complete_chunks(t)
                    ),
                    "none",
                ))
            }
            (true, true, Some(Ids::Tensor(n))) => match n.dims() {
                &[nb, k, nn] if nb == b && k > 0 && nn > 0 => Some(NeighbourBlock::from_tensor(
                    &self.ids(n, "neighbours")?.reshape((b, 1, k, nn))?,
                )?),
                d => {
                    return Err(ModelError::shape(
                        format!("step at t = {t}"),
                        "neighbours",
                        format!("must be [B, K, N] with B = {b} and K, N > 0"),
                        format!("{d:?}"),
                    ))
                }
            },
            (true, true, Some(Ids::Block(n))) => match n.shape() {
                [nb, 1, k, nn] if nb == b && k > 0 && nn > 0 => {
                    self.check_max_id("neighbours", n.max_id())?;
                    Some(n.clone())
                }
                d => {
                    return Err(ModelError::shape(
                        format!("step at t = {t}"),
                        "neighbours",
                        format!("must be a block [B, 1, K, N] with B = {b} and K, N > 0"),
                        format!("{d:?}"),
                    ))
                }
            },
            _ => None,
        };
        let keep = match (keep, &neighbours) {
            (None, _) => None,
            (Some(k), None) => {
                return Err(ModelError::shape(
                    format!("step at t = {t}"),
                    "keep",
                    "passed without neighbours must be absent (it gates them)",
                    format!("{:?}", k.dims()),
                ))
            }
            (Some(k), Some(_)) => {
                if k.dims() != [b] {
                    return Err(ModelError::shape(
                        format!("step at t = {t}"),
                        "keep",
                        format!("must be [B] with B = {b}"),
                        format!("{:?}", k.dims()),
                    ));
                }
                let k = self.check_keep(&format!("step at t = {t}"), &k.reshape((b, 1))?, b, 1)?;
                Some(k.reshape((b, 1, 1))?)
            }
        };
        let tokens = self.ids(tokens, "tokens")?;
        // The chunk this token completes, with its gate.
        let end = neighbours.map(|ret| ChunkEnd { ret, keep });
        let logits = match &mut state.engine {
            Engine::Tensors(st) => {
                self.tensor_step(st, &mut state.e, state.retrieval, t, &tokens, end)?
            }
            Engine::Rows(rd) => rd.feed(
                self,
                state.retrieval,
                &mut state.e,
                t,
                &tokens.to_vec1()?,
                end.as_slice(),
            )?,
        };
        state.t += 1;
        Ok(logits.reshape((b, self.config.n_vocab))?)
    }

    /// One step of the tensor engine: `tokens [B]` at position t, with the chunk it completes.
    fn tensor_step(
        &self,
        state: &mut TensorDecode,
        e: &mut Vec<Tensor>,
        retrieval: bool,
        t: usize,
        tokens: &Tensor,
        end: Option<ChunkEnd>,
    ) -> Result<Tensor> {
        let x = tokens.reshape((tokens.dim(0)?, 1))?;
        let TensorDecode {
            caches,
            chunk_h,
            keep,
            cca_kv,
        } = state;
        if !retrieval || self.config.ca_layers.is_empty() {
            return self.decoder_forward(&x, t, Some(caches), &mut NoHook, KERN);
        }
        let mut hook = CachedCca {
            model: self,
            t,
            end,
            chunk_h,
            keep,
            cca_kv,
            e,
        };
        self.decoder_forward(&x, t, Some(caches), &mut hook, KERN)
    }

    /// Feeds `x [B, P]` (positions `t0 .. t0 + P` with `t0 = state.position()`) one step at a time and
    /// returns the logits `[B, P, n_vocab]`. `ret [B, U, K, N]` holds the neighbours of the U chunks these
    /// tokens complete, in order (`U = P / chunk_len` from position 0); required with retrieval on when
    /// `U > 0`.
    pub fn prefill(
        &self,
        state: &mut DecodeState,
        x: &Tensor,
        ret: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t0 = state.t;
        let cl = self.config.chunk_len;
        let (b, p) = match x.dims() {
            &[xb, p] if xb == state.batch => (xb, p),
            d => {
                return Err(ModelError::shape(
                    format!("prefill at t = {t0}"),
                    "x",
                    format!("must be [B, P] with B = {}", state.batch),
                    format!("{d:?}"),
                ))
            }
        };
        let sched = ChunkSchedule::new(cl);
        let ends = sched.completed_between(t0, t0 + p).len();
        let ret = match (state.retrieval, ret) {
            (false, Some(r)) => {
                return Err(ModelError::shape(
                    format!("prefill at t = {t0}"),
                    "ret",
                    "must be absent: retrieval is off for this decode state",
                    format!("{:?}", r.dims()),
                ))
            }
            (true, None) if ends > 0 => {
                return Err(ModelError::shape(
                    format!("prefill at t = {t0}"),
                    "ret",
                    format!("must come with x, which completes {ends} chunk(s) (retrieval is on)"),
                    "none",
                ))
            }
            (true, Some(r)) => match r.dims() {
                &[rb, ru, k, n] if rb == b && ru == ends && (ends == 0 || (k > 0 && n > 0)) => {
                    Some(self.ids(r, "ret")?)
                }
                d => {
                    return Err(ModelError::shape(
                        format!("prefill at t = {t0}"),
                        "ret",
                        format!(
                        "must be [B, U, K, N] with B = {b} and U = {ends} (the chunks completed \
                             by positions {t0}..{})",
                        t0 + p
                    ),
                        format!("{d:?}"),
                    ))
                }
            },
            _ => None,
        };
        let x = self.ids(x, "x")?;
        if p == 0 {
            return Ok(Tensor::zeros(
                (b, 0, self.config.n_vocab),
                self.dtype,
                &self.device,
            )?);
        }
        // The rows engine feeds the whole prompt at once; the tensor engine one step at a time.
        let chunk_ends = || -> Result<Vec<ChunkEnd>> {
            match &ret {
                Some(r) => (0..ends)
                    .map(|j| {
                        Ok(ChunkEnd {
                            ret: NeighbourBlock::from_tensor(&r.narrow(1, j, 1)?)?,
                            keep: None,
                        })
                    })
                    .collect(),
                None => Ok(Vec::new()),
            }
        };
        let retrieval = state.retrieval;
        let logits = match &mut state.engine {
            Engine::Rows(rd) => rd.feed(
                self,
                retrieval,
                &mut state.e,
                t0,
                &x.flatten_all()?.to_vec1()?,
                &chunk_ends()?,
            )?,
            Engine::Tensors(_) => {
                let mut logits = Vec::with_capacity(p);
                let mut j = 0;
                for i in 0..p {
                    let neighbours = match &ret {
                        Some(r) if sched.completes(t0 + i).is_some() => {
                            j += 1;
                            Some(r.narrow(1, j - 1, 1)?.squeeze(1)?)
                        }
                        _ => None,
                    };
                    let tokens = x.narrow(1, i, 1)?.squeeze(1)?;
                    logits.push(self.step(state, &tokens, neighbours.as_ref())?);
                }
                return Ok(Tensor::stack(&logits, 1)?);
            }
        };
        state.t += p;
        Ok(logits)
    }
}

/// The tensor decoder's CCA for the row at position `t`: at the first CCA layer the row joins its
/// chunk's rows, and a chunk's last row encodes that chunk's neighbours (`end`); each CCA layer
/// then reads the neighbours of the chunk that conditions `t`, if any.
struct CachedCca<'a> {
    model: &'a RetroModel,
    t: usize,
    end: Option<ChunkEnd>,
    chunk_h: &'a mut Vec<Tensor>,
    keep: &'a mut Vec<Option<Tensor>>,
    cca_kv: &'a mut [Option<CcaKv>],
    e: &'a mut Vec<Tensor>,
}

impl LayerHook for CachedCca<'_> {
    fn after_attention(&mut self, layer: usize, h: Tensor, _offset: usize) -> Result<Tensor> {
        let model = self.model;
        let Some(i) = model.config.cca_index(layer) else {
            return Ok(h);
        };
        if i == 0 {
            self.chunk_h.push(h.clone());
            if let Some(end) = self.end.take() {
                let h_chunk = Tensor::cat(self.chunk_h, 1)?; // [B, cl, d]
                self.chunk_h.clear();
                self.e.push(model.encode_neighbours(
                    &end.ret.to_tensor(&model.device)?,
                    &h_chunk,
                    KERN,
                )?);
                self.keep.push(end.keep);
            }
        }
        match ChunkSchedule::new(model.config.chunk_len).conditioned_by(self.t) {
            Some(u) => cca_step(
                &model.cca[i],
                &mut self.cca_kv[i],
                &self.e[u],
                self.keep[u].as_ref(),
                u,
                &h,
            ),
            None => Ok(h),
        }
    }
}

/// The neighbours passed to a step: `[B, K, N]` ids as a tensor, or a block `[B, 1, K, N]`.
#[derive(Clone, Copy)]
enum Ids<'a> {
    Tensor(&'a Tensor),
    Block(&'a NeighbourBlock),
}

impl Ids<'_> {
    /// The shape, for error messages.
    fn dims(&self) -> String {
        match self {
            Ids::Tensor(t) => format!("{:?}", t.dims()),
            Ids::Block(b) => format!("{:?}", b.shape()),
        }
    }
}

/// CCA for the one new row `h [B, 1, d]`: queries from `cca.norm(h)`, keys and values from the encoded
/// neighbours `e [B, 1, K, N, d]` of chunk `u`, softmax jointly over the `K*N` positions, residual.
fn cca_step(
    cca: &ChunkedCrossAttention,
    kv: &mut Option<CcaKv>,
    e: &Tensor,
    keep: Option<&Tensor>,
    u: usize,
    h: &Tensor,
) -> Result<Tensor> {
    let (b, _, k, n, _) = e.dims5()?;
    let p = &cca.params;
    let (nh, dk) = (p.n_heads, p.d_k);
    if kv.as_ref().map(|c| c.u) != Some(u) {
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, k * n, nh, dk))?.transpose(1, 2)?.contiguous()
        };
        let kk = split(p.key.forward(e)?)?; // [B, nh, K*N, dk]
        let v = split(p.value.forward(e)?)?;
        *kv = Some(CcaKv {
            u,
            k_t: kk.t()?.contiguous()?,
            v,
        });
    }
    let CcaKv { k_t, v, .. } = kv.as_ref().expect("just set");
    let scale = 1.0 / (dk as f64).sqrt();
    let x = p.norm.forward(h, KERN)?;
    // [B, 1, nh*dk] -> [B, nh, 1, dk]: one row, so a reshape splits the heads.
    let q = (p.query.forward(&x)? * scale)?.reshape((b, nh, 1, dk))?;
    let attn = KERN.softmax(&q.matmul(k_t)?)?;
    let out = attn.matmul(v)?.reshape((b, 1, nh * dk))?;
    Ok(match keep {
        None => p.output.forward_k(&out, Some(h), KERN)?,
        Some(keep) => (p.output.forward_k(&out, None, KERN)?.broadcast_mul(keep)? + h)?,
    })
}
