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

use super::{accumulating, check_same, dims, dims_mut, each_window, pooled_shape};
use crate::element::{count, Element};
use crate::error::Result;
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{s, ArrayView4, ArrayViewMut4, Zip};

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
    let windows = x.windows_with_stride((1, 1, window, window), (1, 1, stride, stride));
    Zip::from(&mut y)
        .and(windows)
        .for_each(|y, patch| *y = patch.sum() * scale);
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
    for ((n, c, i, j), &g) in dy.indexed_iter() {
        let (top, left) = (i * stride, j * stride);
        let mut patch = dx.slice_mut(s![n, c, top..top + window, left..left + window]);
        patch += g * scale;
    }
    Ok(())
}

/// The specification: every output the mean of its window's inputs.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), window, stride)?;
    check_same(OP, "output", &out, y.shape())?;
    each_window(out, window, stride, |o, cells| {
        let sum = cells.iter().fold(T::zero(), |sum, &cell| sum + x[cell]);
        y[o] = sum / count::<T>(cells.len());
    });
    Ok(())
}

/// The specification of the backward pass: every input of a window receives dy / k².
pub fn backward_reference<T: Element>(
    dy: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(dx.shape(), window, stride)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    each_window(out, window, stride, |o, cells| {
        for &cell in cells {
            dx[cell] += dy[o] / count::<T>(cells.len());
        }
    });
    Ok(())
}
