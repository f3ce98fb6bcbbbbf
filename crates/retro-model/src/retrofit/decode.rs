//! Decoding a RETRO-fitted model on a KV cache: each call feeds the next tokens, computing
//! exactly the logits [`RetroFitted::forward`] computes at those positions.
//!
//! Beside the base's keys and values, the cache keeps the decoder's rows at the first CCA layer
//! for the chunk in progress (the encoder reads them) and the encoded neighbours of every
//! completed chunk (the CCA reads them). The caller retrieves a chunk's neighbours as soon as its
//! last token is known, and passes them with the call that feeds that token
//! ([`ChunkSchedule::completes`]).

use super::{Encoded, RetroFitted};
use crate::error::{ModelError, Result};
use crate::kernels::Kernels;
use crate::llama::{LayerHook, LlamaCache};
use candle_core::Tensor;
use retro_kernels::ChunkSchedule;

const KERN: Kernels = Kernels::Fused;

/// The decoding state of a batch of sequences, all at the same position.
#[derive(Debug, Clone)]
pub struct RetroFitCache {
    base: LlamaCache,
    retrieval: bool,
    /// `[B, rows, d]`: the first CCA layer's rows of the chunk in progress.
    chunk_h: Option<Tensor>,
    /// `[B, 1, K, N, d]` per completed chunk (one, or one per CCA): its encoded neighbours.
    e: Vec<Encoded>,
    /// `[B, 1, 1]` per completed chunk: its gate (`None`: every neighbour read).
    keep: Vec<Option<Tensor>>,
}

impl RetroFitCache {
    /// Position of the next token.
    pub fn position(&self) -> usize {
        self.base.position()
    }
    /// Whether the CCA reads neighbours (off: RETRO\[OFF\], the base alone).
    pub fn retrieval(&self) -> bool {
        self.retrieval
    }
    /// Number of chunks whose neighbours are encoded.
    pub fn encoded_chunks(&self) -> usize {
        self.e.len()
    }
}

impl RetroFitted {
    /// An empty decoding state; `retrieval` false decodes RETRO\[OFF\].
    pub fn new_cache(&self, retrieval: bool) -> RetroFitCache {
        RetroFitCache {
            base: self.base.new_cache(),
            retrieval,
            chunk_h: None,
            e: vec![],
            keep: vec![],
        }
    }

    /// Feeds `x [B, P]` at the cache's position and returns their logits `[B, P, vocab]`.
    /// `ret [B, U, K, N]` holds the neighbours of the `U` chunks these tokens complete, in order:
    /// required with retrieval on when `U > 0`, refused otherwise. `keep [B, U]` gates them as
    /// in [`RetroFitted::forward`] (0: that chunk's neighbours are not read).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut RetroFitCache,
        ret: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, p) = x.dims2().map_err(|_| {
            ModelError::shape(
                "retrofit decode",
                "x",
                "must be [B, P]",
                format!("{:?}", x.dims()),
            )
        })?;
        let t0 = cache.position();
        self.admit(cache, b, p, ret, keep)?;
        if !cache.retrieval {
            return self.base.forward_hooked(
                x,
                t0,
                Some(&mut cache.base),
                &mut crate::llama::NoHook,
                KERN,
            );
        }
        let RetroFitCache {
            base,
            chunk_h,
            e,
            keep: gates,
            ..
        } = cache;
        let mut hook = CachedCca {
            model: self,
            sched: ChunkSchedule::new(self.config.chunk_len),
            ret,
            chunk_h,
            e,
            keep: gates,
        };
        self.base.forward_hooked(x, t0, Some(base), &mut hook, KERN)
    }

    /// Checks a call feeding `p` tokens of `b` sequences at the cache's position, with the
    /// neighbours `ret` and gate `keep` of the chunks they complete, and records the gates.
    fn admit(
        &self,
        cache: &mut RetroFitCache,
        b: usize,
        p: usize,
        ret: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<()> {
        let t0 = cache.position();
        let sched = ChunkSchedule::new(self.config.chunk_len);
        let completed = sched.completed_between(t0, t0 + p);
        let at = || format!("retrofit decode at t = {t0}");
        match (cache.retrieval, ret) {
            (false, Some(_)) => {
                return Err(ModelError::shape(
                    at(),
                    "ret",
                    "must be None with retrieval off",
                    "neighbours",
                ))
            }
            (true, None) if !completed.is_empty() => {
                return Err(ModelError::shape(
                    at(),
                    "ret",
                    format!(
                        "must hold the neighbours of the {} chunk(s) these tokens complete",
                        completed.len()
                    ),
                    "None",
                ))
            }
            (true, Some(r)) if !matches!(r.dims(), &[rb, ru, rk, rn] if rb == b && ru == completed.len() && rk > 0 && rn > 0) => {
                return Err(ModelError::shape(
                    at(),
                    "ret",
                    format!(
                        "must be [B, U, K, N] with B = {b} and U = {} (the chunks completed)",
                        completed.len()
                    ),
                    format!("{:?}", r.dims()),
                ))
            }
            _ => {}
        }
        if let (Some(k), None) = (keep, ret) {
            return Err(ModelError::shape(
                at(),
                "keep",
                "must come with `ret`",
                format!("{:?}", k.dims()),
            ));
        }
        let keep = keep
            .map(|k| {
                let (dtype, device) = (self.base.dtype(), self.base.device());
                crate::model::keep_gate(&at(), k, (b, completed.len()), dtype, device)
            })
            .transpose()?;
        if cache.retrieval {
            for j in 0..completed.len() {
                cache.keep.push(
                    keep.as_ref()
                        .map(|k| k.narrow(1, j, 1)?.reshape((b, 1, 1)))
                        .transpose()?,
                );
            }
        }
        Ok(())
    }

    /// One token for each of several sequences, each on its own cache at its own position
    /// (continuous batching): `tokens[i]` with the neighbours `rets[i] [1, 1, K, N]` (and gate
    /// `keeps[i] [1, 1]`) of the chunk it completes, if any. The base's projections run once over
    /// the batch; the CCA per sequence. Returns the logits `[B, vocab]`: row `i` is what
    /// [`RetroFitted::forward_cached`] gives that token alone, up to the rounding of the batched
    /// projections.
    pub fn step_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut RetroFitCache],
        rets: &[Option<Tensor>],
        keeps: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let n = tokens.len();
        if caches.len() != n || rets.len() != n || keeps.len() != n {
            return Err(ModelError::shape(
                "retrofit step_batch",
                "caches",
                format!("must be one cache, one `ret` and one `keep` per token ({n})"),
                format!(
                    "{} caches, {} rets, {} keeps",
                    caches.len(),
                    rets.len(),
                    keeps.len()
                ),
            ));
        }
        for ((c, r), k) in caches.iter_mut().zip(rets).zip(keeps) {
            self.admit(c, 1, 1, r.as_ref(), k.as_ref())?;
        }
        let sched = ChunkSchedule::new(self.config.chunk_len);
        let mut bases = Vec::with_capacity(n);
        let mut ccas: Vec<Option<CachedCca>> = Vec::with_capacity(n);
        for (c, ret) in caches.iter_mut().zip(rets) {
            let RetroFitCache {
                base,
                retrieval,
                chunk_h,
                e,
                keep,
            } = &mut **c;
            bases.push(base);
            ccas.push(retrieval.then(|| CachedCca {
                model: self,
                sched,
                ret: ret.as_ref(),
                chunk_h,
                e,
                keep: &keep[..],
            }));
        }
        let mut none = vec![crate::llama::NoHook; n];
        let mut hooks: Vec<&mut dyn LayerHook> = ccas
            .iter_mut()
            .zip(none.iter_mut())
            .map(|(c, no)| match c {
                Some(c) => c as &mut dyn LayerHook,
                None => no as &mut dyn LayerHook,
            })
            .collect();
        self.base.step_batch(tokens, &mut bases, &mut hooks)
    }
}

