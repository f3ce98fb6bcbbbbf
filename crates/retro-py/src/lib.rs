//! `retro_rs`: the retrieval side of RETRO from Python. A database built by `retro index build`,
//! searched with numpy queries or texts; the neighbours (chunk + continuation)
//! of chunk ids; the `[batch, chunks, neighbours, len]` array of a batch of token sequences, as
//! the labml model takes it; and the batches of a precomputed dataset. Every call that works
//! releases the GIL; errors are `retro_rs.RetroError` with the CLI's message.

use numpy::ndarray::{Array1, Array2, Array4};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray4, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use retro_index::{BertOptions, ChunkId, DocumentId, Embedder};
use retro_pipeline::{Filter, Origin, Split};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

create_exception!(
    retro_rs,
    RetroError,
    PyException,
    "An error of the retro crates; the message names the file, field or value at fault."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    RetroError::new_err(e.to_string())
}

/// A retrieval database folder, opened and checked (format version, checksums).
#[pyclass(frozen, module = "retro_rs")]
struct Database {
    db: Arc<retro_index::Database>,
    /// Document index by id, for `retrieve(documents=...)`.
    by_name: Arc<HashMap<String, usize>>,
    /// The database's own embedder, loaded on the first `search_texts`.
    embedder: OnceLock<Arc<dyn Embedder>>,
}

/// A build's link to Python: calls the user's `progress` and watches for Ctrl-C (a
/// `KeyboardInterrupt` from the callback, or a signal pending when it returns), which cancels the
/// build; the interrupt is then what the call raises. Another exception from the callback is
/// printed and ignored, so a broken progress bar never loses a build.
struct Interrupt {
    cancel: retro_index::Cancel,
    error: std::sync::Mutex<Option<PyErr>>,
}

impl Interrupt {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            cancel: retro_index::Cancel::new(),
            error: std::sync::Mutex::new(None),
        })
    }

    /// Runs `call` (the user's callback, if any) under the GIL, then checks for signals.
    fn poll(&self, call: impl FnOnce(Python<'_>) -> PyResult<PyObject>) {
        Python::with_gil(|py| {
            if let Err(e) = call(py) {
                if !e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
                    e.print(py);
                    return;
                }
                self.stop(e);
            }
            if let Err(e) = py.check_signals() {
                self.stop(e);
            }
        })
    }

    fn stop(&self, e: PyErr) {
        self.cancel.cancel();
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    /// The build's result: the interrupt when there was one, else its own result. A signal that
    /// no poll handled (Python runs signal handlers on the main thread only, and a callback may
    /// have run on a worker) is handled here, on the main thread, so Ctrl-C is never swallowed;
    /// if it came after the build was in place, the folder is complete and stays.
    fn result<T>(&self, py: Python<'_>, r: Result<T, String>) -> PyResult<T> {
        if let Err(e) = py.check_signals() {
            self.stop(e);
        }
        let pending = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (r, pending) {
            (_, Some(e)) => Err(e),
            (Ok(v), None) => Ok(v),
            (Err(e), None) => Err(err(e)),
        }
    }
}

impl Database {
    fn from_opened(db: retro_index::Database) -> Self {
        let by_name = db
            .store()
            .documents()
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i))
            .collect();
        Self {
            db: Arc::new(db),
            by_name: Arc::new(by_name),
            embedder: OnceLock::new(),
        }
    }
}

