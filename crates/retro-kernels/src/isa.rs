//! Which x86 SIMD extensions the CPU has, detected at run time (std caches each answer after the
//! first call), so the kernels can pick their AVX-512 or AVX2 versions. The one place the
//! workspace asks the CPU (the index's distance kernels ask here too).

/// The instruction sets the kernels are compiled for, narrowest first (so `<=` is "no wider than").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// The widest instruction set the kernels may use: the CPU's, capped by `RETRO_ISA` (see
/// [`cap`]).
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

/// The environment variable that caps the instruction set: `avx512` (no cap), `avx2` or `base`.
/// It lets the AVX2 and baseline versions be tested and measured on a CPU that has AVX-512.
pub const ISA_VAR: &str = "RETRO_ISA";

/// The cap `RETRO_ISA` sets, read once; `Err` names the variable and the value it does not know.
/// Unset or empty is no cap.
pub fn cap() -> Result<Option<Isa>, String> {
    cap_read().clone()
}

fn cap_read() -> &'static Result<Option<Isa>, String> {
    static CAP: std::sync::OnceLock<Result<Option<Isa>, String>> = std::sync::OnceLock::new();
    CAP.get_or_init(|| {
        let v = std::env::var(ISA_VAR).unwrap_or_default();
        match v.trim().to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "base" => Ok(Some(Isa::Base)),
            #[cfg(target_arch = "x86_64")]
            "avx2" => Ok(Some(Isa::Avx2)),
            #[cfg(target_arch = "x86_64")]
            "avx512" => Ok(Some(Isa::Avx512)),
            _ => Err(format!(
                "{ISA_VAR}={v:?} is not an instruction set the kernels know: use avx512, avx2 or base"
            )),
        }
    })
}

/// Whether the cap allows `level`. A value `cap` rejects caps nothing here (a library cannot
/// report it); the `retro` binary checks [`cap`] at start and refuses to run.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn allowed(level: Isa) -> bool {
    match cap_read() {
        Ok(Some(c)) => level <= *c,
        _ => true,
    }
}

/// AVX-512F is present (and not capped off).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && allowed(Isa::Avx512)
}

/// AVX2 and FMA are both present (and not capped off).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && allowed(Isa::Avx2)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary's tests again, in a child process with the instruction set capped at AVX2
    /// and at the baseline (the cap is read once per process). On a CPU with AVX-512 the other
    /// versions of every kernel would otherwise never run in the tests.
    #[test]
    fn the_kernel_tests_pass_with_the_instruction_set_capped() {
        if std::env::var_os(ISA_VAR).is_some() {
            return; // the child
        }
        for cap in ["avx2", "base"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env(ISA_VAR, cap)
                .args(["--test-threads", "2"])
                .output()
                .expect("rerun the test binary");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("test result: ok"),
                "with {ISA_VAR}={cap}:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn retro_isa_caps_what_the_kernels_use() {
        match cap() {
            Ok(None) => {}
            #[cfg(target_arch = "x86_64")]
            Ok(Some(Isa::Avx2)) => {
                assert!(!avx512f() && !avx512_vnni() && isa() != Isa::Avx512);
            }
            Ok(Some(Isa::Base)) => {
                #[cfg(target_arch = "x86_64")]
                assert!(!avx512f() && !avx2_fma());
                assert_eq!(isa(), Isa::Base);
            }
            Ok(Some(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
