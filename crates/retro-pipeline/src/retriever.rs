//! Input chunks in, the model's `ret [B, C, K, neighbour_len]` out: decode each complete chunk to text,
//! embed all of them in one batch, search the index (filtered, in parallel), gather each neighbour's
//! chunk + continuation from the store.

use crate::error::{PipelineError, Result};
use crate::filter::{Excluded, Filter, Origin};
use crate::gate::Gate;
use candle_core::{Device, Tensor};
use retro_index::{ChunkId, ChunkStore, Database, DocumentId, Embedder, LmTokenizer, Queries};
use retro_model::NeighbourBlock;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Neighbours of the chunks of a batch, nearest first.
#[derive(Debug, Clone)]
pub struct Neighbours {
    /// `[B, C, K, neighbour_len]` token ids (the store's padding where a neighbour is missing).
    pub tokens: NeighbourBlock,
    /// `[B, C, K]` database chunk ids; `None` where the database could not supply K (padded).
    pub chunk_ids: Vec<Option<ChunkId>>,
    /// `[B, C, K]` distances (`f32::INFINITY` for padding).
    pub distances: Vec<f32>,
    /// Neighbours that had to be padded.
    pub padded: usize,
    /// `[B, C]` the retriever's gate: 1 where a chunk's neighbours are to be read, 0 where they are
    /// too far to help; `None` without a gate (all read).
    pub keep: Option<Vec<f32>>,
    pub timings: Timings,
}

/// Where retrieval time went (for `retro bench pipeline`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    pub embed: Duration,
    pub search: Duration,
    pub gather: Duration,
}