#[pymethods]
impl Database {
    /// Builds a database at `out` from `corpus` (a JSONL file of `{"id", "text"}` lines, a text
    /// file, or a folder of them), as `retro index build` does: `tokenizer` is `"char"` or a
    /// `tokenizer.json` path; the keys come from `embedder` (a BERT model folder) or, with
    /// `lexical_dim`, from hashed n-grams (`lexical_features` `"words"` or `"chars"`). Written in a
    /// staged folder swapped in whole; an existing database is replaced only with `overwrite`.
    /// `progress(stage, done, total)` is called as it goes.
    #[staticmethod]
    #[pyo3(signature = (corpus, out, *, tokenizer, embedder = None, lexical_dim = None,
        lexical_features = "words", chunk_len = 64, batch_size = 256, overwrite = false,
        progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn build(
        py: Python<'_>,
        corpus: PathBuf,
        out: PathBuf,
        tokenizer: &str,
        embedder: Option<PathBuf>,
        lexical_dim: Option<usize>,
        lexical_features: &str,
        chunk_len: usize,
        batch_size: usize,
        overwrite: bool,
        progress: Option<PyObject>,
    ) -> PyResult<Self> {
        let features = match lexical_features {
            "words" => retro_index::LexicalFeatures::Words,
            "chars" => retro_index::LexicalFeatures::CharTrigrams,
            other => {
                return Err(err(format!(
                    "lexical_features {other:?}: must be \"words\" or \"chars\""
                )))
            }
        };
        let bar = TerminalBar::unless_given(py, &progress);
        let progress = progress.or_else(|| bar.callback(py));
        let interrupt = Interrupt::new();
        let watch = interrupt.clone();
        let report: retro_index::database::ProgressFn = Arc::new(move |stage, done, total| {
            let name = format!("{stage:?}").to_lowercase();
            watch.poll(|py| match &progress {
                Some(cb) => cb.call1(py, (name, done, total)),
                None => Ok(py.None()),
            })
        });
        let r = py.allow_threads(|| -> Result<retro_index::Database, String> {
            let docs = retro_index::read_corpus(&corpus, &Default::default())
                .map_err(|e| format!("reading corpus {}: {e}", corpus.display()))?;
            let tok =
                retro_index::LmTokenizer::from_spec(tokenizer, &docs).map_err(|e| e.to_string())?;
            let (emb, source): (Box<dyn Embedder>, Option<String>) = match (lexical_dim, &embedder)
            {
                (Some(_), Some(_)) => return Err("give embedder or lexical_dim, not both".into()),
                (Some(dim), None) => (
                    Box::new(
                        retro_index::LexicalEmbedder::with_features(dim, features)
                            .map_err(|e| e.to_string())?,
                    ),
                    None,
                ),
                (None, Some(dir)) => {
                    let e = retro_index::BertEmbedder::load_with(
                        dir,
                        &retro_index::Device::Cpu,
                        BertOptions::default(),
                    )
                    .map_err(|e| format!("loading embedder {}: {e}", dir.display()))?;
                    let source = dir.canonicalize().unwrap_or(dir.clone());
                    (Box::new(e), Some(source.display().to_string()))
                }
                (None, None) => {
                    return Err("choose an embedder: embedder=MODEL_DIR or lexical_dim=DIM".into())
                }
            };
            let opts = retro_index::BuildOptions {
                chunk_len,
                batch_size,
                progress: Some(report),
                cancel: interrupt.cancel.clone(),
                overwrite,
                embedder_source: source,
                ..Default::default()
            };
            retro_index::Database::build(&docs, &tok, emb.as_ref(), &opts, &out)
                .map_err(|e| e.to_string())
        });
        bar.close(py);
        Ok(Self::from_opened(interrupt.result(py, r)?))
    }

