//! The neighbours of a batch of chunks as the model reads them: `[B, C, K, N]` tokens, row-major.

use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};

/// `K` neighbours (each `N` tokens: chunk + continuation) of each of `C` chunks of each of `B`
/// rows, in one buffer: what a dataset's batch and a retriever's answer hold, and what the
/// model's `ret` tensor is made from. Chunks are numbered over the whole batch (`i = row * C + c`).
///
/// ```
/// use retro_model::NeighbourBlock;
/// // 1 row, 2 chunks, K 2, N 3.
/// let block = NeighbourBlock::new((0..12).collect(), [1, 2, 2, 3])?;
/// assert_eq!(block.chunk(1), &[6, 7, 8, 9, 10, 11]);
/// assert_eq!(block.neighbour(1, 0), &[6, 7, 8]);
/// assert!(NeighbourBlock::new(vec![0; 5], [1, 2, 2, 3]).is_err());
/// # Ok::<(), retro_model::ModelError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourBlock {
    tokens: Vec<u32>,
    shape: [usize; 4],
}

impl NeighbourBlock {
    /// `tokens` of shape `[B, C, K, N]`: their number must be `B * C * K * N`.
    pub fn new(tokens: Vec<u32>, shape: [usize; 4]) -> Result<Self> {
        let want: usize = shape.iter().product();
        if tokens.len() != want {
            return Err(ModelError::shape(
                "neighbour block",
                "tokens",
                format!("{want}, the size of [B, C, K, N] = {shape:?}"),
                format!("{} tokens", tokens.len()),
            ));
        }
        Ok(Self { tokens, shape })
    }

    /// `[B, C, K, N]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    pub fn batch(&self) -> usize {
        self.shape[0]
    }
    pub fn chunks(&self) -> usize {
        self.shape[1]
    }
    pub fn k(&self) -> usize {
        self.shape[2]
    }
    pub fn neighbour_len(&self) -> usize {
        self.shape[3]
    }

    /// Row `b`'s neighbours, `[C, K, N]`.
    pub fn row(&self, b: usize) -> &[u32] {
        let per = self.shape[1] * self.shape[2] * self.shape[3];
        &self.tokens[b * per..(b + 1) * per]
    }

    /// Chunk `i`'s (of `B * C`) neighbours, `[K, N]`.
    pub fn chunk(&self, i: usize) -> &[u32] {
        let per = self.shape[2] * self.shape[3];
        &self.tokens[i * per..(i + 1) * per]
    }

    /// Chunk `i`'s (of `B * C`) `j`-th neighbour, `N` tokens.
    pub fn neighbour(&self, i: usize, j: usize) -> &[u32] {
        let n = self.shape[3];
        let at = (i * self.shape[2] + j) * n;
        &self.tokens[at..at + n]
    }

    /// All tokens, row-major.
    pub fn as_slice(&self) -> &[u32] {
        &self.tokens
    }

    /// All tokens, row-major, to overwrite in place (the shape stays).
    pub fn as_mut_slice(&mut self) -> &mut [u32] {
        &mut self.tokens
    }

    /// Row `i` takes row `j`'s neighbours, for each `(i, j)` of `moves` (from the rows as they
    /// were before any move).
    pub fn move_rows(&mut self, moves: &[(usize, usize)]) {
        if moves.is_empty() {
            return;
        }
        let original = self.tokens.clone();
        let per = self.shape[1] * self.shape[2] * self.shape[3];
        for &(i, j) in moves {
            self.tokens[i * per..(i + 1) * per].copy_from_slice(&original[j * per..(j + 1) * per]);
        }
    }

    /// A block from a `ret` tensor `[B, C, K, N]` of u32 ids.
    pub fn from_tensor(ret: &Tensor) -> Result<Self> {
        let &[b, c, k, n] = ret.dims() else {
            return Err(ModelError::shape(
                "neighbour block",
                "ret",
                "must be [B, C, K, N]",
                format!("{:?}", ret.dims()),
            ));
        };
        Self::new(
            ret.flatten_all()?
                .to_dtype(candle_core::DType::U32)?
                .to_vec1()?,
            [b, c, k, n],
        )
    }

    /// The largest id, if any (ids must be below the model's vocabulary).
    pub fn max_id(&self) -> Option<u32> {
        self.tokens.iter().copied().max()
    }

    /// The model's `ret` tensor `[B, C, K, N]` (u32) on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let [b, c, k, n] = self.shape;
        Ok(Tensor::from_slice(&self.tokens, (b, c, k, n), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_the_strides_of_b_c_k_n() {
        let b = NeighbourBlock::new((0..2 * 3 * 2 * 4).collect(), [2, 3, 2, 4]).unwrap();
        assert_eq!(b.row(1)[0], 24);
        assert_eq!(b.chunk(4)[0], 32); // row 1, chunk 1
        assert_eq!(b.neighbour(4, 1), &[36, 37, 38, 39]);
        let t = b.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2, 4]);
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            b.as_slice()
        );
        let mut m = b.clone();
        m.move_rows(&[(0, 1), (1, 0)]);
        assert_eq!((m.row(0), m.row(1)), (b.row(1), b.row(0)));
        let e = NeighbourBlock::new(vec![0; 3], [1, 1, 2, 2]).unwrap_err();
        assert!(e.to_string().contains("[1, 1, 2, 2]"), "{e}");
    }
}
