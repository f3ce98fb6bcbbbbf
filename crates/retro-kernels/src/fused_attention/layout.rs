//! Where the rows of a head live: strided views of the inputs and the merged output, the problem's
//! sizes, and the pointer through which parallel tasks write their own rows.

use candle_core::Layout;

/// Where head `(b, h)` row `i` of a 4-D tensor starts: `off + b*sb + h*sh + i*ss` (feature stride 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(super) off: usize,
    pub(super) sb: usize,
    pub(super) sh: usize,
    pub(super) ss: usize,
    pub(super) heads: usize,
}

impl View {
    /// Rows of `heads` heads, `head` elements apart, in groups (sequences) `group` apart, rows
    /// `row` apart, from `off`.
    pub(crate) fn new(off: usize, group: usize, row: usize, heads: usize, head: usize) -> Self {
        Self {
            off,
            sb: group,
            sh: head,
            ss: row,
            heads,
        }
    }
    /// The same rows `by` elements further on.
    pub(crate) fn shifted(self, by: usize) -> Self {
        Self {
            off: self.off + by,
            ..self
        }
    }
    /// One past the last element of `nh` heads of `rows` rows of `d` features.
    pub(super) fn end(&self, nh: usize, rows: usize, d: usize) -> usize {
        if nh == 0 || rows == 0 {
            return 0;
        }
        // Strides are non-negative: the last head's last row is the farthest.
        self.row(nh - 1, rows - 1) + d
    }
    /// For a `[b, h, s, d]` layout.
    pub(super) fn bhsd(l: &Layout) -> Self {
        let st = l.stride();
        Self {
            off: l.start_offset(),
            sb: st[0],
            sh: st[1],
            ss: st[2],
            heads: l.dims()[1],
        }
    }
    /// For a `[b, s, h, d]` layout.
    pub(super) fn bshd(l: &Layout) -> Self {
        let st = l.stride();
        Self {
            off: l.start_offset(),
            sb: st[0],
            sh: st[2],
            ss: st[1],
            heads: l.dims()[2],
        }
    }
    #[inline(always)]
    pub(super) fn row(&self, n: usize, i: usize) -> usize {
        self.off + (n / self.heads) * self.sb + (n % self.heads) * self.sh + i * self.ss
    }
}

/// The problem: `nh = b*h` heads, `sq` queries, `sk` keys of `d` features.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(super) nh: usize,
    pub(super) heads: usize,
    pub(super) sq: usize,
    pub(super) sk: usize,
    pub(super) d: usize,
    pub(super) causal: Option<usize>,
}

impl Dims {
    /// `groups` sequences of `heads` heads each: `sq` queries attend to `sk` keys of `d` features.
    pub(crate) fn new(
        groups: usize,
        heads: usize,
        (sq, sk, d): (usize, usize, usize),
        causal: Option<usize>,
    ) -> Self {
        Self {
            nh: groups * heads,
            heads,
            sq,
            sk,
            d,
            causal,
        }
    }
    /// Keys query row i may see.
    #[inline(always)]
    pub(super) fn lim(&self, i: usize) -> usize {
        match self.causal {
            Some(o) => (i + o + 1).min(self.sk),
            None => self.sk,
        }
    }
    /// Offset of output row `(n, i)` in the contiguous `[b, sq, h, d]` output.
    #[inline(always)]
    pub(super) fn out_row(&self, n: usize, i: usize) -> usize {
        (((n / self.heads) * self.sq + i) * self.heads + n % self.heads) * self.d
    }
}

pub(super) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// The output buffer, shared by the parallel tasks: each writes only its own rows.
pub(super) struct SendPtr<T>(pub(super) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// # Safety
    /// `[at, at + len)` must be in bounds and written by no other thread meanwhile.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, at: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
    /// [`Self::slice`] of memory that may be uninitialised.
    ///
    /// # Safety
    /// As for [`Self::slice`].
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn uninit(&self, at: usize, len: usize) -> &mut [std::mem::MaybeUninit<T>] {
        std::slice::from_raw_parts_mut(self.0.add(at).cast(), len)
    }
}