    /// Opens the database at `path`.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let db = py
            .allow_threads(|| retro_index::Database::open(&path))
            .map_err(err)?;
        Ok(Self::from_opened(db))
    }

    /// Tokens per chunk.
    #[getter]
    fn chunk_len(&self) -> usize {
        self.db.chunk_len()
    }
    /// The width of the keys.
    #[getter]
    fn dim(&self) -> usize {
        self.db.manifest().dim
    }
    #[getter]
    fn num_chunks(&self) -> usize {
        self.db.manifest().counts.chunks
    }
    #[getter]
    fn num_documents(&self) -> usize {
        self.db.manifest().counts.documents
    }
    /// Tokens in the database's tokenizer.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.db.tokenizer().vocab_size()
    }
    /// The token that pads a neighbour whose continuation ends with its document.
    #[getter]
    fn pad_id(&self) -> u32 {
        self.db.store().pad_id()
    }
    /// The database's content id (16 hex digits).
    #[getter]
    fn id(&self) -> String {
        self.db.id().to_string()
    }

    /// Every chunk's key `[num_chunks, dim]` (float32, unit length; row i is chunk i's), for
    /// search or analysis elsewhere.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let e = self.db.embeddings();
        let a = Array2::from_shape_vec((e.len(), e.dim()), e.as_slice().to_vec()).map_err(err)?;
        Ok(a.into_pyarray(py))
    }

    /// What `retro index info` prints, as a dict.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.db.manifest();
        let d = PyDict::new(py);
        d.set_item("id", self.id())?;
        d.set_item("chunk_len", m.chunk_len)?;
        d.set_item("dim", m.dim)?;
        d.set_item("chunks", m.counts.chunks)?;
        d.set_item("documents", m.counts.documents)?;
        d.set_item("tokens", m.counts.tokens)?;
        d.set_item("embedder", m.embedder.to_string())?;
        d.set_item("embedder_source", m.embedder_source.clone())?;
        d.set_item("format_version", m.format_version)?;
        Ok(d)
    }

    /// The `k` nearest chunks of each query `[n, dim]` (float32; normalised here): chunk ids
    /// `[n, k]` (int64, -1 where fewer exist) and distances `[n, k]` (float32, inf there).
    #[pyo3(signature = (queries, k = 2))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
    ) -> PyResult<Hits<'py>> {
        let q = queries.as_array();
        let (n, dim) = q.dim();
        if dim != self.dim() {
            return Err(err(format!(
                "queries have {dim} columns; the database's keys have {}",
                self.dim()
            )));
        }
        if k == 0 {
            return Err(err("k must be at least 1"));
        }
        // One copy, row-major whatever numpy's strides.
        let flat: Vec<f32> = q.iter().copied().collect();
        let queries = retro_index::Queries::new(flat, dim).map_err(err)?;
        let db = self.db.clone();
        let hits = py
            .allow_threads(|| db.search_batch(queries, k, None))
            .map_err(err)?;
        debug_assert_eq!(hits.len(), n);
        Ok(hits_arrays(py, &hits, k))
    }

    /// Embeds `texts` with the database's own embedder and searches: as `retro index query`.
    #[pyo3(signature = (texts, k = 2))]
    fn search_texts<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        k: usize,
    ) -> PyResult<Hits<'py>> {
        if k == 0 {
            return Err(err("k must be at least 1"));
        }
        let e = match self.embedder.get() {
            Some(e) => e.clone(),
            None => {
                let d = self.db.clone();
                let e: Arc<dyn Embedder> = py
                    .allow_threads(|| {
                        d.own_embedder(None, &retro_index::Device::Cpu, BertOptions::default())
                    })
                    .map_err(err)?
                    .into();
                self.embedder.get_or_init(|| e).clone()
            }
        };
        let db = self.db.clone();
        let hits = py
            .allow_threads(|| {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                db.search_texts(e.as_ref(), &refs, k, None)
            })
            .map_err(err)?;
        Ok(hits_arrays(py, &hits, k))
    }

    /// Chunk + continuation of each chunk id: `[n, 2 * chunk_len]` int64, padded with `pad_id`
    /// where a document ends.
    fn neighbours<'py>(
        &self,
        py: Python<'py>,
        chunk_ids: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let ids = self.chunk_ids(chunk_ids)?;
        let n = 2 * self.db.chunk_len();
        let store = self.db.store();
        let flat: Vec<i64> = ids
            .iter()
            .flat_map(|&c| store.neighbour(c).into_iter().map(i64::from))
            .collect();
        let a = Array2::from_shape_vec((ids.len(), n), flat).map_err(err)?;
        Ok(a.into_pyarray(py))
    }

    /// The id of the document each chunk comes from.
    fn documents_of(&self, chunk_ids: PyReadonlyArray1<'_, i64>) -> PyResult<Vec<String>> {
        let store = self.db.store();
        Ok(self
            .chunk_ids(chunk_ids)?
            .into_iter()
            .map(|c| store.document(store.document_of(c)).id.clone())
            .collect())
    }

    /// The text's tokens under the database's tokenizer (int64).
    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let t = self.db.tokenizer().encode(text).map_err(err)?;
        Ok(Array1::from_iter(t.into_iter().map(i64::from)).into_pyarray(py))
    }

    /// The text of tokens under the database's tokenizer.
    fn decode(&self, tokens: Vec<u32>) -> PyResult<String> {
        self.db.tokenizer().decode(&tokens).map_err(err)
    }

    fn __repr__(&self) -> String {
        format!(
            "Database({:?}: {} chunks of {} tokens, {} documents)",
            self.db.dir(),
            self.num_chunks(),
            self.chunk_len(),
            self.num_documents()
        )
    }
}