impl Neighbours {
    /// The model's `ret` tensor `[B, C, K, neighbour_len]` (u32) on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(self.tokens.to_tensor(device)?)
    }

    /// `B`: rows.
    pub fn batch(&self) -> usize {
        self.tokens.batch()
    }
    /// `C`: chunks per row.
    pub fn chunks(&self) -> usize {
        self.tokens.chunks()
    }
    /// `K`: neighbours per chunk.
    pub fn k(&self) -> usize {
        self.tokens.k()
    }
    /// `N`: tokens per neighbour (chunk + continuation).
    pub fn neighbour_len(&self) -> usize {
        self.tokens.neighbour_len()
    }

    /// The values (chunk + continuation) of the non-padded neighbours of chunk `i` (of `B * C`).
    pub fn values(&self, i: usize) -> Vec<&[u32]> {
        let k = self.k();
        (0..k)
            .filter(|&j| self.chunk_ids[i * k + j].is_some())
            .map(|j| self.tokens.neighbour(i, j))
            .collect()
    }

    /// Whether a neighbour of chunk `i` (of `B * C`) follows, in the same document, a neighbour
    /// of one of the `lookback` chunks before it, by at most `max_step` chunks per chunk back.
    /// Before a row's first chunks come the last chunks of the same row of `before` (the
    /// neighbours of the text just before, when the caller has them).
    pub fn follows(
        &self,
        i: usize,
        store: &ChunkStore,
        before: Option<&Neighbours>,
        max_step: usize,
        lookback: usize,
    ) -> bool {
        fn ids(n: &Neighbours, j: usize) -> impl Iterator<Item = ChunkId> + '_ {
            n.chunk_ids[j * n.k()..(j + 1) * n.k()]
                .iter()
                .flatten()
                .copied()
        }
        let (row, u) = (i / self.chunks().max(1), i % self.chunks().max(1));
        let before = before.filter(|p| p.batch() == self.batch() && p.chunks() > 0);
        (1..=lookback).any(|lag| {
            let earlier: Vec<ChunkId> = if u >= lag {
                ids(self, i - lag).collect()
            } else {
                match before {
                    Some(p) if p.chunks() + u >= lag => {
                        ids(p, row * p.chunks() + p.chunks() + u - lag).collect()
                    }
                    _ => return false,
                }
            };
            ids(self, i).any(|a| {
                earlier.iter().any(|&b| {
                    a >= b
                        && a.0 - b.0 <= max_step * lag
                        && store.document_of(a) == store.document_of(b)
                })
            })
        })
    }

    /// These chunks' neighbours followed by `next`'s, row by row, keeping the last `keep` chunks
    /// of each row: the history a gate that looks back reads (generation retrieves one chunk at a
    /// time).
    pub fn followed_by(&self, next: &Neighbours, keep: usize) -> Result<Neighbours> {
        if (self.batch(), self.k(), self.neighbour_len())
            != (next.batch(), next.k(), next.neighbour_len())
        {
            return Err(PipelineError::invalid(
                "neighbours",
                format!(
                    "[{}, _, {}, {}]",
                    next.batch(),
                    next.k(),
                    next.neighbour_len()
                ),
                format!(
                    "must follow [{}, _, {}, {}] with the same B, K and neighbour_len",
                    self.batch(),
                    self.k(),
                    self.neighbour_len()
                ),
            ));
        }
        let chunks = (self.chunks() + next.chunks()).min(keep);
        // Each row's last `chunks` chunks of `a` (`ca` a row) then `b` (`cb`), `per` values a chunk.
        fn rows<T: Copy>(
            (a, ca): (&[T], usize),
            (b, cb): (&[T], usize),
            batch: usize,
            per: usize,
            chunks: usize,
        ) -> Vec<T> {
            (0..batch)
                .flat_map(|r| {
                    let row: Vec<T> = a[r * ca * per..(r + 1) * ca * per]
                        .iter()
                        .chain(&b[r * cb * per..(r + 1) * cb * per])
                        .copied()
                        .collect();
                    row[row.len() - chunks * per..].to_vec()
                })
                .collect()
        }
        let (ca, cb, b) = (self.chunks(), next.chunks(), self.batch());
        let chunk_ids = rows(
            (&self.chunk_ids, ca),
            (&next.chunk_ids, cb),
            b,
            self.k(),
            chunks,
        );
        let (k, n) = (self.k(), self.neighbour_len());
        let tokens = rows(
            (self.tokens.as_slice(), ca),
            (next.tokens.as_slice(), cb),
            b,
            k * n,
            chunks,
        );
        Ok(Neighbours {
            tokens: NeighbourBlock::new(tokens, [b, chunks, k, n])?,
            padded: chunk_ids.iter().filter(|c| c.is_none()).count(),
            chunk_ids,
            distances: rows(
                (&self.distances, ca),
                (&next.distances, cb),
                b,
                self.k(),
                chunks,
            ),
            keep: match (&self.keep, &next.keep) {
                (Some(x), Some(y)) => Some(rows((x, ca), (y, cb), b, 1, chunks)),
                _ => None,
            },
            timings: Timings::default(),
        })
    }

    /// `gate`'s keep for each of the `B * C` chunks, given their tokens in order.
    fn gate<'t>(
        &self,
        gate: &Gate,
        store: &ChunkStore,
        chunks: impl Iterator<Item = &'t [u32]>,
        before: Option<&Neighbours>,
    ) -> Vec<f32> {
        let k = self.k();
        chunks
            .enumerate()
            .map(|(i, chunk)| {
                let follows = match *gate {
                    Gate::Coherent { max_step, lookback } => {
                        self.follows(i, store, before, max_step, lookback)
                    }
                    _ => false,
                };
                gate.keep(
                    chunk,
                    &self.values(i),
                    &self.distances[i * k..(i + 1) * k],
                    follows,
                )
            })
            .collect()
    }

    /// The gate `keep [B, C]` (f32) on `device`, when the retriever has one.
    pub fn keep_tensor(&self, device: &Device) -> Result<Option<Tensor>> {
        self.keep
            .as_ref()
            .map(|k| {
                Ok(Tensor::from_vec(
                    k.clone(),
                    (self.batch(), self.chunks()),
                    device,
                )?)
            })
            .transpose()
    }
}

