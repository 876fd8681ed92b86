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
//! ∂L/∂b[o]    = Σₙ Σₚ dYₙ[o,p]             db  = Σₙ Σₚ dYₙ[:, p]  a row sum     → (F1)
//! ```
//!
//! Each sum over n appears because W and b are shared by every sample; the sum over p because
//! they are shared by every pixel. dX has no sum over n: each sample's input is its own.
//!
//! ## Fused ReLU
//! The tape's `conv1x1_relu` node ([`Graph::conv1x1_relu`], the speed variants at the end of
//! this file) computes Y = max(W·Xₙ + b, 0) as one node. The ReLU is
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
//!
//! ## Speed
//! The products above are what runs, but not always one per sample: which layout of the
//! batch each product takes (per sample, a group of small maps side by side, one packed
//! product over the batch, sample by sample with dW and dX together on large maps) is chosen
//! from the map size and depth in one place, the constants and `packed_over_samples` at the
//! end of this file, each with the measurement that set it.

use super::{
    check_image, check_layer_gradients, check_ndim, check_same, dims, dims_mut, grad_shapes,
    layer_forward, layer_gradients, shape_text, sum_pairs, zip_values, LayerForward,
};
use crate::cost::{self, Cost};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gemm::{
    gemm, gemm_and_row_sums_of_b, gemm_bias_relu, gemm_samples, longer_side_as_rows,
};
use crate::graph::{Backward, Forward, Graph, NodeId, Port};
use crate::ops::{GradWrite, Operation};
use crate::parallel::{
    each_sample, in_parts, sample_matrix, sample_matrix_mut, samples_matrices, samples_per_group,
    side_by_side, Along, Groups,
};
use ndarray::{
    ArrayView1, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut1, ArrayViewMut2, ArrayViewMut3,
    ArrayViewMut4, Axis,
};

const OP: &str = "conv1x1";

/// The node on the tape: no saved state beyond its input x and weight, which backward reads
/// from the tape. With `relu`, the fused max(conv1x1(x), 0), whose backward also reads y.
#[derive(Clone, Debug)]
pub struct Conv1x1 {
    relu: bool,
}

impl<T: Element> Graph<T> {
    /// A 1×1 convolution of `input` (N, F, H, W) by `weight` (F1, F), plus an optional `bias` (F1).
    pub fn conv1x1(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        self.push_layer(
            Conv1x1 { relu: false },
            [input, weight],
            bias,
            check_weights,
        )
    }

    /// The fused max(conv1x1(input), 0): the same values as `relu(conv1x1(...))` with one
    /// buffer and one pass instead of two.
    pub fn conv1x1_relu(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        self.push_layer(Conv1x1 { relu: true }, [input, weight], bias, check_weights)
    }
}

impl<T: Element> Operation<T> for Conv1x1 {
    fn kind(&self) -> &'static str {
        if self.relu {
            "conv1x1+relu"
        } else {
            OP
        }
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let LayerForward { x, weight, bias, y } = layer_forward(OP, &mut pass, output_shape)?;
        forward_epilogue(x, weight, bias, self.relu, y)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward {
            y,
            mut dy,
            mut inputs,
        } = pass;
        if self.relu {
            relu_mask(dims(OP, y)?, dims_mut(OP, dy.view_mut())?)?;
        }
        backward_ports(inputs.ports::<3>()?, dy.view())
    }

    fn cost(&self, inputs: &[&[usize]], _output: &[usize], input_grad: bool) -> Cost {
        cost::conv1x1(inputs[0], inputs[1][0], inputs.len() > 2, input_grad)
    }
}

// ---------------------------------------------------------------- forward and backward

/// Forward: Yₙ = W·Xₙ + b·1ᵀ for every sample, written into `y`.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    forward_epilogue(x, weight, bias, false, y)
}

/// The forward pass with the tape's epilogue: Yₙ = W·Xₙ + b·1ᵀ, and with `relu` max(·, 0),
/// both applied as the GEMM stores each tile of Yₙ, so the pre-activation never exists in
/// memory. The samples split between the threads.
fn forward_epilogue<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    relu: bool,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    check_same(OP, "output", &out, y.shape())?;
    if out[2] * out[3] < GROUP_BELOW_PIXELS {
        let bias = bias.as_ref();
        return in_groups(
            x,
            y,
            // (F1×F)·(F×G·P) → (F1×G·P) for a group of samples side by side
            &|x_g, y_g| gemm_bias_relu(weight, x_g, bias.map(|b| b.view()), relu, y_g),
            &|y, mut y_n| y_n.assign(&y),
        );
    }
    if packed_over_samples(out[2] * out[3], weight.ncols()) {
        // (F1×F)·[X₁ … X_N] (F × N·P) → [Y₁ … Y_N], one packed product
        return over_the_batch(weight, x, T::zero(), (bias, relu), y, None);
    }
    each_sample(x, y, &|x_n, y_n| {
        // (F1×F)·(F×P) → (F1×P)
        gemm_bias_relu(
            weight.view(),
            x_n,
            bias.as_ref().map(|b| b.view()),
            relu,
            y_n,
        )
    })
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
    check_gradients(&x, &weight, &dy, grad_shapes(&dx, &dweight, &dbias))?;
    let dx = dx.map(|dx| (dx, GradWrite::Accumulate));
    gradients(x, weight, dy, dx, dweight, dbias)
}

