//! # Conv1x1: a 1×1 convolution, one GEMM per sample
//!
//! ## What
//! Every pixel's channel vector goes through the same matrix: `y[n, :, h, w] = W·x[n, :, h, w] + b`.
//! It changes the number of channels (F → F1) and leaves H and W alone.
//!
//! ## Shapes
//! x (N, F, H, W), weight W (F1, F), bias b (F1), y (N, F1, H, W); P = H·W pixels per sample.
//! In a row-major tensor the (F, H, W) block of sample n *is* an (F, P) matrix Xₙ, so the
//! convolution needs no im2col and no copy: Yₙ = W·Xₙ is one GEMM on views.
//!
//! ## Derivation
//! Index form, per sample n, output channel o, input channel c, pixel p:
//!
//! ```text
//! Yₙ[o,p] = Σ_c W[o,c]·Xₙ[c,p] + b[o]
//! ```
//!
//! Differentiate L with respect to each of its three inputs (dY = ∂L/∂Y is given):
//!
//! ```text
//! ∂L/∂W[o,c]  = Σₙ Σₚ dYₙ[o,p]·Xₙ[c,p]     dW  = Σₙ dYₙ·Xₙᵀ    (F1×P)·(P×F)  → (F1×F)
//! ∂L/∂Xₙ[c,p] = Σ_o W[o,c]·dYₙ[o,p]        dXₙ = Wᵀ·dYₙ        (F×F1)·(F1×P) → (F×P)
//! ∂L/∂b[o]    = Σₙ Σₚ dYₙ[o,p]             db  = Σₙ dYₙ·1       (F1×P)·(P)    → (F1)
//! ```
//!
//! Each sum over n appears because W and b are shared by every sample; the sum over p because
//! they are shared by every pixel. dX has no sum over n: each sample's input is its own.
//!
//! ## Fused ReLU
//! [`forward_relu`] / [`backward_relu`] compute Y = max(W·Xₙ + b, 0) as one node. The ReLU is
//! applied as the GEMM stores each tile, so the pre-activation Z never exists in memory; its
//! derivative needs only Y, because Z > 0 exactly where Y > 0:
//!
//! ```text
//! dZ = dY ⊙ 1[Y > 0]          then dW, dX, db from dZ as above
//! ```
//! which saves one tensor of the output's size in the forward pass, one gradient of that size
//! in the backward pass, and a read and a write of each.
//!
//! ## Cost
//! Forward 2·N·F1·F·P FLOPs. Backward 2·N·F1·F·P for dW, the same for dX (skipped when the input
//! needs no gradient), N·F1·P for db. Memory traffic per sample: read F·P + F1·F, write F1·P.

use super::{check_image, check_ndim, check_same, shape_text, GradWrite};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gemm::{gemm, gemm_bias_relu};
use crate::parallel::{in_parts, Along};
use ndarray::{
    ArrayView1, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4,
    Axis, Zip,
};

const OP: &str = "conv1x1";

/// Checks x (N, F, H, W), weight (F1, F) and bias (F1) and returns the output shape (N, F1, H, W).
pub fn output_shape(x: &[usize], weight: &[usize], bias: Option<&[usize]>) -> Result<[usize; 4]> {
    let [batch, c_in, height, width] = check_image(OP, x)?;
    let [c_out, weight_c_in] = check_weights(weight, bias)?;
    if c_in != weight_c_in {
        return Err(Error::shape_mismatch(
            OP,
            "input channels",
            format!("{weight_c_in} (weight is {c_out}×{weight_c_in})"),
            format!("{c_in} (input shape {})", shape_text(x)),
        ));
    }
    Ok([batch, c_out, height, width])
}

/// Checks weight (F1, F) with F1, F > 0 and bias (F1); returns [F1, F].
pub fn check_weights(weight: &[usize], bias: Option<&[usize]>) -> Result<[usize; 2]> {
    check_ndim(OP, "weight (F1, F)", weight, 2)?;
    let (c_out, c_in) = (weight[0], weight[1]);
    if c_out == 0 || c_in == 0 {
        return Err(Error::invalid_shape(
            OP,
            "weight must have non-zero F1 and F",
            weight,
        ));
    }
    if let Some(bias) = bias {
        check_same(OP, "bias", &[c_out], bias)?;
    }
    Ok([c_out, c_in])
}