/// What a [`Retriever`] reads text with: the database's own embedder and LM tokenizer.
#[derive(Clone, Copy)]
pub struct Text<'a> {
    embedder: &'a dyn Embedder,
    tokenizer: &'a LmTokenizer,
}

/// A retriever over precomputed keys only ([`Retriever::for_keys`]): it searches keys, and has
/// no [`Retriever::retrieve`], which needs text.
#[derive(Clone, Copy, Debug)]
pub struct KeysOnly;

/// Fetches the K nearest neighbours (+ continuations) of every complete chunk of its input.
/// `T` is [`Text`] (the default: it embeds chunks of text) or [`KeysOnly`].
#[derive(Clone)]
pub struct Retriever<'a, T = Text<'a>> {
    db: &'a Database,
    text: T,
    k: usize,
    neighbour_len: usize,
    ef: Option<usize>,
    excluded: Excluded,
    gate: Option<Gate>,
}

impl<'a> Retriever<'a> {
    /// Checks that the embedder and tokenizer are the database's own.
    pub fn new(
        db: &'a Database,
        embedder: &'a dyn Embedder,
        tokenizer: &'a LmTokenizer,
        k: usize,
    ) -> Result<Self> {
        db.check_embedder(embedder)?;
        db.check_compatible(tokenizer)?;
        let r = Retriever::for_keys(db, k)?;
        Ok(Retriever {
            db: r.db,
            text: Text {
                embedder,
                tokenizer,
            },
            k: r.k,
            neighbour_len: r.neighbour_len,
            ef: r.ef,
            excluded: r.excluded,
            gate: r.gate,
        })
    }
}

impl<'a> Retriever<'a, KeysOnly> {
    /// A retriever that only searches precomputed keys ([`Retriever::search`]), e.g. the database's
    /// own keys of training chunks.
    pub fn for_keys(db: &'a Database, k: usize) -> Result<Self> {
        Self {
            db,
            text: KeysOnly,
            k: 1,
            neighbour_len: 2 * db.chunk_len(),
            ef: None,
            excluded: Excluded::new(),
            gate: None,
        }
        .with_k(k)
    }
}

impl<'a, T> Retriever<'a, T> {
    /// Neighbour length: the chunk and up to `chunk_len` tokens of continuation (default `2 * chunk_len`).
    pub fn with_neighbour_len(mut self, n: usize) -> Result<Self> {
        let cl = self.db.chunk_len();
        if n == 0 || n > 2 * cl {
            return Err(PipelineError::invalid(
                "neighbour_len",
                n,
                format!("must be in 1..={}", 2 * cl),
            ));
        }
        self.neighbour_len = n;
        Ok(self)
    }

    /// Another number of neighbours per chunk (at least one).
    pub fn with_k(mut self, k: usize) -> Result<Self> {
        if k == 0 {
            return Err(PipelineError::invalid(
                "k",
                0,
                "need at least one neighbour",
            ));
        }
        self.k = k;
        Ok(self)
    }

    /// Gates each chunk's neighbours ([`Neighbours::keep`]).
    pub fn with_gate(mut self, gate: Option<Gate>) -> Self {
        self.gate = gate;
        self
    }

    pub fn gate(&self) -> Option<Gate> {
        self.gate
    }

    pub fn with_ef(mut self, ef: Option<usize>) -> Self {
        self.ef = ef;
        self
    }

    /// Documents that never serve as neighbours (held-out evaluation documents).
    pub fn with_excluded_documents(mut self, docs: HashSet<DocumentId>) -> Self {
        self.excluded = docs.into_iter().map(|d| (d, 0)).collect();
        self
    }

