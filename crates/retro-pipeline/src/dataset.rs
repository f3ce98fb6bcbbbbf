//! Training datasets with precomputed neighbours (the paper: on-the-fly retrieval cannot keep up with
//! training). Sequences are cut from the database's own documents at chunk-aligned offsets, so every
//! chunk of a sequence is a database chunk and its key is already stored: building a dataset costs
//! searches only. Neighbours are stored as chunk ids (memory-mapped), tagged with what they were built
//! from; loading a dataset with another database is an error.

use crate::error::{PipelineError, Result};
use crate::filter::{Filter, Origin};
use crate::retriever::{KeysOnly, Retriever};
use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use retro_format::{is_hex, write_atomic, write_json_atomic, FileTable, FolderKind};
use retro_index::{ChunkId, Database, DatabaseId, DocumentId};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Version 2 added `dataset_id` and the files' checksums.
pub const DATASET_FORMAT_VERSION: u32 = FolderKind::Dataset.version();
/// Most neighbours per chunk a dataset may hold (the paper trains with 2 and evaluates with up to 40).
pub const MAX_K: usize = 64;
/// The split files of a dataset, per split.
const SPLIT_FILES: [&str; 3] = ["origins", "neighbours", "distances"];
/// Chunk id stored for a padded neighbour.
pub const NO_CHUNK: u32 = u32::MAX;

/// How a dataset is cut and retrieved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatasetParams {
    pub seq_len: usize,
    pub k: usize,
    /// None: same-document, or `sequence:SEQ_LEN` (the whole training sequence and the chunk after
    /// it) for a one-document corpus.
    pub filter: Option<Filter>,
    pub seed: u64,
    /// Documents whose id is listed here, or contains one of `held_out_matching`, form the
    /// validation split and never serve as neighbours.
    pub held_out_ids: Vec<String>,
    pub held_out_matching: Vec<String>,
    /// With nothing held out by id, this fraction of documents (seeded) is held out; with a single
    /// document, its last fraction of sequences is the validation split.
    pub valid_fraction: f64,
    pub max_train_sequences: Option<usize>,
    pub max_valid_sequences: Option<usize>,
    /// This fraction of the training sequences (seeded) get *novel* neighbours: each chunk's are
    /// also kept out of the document of its nearest neighbour
    /// ([`Retriever::search_without_nearest_document`]). Neighbours that look alike without
    /// continuing the text, so CCA learns to check a neighbour before copying it. 0 in the paper.
    pub novel_fraction: f64,
}

