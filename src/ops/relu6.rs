//! # ReLU6: the ReLU clipped at 6 (MobileNet's activation)
//!
//! ## What
//! `y = min(max(x, 0), 6)` elementwise. MobileNet v1 and v2 use it after their depthwise and
//! expanding 1×1 convolutions: the bound keeps activations in a range that low-precision
//! arithmetic represents well.
//!
//! ## Shapes
//! x and y have the same shape, any number of dimensions.
//!
//! ## Derivation
//! ```text
//! y[i] = 0 if x[i] ≤ 0,  x[i] if 0 < x[i] < 6,  6 if x[i] ≥ 6
//! ∂L/∂x[i] = dy[i]·1[0 < x[i] < 6]
//! ```
//! Both kinks (0 and 6) pass **no** gradient, as PyTorch's `relu6` (a `hardtanh(0, 6)`) does.
//! Gradient checks keep inputs away from 0 and 6.
//!
//! ## Cost
//! Forward: two compares per element. Backward: two compares and one add per element.

use super::{check_same, elementwise_forward, unary_backward};
use crate::element::Element;
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId, Operation};
use crate::parallel::{in_parts, Along};
use ndarray::{ArrayViewD, ArrayViewMutD, Axis, Zip};

const OP: &str = "relu6";

/// The node on the tape: nothing saved; backward reads its input x.
#[derive(Clone, Debug)]
pub struct Relu6;

impl<T: Element> Graph<T> {
    /// min(max(x, 0), 6), elementwise.
    pub fn relu6(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(Relu6, &[input])
    }
}

impl<T: Element> Operation<T> for Relu6 {
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

/// The clipped value; NaN stays NaN (a comparison with NaN is false).
fn clip<T: Element>(x: T) -> T {
    let six = T::from_f64(6.0);
    if x <= T::zero() {
        T::zero()
    } else if x >= six {
        six
    } else {
        x
    }
}

/// Whether the gradient passes: strictly between the kinks.
fn passes<T: Element>(x: T) -> bool {
    x > T::zero() && x < T::from_f64(6.0)
}

// ---------------------------------------------------------------- forward and backward

/// Forward: y = min(max(x, 0), 6); the batch split between the threads.
pub fn forward<T: Element>(x: ArrayViewD<T>, y: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "output", x.shape(), y.shape())?;
    let parts = (Along(x, Axis(0)), Along(y, Axis(0)));
    in_parts(parts, &|(Along(x, _), Along(mut y, _))| {
        Zip::from(&mut y).and(&x).for_each(|y, &x| *y = clip(x));
        Ok(())
    })
}

/// Backward: dx += dy where 0 < x < 6.
pub fn backward<T: Element>(
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    dx: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "output gradient", x.shape(), dy.shape())?;
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    let parts = (Along(x, Axis(0)), Along(dy, Axis(0)), Along(dx, Axis(0)));
    in_parts(parts, &|(Along(x, _), Along(dy, _), Along(mut dx, _))| {
        Zip::from(&mut dx)
            .and(&x)
            .and(&dy)
            .for_each(|dx, &x, &dy| *dx += if passes(x) { dy } else { T::zero() });
        Ok(())
    })
}

// ---------------------------------------------------------------- reference loops

/// The specification, one index at a time.
pub fn forward_reference<T: Element>(x: ArrayViewD<T>, mut y: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "output", x.shape(), y.shape())?;
    for (index, &value) in x.indexed_iter() {
        let six = T::from_f64(6.0);
        y[&index] = if value <= T::zero() {
            T::zero()
        } else if value >= six {
            six
        } else {
            value
        };
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    mut dx: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    for (index, &value) in x.indexed_iter() {
        if value > T::zero() && value < T::from_f64(6.0) {
            dx[&index] += dy[&index];
        }
    }
    Ok(())
}
