//! # GroupedConv1x1: g independent 1×1 convolutions on slices of the channels
//!
//! ## What
//! The channels are cut into g groups; group k of the output mixes only group k of the input.
//! ShuffleNet and ResNeXt use it to cut a 1×1 layer's cost by g (then shuffle the channels so
//! that the next grouped layer sees every group).
//!
//! ## Shapes
//! x (N, F, H, W), weight (F1, F/g), bias (F1) → y (N, F1, H, W); F and F1 multiples of g. With
//! Fg = F/g and F1g = F1/g, group k reads input channels k·Fg..(k+1)·Fg and writes output
//! channels k·F1g..(k+1)·F1g, with the weight rows k·F1g..(k+1)·F1g. As a full (F1, F) matrix
//! the weight would be block-diagonal; only the g diagonal blocks are stored.
//!
//! ## Derivation
//! Per sample n and group k, with Xₙₖ the (Fg, P) channel slice and Wₖ the (F1g, Fg) block, it
//! is [`super::conv1x1`] on slices, so its derivation applies block by block:
//! ```text
//! Yₙₖ = Wₖ·Xₙₖ + bₖ·1ᵀ            (F1g×Fg)·(Fg×P) → (F1g×P)
//! dWₖ += Σₙ dYₙₖ·Xₙₖᵀ              (F1g×P)·(P×Fg) → (F1g×Fg)
//! dXₙₖ = Wₖᵀ·dYₙₖ                  (Fg×F1g)·(F1g×P) → (Fg×P)
//! dbₖ  += Σₙ Σₚ dYₙₖ[:, p]
//! ```
//! A slice of channels of a row-major sample is one contiguous (Fg, P) matrix, so each group's
//! GEMMs run on views, without copies.
//!
//! ## Cost
//! Forward 2·N·F1·(F/g)·P FLOPs: 1/g of the dense 1×1 convolution's; backward twice that.

use super::{
    check_image, check_ndim, check_same, conv1x1, dims, layer_forward, layer_gradients, shape_text,
    LayerForward,
};
use crate::cost::{self, Cost};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::{GradWrite, Operation};
use ndarray::{s, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4};

const OP: &str = "grouped_conv1x1";

/// The node on the tape: its group count; nothing saved beyond x and the weight.
#[derive(Clone, Debug)]
pub struct GroupedConv1x1 {
    groups: usize,
}

impl<T: Element> Graph<T> {
    /// A 1×1 convolution in `groups` groups: `input` (N, F, H, W), `weight` (F1, F/g), optional
    /// `bias` (F1).
    pub fn grouped_conv1x1(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        groups: usize,
    ) -> Result<NodeId> {
        let check = |w: &[usize], b: Option<&[usize]>| check_weights(w, b, groups);
        self.push_layer(GroupedConv1x1 { groups }, [input, weight], bias, check)
    }
}

impl<T: Element> Operation<T> for GroupedConv1x1 {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let groups = self.groups;
        let shape = |x: &[usize], w: &[usize], _: Option<&[usize]>| output_shape(x, w, groups);
        let LayerForward { x, weight, bias, y } = layer_forward(OP, &mut pass, shape)?;
        forward(x, weight, bias, groups, y)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        let layer = layer_gradients(OP, inputs.ports::<3>()?)?;
        let dy = dims(OP, dy.view())?;
        let (x, weight) = (layer.x, layer.weight);
        gradients(
            x,
            weight,
            dy,
            layer.dx,
            layer.dweight,
            layer.dbias,
            self.groups,
        )
    }

    fn attributes(&self) -> Vec<(&'static str, usize)> {
        vec![("groups", self.groups)]
    }

    fn cost(&self, inputs: &[&[usize]], _output: &[usize], input_grad: bool) -> Cost {
        let [batch, c_in, height, width] = [inputs[0][0], inputs[0][1], inputs[0][2], inputs[0][3]];
        let group = [batch, c_in / self.groups, height, width];
        let mut cost = cost::conv1x1(
            &group,
            inputs[1][0] / self.groups,
            inputs.len() > 2,
            input_grad,
        );
        cost.params *= self.groups;
        cost.forward_macs *= self.groups as u64;
        cost.backward_macs *= self.groups as u64;
        cost.gemms = cost
            .gemms
            .iter()
            .map(|g| format!("{}× {g}", self.groups))
            .collect();
        cost
    }
}

