//! # AvgPool: shrinks H and W by averaging each window
//!
//! ## What
//! Each output pixel is the mean of a `window`×`window` patch of its channel, patches taken every
//! `stride` pixels. Like every pooling, it changes H and W and never C.
//!
//! ## Shapes
//! x (N, C, H, W) → y (N, C, H′, W′) with H′ = ⌊(H − k)/s⌋ + 1, W′ = ⌊(W − k)/s⌋ + 1.
//! Nothing is saved for backward: the gradient does not depend on x.
//!
//! ## Derivation
//! ```text
//! y[n,c,i,j] = (1/k²) Σ_{a,b < k} x[n,c,i·s+a,j·s+b]
//! ∂L/∂x[n,c,h,w] = Σ over windows containing (h,w) of dy[n,c,i,j] / k²
//! ```
//! Each window spreads its gradient evenly over its k² inputs; overlapping windows add up.
//!
//! ## Cost
//! Forward k² adds per output element; backward k² adds per output element.

use super::{accumulating, check_same, dims, dims_mut, pooled_shape};
use crate::element::{count, Element};
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId, Operation};
use ndarray::{s, ArrayView4, ArrayViewMut4};

const OP: &str = "avg_pool";

/// The node on the tape: its window and stride; nothing saved.
#[derive(Clone, Debug)]
pub struct AvgPool {
    window: usize,
    stride: usize,
}

impl<T: Element> Graph<T> {
    /// Average pooling with a `window`×`window` window every `stride` pixels.
    pub fn avg_pool(&mut self, input: NodeId, window: usize, stride: usize) -> Result<NodeId> {
        output_shape(&[1, 1, window.max(1), window.max(1)], window, stride)?;
        self.push_op(AvgPool { window, stride }, &[input])
    }
}

impl<T: Element> Operation<T> for AvgPool {
    fn kind(&self) -> &'static str {
        OP
    }

    fn attributes(&self) -> Vec<(&'static str, usize)> {
        vec![("window", self.window), ("stride", self.stride)]
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let x = dims(OP, pass.inputs.get(0))?;
        let shape = output_shape(x.shape(), self.window, self.stride)?;
        forward(
            x,
            self.window,
            self.stride,
            dims_mut(OP, pass.output(&shape)?)?,
        )
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        match accumulating(OP, inputs.port(0)?)? {
            (_, Some(dx)) => backward(dims(OP, dy.view())?, self.window, self.stride, dx),
            _ => Ok(()),
        }
    }
}

/// Checks the input and the pool settings and returns the output shape.
pub fn output_shape(x: &[usize], window: usize, stride: usize) -> Result<[usize; 4]> {
    pooled_shape(OP, x, window, stride)
}

/// Forward: y = window mean.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), window, stride)?;
    check_same(OP, "output", &out, y.shape())?;
    let scale = T::one() / count::<T>(window * window);
    for (x_sample, mut y_sample) in x.outer_iter().zip(y.outer_iter_mut()) {
        for (plane, mut y_plane) in x_sample.outer_iter().zip(y_sample.outer_iter_mut()) {
            for ((i, j), y) in y_plane.indexed_iter_mut() {
                let (top, left) = (i * stride, j * stride);
                *y = plane
                    .slice(s![top..top + window, left..left + window])
                    .sum()
                    * scale;
            }
        }
    }
    Ok(())
}

/// Backward: every input of a window receives dy / k².
pub fn backward<T: Element>(
    dy: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(dx.shape(), window, stride)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    let scale = T::one() / count::<T>(window * window);
    for (dy_sample, mut dx_sample) in dy.outer_iter().zip(dx.outer_iter_mut()) {
        for (dy_plane, mut dx_plane) in dy_sample.outer_iter().zip(dx_sample.outer_iter_mut()) {
            for ((i, j), &g) in dy_plane.indexed_iter() {
                let (top, left) = (i * stride, j * stride);
                let mut patch = dx_plane.slice_mut(s![top..top + window, left..left + window]);
                patch += g * scale;
            }
        }
    }
    Ok(())
}

/// The specification, as explicit loops over the window.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let [batch, channels, out_height, out_width] = output_shape(x.shape(), window, stride)?;
    check_same(
        OP,
        "output",
        &[batch, channels, out_height, out_width],
        y.shape(),
    )?;
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..out_height {
                for j in 0..out_width {
                    let mut sum = T::zero();
                    for a in 0..window {
                        for b in 0..window {
                            sum += x[[n, c, i * stride + a, j * stride + b]];
                        }
                    }
                    y[[n, c, i, j]] = sum / count::<T>(window * window);
                }
            }
        }
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    dy: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let [batch, channels, out_height, out_width] = output_shape(dx.shape(), window, stride)?;
    check_same(
        OP,
        "output gradient",
        &[batch, channels, out_height, out_width],
        dy.shape(),
    )?;
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..out_height {
                for j in 0..out_width {
                    for a in 0..window {
                        for b in 0..window {
                            dx[[n, c, i * stride + a, j * stride + b]] +=
                                dy[[n, c, i, j]] / count::<T>(window * window);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