    /// Also never a neighbour whose value reaches token `from` of document `doc` (a one-document
    /// corpus's validation tail).
    pub fn with_excluded_tail(mut self, doc: DocumentId, from: usize) -> Self {
        let e = self.excluded.entry(doc).or_insert(from);
        *e = (*e).min(from);
        self
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn neighbour_len(&self) -> usize {
        self.neighbour_len
    }
    pub fn chunk_len(&self) -> usize {
        self.db.chunk_len()
    }
    pub fn database(&self) -> &Database {
        self.db
    }

    /// Neighbours for precomputed keys `[B * C]` (row-major), e.g. the database's own keys of the
    /// chunks of a training sequence. A gate that reads the chunks' tokens needs
    /// [`Retriever::retrieve`].
    pub fn search(
        &self,
        keys: Queries,
        batch: usize,
        chunks: usize,
        origins: Option<&[Origin]>,
        filter: Filter,
    ) -> Result<Neighbours> {
        self.search_without_nearest_document(keys, batch, chunks, origins, filter, 0)
    }

    /// As [`Retriever::search`], with the chunks of the first `rows` rows also kept out of the
    /// document of their nearest neighbour under `filter`: what a chunk retrieves when the
    /// database lacks the text it most resembles (e.g. the other edition of its play). That is
    /// evaluation's *novel* condition, for training sequences: neighbours that look alike without
    /// continuing the text.
    pub fn search_without_nearest_document(
        &self,
        keys: Queries,
        batch: usize,
        chunks: usize,
        origins: Option<&[Origin]>,
        filter: Filter,
        rows: usize,
    ) -> Result<Neighbours> {
        if let Some(g) = self.gate.filter(Gate::needs_tokens) {
            return Err(PipelineError::invalid(
                "gate",
                g,
                "reads the chunks' tokens, which a search by keys does not have (use retrieve)",
            ));
        }
        let rows = rows.min(batch);
        let head_keys = (rows > 0).then(|| keys.first(rows * chunks));
        let mut out = self.search_keys(keys, batch, chunks, origins, filter, &[])?;
        if let Some(head_keys) = head_keys {
            let (k, n, h) = (self.k, self.neighbour_len, rows * chunks);
            let store = self.db.store();
            let nearest: Vec<Option<DocumentId>> = out.chunk_ids[..h * k]
                .chunks(k)
                .map(|ids| ids[0].map(|c| store.document_of(c)))
                .collect();
            let head = self.search_keys(
                head_keys,
                rows,
                chunks,
                origins.map(|o| &o[..rows]),
                filter,
                &nearest,
            )?;
            out.chunk_ids[..h * k].copy_from_slice(&head.chunk_ids);
            out.distances[..h * k].copy_from_slice(&head.distances);
            out.tokens.as_mut_slice()[..h * k * n].copy_from_slice(head.tokens.as_slice());
            out.padded = out.chunk_ids.iter().filter(|c| c.is_none()).count();
            out.timings.search += head.timings.search;
            out.timings.gather += head.timings.gather;
        }
        if let Some(g) = self.gate {
            let none = std::iter::repeat_n(&[][..], out.batch() * out.chunks());
            out.keep = Some(out.gate(&g, self.db.store(), none, None));
        }
        Ok(out)
    }

    /// The search; `also_excluded[i]`, where given, is one more document query i may not use.
    fn search_keys(
        &self,
        keys: Queries,
        batch: usize,
        chunks: usize,
        origins: Option<&[Origin]>,
        filter: Filter,
        also_excluded: &[Option<DocumentId>],
    ) -> Result<Neighbours> {
        if keys.len() != batch * chunks {
            return Err(PipelineError::invalid(
                "keys",
                keys.len(),
                format!("expected B * C = {}", batch * chunks),
            ));
        }
        if filter.needs_origin() && origins.is_none_or(|o| o.len() != batch) {
            return Err(PipelineError::invalid(
                "origins",
                "missing",
                format!("the {filter} filter needs the origin of each of the {batch} rows"),
            ));
        }
        let cl = self.db.chunk_len();
        let store = self.db.store();
        let t0 = Instant::now();
        let n_keys = keys.len();
        let hits = if filter == Filter::None && self.excluded.is_empty() && also_excluded.is_empty()
        {
            self.db.search_batch(keys, self.k, self.ef)?
        } else {
            let filters: Vec<_> = (0..n_keys)
                .map(|i| {
                    let origin = origins.map(|o| o[i / chunks.max(1)]);
                    let query_start = origin.map_or(0, |o| o.start + (i % chunks.max(1)) * cl);
                    let mut f = filter.key_filter(cl, origin, query_start, &self.excluded);
                    if let Some(&Some(d)) = also_excluded.get(i) {
                        f.exclude.push(retro_index::Exclusion::document(d));
                    }
                    f
                })
                .collect();
            self.db.search_filtered(keys, self.k, self.ef, &filters)?
        };
        let search = t0.elapsed();
        let t1 = Instant::now();
        let (k, n) = (self.k, self.neighbour_len);
        let mut chunk_ids = Vec::with_capacity(n_keys * k);
        let mut distances = Vec::with_capacity(n_keys * k);
        let mut tokens = Vec::with_capacity(n_keys * k * n);
        let mut padded = 0;
        for row in hits {
            for j in 0..k {
                match row.get(j) {
                    Some(&(id, dist)) => {
                        chunk_ids.push(Some(id));
                        distances.push(dist);
                        tokens.extend_from_slice(&store.neighbour(id)[..n]);
                    }
                    None => {
                        chunk_ids.push(None);
                        distances.push(f32::INFINITY);
                        tokens.extend(std::iter::repeat_n(store.pad_id(), n));
                        padded += 1;
                    }
                }
            }
        }
        let mut out = Neighbours {
            tokens: NeighbourBlock::new(tokens, [batch, chunks, k, n])?,
            chunk_ids,
            distances,
            padded,
            keep: None,
            timings: Timings::default(),
        };
        out.timings = Timings {
            embed: Duration::ZERO,
            search,
            gather: t1.elapsed(),
        };
        Ok(out)
    }
}

impl Retriever<'_> {
    /// Neighbours of the `C = T / chunk_len` complete chunks of each row of `x` (all rows of length T).
    /// `origins` (one per row) are needed by the same-document and window filters.
    pub fn retrieve(
        &self,
        x: &[Vec<u32>],
        origins: Option<&[Origin]>,
        filter: Filter,
    ) -> Result<Neighbours> {
        self.retrieve_after(x, origins, filter, None)
    }

