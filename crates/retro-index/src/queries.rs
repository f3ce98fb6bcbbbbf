//! A batch of query keys in one buffer: what every search of a [`crate::KeyIndex`] and a
//! [`crate::Database`] takes.

use crate::embed::l2_normalize;
use crate::error::{IndexError, Result};
use rayon::prelude::*;

/// `len` query keys of `dim` floats each, row-major in one buffer.
///
/// ```
/// use retro_index::Queries;
/// let q = Queries::from_rows(&[vec![3.0, 4.0], vec![0.0, 2.0]])?.normalised();
/// assert_eq!((q.len(), q.dim()), (2, 2));
/// assert_eq!(q.get(0), &[0.6, 0.8]);
/// assert!(Queries::from_rows(&[vec![1.0, 2.0], vec![1.0]]).is_err()); // names row 1
/// # Ok::<(), retro_index::IndexError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Queries {
    data: Vec<f32>,
    dim: usize,
}

impl Queries {
    /// `data.len() / dim` keys: `dim` must divide `data.len()` (and be > 0 unless `data` is
    /// empty).
    pub fn new(data: Vec<f32>, dim: usize) -> Result<Self> {
        // `is_multiple_of(0)` holds only for 0: no keys of width 0.
        if !data.len().is_multiple_of(dim) {
            return Err(IndexError::invalid(
                "query dimension",
                dim,
                format!("{} floats are not whole keys of {dim}", data.len()),
            ));
        }
        Ok(Self { data, dim })
    }

    /// Keys given as rows (an embedder's output): each must be as wide as the first.
    pub fn from_rows<R: AsRef<[f32]>>(rows: &[R]) -> Result<Self> {
        let dim = rows.first().map_or(0, |r| r.as_ref().len());
        let mut data = Vec::with_capacity(rows.len() * dim);
        for (i, r) in rows.iter().enumerate() {
            let r = r.as_ref();
            if r.len() != dim {
                return Err(IndexError::invalid(
                    "vector length",
                    r.len(),
                    format!("query {i}: query 0 has {dim}"),
                ));
            }
            data.extend_from_slice(r);
        }
        Ok(Self { data, dim })
    }

    /// One key.
    pub fn one(key: &[f32]) -> Self {
        Self {
            data: key.to_vec(),
            dim: key.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Key `i` (panics past the end, as slices do).
    pub fn get(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    /// The keys in order.
    pub fn iter(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.dim.max(1))
    }
    /// The keys in order, for rayon.
    pub fn par_iter(&self) -> rayon::slice::ChunksExact<'_, f32> {
        self.data.par_chunks_exact(self.dim.max(1))
    }
    /// The first `n` keys (all if fewer), copied.
    pub fn first(&self, n: usize) -> Queries {
        let n = n.min(self.len());
        Self {
            data: self.data[..n * self.dim].to_vec(),
            dim: self.dim,
        }
    }
    /// All keys, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Every key `dim` wide (an index's) with finite values: an error names the query.
    pub fn check(&self, dim: usize) -> Result<()> {
        if !self.is_empty() && self.dim != dim {
            return Err(IndexError::invalid(
                "vector length",
                self.dim,
                format!("queries: the index has dimension {dim}"),
            ));
        }
        if let Some(p) = self.data.iter().position(|x| !x.is_finite()) {
            let (i, c) = (p / self.dim, p % self.dim);
            return Err(IndexError::invalid(
                "vector component",
                self.data[p],
                format!("query {i}: component {c} is not finite"),
            ));
        }
        Ok(())
    }

    /// The keys at unit length, as the stored keys are (a zero key stays zero), in place.
    pub fn normalised(mut self) -> Self {
        let dim = self.dim.max(1);
        self.data.par_chunks_mut(dim).for_each(l2_normalize);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_batches_are_errors_that_name_the_query() {
        assert!(Queries::new(vec![1.0; 5], 2)
            .unwrap_err()
            .to_string()
            .contains("5 floats are not whole keys of 2"));
        assert!(Queries::new(vec![1.0], 0).is_err());
        let empty = Queries::new(vec![], 0).unwrap();
        assert_eq!((empty.len(), empty.iter().count()), (0, 0));
        empty.check(384).unwrap();
        let q = Queries::new(vec![1.0, 2.0, f32::NAN, 4.0], 2).unwrap();
        let e = q.check(2).unwrap_err().to_string();
        assert!(e.contains("query 1: component 0 is not finite"), "{e}");
        let e = q.check(3).unwrap_err().to_string();
        assert!(e.contains("the index has dimension 3"), "{e}");
        let e = Queries::from_rows(&[vec![1.0, 2.0], vec![3.0]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("query 1"), "{e}");
    }

    #[test]
    fn rows_and_buffer_agree_and_normalise_in_place() {
        let rows = vec![vec![3.0f32, 4.0], vec![0.0, 0.0], vec![0.0, -2.0]];
        let a = Queries::from_rows(&rows).unwrap();
        let b = Queries::new(rows.concat(), 2).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [&rows[0][..], &rows[1], &rows[2]]
        );
        let n = a.normalised();
        assert_eq!(n.as_slice(), &[0.6, 0.8, 0.0, 0.0, 0.0, -1.0]);
        assert_eq!(Queries::one(&[1.0, 2.0]).len(), 1);
    }
}