/// The hook of a cached call: rows at positions `offset..offset + P`.
struct CachedCca<'a> {
    model: &'a RetroFitted,
    sched: ChunkSchedule,
    ret: Option<&'a Tensor>,
    chunk_h: &'a mut Option<Tensor>,
    e: &'a mut Vec<Encoded>,
    keep: &'a [Option<Tensor>],
}

impl CachedCca<'_> {
    /// Keeps the rows of the chunk in progress and encodes each chunk these rows complete.
    fn encode_completed(&mut self, h: &Tensor, offset: usize) -> Result<()> {
        let p = h.dim(1)?;
        let mut i = 0;
        let mut j = 0; // index into `ret`'s chunks
        while i < p {
            let t = offset + i;
            // Rows up to the end of t's chunk, or of the call.
            let end = ((t / self.sched.chunk_len() + 1) * self.sched.chunk_len() - offset).min(p);
            let rows = h.narrow(1, i, end - i)?;
            let acc = match self.chunk_h.take() {
                None => rows,
                Some(prev) => Tensor::cat(&[&prev, &rows], 1)?,
            };
            if let Some(u) = self.sched.completes(offset + end - 1) {
                let ret = self
                    .ret
                    .expect("checked: neighbours come with completed chunks");
                let r = ret.narrow(1, j, 1)?;
                let e = self.model.encode(&r, &acc, KERN)?;
                debug_assert_eq!(self.e.len(), u);
                self.e.push(e);
                j += 1;
            } else {
                *self.chunk_h = Some(acc);
            }
            i = end;
        }
        Ok(())
    }

    /// The CCA of layer `i` on rows `offset..offset + P`: each row reads the neighbours of the
    /// chunk that conditions it.
    fn cca(&self, i: usize, h: Tensor, offset: usize) -> Result<Tensor> {
        let p = h.dim(1)?;
        let params = &self.model.cca[i].params;
        let mut pieces = vec![];
        let mut r = 0;
        while r < p {
            let t = offset + r;
            let Some(u) = self.sched.conditioned_by(t) else {
                // Not conditioned yet: the rows before the first shift pass through.
                let end = (self.sched.shift() - offset).min(p);
                pieces.push(h.narrow(1, r, end - r)?);
                r = end;
                continue;
            };
            let conditioned = self.sched.conditioned_rows(u);
            let end = (conditioned.end - offset).min(p);
            let rows = h.narrow(1, r, end - r)?;
            let e = self.e[u].for_cca(i);
            let (b, _, k, n, d) = e.dims5()?;
            let x = params.norm.forward(&rows, KERN)?;
            let positions = self.model.cca[i].positions(n, t - conditioned.start);
            let att = params
                .attend(
                    &x,
                    &e.reshape((b, k * n, d))?,
                    (b, end - r, k * n),
                    positions,
                    KERN,
                )?
                .reshape((b, end - r, params.n_heads * params.d_k))?;
            let keep = self.keep[u].as_ref();
            pieces.push(self.model.cca[i].output(&att, Some(&rows), keep, KERN)?);
            r = end;
        }
        Ok(Tensor::cat(&pieces, 1)?)
    }
}

impl LayerHook for CachedCca<'_> {
    fn after_attention(&mut self, layer: usize, h: Tensor, offset: usize) -> Result<Tensor> {
        let Some(i) = self.model.blocks.cca_index(layer) else {
            return Ok(h);
        };
        if i == 0 {
            self.encode_completed(&h, offset)?;
        }
        self.cca(i, h, offset)
    }
}
