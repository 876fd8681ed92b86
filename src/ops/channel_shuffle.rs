//! # ChannelShuffle: interleave the channels of g groups (ShuffleNet)
//!
//! ## What
//! A grouped 1×1 convolution mixes channels only inside each group; stacking two of them would
//! keep the groups apart forever. ShuffleNet shuffles the channels between them: with g groups
//! of c channels, the output takes one channel from each group in turn.
//!
//! ## Shapes
//! x (N, g·c, H, W) → y (N, g·c, H, W). As in PyTorch's `ChannelShuffle`: view the channels as
//! (g, c), transpose to (c, g), flatten again.
//!
//! ## Derivation
//! Output channel i·g + j (i < c, j < g) is input channel j·c + i:
//! ```text
//! y[n, i·g + j, h, w] = x[n, j·c + i, h, w]
//! ∂L/∂x[n, j·c + i, h, w] = dy[n, i·g + j, h, w]
//! ```
//! A permutation of channels; its backward is the inverse permutation.
//!
//! ## Cost
//! No arithmetic: forward copies every value once, backward adds every gradient once.

use super::{check_image, check_same, dims, dims_mut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{ArrayView4, ArrayViewMut4, Axis, Ix4};

const OP: &str = "channel_shuffle";

/// The node on the tape: its group count; nothing saved.
#[derive(Clone, Debug)]
pub struct ChannelShuffle {
    groups: usize,
}

impl<T: Element> Graph<T> {
    /// Interleaves the channels of `groups` groups: (N, g·c, H, W) → the same shape.
    pub fn channel_shuffle(&mut self, input: NodeId, groups: usize) -> Result<NodeId> {
        if groups == 0 {
            return Err(Error::invalid_config(OP, "groups must be at least 1"));
        }
        self.push_op(ChannelShuffle { groups }, &[input])
    }
}

impl<T: Element> Operation<T> for ChannelShuffle {
    fn kind(&self) -> &'static str {
        OP
    }

    fn attributes(&self) -> Vec<(&'static str, usize)> {
        vec![("groups", self.groups)]
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let x = dims(OP, pass.inputs.get(0))?;
        let shape = output_shape(x.shape(), self.groups)?;
        forward(x, self.groups, dims_mut(OP, pass.output(&shape)?)?)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        match super::accumulating::<T, Ix4>(OP, inputs.port(0)?)? {
            (_, Some(dx)) => backward(dims(OP, dy.view())?, self.groups, dx),
            _ => Ok(()),
        }
    }
}

/// Checks that x is (N, C, H, W) with C a multiple of `groups`; returns x's shape.
pub fn output_shape(x: &[usize], groups: usize) -> Result<[usize; 4]> {
    let shape = check_image(OP, x)?;
    if groups == 0 || shape[1] % groups != 0 {
        return Err(Error::invalid_shape(
            OP,
            format!("{} channels do not split into {groups} groups", shape[1]),
            x,
        ));
    }
    Ok(shape)
}

/// The input channel that output channel `o` reads: o = i·g + j reads j·c + i.
fn source(o: usize, groups: usize, per_group: usize) -> usize {
    (o % groups) * per_group + o / groups
}

// ---------------------------------------------------------------- forward and backward

/// Forward: output channel i·g + j = input channel j·c + i, a plane at a time.
pub fn forward<T: Element>(x: ArrayView4<T>, groups: usize, mut y: ArrayViewMut4<T>) -> Result<()> {
    let shape = output_shape(x.shape(), groups)?;
    check_same(OP, "output", &shape, y.shape())?;
    let per_group = shape[1] / groups;
    for (o, mut plane) in y.axis_iter_mut(Axis(1)).enumerate() {
        plane.assign(&x.index_axis(Axis(1), source(o, groups, per_group)));
    }
    Ok(())
}

/// Backward: the inverse permutation, dx[j·c + i] += dy[i·g + j].
pub fn backward<T: Element>(
    dy: ArrayView4<T>,
    groups: usize,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let shape = output_shape(dx.shape(), groups)?;
    check_same(OP, "output gradient", &shape, dy.shape())?;
    let per_group = shape[1] / groups;
    for (o, plane) in dy.axis_iter(Axis(1)).enumerate() {
        let mut target = dx.index_axis_mut(Axis(1), source(o, groups, per_group));
        target += &plane;
    }
    Ok(())
}

// ---------------------------------------------------------------- reference loops

/// The specification: PyTorch's view (g, c) → transpose → flatten, element by element:
/// y[n, i·g + j] = x[n, j·c + i] for group j and channel i of a group.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    groups: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let [batch, channels, height, width] = output_shape(x.shape(), groups)?;
    check_same(OP, "output", &[batch, channels, height, width], y.shape())?;
    for (n, j, i, h, w) in ndarray::indices((batch, groups, channels / groups, height, width)) {
        y[[n, i * groups + j, h, w]] = x[[n, j * (channels / groups) + i, h, w]];
    }
    Ok(())
}

/// The specification of the backward pass: dx[n, j·c + i] += dy[n, i·g + j].
pub fn backward_reference<T: Element>(
    dy: ArrayView4<T>,
    groups: usize,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let shape = output_shape(dx.shape(), groups)?;
    check_same(OP, "output gradient", &shape, dy.shape())?;
    let [batch, channels, height, width] = shape;
    for (n, j, i, h, w) in ndarray::indices((batch, groups, channels / groups, height, width)) {
        dx[[n, j * (channels / groups) + i, h, w]] += dy[[n, i * groups + j, h, w]];
    }
    Ok(())
}
