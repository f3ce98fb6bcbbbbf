//! Training datasets with precomputed neighbours (the paper: on-the-fly retrieval cannot keep up with
//! training). Sequences are cut from the database's own documents at chunk-aligned offsets, so every
//! chunk of a sequence is a database chunk and its key is already stored: building a dataset costs
//! searches only. Neighbours are stored as chunk ids (memory-mapped), tagged with what they were built
//! from; loading a dataset with another database is an error.

mod build;
mod meta;
mod open;

pub use meta::{DatasetId, DatasetMeta, DatasetParams, SplitInfo};

use crate::error::{PipelineError, Result};
use crate::filter::Origin;
use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use retro_format::FolderKind;
use retro_index::{ChunkId, Database};
use retro_model::NeighbourBlock;
use std::path::{Path, PathBuf};

/// Version 2 added `dataset_id` and the files' checksums.
pub const DATASET_FORMAT_VERSION: u32 = FolderKind::Dataset.version();
/// Most neighbours per chunk a dataset may hold (the paper trains with 2 and evaluates with up to 40).
pub const MAX_K: usize = 64;
/// The split files of a dataset, per split.
const SPLIT_FILES: [&str; 3] = ["origins", "neighbours", "distances"];
/// Chunk id stored for a padded neighbour.
pub const NO_CHUNK: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

/// One split on disk: origins in memory, neighbour ids and distances memory-mapped.
struct SplitData {
    origins: Vec<Origin>,
    neighbours: Option<Mmap>,
    distances: Option<Mmap>,
}

pub struct Dataset {
    dir: PathBuf,
    meta: DatasetMeta,
    train: SplitData,
    valid: SplitData,
}

/// A batch ready for the model: `x`, `y` `[B, T]` row-major, and the neighbours `ret`
/// `[B, C, K, N]`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub x: Vec<u32>,
    pub y: Vec<u32>,
    pub ret: NeighbourBlock,
    pub origins: Vec<Origin>,
}

impl Batch {
    /// Gives each sequence, with probability `p`, the neighbours of another sequence of the
    /// batch (chosen at random; they were retrieved for other text). Deterministic in `seed`.
    pub fn shuffle_neighbours(&mut self, p: f64, seed: u64) {
        use rand::{Rng, SeedableRng};
        let b = self.batch;
        if b < 2 || p <= 0.0 {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut moves = vec![];
        for i in 0..b {
            if rng.random::<f64>() < p {
                moves.push((i, (i + rng.random_range(1..b)) % b));
            }
        }
        self.ret.move_rows(&moves);
    }

    pub fn tensors(
        &self,
        device: &candle_core::Device,
    ) -> Result<(
        candle_core::Tensor,
        candle_core::Tensor,
        candle_core::Tensor,
    )> {
        use candle_core::Tensor;
        let (b, t) = (self.batch, self.seq_len);
        Ok((
            Tensor::from_slice(&self.x, (b, t), device)?,
            Tensor::from_slice(&self.y, (b, t), device)?,
            self.ret.to_tensor(device)?,
        ))
    }
}

impl Dataset {
    pub fn meta(&self) -> &DatasetMeta {
        &self.meta
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn split(&self, s: Split) -> &SplitData {
        match s {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
        }
    }

    pub fn len(&self, s: Split) -> usize {
        self.split(s).origins.len()
    }

    pub fn origin(&self, s: Split, i: usize) -> Origin {
        self.split(s).origins[i]
    }

    /// Neighbour chunk ids (`None`: padded) and distances of sequence `i`, `[C][K]` row-major.
    pub fn neighbours(&self, s: Split, i: usize) -> Vec<(Option<ChunkId>, f32)> {
        let per = (self.meta.seq_len / self.meta.chunk_len) * self.meta.k;
        let d = self.split(s);
        let (Some(ids), Some(dists)) = (&d.neighbours, &d.distances) else {
            return vec![];
        };
        let ids: &[u32] = bytemuck::cast_slice(&ids[i * per * 4..(i + 1) * per * 4]);
        let dists: &[u8] = &dists[i * per * 4..(i + 1) * per * 4];
        ids.iter()
            .zip(dists.chunks_exact(4))
            .map(|(&id, b)| {
                (
                    (id != NO_CHUNK).then_some(ChunkId(id as usize)),
                    f32::from_le_bytes(b.try_into().unwrap()),
                )
            })
            .collect()
    }

    /// Gathers the sequences `indices` of split `s` with their neighbours' tokens.
    pub fn batch(&self, db: &Database, s: Split, indices: &[usize]) -> Batch {
        let m = &self.meta;
        let (t, cl, k, n) = (m.seq_len, m.chunk_len, m.k, m.neighbour_len);
        let c = t / cl;
        let store = db.store();
        let b = indices.len();
        let mut x = Vec::with_capacity(b * t);
        let mut y = Vec::with_capacity(b * t);
        let mut ret = Vec::with_capacity(b * c * k * n);
        let mut origins = Vec::with_capacity(b);
        for &i in indices {
            let o = self.origin(s, i);
            let tokens = &store.document_tokens(o.document)[o.start..o.start + t + 1];
            x.extend_from_slice(&tokens[..t]);
            y.extend_from_slice(&tokens[1..]);
            origins.push(o);
            for (id, _) in self.neighbours(s, i) {
                match id {
                    Some(id) => ret.extend_from_slice(&store.neighbour(id)[..n]),
                    None => ret.extend(std::iter::repeat_n(store.pad_id(), n)),
                }
            }
        }
        Batch {
            batch: b,
            seq_len: t,
            x,
            y,
            ret: NeighbourBlock::new(ret, [b, c, k, n])
                .expect("the dataset's neighbours are K of N tokens per chunk"),
            origins,
        }
    }

    /// The loader: feeds `f` the training batches of global steps `from..to` (epoch `s / per_epoch`,
    /// each epoch shuffled by `(seed, epoch)`, so a resumed run sees the batches it would have seen),
    /// gathering the next batches on another thread while `f` runs. `f` returns false to stop early.
    pub fn for_each_train_batch(
        &self,
        db: &Database,
        batch_size: usize,
        seed: u64,
        steps: std::ops::Range<usize>,
        f: &mut dyn FnMut(Batch) -> Result<bool>,
    ) -> Result<()> {
        let per_epoch = self.len(Split::Train) / batch_size.max(1);
        if per_epoch == 0 {
            return Err(PipelineError::invalid(
                "batch_size",
                batch_size,
                format!(
                    "the dataset has {} training sequences",
                    self.len(Split::Train)
                ),
            ));
        }
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
            let range = steps.clone();
            scope.spawn(move || {
                let mut s = range.start;
                while s < range.end {
                    let (epoch, i) = (s / per_epoch, s % per_epoch);
                    let order = self.epoch_batches(Split::Train, batch_size, seed, epoch as u64);
                    for idx in &order[i..] {
                        if s >= range.end || tx.send(self.batch(db, Split::Train, idx)).is_err() {
                            return;
                        }
                        s += 1;
                    }
                }
            });
            for _ in steps {
                let batch = rx.recv().map_err(|_| {
                    PipelineError::invalid(
                        "dataset",
                        self.dir.display(),
                        "the batch loader stopped",
                    )
                })?;
                if !f(batch)? {
                    break;
                }
            }
            // Dropping the receiver stops the loader thread.
            drop(rx);
            Ok(())
        })
    }

