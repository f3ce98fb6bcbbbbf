//! Fused scaled-dot-product attention: `softmax(q k^T + mask) v` in one pass per query row, without
//! materialising the `[n, sq, sk]` score tensor, on CPU (f32 and f64), with a backward.
//!
//! The CPU kernel is a candle [`CustomOp3`] in plain Rust, parallelised with rayon over heads (and over
//! row blocks when there are few heads). Per head it copies K transposed (`[d, sk]`) and V (`[sk, d]`),
//! both zero-padded to multiples of [`L`], then works on tiles of [`R`] query rows: scores as an
//! `R x L` register tile, the softmax on the row (at most `sk` values: they stay in L1), and `P V` as an
//! `R x L` tile over features. The row is the streaming unit: its max, sum and log-sum-exp are kept per
//! row, and the log-sum-exp is saved for the backward, which recomputes `P` from it
//! (`dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`, `dQ = dS K`, `dK = dS^T Q`).
//! Causal rows only touch the keys they may see, so a causal attention does half the work.
//!
//! The kernel reads strided inputs (only the feature dim must be contiguous): heads can be passed as
//! `[b, h, s, d]` views of a `[b, s, h, d]` projection, and the output is written as `[b, s, h, d]`, the
//! layout the output projection wants. [`attention_heads`] is that interface; [`attention`] is the plain
//! `[n, s, d]` one. Other devices and dtypes use the matmul + softmax composition.

use crate::cpu_storage::cpu;
use crate::kernels::Kernels;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Query rows per micro-tile (8 rather than 4: K and V rows loaded once serve twice the queries, and
/// dK/dV accumulate half as often; attention forward and backward 15-25% faster on labml-small).
const R: usize = 8;
/// Lanes per micro-tile: keys in the score tile, features in the `P V` tile. Buffers are padded to it.
const L: usize = 16;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Runs `$simd` (an `avx512` tile, on f32 slices) instead of the generic body when the CPU has
/// AVX-512 and every slice named is f32.
macro_rules! simd_f32 {
    ($simd:ident($($a:ident),*; $($m:ident),*; $($x:expr),*)) => {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            if let ($(Some($a),)* $(Some($m),)*) = ($(T::f32s($a),)* $(T::f32s_mut($m),)*) {
                // SAFETY: AVX-512F was detected; the tile asserts the slice bounds it relies on.
                return unsafe { avx512::$simd($($x),*) };
            }
        }
    };
}

/// `softmax(q k^T + mask) v` for `q [n, sq, d]`, `k, v [n, sk, d]` (q already scaled), `[n, sq, d]`.
/// With `causal_offset = Some(o)` query i sees key j iff `j <= i + o`. Differentiable.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
) -> Result<Tensor> {
    let (n, sq, d) = q.dims3()?;
    let out = attention_heads(
        &q.unsqueeze(1)?,
        &k.unsqueeze(1)?,
        &v.unsqueeze(1)?,
        causal_offset,
        Kernels::Differentiable,
    )?;
    out.reshape((n, sq, d))
}

/// Multi-head form: `q [b, h, sq, d]`, `k, v [b, h, sk, d]` with any strides (typically transposed
/// views of `[b, s, h, d]` projections) -> `[b, sq, h, d]` contiguous, i.e. heads already merged for
/// a reshape to `[b, sq, h*d]`. `kern = Fused` records no backward (inference).
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
    kern: Kernels,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (kb, kh, _, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let cpu_ok = matches!(q.device(), Device::Cpu)
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if !cpu_ok {
        return fallback(q, k, v, causal_offset, kern);
    }
    let unit = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[3] == 1 || t.dim(3)? <= 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (unit(q)?, unit(k)?, unit(v)?);
    match kern {
        Kernels::Fused => q.apply_op3_no_bwd(&k, &v, &FusedAttention::new(causal_offset, false)),
        Kernels::Differentiable => q.apply_op3_arc(
            &k,
            &v,
            Arc::new(Box::new(FusedAttention::new(causal_offset, true))),
        ),
    }
}

