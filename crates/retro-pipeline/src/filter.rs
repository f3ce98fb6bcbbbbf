//! The self-retrieval filters: which database chunks may serve as neighbours of a query chunk.

use retro_index::ChunkStore;
use std::collections::HashMap;

/// Database regions that never serve as neighbours: per document, the token position from which
/// a candidate whose value (chunk + continuation) reaches it is dropped; 0 drops the whole document.
pub type Excluded = HashMap<usize, usize>;

/// Where a sequence comes from in the database: its document and the token position of its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub document: usize,
    pub start: usize,
}

/// Chosen by the caller: `None` for generation, `SameDocument` for training (the paper, Megatron),
/// `Sequence(seq_len)` (or the older `Window(n)`) for corpora that are one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Filter {
    None,
    /// No neighbour from the document the sequence comes from.
    SameDocument,
    /// No neighbour from the sequence's document whose start lies within `n` tokens of the query
    /// chunk's start.
    Window(usize),
    /// No neighbour from the sequence's document whose value (chunk + continuation) overlaps the
    /// training sequence of `seq_len` tokens or the chunk after it: nothing the model is asked to
    /// predict can be read from a neighbour.
    Sequence(usize),
}

impl std::str::FromStr for Filter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Filter::None),
            "same-document" => Ok(Filter::SameDocument),
            _ => match (
                s.strip_prefix("window:").map(str::parse::<usize>),
                s.strip_prefix("sequence:").map(str::parse::<usize>),
            ) {
                (Some(Ok(n)), _) => Ok(Filter::Window(n)),
                (_, Some(Ok(n))) if n > 0 => Ok(Filter::Sequence(n)),
                _ => Err(format!(
                    "unknown filter `{s}` (expected none, same-document, sequence:SEQ_LEN or window:N)"
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
            Filter::Sequence(n) => write!(f, "sequence:{n}"),
        }
    }
}

impl Filter {
    pub fn needs_origin(&self) -> bool {
        !matches!(self, Filter::None)
    }

    /// Whether database chunk `cand` may be a neighbour of the query chunk starting at token
    /// `query_start` of `origin`'s document; `excluded` regions (held out) never may.
    pub fn keeps(
        &self,
        store: &ChunkStore,
        cand: usize,
        origin: Option<Origin>,
        query_start: usize,
        excluded: &Excluded,
    ) -> bool {
        let doc = store.document_of(cand);
        let start = store.chunk_start(cand);
        let value_end = start + 2 * store.chunk_len();
        if excluded.get(&doc).is_some_and(|&from| value_end > from) {
            return false;
        }
        match (self, origin) {
            (Filter::None, _) | (_, None) => true,
            (Filter::SameDocument, Some(o)) => doc != o.document,
            (Filter::Window(n), Some(o)) => doc != o.document || start.abs_diff(query_start) >= *n,
            (Filter::Sequence(seq_len), Some(o)) => {
                let span_end = o.start + seq_len + store.chunk_len();
                doc != o.document || start >= span_end || value_end <= o.start
            }
        }
    }
}
