//! # Linear: a fully-connected layer, which *is* a 1×1 convolution
//!
//! ## What
//! `y[n] = W·x[n] + b`. A fully-connected layer on C features is a 1×1 convolution on a 1×1
//! feature map with C channels (the observation behind fully-convolutional networks):
//! `tests/ops.rs` shows the equivalence on numbers. Computed as conv1x1 computes it, one GEMM
//! per sample, each would be a matrix-vector product (P = 1 pixel), which no machine runs
//! near its peak; so the batch becomes the GEMM's other dimension, and each of the three
//! products is one GEMM over the whole batch. On a few samples (at most 8: inference) the
//! forward pass is a few matrix-vector products after all, bound by reading W, and runs as dot
//! products of X's rows with W's (`gemm::dot_rows`), which read W once, where a GEMM would
//! first copy all of it.
//!
//! ## Shapes
//! x (N, F), weight (F1, F), bias (F1), y (N, F1). As a convolution: P = 1 pixel per sample.
//!
//! ## Derivation
//! The conv1x1 derivation with P = 1, the samples' columns side by side:
//! ```text
//! y[n,o] = Σ_c W[o,c]·x[n,c] + b[o]       Y = X·Wᵀ + 1·bᵀ    (N×F)·(F×F1) → (N×F1)
//! dW = Σₙ dy[n]·x[n]ᵀ = dYᵀ·X                                 (F1×N)·(N×F) → (F1×F)
//! dX = dY·W                                                   (N×F1)·(F1×F) → (N×F)
//! db = Σₙ dy[n], the column sums of dY
//! ```
//!
//! ## Cost
//! Forward 2·N·F1·F FLOPs; backward 4·N·F1·F + N·F1.

use super::{
    check_ndim, conv1x1, dims, layer_forward, layer_gradients, LayerForward, LayerGradients,
};
use crate::cost::{self, Cost};
use crate::element::Element;
use crate::error::Result;
use crate::gemm::{dot_rows, gemm};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::{GradWrite, Operation};
use crate::parallel::{in_parts, Along};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

const OP: &str = "linear";

/// The node on the tape: nothing saved beyond its input and weight.
#[derive(Clone, Debug)]
pub struct Linear;

impl<T: Element> Graph<T> {
    /// A fully-connected layer on `input` (N, F) by `weight` (F1, F), plus an optional `bias`
    /// (F1): a 1×1 convolution on 1×1 maps.
    pub fn linear(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        self.push_layer(Linear, [input, weight], bias, conv1x1::check_weights)
    }
}

impl<T: Element> Operation<T> for Linear {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let LayerForward { x, weight, bias, y } = layer_forward(OP, &mut pass, output_shape)?;
        forward(x, weight, bias, y)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        let LayerGradients {
            x,
            dx,
            weight,
            dweight,
            dbias,
        } = layer_gradients(OP, inputs.ports::<3>()?)?;
        gradients(x, weight, dims(OP, dy.view())?, dx, dweight, dbias)
    }

    fn cost(&self, inputs: &[&[usize]], _output: &[usize], input_grad: bool) -> Cost {
        cost::linear(inputs[0], inputs[1][0], inputs.len() > 2, input_grad)
    }
}

/// Checks x (N, F), weight (F1, F) and bias (F1) and returns the output shape (N, F1).
pub fn output_shape(x: &[usize], weight: &[usize], bias: Option<&[usize]>) -> Result<[usize; 2]> {
    check_ndim(OP, "input (N, F)", x, 2)?;
    let [batch, c_out, _, _] = conv1x1::output_shape(&[x[0], x[1], 1, 1], weight, bias)?;
    Ok([batch, c_out])
}

/// Forward: Y = X·Wᵀ + 1·bᵀ, one GEMM over the batch (on at most 8 samples, dot products of
/// rows).
pub fn forward<T: Element>(
    x: ArrayView2<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    mut y: ArrayViewMut2<T>,
) -> Result<()> {
    let shape = output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    super::check_same(OP, "output", &shape, y.shape())?;
    // A few samples (inference): dot products of X's rows with W's, W read once in order.
    if dot_rows(x, weight, bias.as_ref().map(|b| b.view()), y.view_mut())? {
        return Ok(());
    }
    // The samples (rows of X and Y) split between the threads.
    in_parts((Along(x, Axis(0)), Along(y.view_mut(), Axis(0))), &|(
        Along(x, _),
        Along(mut y, _),
    )| {
        gemm(T::one(), x, weight.t(), T::zero(), y.view_mut())?; // (N×F)·(F×F1)
        if let Some(bias) = &bias {
            for mut row in y.outer_iter_mut() {
                row += bias;
            }
        }
        Ok(())
    })
}