/// The composition of tensor ops the kernel replaces (any device), same shapes as [`attention_heads`].
pub fn fallback(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
    kern: Kernels,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut s = q.matmul(&k.t()?)?;
    if let Some(off) = causal_offset {
        let (sq, sk) = (q.dim(2)?, k.dim(2)?);
        let mask: Vec<f32> = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| if j <= i + off { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (sq, sk), q.device())?.to_dtype(q.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    kern.softmax(&s)?.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// The element types the CPU kernel handles.
pub(crate) trait Float: WithDType + Default {
    const NEG_INF: Self;
    fn exp_(self) -> Self;
    fn ln_(self) -> Self;
    /// The slice as `f32`, when `Self` is `f32` (for the hand-vectorised f32 tiles).
    fn f32s(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_x: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

impl Float for f64 {
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    fn ln_(self) -> Self {
        self.ln()
    }
}

impl Float for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn f32s(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    fn f32s_mut(x: &mut [Self]) -> Option<&mut [f32]> {
        Some(x)
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        crate::gelu::exp_f32(self)
    }
    fn ln_(self) -> Self {
        self.ln()
    }
}

/// Where head `(b, h)` row `i` of a 4-D tensor starts: `off + b*sb + h*sh + i*ss` (feature stride 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    off: usize,
    sb: usize,
    sh: usize,
    ss: usize,
    heads: usize,
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
    fn end(&self, nh: usize, rows: usize, d: usize) -> usize {
        if nh == 0 || rows == 0 {
            return 0;
        }
        // Strides are non-negative: the last head's last row is the farthest.
        self.row(nh - 1, rows - 1) + d
    }
    /// For a `[b, h, s, d]` layout.
    fn bhsd(l: &Layout) -> Self {
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
    fn bshd(l: &Layout) -> Self {
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
    fn row(&self, n: usize, i: usize) -> usize {
        self.off + (n / self.heads) * self.sb + (n % self.heads) * self.sh + i * self.ss
    }
}

/// The problem: `nh = b*h` heads, `sq` queries, `sk` keys of `d` features.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    nh: usize,
    heads: usize,
    sq: usize,
    sk: usize,
    d: usize,
    causal: Option<usize>,
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
    fn lim(&self, i: usize) -> usize {
        match self.causal {
            Some(o) => (i + o + 1).min(self.sk),
            None => self.sk,
        }
    }
    /// Offset of output row `(n, i)` in the contiguous `[b, sq, h, d]` output.
    #[inline(always)]
    fn out_row(&self, n: usize, i: usize) -> usize {
        (((n / self.heads) * self.sq + i) * self.heads + n % self.heads) * self.d
    }
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// # Safety
    /// `[at, at + len)` must be in bounds and written by no other thread meanwhile.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// `s[r][jb..] = q_r . kt[.., jb..]` for the `R` rows of `qb [R, ldd]` and `ncols` (multiple of L)
/// columns of `kt [d, ldk]`.
#[inline(always)]
fn tile_scores<T: Float>(
    qb: &[T],
    ldd: usize,
    d: usize,
    kt: &[T],
    ldk: usize,
    ncols: usize,
    s: &mut [T],
) {
    simd_f32!(tile_scores(qb, kt; s; qb, ldd, d, kt, ldk, ncols, s));
    let qb = &qb[..R * ldd];
    for jb in (0..ncols).step_by(L) {
        let mut acc = [[T::zero(); L]; R];
        for c in 0..d {
            let k: &[T; L] = kt[c * ldk + jb..][..L].try_into().unwrap();
            for r in 0..R {
                let qv = qb[r * ldd + c];
                for l in 0..L {
                    acc[r][l] += qv * k[l];
                }
            }
        }
        for r in 0..R {
            s[r * ldk + jb..][..L].copy_from_slice(&acc[r]);
        }
    }
}

/// `out[r] = sum_{j < nk} p[r][j] * v[j]` for `p [R, ldk]`, `v [.., ldd]`, `out [R, ldd]`.
#[inline(always)]
fn tile_pv<T: Float>(p: &[T], ldk: usize, nk: usize, v: &[T], ldd: usize, out: &mut [T]) {
    simd_f32!(tile_pv(p, v; out; p, ldk, nk, v, ldd, out));
    let p = &p[..R * ldk];
    let v = &v[..nk * ldd];
    for cb in (0..ldd).step_by(L) {
        let mut acc = [[T::zero(); L]; R];
        for j in 0..nk {
            let vv: &[T; L] = v[j * ldd + cb..][..L].try_into().unwrap();
            for r in 0..R {
                let pv = p[r * ldk + j];
                for l in 0..L {
                    acc[r][l] += pv * vv[l];
                }
            }
        }
        for r in 0..R {
            out[r * ldd + cb..][..L].copy_from_slice(&acc[r]);
        }
    }
}

/// `acc[j] += sum_r w[r][j] * x[r]` for `j < nk`: `w [R, ldk]`, `x [R, ldd]`, `acc [.., ldd]`.
#[inline(always)]
fn tile_outer<T: Float>(w: &[T], ldk: usize, nk: usize, x: &[T], ldd: usize, acc: &mut [T]) {
    simd_f32!(tile_outer(w, x; acc; w, ldk, nk, x, ldd, acc));
    let x = &x[..R * ldd];
    for j in 0..nk {
        let row = &mut acc[j * ldd..][..ldd];
        for (r, xr) in x.chunks_exact(ldd).enumerate() {
            let wr = w[r * ldk + j];
            for (a, &xv) in row.iter_mut().zip(xr) {
                *a += wr * xv;
            }
        }
    }
}

/// `x . y` with eight partial sums (one dependent chain would be latency-bound).
#[inline(always)]
fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: T = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .fold(T::zero(), |s, (&a, &b)| s + a * b);
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

#[inline(always)]
fn row_max<T: Float>(s: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        if let Some(x) = T::f32s(s) {
            // SAFETY: AVX-512F was detected.
            return T::from_f64(unsafe { avx512::row_max(x) } as f64);
        }
    }
    let mut m = [T::NEG_INF; L];
    let chunks = s.chunks_exact(L);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..L {
            m[l] = if ch[l] > m[l] { ch[l] } else { m[l] };
        }
    }
    let mut best = T::NEG_INF;
    for &x in m.iter().chain(rem) {
        if x > best {
            best = x;
        }
    }
    best
}

/// `s[j] = exp(s[j] - shift)` for `j < lim`, 0 for `lim <= j < end`; returns the sum.
#[inline(always)]
fn exp_row<T: Float>(s: &mut [T], lim: usize, end: usize, shift: T) -> T {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        if let Some(x) = T::f32s_mut(s) {
            // SAFETY: AVX-512F was detected; the tile asserts its bounds.
            let sum = unsafe { avx512::exp_row(x, lim, end, shift.to_f64() as f32) };
            return T::from_f64(sum as f64);
        }
    }
    for x in s[..lim].iter_mut() {
        *x = (*x - shift).exp_();
    }
    for x in s[lim..end].iter_mut() {
        *x = T::zero();
    }
    let mut acc = [T::zero(); L];
    let chunks = s[..lim].chunks_exact(L);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..L {
            acc[l] += ch[l];
        }
    }
    let mut sum = T::zero();
    for &x in acc.iter().chain(rem) {
        sum += x;
    }
    sum
}

/// Per-thread scratch buffers.
#[derive(Default)]
struct Scratch<T> {
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    d: Vec<T>,
    e: Vec<T>,
    f: Vec<T>,
    g: Vec<T>,
    h: Vec<T>,
}

fn zeroed<T: Float>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    v.clear();
    v.resize(len, T::zero());
    &mut v[..]
}

/// `len` elements of scratch: zero-filled when the tiles will read padding, else left as they are
/// (every element read is written first). Zeroing ~18 KB per head was a tenth of the backward of
/// the encoder's 32 x 32 heads.
fn scratch<T: Float>(v: &mut Vec<T>, len: usize, padded: bool) -> &mut [T] {
    if padded {
        return zeroed(v, len);
    }
    if v.len() < len {
        v.resize(len, T::zero());
    }
    &mut v[..len]
}

/// Copies `rows` rows of head `n` of `x` into `dst [rows, ldd]` (zero padded).
#[inline(always)]
fn load_rows<T: Float>(
    x: &[T],
    vw: &View,
    n: usize,
    rows: std::ops::Range<usize>,
    d: usize,
    ldd: usize,
    dst: &mut [T],
) {
    for (r, i) in rows.enumerate() {
        let at = vw.row(n, i);
        dst[r * ldd..r * ldd + d].copy_from_slice(&x[at..at + d]);
    }
}

/// Copies keys `0..nk` of head `n` transposed into `dst [d, ldk]` (zero padded).
#[inline(always)]
fn load_t<T: Float>(x: &[T], vw: &View, n: usize, nk: usize, d: usize, ldk: usize, dst: &mut [T]) {
    for j in 0..nk {
        let at = vw.row(n, j);
        for (c, &val) in x[at..at + d].iter().enumerate() {
            dst[c * ldk + j] = val;
        }
    }
}

struct FwdArgs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    qv: View,
    kv: View,
    vv: View,
    dims: Dims,
    out: &'a SendPtr<T>,
    /// Where the rows' log-sum-exp go, when the backward will need them.
    lse: Option<&'a SendPtr<T>>,
}

