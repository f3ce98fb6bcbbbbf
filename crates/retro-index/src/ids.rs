//! Ids that say in their type what they name.

use std::fmt;

/// A database's content id: 16 hex digits of the SHA-256 of its parameters and files
/// ([`crate::database::content_id`]), the same on every machine for the same inputs. Datasets
/// and training runs record the id of the database they were built on, and refuse another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct DatabaseId(String);

impl DatabaseId {
    pub(crate) fn new(id: String) -> Self {
        Self(id)
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
