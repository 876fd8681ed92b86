//! The element type of every tensor: `f32` for training, `f64` for gradient checks.
//!
//! One generic code path serves both: every op's own code (index arithmetic, thread splits,
//! reductions, the tape) is the same in f64, where it is gradient-checked, and in f32, where it
//! trains. The matrix products are the exception: f64 goes to ndarray's GEMM, f32 to the
//! crate's own kernel where the CPU has AVX-512 and to the gemm crate's elsewhere
//! (`crate::gemm`), which `tests/gemm.rs` checks against an f64 triple loop and `tests/ops.rs`
//! against the ops' reference loops in f32.

use ndarray::{LinalgScalar, ScalarOperand};
use std::cell::RefCell;
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

    /// Runs `work` on `len` zeros in this thread's scratch, which is kept from call to call, so
    /// that the sums an op keeps for one pass (conv1x1's slots of dW, say) allocate only when
    /// they first grow. Falls back to a fresh vector if the scratch is in use (an op whose
    /// wait for other threads ran another op's part on this one) or for other types.
    fn with_scratch<R>(len: usize, work: impl FnOnce(&mut [Self]) -> R) -> R {
        work(&mut vec![Self::zero(); len])
    }
}

/// [`Element::with_scratch`] on a thread-local vector (also the AVX2 kernel's row sums).
pub(crate) fn with_scratch_in<T: Copy + num_traits::Zero, R>(
    scratch: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    work: impl FnOnce(&mut [T]) -> R,
) -> R {
    scratch.with(|cell| match cell.try_borrow_mut() {
        Ok(mut values) => {
            values.clear();
            values.resize(len, T::zero());
            work(&mut values)
        }
        Err(_) => work(&mut vec![T::zero(); len]),
    })
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

impl Element for f32 {
    const DTYPE: &'static str = "f32";
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
    fn with_scratch<R>(len: usize, work: impl FnOnce(&mut [Self]) -> R) -> R {
        with_scratch_in(&SCRATCH_F32, len, work)
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
    fn with_scratch<R>(len: usize, work: impl FnOnce(&mut [Self]) -> R) -> R {
        with_scratch_in(&SCRATCH_F64, len, work)
    }
}

/// Converts a count to the element type, e.g. for a mean over `count` values.
pub(crate) fn count<T: Element>(count: usize) -> T {
    T::from_f64(count as f64)
}
