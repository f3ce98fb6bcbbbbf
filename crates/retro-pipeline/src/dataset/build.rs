//! Building a dataset: cut chunk-aligned sequences, hold documents out, precompute every chunk's
//! neighbours, write the splits in a staged folder.

use super::*;
use crate::error::{PipelineError, Result};
use crate::filter::{Filter, Origin};
use crate::retriever::{KeysOnly, Retriever};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use retro_format::{write_atomic, write_json_atomic, FileTable, FolderKind};
use retro_index::{Database, DocumentId, Queries};
use std::collections::HashSet;
use std::path::Path;

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Chunk-aligned sequence starts within each document, seeded; documents shorter than `seq_len + 1`
/// tokens give none.
fn cut_sequences(
    db: &Database,
    docs: &[DocumentId],
    seq_len: usize,
    rng: &mut rand::rngs::StdRng,
) -> Vec<Origin> {
    let cl = db.chunk_len();
    let store = db.store();
    let mut out = vec![];
    for &d in docs {
        let len = store.document_tokens(d).len();
        if len < seq_len + 1 {
            continue;
        }
        // A random chunk-aligned phase, then non-overlapping windows.
        let max_start = len - (seq_len + 1);
        let phase = rng.random_range(0..=(max_start / cl).min(seq_len / cl)) * cl;
        let mut start = phase;
        while start <= max_start {
            out.push(Origin { document: d, start });
            start += seq_len.div_ceil(cl) * cl;
        }
    }
    out
}

