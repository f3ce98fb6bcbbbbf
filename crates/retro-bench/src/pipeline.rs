//! Timing of the retrieval pipeline (for `retro bench pipeline` and the criterion bench): chunks
//! retrieved per second for batches of sequences cut from the database's own documents, split into
//! embedding, search and gather; the dataset-precompute path (stored keys, search only); and the
//! embedder's own throughput on the same chunk texts.

use retro_index::{ChunkId, Database, DocumentId, Embedder, LmTokenizer};
use retro_pipeline::{
    Dataset, DatasetParams, Filter, Origin, PipelineError, Result, Retriever, Split, Timings,
};
use std::path::Path;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineBenchParams {
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence (`seq_len / chunk_len` chunks each).
    pub seq_len: usize,
    /// Neighbours per chunk.
    pub k: usize,
    /// Timed batches (a different batch each time, cycling when the corpus runs out).
    pub iters: usize,
    /// Untimed batches first.
    pub warmup: usize,
    pub filter: Filter,
    pub ef: Option<usize>,
}

impl Default for PipelineBenchParams {
    fn default() -> Self {
        Self {
            batch: 4,
            seq_len: 512,
            k: 2,
            iters: 10,
            warmup: 1,
            filter: Filter::SameDocument,
            ef: None,
        }
    }
}

/// One batch: token rows `[B, seq_len]`, their origins, and the ids of their chunks (row-major).
#[derive(Debug, Clone)]
pub struct BenchBatch {
    pub x: Vec<Vec<u32>>,
    pub origins: Vec<Origin>,
    pub chunk_ids: Vec<ChunkId>,
}