/// Checks every buffer of a backward call against x and weight; returns the output shape.
fn check_gradients<T: Element>(
    x: &ArrayView4<T>,
    weight: &ArrayView2<T>,
    dy: &ArrayView4<T>,
    dx: &Option<ArrayViewMut4<T>>,
    dweight: &Option<ArrayViewMut2<T>>,
    dbias: &Option<ArrayViewMut1<T>>,
) -> Result<[usize; 4]> {
    let out = output_shape(x.shape(), weight.shape(), None)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    if let Some(dx) = dx {
        check_same(OP, "input gradient", x.shape(), dx.shape())?;
    }
    if let Some(dweight) = dweight {
        check_same(OP, "weight gradient", weight.shape(), dweight.shape())?;
    }
    if let Some(dbias) = dbias {
        check_same(OP, "bias gradient", &out[1..2], dbias.shape())?;
    }
    Ok(out)
}

/// The error for a sample block that is not one contiguous (C, P) matrix.
fn not_row_major(shape: [usize; 3]) -> Error {
    Error::invalid_shape(OP, "tensors must be in standard (row-major) layout", &shape)
}

/// Sample n's (C, H, W) block seen as a (C, P) matrix, without copying.
fn sample_matrix<T: Element>(block: ArrayView3<'_, T>) -> Result<ArrayView2<'_, T>> {
    let (channels, height, width) = block.dim();
    block
        .into_shape_with_order((channels, height * width))
        .map_err(|_| not_row_major([channels, height, width]))
}

/// The same for a mutable block.
fn sample_matrix_mut<T: Element>(
    block: ndarray::ArrayViewMut3<'_, T>,
) -> Result<ArrayViewMut2<'_, T>> {
    let (channels, height, width) = block.dim();
    block
        .into_shape_with_order((channels, height * width))
        .map_err(|_| not_row_major([channels, height, width]))
}

/// Forward: Yₙ = W·Xₙ + b·1ᵀ for every sample, written into `y`.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    forward_with(x, weight, bias, false, y)
}

/// Forward of the fused conv1x1 + ReLU: Yₙ = max(W·Xₙ + b·1ᵀ, 0), the ReLU applied as each tile
/// of Yₙ is stored, so the pre-activation never exists in memory.
pub fn forward_relu<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    forward_with(x, weight, bias, true, y)
}

fn forward_with<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    relu: bool,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    check_same(OP, "output", &out, y.shape())?;
    // The samples are independent: split the batch between the threads.
    in_parts((Along(x, Axis(0)), Along(y, Axis(0))), &|(
        Along(x, _),
        Along(mut y, _),
    )| {
        for (x_block, y_block) in x.outer_iter().zip(y.outer_iter_mut()) {
            let (x_n, y_n) = (sample_matrix(x_block)?, sample_matrix_mut(y_block)?);
            // (F1×F)·(F×P) → (F1×P), the bias added as each tile of Yₙ is stored.
            gemm_bias_relu(
                weight.view(),
                x_n,
                bias.as_ref().map(|b| b.view()),
                relu,
                y_n,
            )?;
        }
        Ok(())
    })
}

/// Backward of the fused conv1x1 + ReLU. With Z the pre-activation and Y = max(Z, 0), the
/// ReLU's backward is `dZ = dY ⊙ 1[Z > 0]`, and Z > 0 exactly where Y > 0, so the mask is read
/// from the saved output. `dy` is masked in place (it becomes dZ), then the three GEMMs run on
/// it as in [`backward_with`].
#[allow(clippy::too_many_arguments)]
pub fn backward_relu<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    y: ArrayView4<T>,
    dy: ArrayViewMut4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
    dx_write: GradWrite,
) -> Result<()> {
    check_same(OP, "output", dy.shape(), y.shape())?;
    let mut dy = dy;
    in_parts((Along(y, Axis(0)), Along(dy.view_mut(), Axis(0))), &|(
        Along(y, _),
        Along(mut dy, _),
    )| {
        // A select, not a branch, as in relu::backward.
        Zip::from(&mut dy)
            .and(&y)
            .for_each(|dy, &y| *dy = if y > T::zero() { *dy } else { T::zero() });
        Ok(())
    })?;
    backward_with(x, weight, dy.view(), dx, dweight, dbias, dx_write)
}

/// Backward: accumulates (`+=`) dW = Σₙ dYₙ·Xₙᵀ, dXₙ = Wᵀ·dYₙ and db = Σ dY into whichever
/// gradient buffers are given. A `None` buffer is not computed (e.g. an input that needs no
/// gradient, which saves a third of the work).
pub fn backward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    backward_with(x, weight, dy, dx, dweight, dbias, GradWrite::Accumulate)
}

