//! The keys: `n x dim` f32, row-major, memory-mapped from `embeddings.bin` or held in memory.
//! Cloning shares the rows, so the graph and the database read one copy.

use crate::array_file::{check_header, header, map_file};
use crate::error::{IndexError, Result};
use crate::ids::ChunkId;
use retro_format::write_atomic;
use std::path::Path;
use std::sync::Arc;

pub const EMBEDDINGS_FILE: &str = "embeddings.bin";
const MAGIC: &[u8; 8] = b"RETROEMB";
const FORMAT_VERSION: u32 = 1;

/// The key matrix (row i = chunk i).
#[derive(Clone)]
pub struct Embeddings {
    rows: Rows,
    dim: usize,
}

#[derive(Clone)]
enum Rows {
    /// `embeddings.bin`, header included.
    Mapped(Arc<memmap2::Mmap>),
    Owned(Arc<Vec<f32>>),
}

impl Embeddings {
    /// Writes row-major vectors (atomically).
    pub fn write(path: &Path, vectors: &[f32]) -> Result<()> {
        Ok(write_atomic(path, |w| {
            w.write_all(&header(MAGIC, FORMAT_VERSION))?;
            w.write_all(bytemuck::cast_slice(vectors))
        })?)
    }

    /// Maps the file and checks it holds `n` rows of `dim`.
    pub fn open(path: &Path, n: usize, dim: usize) -> Result<Self> {
        let map = map_file(path)?;
        let payload = check_header(path, &map, MAGIC, FORMAT_VERSION)?;
        if Some(payload.len()) != n.checked_mul(dim).and_then(|x| x.checked_mul(4)) {
            return Err(IndexError::corrupt(
                path,
                format!("{} bytes, expected {n} x {dim} f32", payload.len()),
            ));
        }
        Ok(Self {
            rows: Rows::Mapped(Arc::new(map)),
            dim,
        })
    }

    /// Keys held in memory: `vectors` is `n * dim` row-major.
    pub fn from_vec(vectors: Vec<f32>, dim: usize) -> Result<Self> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(IndexError::invalid(
                "dim",
                dim,
                format!("{} floats are not whole rows", vectors.len()),
            ));
        }
        Ok(Self {
            rows: Rows::Owned(Arc::new(vectors)),
            dim,
        })
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
        match &self.rows {
            Rows::Mapped(map) => bytemuck::cast_slice(&map[crate::array_file::HEADER_LEN..]),
            Rows::Owned(v) => v,
        }
    }
    /// The key of `chunk` (a chunk's id is its key's row). Panics if out of range.
    pub fn row(&self, chunk: ChunkId) -> &[f32] {
        &self.as_slice()[chunk.0 * self.dim..(chunk.0 + 1) * self.dim]
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
    Ok(write_atomic(path, |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(dict.len() as u16).to_le_bytes())?;
        w.write_all(dict.as_bytes())?;
        w.write_all(bytemuck::cast_slice(vectors))
    })?)
}

/// Reads a little-endian float32 2-D `.npy` file (as written by [`write_npy`]): `(rows, dim, data)`.
pub fn read_npy(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| IndexError::io(path, e))?;
    let bad = |m: &str| IndexError::corrupt(path, m.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| bad("truncated header"))?;
    let header = String::from_utf8_lossy(header);
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected little-endian float32 in C order"));
    }
    let shape = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(['(', ')']).nth(1))
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let [rows, dim] = dims[..] else {
        return Err(bad("expected a 2-D array"));
    };
    let data = &bytes[start + hlen..];
    if Some(data.len()) != rows.checked_mul(dim).and_then(|x| x.checked_mul(4)) {
        return Err(bad("data size does not match the shape"));
    }
    Ok((
        rows,
        dim,
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}
