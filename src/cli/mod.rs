//! Argument parsing and printing for each `retro` subcommand; the work lives in the crates.

pub mod base;
pub mod bench_generate;
pub mod bench_index;
pub mod bench_model;
pub mod bench_pipeline;
pub mod bench_retrofit;
pub mod bench_scale;
pub mod bench_serve;
pub mod choices;
pub mod common;
pub mod dataset;
pub mod demo;
pub mod demo_retrofit;
pub mod eval;
pub mod generate;
pub mod index;
pub mod model;
pub mod serve;
pub mod tokenizer;
pub mod train;