/// The three gradients (two GEMMs and a row sum), for whichever gradients are given; dX written as its [`GradWrite`] says.
pub(crate) fn gradients<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: Option<(ArrayViewMut4<T>, GradWrite)>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let pixels = dy.shape()[2] * dy.shape()[3];
    let (inputs, outputs) = (weight.ncols(), weight.nrows());
    if pixels >= SAMPLE_BY_SAMPLE_PIXELS && !passes_apart(pixels, inputs, outputs, dx.is_some()) {
        return sample_by_sample(x, weight, dy, dx, dweight, dbias);
    }
    if let Some(dweight) = dweight {
        weight_gradient(x, dy, dweight)?; // dW += Σₙ dYₙ·Xₙᵀ
    }
    // With dX wanted too, db's row sums of each dYₙ are taken by dX's product as it reads dYₙ
    // (see `sums_with_dx`), then added in sample order.
    match (dx, dbias) {
        (Some((dx, write)), Some(dbias)) if sums_with_dx(pixels, outputs) => {
            let shape = (dy.shape()[0], dy.shape()[1]);
            // The row sums live in the thread's scratch, not allocated on each call.
            T::with_scratch(shape.0 * shape.1, |sums| {
                let mut sums = ArrayViewMut2::from_shape(shape, sums)
                    .map_err(|_| Error::invalid_shape(OP, "scratch view", &[shape.0, shape.1]))?;
                input_gradient_and_row_sums(weight, dy, dx, write, Some(sums.view_mut()))?;
                add_row_sums(sums.view(), dbias);
                Ok(())
            })
        }
        (dx, dbias) => {
            if let Some((dx, write)) = dx {
                input_gradient(weight, dy, dx, write)?; // dXₙ += Wᵀ·dYₙ
            }
            match dbias {
                Some(dbias) => bias_gradient(dy, dbias), // db += Σₙ Σₚ dYₙ[:, p]
                None => Ok(()),
            }
        }
    }
}

/// Maps of [`SAMPLE_BY_SAMPLE_PIXELS`] pixels or more (but see [`passes_apart`]): the samples
/// split between the threads, and each sample's three products run one after the other — its
/// term of dW, dXₙ = Wᵀ·dYₙ, its row sums for db (taken by the dX product as it reads dYₙ,
/// where it can) — so that dYₙ is read from memory once and from cache after (on large maps dY
/// is the largest operand: 77 MB on MobileNetV2's 16 → 96 layer at 112×112, batch 16).
/// dW and db are sums over the samples. The terms of dW go into slots, each summing a fixed
/// run of samples in order (see [`samples_per_slot`]), and the slots are added in order after,
/// so that the sums do not depend on how the threads split the batch; db's row sums are kept
/// per sample and added in order.
fn sample_by_sample<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: Option<(ArrayViewMut4<T>, GradWrite)>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let (batch, outputs, pixels) = (dy.shape()[0], dy.shape()[1], dy.shape()[2] * dy.shape()[3]);
    if let Some((dx, _)) = &dx {
        let expected = [batch, weight.ncols(), dy.shape()[2], dy.shape()[3]];
        check_same(OP, "input gradient", &expected, dx.shape())?;
    }
    // A projection's terms are dWₙᵀ = Xₙ·dYₙᵀ (see `dw_transposed`).
    let transposed = dweight.as_ref().is_some_and(dw_transposed);
    let per_slot = samples_per_slot(batch, pixels, outputs);
    let slots_shape = dweight.as_ref().map(|dw| {
        let (rows, columns) = if transposed {
            (dw.ncols(), dw.nrows())
        } else {
            dw.dim()
        };
        (batch.div_ceil(per_slot), rows, columns)
    });
    let sums_shape = dbias.as_ref().map(|_| (batch, outputs));
    let slots_len = slots_shape.map_or(0, |(count, rows, columns)| count * rows * columns);
    let sums_len = sums_shape.map_or(0, |(samples, outputs)| samples * outputs);
    // The slots and the row sums live in the thread's scratch, not allocated on each call.
    T::with_scratch(slots_len + sums_len, |scratch| {
        let (slots, sums) = scratch.split_at_mut(slots_len);
        // The lengths were taken from these shapes: the views always fit.
        let misfit = |_| Error::invalid_shape(OP, "scratch views", &[slots_len, sums_len]);
        let slots = slots_shape.map(|shape| ArrayViewMut3::from_shape(shape, slots));
        let row_sums = sums_shape.map(|shape| ArrayViewMut2::from_shape(shape, sums));
        let slots = slots.transpose().map_err(misfit)?;
        let row_sums = row_sums.transpose().map_err(misfit)?;
        let sums = (slots, row_sums);
        by_sample(
            x,
            weight,
            dy,
            (dx, dweight, dbias),
            sums,
            (transposed, per_slot),
        )
    })
}

