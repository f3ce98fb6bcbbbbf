//! Evaluation on held-out documents: loss, perplexity and bits per byte with retrieval on, with
//! retrieval off (CCA skipped: RETRO\[OFF\]) and for a baseline model without retrieval.
//!
//! Retrieval is scored under two conditions (what the database may supply):
//! - *related*: anything but the scored document itself, found by content, never by id: exact and
//!   near copies (13-gram Jaccard similarity at least 0.8, [`crate::near_duplicates`]);
//! - *novel*: nor any document of the held-out set the caller names (every edition of a held-out play).
//!
//! Each scored chunk is also bucketed by its overlap with the neighbours that condition it (the
//! paper's section 2.6 and Fig. 6): the longest common token substring between the chunk and any of
//! those neighbours (chunk + continuation), as a fraction of `chunk_len`.
//!
//! When the retriever carries a gate ([`crate::gate`]), retrieval on is also scored through
//! it: a chunk's neighbours are read only where the gate keeps them.

use crate::error::{PipelineError, Result};
use crate::filter::Filter;
use crate::gate::{longest_common_substring, Gate};
use crate::retriever::{Neighbours, Retriever};
use candle_core::{DType, Tensor};
use retro_index::{Corpus, DatabaseId, DocumentId, LmTokenizer};
use retro_model::retrofit::RetroFitted;
use retro_model::RetroModel;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A model evaluation can score: the labml model, or a RETRO-fitted base.
pub trait Scorer: Sync {
    /// Logits `[B, T, vocab]` of `x [B, T]` with the neighbours `ret [B, C, K, N]` (None:
    /// RETRO\[OFF\]), gated by `keep [B, C]`.
    fn logits(&self, x: &Tensor, ret: Option<&Tensor>, keep: Option<&Tensor>) -> Result<Tensor>;
    /// Tokens per chunk (whether or not the model reads neighbours).
    fn chunk_len(&self) -> usize;
    /// Whether the model has blocks that read neighbours.
    fn reads_neighbours(&self) -> bool;
    fn device(&self) -> &candle_core::Device;
}

impl Scorer for RetroModel {
    fn logits(&self, x: &Tensor, ret: Option<&Tensor>, keep: Option<&Tensor>) -> Result<Tensor> {
        Ok(match (ret, keep) {
            (Some(r), Some(k)) => self.forward_gated(x, r, k)?,
            (Some(r), None) => self.forward(x, r)?,
            (None, _) => self.forward_without_retrieval(x)?,
        })
    }
    fn chunk_len(&self) -> usize {
        self.config().chunk_len
    }
    fn reads_neighbours(&self) -> bool {
        !self.config().ca_layers.is_empty()
    }
    fn device(&self) -> &candle_core::Device {
        RetroModel::device(self)
    }
}

impl Scorer for RetroFitted {
    fn logits(&self, x: &Tensor, ret: Option<&Tensor>, keep: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward(x, ret, keep)?)
    }
    fn chunk_len(&self) -> usize {
        RetroFitted::chunk_len(self)
    }
    fn reads_neighbours(&self) -> bool {
        true
    }
    fn device(&self) -> &candle_core::Device {
        self.base().device()
    }
}

/// The frozen base alone, as in-context retrieval runs it: neighbours go in its prompt.
impl Scorer for retro_model::llama::LlamaBase {
    fn logits(&self, x: &Tensor, _ret: Option<&Tensor>, _keep: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward(x, 0, None)?)
    }
    fn chunk_len(&self) -> usize {
        0
    }
    fn reads_neighbours(&self) -> bool {
        false
    }
    fn device(&self) -> &candle_core::Device {
        retro_model::llama::LlamaBase::device(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scores {
    /// Mean negative log-likelihood, nats per token.
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
}

/// What the database may supply while a held-out document is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// Everything but the scored document itself.
    Related,
    /// Nor any document of the held-out set.
    Novel,
}

impl Condition {
    pub fn name(self) -> &'static str {
        match self {
            Condition::Related => "related",
            Condition::Novel => "novel",
        }
    }
}

/// The overlap buckets' upper bounds (fractions of `chunk_len`, the last inclusive).
pub const OVERLAP_BOUNDS: [f64; 4] = [0.125, 0.25, 0.5, 1.0];

