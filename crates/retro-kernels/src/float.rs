//! The element types the CPU kernels handle (f32 and f64), and the few operations they need.

use candle_core::WithDType;

/// f32 or f64: what every CPU kernel in this crate is generic over. Sealed: implemented for those
/// two only.
pub trait Float: WithDType + Default + std::fmt::Debug + sealed::Sealed {
    const NEG_INF: Self;
    fn exp_(self) -> Self;
    fn ln_(self) -> Self;
    fn sqrt_(self) -> Self;
    /// `self * a + b` with one rounding: one instruction where the caller is compiled with FMA
    /// (the decode kernels' AVX2 and AVX-512 versions).
    fn mul_add_(self, a: Self, b: Self) -> Self;
    /// The slice as `f32`, when `Self` is `f32` (for the hand-vectorised f32 tiles).
    fn f32s(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_x: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The methods f32 and f64 both take from std.
macro_rules! std_ops {
    ($t:ty) => {
        const NEG_INF: Self = <$t>::NEG_INFINITY;
        fn ln_(self) -> Self {
            self.ln()
        }
        #[inline(always)]
        fn sqrt_(self) -> Self {
            self.sqrt()
        }
        #[inline(always)]
        fn mul_add_(self, a: Self, b: Self) -> Self {
            self.mul_add(a, b)
        }
    };
}

impl Float for f64 {
    std_ops!(f64);
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
}

impl Float for f32 {
    std_ops!(f32);
    fn f32s(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    fn f32s_mut(x: &mut [Self]) -> Option<&mut [f32]> {
        Some(x)
    }
    /// The kernels' own exp (`gelu.rs`), vectorisable where std's is a call.
    #[inline(always)]
    fn exp_(self) -> Self {
        crate::gelu::exp_f32(self)
    }
}