/// The body of [`sample_by_sample`], given its slots of dW and its rows of db's sums (zeros),
/// whether dW's terms are transposed, and how many samples share a slot.
#[allow(clippy::type_complexity)]
fn by_sample<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    (dx, dweight, dbias): (
        Option<(ArrayViewMut4<T>, GradWrite)>,
        Option<ArrayViewMut2<T>>,
        Option<ArrayViewMut1<T>>,
    ),
    (mut slots, mut row_sums): (Option<ArrayViewMut3<T>>, Option<ArrayViewMut2<T>>),
    (transposed, per_slot): (bool, usize),
) -> Result<()> {
    let write = dx
        .as_ref()
        .map_or(GradWrite::Overwrite, |(_, write)| *write);
    let samples = (
        (Along(x, Axis(0)), Along(dy, Axis(0))),
        (
            dx.map(|(dx, _)| Along(dx, Axis(0))),
            row_sums
                .as_mut()
                .map(|sums| Along(sums.view_mut(), Axis(0))),
        ),
    );
    let slot_views = slots.as_mut().map(|slots| Along(slots.view_mut(), Axis(0)));
    // The threads take whole slots: their samples and the slot their terms sum into.
    let parts = (Groups(samples, per_slot), slot_views);
    in_parts(parts, &|(Groups(samples, _), mut slots)| {
        let ((Along(x, _), Along(dy, _)), (mut dx, mut sums)) = samples;
        for (n, (x_block, dy_block)) in x.outer_iter().zip(dy.outer_iter()).enumerate() {
            let (x_n, dy_n) = (sample_matrix(x_block)?, sample_matrix(dy_block)?);
            if let Some(Along(slots, _)) = slots.as_mut() {
                let slot = slots.index_axis_mut(Axis(0), n / per_slot);
                // The slot's first sample writes it, the others add to it.
                let beta = if n % per_slot == 0 {
                    T::zero()
                } else {
                    T::one()
                };
                weight_term(x_n, dy_n, transposed, beta, slot)?;
            }
            let sums_n = sums.as_mut().map(|Along(sums, _)| sums.row_mut(n));
            match dx.as_mut() {
                Some(Along(dx, _)) => {
                    let dx_n = dx.index_axis_mut(Axis(0), n);
                    sample_input_gradient(weight, dy_n, write, dx_n, sums_n)?;
                }
                None => sums_n
                    .into_iter()
                    .for_each(|sums_n| row_sums_of(dy_n, sums_n)),
            }
        }
        Ok(())
    })?;
    if let (Some(mut dweight), Some(mut slots)) = (dweight, slots) {
        add_in_order(slots.view_mut())?;
        if let Some(sum) = slots.outer_iter().next() {
            match transposed {
                true => dweight += &sum.t(),
                false => dweight += &sum,
            }
        }
    }
    if let (Some(dbias), Some(row_sums)) = (dbias, row_sums) {
        add_row_sums(row_sums.view(), dbias);
    }
    Ok(())
}

/// sums[o] ← Σₚ dYₙ[o, p] for every output channel o: one sample's term of db, read while
/// dYₙ is still in cache from its term of dW, in eight partial sums ([`sum_pairs`]: vector
/// adds, where ndarray's `sum` ran one value at a time).
fn row_sums_of<T: Element>(dy_n: ArrayView2<T>, mut sums: ArrayViewMut1<T>) {
    for (sum, row) in sums.iter_mut().zip(dy_n.outer_iter()) {
        *sum = sum_pairs(row, row, |value, _| value);
    }
}

/// db += Σₙ row_sums[n], in sample order.
fn add_row_sums<T: Element>(row_sums: ArrayView2<T>, mut dbias: ArrayViewMut1<T>) {
    for sums_n in row_sums.outer_iter() {
        dbias += &sums_n;
    }
}

/// How many samples share a slot of dW's sum: one each while the slots (F1×F values each) take
/// no more memory than the input X (N·F·P values), more when the channels outnumber the
/// pixels (a slot per sample of a 2048 → 2048 layer on 8×8 maps, batch 256, would be 4 GiB).
/// It depends on the shapes alone, never on the thread count.
fn samples_per_slot(batch: usize, pixels: usize, outputs: usize) -> usize {
    let slots = (batch.saturating_mul(pixels) / outputs.max(1)).clamp(1, batch.max(1));
    batch.div_ceil(slots).max(1)
}

/// slots[0] ← Σᵢ slots[i], added in order; the threads split the rows.
fn add_in_order<T: Element>(slots: ArrayViewMut3<T>) -> Result<()> {
    in_parts(Along(slots, Axis(1)), &|Along(slots, _)| {
        let count = slots.len_of(Axis(0));
        let (mut first, rest) = slots.split_at(Axis(0), count.min(1));
        for mut sum in first.outer_iter_mut() {
            for slot in rest.outer_iter() {
                sum += &slot;
            }
        }
        Ok(())
    })
}