/// Scores of the chunks whose overlap with their neighbours falls in `[lo, hi)` (`hi` inclusive
/// for the last bucket). The first chunk of each window has no neighbours: `lo = hi = None`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OverlapBucket {
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub chunks: usize,
    pub tokens: usize,
    pub bytes: usize,
    pub on: Option<Scores>,
    /// Retrieval on through the retriever's gate.
    pub on_gated: Option<Scores>,
    pub off: Option<Scores>,
    pub baseline: Option<Scores>,
    /// The frozen base with the same neighbours in its prompt (in-context retrieval).
    pub in_context: Option<Scores>,
}

impl OverlapBucket {
    pub fn label(&self) -> String {
        match (self.lo, self.hi) {
            (Some(lo), Some(hi)) => format!("{:.1}-{:.1}%", lo * 100.0, hi * 100.0),
            _ => "first chunk (no neighbours)".into(),
        }
    }
}

/// Retrieval scored under one condition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConditionReport {
    pub condition: Condition,
    /// Database documents that never served as neighbours.
    pub excluded_documents: Vec<String>,
    pub on: Scores,
    /// Retrieval on through the retriever's gate, when it has one.
    pub gated: Option<GatedScores>,
    /// In-context retrieval: the base alone, each chunk's neighbours in its prompt.
    pub in_context: Option<Scores>,
    /// Scored tokens per second of model time, retrieval on (retrieval itself not counted).
    pub on_tokens_per_s: f64,
    /// The same for in-context retrieval.
    pub in_context_tokens_per_s: Option<f64>,
    pub overlap: Vec<OverlapBucket>,
}

/// Scores with each chunk's neighbours read only when the gate keeps them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GatedScores {
    pub gate: Gate,
    /// Retrieved chunks, and how many of them the gate kept.
    pub chunks: usize,
    pub kept_chunks: usize,
    pub on: Scores,
}

/// `bits_per_byte` of the three models, retrieval on under the first condition (related).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BitsPerByte {
    pub on: Option<f64>,
    /// Retrieval on through the gate (related condition).
    pub on_gated: Option<f64>,
    pub off: f64,
    pub baseline: Option<f64>,
    /// In-context retrieval (related condition).
    pub in_context: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub documents: usize,
    pub tokens: usize,
    /// UTF-8 bytes of the scored text itself (every token but each document's first).
    pub bytes: usize,
    /// Neighbours per chunk at evaluation.
    pub k: Option<usize>,
    pub database_id: Option<DatabaseId>,
    pub bits_per_byte: BitsPerByte,
    pub retrieval_off: Scores,
    pub baseline: Option<Scores>,
    pub conditions: Vec<ConditionReport>,
}

impl EvalReport {
    pub fn condition(&self, c: Condition) -> Option<&ConditionReport> {
        self.conditions.iter().find(|r| r.condition == c)
    }
}

/// What to score and what the database may not supply.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// Tokens per scored window.
    pub seq_len: usize,
    /// Score at most this many tokens.
    pub max_tokens: Option<usize>,
    /// Database documents of the held-out set (e.g. the dataset's held-out documents): excluded in the
    /// novel condition.
    pub held_out_set: HashSet<DocumentId>,
    /// Database documents the model was trained on: scoring one is an error unless allowed.
    pub training_documents: HashSet<DocumentId>,
    pub allow_training_documents: bool,
    /// Score the related condition only: for text whose neighbours the held-out set cannot
    /// supply, the novel condition would repeat it at the same cost.
    pub related_only: bool,
}

/// Windows of `seq_len + 1` tokens at stride `seq_len` over each document (the last may be shorter).
fn windows(n: usize, seq_len: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = vec![];
    let mut s = 0;
    while s + 1 < n {
        out.push(s..(s + seq_len + 1).min(n));
        s += seq_len;
    }
    out
}

/// Negative log-likelihood of each target `y [1, t]`.
fn nll(
    model: &dyn Scorer,
    x: &Tensor,
    y: &Tensor,
    ret: Option<&Tensor>,
    keep: Option<&Tensor>,
) -> Result<Vec<f64>> {
    nll_of(&model.logits(x, ret, keep)?, y)
}

/// Negative log-likelihood of each target `y [1, t]` under `logits [1, t, vocab]`.
fn nll_of(logits: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
    let (b, t, v) = logits.dims3()?;
    let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?.to_dtype(DType::F32)?, 1)?;
    let picked = lsm.gather(&y.reshape((b * t, 1))?, 1)?.flatten_all()?;
    Ok(picked
        .to_vec1::<f32>()?
        .into_iter()
        .map(|l| -(l as f64))
        .collect())
}