/// One forward task: head `n`, query rows `r0..r1`.
#[inline(always)]
fn fwd_task<T: Float>(a: &FwdArgs<'_, T>, n: usize, r0: usize, r1: usize, sc: &mut Scratch<T>) {
    let Dims { d, .. } = a.dims;
    let ldd = round_up(d, L);
    let nk = a.dims.lim(r1 - 1);
    let ldk = round_up(nk.max(1), L);
    let padded = ldd != d || ldk != nk;
    let kt = scratch(&mut sc.a, d * ldk, padded);
    load_t(a.k, &a.kv, n, nk, d, ldk, kt);
    let vb = scratch(&mut sc.b, nk * ldd, padded);
    load_rows(a.v, &a.vv, n, 0..nk, d, ldd, vb);
    let qb = scratch(&mut sc.c, R * ldd, padded);
    let s = scratch(&mut sc.d, R * ldk, padded);
    let ob = scratch(&mut sc.e, R * ldd, padded);
    let mut i0 = r0;
    while i0 < r1 {
        let rows = (r1 - i0).min(R);
        if padded || rows < R {
            qb.fill(T::zero());
        }
        load_rows(a.q, &a.qv, n, i0..i0 + rows, d, ldd, qb);
        let lmax = a.dims.lim(i0 + rows - 1);
        let ncols = round_up(lmax.max(1), L);
        tile_scores(qb, ldd, d, kt, ldk, ncols, s);
        let mut sums = [T::zero(); R];
        for r in 0..R {
            let lim = if r < rows { a.dims.lim(i0 + r) } else { 0 };
            let row = &mut s[r * ldk..r * ldk + ncols];
            let m = if lim > 0 {
                row_max(&row[..lim])
            } else {
                T::zero()
            };
            sums[r] = exp_row(row, lim, ncols, m);
            if let (true, Some(lse_out)) = (r < rows, a.lse) {
                let lse = if sums[r] > T::zero() {
                    m + sums[r].ln_()
                } else {
                    T::NEG_INF
                };
                // SAFETY: row (n, i0 + r) belongs to this task only.
                unsafe { lse_out.slice(n * a.dims.sq + i0 + r, 1)[0] = lse };
            }
        }
        tile_pv(s, ldk, lmax, vb, ldd, ob);
        for r in 0..rows {
            let inv = if sums[r] > T::zero() {
                T::one() / sums[r]
            } else {
                T::zero()
            };
            // SAFETY: output row (n, i0 + r) belongs to this task only.
            let dst = unsafe { a.out.slice(a.dims.out_row(n, i0 + r), d) };
            for (o, &x) in dst.iter_mut().zip(&ob[r * ldd..r * ldd + d]) {
                *o = x * inv;
            }
        }
        i0 += rows;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Base
}

/// Compiles `$body` (a call of an `#[inline(always)]` generic) once per instruction set and runs the
/// version the CPU supports.
macro_rules! dispatch {
    ($isa:expr, $f:ident::<$args:ident>($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn v512<T: Float>(a: &$args<'_, T>, n: usize, r0: usize, r1: usize, sc: &mut Scratch<T>) {
                $f(a, n, r0, r1, sc)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v256<T: Float>(a: &$args<'_, T>, n: usize, r0: usize, r1: usize, sc: &mut Scratch<T>) {
                $f(a, n, r0, r1, sc)
            }
            match $isa {
                // SAFETY: the features were detected at run time.
                Isa::Avx512 => unsafe { v512($($arg),*) },
                Isa::Avx2 => unsafe { v256($($arg),*) },
                Isa::Base => $f($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            $f($($arg),*)
        }
    }};
}

pub(crate) fn forward_cpu<T: Float>(
    [q, k, v]: [&[T]; 3],
    [qv, kv, vv]: [View; 3],
    dims: Dims,
    want_lse: bool,
) -> (Vec<T>, Vec<T>) {
    let mut out = vec![T::zero(); dims.nh * dims.sq * dims.d];
    let mut lse = vec![T::NEG_INF; if want_lse { dims.nh * dims.sq } else { 0 }];
    let (op, lp) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let args = FwdArgs {
        q,
        k,
        v,
        qv,
        kv,
        vv,
        dims,
        out: &op,
        lse: want_lse.then_some(&lp),
    };
    // Enough tasks to keep every thread busy even with a handful of heads.
    let want = 8 * rayon::current_num_threads();
    let per_head = want.div_ceil(dims.nh.max(1)).max(1);
    let rb = round_up(dims.sq.div_ceil(per_head).max(16), R).min(dims.sq.max(1));
    let blocks = dims.sq.div_ceil(rb);
    let level = isa();
    (0..dims.nh * blocks)
        .into_par_iter()
        .with_min_len(if blocks == 1 { 16 } else { 1 })
        .for_each_init(Scratch::<T>::default, |sc, t| {
            let (n, blk) = (t / blocks, t % blocks);
            let r0 = blk * rb;
            let r1 = (r0 + rb).min(dims.sq);
            if r0 < r1 {
                dispatch!(level, fwd_task::<FwdArgs>(&args, n, r0, r1, sc));
            }
        });
    (out, lse)
}

struct BwdArgs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    o: &'a [T],
    go: &'a [T],
    lse: &'a [T],
    qv: View,
    kv: View,
    vv: View,
    ov: View,
    gov: View,
    dims: Dims,
    dq: &'a SendPtr<T>,
    dk: &'a SendPtr<T>,
    dv: &'a SendPtr<T>,
    /// Where the rows of dQ, dK and dV go.
    dst: [View; 3],
}

/// Backward of head `n`, all rows. `_r0, _r1` keep the dispatch signature.
#[inline(always)]
fn bwd_task<T: Float>(a: &BwdArgs<'_, T>, n: usize, _r0: usize, _r1: usize, sc: &mut Scratch<T>) {
    let Dims { d, sq, .. } = a.dims;
    let ldd = round_up(d, L);
    let nk = a.dims.lim(sq.max(1) - 1).min(a.dims.sk);
    let ldk = round_up(nk.max(1), L);
    let sqp = round_up(sq, R);
    let padded = ldd != d || ldk != nk || sqp != sq;
    let qb = scratch(&mut sc.a, sqp * ldd, padded);
    load_rows(a.q, &a.qv, n, 0..sq, d, ldd, qb);
    let gob = scratch(&mut sc.b, sqp * ldd, padded);
    load_rows(a.go, &a.gov, n, 0..sq, d, ldd, gob);
    let kb = scratch(&mut sc.c, nk * ldd, padded);
    load_rows(a.k, &a.kv, n, 0..nk, d, ldd, kb);
    let kt = scratch(&mut sc.d, d * ldk, padded);
    load_t(a.k, &a.kv, n, nk, d, ldk, kt);
    let vt = scratch(&mut sc.e, d * ldk, padded);
    load_t(a.v, &a.vv, n, nk, d, ldk, vt);
    // dK and dV accumulate over all rows: [nk, ldd]; p and ds tiles [R, ldk] side by side.
    let dkv = zeroed(&mut sc.f, 2 * nk * ldd);
    let (dk, dv) = dkv.split_at_mut(nk * ldd);
    let pd = scratch(&mut sc.g, 2 * R * ldk, padded);
    let (p, ds) = pd.split_at_mut(R * ldk);
    let dqb = scratch(&mut sc.h, R * ldd, padded);
    for i0 in (0..sq).step_by(R) {
        let rows = (sq - i0).min(R);
        let qt = &qb[i0 * ldd..(i0 + R) * ldd];
        let got = &gob[i0 * ldd..(i0 + R) * ldd];
        let lmax = a.dims.lim(i0 + rows - 1);
        let ncols = round_up(lmax.max(1), L);
        tile_scores(qt, ldd, d, kt, ldk, ncols, p);
        tile_scores(got, ldd, d, vt, ldk, ncols, ds);
        for r in 0..R {
            let (lim, lse, delta) = if r < rows {
                let i = i0 + r;
                let (at, ot) = (a.gov.row(n, i), a.ov.row(n, i));
                let delta = dot(&a.go[at..at + d], &a.o[ot..ot + d]);
                (a.dims.lim(i), a.lse[n * sq + i], delta)
            } else {
                (0, T::zero(), T::zero())
            };
            let lim = if lse == T::NEG_INF { 0 } else { lim };
            let prow = &mut p[r * ldk..r * ldk + ncols];
            exp_row(prow, lim, ncols, lse);
            let dsrow = &mut ds[r * ldk..r * ldk + ncols];
            for (x, &pj) in dsrow.iter_mut().zip(prow.iter()) {
                *x = pj * (*x - delta);
            }
        }
        tile_pv(ds, ldk, lmax, kb, ldd, dqb);
        tile_outer(ds, ldk, lmax, qt, ldd, dk);
        tile_outer(p, ldk, lmax, got, ldd, dv);
        for r in 0..rows {
            // SAFETY: rows of head n belong to this task only.
            let dst = unsafe { a.dq.slice(a.dst[0].row(n, i0 + r), d) };
            dst.copy_from_slice(&dqb[r * ldd..r * ldd + d]);
        }
    }
    let sk = a.dims.sk;
    for j in 0..sk {
        // SAFETY: rows of head n belong to this task only.
        let (gk, gv) = unsafe {
            (
                a.dk.slice(a.dst[1].row(n, j), d),
                a.dv.slice(a.dst[2].row(n, j), d),
            )
        };
        if j < nk {
            gk.copy_from_slice(&dk[j * ldd..j * ldd + d]);
            gv.copy_from_slice(&dv[j * ldd..j * ldd + d]);
        } else {
            gk.fill(T::zero());
            gv.fill(T::zero());
        }
    }
}

type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// The backward into `dq, dk, dv` at the rows `dst` gives.
///
/// # Safety
/// `dq`, `dk`, `dv` must be valid for writes at every row `dst` addresses for `dims`, and no two
/// rows may overlap.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_raw<T: Float>(
    [q, k, v, o, go]: [&[T]; 5],
    lse: &[T],
    [qv, kv, vv, ov, gov]: [View; 5],
    dims: Dims,
    [dq, dk, dv]: [SendPtr<T>; 3],
    dst: [View; 3],
) {
    let args = BwdArgs {
        q,
        k,
        v,
        o,
        go,
        lse,
        qv,
        kv,
        vv,
        ov,
        gov,
        dims,
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dst,
    };
    let level = isa();
    (0..dims.nh)
        .into_par_iter()
        .with_min_len(16)
        .for_each_init(Scratch::<T>::default, |sc, n| {
            if dims.sq > 0 {
                dispatch!(level, bwd_task::<BwdArgs>(&args, n, 0, dims.sq, sc));
            }
        });
}

/// dQ, dK, dV as contiguous `[b, s, h, d]`.
fn backward_cpu<T: Float>(src: [&[T]; 5], lse: &[T], views: [View; 5], dims: Dims) -> Grads<T> {
    let mut dq = vec![T::zero(); dims.nh * dims.sq * dims.d];
    let mut dk = vec![T::zero(); dims.nh * dims.sk * dims.d];
    let mut dv = vec![T::zero(); dims.nh * dims.sk * dims.d];
    let (h, d) = (dims.heads, dims.d);
    let merged = |s: usize| View::new(0, s * h * d, h * d, h, d);
    let ptrs = [&mut dq, &mut dk, &mut dv].map(|x| SendPtr(x.as_mut_ptr()));
    // SAFETY: each buffer is one contiguous [b, s, h, d] tensor, the layout `merged` addresses.
    unsafe {
        backward_raw(
            src,
            lse,
            views,
            dims,
            ptrs,
            [merged(dims.sq), merged(dims.sk), merged(dims.sk)],
        )
    };
    (dq, dk, dv)
}

/// The backward into one buffer: the rows of dQ, dK and dV go where `dst` says (rows the views
/// skip are left as they are). Panics if a view reaches outside `out`.
///
/// # Safety
/// No two rows the three views address for `dims` may overlap: heads are written in parallel.
pub(crate) unsafe fn backward_into<T: Float>(
    src: [&[T]; 5],
    lse: &[T],
    views: [View; 5],
    dims: Dims,
    out: &mut [T],
    dst: [View; 3],
) {
    let groups = dims.nh / dims.heads.max(1);
    for (vw, rows) in dst.iter().zip([dims.sq, dims.sk, dims.sk]) {
        assert!(vw.heads == dims.heads && vw.end(groups * vw.heads, rows, dims.d) <= out.len());
    }
    let p = out.as_mut_ptr();
    // SAFETY: the asserts keep every addressed row inside `out`; the caller vouches that no two
    // overlap.
    unsafe {
        backward_raw(
            src,
            lse,
            views,
            dims,
            [SendPtr(p), SendPtr(p), SendPtr(p)],
            dst,
        )
    }
}

/// The candle op: inputs `[b, h, s, d]` (strided), output `[b, sq, h, d]`.
pub(crate) struct FusedAttention {
    causal: Option<usize>,
    /// Log-sum-exp per row `[b*h, sq]`, kept from the forward for the backward when training.
    lse: Option<Mutex<Option<CpuStorage>>>,
}

impl FusedAttention {
    pub(crate) fn new(causal: Option<usize>, save: bool) -> Self {
        Self {
            causal,
            lse: save.then(|| Mutex::new(None)),
        }
    }

    fn dims(&self, lq: &Layout, lk: &Layout) -> Dims {
        let q = lq.dims();
        Dims {
            nh: q[0] * q[1],
            heads: q[1],
            sq: q[2],
            sk: lk.dims()[2],
            d: q[3],
            causal: self.causal,
        }
    }
}

fn slice<T: Float>(s: &CpuStorage) -> Result<&[T]> {
    T::cpu_storage_as_slice(s)
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        for l in [l1, l2, l3] {
            if l.dims().len() != 4 || (l.dims()[3] > 1 && l.stride()[3] != 1) {
                candle_core::bail!("fused-attention: bad layout {l:?}");
            }
        }
        let dims = self.dims(l1, l2);
        let (vq, vk, vv) = (View::bhsd(l1), View::bhsd(l2), View::bhsd(l3));
        fn go<T: Float>(
            s: [&CpuStorage; 3],
            v: [View; 3],
            dims: Dims,
            want_lse: bool,
        ) -> Result<(CpuStorage, CpuStorage)> {
            let (o, lse) = forward_cpu(
                [slice::<T>(s[0])?, slice::<T>(s[1])?, slice::<T>(s[2])?],
                v,
                dims,
                want_lse,
            );
            Ok((T::to_cpu_storage_owned(o), T::to_cpu_storage_owned(lse)))
        }
        let want = self.lse.is_some();
        let (out, lse) = match s1 {
            CpuStorage::F32(_) => go::<f32>([s1, s2, s3], [vq, vk, vv], dims, want)?,
            CpuStorage::F64(_) => go::<f64>([s1, s2, s3], [vq, vk, vv], dims, want)?,
            _ => candle_core::bail!("fused-attention: f32 and f64 only"),
        };
        if let Some(slot) = &self.lse {
            *slot.lock().unwrap() = Some(lse);
        }
        let q = l1.dims();
        Ok((out, Shape::from((q[0], q[2], q[1], q[3]))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.lse.as_ref().and_then(|s| s.lock().unwrap().take());
        let lse = match saved {
            Some(lse) => lse,
            None => {
                // Not saved (applied twice, or by hand): recompute the forward.
                let op = FusedAttention::new(self.causal, true);
                q.apply_op3_no_bwd(k, v, &op)?;
                let lse = op.lse.as_ref().and_then(|s| s.lock().unwrap().take());
                lse.ok_or_else(|| candle_core::Error::Msg("fused-attention: no lse".into()))?
            }
        };
        let go_t = grad_res.detach();
        let (sq_, lq) = q.storage_and_layout();
        let (sk_, lk) = k.storage_and_layout();
        let (sv_, lv) = v.storage_and_layout();
        let (so_, lo) = res.storage_and_layout();
        let (sg_, lg) = go_t.storage_and_layout();
        let (cq, ck, cv, co, cg) = (cpu(&sq_)?, cpu(&sk_)?, cpu(&sv_)?, cpu(&so_)?, cpu(&sg_)?);
        if lg.stride()[3] != 1 && lg.dims()[3] > 1 {
            candle_core::bail!("fused-attention: strided gradient");
        }
        let dims = self.dims(lq, lk);
        let views = [
            View::bhsd(lq),
            View::bhsd(lk),
            View::bhsd(lv),
            View::bshd(lo),
            View::bshd(lg),
        ];
        fn go<T: Float>(c: [&CpuStorage; 6], views: [View; 5], dims: Dims) -> Result<Grads<T>> {
            let src = [
                slice::<T>(c[0])?,
                slice::<T>(c[1])?,
                slice::<T>(c[2])?,
                slice::<T>(c[3])?,
                slice::<T>(c[4])?,
            ];
            Ok(backward_cpu(src, slice::<T>(c[5])?, views, dims))
        }
        let all = [cq, ck, cv, co, cg, &lse];
        let q4 = lq.dims();
        let (b, h, sq, d, sk) = (q4[0], q4[1], q4[2], q4[3], lk.dims()[2]);
        let dev = q.device();
        let mk = |data: CpuStorage, s: usize| -> Result<Tensor> {
            let t = match data {
                CpuStorage::F32(x) => Tensor::from_vec(x, (b, s, h, d), dev)?,
                CpuStorage::F64(x) => Tensor::from_vec(x, (b, s, h, d), dev)?,
                _ => unreachable!(),
            };
            t.transpose(1, 2)
        };
        let (dq, dk, dv) = match cq {
            CpuStorage::F32(_) => {
                let (a, b_, c) = go::<f32>(all, views, dims)?;
                (CpuStorage::F32(a), CpuStorage::F32(b_), CpuStorage::F32(c))
            }
            CpuStorage::F64(_) => {
                let (a, b_, c) = go::<f64>(all, views, dims)?;
                (CpuStorage::F64(a), CpuStorage::F64(b_), CpuStorage::F64(c))
            }
            _ => candle_core::bail!("fused-attention: f32 and f64 only"),
        };
        Ok((Some(mk(dq, sq)?), Some(mk(dk, sk)?), Some(mk(dv, sk)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_diff;
    use candle_core::Var;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, off: Option<usize>) -> Result<Tensor> {
        // [n, s, d] through the fallback's formula.
        let out = fallback(
            &q.unsqueeze(1)?,
            &k.unsqueeze(1)?,
            &v.unsqueeze(1)?,
            off,
            Kernels::Differentiable,
        )?;
        out.squeeze(2)
    }

    fn check(n: usize, sq: usize, sk: usize, d: usize, off: Option<usize>, dtype: DType, tol: f64) {
        let dev = Device::Cpu;
        let r = |s: usize| {
            Var::from_tensor(
                &Tensor::randn(0f64, 1.0, (n, s, d), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap()
        };
        let (q, k, v) = (r(sq), r(sk), r(sk));
        let w = Tensor::randn(0f64, 1.0, (n, sq, d), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let got = attention(&q, &k, &v, off).unwrap();
        let want = reference(&q, &k, &v, off).unwrap();
        assert!(
            max_diff(&got, &want) < tol,
            "values {n} {sq} {sk} {d} {off:?}"
        );
        let g1 = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (g1.get(x).unwrap(), g2.get(x).unwrap());
            assert_eq!(a.dims(), b.dims());
            // Gradients sum over up to sq * d products: both sides round in proportion to their size
            // (random inputs reach |dq| ~ 10 in f32), so the bound scales with the largest entry.
            let scale = 1.0 + max_diff(b, &b.zeros_like().unwrap());
            let diff = max_diff(a, b);
            assert!(
                diff < tol * scale,
                "d{name} {n} {sq} {sk} {d} {off:?}: {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn matches_the_tensor_formula_f64() {
        for &(n, sq, sk, d) in &[
            (3, 7, 7, 5),
            (2, 33, 33, 16),
            (5, 16, 40, 16),
            (1, 1, 9, 8),
            (70, 4, 3, 17),
            // No padding anywhere (scratch reused unzeroed across heads).
            (40, 32, 32, 16),
            (20, 16, 64, 16),
        ] {
            check(n, sq, sk, d, None, DType::F64, 1e-12);
            if sk >= sq {
                check(n, sq, sk, d, Some(sk - sq), DType::F64, 1e-12);
            }
            check(n, sq, sk, d, Some(0), DType::F64, 1e-12);
            check(n, sq, sk, d, Some(2), DType::F64, 1e-12);
        }
    }

    #[test]
    fn matches_the_tensor_formula_f32() {
        // On AVX-512 machines these run the hand-vectorised tiles: odd widths, odd key counts
        // and rows that end inside a 16-lane block included.
        for &(n, sq, sk, d) in &[(3, 7, 7, 5), (2, 33, 33, 16), (1, 1, 9, 8), (70, 4, 3, 17)] {
            check(n, sq, sk, d, None, DType::F32, 1e-5);
            check(n, sq, sk, d, Some(0), DType::F32, 1e-5);
            check(n, sq, sk, d, Some(2), DType::F32, 1e-5);
        }
        check(4, 50, 50, 16, Some(0), DType::F32, 1e-5);
        check(3, 20, 37, 16, None, DType::F32, 1e-5);
        check(2, 3, 70, 32, Some(67), DType::F32, 1e-5);
        // No padding anywhere (scratch reused unzeroed across heads).
        check(40, 32, 32, 16, None, DType::F32, 1e-5);
        check(40, 32, 32, 16, Some(0), DType::F32, 1e-5);
        check(20, 16, 64, 16, None, DType::F32, 1e-5);
    }

    #[test]
    fn strided_heads_in_and_merged_heads_out() {
        let dev = Device::Cpu;
        let (b, s, h, d) = (2, 19, 3, 8);
        let x = Tensor::randn(0f64, 1.0, (b, s, 3, h, d), &dev).unwrap();
        let part = |i: usize| {
            x.narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        for kern in [Kernels::Fused, Kernels::Differentiable] {
            let got = attention_heads(&q, &k, &v, Some(0), kern).unwrap();
            let want = fallback(&q, &k, &v, Some(0), kern).unwrap();
            assert_eq!(got.dims(), &[b, s, h, d]);
            assert!(max_diff(&got, &want) < 1e-12);
        }
    }
}