impl Default for DatasetParams {
    fn default() -> Self {
        Self {
            seq_len: 512,
            k: 2,
            filter: None,
            seed: 0,
            held_out_ids: vec![],
            held_out_matching: vec![],
            valid_fraction: 0.1,
            max_train_sequences: None,
            max_valid_sequences: None,
            novel_fraction: 0.0,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SplitInfo {
    pub sequences: usize,
    pub padded_neighbours: usize,
    /// Sequences whose neighbours were retrieved without their chunks' nearest documents
    /// ([`DatasetParams::novel_fraction`]).
    #[serde(default)]
    pub novel_sequences: usize,
}

/// `dataset.json`: what the dataset was built with and from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatasetMeta {
    pub format_version: u32,
    /// Content id: a hash of the parameters, the database id and the files' checksums. A run
    /// records it, and resuming on another dataset is refused.
    pub dataset_id: String,
    pub database_id: DatabaseId,
    /// Where the database was when the dataset was built (the id is what is checked).
    #[serde(default)]
    pub database_dir: PathBuf,
    pub chunk_len: usize,
    pub seq_len: usize,
    pub k: usize,
    /// Tokens per neighbour: the chunk and its continuation. Datasets built before 2026-12-03
    /// use the American spelling; they still load.
    #[serde(alias = "neighbor_len")]
    pub neighbour_len: usize,
    pub filter: Filter,
    pub seed: u64,
    #[serde(default)]
    pub novel_fraction: f64,
    /// Indices and ids of the held-out (validation) documents.
    pub held_out_documents: Vec<(DocumentId, String)>,
    /// Training documents too short for one sequence of `seq_len + 1` tokens.
    pub skipped_short_documents: usize,
    pub train: SplitInfo,
    pub valid: SplitInfo,
    /// File name -> size and SHA-256, verified on every open.
    pub files: FileTable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

impl DatasetMeta {
    /// Checks that need no database: sizes in range, names of the dataset's own files only.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, value: String, why: &str| {
            PipelineError::file(path, format!("{field} = {value}: {why}"))
        };
        let cl = self.chunk_len;
        if cl == 0 || cl > retro_index::database::MAX_CHUNK_LEN {
            return Err(bad(
                "chunk_len",
                cl.to_string(),
                "must be positive and at most 4096",
            ));
        }
        if self.seq_len < cl || self.seq_len > 1 << 20 {
            return Err(bad(
                "seq_len",
                self.seq_len.to_string(),
                "must be at least chunk_len and at most 2^20",
            ));
        }
        if self.k == 0 || self.k > MAX_K {
            return Err(bad("k", self.k.to_string(), "must be between 1 and 64"));
        }
        if self.neighbour_len != 2 * cl {
            return Err(bad(
                "neighbour_len",
                self.neighbour_len.to_string(),
                &format!(
                    "a neighbour is a chunk and its continuation: 2 x chunk_len = {}",
                    2 * cl
                ),
            ));
        }
        if let Filter::Sequence(0) | Filter::Window(0) = self.filter {
            return Err(bad(
                "filter",
                self.filter.to_string(),
                "needs a positive length",
            ));
        }
        let mut want: Vec<String> = [Split::Train, Split::Valid]
            .iter()
            .flat_map(|s| SPLIT_FILES.iter().map(move |f| format!("{}.{f}", s.name())))
            .collect();
        want.sort();
        let have: Vec<String> = self.files.names().cloned().collect();
        if have != want {
            return Err(bad(
                "files",
                format!("{have:?}"),
                &format!("must list exactly {want:?}"),
            ));
        }
        for (name, f) in &self.files {
            if !is_hex(&f.sha256, 64..=64) {
                return Err(bad(
                    &format!("files.{name}.sha256"),
                    format!("{:?}", f.sha256),
                    "is not 64 hex digits",
                ));
            }
        }
        Ok(())
    }

    /// Checks against the database the dataset is opened with.
    fn check_against(&self, path: &Path, db: &Database) -> Result<()> {
        if self.database_id != *db.id() {
            return Err(PipelineError::file(
                path,
                format!(
                    "built from database {} but given database {} ({})",
                    self.database_id,
                    db.id(),
                    db.dir().display()
                ),
            ));
        }
        if self.chunk_len != db.chunk_len() {
            return Err(PipelineError::file(
                path,
                format!(
                    "chunk_len = {}, but the database's is {}",
                    self.chunk_len,
                    db.chunk_len()
                ),
            ));
        }
        let docs = db.store().documents();
        for (i, id) in &self.held_out_documents {
            if docs.get(i.0).is_none_or(|d| &d.id != id) {
                return Err(PipelineError::file(
                    path,
                    format!(
                        "held_out_documents: ({}, {id:?}) is not a document of the database",
                        i.0
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One split on disk: origins in memory, neighbour ids and distances memory-mapped.
struct SplitData {
    origins: Vec<Origin>,
    neighbours: Option<Mmap>,
    distances: Option<Mmap>,
}

pub struct Dataset {
    dir: PathBuf,
    meta: DatasetMeta,
    train: SplitData,
    valid: SplitData,
}

/// A batch ready for the model: `x`, `y` `[B, T]`, `ret` `[B, C, K, N]`, row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub chunks: usize,
    pub k: usize,
    pub neighbour_len: usize,
    pub x: Vec<u32>,
    pub y: Vec<u32>,
    pub ret: Vec<u32>,
    pub origins: Vec<Origin>,
}

impl Batch {
    /// Gives each sequence, with probability `p`, the neighbours of another sequence of the
    /// batch (chosen at random; they were retrieved for other text). Deterministic in `seed`.
    pub fn shuffle_neighbours(&mut self, p: f64, seed: u64) {
        use rand::{Rng, SeedableRng};
        let b = self.batch;
        if b < 2 || p <= 0.0 {
            return;
        }
        let block = self.chunks * self.k * self.neighbour_len;
        let original = self.ret.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for i in 0..b {
            if rng.random::<f64>() < p {
                let j = (i + rng.random_range(1..b)) % b;
                self.ret[i * block..(i + 1) * block]
                    .copy_from_slice(&original[j * block..(j + 1) * block]);
            }
        }
    }

    pub fn tensors(
        &self,
        device: &candle_core::Device,
    ) -> Result<(
        candle_core::Tensor,
        candle_core::Tensor,
        candle_core::Tensor,
    )> {
        use candle_core::Tensor;
        let (b, t) = (self.batch, self.seq_len);
        Ok((
            Tensor::from_vec(self.x.clone(), (b, t), device)?,
            Tensor::from_vec(self.y.clone(), (b, t), device)?,
            Tensor::from_vec(
                self.ret.clone(),
                (b, self.chunks, self.k, self.neighbour_len),
                device,
            )?,
        ))
    }
}

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
        let mut step = |n: usize| {
            done += n;
            progress(done, total);
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
        staged.commit()?;
        Dataset::open(out_dir, db)
    }

    /// Reads `dataset.json` alone (e.g. to find the database a dataset was built from), checking
    /// its format version and the fields that need no database.
    pub fn read_meta(dir: &Path) -> Result<DatasetMeta> {
        let (path, meta): (_, DatasetMeta) = FolderKind::Dataset.read_manifest(dir)?;
        meta.validate(&path)?;
        Ok(meta)
    }

    /// Opens a dataset, checking its format and that it was built from `db`.
    pub fn open(dir: &Path, db: &Database) -> Result<Dataset> {
        let meta_path = dir.join(FolderKind::Dataset.marker());
        let meta = Self::read_meta(dir)?;
        meta.check_against(&meta_path, db)?;
        meta.files.check(
            dir,
            "dataset.json",
            "rebuild the dataset (`retro dataset build --overwrite`)",
            |_, _| true,
        )?;
        let per_seq = (meta.seq_len / meta.chunk_len) * meta.k;
        let load = |split: Split, info: &SplitInfo| -> Result<SplitData> {
            let name = split.name();
            let origins_path = dir.join(format!("{name}.origins"));
            let raw =
                std::fs::read(&origins_path).map_err(|e| PipelineError::io(&origins_path, e))?;
            if Some(raw.len()) != info.sequences.checked_mul(8) {
                return Err(PipelineError::file(
                    &origins_path,
                    format!(
                        "{} bytes, expected {} for {} sequences",
                        raw.len(),
                        info.sequences.saturating_mul(8),
                        info.sequences
                    ),
                ));
            }
            let origins = raw
                .chunks_exact(8)
                .map(|b| Origin {
                    document: DocumentId(u32::from_le_bytes(b[..4].try_into().unwrap()) as usize),
                    start: u32::from_le_bytes(b[4..].try_into().unwrap()) as usize,
                })
                .collect::<Vec<_>>();
            for o in &origins {
                if o.document.0 >= db.store().documents().len()
                    || o.start + meta.seq_len + 1 > db.store().document_tokens(o.document).len()
                {
                    return Err(PipelineError::file(
                        &origins_path,
                        format!("sequence {o:?} lies outside the database's documents"),
                    ));
                }
            }
            let map = |file: String, bytes_per: usize| -> Result<Option<Mmap>> {
                let path = dir.join(file);
                let f = std::fs::File::open(&path).map_err(|e| PipelineError::io(&path, e))?;
                let want = info
                    .sequences
                    .saturating_mul(per_seq)
                    .saturating_mul(bytes_per);
                let len = f.metadata().map_err(|e| PipelineError::io(&path, e))?.len() as usize;
                if len != want {
                    return Err(PipelineError::file(
                        &path,
                        format!("{len} bytes, expected {want}"),
                    ));
                }
                if len == 0 {
                    return Ok(None);
                }
                // SAFETY: the file is only read; the dataset's files are written once, atomically.
                let m = unsafe { Mmap::map(&f) }.map_err(|e| PipelineError::io(&path, e))?;
                Ok(Some(m))
            };
            let neighbours = map(format!("{name}.neighbours"), 4)?;
            if let Some(m) = &neighbours {
                let n_chunks = db.store().len() as u32;
                if let Some(bad) = bytemuck::cast_slice::<u8, u32>(m)
                    .iter()
                    .find(|&&i| i != NO_CHUNK && i >= n_chunks)
                {
                    return Err(PipelineError::file(
                        &dir.join(format!("{name}.neighbours")),
                        format!("chunk id {bad} is beyond the database's {n_chunks} chunks"),
                    ));
                }
            }
            Ok(SplitData {
                origins,
                neighbours,
                distances: map(format!("{name}.distances"), 4)?,
            })
        };
        let train = load(Split::Train, &meta.train)?;
        let valid = load(Split::Valid, &meta.valid)?;
        Ok(Dataset {
            dir: dir.to_owned(),
            meta,
            train,
            valid,
        })
    }

    pub fn meta(&self) -> &DatasetMeta {
        &self.meta
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn split(&self, s: Split) -> &SplitData {
        match s {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
        }
    }

    pub fn len(&self, s: Split) -> usize {
        self.split(s).origins.len()
    }

    pub fn origin(&self, s: Split, i: usize) -> Origin {
        self.split(s).origins[i]
    }

    /// Neighbour chunk ids (`None`: padded) and distances of sequence `i`, `[C][K]` row-major.
    pub fn neighbours(&self, s: Split, i: usize) -> Vec<(Option<ChunkId>, f32)> {
        let per = (self.meta.seq_len / self.meta.chunk_len) * self.meta.k;
        let d = self.split(s);
        let (Some(ids), Some(dists)) = (&d.neighbours, &d.distances) else {
            return vec![];
        };
        let ids: &[u32] = bytemuck::cast_slice(&ids[i * per * 4..(i + 1) * per * 4]);
        let dists: &[u8] = &dists[i * per * 4..(i + 1) * per * 4];
        ids.iter()
            .zip(dists.chunks_exact(4))
            .map(|(&id, b)| {
                (
                    (id != NO_CHUNK).then_some(ChunkId(id as usize)),
                    f32::from_le_bytes(b.try_into().unwrap()),
                )
            })
            .collect()
    }

    /// Gathers the sequences `indices` of split `s` with their neighbours' tokens.
    pub fn batch(&self, db: &Database, s: Split, indices: &[usize]) -> Batch {
        let m = &self.meta;
        let (t, cl, k, n) = (m.seq_len, m.chunk_len, m.k, m.neighbour_len);
        let c = t / cl;
        let store = db.store();
        let mut b = Batch {
            batch: indices.len(),
            seq_len: t,
            chunks: c,
            k,
            neighbour_len: n,
            x: Vec::with_capacity(indices.len() * t),
            y: Vec::with_capacity(indices.len() * t),
            ret: Vec::with_capacity(indices.len() * c * k * n),
            origins: vec![],
        };
        for &i in indices {
            let o = self.origin(s, i);
            let tokens = &store.document_tokens(o.document)[o.start..o.start + t + 1];
            b.x.extend_from_slice(&tokens[..t]);
            b.y.extend_from_slice(&tokens[1..]);
            b.origins.push(o);
            for (id, _) in self.neighbours(s, i) {
                match id {
                    Some(id) => b.ret.extend_from_slice(&store.neighbour(id)[..n]),
                    None => b.ret.extend(std::iter::repeat_n(store.pad_id(), n)),
                }
            }
        }
        b
    }

    /// The loader: feeds `f` the training batches of global steps `from..to` (epoch `s / per_epoch`,
    /// each epoch shuffled by `(seed, epoch)`, so a resumed run sees the batches it would have seen),
    /// gathering the next batches on another thread while `f` runs. `f` returns false to stop early.
    pub fn for_each_train_batch(
        &self,
        db: &Database,
        batch_size: usize,
        seed: u64,
        steps: std::ops::Range<usize>,
        f: &mut dyn FnMut(Batch) -> Result<bool>,
    ) -> Result<()> {
        let per_epoch = self.len(Split::Train) / batch_size.max(1);
        if per_epoch == 0 {
            return Err(PipelineError::invalid(
                "batch_size",
                batch_size,
                format!(
                    "the dataset has {} training sequences",
                    self.len(Split::Train)
                ),
            ));
        }
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
            let range = steps.clone();
            scope.spawn(move || {
                let mut s = range.start;
                while s < range.end {
                    let (epoch, i) = (s / per_epoch, s % per_epoch);
                    let order = self.epoch_batches(Split::Train, batch_size, seed, epoch as u64);
                    for idx in &order[i..] {
                        if s >= range.end || tx.send(self.batch(db, Split::Train, idx)).is_err() {
                            return;
                        }
                        s += 1;
                    }
                }
            });
            for _ in steps {
                let batch = rx.recv().map_err(|_| {
                    PipelineError::invalid(
                        "dataset",
                        self.dir.display(),
                        "the batch loader stopped",
                    )
                })?;
                if !f(batch)? {
                    break;
                }
            }
            // Dropping the receiver stops the loader thread.
            drop(rx);
            Ok(())
        })
    }

    /// Sequence indices of split `s` in batches of `batch_size`, shuffled by `(seed, epoch)`; the last
    /// incomplete batch is dropped so every step sees the same shape.
    pub fn epoch_batches(
        &self,
        s: Split,
        batch_size: usize,
        seed: u64,
        epoch: u64,
    ) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len(s)).collect();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        order
            .chunks_exact(batch_size.max(1))
            .map(|c| c.to_vec())
            .collect()
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
    progress: &mut dyn FnMut(usize),
) -> Result<SplitInfo> {
    let store = db.store();
    let (cl, k) = (db.chunk_len(), retriever.k());
    let c = seq_len / cl;
    let mut ids = Vec::with_capacity(origins.len() * c * k);
    let mut dists: Vec<f32> = Vec::with_capacity(origins.len() * c * k);
    let mut padded = 0;
    for (g, group) in origins.chunks(64).enumerate() {
        let keys: Vec<Vec<f32>> = group
            .iter()
            .flat_map(|o| {
                let first = store.document(o.document).first_chunk as usize + o.start / cl;
                (0..c).map(move |u| first + u)
            })
            .map(|chunk| db.embeddings().row(chunk).to_vec())
            .collect();
        // Rows of this group below `novel` (in the split's order) get novel neighbours.
        let novel_rows = novel.saturating_sub(g * 64).min(group.len());
        let n = retriever.search_without_nearest_document(
            &keys,
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
        progress(group.len());
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
fn dataset_id(db: &Database, params: &DatasetParams, filter: Filter, files: &FileTable) -> String {
    let params = format!(
        "{}|{}|{}|{}|{filter}|{}|{}",
        db.id(),
        params.seq_len,
        params.k,
        db.chunk_len(),
        params.seed,
        params.novel_fraction,
    );
    files.content_id(&params)
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(write_atomic(path, |w| w.write_all(bytes))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: usize) -> Batch {
        let (c, k, n) = (2, 2, 3);
        Batch {
            batch: b,
            seq_len: 8,
            chunks: c,
            k,
            neighbour_len: n,
            x: vec![0; b * 8],
            y: vec![0; b * 8],
            // Row i's neighbour tokens are all i.
            ret: (0..b).flat_map(|i| vec![i as u32; c * k * n]).collect(),
            origins: vec![],
        }
    }

    #[test]
    fn shuffled_neighbours_come_whole_from_another_row_and_replay_from_the_seed() {
        let mut a = batch(4);
        a.shuffle_neighbours(0.999, 11);
        let block = 2 * 2 * 3;
        for (i, r) in a.ret.chunks(block).enumerate() {
            assert!(r.iter().all(|&t| t == r[0]), "row {i} mixes rows");
            assert_ne!(r[0] as usize, i, "row {i} kept its own neighbours");
        }
        let mut again = batch(4);
        again.shuffle_neighbours(0.999, 11);
        assert_eq!(a.ret, again.ret);
        let mut none = batch(4);
        none.shuffle_neighbours(0.0, 11);
        assert_eq!(none.ret, batch(4).ret);
        // About p of the rows, over many seeds.
        let moved: usize = (0..500)
            .map(|s| {
                let mut b = batch(4);
                b.shuffle_neighbours(0.25, s);
                b.ret
                    .chunks(block)
                    .enumerate()
                    .filter(|(i, r)| r[0] as usize != *i)
                    .count()
            })
            .sum();
        let frac = moved as f64 / 2000.0;
        assert!((0.2..0.3).contains(&frac), "{frac}");
    }
}
