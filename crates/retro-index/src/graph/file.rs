//! `graph.links`: the header (magic, format version, CRC-32 of the payload), then little-endian
//! `n, m, entry, top, upper_len` as u64, the levels (one byte a node, padded to 4), the layer-0
//! slots and the upper slots as u32. The keys are not in it: they are the database's
//! `embeddings.bin`. Every field is checked on reading, so a damaged file is an error naming it,
//! never a walk out of bounds.

use super::{Graph, MAX_LEVEL};
use crate::array_file::{check_header, header, map_file, HEADER_LEN};
use crate::error::{IndexError, Result};
use retro_format::write_atomic;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

pub(crate) const LINKS_EXTENSION: &str = "links";
const MAGIC: &[u8; 8] = b"RETROHNS";
const FORMAT_VERSION: u32 = 1;

/// Calls `f` on the little-endian bytes of `slots`, a block at a time: a 1M-node graph is not
/// copied whole to be written.
fn each_block(
    slots: &[AtomicU32],
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4 * 16384);
    for block in slots.chunks(16384) {
        buf.clear();
        buf.extend(block.iter().flat_map(|s| s.load(Relaxed).to_le_bytes()));
        f(&buf)?;
    }
    Ok(())
}

/// Writes `graph` to `path` atomically.
pub(crate) fn write(graph: &Graph, path: &Path) -> Result<()> {
    let mut fields = Vec::with_capacity(40);
    for x in [
        graph.n,
        graph.m,
        graph.entry as usize,
        graph.top,
        graph.upper.len(),
    ] {
        fields.extend_from_slice(&(x as u64).to_le_bytes());
    }
    let mut levels = graph.levels.clone();
    levels.resize(graph.n.div_ceil(4) * 4, 0);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&fields);
    crc.update(&levels);
    for slots in [&graph.layer0, &graph.upper] {
        each_block(slots, |b| {
            crc.update(b);
            Ok(())
        })
        .expect("hashing does not fail");
    }
    let mut head = header(MAGIC, FORMAT_VERSION);
    head[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(write_atomic(path, |w| {
        w.write_all(&head)?;
        w.write_all(&fields)?;
        w.write_all(&levels)?;
        for slots in [&graph.layer0, &graph.upper] {
            each_block(slots, |b| w.write_all(b))?;
        }
        Ok(())
    })?)
}

/// Reads a graph of `n` nodes with lists of `m` (the manifest's numbers) from `path`.
pub(crate) fn read(path: &Path, n: usize, m: usize) -> Result<Graph> {
    let map = map_file(path)?;
    let bad = |what: String| IndexError::corrupt(path, what);
    let payload = check_header(path, &map, MAGIC, FORMAT_VERSION)?;
    // The header's last 4 bytes hold the payload's CRC-32.
    let stored_crc = u32::from_le_bytes(map[12..HEADER_LEN].try_into().expect("4 bytes"));
    if crc32fast::hash(payload) != stored_crc {
        return Err(bad("checksum mismatch: the file is damaged".into()));
    }
    if payload.len() < 40 {
        return Err(bad(format!(
            "{} payload bytes: no graph fields",
            payload.len()
        )));
    }
    let field = |i: usize| u64::from_le_bytes(payload[8 * i..8 * i + 8].try_into().expect("8"));
    let (file_n, file_m, entry, top, upper_len) =
        (field(0), field(1), field(2), field(3), field(4));
    if file_n != n as u64 || file_m != m as u64 {
        return Err(bad(format!(
            "graph of {file_n} nodes with M {file_m}, expected {n} nodes with M {m}"
        )));
    }
    let levels_len = n.div_ceil(4) * 4;
    let slots0 = n * (2 * m + 1);
    // A forged `upper_len` must not overflow the sum.
    let expected = usize::try_from(upper_len)
        .ok()
        .and_then(|u| u.checked_mul(4))
        .and_then(|u| u.checked_add(40 + levels_len + 4 * slots0));
    if Some(payload.len()) != expected {
        return Err(bad(format!(
            "{} payload bytes, {} expected for {n} nodes and {upper_len} upper slots",
            payload.len(),
            expected.map_or("more than fit in memory".into(), |e| e.to_string())
        )));
    }
    let levels = payload[40..40 + n].to_vec();
    if let Some(i) = levels.iter().position(|&l| l as usize > MAX_LEVEL) {
        return Err(bad(format!("node {i} has level {}", levels[i])));
    }
    let graph = Graph::empty(m, levels);
    if graph.upper.len() as u64 != upper_len {
        return Err(bad(format!(
            "{upper_len} upper slots, the levels need {}",
            graph.upper.len()
        )));
    }
    let words = |bytes: &[u8], into: &[AtomicU32]| {
        for (s, b) in into.iter().zip(bytes.chunks_exact(4)) {
            s.store(u32::from_le_bytes(b.try_into().expect("4")), Relaxed);
        }
    };
    let start0 = 40 + levels_len;
    words(&payload[start0..start0 + 4 * slots0], &graph.layer0);
    words(&payload[start0 + 4 * slots0..], &graph.upper);
    if n > 0 && (entry >= n as u64 || graph.level(entry as u32) as u64 != top) {
        return Err(bad(format!(
            "entry point {entry} at layer {top} is not a node of that level"
        )));
    }
    for node in 0..n as u32 {
        for level in 0..=graph.level(node) {
            let slots = graph.slots(node, level);
            let count = slots[0].load(Relaxed) as usize;
            if count > slots.len() - 1 {
                return Err(bad(format!(
                    "node {node} has {count} links at layer {level}, at most {}",
                    slots.len() - 1
                )));
            }
            if let Some(id) = slots[1..=count]
                .iter()
                .map(|s| s.load(Relaxed))
                .find(|&id| id as usize >= n || graph.level(id) < level)
            {
                return Err(bad(format!(
                    "node {node} links to {id} at layer {level}, which is not a node there"
                )));
            }
        }
    }
    Ok(Graph {
        entry: entry as u32,
        top: top as usize,
        ..graph
    })
}
