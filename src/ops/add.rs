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

use super::{check_same, zip_values};
use crate::element::Element;
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::{GradWrite, Operation};
use ndarray::{ArrayViewD, ArrayViewMutD};

const OP: &str = "add";

/// The node on the tape: nothing saved.
#[derive(Clone, Debug)]
pub struct Add;

impl<T: Element> Graph<T> {
    /// left + right, elementwise; both may be the same node.
    pub fn add(&mut self, left: NodeId, right: NodeId) -> Result<NodeId> {
        self.push_op(Add, &[left, right])
    }
}

impl<T: Element> Operation<T> for Add {
    fn kind(&self) -> &'static str {
        OP
    }

    /// Sample n of the sum depends on sample n of both operands only if both carry a batch.
    fn batched(&self, inputs_batched: &[bool]) -> bool {
        inputs_batched.iter().all(|&batched| batched)
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let (a, b) = (pass.inputs.get(0), pass.inputs.get(1));
        let shape = output_shape(a.shape(), b.shape())?;
        forward(a.view(), b.view(), pass.output(shape)?)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        // One side at a time, so that `x + x` (both sides one node) simply receives dy twice.
        for side in 0..2 {
            if let Some((d_side, write)) = inputs.port(side)?.grad {
                write_gradient(dy.view(), d_side, write)?;
            }
        }
        Ok(())
    }
}

/// Checks that both operands have the same shape and returns it.
pub fn output_shape<'a>(a: &'a [usize], b: &[usize]) -> Result<&'a [usize]> {
    check_same(OP, "right operand", a, b)?;
    Ok(a)
}

/// Forward: y = a + b.
pub fn forward<T: Element>(a: ArrayViewD<T>, b: ArrayViewD<T>, y: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "output", output_shape(a.shape(), b.shape())?, y.shape())?;
    zip_values(y, a, b, |_, a, b| a + b);
    Ok(())
}

/// Backward for one operand: d(operand) += dy. Called once for each side.
pub fn backward<T: Element>(dy: ArrayViewD<T>, d_operand: ArrayViewMutD<T>) -> Result<()> {
    write_gradient(dy, d_operand, GradWrite::Accumulate)
}

/// d(operand) = dy into a gradient that holds no contribution yet (no pass of zeros first),
/// else d(operand) += dy.
fn write_gradient<T: Element>(
    dy: ArrayViewD<T>,
    mut d_operand: ArrayViewMutD<T>,
    write: GradWrite,
) -> Result<()> {
    check_same(OP, "operand gradient", dy.shape(), d_operand.shape())?;
    match write {
        GradWrite::Overwrite => d_operand.assign(&dy),
        GradWrite::Accumulate => d_operand += &dy,
    }
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
