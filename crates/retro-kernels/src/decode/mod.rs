//! Decoding a few new rows at a time on the CPU, over plain slices: the kernels under cached
//! generation, where one token's work (a few MFLOP for a small model) is smaller than the
//! bookkeeping of the hundred tensor ops a step would otherwise take.
//!
//! - [`RowLinear`] and [`RowNorm`]: `x W^T + b` and LayerNorm over rows, with the weights copied
//!   once out of a [`Linear`](crate::layers::Linear) and a [`LayerNorm`](crate::layers::LayerNorm).
//! - [`TiledKvCache`]: the keys and values of every position seen so far, preallocated and written in
//!   place (capacity doubles when full, so appending is amortised O(1) and never copies the whole
//!   cache per step), read by causal attention for the newest rows or by full attention.
//! - [`pair::join`]: the two halves of a step at once, the second on a helper thread that spins
//!   between steps (rayon's idle worker sleeps between halves this small, and waking it costs as
//!   much as the half).
//!
//! f32 and f64; the loops are compiled for AVX-512 and AVX2 + FMA as well and picked at run time.
//! The f32 GEMM tiles of several rows are written with intrinsics (twelve rows on AVX-512, six on
//! AVX2), and so is one head's attention on AVX2.
//!
//! ```
//! use retro_kernels::decode::TiledKvCache;
//!
//! // One sequence, one head of d_k 2; keys e_0 and e_1, values 10 and 20.
//! let mut cache = TiledKvCache::<f64>::new(1, 1, 2);
//! cache.append(&[1.0, 0.0, 0.0, 1.0], &[10.0, 10.0, 20.0, 20.0], 2);
//! assert_eq!(cache.len(), 2);
//! // A query that matches the second key strongly, with both keys visible.
//! let mut out = [0.0; 2];
//! cache.attend_causal(&[0.0, 50.0], 1, &mut out);
//! assert!((out[0] - 20.0).abs() < 1e-9);
//! ```

use crate::float::Float;

/// `match rows { n => tile::<n>(args), .. }` over the row counts a GEMM tile is compiled for.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($rows:expr, $tile:ident $args:tt, [$($n:literal),*]) => {
        match $rows {
            $($n => $tile::<$n> $args,)*
            r => panic!("panel_rows takes 2 to {ROWS} rows, not {r}"),
        }
    };
}

mod cache;
mod head_avx2;
mod linear;
mod linear_avx2;
mod linear_avx512;
pub mod pair;

pub use cache::TiledKvCache;
pub use linear::{RowLinear, RowNorm};

/// Rows of `x` handed to one rayon task: below this, a fork costs more than it saves.
const MIN_ROWS_PER_TASK: usize = 2;

/// The tensor's values as `T`, flattened in row-major order.
pub fn values<T: Float>(t: &candle_core::Tensor) -> candle_core::Result<Vec<T>> {
    t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()
}

/// Rotates one head's row `x [d_k]` in place by the rotary embedding (rotate-half layout):
/// `cos` and `sin` are `[d_k / 2]`, of the row's position.
pub fn rotate<T: Float>(x: &mut [T], cos: &[T], sin: &[T]) {
    crate::fused_norm::rope_in_place(x, cos, sin, false)
}
