//! The corpus the index and pipeline benchmarks build their database from: the first documents
//! of a JSONL corpus, by default the shared Python docs.

use anyhow::Context;
use retro_index::{read_corpus, Corpus, CorpusOptions};
use std::path::Path;

/// The corpus the benchmarks read when none is given, under the shared data folder.
pub const DEFAULT_CORPUS: &str = "data/python-3.11-docs.jsonl";

/// The first `docs` documents of `path` (default: [`DEFAULT_CORPUS`] under
/// `retro_index::testdata::shared_dir()`), so that a benchmark's build fits its time.
pub fn first_documents(path: Option<&Path>, docs: usize) -> anyhow::Result<Corpus> {
    let path = path.map_or_else(
        || retro_index::testdata::shared_dir().join(DEFAULT_CORPUS),
        Path::to_path_buf,
    );
    let mut corpus = read_corpus(&path, &CorpusOptions::default())
        .with_context(|| format!("reading {}", path.display()))?;
    corpus.documents.truncate(docs);
    Ok(corpus)
}
