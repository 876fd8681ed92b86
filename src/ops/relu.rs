//! # ReLU and ReLU6: the per-pixel non-linearity
//!
//! ## What
//! `y = max(x, 0)` elementwise. After a 1×1 convolution it turns the per-pixel linear map into a
//! small per-pixel MLP (the Network-in-Network idea).
//!
//! ReLU6, `y = min(max(x, 0), 6)`, is the same with a ceiling: MobileNet v1 and v2 use it after
//! their depthwise and expanding 1×1 convolutions, because the bound keeps activations in a
//! range that low-precision arithmetic represents well.
//!
//! ## Shapes
//! x and y have the same shape, any number of dimensions.
//!
//! ## Derivation
//! ```text
//! ReLU:   y[i] = x[i] if x[i] > 0, else 0             ∂L/∂x[i] = dy[i]·1[x[i] > 0]
//! ReLU6:  y[i] = 0 if x[i] ≤ 0, 6 if x[i] ≥ 6, else x[i]   ∂L/∂x[i] = dy[i]·1[0 < x[i] < 6]
//! ```
//! At a kink (0, and 6 for ReLU6) the function has no derivative; we pass **no** gradient there
//! (the subgradient 0, as PyTorch's `relu` and `relu6` — a `hardtanh(0, 6)` — do). A NaN input
//! gives a NaN output, as in PyTorch, so that a network with NaN inside cannot produce a finite
//! loss. Gradient checks keep inputs away from the kinks, where a finite difference would
//! straddle one.
//!
//! ## Cost
//! Forward: one compare per element (two for ReLU6), read x, write y. Backward: the same
//! compares, read x and dy, write dx (or add to it, one more read, when an earlier contribution
//! is there).

use super::{check_same, elementwise_forward, zip_values};
use crate::element::Element;
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId, Port};
use crate::ops::{GradWrite, Operation};
use crate::parallel::{in_parts, Along};
use ndarray::{ArrayViewD, ArrayViewMutD, Axis};

/// The node on the tape, and which of the two functions it is: nothing saved; backward reads
/// its input x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relu {
    /// max(x, 0)
    Plain,
    /// min(max(x, 0), 6)
    Six,
}

impl<T: Element> Graph<T> {
    /// max(x, 0), elementwise.
    pub fn relu(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(Relu::Plain, &[input])
    }

    /// min(max(x, 0), 6), elementwise (MobileNet's ReLU6).
    pub fn relu6(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(Relu::Six, &[input])
    }
}

impl<T: Element> Operation<T> for Relu {
    fn kind(&self) -> &'static str {
        self.name()
    }

    fn forward(&mut self, pass: Forward<'_, T>) -> Result<()> {
        elementwise_forward(pass, |x, y| forward(*self, x, y))
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        match inputs.port(0)? {
            Port {
                value: x,
                grad: Some((dx, write)),
            } => write_gradient(*self, x, dy.view(), dx, write),
            _ => Ok(()),
        }
    }
}

impl Relu {
    fn name(self) -> &'static str {
        match self {
            Relu::Plain => "relu",
            Relu::Six => "relu6",
        }
    }

    /// y for x. A NaN stays NaN: every comparison with it is false.
    pub(crate) fn value<T: Element>(self, x: T) -> T {
        if x <= T::zero() {
            T::zero()
        } else if self == Relu::Six && x >= T::from_f64(6.0) {
            T::from_f64(6.0)
        } else {
            x
        }
    }

    /// The gradient that passes at x: g strictly between the kinks, else 0. A select, not a
    /// branch: with inputs of random sign a branch mispredicts half the time.
    pub(crate) fn gate<T: Element>(self, x: T, g: T) -> T {
        let passes = x > T::zero() && (self == Relu::Plain || x < T::from_f64(6.0));
        if passes {
            g
        } else {
            T::zero()
        }
    }
}

// ---------------------------------------------------------------- forward and backward

