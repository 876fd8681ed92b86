//! # Add: the join of a residual connection
//!
//! ## What
//! `y = a + b` elementwise, for tensors of the same shape.
//!
//! ## Shapes
//! a, b and y all have the same shape.
//!
//! ## Derivation
//! ```text
//! y[i] = a[i] + b[i]      ∂L/∂a[i] = dy[i]      ∂L/∂b[i] = dy[i]
//! ```
//! The gradient is copied to both inputs. When the same value feeds both sides (`x + x`), or
//! also feeds another node, the tape *adds* each contribution into its gradient buffer, so it
//! receives the sum: this is why every backward pass accumulates with `+=`.
//!
//! ## Cost
//! Forward one add per element; backward two adds per element.

use super::check_same;
use crate::element::Element;
use crate::error::Result;
use ndarray::{ArrayViewD, ArrayViewMutD, Zip};

const OP: &str = "add";

/// Checks that both operands have the same shape and returns it.
pub fn output_shape<'a>(a: &'a [usize], b: &[usize]) -> Result<&'a [usize]> {
    check_same(OP, "right operand", a, b)?;
    Ok(a)
}

/// Forward: y = a + b.
pub fn forward<T: Element>(
    a: ArrayViewD<T>,
    b: ArrayViewD<T>,
    mut y: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "output", output_shape(a.shape(), b.shape())?, y.shape())?;
    Zip::from(&mut y)
        .and(&a)
        .and(&b)
        .for_each(|y, &a, &b| *y = a + b);
    Ok(())
}

/// Backward for one operand: d(operand) += dy. Called once for each side.
pub fn backward<T: Element>(dy: ArrayViewD<T>, mut d_operand: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "operand gradient", dy.shape(), d_operand.shape())?;
    d_operand += &dy;
    Ok(())
}

/// The specification, as a loop over indices.
pub fn forward_reference<T: Element>(
    a: ArrayViewD<T>,
    b: ArrayViewD<T>,
    mut y: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "output", output_shape(a.shape(), b.shape())?, y.shape())?;
    for (index, &left) in a.indexed_iter() {
        y[&index] = left + b[&index];
    }
    Ok(())
}

/// The specification of the backward pass for one operand.
pub fn backward_reference<T: Element>(
    dy: ArrayViewD<T>,
    mut d_operand: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "operand gradient", dy.shape(), d_operand.shape())?;
    for (index, &g) in dy.indexed_iter() {
        d_operand[&index] += g;
    }
    Ok(())
}