/// [`backward`], with dX written as `dx_write` says: with [`GradWrite::Overwrite`] the dX GEMM
/// runs with β = 0, so dX need not be zeroed first. dW and db always accumulate (parameters
/// collect gradients across steps until zeroed).
pub fn backward_with<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
    dx_write: GradWrite,
) -> Result<()> {
    check_gradients(&x, &weight, &dy, &dx, &dweight, &dbias)?;
    if let Some(dweight) = dweight {
        // dW sums over the samples, so the threads split dW itself: its columns (each thread
        // computes dW[:, part] += Σₙ dYₙ·Xₙ[part]ᵀ) when F ≥ F1, else its rows
        // (dW[part, :] += Σₙ dYₙ[part]·Xₙᵀ), keeping each thread's GEMM wide.
        let accumulate = |dy: ArrayView4<T>, x: ArrayView4<T>, mut dweight: ArrayViewMut2<T>| {
            for (x_block, dy_block) in x.outer_iter().zip(dy.outer_iter()) {
                // (F1×P)·(P×F) += into (F1×F); Xₙᵀ is a transposed view, not a copy.
                let (x_n, dy_n) = (sample_matrix(x_block)?, sample_matrix(dy_block)?);
                gemm(T::one(), dy_n, x_n.t(), T::one(), dweight.view_mut())?;
            }
            Ok(())
        };
        if weight.ncols() >= weight.nrows() {
            let parts = (Along(x, Axis(1)), Along(dweight, Axis(1)));
            in_parts(parts, &|(Along(x, _), Along(dweight, _))| {
                accumulate(dy, x, dweight)
            })?;
        } else {
            let parts = (Along(dy, Axis(1)), Along(dweight, Axis(0)));
            in_parts(parts, &|(Along(dy, _), Along(dweight, _))| {
                accumulate(dy, x, dweight)
            })?;
        }
    }
    if let Some(dx) = dx {
        in_parts((Along(dy, Axis(0)), Along(dx, Axis(0))), &|(
            Along(dy, _),
            Along(mut dx, _),
        )| {
            for (dy_block, dx_block) in dy.outer_iter().zip(dx.outer_iter_mut()) {
                let (dy_n, mut dx_n) = (sample_matrix(dy_block)?, sample_matrix_mut(dx_block)?);
                // (F×F1)·(F1×P) += into (F×P), or = with β = 0
                let beta = if dx_write == GradWrite::Accumulate {
                    T::one()
                } else {
                    T::zero()
                };
                gemm(T::one(), weight.t(), dy_n, beta, dx_n.view_mut())?;
            }
            Ok(())
        })?;
    }
    if let Some(dbias) = dbias {
        // Each thread sums its own channels over every sample and pixel.
        in_parts((Along(dy, Axis(1)), Along(dbias, Axis(0))), &|(
            Along(dy, _),
            Along(mut dbias, _),
        )| {
            for dy_block in dy.outer_iter() {
                for (db, row) in dbias.iter_mut().zip(dy_block.outer_iter()) {
                    *db += row.sum();
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// The specification: `Yₙ[o,p] = Σ_c W[o,c]·Xₙ[c,p] + b[o]`, as plain loops.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let [batch, c_out, height, width] =
        output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    check_same(OP, "output", &[batch, c_out, height, width], y.shape())?;
    let c_in = x.shape()[1];
    for n in 0..batch {
        for o in 0..c_out {
            for h in 0..height {
                for w in 0..width {
                    let mut sum = bias.as_ref().map_or(T::zero(), |b| b[o]);
                    for c in 0..c_in {
                        sum += weight[[o, c]] * x[[n, c, h, w]];
                    }
                    y[[n, o, h, w]] = sum;
                }
            }
        }
    }
    Ok(())
}

/// The specification of the backward pass, differentiating the index form term by term.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    mut dx: Option<ArrayViewMut4<T>>,
    mut dweight: Option<ArrayViewMut2<T>>,
    mut dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let [batch, c_out, height, width] = check_gradients(&x, &weight, &dy, &dx, &dweight, &dbias)?;
    let c_in = x.shape()[1];
    for n in 0..batch {
        for o in 0..c_out {
            for h in 0..height {
                for w in 0..width {
                    let g = dy[[n, o, h, w]];
                    if let Some(dbias) = dbias.as_mut() {
                        dbias[o] += g;
                    }
                    for c in 0..c_in {
                        if let Some(dweight) = dweight.as_mut() {
                            dweight[[o, c]] += g * x[[n, c, h, w]];
                        }
                        if let Some(dx) = dx.as_mut() {
                            dx[[n, c, h, w]] += g * weight[[o, c]];
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