/// Chunk ids `[n, k]` and their distances.
type Hits<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

/// Hits as `[n, k]` ids (-1 where fewer) and distances (inf there).
fn hits_arrays<'py>(py: Python<'py>, hits: &[Vec<retro_index::Hit>], k: usize) -> Hits<'py> {
    let mut ids = Array2::from_elem((hits.len(), k), -1i64);
    let mut dist = Array2::from_elem((hits.len(), k), f32::INFINITY);
    for (i, h) in hits.iter().enumerate() {
        for (j, (c, d)) in h.iter().take(k).enumerate() {
            ids[[i, j]] = c.0 as i64;
            dist[[i, j]] = *d;
        }
    }
    (ids.into_pyarray(py), dist.into_pyarray(py))
}

impl Database {
    fn document(&self, name: &str) -> PyResult<DocumentId> {
        self.by_name
            .get(name)
            .map(|&d| DocumentId(d))
            .ok_or_else(|| err(format!("no document {name:?} in the database")))
    }

    fn chunk_ids(&self, a: PyReadonlyArray1<'_, i64>) -> PyResult<Vec<ChunkId>> {
        let n = self.num_chunks() as i64;
        a.as_array()
            .iter()
            .map(|&c| {
                if (0..n).contains(&c) {
                    Ok(ChunkId(c as usize))
                } else {
                    Err(err(format!(
                        "chunk id {c} is out of range: the database has {n} chunks"
                    )))
                }
            })
            .collect()
    }
}

/// Neighbours for every complete chunk of a batch of token sequences, with the database's own
/// embedder (or the BERT folder given, when the recorded one has moved).
#[pyclass(frozen, module = "retro_rs")]
struct Retriever {
    db: Py<Database>,
    embedder: Arc<dyn Embedder>,
    k: usize,
    /// Documents that never serve as neighbours (a dataset's held-out documents).
    excluded: HashSet<DocumentId>,
}

#[pymethods]
impl Retriever {
    /// `exclude_documents`: ids of documents that never serve as neighbours (a dataset's
    /// `held_out_documents`).
    #[new]
    #[pyo3(signature = (db, k = 2, embedder = None, exclude_documents = None))]
    fn new(
        py: Python<'_>,
        db: Py<Database>,
        k: usize,
        embedder: Option<PathBuf>,
        exclude_documents: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let excluded = exclude_documents
            .unwrap_or_default()
            .iter()
            .map(|n| db.get().document(n))
            .collect::<PyResult<HashSet<_>>>()?;
        let d = db.get().db.clone();
        let e = py
            .allow_threads(|| {
                d.own_embedder(
                    embedder.as_deref(),
                    &retro_index::Device::Cpu,
                    BertOptions::default(),
                )
            })
            .map_err(err)?;
        // Checked here, so that a bad K fails at construction.
        retro_pipeline::Retriever::new(&d, e.as_ref(), d.tokenizer(), k).map_err(err)?;
        Ok(Self {
            db,
            embedder: Arc::from(e),
            k,
            excluded,
        })
    }

