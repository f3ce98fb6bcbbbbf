//! # retro-pipeline
//!
//! Composes `retro-index` and `retro-model`: for every chunk of an input it fetches the K nearest
//! neighbour chunks and their continuations and returns the `[B, C, K, neighbour_len]` tensor the model
//! eats; precomputes neighbours for training sets; drives training, generation and evaluation.
//!
//! ```
//! use retro_index::{BuildOptions, Corpus, Database, Document, DocumentId, LexicalEmbedder, LmTokenizer};
//! use retro_pipeline::{Filter, Gate, Origin, Retriever};
//!
//! let corpus = Corpus::from_documents([
//!     Document { id: "a".into(), source: "mem".into(), text: "The cat sat on the mat. ".repeat(8) },
//!     Document { id: "b".into(), source: "mem".into(), text: "Quantum fields fluctuate. ".repeat(8) },
//! ]);
//! let tokenizer = LmTokenizer::char_from_corpus(&corpus);
//! let embedder = LexicalEmbedder::new(64)?;
//! let dir = tempfile::tempdir().unwrap();
//! let opts = BuildOptions { chunk_len: 8, ..Default::default() };
//! let db = Database::build(&corpus, &tokenizer, &embedder, &opts, &dir.path().join("db"))?;
//!
//! let retriever = Retriever::new(&db, &embedder, &tokenizer, 2)?;
//! let x = vec![tokenizer.encode("The cat sat on the mat. The")?]; // T = 27: C = 3 chunks of 8
//! let ret = retriever.retrieve(&x, None, Filter::None)?;
//! assert_eq!(ret.to_tensor(&candle_core::Device::Cpu)?.dims(), &[1, 3, 2, 16]);
//! // Training: never a neighbour from the sequence's own document.
//! let origin = Origin { document: DocumentId(0), start: 0 };
//! let ret = retriever.retrieve(&x, Some(&[origin]), Filter::SameDocument)?;
//! assert!(ret.chunk_ids.iter().flatten().all(|&c| db.store().document_of(c) != DocumentId(0)));
//! // The coherent gate: read a chunk's neighbours only where they continue the neighbours of
//! // the chunks before (another edition of the text does; look-alike fragments do not).
//! let gated = retriever.clone().with_gate(Some(Gate::coherent(2, 8)?));
//! let ret = gated.retrieve(&x, None, Filter::None)?;
//! let keep = ret.keep.expect("a gate gives one 0/1 per chunk");
//! assert_eq!((keep.len(), keep[0]), (3, 0.0)); // the first chunk has none before it
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod base;
pub mod dataset;
pub mod decoder;
pub mod error;
pub mod eval;
pub mod filter;
pub mod gate;
pub mod generate;
pub mod metrics;
pub mod near_duplicates;
pub mod plot;
pub mod retriever;
pub mod run_database;
pub mod schedule;
pub mod trainee;
pub mod trainer;

pub use base::{import_gguf, BaseDir, BaseMeta};
pub use dataset::{Batch, Dataset, DatasetId, DatasetMeta, DatasetParams, Split};
pub use decoder::Decoder;
pub use error::{PipelineError, Result};
pub use eval::{
    evaluate, Condition, ConditionReport, EvalOptions, EvalReport, GatedScores, OverlapBucket,
    Scorer, Scores,
};
pub use filter::{Filter, Origin};
pub use gate::{longest_common_substring, Gate};
pub use generate::{generate, step_together, Event, Finish, Generation, Sampling, StepInput};
pub use metrics::{MetricsLog, StepMetrics};
pub use retriever::{KeysOnly, Neighbours, Retriever, Text, Timings};
pub use retro_model::NeighbourBlock;
pub use run_database::{DocumentSets, RunDatabase};
pub use schedule::Schedule;
pub use trainee::Trainee;
pub use trainer::{
    train, train_retrofit, CheckpointMeta, ResumePoint, RetrofitSpec, Run, RunModel, RunState,
    Start, TrainConfig, TrainData,
};