fn scores(nll: f64, tokens: usize, bytes: usize) -> Scores {
    let loss = nll / tokens.max(1) as f64;
    Scores {
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
    }
}

/// Index into the buckets: 0 for no neighbours, then one per [`OVERLAP_BOUNDS`] entry.
fn bucket_of(overlap: Option<f64>) -> usize {
    match overlap {
        None => 0,
        Some(f) => 1 + OVERLAP_BOUNDS.iter().position(|&hi| f < hi).unwrap_or(3),
    }
}

/// In-context retrieval (Ram et al. 2023, In-Context RALM) with the same neighbours RETRO reads:
/// the targets of chunk `u >= 1` of the window `ws` are scored by the frozen `base` with the
/// neighbours of chunk `u - 1` (chunk + continuation, farthest first, padding dropped) before the
/// window's text in its prompt; chunk 0's targets see none. One forward per chunk.
fn nll_in_context(
    base: &dyn Scorer,
    ws: &[u32],
    n: &Neighbours,
    cl: usize,
    pad: u32,
) -> Result<Vec<f64>> {
    let t = ws.len() - 1;
    let device = base.device();
    let mut out = Vec::with_capacity(t);
    let mut j0 = 1;
    for u in 0..=t / cl {
        let j1 = ((u + 1) * cl - 1).min(t); // the last target of chunk u
        if j1 < j0 {
            continue;
        }
        let prefix: Vec<u32> = if u == 0 {
            vec![]
        } else {
            n.values(u - 1)
                .into_iter()
                .rev()
                .flat_map(|v| v.iter().copied().filter(|&id| id != pad))
                .collect()
        };
        let l = prefix.len();
        let input: Vec<u32> = prefix.into_iter().chain(ws[..j1].iter().copied()).collect();
        let x = Tensor::from_vec(input, (1, l + j1), device)?;
        let logits = base
            .logits(&x, None, None)?
            .narrow(1, l + j0 - 1, j1 - j0 + 1)?;
        let y = Tensor::from_vec(ws[j0..=j1].to_vec(), (1, j1 - j0 + 1), device)?;
        out.extend(nll_of(&logits, &y)?);
        j0 = j1 + 1;
    }
    Ok(out)
}

/// Overlap buckets: chunks without neighbours, then one per [`OVERLAP_BOUNDS`] entry.
const BUCKETS: usize = OVERLAP_BOUNDS.len() + 1;

/// The bucket's bounds as reported: `None` for the chunks without neighbours.
fn bucket_bounds(b: usize) -> (Option<f64>, Option<f64>) {
    match b {
        0 => (None, None),
        b => (
            Some(if b == 1 { 0.0 } else { OVERLAP_BOUNDS[b - 2] }),
            Some(OVERLAP_BOUNDS[b - 1]),
        ),
    }
}

/// The chunk whose neighbours' bucket target `j` (1..=t of a window of `t` targets) is scored
/// in. The window's last target, alone in its chunk when `t` is a multiple of `cl` (the next
/// window starts with it), is read with the same neighbours as the chunk before: it belongs to
/// that chunk, not to a one-token chunk of its own.
fn chunk_of_target(j: usize, t: usize, cl: usize) -> usize {
    if j == t && t.is_multiple_of(cl) {
        j / cl - 1
    } else {
        j / cl
    }
}

/// One window's per-target negative log-likelihoods under each model scored.
struct WindowNll<'a> {
    on: &'a [f64],
    off: &'a [f64],
    gated: Option<&'a [f64]>,
    in_context: Option<&'a [f64]>,
    baseline: Option<&'a [f64]>,
}

/// Which models beside RETRO ON and OFF an evaluation scores.
#[derive(Clone, Copy)]
struct Scored {
    baseline: bool,
    in_context: bool,
    gate: Option<Gate>,
}

/// One condition's running totals: each model's summed negative log-likelihood and the chunks,
/// tokens and bytes per overlap bucket, the model time, and the gate's counts.
#[derive(Default)]
struct Tally {
    on: [f64; BUCKETS],
    gated: [f64; BUCKETS],
    in_context: [f64; BUCKETS],
    off: [f64; BUCKETS],
    baseline: [f64; BUCKETS],
    chunks: [usize; BUCKETS],
    tokens: [usize; BUCKETS],
    bytes: [usize; BUCKETS],
    on_time: Duration,
    in_context_time: Duration,
    /// Retrieved chunks, and those the gate kept.
    gate_chunks: usize,
    gate_kept: usize,
}