impl Dataset {
    /// Cuts sequences, precomputes the neighbours of every chunk and writes the dataset to `out`,
    /// which must not exist yet (or be empty).
    pub fn build(
        db: &Database,
        params: &DatasetParams,
        out: &Path,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Dataset> {
        Self::build_with(db, params, out, false, progress)
    }

    /// As [`Dataset::build`]; with `overwrite`, an existing dataset at `out` is replaced. The dataset
    /// is written into a temporary folder beside `out` and renamed into place, so a crash leaves the
    /// old dataset or the new one, never a mix. A folder that is not a dataset is never replaced.
    pub fn build_with(
        db: &Database,
        params: &DatasetParams,
        out_dir: &Path,
        overwrite: bool,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Dataset> {
        let cl = db.chunk_len();
        check_params(db, params)?;
        // The build reads the whole database: verify every file against its checksum first.
        db.verify()?;
        let docs = db.store().documents();
        let n_docs = docs.len();
        // One seeded generator, drawn from in this order: held-out documents, sequences, shuffles.
        let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        let held = held_out_documents(db, params, &mut rng)?;
        let filter = params.filter.unwrap_or(if n_docs == 1 {
            Filter::Sequence(params.seq_len)
        } else {
            Filter::SameDocument
        });
        let splits = split_sequences(db, params, &held, &mut rng)?;
        let retriever = Retriever::for_keys(db, params.k)?.with_excluded_documents(held.clone());
        // A one-document corpus' validation tail never feeds the training sequences' neighbours.
        let train_retriever = match (n_docs, splits.valid.iter().map(|o| o.start).min()) {
            (1, Some(from)) if held.is_empty() => {
                retriever.clone().with_excluded_tail(DocumentId(0), from)
            }
            _ => retriever.clone(),
        };
        // The shuffled order is seeded, so its first sequences are a seeded sample.
        let novel_train = (splits.train.len() as f64 * params.novel_fraction).round() as usize;
        let staged = FolderKind::Dataset.stage(out_dir, overwrite)?;
        let out = staged.path();
        let total = splits.train.len() + splits.valid.len();
        let mut done = 0;
        let cancel = &params.cancel;
        let mut step = |n: usize| {
            done += n;
            progress(done, total);
            cancel.check()
        };
        let train_info = write_split(
            db,
            &train_retriever,
            Split::Train,
            &splits.train,
            (params.seq_len, filter, novel_train),
            out,
            &mut step,
        )?;
        let valid_info = write_split(
            db,
            &retriever,
            Split::Valid,
            &splits.valid,
            (params.seq_len, filter, 0),
            out,
            &mut step,
        )?;
        let mut held_out_documents: Vec<(DocumentId, String)> =
            held.iter().map(|&d| (d, docs[d.0].id.clone())).collect();
        held_out_documents.sort();
        let mut files = FileTable::new();
        for split in [Split::Train, Split::Valid] {
            for f in SPLIT_FILES {
                files.add(out, &format!("{}.{f}", split.name()))?;
            }
        }
        let meta = DatasetMeta {
            format_version: DATASET_FORMAT_VERSION,
            dataset_id: dataset_id(db, params, filter, &files),
            database_id: db.id().clone(),
            database_dir: db
                .dir()
                .canonicalize()
                .unwrap_or_else(|_| db.dir().to_owned()),
            chunk_len: cl,
            seq_len: params.seq_len,
            k: params.k,
            neighbour_len: 2 * cl,
            filter,
            seed: params.seed,
            novel_fraction: params.novel_fraction,
            held_out_documents,
            skipped_short_documents: splits.skipped_short_documents,
            train: train_info,
            valid: valid_info,
            files,
        };
        write_json_atomic(&out.join(FolderKind::Dataset.marker()), &meta)?;
        params.cancel.check()?;
        staged.commit()?;
        Dataset::open(out_dir, db)
    }
}

/// Step 1 of a build: parameters the database can serve.
fn check_params(db: &Database, params: &DatasetParams) -> Result<()> {
    let cl = db.chunk_len();
    if params.seq_len < cl {
        return Err(PipelineError::invalid(
            "seq_len",
            params.seq_len,
            format!("must be at least chunk_len = {cl}"),
        ));
    }
    if params.k == 0 || params.k > MAX_K {
        return Err(PipelineError::invalid(
            "k",
            params.k,
            format!("neighbours per chunk must be between 1 and {MAX_K} (the paper trains with 2)"),
        ));
    }
    if !(0.0..=1.0).contains(&params.novel_fraction) {
        return Err(PipelineError::invalid(
            "novel_fraction",
            params.novel_fraction,
            "must be a fraction of the training sequences in 0..=1",
        ));
    }
    if params.k > db.store().len() {
        return Err(PipelineError::invalid(
            "k",
            params.k,
            format!("the database has only {} chunks", db.store().len()),
        ));
    }
    Ok(())
}

/// Step 2: the held-out documents, by id or id substring (each must match one), else a seeded
/// `valid_fraction` of them; never all.
fn held_out_documents(
    db: &Database,
    params: &DatasetParams,
    rng: &mut rand::rngs::StdRng,
) -> Result<HashSet<DocumentId>> {
    let docs = db.store().documents();
    let n_docs = docs.len();
    let mut held: HashSet<DocumentId> = docs
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            params.held_out_ids.contains(&d.id)
                || params
                    .held_out_matching
                    .iter()
                    .any(|m| d.id.contains(m.as_str()))
        })
        .map(|(i, _)| DocumentId(i))
        .collect();
    for m in &params.held_out_matching {
        if !docs.iter().any(|d| d.id.contains(m.as_str())) {
            return Err(PipelineError::invalid(
                "held_out_matching",
                m,
                "no document id of the database contains this text (nothing would be held \
                 out by it)",
            ));
        }
    }
    for id in &params.held_out_ids {
        if !docs.iter().any(|d| &d.id == id) {
            return Err(PipelineError::invalid(
                "held_out_ids",
                id,
                "no document of the database has this id",
            ));
        }
    }
    if held.is_empty() && n_docs > 1 && params.valid_fraction > 0.0 {
        let mut order: Vec<usize> = (0..n_docs).collect();
        order.shuffle(rng);
        let n = ((n_docs as f64 * params.valid_fraction).round() as usize).clamp(1, n_docs - 1);
        held.extend(order.into_iter().take(n).map(DocumentId));
    }
    if held.len() == n_docs && n_docs > 0 {
        return Err(PipelineError::invalid(
            "held_out",
            held.len(),
            "every document is held out: nothing left to train on",
        ));
    }
    Ok(held)
}

/// The sequences of the two splits, shuffled and capped.
struct Splits {
    train: Vec<Origin>,
    valid: Vec<Origin>,
    skipped_short_documents: usize,
}

