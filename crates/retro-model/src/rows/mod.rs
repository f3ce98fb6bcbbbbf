//! Cached decoding on the CPU over plain rows, in f32 and f64: the decoder's per-token work, and
//! the neighbour encoder's per-chunk work, in a few [`retro_kernels::decode`] kernels instead of
//! a hundred small tensor ops.
//!
//! - `blocks`: attention and feed-forward blocks over `[rows, d]` slices.
//! - `decode`: the decoding state ([`RowDecode`]): KV caches, the chunk in progress, CCA.
//! - `encode`: the neighbour encoder over the `B x K x N` rows of a completed chunk.

mod blocks;
mod decode;
mod encode;

pub(crate) use decode::{ChunkEnd, RowDecode, RowsEngine};
