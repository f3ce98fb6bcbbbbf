//! The small versioned header of the crate's binary array files (tokens, chunks, keys, graph)
//! and their read-only maps.

use crate::error::{IndexError, Result};
use retro_format::FormatError;
use std::path::Path;

#[cfg(target_endian = "big")]
compile_error!("retro-index stores little-endian arrays and views them in place: big-endian targets are not supported");

/// Bytes of the header of every binary array file: 8 magic bytes, u32 format version, u32 reserved.
/// 16 bytes keep the payload aligned for u32, u64 and f32 views.
pub const HEADER_LEN: usize = 16;

pub(crate) fn header(magic: &[u8; 8], version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// Checks the header of a mapped file and returns its payload.
pub(crate) fn check_header<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: &[u8; 8],
    version: u32,
) -> Result<&'a [u8]> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != magic {
        return Err(IndexError::corrupt(
            path,
            format!(
                "bad header (expected magic {:?})",
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found != version {
        return Err(IndexError::version(path, found, version));
    }
    Ok(&bytes[HEADER_LEN..])
}

/// Memory-maps a file read-only (an empty file gives an empty map).
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| FormatError::opening(path, e))?;
    // SAFETY: the database files are written once (atomically) and never modified in place;
    // a concurrent writer replacing the directory renames, it does not truncate mapped files.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| IndexError::io(path, e))
}