/// Backward: dW += dYᵀ·X, dX (+)= dY·W, db += column sums of dY; dX is overwritten (β = 0)
/// when the tape says it holds no contribution yet.
pub(crate) fn gradients<T: Element>(
    x: ArrayView2<T>,
    weight: ArrayView2<T>,
    dy: ArrayView2<T>,
    dx: Option<(ArrayViewMut2<T>, GradWrite)>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let [batch, c_out] = output_shape(x.shape(), weight.shape(), None)?;
    super::check_same(OP, "output gradient", &[batch, c_out], dy.shape())?;
    if let Some(dweight) = dweight {
        super::check_same(OP, "weight gradient", weight.shape(), dweight.shape())?;
        // dW's columns (the features) split between the threads: each sums over the batch.
        in_parts(
            (Along(x, Axis(1)), Along(dweight, Axis(1))),
            &|(Along(x, _), Along(dweight, _))| gemm(T::one(), dy.t(), x, T::one(), dweight), // (F1×N)·(N×F)
        )?;
    }
    if let Some((dx, write)) = dx {
        super::check_same(OP, "input gradient", x.shape(), dx.shape())?;
        let beta = write.beta::<T>();
        // The samples split between the threads.
        in_parts(
            (Along(dy, Axis(0)), Along(dx, Axis(0))),
            &|(Along(dy, _), Along(dx, _))| gemm(T::one(), dy, weight, beta, dx), // (N×F1)·(F1×F)
        )?;
    }
    if let Some(mut dbias) = dbias {
        super::check_same(OP, "bias gradient", &[c_out], dbias.shape())?;
        for row in dy.outer_iter() {
            dbias += &row;
        }
    }
    Ok(())
}

/// Backward, accumulating into every given gradient.
pub fn backward<T: Element>(
    x: ArrayView2<T>,
    weight: ArrayView2<T>,
    dy: ArrayView2<T>,
    dx: Option<ArrayViewMut2<T>>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let dx = dx.map(|dx| (dx, GradWrite::Accumulate));
    gradients(x, weight, dy, dx, dweight, dbias)
}

/// The specification: the textbook fully-connected layer, `y[n,o] = Σ_c W[o,c]·x[n,c] + b[o]`.
pub fn forward_reference<T: Element>(
    x: ArrayView2<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    mut y: ArrayViewMut2<T>,
) -> Result<()> {
    let [batch, c_out] = output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    super::check_same(OP, "output", &[batch, c_out], y.shape())?;
    for n in 0..batch {
        for o in 0..c_out {
            let mut sum = bias.as_ref().map_or(T::zero(), |b| b[o]);
            for c in 0..x.shape()[1] {
                sum += weight[[o, c]] * x[[n, c]];
            }
            y[[n, o]] = sum;
        }
    }
    Ok(())
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    x: ArrayView2<T>,
    weight: ArrayView2<T>,
    dy: ArrayView2<T>,
    mut dx: Option<ArrayViewMut2<T>>,
    mut dweight: Option<ArrayViewMut2<T>>,
    mut dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let [batch, c_out] = output_shape(x.shape(), weight.shape(), None)?;
    super::check_same(OP, "output gradient", &[batch, c_out], dy.shape())?;
    if let Some(dx) = &dx {
        super::check_same(OP, "input gradient", x.shape(), dx.shape())?;
    }
    if let Some(dweight) = &dweight {
        super::check_same(OP, "weight gradient", weight.shape(), dweight.shape())?;
    }
    if let Some(dbias) = &dbias {
        super::check_same(OP, "bias gradient", &[c_out], dbias.shape())?;
    }
    for n in 0..batch {
        for o in 0..c_out {
            let g = dy[[n, o]];
            if let Some(dbias) = dbias.as_mut() {
                dbias[o] += g;
            }
            for c in 0..x.shape()[1] {
                if let Some(dweight) = dweight.as_mut() {
                    dweight[[o, c]] += g * x[[n, c]];
                }
                if let Some(dx) = dx.as_mut() {
                    dx[[n, c]] += g * weight[[o, c]];
                }
            }
        }
    }
    Ok(())
}