/// Whether dW's products are computed transposed: with fewer output than input channels (a
/// projection) they run faster with the longer side as C's rows, dWᵀ = Σₙ Xₙ·dYₙᵀ.
fn dw_transposed<T: Element>(dweight: &ArrayViewMut2<T>) -> bool {
    dweight.nrows() < dweight.ncols() && longer_side_as_rows::<T>()
}

/// target ← dYₙ·Xₙᵀ + β·target, or its transpose Xₙ·dYₙᵀ when `transposed`: one sample's
/// term of dW (or a group's, its samples side by side).
fn weight_term<T: Element>(
    x_n: ArrayView2<T>,
    dy_n: ArrayView2<T>,
    transposed: bool,
    beta: T,
    target: ArrayViewMut2<T>,
) -> Result<()> {
    if transposed {
        gemm(T::one(), x_n, dy_n.t(), beta, target) // (F×P)·(P×F1) → (F×F1)
    } else {
        // (F1×P)·(P×F) → (F1×F); Xₙᵀ is a transposed view, not a copy.
        gemm(T::one(), dy_n, x_n.t(), beta, target)
    }
}

/// dW += Σₙ dYₙ·Xₙᵀ (maps below [`SAMPLE_BY_SAMPLE_PIXELS`] pixels). Below
/// [`GROUP_BELOW_PIXELS`], one product per group of samples: the sum over n and p is one sum
/// over the columns of the samples laid side by side, dW += [dY₁ … dY_G]·[X₁ … X_G]ᵀ, as deep
/// as the group's pixels. A 7×7 sample's own product would be 49 deep and read and write all
/// of dW (1.6 MB on MobileNetV2's 320 → 1280) for every 49 steps of arithmetic.
fn weight_gradient<T: Element>(
    x: ArrayView4<T>,
    dy: ArrayView4<T>,
    dweight: ArrayViewMut2<T>,
) -> Result<()> {
    // A projection's dWᵀ = Σₙ Xₙ·dYₙᵀ is summed in a scratch and added to dW transposed once;
    // chosen from the whole of dW, so that every thread count computes each element alike.
    let transposed = dw_transposed(&dweight);
    let pixels = x.shape()[2] * x.shape()[3];
    let group = match pixels < GROUP_BELOW_PIXELS {
        true => samples_per_group(pixels, x.shape()[0]),
        false => 1,
    };
    split_weight_gradient((x, dy, dweight), &|(x, dy, mut dweight)| {
        let (inputs, outputs) = (x.shape()[1], dy.shape()[1]);
        let columns = if group > 1 { group * pixels } else { 0 };
        let sum_len = if transposed { dweight.len() } else { 0 };
        let wide_len = (inputs + outputs) * columns;
        // The sum and the side-by-side samples live in the thread's scratch.
        T::with_scratch(sum_len + wide_len, |scratch| {
            let (sum, wide) = scratch.split_at_mut(sum_len);
            let (wide_x, wide_dy) = wide.split_at_mut(inputs * columns);
            // The lengths were taken from these shapes: the views always fit.
            let misfit = |_| Error::invalid_shape(OP, "scratch views", &[sum_len, wide_len]);
            let mut sum = transposed
                .then(|| ArrayViewMut2::from_shape(dweight.t().raw_dim(), sum))
                .transpose()
                .map_err(misfit)?;
            let mut wide_x =
                ArrayViewMut2::from_shape((inputs, columns), wide_x).map_err(misfit)?;
            let mut wide_dy =
                ArrayViewMut2::from_shape((outputs, columns), wide_dy).map_err(misfit)?;
            let samples = x.axis_chunks_iter(Axis(0), group);
            for (x_g, dy_g) in samples.zip(dy.axis_chunks_iter(Axis(0), group)) {
                let target = match sum.as_mut() {
                    Some(sum) => sum.view_mut(),
                    None => dweight.view_mut(),
                };
                if group == 1 {
                    let (x_n, dy_n) = (x_g.index_axis(Axis(0), 0), dy_g.index_axis(Axis(0), 0));
                    let (x_n, dy_n) = (sample_matrix(x_n)?, sample_matrix(dy_n)?);
                    weight_term(x_n, dy_n, transposed, T::one(), target)?;
                    continue;
                }
                let used = ndarray::s![.., ..x_g.shape()[0] * pixels];
                side_by_side(x_g, wide_x.slice_mut(used))?;
                side_by_side(dy_g, wide_dy.slice_mut(used))?;
                let (x_g, dy_g) = (wide_x.slice(used), wide_dy.slice(used));
                weight_term(x_g, dy_g, transposed, T::one(), target)?;
            }
            if let Some(sum) = sum {
                dweight += &sum.t();
            }
            Ok(())
        })
    })
}

/// dXₙ += Wᵀ·dYₙ for every sample, or = with [`GradWrite::Overwrite`] (β = 0, so that dX
/// need not be zeroed first: what the tape runs for a gradient's first contribution).
pub fn input_gradient<T: Element>(
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: ArrayViewMut4<T>,
    write: GradWrite,
) -> Result<()> {
    input_gradient_and_row_sums(weight, dy, dx, write, None)
}

