//! # Concat: feature maps side by side on the channel axis
//!
//! ## What
//! The branches of an Inception module or a SqueezeNet fire module (a 1×1 branch beside a 3×3
//! one) are joined by stacking their channels: K maps of the same N, H, W become one map whose
//! channels are theirs in order.
//!
//! ## Shapes
//! xₖ (N, Cₖ, H, W) for k = 0..K → y (N, C₀ + … + C_{K−1}, H, W). With oₖ = C₀ + … + C_{k−1}
//! the offset of input k, its channel c is output channel oₖ + c.
//!
//! ## Derivation
//! ```text
//! y[n, oₖ + c, h, w] = xₖ[n, c, h, w]
//! ∂L/∂xₖ[n, c, h, w] = dy[n, oₖ + c, h, w]
//! ```
//! The backward pass is a split: each input receives its own channels of dy. An input given
//! twice (concat(x, x)) receives both of its slices.
//!
//! ## Cost
//! No arithmetic: forward copies every value once, backward adds every gradient once.

use super::{check_image, check_same, dims, dims_mut, shape_text};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{s, ArrayView4, ArrayViewMut4, Axis, Ix4};

const OP: &str = "concat";

/// The node on the tape: nothing saved.
#[derive(Clone, Debug)]
pub struct Concat;

impl<T: Element> Graph<T> {
    /// The inputs' channels side by side: (N, Cₖ, H, W) for each input → (N, Σ Cₖ, H, W).
    pub fn concat(&mut self, inputs: &[NodeId]) -> Result<NodeId> {
        if inputs.is_empty() {
            return Err(Error::invalid_config(OP, "needs at least one input"));
        }
        self.push_op(Concat, inputs)
    }
}

impl<T: Element> Operation<T> for Concat {
    fn kind(&self) -> &'static str {
        OP
    }

    /// Sample n of the output depends on sample n of every input: all must carry a batch.
    fn batched(&self, inputs_batched: &[bool]) -> bool {
        inputs_batched.iter().all(|&batched| batched)
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let first = pass.inputs.get(0);
        let mut shape = check_image(OP, first.shape())?;
        shape[1] = 0;
        for k in 0..pass.inputs.len() {
            shape[1] += channels_of(&shape, pass.inputs.get(k).shape())?;
        }
        let inputs = pass.inputs;
        let y = pass.output(&shape)?;
        let mut y = dims_mut::<T, Ix4>(OP, y)?;
        let mut offset = 0;
        for x in (0..inputs.len()).map(|k| inputs.get(k)) {
            offset += place(&mut y, dims(OP, x)?, offset)?;
        }
        Ok(())
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        let dy = dims(OP, dy.view())?;
        let mut offset = 0;
        for k in 0..inputs.len() {
            let (x, dx) = super::accumulating::<T, Ix4>(OP, inputs.port(k)?)?;
            match dx {
                Some(mut dx) => offset += take(dy, &mut dx, offset)?,
                None => offset += x.shape()[1],
            }
        }
        Ok(())
    }
}

/// The channel count of an input, checked against the (N, ·, H, W) of the first.
fn channels_of(first: &[usize; 4], shape: &[usize]) -> Result<usize> {
    let [batch, channels, height, width] = check_image(OP, shape)?;
    if [batch, height, width] != [first[0], first[2], first[3]] {
        return Err(Error::shape_mismatch(
            OP,
            "an input's batch, height and width",
            format!(
                "{} as the first input",
                shape_text(&[first[0], first[2], first[3]])
            ),
            shape_text(&[batch, height, width]),
        ));
    }
    Ok(channels)
}

// ---------------------------------------------------------------- forward and backward

/// Forward: y[:, oₖ..oₖ + Cₖ] = xₖ for every input.
pub fn forward<T: Element>(xs: &[ArrayView4<T>], mut y: ArrayViewMut4<T>) -> Result<()> {
    let mut offset = 0;
    for x in xs {
        offset += place(&mut y, x.view(), offset)?;
    }
    check_same(OP, "output channels", &[offset], &y.shape()[1..2])
}

/// Backward: dxₖ += dy[:, oₖ..oₖ + Cₖ] for every input (the split).
pub fn backward<T: Element>(dy: ArrayView4<T>, dxs: &mut [ArrayViewMut4<T>]) -> Result<()> {
    let mut offset = 0;
    for dx in dxs.iter_mut() {
        offset += take(dy, dx, offset)?;
    }
    check_same(OP, "output gradient channels", &[offset], &dy.shape()[1..2])
}

/// y[:, offset..offset + C] = x; returns C.
fn place<T: Element>(y: &mut ArrayViewMut4<T>, x: ArrayView4<T>, offset: usize) -> Result<usize> {
    let channels = x.shape()[1];
    check_slice(y.shape(), x.shape(), offset)?;
    y.slice_mut(s![.., offset..offset + channels, .., ..])
        .assign(&x);
    Ok(channels)
}

/// dx += dy[:, offset..offset + C]; returns C.
fn take<T: Element>(dy: ArrayView4<T>, dx: &mut ArrayViewMut4<T>, offset: usize) -> Result<usize> {
    let channels = dx.shape()[1];
    check_slice(dy.shape(), dx.shape(), offset)?;
    *dx += &dy.slice(s![.., offset..offset + channels, .., ..]);
    Ok(channels)
}

/// Checks that a (N, C, H, W) part fits at channel `offset` of a (N, C_total, H, W) whole.
fn check_slice(whole: &[usize], part: &[usize], offset: usize) -> Result<()> {
    let fits = whole.len() == 4
        && part.len() == 4
        && (whole[0], whole[2], whole[3]) == (part[0], part[2], part[3])
        && offset + part[1] <= whole[1];
    if fits {
        Ok(())
    } else {
        Err(Error::shape_mismatch(
            OP,
            format!("a part at channel {offset}"),
            format!("a part of {}", shape_text(whole)),
            shape_text(part),
        ))
    }
}

// ---------------------------------------------------------------- reference loops

/// The specification: output channel by output channel, from the input that owns it.
pub fn forward_reference<T: Element>(xs: &[ArrayView4<T>], mut y: ArrayViewMut4<T>) -> Result<()> {
    let total: usize = xs.iter().map(|x| x.shape()[1]).sum();
    check_same(OP, "output channels", &[total], &y.shape()[1..2])?;
    let (mut k, mut start) = (0, 0);
    for o in 0..total {
        while o >= start + xs[k].shape()[1] {
            start += xs[k].shape()[1];
            k += 1;
        }
        check_slice(y.shape(), xs[k].shape(), start)?;
        y.index_axis_mut(Axis(1), o)
            .assign(&xs[k].index_axis(Axis(1), o - start));
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    dy: ArrayView4<T>,
    dxs: &mut [ArrayViewMut4<T>],
) -> Result<()> {
    let mut start = 0;
    for dx in dxs.iter_mut() {
        check_slice(dy.shape(), dx.shape(), start)?;
        for c in 0..dx.shape()[1] {
            let mut plane = dx.index_axis_mut(Axis(1), c);
            plane += &dy.index_axis(Axis(1), start + c);
        }
        start += dx.shape()[1];
    }
    Ok(())
}