/// Forward: y = relu(x), the batch split between the threads (memory-bound work).
pub fn forward<T: Element>(relu: Relu, x: ArrayViewD<T>, y: ArrayViewMutD<T>) -> Result<()> {
    check_same(relu.name(), "output", x.shape(), y.shape())?;
    let parts = (Along(x, Axis(0)), Along(y, Axis(0)));
    let apply = |relu: Relu| {
        move |(Along(x, _), Along(y, _)): (Along<ArrayViewD<T>>, Along<ArrayViewMutD<T>>)| {
            zip_values(y, x.view(), x.view(), |_, x, _| relu.value(x));
            Ok(())
        }
    };
    // The variant is fixed outside the loop, so that each loop is compiled for one function.
    match relu {
        Relu::Plain => in_parts(parts, &apply(Relu::Plain)),
        Relu::Six => in_parts(parts, &apply(Relu::Six)),
    }
}

/// Backward: dx += dy where the gradient passes.
pub fn backward<T: Element>(
    relu: Relu,
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    dx: ArrayViewMutD<T>,
) -> Result<()> {
    write_gradient(relu, x, dy, dx, GradWrite::Accumulate)
}

/// The backward pass into dx as `write` says: `dx = gate` overwrites a gradient that holds no
/// contribution yet, so that it needs no pass of zeros first.
fn write_gradient<T: Element>(
    relu: Relu,
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    dx: ArrayViewMutD<T>,
    write: GradWrite,
) -> Result<()> {
    check_same(relu.name(), "output gradient", x.shape(), dy.shape())?;
    check_same(relu.name(), "input gradient", x.shape(), dx.shape())?;
    type Parts<'a, T> = (
        Along<ArrayViewD<'a, T>>,
        Along<ArrayViewD<'a, T>>,
        Along<ArrayViewMutD<'a, T>>,
    );
    let parts = (Along(x, Axis(0)), Along(dy, Axis(0)), Along(dx, Axis(0)));
    let gradient = |(Along(x, _), Along(dy, _), Along(dx, _)): Parts<T>| {
        // Each arm a loop of its own, compiled for one function and one write.
        match (relu, write) {
            (Relu::Plain, GradWrite::Overwrite) => {
                zip_values(dx, x, dy, |_, x, g| Relu::Plain.gate(x, g))
            }
            (Relu::Plain, GradWrite::Accumulate) => {
                zip_values(dx, x, dy, |dx, x, g| dx + Relu::Plain.gate(x, g))
            }
            (Relu::Six, GradWrite::Overwrite) => {
                zip_values(dx, x, dy, |_, x, g| Relu::Six.gate(x, g))
            }
            (Relu::Six, GradWrite::Accumulate) => {
                zip_values(dx, x, dy, |dx, x, g| dx + Relu::Six.gate(x, g))
            }
        }
        Ok(())
    };
    in_parts(parts, &gradient)
}

// ---------------------------------------------------------------- reference loops

/// The specification, one index at a time.
pub fn forward_reference<T: Element>(
    relu: Relu,
    x: ArrayViewD<T>,
    mut y: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(relu.name(), "output", x.shape(), y.shape())?;
    for (index, &value) in x.indexed_iter() {
        y[&index] = if value <= T::zero() {
            T::zero()
        } else if relu == Relu::Six && value >= T::from_f64(6.0) {
            T::from_f64(6.0)
        } else {
            value
        };
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    relu: Relu,
    x: ArrayViewD<T>,
    dy: ArrayViewD<T>,
    mut dx: ArrayViewMutD<T>,
) -> Result<()> {
    check_same(relu.name(), "output gradient", x.shape(), dy.shape())?;
    check_same(relu.name(), "input gradient", x.shape(), dx.shape())?;
    for (index, &value) in x.indexed_iter() {
        if value > T::zero() && (relu == Relu::Plain || value < T::from_f64(6.0)) {
            dx[&index] += dy[&index];
        }
    }
    Ok(())
}
