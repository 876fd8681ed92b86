//! # GlobalMaxPool: the largest value of every channel
//!
//! ## What
//! Each channel plane of each sample is reduced to its maximum: (N, C, H, W) → (N, C). Like
//! global average pooling it turns a feature map into a feature vector of any input size, but it
//! keeps the strongest response instead of the mean.
//!
//! ## Shapes
//! x (N, C, H, W) → y (N, C). Saved for backward: the position (h·W + w) of each plane's
//! maximum, N·C 32-bit integers.
//!
//! ## Derivation
//! ```text
//! y[n,c] = x[n,c,h*,w*]      where (h*, w*) = arg max over the plane
//! ∂L/∂x[n,c,h,w] = dy[n,c] if (h,w) = (h*,w*), else 0
//! ```
//! **Tie rule:** the first maximum in row-major order wins, as in [`super::max_pool`].
//!
//! ## Cost
//! Forward H·W compares per output; backward one add per output.

use super::max_pool::{check_positions, Position};
use super::{check_same, dims, dims_mut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4};

const OP: &str = "global_max_pool";

/// The node on the tape, with the arg-max of every plane of the last forward pass.
#[derive(Clone, Debug)]
pub struct GlobalMaxPool {
    argmax: Vec<Position>,
}

impl<T: Element> Graph<T> {
    /// The maximum of every channel: (N, C, H, W) → (N, C).
    pub fn global_max_pool(&mut self, input: NodeId) -> Result<NodeId> {
        self.push_op(GlobalMaxPool { argmax: Vec::new() }, &[input])
    }
}

impl<T: Element> Operation<T> for GlobalMaxPool {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let x = dims(OP, pass.inputs.get(0))?;
        let shape = output_shape(x.shape())?;
        self.argmax.resize(shape[0] * shape[1], 0);
        forward(x, dims_mut(OP, pass.output(&shape)?)?, &mut self.argmax)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let rows = pass.rows();
        let Backward { dy, mut inputs, .. } = pass;
        let (_, Some(dx)) = super::accumulating(OP, inputs.port(0)?)? else {
            return Ok(());
        };
        let dy = dims(OP, dy.view())?;
        // One arg-max per (sample, channel): the rows' are a contiguous run of them.
        let channels = dy.ncols();
        let rows = rows.map_or(0..self.argmax.len(), |r| {
            r.start * channels..r.end * channels
        });
        backward(dy, self.argmax.get(rows).unwrap_or_default(), dx)
    }

    fn saved_elements(&self) -> usize {
        self.argmax.capacity()
    }
}

/// Checks x (N, C, H, W) and returns (N, C).
pub fn output_shape(x: &[usize]) -> Result<[usize; 2]> {
    let [batch, channels, _, _] = check_positions(OP, x)?;
    Ok([batch, channels])
}

// ---------------------------------------------------------------- forward and backward

/// Forward: `y[n,c]` = the plane's maximum; `argmax` receives its position h·W + w.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    mut y: ArrayViewMut2<T>,
    argmax: &mut [Position],
) -> Result<()> {
    check_same(OP, "output", &output_shape(x.shape())?, y.shape())?;
    check_same(OP, "arg-max buffer length", &[y.len()], &[argmax.len()])?;
    let mut winners = argmax.iter_mut();
    for (sample, mut y_row) in x.outer_iter().zip(y.outer_iter_mut()) {
        for ((plane, y), winner) in sample.outer_iter().zip(y_row.iter_mut()).zip(&mut winners) {
            let mut best = (0, plane[[0, 0]]);
            for (position, &value) in plane.iter().enumerate() {
                if value > best.1 {
                    best = (position, value);
                }
            }
            (*winner, *y) = (best.0 as Position, best.1);
        }
    }
    Ok(())
}

/// Backward: dx[n, c, arg-max] += dy[n, c].
pub fn backward<T: Element>(
    dy: ArrayView2<T>,
    argmax: &[Position],
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let expected = output_shape(dx.shape())?;
    check_same(OP, "output gradient", &expected, dy.shape())?;
    check_same(OP, "arg-max buffer length", &[dy.len()], &[argmax.len()])?;
    let width = dx.shape()[3];
    let mut winners = argmax.iter();
    for (dy_row, mut dx_sample) in dy.outer_iter().zip(dx.outer_iter_mut()) {
        for ((&g, mut plane), &position) in dy_row
            .iter()
            .zip(dx_sample.outer_iter_mut())
            .zip(&mut winners)
        {
            let position = position as usize;
            let slot = plane.get_mut([position / width, position % width]);
            *slot.ok_or_else(|| bad_position(position))? += g;
        }
    }
    Ok(())
}

/// The error for an arg-max outside its plane (possible only with a forged buffer).
fn bad_position(position: usize) -> Error {
    Error::invalid_config(
        OP,
        format!("arg-max position {position} is outside its plane"),
    )
}

// ---------------------------------------------------------------- reference loops

/// The specification: the maximum by explicit loops, first maximum wins; returns the arg-max
/// positions it found, so the tests can compare them too.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    mut y: ArrayViewMut2<T>,
) -> Result<Vec<Position>> {
    let [batch, channels] = output_shape(x.shape())?;
    check_same(OP, "output", &[batch, channels], y.shape())?;
    let (height, width) = (x.shape()[2], x.shape()[3]);
    let mut argmax = Vec::with_capacity(batch * channels);
    for (n, c) in ndarray::indices([batch, channels]) {
        let mut best = (0, 0);
        for (h, w) in ndarray::indices([height, width]) {
            if x[[n, c, h, w]] > x[[n, c, best.0, best.1]] {
                best = (h, w);
            }
        }
        y[[n, c]] = x[[n, c, best.0, best.1]];
        argmax.push((best.0 * width + best.1) as Position);
    }
    Ok(argmax)
}

/// The specification of the backward pass, recomputing the arg-max from x.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    dy: ArrayView2<T>,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let mut y = ndarray::Array2::zeros(output_shape(x.shape())?);
    let argmax = forward_reference(x, y.view_mut())?;
    let width = x.shape()[3];
    for ((index, &g), &position) in dy.indexed_iter().zip(&argmax) {
        let position = position as usize;
        dx[[index.0, index.1, position / width, position % width]] += g;
    }
    Ok(())
}
