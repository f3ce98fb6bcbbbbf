//! The embedder trait: what turns chunk text into a retrieval key.

use crate::error::Result;

/// Identity of an embedder: a database refuses keys from another one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmbedderId {
    /// e.g. `bert:all-MiniLM-L6-v2` or `lexical-ngram-v1`.
    pub name: String,
    /// Hex SHA-256 of the weights (or of the configuration for weight-free embedders).
    pub weights_hash: String,
    pub dim: usize,
}

impl std::fmt::Display for EmbedderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.weights_hash[..self.weights_hash.len().min(12)];
        write!(f, "{} (dim {}, weights {h})", self.name, self.dim)
    }
}

/// Computes keys (L2-normalised embeddings) of texts.
pub trait Embedder: Send + Sync {
    fn id(&self) -> EmbedderId;
    fn dim(&self) -> usize;
    /// One vector of `dim()` floats per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
}

/// Normalises in place to unit L2 norm; a zero vector stays zero.
pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 && n.is_finite() {
        v.iter_mut().for_each(|x| *x /= n);
    }
}