/// The same, also writing each sample's row sums Σₚ dYₙ[:, p] into row n of `row_sums`
/// (N×F1) when given, with dXₙ (maps of at least [`GROUP_BELOW_PIXELS`] pixels).
fn input_gradient_and_row_sums<T: Element>(
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: ArrayViewMut4<T>,
    write: GradWrite,
    row_sums: Option<ArrayViewMut2<T>>,
) -> Result<()> {
    check_same(
        OP,
        "output gradient channels",
        &weight.shape()[..1],
        &dy.shape()[1..2],
    )?;
    let expected = [dy.shape()[0], weight.ncols(), dy.shape()[2], dy.shape()[3]];
    check_same(OP, "input gradient", &expected, dx.shape())?;
    let pixels = dy.shape()[2] * dy.shape()[3];
    debug_assert!(
        row_sums.is_none() || sums_with_dx(pixels, weight.nrows()),
        "row sums are taken where sums_with_dx says"
    );
    if pixels < GROUP_BELOW_PIXELS {
        return in_groups(
            dy,
            dx,
            // (F×F1)·(F1×G·P) → (F×G·P) for a group of samples side by side
            &|dy_g, dx_g| gemm(T::one(), weight.t(), dy_g, T::zero(), dx_g),
            &|dx, mut dx_n| match write {
                GradWrite::Overwrite => dx_n.assign(&dx),
                GradWrite::Accumulate => dx_n += &dx,
            },
        );
    }
    if packed_over_samples(pixels, weight.nrows()) {
        // (F×F1)·[dY₁ … dY_N] (F1 × N·P) → [dX₁ … dX_N], one packed product
        return over_the_batch(
            weight.t(),
            dy,
            write.beta::<T>(),
            (None, false),
            dx,
            row_sums,
        );
    }
    let row_sums = row_sums.map(|sums| Along(sums, Axis(0)));
    in_parts((Along(dy, Axis(0)), Along(dx, Axis(0)), row_sums), &|(
        Along(dy, _),
        Along(mut dx, _),
        mut row_sums,
    )| {
        for (n, (dy_block, dx_block)) in dy.outer_iter().zip(dx.outer_iter_mut()).enumerate() {
            let sums_n = row_sums.as_mut().map(|Along(sums, _)| sums.row_mut(n));
            sample_input_gradient(weight, sample_matrix(dy_block)?, write, dx_block, sums_n)?;
        }
        Ok(())
    })
}

/// One sample's dXₙ = Wᵀ·dYₙ, added or written as `write` says; with `row_sums`, also its
/// term of db, Σₚ dYₙ[:, p], taken as the product reads dYₙ.
fn sample_input_gradient<T: Element>(
    weight: ArrayView2<T>,
    dy_n: ArrayView2<T>,
    write: GradWrite,
    dx_block: ArrayViewMut3<T>,
    row_sums: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let beta = write.beta::<T>();
    let dx_n = sample_matrix_mut(dx_block)?;
    // (F×F1)·(F1×P) += into (F×P)
    match row_sums {
        Some(sums) => gemm_and_row_sums_of_b(weight.t(), dy_n, beta, dx_n, sums),
        None => gemm(T::one(), weight.t(), dy_n, beta, dx_n),
    }
}

/// db += Σₙ Σₚ dYₙ[:, p]: a sum over rows, no GEMM. Each thread sums its own channels.
fn bias_gradient<T: Element>(dy: ArrayView4<T>, dbias: ArrayViewMut1<T>) -> Result<()> {
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
    })
}

// ---------------------------------------------------------------- reference loops

/// The specification: `Yₙ[o,p] = Σ_c W[o,c]·Xₙ[c,p] + b[o]`, as plain loops.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    check_same(OP, "output", &out, y.shape())?;
    index_form_forward(x, weight, bias, 1, y);
    Ok(())
}

/// The specification of the backward pass, differentiating the index form term by term.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut2<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    check_gradients(&x, &weight, &dy, grad_shapes(&dx, &dweight, &dbias))?;
    index_form_backward(x, weight, dy, 1, (dx, dweight, dbias));
    Ok(())
}

/// The index form, for channels cut into `groups` independent groups (1 here; see
/// `grouped_conv1x1`): output channel o, in group k = ⌊o / F1g⌋, reads that group's Fg input
/// channels, `y[n,o,h,w] = Σ_{c<Fg} W[o,c]·x[n, k·Fg + c, h, w] + b[o]`.
pub(crate) fn index_form_forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    groups: usize,
    mut y: ArrayViewMut4<T>,
) {
    let (fg, f1g) = (weight.ncols(), weight.nrows() / groups);
    for ((n, o, h, w), y) in y.indexed_iter_mut() {
        let first = (o / f1g) * fg;
        let mut sum = bias.as_ref().map_or(T::zero(), |b| b[o]);
        for c in 0..fg {
            sum += weight[[o, c]] * x[[n, first + c, h, w]];
        }
        *y = sum;
    }
}

