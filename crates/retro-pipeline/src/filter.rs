//! The self-retrieval filters: which database chunks may serve as neighbours of a query chunk.

use retro_index::{ChunkId, ChunkStore, DocumentId, Exclusion, KeyFilter};
use std::collections::HashMap;

/// Database regions that never serve as neighbours: per document, the token position from which
/// a candidate whose value (chunk + continuation) reaches it is dropped; 0 drops the whole document.
pub type Excluded = HashMap<DocumentId, usize>;

/// Where a sequence comes from in the database: its document and the token position of its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub document: DocumentId,
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

    /// The chunks that may not be neighbours of the query chunk starting at token `query_start`
    /// of `origin`'s document, as data an index evaluates next to the keys; `excluded` regions
    /// (held out) never may. A candidate is a chunk of `chunk_len` tokens whose value (chunk +
    /// continuation) spans `2 * chunk_len` tokens from its start.
    pub fn key_filter(
        &self,
        chunk_len: usize,
        origin: Option<Origin>,
        query_start: usize,
        excluded: &Excluded,
    ) -> KeyFilter {
        let value = 2 * chunk_len;
        // Held out from `from`: no value may reach it (start + value > from).
        let mut exclude: Vec<Exclusion> = excluded
            .iter()
            .map(|(&document, &from)| Exclusion {
                document,
                starts: (from + 1).saturating_sub(value)..usize::MAX,
            })
            .collect();
        exclude.sort_by_key(|e| (e.document, e.starts.start));
        let own = match (self, origin) {
            (Filter::None, _) | (_, None) => None,
            (Filter::SameDocument, Some(o)) => Some(Exclusion::document(o.document)),
            // |start - query_start| < n
            (Filter::Window(n), Some(o)) => Some(Exclusion {
                document: o.document,
                starts: (query_start + 1).saturating_sub(*n)..query_start + n,
            }),
            // The value overlaps [o.start, o.start + seq_len + chunk_len).
            (Filter::Sequence(seq_len), Some(o)) => Some(Exclusion {
                document: o.document,
                starts: (o.start + 1).saturating_sub(value)..o.start + seq_len + chunk_len,
            }),
        };
        exclude.extend(own);
        KeyFilter { exclude }
    }

    /// Whether database chunk `cand` may be a neighbour of the query chunk starting at token
    /// `query_start` of `origin`'s document (see [`Filter::key_filter`]).
    pub fn keeps(
        &self,
        store: &ChunkStore,
        cand: ChunkId,
        origin: Option<Origin>,
        query_start: usize,
        excluded: &Excluded,
    ) -> bool {
        self.key_filter(store.chunk_len(), origin, query_start, excluded)
            .keeps(store.document_of(cand), store.chunk_start(cand))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filters' definitions, written out per candidate.
    fn keeps_by_definition(
        f: Filter,
        cl: usize,
        doc: DocumentId,
        start: usize,
        origin: Option<Origin>,
        query_start: usize,
        excluded: &Excluded,
    ) -> bool {
        let value_end = start + 2 * cl;
        if excluded.get(&doc).is_some_and(|&from| value_end > from) {
            return false;
        }
        match (f, origin) {
            (Filter::None, _) | (_, None) => true,
            (Filter::SameDocument, Some(o)) => doc != o.document,
            (Filter::Window(n), Some(o)) => doc != o.document || start.abs_diff(query_start) >= n,
            (Filter::Sequence(seq_len), Some(o)) => {
                let span_end = o.start + seq_len + cl;
                doc != o.document || start >= span_end || value_end <= o.start
            }
        }
    }

    #[test]
    fn key_filter_matches_the_definitions() {
        let cl = 4;
        let excluded: Excluded = [(DocumentId(2), 0), (DocumentId(1), 37)]
            .into_iter()
            .collect();
        for f in [
            Filter::None,
            Filter::SameDocument,
            Filter::Window(0),
            Filter::Window(9),
            Filter::Sequence(16),
        ] {
            for o_start in [0, 3, 8, 40] {
                let origin = Origin {
                    document: DocumentId(1),
                    start: o_start,
                };
                for q in [o_start, o_start + 4, o_start + 12] {
                    for origin in [Some(origin), None] {
                        let kf = f.key_filter(cl, origin, q, &excluded);
                        for doc in (0..3).map(DocumentId) {
                            for start in 0..80 {
                                assert_eq!(
                                    kf.keeps(doc, start),
                                    keeps_by_definition(f, cl, doc, start, origin, q, &excluded),
                                    "{f} origin {origin:?} query {q} candidate doc {doc} start {start}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
