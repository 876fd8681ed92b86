//! # ReLU: the per-pixel non-linearity
//!
//! ## What
//! `y = max(x, 0)` elementwise. After a 1×1 convolution it turns the per-pixel linear map into a
//! small per-pixel MLP (the Network-in-Network idea).
//!
//! ## Shapes
//! x and y have the same shape, any number of dimensions.
//!
//! ## Derivation
//! ```text
//! y[i] = x[i] if x[i] > 0, else 0
//! ∂L/∂x[i] = dy[i]·1[x[i] > 0]
//! ```
//! At exactly x = 0 the function has a kink and no derivative; we pass **no** gradient there
//! (the subgradient 0, as PyTorch does). A NaN input gives a NaN output, as in PyTorch, so
//! that a network with NaN inside cannot produce a finite loss. Gradient checks keep inputs away from 0, where a finite
//! difference would straddle the kink.
//!
//! ## Cost
//! Forward: one compare per element, read x, write y. Backward: one compare and one add per
//! element, read x and dy, read-modify-write dx.

use super::{check_same, elementwise_forward, unary_backward};
use crate::element::Element;
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId, Operation};
use crate::parallel::{in_parts, Along};
use ndarray::{ArrayViewD, ArrayViewMutD, Axis, Zip};

const OP: &str = "relu";

/// The node on the tape: nothing saved; backward reads its input x.
#[derive(Clone, Debug)]
pub struct Relu;

impl<T: Element> Graph<T> {
    /// max(x, 0), elementwise.
    pub fn relu(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(Relu, &[input])
    }
}

impl<T: Element> Operation<T> for Relu {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, pass: Forward<'_, T>) -> Result<()> {
        elementwise_forward(pass, forward)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        unary_backward(pass, |x, dy, dx| backward(x, dy, dx))
    }
}

/// Forward: y = max(x, 0).
pub fn forward<T: Element>(x: ArrayViewD<T>, y: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "output", x.shape(), y.shape())?;
    let relu = |(Along(x, _), Along(mut y, _)): (Along<ArrayViewD<T>>, Along<ArrayViewMutD<T>>)| {
        Zip::from(&mut y)
            .and(&x)
            .for_each(|y, &x| *y = if x <= T::zero() { T::zero() } else { x });
        Ok(())
    };
    let parts = (Along(x, Axis(0)), Along(y, Axis(0)));
    // Memory-bound: split the batch between the threads (a 0-d tensor has no axis to split).
    if parts.0 .0.ndim() == 0 {
        relu(parts)
    } else {
        in_parts(parts, &relu)
    }
}

/// Backward: dx += dy where x > 0.
pub fn backward<T: Element>(
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    dx: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "output gradient", x.shape(), dy.shape())?;
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    type Parts<'a, T> = (
        Along<ArrayViewD<'a, T>>,
        Along<ArrayViewD<'a, T>>,
        Along<ArrayViewMutD<'a, T>>,
    );
    let relu = |(Along(x, _), Along(dy, _), Along(mut dx, _)): Parts<T>| {
        // A select, not a branch: with inputs of random sign a branch mispredicts half the time.
        Zip::from(&mut dx)
            .and(&x)
            .and(&dy)
            .for_each(|dx, &x, &dy| *dx += if x > T::zero() { dy } else { T::zero() });
        Ok(())
    };
    let parts = (Along(x, Axis(0)), Along(dy, Axis(0)), Along(dx, Axis(0)));
    if parts.0 .0.ndim() == 0 {
        relu(parts)
    } else {
        in_parts(parts, &relu)
    }
}

/// The specification, as a loop over flat indices.
pub fn forward_reference<T: Element>(x: ArrayViewD<T>, mut y: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "output", x.shape(), y.shape())?;
    for (index, &value) in x.indexed_iter() {
        y[&index] = if value <= T::zero() { T::zero() } else { value };
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    mut dx: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "output gradient", x.shape(), dy.shape())?;
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    for (index, &value) in x.indexed_iter() {
        if value > T::zero() {
            dx[&index] += dy[&index];
        }
    }
    Ok(())
}
