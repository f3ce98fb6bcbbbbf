//! The self-retrieval filters: which database chunks may serve as neighbours of a query chunk.

use retro_index::ChunkStore;
use std::collections::HashSet;

/// Where a sequence comes from in the database: its document and the token position of its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub document: usize,
    pub start: usize,
}

/// Chosen by the caller: `None` for generation, `SameDocument` for training (the paper, Megatron),
/// `Window(n)` for corpora that are one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Filter {
    None,
    /// No neighbour from the document the sequence comes from.
    SameDocument,
    /// No neighbour from the sequence's document whose start lies within `n` tokens of the query
    /// chunk's start.
    Window(usize),
}

impl std::str::FromStr for Filter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Filter::None),
            "same-document" => Ok(Filter::SameDocument),
            _ => match s.strip_prefix("window:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Filter::Window(n)),
                _ => Err(format!(
                    "unknown filter `{s}` (expected none, same-document or window:N)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Filter::None => write!(f, "none"),
            Filter::SameDocument => write!(f, "same-document"),
            Filter::Window(n) => write!(f, "window:{n}"),
        }
    }
}

impl Filter {
    pub fn needs_origin(&self) -> bool {
        !matches!(self, Filter::None)
    }

    /// Whether database chunk `cand` may be a neighbour of the query chunk starting at token
    /// `query_start` of `origin`'s document; `excluded` documents (held out) never may.
    pub fn keeps(
        &self,
        store: &ChunkStore,
        cand: usize,
        origin: Option<Origin>,
        query_start: usize,
        excluded: &HashSet<usize>,
    ) -> bool {
        let doc = store.document_of(cand);
        if excluded.contains(&doc) {
            return false;
        }
        match (self, origin) {
            (Filter::None, _) | (_, None) => true,
            (Filter::SameDocument, Some(o)) => doc != o.document,
            (Filter::Window(n), Some(o)) => {
                doc != o.document || store.chunk_start(cand).abs_diff(query_start) >= *n
            }
        }
    }
}
