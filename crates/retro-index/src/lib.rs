//! # retro-index: the RETRO retrieval database
//!
//! Corpus -> documents -> LM tokens -> chunks (never across a document boundary) -> frozen-BERT keys
//! -> HNSW graph, persisted in one directory with a versioned manifest (Borgeaud et al. 2022, section 2.3).
//!
//! - [`corpus`]: read text files, folders and JSONL into [`Document`]s.
//! - [`tokenizer`]: the LM tokenizer ([`LmTokenizer`]: labml characters or any `tokenizer.json`; [`train_bpe`]).
//! - [`store`]: [`ChunkStore`], memory-mapped tokens; `neighbour(i)` = chunk + continuation.
//! - [`embed`], [`bert`], [`lexical`]: the [`Embedder`] trait, [`BertEmbedder`] (candle) and the
//!   weight-free [`LexicalEmbedder`].
//! - [`hnsw`], [`distance`]: [`HnswIndex`], an HNSW graph built in parallel over the keys, with a
//!   SIMD `1 - dot` distance (hnsw_rs reads the graphs of older databases).
//! - [`key_index`], [`vector_store`]: the [`KeyIndex`] trait the searches go through, with the
//!   embedded graph ([`EmbeddedIndex`]) or, with the `milvus` feature, a Milvus collection
//!   (`milvus_store`); filters ([`KeyFilter`]) are data, evaluated next to the keys.
//! - [`database`]: [`Database::build`] (atomic) and [`Database::open`] (validated).
//!
//! ```
//! use retro_index::{BuildOptions, Corpus, Database, Document, DocumentId, HnswParams, LexicalEmbedder, LmTokenizer};
//!
//! let corpus = Corpus::from_documents([
//!     Document { id: "a".into(), source: "mem".into(), text: "The cat sat on the mat. ".repeat(8) },
//!     Document { id: "b".into(), source: "mem".into(), text: "Quantum fields fluctuate. ".repeat(8) },
//! ]);
//! let tokenizer = LmTokenizer::char_from_corpus(&corpus);
//! let embedder = LexicalEmbedder::new(64)?;
//! let dir = tempfile::tempdir().unwrap();
//! let opts = BuildOptions { chunk_len: 16, hnsw: HnswParams::default(), ..Default::default() };
//! Database::build(&corpus, &tokenizer, &embedder, &opts, &dir.path().join("db"))?;
//!
//! let db = Database::open(&dir.path().join("db"))?;
//! db.check_compatible(&tokenizer)?;
//! let hits = db.search_texts(&embedder, &["quantum fields"], 3, None)?;
//! let (chunk, _distance) = hits[0][0];
//! assert_eq!(db.store().document(db.store().document_of(chunk)).id, "b");
//! // The same-document filter: nothing from document 1 ("b").
//! let key = db.embeddings().row(chunk).to_vec();
//! let no_b = retro_index::KeyFilter { exclude: vec![retro_index::Exclusion::document(DocumentId(1))] };
//! let other = db.search_filtered(retro_index::Queries::one(&key), 3, None, &[no_b])?;
//! assert!(other[0].iter().all(|&(c, _)| db.store().document_of(c) == DocumentId(0)));
//! let value = db.store().neighbour(chunk); // chunk + continuation, 2 * chunk_len tokens
//! assert_eq!(value.len(), 32);
//! println!("{}", tokenizer.decode(&value)?);
//! # Ok::<(), retro_index::IndexError>(())
//! ```

pub mod array_file;
pub mod bert;
pub mod bible;
pub mod byte_level_bpe;
pub mod cancel;
pub mod corpus;
pub mod database;
pub mod distance;
pub mod embed;
pub mod embeddings;
pub mod error;
mod graph;
pub mod hnsw;
pub mod ids;
pub mod key_index;
pub mod lexical;
#[cfg(feature = "milvus")]
pub mod milvus_store;
pub mod packed_bert;
pub mod panic_guard;
pub mod queries;
pub mod store;
/// Locating `../shared` for this workspace's tests and benchmarks; not part of the API.
#[doc(hidden)]
pub mod testdata;
pub mod tokenizer;
pub mod vector_store;

pub use bert::{BertEmbedder, BertOptions};
pub use byte_level_bpe::ByteLevelBpe;
pub use cancel::Cancel;
pub use corpus::{read_corpus, Corpus, CorpusOptions, Document};
pub use database::{
    BuildOptions, Counts, Database, Manifest, OpenOptions, ProgressFn, RecallReport, Stage,
};
pub use distance::DistUnitDot;
pub use embed::{l2_normalize, Embedder, EmbedderId};
pub use embeddings::{read_npy, write_npy, Embeddings};
pub use error::{IndexError, Result};
pub use hnsw::{
    brute_force, brute_force_batch, mean_recall_at_k, recall_at_k, Hit, HnswIndex, HnswParams, Walk,
};
pub use ids::{ChunkId, DatabaseId, DocumentId};
pub use key_index::{EmbeddedIndex, Exclusion, IndexDescription, KeyFilter, KeyIndex, KeyRef};
pub use lexical::{LexicalEmbedder, LexicalFeatures};
pub use queries::Queries;
pub use store::{ChunkEntry, ChunkStore, DocumentEntry};
pub use tokenizer::{train_bpe, CharTokenizer, LmTokenizer};
pub use vector_store::{MilvusIndexParams, MilvusLocation, MilvusOptions, VectorStoreRecord};

/// Re-exported so callers can pick a device for [`BertEmbedder`].
pub use candle_core::Device;
