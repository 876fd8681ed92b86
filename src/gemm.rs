//! The matrix product every layer runs: C ← α·A·B + β·C.
//!
//! One entry point, so that the ops say *what* they multiply and this module decides *how*.
//! A and B may be transposed views (any strides); C must not alias them.

use crate::element::Element;
use crate::error::{Error, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// C (M×N) ← α·A (M×K)·B (K×N) + β·C. With β = 0, C's old values are ignored (even NaN).
pub fn gemm<T: Element>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    mut c: ArrayViewMut2<T>,
) -> Result<()> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    if k != k2 || c.dim() != (m, n) {
        return Err(Error::shape_mismatch(
            "gemm",
            "operand shapes (M×K)·(K×N) → (M×N)",
            format!("({m}×{k})·({k}×N) → ({m}×N)"),
            format!("({m}×{k})·({k2}×{n}) → {:?}", c.dim()),
        ));
    }
    general_mat_mul(alpha, &a, &b, beta, &mut c);
    Ok(())
}
