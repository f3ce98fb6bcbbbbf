//! # retro-bench
//!
//! The measurements behind `retro bench` and `docs/PERF.md`: model forward and train-step
//! throughput ([`model`]), cached against recomputed generation ([`generate`]), the retrieval
//! pipeline ([`pipeline`]), the HNSW index ([`index`]) and the embedded graph against a vector
//! store ([`store`]), that graph's scale curve ([`scale`]), `retro serve` under concurrent clients ([`serve`]), and the corpus prefix the index and
//! pipeline benchmarks build from ([`corpus`]). The `retro` binary parses arguments and prints;
//! the criterion benches in `benches/` and `examples/profile.rs` reuse the same inputs.
//!
//! This is not a library API: it is not published, and it changes with the benchmarks.
//!
//! ```
//! use retro_bench::model::{median, ModelBenchSpec};
//!
//! let spec = ModelBenchSpec::labml_small(); // labml's training batch: B 4, T 512
//! assert_eq!(spec.tokens(), 4 * 512);
//! assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0); // what every timing reports
//! ```

pub mod corpus;
pub mod generate;
pub mod index;
pub mod model;
pub mod pipeline;
pub mod retrofit;
pub mod scale;
pub mod serve;
pub mod store;