impl Tally {
    /// Adds target `j` (1-based in its window, `bytes` long) to `bucket`.
    fn add_target(&mut self, bucket: usize, j: usize, bytes: usize, nll: &WindowNll) {
        let i = j - 1;
        self.tokens[bucket] += 1;
        self.bytes[bucket] += bytes;
        self.on[bucket] += nll.on[i];
        self.off[bucket] += nll.off[i];
        let opt = |v: Option<&[f64]>| v.map_or(0.0, |v| v[i]);
        self.gated[bucket] += opt(nll.gated);
        self.in_context[bucket] += opt(nll.in_context);
        self.baseline[bucket] += opt(nll.baseline);
    }

    fn bucket(&self, b: usize, scored: Scored) -> OverlapBucket {
        let (tk, by) = (self.tokens[b], self.bytes[b]);
        let s = |v: f64| (tk > 0).then(|| scores(v, tk, by));
        let (lo, hi) = bucket_bounds(b);
        OverlapBucket {
            lo,
            hi,
            chunks: self.chunks[b],
            tokens: tk,
            bytes: by,
            on: s(self.on[b]),
            on_gated: scored.gate.and(s(self.gated[b])),
            off: s(self.off[b]),
            baseline: s(self.baseline[b]).filter(|_| scored.baseline),
            in_context: s(self.in_context[b]).filter(|_| scored.in_context),
        }
    }

    fn report(
        &self,
        condition: Condition,
        excluded_documents: Vec<String>,
        (tokens, bytes): (usize, usize),
        scored: Scored,
    ) -> ConditionReport {
        let total = |v: &[f64; BUCKETS]| scores(v.iter().sum(), tokens, bytes);
        let per_s = |d: Duration| tokens as f64 / d.as_secs_f64().max(1e-9);
        ConditionReport {
            condition,
            excluded_documents,
            on: total(&self.on),
            gated: scored.gate.map(|gate| GatedScores {
                gate,
                chunks: self.gate_chunks,
                kept_chunks: self.gate_kept,
                on: total(&self.gated),
            }),
            in_context: scored.in_context.then(|| total(&self.in_context)),
            on_tokens_per_s: per_s(self.on_time),
            in_context_tokens_per_s: scored.in_context.then(|| per_s(self.in_context_time)),
            overlap: (0..BUCKETS).map(|b| self.bucket(b, scored)).collect(),
        }
    }
}

/// The database documents that are the held-out documents' own text, exact or near copies. A
/// copy the model was trained on is an error unless allowed: scoring it measures memorisation.
fn own_copies(
    retriever: &Retriever,
    held_out: &Corpus,
    docs: &[(Vec<u32>, Vec<usize>)],
    opts: &EvalOptions,
) -> Result<HashSet<DocumentId>> {
    let store = retriever.database().store();
    let copies = crate::near_duplicates::NearDuplicates::new(
        (0..store.documents().len()).map(|d| (DocumentId(d), store.document_tokens(DocumentId(d)))),
    );
    let mut itself = HashSet::new();
    for (doc, (ids, _)) in held_out.documents.iter().zip(docs) {
        for (d, _) in copies.of(ids) {
            if opts.training_documents.contains(&d) && !opts.allow_training_documents {
                return Err(PipelineError::invalid(
                    "held-out data",
                    &doc.id,
                    format!(
                        "its text is the database document {:?}, which the model was trained \
                         on; scoring it measures memorisation (pass --allow-training-documents \
                         to do it anyway)",
                        store.document(d).id
                    ),
                ));
            }
            itself.insert(d);
        }
    }
    Ok(itself)
}

