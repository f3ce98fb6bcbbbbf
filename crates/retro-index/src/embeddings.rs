//! The stored keys: `n x dim` little-endian f32, memory-mapped.

use crate::error::{IndexError, Result};
use crate::fsutil::{check_header, header, map_file, write_atomic};
use std::path::Path;

pub const EMBEDDINGS_FILE: &str = "embeddings.bin";
const MAGIC: &[u8; 8] = b"RETROEMB";
const FORMAT_VERSION: u32 = 1;

/// Memory-mapped key matrix (row i = chunk i).
pub struct Embeddings {
    map: memmap2::Mmap,
    dim: usize,
}

impl Embeddings {
    /// Writes row-major vectors (atomically).
    pub fn write(path: &Path, vectors: &[f32]) -> Result<()> {
        write_atomic(path, |w| {
            w.write_all(&header(MAGIC, FORMAT_VERSION))?;
            w.write_all(bytemuck::cast_slice(vectors))
        })
    }

    /// Maps the file and checks it holds `n` rows of `dim`.
    pub fn open(path: &Path, n: usize, dim: usize) -> Result<Self> {
        let map = map_file(path)?;
        let payload = check_header(path, &map, MAGIC, FORMAT_VERSION)?;
        if payload.len() != n * dim * 4 {
            return Err(IndexError::corrupt(
                path,
                format!("{} bytes, expected {n} x {dim} f32", payload.len()),
            ));
        }
        Ok(Self { map, dim })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.as_slice().len() / self.dim.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All rows, row-major.
    pub fn as_slice(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[crate::fsutil::HEADER_LEN..])
    }
    /// Row `i`. Panics if out of range.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.as_slice()[i * self.dim..(i + 1) * self.dim]
    }
}

/// Writes row-major `n x dim` f32 vectors as a NumPy `.npy` file (version 1.0, little-endian).
pub fn write_npy(path: &Path, vectors: &[f32], dim: usize) -> Result<()> {
    let n = vectors.len() / dim.max(1);
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {dim}), }}");
    // magic(6) + version(2) + len(2) + dict + '\n' padded to a multiple of 64
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    while 10 + dict.len() + 1 < total {
        dict.push(' ');
    }
    dict.push('\n');
    write_atomic(path, |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(dict.len() as u16).to_le_bytes())?;
        w.write_all(dict.as_bytes())?;
        w.write_all(bytemuck::cast_slice(vectors))
    })
}