    /// Sequence indices of split `s` in batches of `batch_size`, shuffled by `(seed, epoch)`; the last
    /// incomplete batch is dropped so every step sees the same shape.
    pub fn epoch_batches(
        &self,
        s: Split,
        batch_size: usize,
        seed: u64,
        epoch: u64,
    ) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len(s)).collect();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        order
            .chunks_exact(batch_size.max(1))
            .map(|c| c.to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: usize) -> Batch {
        let (c, k, n) = (2, 2, 3);
        Batch {
            batch: b,
            seq_len: 8,
            x: vec![0; b * 8],
            y: vec![0; b * 8],
            // Row i's neighbour tokens are all i.
            ret: NeighbourBlock::new(
                (0..b).flat_map(|i| vec![i as u32; c * k * n]).collect(),
                [b, c, k, n],
            )
            .unwrap(),
            origins: vec![],
        }
    }

    #[test]
    fn shuffled_neighbours_come_whole_from_another_row_and_replay_from_the_seed() {
        let mut a = batch(4);
        a.shuffle_neighbours(0.999, 11);
        for (i, r) in (0..4).map(|i| a.ret.row(i)).enumerate() {
            assert!(r.iter().all(|&t| t == r[0]), "row {i} mixes rows");
            assert_ne!(r[0] as usize, i, "row {i} kept its own neighbours");
        }
        let mut again = batch(4);
        again.shuffle_neighbours(0.999, 11);
        assert_eq!(a.ret, again.ret);
        let mut none = batch(4);
        none.shuffle_neighbours(0.0, 11);
        assert_eq!(none.ret, batch(4).ret);
        // About p of the rows, over many seeds.
        let moved: usize = (0..500)
            .map(|s| {
                let mut b = batch(4);
                b.shuffle_neighbours(0.25, s);
                (0..4)
                    .map(|i| b.ret.row(i))
                    .enumerate()
                    .filter(|(i, r)| r[0] as usize != *i)
                    .count()
            })
            .sum();
        let frac = moved as f64 / 2000.0;
        assert!((0.2..0.3).contains(&frac), "{frac}");
    }
}