/// Scores `model` (and `baseline`) on `held_out`, up to `max_tokens` scored tokens, with retrieval
/// under both conditions when a retriever is given and the model has CCA layers.
///
/// `in_context`, when given, is scored with in-context retrieval beside (the frozen base of a
/// RETRO-fitted model: what a user of plain RAG would run instead).
pub fn evaluate(
    model: &dyn Scorer,
    baseline: Option<&dyn Scorer>,
    in_context: Option<&dyn Scorer>,
    retriever: Option<&Retriever>,
    tokenizer: &LmTokenizer,
    held_out: &Corpus,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let seq_len = opts.seq_len;
    if seq_len == 0 {
        return Err(PipelineError::invalid("seq_len", 0, "must be positive"));
    }
    let device = model.device();
    let retrieval = retriever.filter(|_| model.reads_neighbours());
    let docs = held_out
        .documents
        .iter()
        .map(|d| {
            tokenizer
                .encode_with_bytes(&d.text)
                .map_err(PipelineError::from)
        })
        .collect::<Result<Vec<_>>>()?;
    let itself = match retriever {
        Some(r) => own_copies(r, held_out, &docs, opts)?,
        None => HashSet::new(),
    };
    // Each condition with the documents its retriever may not return.
    let mut conditions: Vec<(Condition, HashSet<DocumentId>)> = vec![];
    if retrieval.is_some() {
        conditions.push((Condition::Related, itself.clone()));
        if !opts.related_only {
            let novel = itself.union(&opts.held_out_set).copied().collect();
            conditions.push((Condition::Novel, novel));
        }
    }
    let retrievers: Vec<Retriever> = match retrieval {
        Some(r) => conditions
            .iter()
            .map(|(_, ex)| r.clone().with_excluded_documents(ex.clone()))
            .collect(),
        None => vec![],
    };
    let cl = model.chunk_len();
    let mut tallies: Vec<Tally> = conditions.iter().map(|_| Tally::default()).collect();
    // RETRO[OFF] and the baseline over all the scored text (the same under every condition).
    let (mut off, mut base) = (0.0, 0.0);
    let (mut tokens, mut bytes) = (0usize, 0usize);
    'docs: for (ids, lens) in &docs {
        // Per condition: the neighbours of the window before, in this document (the coherent gate
        // reads them for a window's first chunk).
        let mut before: Vec<Option<Neighbours>> = vec![None; retrievers.len()];
        for w in windows(ids.len(), seq_len) {
            if max_tokens_reached(opts.max_tokens, tokens) {
                break 'docs;
            }
            let (ws, t) = (&ids[w.clone()], w.len() - 1);
            let wl = &lens[w.clone()];
            let x = Tensor::from_vec(ws[..t].to_vec(), (1, t), device)?;
            let y = Tensor::from_vec(ws[1..].to_vec(), (1, t), device)?;
            tokens += t;
            bytes += wl[1..].iter().sum::<usize>();
            let nll_off = nll(model, &x, &y, None, None)?;
            off += nll_off.iter().sum::<f64>();
            let nll_base = baseline.map(|b| nll(b, &x, &y, None, None)).transpose()?;
            base += nll_base.iter().flatten().sum::<f64>();
            for ((r, tally), before) in retrievers.iter().zip(&mut tallies).zip(&mut before) {
                let n =
                    r.retrieve_after(&[ws[..t].to_vec()], None, Filter::None, before.as_ref())?;
                let ret = n.to_tensor(device)?;
                let clock = Instant::now();
                let nll_on = nll(model, &x, &y, Some(&ret), None)?;
                tally.on_time += clock.elapsed();
                let clock = Instant::now();
                let nll_ctx = in_context
                    .map(|b| nll_in_context(b, ws, &n, cl, tokenizer.pad_id()))
                    .transpose()?;
                tally.in_context_time += clock.elapsed();
                let nll_gated = n
                    .keep_tensor(device)?
                    .map(|k| nll(model, &x, &y, Some(&ret), Some(&k)))
                    .transpose()?;
                if let Some(k) = &n.keep {
                    tally.gate_chunks += k.len();
                    tally.gate_kept += k.iter().filter(|&&v| v > 0.0).count();
                }
                let window = WindowNll {
                    on: &nll_on,
                    off: &nll_off,
                    gated: nll_gated.as_deref(),
                    in_context: nll_ctx.as_deref(),
                    baseline: nll_base.as_deref(),
                };
                // Chunk u's overlap with the neighbours of chunk u - 1, which condition it (the
                // CCA shift); chunk 0 has none.
                let overlap = |u: usize| -> Option<f64> {
                    if u == 0 || u > n.chunks() {
                        return None;
                    }
                    let chunk = &ws[u * cl..((u + 1) * cl).min(ws.len())];
                    let best = n
                        .values(u - 1)
                        .into_iter()
                        .map(|v| longest_common_substring(chunk, v))
                        .max()?;
                    Some(best as f64 / cl as f64)
                };
                let (mut last_u, mut bucket) = (usize::MAX, 0);
                for (j, &target_bytes) in wl.iter().enumerate().take(t + 1).skip(1) {
                    let u = chunk_of_target(j, t, cl);
                    if u != last_u {
                        bucket = bucket_of(overlap(u));
                        tally.chunks[bucket] += 1;
                        last_u = u;
                    }
                    tally.add_target(bucket, j, target_bytes, &window);
                }
                *before = Some(n);
            }
        }
    }
    if tokens == 0 {
        return Err(PipelineError::invalid(
            "held-out data",
            held_out.documents.len(),
            "no document has two tokens to score",
        ));
    }
    let store = retriever.map(|r| r.database().store());
    let names = |ex: &HashSet<DocumentId>| -> Vec<String> {
        let mut v: Vec<String> = ex
            .iter()
            .filter_map(|&d| store.map(|s| s.document(d).id.clone()))
            .collect();
        v.sort();
        v
    };
    let scored = Scored {
        baseline: baseline.is_some(),
        in_context: in_context.is_some(),
        gate: retrieval.and_then(|r| r.gate()),
    };
    let reports: Vec<ConditionReport> = conditions
        .iter()
        .zip(&tallies)
        .map(|((c, ex), tally)| tally.report(*c, names(ex), (tokens, bytes), scored))
        .collect();
    let retrieval_off = scores(off, tokens, bytes);
    let baseline = baseline.map(|_| scores(base, tokens, bytes));
    let related = reports.first();
    Ok(EvalReport {
        documents: held_out.documents.len(),
        tokens,
        bytes,
        k: retrieval.map(|r| r.k()),
        database_id: retrieval.map(|r| r.database().id().clone()),
        bits_per_byte: BitsPerByte {
            on: related.map(|r| r.on.bits_per_byte),
            on_gated: related
                .and_then(|r| r.gated.as_ref())
                .map(|g| g.on.bits_per_byte),
            off: retrieval_off.bits_per_byte,
            baseline: baseline.map(|s| s.bits_per_byte),
            in_context: related.and_then(|r| r.in_context).map(|s| s.bits_per_byte),
        },
        retrieval_off,
        baseline,
        conditions: reports,
    })
}