/// Step 3: cut the training and validation documents into sequences (a one-document corpus gives
/// its tail to validation), shuffle and cap them.
fn split_sequences(
    db: &Database,
    params: &DatasetParams,
    held: &HashSet<DocumentId>,
    rng: &mut rand::rngs::StdRng,
) -> Result<Splits> {
    let store = db.store();
    let n_docs = store.documents().len();
    let train_docs: Vec<DocumentId> = (0..n_docs)
        .map(DocumentId)
        .filter(|d| !held.contains(d))
        .collect();
    let valid_docs: Vec<DocumentId> = (0..n_docs)
        .map(DocumentId)
        .filter(|d| held.contains(d))
        .collect();
    let mut train = cut_sequences(db, &train_docs, params.seq_len, rng);
    let mut valid = cut_sequences(db, &valid_docs, params.seq_len, rng);
    let skipped_short_documents = train_docs
        .iter()
        .filter(|&&d| store.document_tokens(d).len() < params.seq_len + 1)
        .count();
    if n_docs == 1 && valid.is_empty() && params.valid_fraction > 0.0 && train.len() > 1 {
        // One document: its tail is the validation split.
        let n = ((train.len() as f64 * params.valid_fraction).round() as usize)
            .clamp(1, train.len() - 1);
        valid = train.split_off(train.len() - n);
    }
    train.shuffle(rng);
    valid.shuffle(rng);
    if let Some(m) = params.max_train_sequences {
        train.truncate(m);
    }
    if let Some(m) = params.max_valid_sequences {
        valid.truncate(m);
    }
    if train.is_empty() {
        return Err(PipelineError::invalid(
            "seq_len",
            params.seq_len,
            "no training document is long enough for one sequence",
        ));
    }
    Ok(Splits {
        train,
        valid,
        skipped_short_documents,
    })
}

/// Step 4: the neighbours of every chunk of one split's sequences, from the database's own keys
/// (64 sequences per search), written as `{split}.origins`, `.neighbours` and `.distances`. The
/// first `novel` sequences get neighbours from outside each chunk's nearest document.
fn write_split(
    db: &Database,
    retriever: &Retriever<'_, KeysOnly>,
    split: Split,
    origins: &[Origin],
    (seq_len, filter, novel): (usize, Filter, usize),
    out: &Path,
    progress: &mut dyn FnMut(usize) -> retro_index::Result<()>,
) -> Result<SplitInfo> {
    let store = db.store();
    let (cl, k) = (db.chunk_len(), retriever.k());
    let c = seq_len / cl;
    let mut ids = Vec::with_capacity(origins.len() * c * k);
    let mut dists: Vec<f32> = Vec::with_capacity(origins.len() * c * k);
    let mut padded = 0;
    for (g, group) in origins.chunks(64).enumerate() {
        let keys: Vec<f32> = group
            .iter()
            .flat_map(|o| {
                let first = store.document(o.document).first_chunk as usize + o.start / cl;
                (0..c).map(move |u| first + u)
            })
            .flat_map(|chunk| db.embeddings().row(ChunkId(chunk)).iter().copied())
            .collect();
        let keys = Queries::new(keys, db.embeddings().dim())?;
        // Rows of this group below `novel` (in the split's order) get novel neighbours.
        let novel_rows = novel.saturating_sub(g * 64).min(group.len());
        let n = retriever.search_without_nearest_document(
            keys,
            group.len(),
            c,
            Some(group),
            filter,
            novel_rows,
        )?;
        ids.extend(
            n.chunk_ids
                .iter()
                .map(|id| id.map_or(NO_CHUNK, |i| i.0 as u32)),
        );
        dists.extend(&n.distances);
        padded += n.padded;
        progress(group.len())?;
    }
    let name = split.name();
    let flat: Vec<u32> = origins
        .iter()
        .flat_map(|o| [o.document.0 as u32, o.start as u32])
        .collect();
    write_bytes(&out.join(format!("{name}.origins")), &u32_bytes(&flat))?;
    write_bytes(&out.join(format!("{name}.neighbours")), &u32_bytes(&ids))?;
    let db_bytes: Vec<u8> = dists.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_bytes(&out.join(format!("{name}.distances")), &db_bytes)?;
    Ok(SplitInfo {
        sequences: origins.len(),
        padded_neighbours: padded,
        novel_sequences: novel,
    })
}

/// Step 5: the dataset's id, from the database, the parameters and every file's checksum.
fn dataset_id(
    db: &Database,
    params: &DatasetParams,
    filter: Filter,
    files: &FileTable,
) -> DatasetId {
    let params = format!(
        "{}|{}|{}|{}|{filter}|{}|{}",
        db.id(),
        params.seq_len,
        params.k,
        db.chunk_len(),
        params.seed,
        params.novel_fraction,
    );
    DatasetId::new(files.content_id(&params))
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(write_atomic(path, |w| w.write_all(bytes))?)
}