    /// `tokens [batch, T]` (integers) -> `[batch, T // chunk_len, k, 2 * chunk_len]` int64, the
    /// labml model's `ret`. With `documents` (one document id per row, as the database names
    /// them), a row never retrieves from its own document: the paper's self-retrieval filter.
    #[pyo3(signature = (tokens, documents = None))]
    fn retrieve<'py>(
        &self,
        py: Python<'py>,
        tokens: PyReadonlyArray2<'py, i64>,
        documents: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyArray4<i64>>> {
        let db = self.db.get();
        let t = tokens.as_array();
        let vocab = db.db.tokenizer().vocab_size() as i64;
        let rows = t
            .outer_iter()
            .map(|r| {
                r.iter()
                    .map(|&x| {
                        if (0..vocab).contains(&x) {
                            Ok(x as u32)
                        } else {
                            Err(err(format!(
                                "token {x} is outside the tokenizer's vocabulary of {vocab}"
                            )))
                        }
                    })
                    .collect::<PyResult<Vec<u32>>>()
            })
            .collect::<PyResult<Vec<_>>>()?;
        let origins = match &documents {
            None => None,
            Some(names) if names.len() != rows.len() => {
                return Err(err(format!(
                    "documents has {} ids for {} rows",
                    names.len(),
                    rows.len()
                )))
            }
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        Ok(Origin {
                            document: db.document(n)?,
                            start: 0,
                        })
                    })
                    .collect::<PyResult<Vec<_>>>()?,
            ),
        };
        let (d, e, k) = (db.db.clone(), self.embedder.clone(), self.k);
        let excluded = self.excluded.clone();
        let n = py
            .allow_threads(|| {
                let r = retro_pipeline::Retriever::new(&d, e.as_ref(), d.tokenizer(), k)?
                    .with_excluded_documents(excluded);
                let filter = if origins.is_some() {
                    Filter::SameDocument
                } else {
                    Filter::None
                };
                r.retrieve(&rows, origins.as_deref(), filter)
            })
            .map_err(err)?;
        let a = neighbours_array(&n.tokens)?;
        Ok(a.into_pyarray(py))
    }
}

/// Training sequences with precomputed neighbours (`retro dataset build`).
#[pyclass(frozen, module = "retro_rs")]
struct Dataset {
    ds: Arc<retro_pipeline::Dataset>,
    db: Py<Database>,
}

fn split(name: &str) -> PyResult<Split> {
    match name {
        "train" => Ok(Split::Train),
        "valid" | "validation" => Ok(Split::Valid),
        other => Err(err(format!(
            "split {other:?}: must be \"train\" or \"valid\""
        ))),
    }
}

#[pymethods]
impl Dataset {
    /// Builds a dataset at `out` from `db`, as `retro dataset build` does: sequences of `seq_len`
    /// tokens cut from the database's documents, each chunk's `k` neighbours precomputed with
    /// the same-document filter. Documents whose id contains one of `hold_out_matching` form the
    /// validation split and never serve as neighbours; without any, `valid_fraction` of the
    /// documents (seeded) does. `progress(done, total)` is called per sequence written.
    #[staticmethod]
    #[pyo3(signature = (db, out, *, seq_len = 512, k = 2, seed = 0, hold_out_matching = vec![],
        valid_fraction = 0.1, overwrite = false, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn build(
        py: Python<'_>,
        db: Py<Database>,
        out: PathBuf,
        seq_len: usize,
        k: usize,
        seed: u64,
        hold_out_matching: Vec<String>,
        valid_fraction: f64,
        overwrite: bool,
        progress: Option<PyObject>,
    ) -> PyResult<Self> {
        let d = db.get().db.clone();
        let bar = TerminalBar::unless_given(py, &progress);
        let progress = progress.or_else(|| bar.callback(py));
        let interrupt = Interrupt::new();
        let params = retro_pipeline::DatasetParams {
            seq_len,
            k,
            seed,
            held_out_matching: hold_out_matching,
            valid_fraction,
            cancel: interrupt.cancel.clone(),
            ..Default::default()
        };
        let report = |done: usize, total: usize| {
            interrupt.poll(|py| match &progress {
                Some(cb) => cb.call1(py, (done, total)),
                None => Ok(py.None()),
            })
        };
        let r = py.allow_threads(|| {
            retro_pipeline::Dataset::build_with(&d, &params, &out, overwrite, &report)
                .map_err(|e| e.to_string())
        });
        bar.close(py);
        let ds = interrupt.result(py, r)?;
        Ok(Self {
            ds: Arc::new(ds),
            db,
        })
    }

