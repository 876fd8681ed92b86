//! The element type of every tensor: `f32` for training, `f64` for gradient checks.
//!
//! One generic code path serves both: every op's own code (index arithmetic, thread splits,
//! reductions, the tape) is the same in f64, where it is gradient-checked, and in f32, where it
//! trains. The matrix products are the exception: f64 goes to ndarray's GEMM, f32 to the
//! crate's own kernel where the CPU has AVX-512 and to the gemm crate's elsewhere
//! (`crate::gemm`), which `tests/gemm.rs` checks against an f64 triple loop and `tests/ops.rs`
//! against the ops' reference loops in f32.

use ndarray::{LinalgScalar, ScalarOperand};
use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// A floating-point element type (`f32` or `f64`).
pub trait Element:
    LinalgScalar
    + ScalarOperand
    + num_traits::Float
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Debug
    + Display
    + Send
    + Sync
    + Default
    + serde::Serialize
    + serde::de::DeserializeOwned
{
    /// The name used in weight files (`"f32"`, `"f64"`).
    const DTYPE: &'static str;
    /// Converts from f64, rounding to the nearest representable value.
    fn from_f64(value: f64) -> Self;
    /// Converts to f64 (exact for both f32 and f64).
    fn as_f64(self) -> f64;
}

impl Element for f32 {
    const DTYPE: &'static str = "f32";
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Element for f64 {
    const DTYPE: &'static str = "f64";
    fn from_f64(value: f64) -> Self {
        value
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Converts a count to the element type, e.g. for a mean over `count` values.
pub(crate) fn count<T: Element>(count: usize) -> T {
    T::from_f64(count as f64)
}