    /// [`Retriever::retrieve`] for text that continues the text `before` was retrieved for (row by
    /// row): a gate that looks at the chunk before (the coherent one) then also reads the first
    /// chunk of each row.
    pub fn retrieve_after(
        &self,
        x: &[Vec<u32>],
        origins: Option<&[Origin]>,
        filter: Filter,
        before: Option<&Neighbours>,
    ) -> Result<Neighbours> {
        let Text {
            embedder,
            tokenizer,
        } = self.text;
        let cl = self.db.chunk_len();
        let t = x.first().map_or(0, |r| r.len());
        if let Some(r) = x.iter().find(|r| r.len() != t) {
            return Err(PipelineError::invalid(
                "x",
                format!("a row of length {}", r.len()),
                format!("all rows must have length {t}"),
            ));
        }
        let c = t / cl;
        let t0 = Instant::now();
        let texts = x
            .iter()
            .flat_map(|row| (0..c).map(move |u| &row[u * cl..(u + 1) * cl]))
            .map(|chunk| tokenizer.decode(chunk))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let keys = if refs.is_empty() {
            Queries::default()
        } else {
            Queries::from_rows(&embedder.embed(&refs)?)?
        };
        let embed = t0.elapsed();
        let mut out = self.search_keys(keys, x.len(), c, origins, filter, &[])?;
        out.timings.embed = embed;
        if let Some(g) = self.gate {
            let chunks = x
                .iter()
                .flat_map(|row| (0..c).map(move |u| &row[u * cl..(u + 1) * cl]));
            out.keep = Some(out.gate(&g, self.db.store(), chunks, before));
        }
        Ok(out)
    }
}
