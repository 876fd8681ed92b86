//! # Flatten: a feature map becomes a feature vector
//!
//! ## What
//! Every sample's (C, H, W) block becomes one row of C·H·W features, so that a linear layer can
//! follow a feature map (as `torch.flatten(x, 1)` before `nn.Linear`). No value changes.
//!
//! ## Shapes
//! x (N, C, H, W) → y (N, C·H·W); more generally (N, d₁, …, dₖ) → (N, d₁·…·dₖ).
//!
//! ## Derivation
//! Row-major order: feature j = (c·H + h)·W + w of sample n is x[n, c, h, w].
//! ```text
//! y[n, (c·H + h)·W + w] = x[n, c, h, w]
//! ∂L/∂x[n, c, h, w]     = dy[n, (c·H + h)·W + w]
//! ```
//! A relabelling of positions: the backward pass is the same relabelling, the other way.
//!
//! ## Cost
//! No arithmetic: forward copies N·C·H·W values, backward adds as many.

use super::{check_same, shape_text, unary_backward};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{ArrayView2, ArrayViewD, ArrayViewMut2, ArrayViewMutD, Zip};

const OP: &str = "flatten";

/// The node on the tape: nothing saved.
#[derive(Clone, Debug)]
pub struct Flatten;

impl<T: Element> Graph<T> {
    /// (N, C, H, W) → (N, C·H·W), in row-major order.
    pub fn flatten(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(Flatten, &[input])
    }
}

impl<T: Element> Operation<T> for Flatten {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let x = pass.inputs.get(0);
        forward(x.view(), pass.output(&output_shape(x.shape())?)?)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        unary_backward(pass, |_, dy, dx| backward(dy, dx))
    }
}

/// Checks that x has a batch axis and at least one more; returns (N, features).
pub fn output_shape(x: &[usize]) -> Result<[usize; 2]> {
    let features = x.get(1..).filter(|rest| !rest.is_empty()).map(|rest| {
        rest.iter()
            .try_fold(1usize, |product, &d| product.checked_mul(d))
    });
    match features {
        Some(Some(features)) => Ok([x[0], features]),
        _ => Err(Error::invalid_shape(
            OP,
            format!(
                "expected (N, C, ...) with a product of sizes that fits, found {}",
                shape_text(x)
            ),
            x,
        )),
    }
}

// ---------------------------------------------------------------- forward and backward

/// Forward: `y[n]` = the row-major values of `x[n]`.
pub fn forward<T: Element>(x: ArrayViewD<T>, y: ArrayViewMutD<T>) -> Result<()> {
    let mut y = rows_mut(y, &output_shape(x.shape())?)?;
    let x = rows(x)?;
    y.assign(&x);
    Ok(())
}

/// Backward: `dx[n] += dy[n]`, seen in dx's shape.
pub fn backward<T: Element>(dy: ArrayViewD<T>, dx: ArrayViewMutD<T>) -> Result<()> {
    let mut dx = rows_mut(dx, dy.shape())?;
    Zip::from(&mut dx)
        .and(&rows(dy)?)
        .for_each(|dx, &dy| *dx += dy);
    Ok(())
}

// ---------------------------------------------------------------- reference loops

/// The specification for 4-D inputs: the index formula, term by term.
pub fn forward_reference<T: Element>(x: ArrayViewD<T>, mut y: ArrayViewMutD<T>) -> Result<()> {
    check_same(OP, "output", &output_shape(x.shape())?, y.shape())?;
    let [_, _, height, width] = image(x.shape())?;
    for (n, c, h, w) in ndarray::indices(image(x.shape())?) {
        y[[n, (c * height + h) * width + w]] = x[[n, c, h, w]];
    }
    Ok(())
}

/// The specification of the backward pass for 4-D inputs.
pub fn backward_reference<T: Element>(dy: ArrayViewD<T>, mut dx: ArrayViewMutD<T>) -> Result<()> {
    let out = output_shape(dx.shape())?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    let [_, _, height, width] = image(dx.shape())?;
    for (n, c, h, w) in ndarray::indices(image(dx.shape())?) {
        dx[[n, c, h, w]] += dy[[n, (c * height + h) * width + w]];
    }
    Ok(())
}

// ---------------------------------------------------------------- helpers

/// x seen as (N, features), without copying (x is row-major on the tape).
fn rows<T>(x: ArrayViewD<'_, T>) -> Result<ArrayView2<'_, T>> {
    let [batch, features] = output_shape(x.shape())?;
    x.into_shape_with_order((batch, features))
        .map_err(|_| not_row_major(&[batch, features]))
}

/// `buffer` (of x's shape) seen as `rows` = (N, features), checked.
fn rows_mut<'a, T>(buffer: ArrayViewMutD<'a, T>, rows: &[usize]) -> Result<ArrayViewMut2<'a, T>> {
    check_same(OP, "rows", rows, &output_shape(buffer.shape())?)?;
    let shape = (rows[0], rows[1]);
    buffer
        .into_shape_with_order(shape)
        .map_err(|_| not_row_major(rows))
}

fn image(shape: &[usize]) -> Result<[usize; 4]> {
    super::check_ndim(OP, "reference input (N, C, H, W)", shape, 4)?;
    Ok([shape[0], shape[1], shape[2], shape[3]])
}

fn not_row_major(shape: &[usize]) -> Error {
    Error::invalid_shape(OP, "tensors must be in standard (row-major) layout", shape)
}
