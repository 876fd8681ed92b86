//! # GlobalAvgPool: one number per channel
//!
//! ## What
//! The mean of each channel over all its pixels. It removes H and W entirely and keeps C: the
//! usual bridge from feature maps to a classifier.
//!
//! ## Shapes
//! x (N, C, H, W) → y (N, C); P = H·W.
//!
//! ## Derivation
//! ```text
//! y[n,c] = (1/P) Σ_{h,w} x[n,c,h,w]        ∂L/∂x[n,c,h,w] = dy[n,c] / P
//! ```
//! Because it is linear and blind to position, global average pooling alone cannot detect a
//! pattern whose sign flips from pixel to pixel: +v and −v average to 0. A 1×1 convolution and
//! a ReLU *before* it can (|v·x| survives the average); the `train_bottleneck` example shows it.
//!
//! ## Cost
//! Forward one add per input element; backward one add per input element.

use super::{check_image, check_same, dims, dims_mut, GradWrite};
use crate::element::{count, Element};
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use crate::parallel::{in_parts, Along};
use ndarray::{ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis};

const OP: &str = "global_avg_pool";

/// The node on the tape: nothing saved.
#[derive(Clone, Debug)]
pub struct GlobalAvgPool;

impl<T: Element> Graph<T> {
    /// The mean of every channel: (N, C, H, W) → (N, C).
    pub fn global_avg_pool(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(GlobalAvgPool, &[input])
    }
}

impl<T: Element> Operation<T> for GlobalAvgPool {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let x = dims(OP, pass.inputs.get(0))?;
        let shape = output_shape(x.shape())?;
        forward(x, dims_mut(OP, pass.output(&shape)?)?)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        match inputs.port(0)?.grad {
            Some((dx, write)) => spread(dims(OP, dy.view())?, dims_mut(OP, dx)?, write),
            None => Ok(()),
        }
    }
}

/// Checks the input and returns the output shape (N, C).
pub fn output_shape(x: &[usize]) -> Result<[usize; 2]> {
    let [batch, channels, _, _] = check_image(OP, x)?;
    Ok([batch, channels])
}

/// Forward: `y[n,c]` = mean over the plane. The samples split between the threads.
pub fn forward<T: Element>(x: ArrayView4<T>, y: ArrayViewMut2<T>) -> Result<()> {
    check_same(OP, "output", &output_shape(x.shape())?, y.shape())?;
    let pixels = count::<T>(x.shape()[2] * x.shape()[3]);
    in_parts((Along(x, Axis(0)), Along(y, Axis(0))), &|(
        Along(x, _),
        Along(mut y, _),
    )| {
        for (x_sample, mut y_row) in x.outer_iter().zip(y.outer_iter_mut()) {
            for (plane, y) in x_sample.outer_iter().zip(y_row.iter_mut()) {
                *y = plane.sum() / pixels;
            }
        }
        Ok(())
    })
}

/// Backward: every pixel of plane (n, c) receives `dy[n,c] / P` (added to dx).
pub fn backward<T: Element>(dy: ArrayView2<T>, dx: ArrayViewMut4<T>) -> Result<()> {
    spread(dy, dx, GradWrite::Accumulate)
}

/// The backward pass, dx added to or written as `write` says: written, it needs no zeroing
/// pass first. The samples split between the threads.
fn spread<T: Element>(dy: ArrayView2<T>, dx: ArrayViewMut4<T>, write: GradWrite) -> Result<()> {
    let expected = output_shape(dx.shape())?;
    check_same(OP, "output gradient", &expected, dy.shape())?;
    let pixels = count::<T>(dx.shape()[2] * dx.shape()[3]);
    in_parts((Along(dy, Axis(0)), Along(dx, Axis(0))), &|(
        Along(dy, _),
        Along(mut dx, _),
    )| {
        for (dy_row, mut dx_sample) in dy.outer_iter().zip(dx.outer_iter_mut()) {
            for (&g, mut plane) in dy_row.iter().zip(dx_sample.axis_iter_mut(Axis(0))) {
                match write {
                    GradWrite::Overwrite => plane.fill(g / pixels),
                    GradWrite::Accumulate => plane += g / pixels,
                }
            }
        }
        Ok(())
    })
}

/// The specification, as explicit loops.
pub fn forward_reference<T: Element>(x: ArrayView4<T>, mut y: ArrayViewMut2<T>) -> Result<()> {
    let [batch, channels] = output_shape(x.shape())?;
    check_same(OP, "output", &[batch, channels], y.shape())?;
    let (height, width) = (x.shape()[2], x.shape()[3]);
    for (n, c) in ndarray::indices([batch, channels]) {
        let sum = ndarray::indices([height, width])
            .into_iter()
            .fold(T::zero(), |sum, (h, w)| sum + x[[n, c, h, w]]);
        y[[n, c]] = sum / count::<T>(height * width);
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(dy: ArrayView2<T>, mut dx: ArrayViewMut4<T>) -> Result<()> {
    let expected = output_shape(dx.shape())?;
    check_same(OP, "output gradient", &expected, dy.shape())?;
    let pixels = dx.shape()[2] * dx.shape()[3];
    for (n, c, h, w) in ndarray::indices(dx.dim()) {
        dx[[n, c, h, w]] += dy[[n, c]] / count::<T>(pixels);
    }
    Ok(())
}