fn max_tokens_reached(max: Option<usize>, tokens: usize) -> bool {
    max.is_some_and(|m| tokens >= m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_at_the_bounds() {
        assert_eq!(bucket_of(None), 0);
        assert_eq!(bucket_of(Some(0.0)), 1);
        assert_eq!(bucket_of(Some(0.125)), 2);
        assert_eq!(bucket_of(Some(0.49)), 3);
        assert_eq!(bucket_of(Some(0.5)), 4);
        assert_eq!(bucket_of(Some(1.0)), 4);
    }

    #[test]
    fn a_windows_last_target_alone_in_its_chunk_joins_the_chunk_before() {
        // 128 targets, chunk 64: target 128 would open chunk 2 alone; it is scored in chunk 1.
        assert_eq!(chunk_of_target(1, 128, 64), 0);
        assert_eq!(chunk_of_target(63, 128, 64), 0);
        assert_eq!(chunk_of_target(64, 128, 64), 1);
        assert_eq!(chunk_of_target(127, 128, 64), 1);
        assert_eq!(chunk_of_target(128, 128, 64), 1);
        // A shorter last window ends inside its chunk: nothing moves.
        assert_eq!(chunk_of_target(100, 100, 64), 1);
        let chunks: HashSet<usize> = (1..=128).map(|j| chunk_of_target(j, 128, 64)).collect();
        assert_eq!(chunks.len(), 2);
    }

    #[test]
    fn bucket_bounds_follow_the_overlap_bounds() {
        assert_eq!(bucket_bounds(0), (None, None));
        assert_eq!(bucket_bounds(1), (Some(0.0), Some(0.125)));
        assert_eq!(bucket_bounds(4), (Some(0.5), Some(1.0)));
        for f in [0.0, 0.1, 0.125, 0.3, 0.5, 0.99, 1.0] {
            let (lo, hi) = bucket_bounds(bucket_of(Some(f)));
            assert!(lo.unwrap() <= f && f <= hi.unwrap(), "{f}");
        }
    }

    #[test]
    fn windows_cover_every_target_once() {
        let w = windows(10, 4);
        assert_eq!(w, vec![0..5, 4..9, 8..10]);
        let targets: usize = w.iter().map(|r| r.len() - 1).sum();
        assert_eq!(targets, 9);
    }
}