/// Checks weight (F1, F/g) and bias (F1) with F1 a multiple of g.
fn check_weights(weight: &[usize], bias: Option<&[usize]>, groups: usize) -> Result<()> {
    check_ndim(OP, "weight (F1, F/g)", weight, 2)?;
    if groups == 0 || weight.contains(&0) || !weight[0].is_multiple_of(groups) {
        return Err(Error::invalid_shape(
            OP,
            format!("weight must be (F1, F/g) with F1 a non-zero multiple of the {groups} groups"),
            weight,
        ));
    }
    match bias {
        Some(bias) => check_same(OP, "bias", &weight[..1], bias),
        None => Ok(()),
    }
}

/// Checks x (N, F, H, W) against weight (F1, F/g); returns (N, F1, H, W).
pub fn output_shape(x: &[usize], weight: &[usize], groups: usize) -> Result<[usize; 4]> {
    let [batch, c_in, height, width] = check_image(OP, x)?;
    check_weights(weight, None, groups)?;
    if c_in != weight[1] * groups {
        return Err(Error::shape_mismatch(
            OP,
            "input channels",
            format!("{} ({groups} groups of {})", weight[1] * groups, weight[1]),
            format!("{c_in} (input shape {})", shape_text(x)),
        ));
    }
    Ok([batch, weight[0], height, width])
}

// ---------------------------------------------------------------- forward and backward

/// Forward: Yₙₖ = Wₖ·Xₙₖ + bₖ for every group k, each a [`conv1x1::forward`] on slices.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    groups: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let expected = output_shape(x.shape(), weight.shape(), groups)?;
    check_same(OP, "output", &expected, y.shape())?;
    let [fg, f1g] = group_sizes(&x, &weight, groups);
    for k in 0..groups {
        let (inputs, outputs) = (k * fg..(k + 1) * fg, k * f1g..(k + 1) * f1g);
        conv1x1::forward(
            x.slice(s![.., inputs, .., ..]),
            weight.slice(s![outputs.clone(), ..]),
            bias.as_ref().map(|b| b.slice(s![outputs.clone()])),
            y.slice_mut(s![.., outputs, .., ..]),
        )?;
    }
    Ok(())
}

/// Backward: accumulates dW, dX and db group by group (see [`conv1x1::backward`]).
pub fn backward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
    groups: usize,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), groups)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    let buffers = super::grad_shapes(&dx, &dweight, &dbias);
    super::check_layer_gradients(OP, [x.shape(), weight.shape(), &out, dy.shape()], buffers)?;
    let dx = dx.map(|dx| (dx, GradWrite::Accumulate));
    gradients(x, weight, dy, dx, dweight, dbias, groups)
}

/// The three gradients of every group, dX written as its [`GradWrite`] says.
fn gradients<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    mut dx: Option<(ArrayViewMut4<T>, GradWrite)>,
    mut dweight: Option<ArrayViewMut2<T>>,
    mut dbias: Option<ArrayViewMut1<T>>,
    groups: usize,
) -> Result<()> {
    let [fg, f1g] = group_sizes(&x, &weight, groups);
    for k in 0..groups {
        let (inputs, outputs) = (k * fg..(k + 1) * fg, k * f1g..(k + 1) * f1g);
        let dx_k = dx
            .as_mut()
            .map(|(dx, write)| (dx.slice_mut(s![.., inputs.clone(), .., ..]), *write));
        conv1x1::gradients(
            x.slice(s![.., inputs, .., ..]),
            weight.slice(s![outputs.clone(), ..]),
            dy.slice(s![.., outputs.clone(), .., ..]),
            dx_k,
            dweight
                .as_mut()
                .map(|dw| dw.slice_mut(s![outputs.clone(), ..])),
            dbias.as_mut().map(|db| db.slice_mut(s![outputs])),
        )?;
    }
    Ok(())
}

/// [F/g, F1/g].
fn group_sizes<T>(x: &ArrayView4<T>, weight: &ArrayView2<T>, groups: usize) -> [usize; 2] {
    [x.shape()[1] / groups.max(1), weight.nrows() / groups.max(1)]
}

// ---------------------------------------------------------------- reference loops

/// The specification: the block-diagonal index form,
/// `y[n,o,h,w] = Σ_c W[o,c]·x[n, k·Fg + c, h, w] + b[o]` with k = ⌊o/F1g⌋ (written once, in
/// [`conv1x1`], whose index form is this one with one group).
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    groups: usize,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), groups)?;
    check_same(OP, "output", &out, y.shape())?;
    conv1x1::index_form_forward(x, weight, bias, groups, y);
    Ok(())
}

/// The specification of the backward pass, differentiating the index form term by term.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    groups: usize,
    dx: ArrayViewMut4<T>,
    dweight: ArrayViewMut2<T>,
    dbias: ArrayViewMut1<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), groups)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    let gradients = (Some(dx), Some(dweight), Some(dbias));
    conv1x1::index_form_backward(x, weight, dy, groups, gradients);
    Ok(())
}