    /// Opens the dataset at `path` over `db`, the database it was built from.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf, db: Py<Database>) -> PyResult<Self> {
        let d = db.get().db.clone();
        let ds = py
            .allow_threads(|| retro_pipeline::Dataset::open(&path, &d))
            .map_err(err)?;
        Ok(Self {
            ds: Arc::new(ds),
            db,
        })
    }

    /// The dataset's content id (16 hex digits), as `retro dataset info` prints it.
    #[getter]
    fn id(&self) -> String {
        self.ds.meta().dataset_id.to_string()
    }

    /// Sequences in a split.
    #[pyo3(signature = (split_name = "train"))]
    fn len(&self, split_name: &str) -> PyResult<usize> {
        Ok(self.ds.len(split(split_name)?))
    }

    fn __len__(&self) -> usize {
        self.ds.len(Split::Train)
    }

    /// Ids of the documents held out of training (and never neighbours).
    #[getter]
    fn held_out_documents(&self) -> Vec<String> {
        self.ds
            .meta()
            .held_out_documents
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The sequences at `indices`: a dict of `x` and `y` `[batch, seq_len]` and `neighbours`
    /// `[batch, chunks, k, 2 * chunk_len]` (int64), and `documents`, the id of the document
    /// each sequence comes from.
    #[pyo3(signature = (indices, split_name = "train"))]
    fn batch<'py>(
        &self,
        py: Python<'py>,
        indices: Vec<usize>,
        split_name: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = split(split_name)?;
        let n = self.ds.len(s);
        if let Some(bad) = indices.iter().find(|&&i| i >= n) {
            return Err(err(format!(
                "index {bad} is out of range: the {split_name} split has {n} sequences"
            )));
        }
        if indices.is_empty() {
            return Err(err("indices must not be empty"));
        }
        let (ds, db) = (self.ds.clone(), self.db.get().db.clone());
        let b = py.allow_threads(|| ds.batch(&db, s, &indices));
        let long = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
        let d = PyDict::new(py);
        let xy = |v: &[u32]| Array2::from_shape_vec((b.batch, b.seq_len), long(v)).map_err(err);
        d.set_item("x", xy(&b.x)?.into_pyarray(py))?;
        d.set_item("y", xy(&b.y)?.into_pyarray(py))?;
        let ret = neighbours_array(&b.ret)?;
        d.set_item("neighbours", ret.into_pyarray(py))?;
        let store = db.store();
        let docs: Vec<String> = b
            .origins
            .iter()
            .map(|o| store.document(o.document).id.clone())
            .collect();
        d.set_item("documents", docs)?;
        Ok(d)
    }
}

#[pymodule]
fn retro_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("RetroError", m.py().get_type::<RetroError>())?;
    m.add_class::<Database>()?;
    m.add_class::<Retriever>()?;
    m.add_class::<Dataset>()?;
    Ok(())
}

/// A neighbour block as the int64 array `[B, C, K, N]` PyTorch indexes with.
fn neighbours_array(block: &retro_pipeline::NeighbourBlock) -> PyResult<Array4<i64>> {
    let [b, c, k, n] = block.shape();
    let values = block.as_slice().iter().map(|&x| i64::from(x)).collect();
    Array4::from_shape_vec((b, c, k, n), values).map_err(err)
}

/// The bar a build draws unasked: with no `progress` callback given and standard error a
/// terminal, `retro_rs.progress_bar()` (tqdm), if tqdm is installed; otherwise none.
struct TerminalBar(Option<PyObject>);

impl TerminalBar {
    fn unless_given(py: Python<'_>, progress: &Option<PyObject>) -> Self {
        if progress.is_some() {
            return Self(None);
        }
        let tty = py
            .import("sys")
            .and_then(|sys| sys.getattr("stderr")?.call_method0("isatty")?.is_truthy())
            .unwrap_or(false);
        // Without tqdm, progress_bar() raises ImportError: no bar, as before.
        let bar = tty
            .then(|| {
                py.import("retro_rs.progress")
                    .and_then(|m| m.getattr("progress_bar")?.call0())
                    .ok()
            })
            .flatten();
        Self(bar.map(|b| b.unbind()))
    }

    fn callback(&self, py: Python<'_>) -> Option<PyObject> {
        self.0.as_ref().map(|b| b.clone_ref(py))
    }

    /// Closes the last stage's bar (the builds do not say when they end).
    fn close(&self, py: Python<'_>) {
        if let Some(b) = &self.0 {
            let _ = b.call_method0(py, "close");
        }
    }
}
