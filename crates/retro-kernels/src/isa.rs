//! Which x86 SIMD extensions the CPU has, detected at run time (std caches each answer after the
//! first call), so the kernels can pick their AVX-512 or AVX2 versions.

/// The instruction sets the attention kernel is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The widest instruction set the CPU supports.
pub(crate) fn isa() -> Isa {
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
pub(crate) fn avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// AVX2 and FMA are both present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}
