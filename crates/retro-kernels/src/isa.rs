//! Which x86 SIMD extensions the CPU has, detected at run time (std caches each answer after the
//! first call), so the kernels can pick their AVX-512 or AVX2 versions. The one place the
//! workspace asks the CPU (the index's distance kernels ask here too).

/// The instruction sets the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// What the target compiles for by default.
    Base,
    /// AVX2 with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The widest instruction set the CPU supports.
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512f() {
            return Isa::Avx512;
        }
        if avx2_fma() {
            return Isa::Avx2;
        }
    }
    Isa::Base
}

/// AVX-512F is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// AVX2 and FMA are both present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// AVX-512F, BW and VNNI are all present: what the index's 8-bit integer dot product needs.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx512_vnni() -> bool {
    avx512f()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Asks for the cache lines of the `len` bytes at `start`: a hint, nothing is read, and no address
/// faults.
#[inline]
pub fn prefetch(start: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(64) {
        // SAFETY: prefetching never faults, whatever the address; `wrapping_add` keeps the
        // pointer arithmetic defined.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                start.wrapping_add(line) as *const i8,
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

/// `fn $name(args)` (optionally generic, `fn $name<T: Float>(args)`) that runs `$body(args)`
/// compiled for the widest instruction set the CPU has: `$body` is `#[inline(always)]`, so each
/// version is its loops vectorised for AVX-512, AVX2 + FMA, or the baseline. The crate's one
/// dispatch on the instruction set for generic loops (the hand-written tiles check `avx512f` and
/// `avx2_fma` themselves). `$body` returns nothing: results go through the arguments.
macro_rules! multiversioned {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$T:ident: Float>)? ($($a:ident: $t:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        $vis fn $name $(<$T: $crate::float::Float>)? ($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                // avx512f implies avx2 and fma; named so that no version loses them.
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512 $(<$T: $crate::float::Float>)? ($($a: $t),*) {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$T: $crate::float::Float>)? ($($a: $t),*) {
                    $body($($a),*)
                }
                match $crate::isa::isa() {
                    // SAFETY: the CPU has the features each version is compiled for.
                    $crate::isa::Isa::Avx512 => return unsafe { avx512($($a),*) },
                    $crate::isa::Isa::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::isa::Isa::Base => {}
                }
            }
            $body($($a),*)
        }
    };
}
pub(crate) use multiversioned;
