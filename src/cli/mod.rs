//! Argument parsing and printing for each `retro` subcommand; the work lives in the crates.

pub mod bench_model;
pub mod model;