/// The index form differentiated term by term: each term W[o,c]·x[..] sends g = dy[n,o,h,w]
/// to the weight (g·x) and to the input (g·W), and db[o] sums g. A `None` buffer is skipped.
#[allow(clippy::type_complexity)]
pub(crate) fn index_form_backward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView2<T>,
    dy: ArrayView4<T>,
    groups: usize,
    (mut dx, mut dweight, mut dbias): (
        Option<ArrayViewMut4<T>>,
        Option<ArrayViewMut2<T>>,
        Option<ArrayViewMut1<T>>,
    ),
) {
    let (fg, f1g) = (weight.ncols(), weight.nrows() / groups);
    for ((n, o, h, w), &g) in dy.indexed_iter() {
        let first = (o / f1g) * fg;
        if let Some(dbias) = dbias.as_mut() {
            dbias[o] += g;
        }
        for c in 0..fg {
            if let Some(dweight) = dweight.as_mut() {
                dweight[[o, c]] += g * x[[n, first + c, h, w]];
            }
            if let Some(dx) = dx.as_mut() {
                dx[[n, first + c, h, w]] += g * weight[[o, c]];
            }
        }
    }
}

// ---------------------------------------------------------------- speed variants and helpers

/// The tape's backward: the three gradients below, for whichever gradients are wanted, dX
/// written as the tape says. [`crate::ops::linear`] calls it on (N, F, 1, 1) views.
pub(crate) fn backward_ports<T: Element>(
    ports: [Port<'_, T>; 3],
    dy: ArrayViewD<'_, T>,
) -> Result<()> {
    let layer = layer_gradients(OP, ports)?;
    let dy = dims(OP, dy)?;
    gradients(
        layer.x,
        layer.weight,
        dy,
        layer.dx,
        layer.dweight,
        layer.dbias,
    )
}

/// Checks x (N, F, H, W), weight (F1, F) and bias (F1) and returns the output shape (N, F1, H, W).
pub fn output_shape(x: &[usize], weight: &[usize], bias: Option<&[usize]>) -> Result<[usize; 4]> {
    let [batch, c_in, height, width] = check_image(OP, x)?;
    check_weights(weight, bias)?;
    let (c_out, weight_c_in) = (weight[0], weight[1]);
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

/// Checks weight (F1, F) with F1, F > 0 and bias (F1).
pub(crate) fn check_weights(weight: &[usize], bias: Option<&[usize]>) -> Result<()> {
    check_ndim(OP, "weight (F1, F)", weight, 2)?;
    if weight[0] == 0 || weight[1] == 0 {
        return Err(Error::invalid_shape(
            OP,
            "weight must have non-zero F1 and F",
            weight,
        ));
    }
    match bias {
        Some(bias) => check_same(OP, "bias", &weight[..1], bias),
        None => Ok(()),
    }
}

/// The fused ReLU's backward: with Y = max(Z, 0), dZ = dY ⊙ 1[Z > 0], and Z > 0 exactly where
/// Y > 0, so the mask is read from the saved output; dY is masked in place (it becomes dZ).
fn relu_mask<T: Element>(y: ArrayView4<T>, dy: ArrayViewMut4<T>) -> Result<()> {
    check_same(OP, "output", dy.shape(), y.shape())?;
    in_parts((Along(y, Axis(0)), Along(dy, Axis(0))), &|(
        Along(y, _),
        Along(mut dy, _),
    )| {
        // A select, not a branch, as in relu::backward.
        zip_values(dy.view_mut(), y, y, |dy, y, _| {
            if y > T::zero() {
                dy
            } else {
                T::zero()
            }
        });
        Ok(())
    })
}

/// Below this many pixels per sample (7×7 maps, say), the forward pass and dX run one product
/// per group of samples side by side instead of one per sample, whose few columns leave the
/// GEMM packing W for little work: measured with batch 16 at 7×7, 320 → 1280 took 7.06 ms
/// grouped (copies included) against 8.62 ms per sample; at 14×14 grouping was slower. So
/// does dW (see `weight_gradient`): 320 → 1280 at 7×7, batch 16, 8.2 → 7.3 ms at 1 thread;
/// 1024 → 512 on 1×1 maps, batch 128, 14.4 → 3.2 ms (a product 128 deep, not 128 of depth 1).
const GROUP_BELOW_PIXELS: usize = 64;

/// Whether the forward pass (`depth` = F) or dX (`depth` = F1) runs as one packed product
/// over the samples' columns side by side ([`gemm_samples`]) rather than a product per sample:
/// from [`GROUP_BELOW_PIXELS`] pixels and depth 64 on (dX only where it runs apart from dW, on
/// maps under [`SAMPLE_BY_SAMPLE_PIXELS`]). The per-sample products pack A again for every
/// sample and, on 14×14 maps, leave a last panel of 4 columns (196 = 12·16 + 4). Measured
/// with batch 16 at 1 thread, the two paths alternating in one process (minimum of 20–30):
/// MobileNetV2's 14×14 layers, forward 576 → 96 4.48 → 4.23 ms, 384 → 96 2.91 → 2.70, 384 →
/// 64 2.06 → 1.85, 64 → 384 2.05 → 1.93; dX accumulated 576 → 96 4.44 → 4.06, 384 → 96 2.88
/// → 2.62, 64 → 384 2.01 → 1.81; the forward of 256 → 64 at 28×28 (W1, batch 32) 10.8 →
/// 10.0, 64 → 256 at 28×28 5.43 → 4.72, 128 → 128 at 112×112 (batch 4) 24.1 → 19.8. At depth
/// 32 the AVX2 kernel that reads B in place was faster (32 → 192 at 28×28: 1.9 ms against 2.9
/// packed). Maps under 64 pixels keep their grouping: on MobileNetV2's 7×7 layers, whose W is
/// larger than the 256 KiB the packed A may take, the packed forward taken a block of W's rows
/// at a time was 6–20 % slower on four of the five (960 → 320 6.02 → 6.97 ms, 320 → 1280 8.04
/// → 8.56) and faster on one (160 → 960 3.26 → 3.06); a W that
/// large on larger maps runs a product per sample (`gemm_samples` falls back), which was as
/// fast or faster than those row blocks (1024 → 512 at 14×14 38.2 against 43.0 ms).
fn packed_over_samples(pixels: usize, depth: usize) -> bool {
    pixels >= GROUP_BELOW_PIXELS && depth >= PACKED_MIN_DEPTH
}

/// See [`packed_over_samples`].
const PACKED_MIN_DEPTH: usize = 64;

/// Whether db's row sums of each dYₙ are taken by dX's product as it reads dYₙ, rather than in
/// a pass of their own over dY: by the per-sample products (maps of at least
/// [`GROUP_BELOW_PIXELS`] pixels that are not [`packed_over_samples`]), and by the packed
/// product where a map's pixels are a multiple of 16, so that each 16-column panel it packs
/// is one sample's (`gemm/samples.rs`). On W2's 64 → 256 layer at 28×28 (batch 32) the pass
/// of its own read all of dY, 25.7 MB, from memory once more.
fn sums_with_dx(pixels: usize, outputs: usize) -> bool {
    pixels >= GROUP_BELOW_PIXELS
        && (!packed_over_samples(pixels, outputs) || pixels.is_multiple_of(16))
}

/// Whether the backward pass on a map of [`SAMPLE_BY_SAMPLE_PIXELS`] or more runs its products
/// apart (dW, then dX with db's row sums) rather than [`sample_by_sample`]: when dX is wanted and both
/// channel counts reach [`PACKED_MIN_DEPTH`], dX as one product packed over the batch
/// ([`over_the_batch`]) outruns the per-sample products by more than reading dY once more
/// costs. The whole backward pass, the two ways alternating in one process (fastest of 30):
/// 256 → 64 at 28×28, batch 32, 21.1 → 20.0 ms at 1 thread, 12.2 → 10.8 at 2; 256 → 64 at
/// 56×56 (batch 16) 40.7 → 39.7; 64 → 256 at 28×28 21.6 → 21.1; 128 → 512 at 28×28 41.4 →
/// 40.7. With fewer channels on one side sample by sample stays the faster (MobileNetV2's
/// 24 → 144 at 56×56 10.2 against 11.8 apart, 16 → 96 at 112×112 19.3 against 23.4, 32 → 192
/// at 28×28 4.2 against 4.5); without dX the two measured level, within the machine's noise.
fn passes_apart(pixels: usize, inputs: usize, outputs: usize, dx_wanted: bool) -> bool {
    dx_wanted && packed_over_samples(pixels, outputs) && inputs >= PACKED_MIN_DEPTH
}

/// From this many pixels per sample (28×28 maps and up) the backward pass runs sample by sample
/// ([`sample_by_sample`], unless [`passes_apart`]): there dYₙ no longer stays in cache between
/// separate passes. On 14×14 maps it does, and sample by sample was the slower choice: against
/// PyTorch in the same rounds, MobileNetV2's 576 → 96 at 14×14 (batch 16) went from 1.03× and
/// 1.00× (1 and 2 threads) with the passes apart to 0.97× and 0.93×.
const SAMPLE_BY_SAMPLE_PIXELS: usize = 256;

/// Outputₙ ← A·Inputₙ + β·Outputₙ (+ bias, ReLU) for every sample, as one packed product
/// over each thread's samples side by side ([`gemm_samples`]), and with `row_sums` (N × rows
/// of Inputₙ) each input's row sums; the samples split between the threads.
fn over_the_batch<T: Element>(
    a: ArrayView2<T>,
    inputs: ArrayView4<T>,
    beta: T,
    (bias, relu): (Option<ArrayView1<T>>, bool),
    outputs: ArrayViewMut4<T>,
    row_sums: Option<ArrayViewMut2<T>>,
) -> Result<()> {
    let row_sums = row_sums.map(|sums| Along(sums, Axis(0)));
    in_parts(
        (Along(inputs, Axis(0)), Along(outputs, Axis(0)), row_sums),
        &|(Along(inputs, _), Along(outputs, _), row_sums)| {
            let (inputs, outputs) = (samples_matrices(inputs)?, samples_matrices(outputs)?);
            let bias = bias.as_ref().map(|b| b.view());
            let sums = row_sums.map(|Along(sums, _)| sums);
            gemm_samples(a, inputs, beta, (bias, relu), outputs, sums)
        },
    )
}

/// One product per group of samples (the samples split between the threads first): the
/// group's `inputs` side by side, `product(inputs, outputs)` on the wide matrices, then
/// `store(sample's columns, its output matrix)` for each sample.
fn in_groups<T: Element>(
    inputs: ArrayView4<T>,
    outputs: ArrayViewMut4<T>,
    product: &(impl Fn(ArrayView2<T>, ArrayViewMut2<T>) -> Result<()> + Sync),
    store: &(impl Fn(ArrayView2<T>, ArrayViewMut2<T>) + Sync),
) -> Result<()> {
    let pixels = inputs.shape()[2] * inputs.shape()[3];
    let (rows_in, rows_out) = (inputs.shape()[1], outputs.shape()[1]);
    in_parts((Along(inputs, Axis(0)), Along(outputs, Axis(0))), &|(
        Along(inputs, _),
        Along(mut outputs, _),
    )| {
        let group = samples_per_group(pixels, inputs.shape()[0]);
        let (len_in, len_out) = (rows_in * group * pixels, rows_out * group * pixels);
        // The wide matrices live in the thread's scratch, as dW's do (`weight_gradient`).
        T::with_scratch(len_in + len_out, |scratch| {
            let (wide_in, wide_out) = scratch.split_at_mut(len_in);
            // The lengths were taken from these shapes: the views always fit.
            let misfit = |_| Error::invalid_shape(OP, "scratch views", &[len_in, len_out]);
            let mut wide_in =
                ArrayViewMut2::from_shape((rows_in, group * pixels), wide_in).map_err(misfit)?;
            let mut wide_out =
                ArrayViewMut2::from_shape((rows_out, group * pixels), wide_out).map_err(misfit)?;
            for (in_g, mut out_g) in inputs
                .axis_chunks_iter(Axis(0), group)
                .zip(outputs.axis_chunks_iter_mut(Axis(0), group))
            {
                let columns = ndarray::s![.., ..in_g.shape()[0] * pixels];
                side_by_side(in_g, wide_in.slice_mut(columns))?;
                product(wide_in.slice(columns), wide_out.slice_mut(columns))?;
                for (n, out_n) in out_g.outer_iter_mut().enumerate() {
                    let sample = ndarray::s![.., n * pixels..(n + 1) * pixels];
                    store(wide_out.slice(sample), sample_matrix_mut(out_n)?);
                }
            }
            Ok(())
        })
    })
}

/// Runs dW's accumulation on parts of dW: dW sums over the samples, so the threads split dW
/// itself, by columns (each computes dW[:, part] += Σₙ dYₙ·Xₙ[part]ᵀ) when F ≥ F1, else by
/// rows (dW[part, :] += Σₙ dYₙ[part]·Xₙᵀ), keeping each thread's GEMM wide.
#[allow(clippy::type_complexity)]
fn split_weight_gradient<'a, T: Element>(
    (x, dy, dweight): (ArrayView4<'a, T>, ArrayView4<'a, T>, ArrayViewMut2<'a, T>),
    work: &(dyn Fn((ArrayView4<T>, ArrayView4<T>, ArrayViewMut2<T>)) -> Result<()> + Sync),
) -> Result<()> {
    if dweight.ncols() >= dweight.nrows() {
        in_parts((Along(x, Axis(1)), Along(dweight, Axis(1))), &|(
            Along(x, _),
            Along(dw, _),
        )| {
            work((x, dy, dw))
        })
    } else {
        in_parts((Along(dy, Axis(1)), Along(dweight, Axis(0))), &|(
            Along(dy, _),
            Along(dw, _),
        )| {
            work((x, dy, dw))
        })
    }
}

/// Checks the buffers of a backward call (dx, dweight, dbias, where given) against x and
/// weight; returns the output shape.
fn check_gradients<T>(
    x: &ArrayView4<T>,
    weight: &ArrayView2<T>,
    dy: &ArrayView4<T>,
    buffers: [Option<&[usize]>; 3],
) -> Result<[usize; 4]> {
    let out = output_shape(x.shape(), weight.shape(), None)?;
    check_layer_gradients(OP, [x.shape(), weight.shape(), &out, dy.shape()], buffers)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::samples_per_slot;

    /// dW's slots (one per run of samples, F1·F values each) never take more memory than the
    /// input X (N·F·P values), and there is one per sample whenever that fits.
    #[test]
    fn the_slots_of_dw_take_no_more_memory_than_the_input() {
        for (batch, pixels, outputs) in [
            (256, 64, 2048),
            (16, 12544, 96),
            (5, 64, 160),
            (3, 64, 80),
            (1, 64, 4096),
            (7, 100, 101),
        ] {
            let per_slot = samples_per_slot(batch, pixels, outputs);
            let slots = batch.div_ceil(per_slot);
            assert!(
                slots * outputs <= (batch * pixels).max(outputs),
                "{batch} {pixels} {outputs}"
            );
            if outputs <= pixels {
                assert_eq!(per_slot, 1, "{batch} {pixels} {outputs}");
            }
        }
    }
}