/// Cuts `n` batches of `batch` sequences of `seq_len` tokens at chunk-aligned, non-overlapping
/// offsets of the database's documents (in order, cycling over the sequences when there are fewer
/// than `n * batch`). Every chunk of a sequence is a database chunk, so its stored key is known.
pub fn cut_batches(
    db: &Database,
    batch: usize,
    seq_len: usize,
    n: usize,
) -> Result<Vec<BenchBatch>> {
    let cl = db.chunk_len();
    if batch == 0 || seq_len < cl {
        return Err(PipelineError::invalid(
            "batch/seq_len",
            format!("{batch}/{seq_len}"),
            format!("need batch >= 1 and seq_len >= chunk_len = {cl}"),
        ));
    }
    let store = db.store();
    let step = seq_len.div_ceil(cl) * cl;
    let mut seqs = vec![];
    for d in (0..store.documents().len()).map(DocumentId) {
        let len = store.document_tokens(d).len();
        let mut start = 0;
        while start + seq_len <= len {
            seqs.push(Origin { document: d, start });
            start += step;
        }
    }
    if seqs.is_empty() {
        return Err(PipelineError::invalid(
            "seq_len",
            seq_len,
            "no document of the database is that long",
        ));
    }
    let c = seq_len / cl;
    Ok((0..n)
        .map(|b| {
            let origins: Vec<Origin> = (0..batch)
                .map(|i| seqs[(b * batch + i) % seqs.len()])
                .collect();
            let x = origins
                .iter()
                .map(|o| store.document_tokens(o.document)[o.start..o.start + seq_len].to_vec())
                .collect();
            let chunk_ids = origins
                .iter()
                .flat_map(|o| {
                    let first = store.document(o.document).first_chunk as usize + o.start / cl;
                    (first..first + c).map(ChunkId)
                })
                .collect();
            BenchBatch {
                x,
                origins,
                chunk_ids,
            }
        })
        .collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians over the timed batches, seconds per batch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetrieveReport {
    pub batch: usize,
    pub seq_len: usize,
    pub chunk_len: usize,
    pub k: usize,
    pub filter: String,
    pub iters: usize,
    pub chunks_per_batch: usize,
    /// Decode + embed (the retriever's `embed` timing).
    pub embed_s: f64,
    /// Filtered search (over-fetching until K survive).
    pub search_s: f64,
    /// Gathering neighbour + continuation tokens from the store.
    pub gather_s: f64,
    /// Wall time of `Retriever::retrieve` per batch.
    pub total_s: f64,
    /// The same searches on the stored keys, unfiltered (the filter's cost is `search_s` minus this).
    pub search_unfiltered_s: f64,
    /// The same searches on the stored keys with the filter (no embedding).
    pub search_stored_keys_s: f64,
    pub retrieve_chunks_per_s: f64,
    /// Chunks/s of search + gather alone (what retrieval would be with free embeddings).
    pub search_gather_chunks_per_s: f64,
    /// `(gather + filter cost) / embed`.
    pub gather_filter_over_embed: f64,
    pub padded_neighbours: usize,
}

/// Times `Retriever::retrieve` on `batches` (the first `warmup` untimed), and the same searches on
/// the stored keys with and without the filter.
pub fn bench_retrieve(
    db: &Database,
    embedder: &dyn Embedder,
    tokenizer: &LmTokenizer,
    params: &PipelineBenchParams,
    batches: &[BenchBatch],
) -> Result<RetrieveReport> {
    let retriever = Retriever::new(db, embedder, tokenizer, params.k)?.with_ef(params.ef);
    let c = params.seq_len / db.chunk_len();
    let (mut embed, mut search, mut gather, mut total, mut unf, mut stored) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut padded = 0;
    for (i, b) in batches.iter().enumerate() {
        let t = Instant::now();
        let n = retriever.retrieve(&b.x, Some(&b.origins), params.filter)?;
        let wall = t.elapsed();
        let rows: Vec<&[f32]> = b
            .chunk_ids
            .iter()
            .map(|&id| db.embeddings().row(id))
            .collect();
        let keys = retro_index::Queries::from_rows(&rows)?;
        let u = retriever.search(keys.clone(), b.x.len(), c, Some(&b.origins), Filter::None)?;
        let s = retriever.search(keys, b.x.len(), c, Some(&b.origins), params.filter)?;
        if i < params.warmup {
            continue;
        }
        let Timings {
            embed: e,
            search: se,
            gather: g,
        } = n.timings;
        embed.push(e.as_secs_f64());
        search.push(se.as_secs_f64());
        gather.push(g.as_secs_f64());
        total.push(wall.as_secs_f64());
        unf.push(u.timings.search.as_secs_f64());
        stored.push(s.timings.search.as_secs_f64());
        padded += n.padded;
    }
    let chunks = params.batch * c;
    let (embed_s, search_s, gather_s) = (median(embed), median(search), median(gather));
    let search_unfiltered_s = median(unf);
    let search_stored_keys_s = median(stored);
    let total_s = median(total);
    let filter_cost = (search_stored_keys_s - search_unfiltered_s).max(0.0);
    Ok(RetrieveReport {
        batch: params.batch,
        seq_len: params.seq_len,
        chunk_len: db.chunk_len(),
        k: params.k,
        filter: params.filter.to_string(),
        iters: batches.len().saturating_sub(params.warmup),
        chunks_per_batch: chunks,
        embed_s,
        search_s,
        gather_s,
        total_s,
        search_unfiltered_s,
        search_stored_keys_s,
        retrieve_chunks_per_s: chunks as f64 / total_s.max(1e-12),
        search_gather_chunks_per_s: chunks as f64 / (search_s + gather_s).max(1e-12),
        gather_filter_over_embed: (gather_s + filter_cost) / embed_s.max(1e-12),
        padded_neighbours: padded,
    })
}

/// `Dataset::build` on the database (stored keys: search only).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrecomputeReport {
    pub sequences: usize,
    pub chunks: usize,
    pub seconds: f64,
    pub chunks_per_s: f64,
}

/// Builds a dataset of `seq_len` sequences with `k` neighbours in `out` and times it.
pub fn bench_precompute(
    db: &Database,
    seq_len: usize,
    k: usize,
    max_sequences: Option<usize>,
    out: &Path,
) -> Result<PrecomputeReport> {
    let params = DatasetParams {
        seq_len,
        k,
        max_train_sequences: max_sequences,
        max_valid_sequences: max_sequences,
        ..Default::default()
    };
    let t = Instant::now();
    let ds = Dataset::build(db, &params, out, &|_, _| {})?;
    let seconds = t.elapsed().as_secs_f64();
    let sequences = ds.len(Split::Train) + ds.len(Split::Valid);
    let chunks = sequences * (seq_len / db.chunk_len());
    Ok(PrecomputeReport {
        sequences,
        chunks,
        seconds,
        chunks_per_s: chunks as f64 / seconds.max(1e-12),
    })
}

/// `embedder.embed` alone on the texts of the chunks with these ids.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmbedderReport {
    pub chunks: usize,
    pub seconds: f64,
    pub chunks_per_s: f64,
}

/// Decodes the chunks (untimed) and times one `embed` call over all of them.
pub fn bench_embedder(
    db: &Database,
    embedder: &dyn Embedder,
    tokenizer: &LmTokenizer,
    chunk_ids: &[ChunkId],
) -> Result<EmbedderReport> {
    let texts = chunk_ids
        .iter()
        .map(|&id| tokenizer.decode(db.store().chunk_tokens(id)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t = Instant::now();
    std::hint::black_box(embedder.embed(&refs)?);
    let seconds = t.elapsed().as_secs_f64();
    Ok(EmbedderReport {
        chunks: refs.len(),
        seconds,
        chunks_per_s: refs.len() as f64 / seconds.max(1e-12),
    })
}
