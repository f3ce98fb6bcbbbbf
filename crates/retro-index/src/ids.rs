//! Ids that say in their type what they name.

use std::fmt;

/// A database's content id: 16 hex digits of the SHA-256 of its parameters and files
/// ([`retro_format::FileTable::content_id`]), the same on every machine for the same inputs. Datasets
/// and training runs record the id of the database they were built on, and refuse another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct DatabaseId(String);

impl DatabaseId {
    pub(crate) fn new(id: String) -> Self {
        Self(id)
    }

    /// Sixteen zeros: the id of keys indexed outside any database (a benchmark's Milvus
    /// collection), which names no built database.
    pub fn placeholder() -> Self {
        Self("0".repeat(16))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatabaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A chunk of a database's store: its index, `0 .. chunks`, in document order. Hits, neighbours
/// and filters name chunks by it. Serialised as the bare number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct ChunkId(pub usize);

/// A document of a database's corpus: its index, `0 .. documents`, in corpus order (its name is
/// in `documents.json`). Serialised as the bare number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct DocumentId(pub usize);

// Displayed as the bare index, as the files and Milvus' filter expressions hold it.
impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
