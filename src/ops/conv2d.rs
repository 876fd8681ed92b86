//! # Conv2d: a K×K convolution (stride s, zero padding p), as im2col + GEMM
//!
//! ## What
//! Every output pixel mixes a K×K neighbourhood of every input channel. It is here to measure
//! what a 1×1 convolution saves: with K = 1 and p = 0 it *is* a 1×1 convolution (a test shows
//! it), and a 1×1 reduction in front of it cuts its cost by the channel ratio.
//!
//! ## Shapes
//! x (N, F, H, W), weight (F1, F, K, K), bias (F1) → y (N, F1, H′, W′) with
//! H′ = ⌊(H + 2p − K)/s⌋ + 1, W′ = ⌊(W + 2p − K)/s⌋ + 1; P′ = H′·W′. The padding p is the same on all four
//! sides, so with an even K the output cannot keep the input's size: K = 4, p = 2 gives H + 1
//! (asymmetric "same" padding, as in TensorFlow, is not offered).
//!
//! ## Derivation
//! im2col copies, for sample n, every K×K patch into a column of Cₙ (F·K·K, P′):
//!
//! ```text
//! Cₙ[(c·K + i)·K + j, h′·W′ + w′] = x[n, c, h′ + i − p, w′ + j − p]     (0 outside the image)
//! Yₙ = W̃·Cₙ + b·1ᵀ          W̃ = weight viewed as (F1, F·K·K)    (F1×FKK)·(FKK×P′) → (F1×P′)
//! ```
//! which is the index form `y[n,o,h′,w′] = Σ_{c,i,j} W[o,c,i,j]·x[n,c,h′+i−p,w′+j−p] + b[o]`.
//! Differentiating the GEMM exactly as for conv1x1:
//!
//! ```text
//! dW̃ += Σₙ dYₙ·Cₙᵀ        (F1×P′)·(P′×FKK) → (F1×FKK)
//! dCₙ  = W̃ᵀ·dYₙ           (FKK×F1)·(F1×P′) → (FKK×P′)
//! db  += Σₙ Σₚ dYₙ[:, p]
//! ```
//! and col2im, the transpose of im2col, adds each entry of dCₙ back into the input pixel it was
//! copied from: dx[n,c,h′+i−p,w′+j−p] += dCₙ[(c·K+i)·K+j, h′·W′+w′]. A pixel that sits in
//! several patches receives the sum.
//!
//! ## Cost
//! Forward 2·N·F1·F·K²·P′ FLOPs, backward twice that (dW and dX) plus N·F1·P′ for db.
//! im2col copies K² times the input: the memory traffic a 1×1 convolution never pays.

use super::{
    check_image, check_layer_gradients, check_ndim, check_same, grad_shapes, in_standard_layout,
    layer_forward, shape_text, window_backward, window_backward_reference,
    window_forward_reference, Border, LayerForward, Window,
};
use crate::cost::{self, Cost};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gemm::{gemm, gemm_bias_relu, longer_side_as_rows};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::{GradWrite, Operation};
use crate::parallel::{
    in_parts, sample_matrix, sample_matrix_mut, samples_per_group, side_by_side, Along,
};
use ndarray::{
    Array2, ArrayView1, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut1, ArrayViewMut3,
    ArrayViewMut4, Axis,
};

const OP: &str = "conv2d";

/// The node on the tape: its stride and padding; nothing saved beyond its input and weight.
#[derive(Clone, Debug)]
pub struct Conv2d {
    window: Window,
}

impl<T: Element> Graph<T> {
    /// A K×K convolution of `input` (N, F, H, W) by `weight` (F1, F, K, K), with `stride` and
    /// zero `padding` on every side, plus an optional `bias` (F1).
    pub fn conv2d(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        stride: usize,
        padding: usize,
    ) -> Result<NodeId> {
        if stride == 0 {
            return Err(Error::invalid_config(OP, "stride must be at least 1"));
        }
        let check = |w: &[usize], b: Option<&[usize]>| check_weights(w, b).map(drop);
        let window = Window { stride, padding };
        self.push_layer(Conv2d { window }, [input, weight], bias, check)
    }
}

impl<T: Element> Operation<T> for Conv2d {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let window = self.window;
        let shape = |x: &[usize], w: &[usize], b: Option<&[usize]>| output_shape(x, w, b, window);
        let LayerForward { x, weight, bias, y } = layer_forward(OP, &mut pass, shape)?;
        forward(x, weight, bias, window, y)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        window_backward(OP, pass, self.window, backward)
    }

    fn attributes(&self) -> Vec<(&'static str, usize)> {
        self.window.attributes()
    }

    fn cost(&self, inputs: &[&[usize]], output: &[usize], input_grad: bool) -> Cost {
        cost::conv2d(inputs[0], inputs[1], output, inputs.len() > 2, input_grad)
    }
}

/// Checks x (N, F, H, W), weight (F1, F, K, K), bias (F1) and padding; returns (N, F1, H′, W′).
pub fn output_shape(
    x: &[usize],
    weight: &[usize],
    bias: Option<&[usize]>,
    window: Window,
) -> Result<[usize; 4]> {
    let [batch, c_in, height, width] = check_image(OP, x)?;
    let [c_out, weight_c_in, kernel] = check_weights(weight, bias)?;
    if c_in != weight_c_in {
        return Err(Error::shape_mismatch(
            OP,
            "input channels",
            format!("{weight_c_in} (weight is {})", shape_text(weight)),
            format!("{c_in} (input shape {})", shape_text(x)),
        ));
    }
    match (
        window.out_len(height, kernel),
        window.out_len(width, kernel),
    ) {
        (Some(h), Some(w)) => Ok([batch, c_out, h, w]),
        _ => Err(Error::invalid_shape(
            OP,
            format!(
                "a {kernel}×{kernel} kernel does not fit the input padded by {}",
                window.padding
            ),
            x,
        )),
    }
}

/// Checks weight (F1, F, K, K) with non-zero sizes and bias (F1); returns [F1, F, K].
pub(crate) fn check_weights(weight: &[usize], bias: Option<&[usize]>) -> Result<[usize; 3]> {
    check_ndim(OP, "weight (F1, F, K, K)", weight, 4)?;
    if weight.contains(&0) || weight[2] != weight[3] {
        return Err(Error::invalid_shape(
            OP,
            "weight must be (F1, F, K, K) with non-zero sizes and a square kernel",
            weight,
        ));
    }
    if let Some(bias) = bias {
        check_same(OP, "bias", &weight[..1], bias)?;
    }
    Ok([weight[0], weight[1], weight[2]])
}

/// The weight (F1, F, K, K) seen as the matrix W̃ (F1, F·K·K), without copying.
fn weight_matrix<T: Element>(weight: ArrayView4<'_, T>) -> Result<ArrayView2<'_, T>> {
    let (c_out, c_in, kernel, _) = weight.dim();
    weight
        .into_shape_with_order((c_out, c_in * kernel * kernel))
        .map_err(|_| {
            Error::invalid_shape(
                OP,
                "weight must be in standard (row-major) layout",
                &[c_out, c_in, kernel, kernel],
            )
        })
}

/// The copies im2col makes, one segment at a time: for row (c·K + i)·K + j of the column
/// matrix and output row h′, the output columns w′ whose pixel (h′·s + i − p, w′·s + j − p) is
/// inside the image, as `visit(row, h′, Some((h, w′ range, first w)))`, or `None` when the
/// whole segment reads padding.
fn segments(
    (channels, height, width): (usize, usize, usize),
    kernel: usize,
    window: Window,
    (out_height, out_width): (usize, usize),
    mut visit: impl FnMut(usize, usize, usize, Option<(usize, std::ops::Range<usize>, usize)>),
) {
    for c in 0..channels {
        for i in 0..kernel {
            for j in 0..kernel {
                let row = (c * kernel + i) * kernel + j;
                let columns = window.taps(out_width, width, j);
                for oh in 0..out_height {
                    let source = window.source(oh, i, height);
                    let segment = source
                        .zip(columns.clone())
                        .map(|(h, (range, w))| (h, range, w));
                    visit(row, c, oh, segment);
                }
            }
        }
    }
}

/// Where one sample's P′ columns sit in a column matrix that holds a group of samples side by
/// side: from column `offset` of rows `stride` values apart, for an output of `out` pixels.
#[derive(Clone, Copy, Debug)]
struct Block {
    stride: usize,
    offset: usize,
    out: (usize, usize),
}

/// im2col for one sample: fills its block of `columns` (F·K·K rows), a row segment at a time.
/// `padded` is scratch for the stride-1 path.
fn im2col<T: Element>(
    x: ArrayView3<T>,
    kernel: usize,
    window: Window,
    block: Block,
    columns: &mut Array2<T>,
    padded: &mut Vec<T>,
) {
    let x_dims = x.dim();
    let (Some(x), Some(columns)) = (x.to_slice(), columns.as_slice_mut()) else {
        unreachable!("both are in standard layout")
    };
    if window.stride == 1 {
        return im2col_padded(x, x_dims, kernel, window.padding, block, columns, padded);
    }
    let (_, height, width) = x_dims;
    let out_width = block.out.1;
    segments(x_dims, kernel, window, block.out, |row, c, oh, segment| {
        let start = row * block.stride + block.offset + oh * out_width;
        let target = &mut columns[start..start + out_width];
        let Some((h, range, w)) = segment else {
            return target.fill(T::zero());
        };
        target[..range.start].fill(T::zero());
        target[range.end..].fill(T::zero());
        let source = &x[(c * height + h) * width + w..];
        let target = &mut target[range];
        if window.stride == 1 {
            target.copy_from_slice(&source[..target.len()]);
        } else {
            let strided = source.iter().step_by(window.stride);
            target.iter_mut().zip(strided).for_each(|(t, &s)| *t = s);
        }
    });
}

/// im2col at stride 1: the sample's planes copied once into zero-bordered planes, so that each
/// row segment is one straight copy from them, with no bounds to find and no zeros to fill.
fn im2col_padded<T: Element>(
    x: &[T],
    dims: (usize, usize, usize),
    kernel: usize,
    padding: usize,
    block: Block,
    columns: &mut [T],
    padded: &mut Vec<T>,
) {
    let planes = Bordered::new(dims, padding);
    if padded.len() != planes.len() {
        padded.clear();
        padded.resize(planes.len(), T::zero());
    }
    // The interior of every plane; the border stays zero (nothing writes it).
    let plane = planes.border.padded_len();
    let sources = x.chunks_exact(dims.1 * dims.2);
    for (source, target) in sources.zip(padded.chunks_exact_mut(plane)) {
        planes.border.pad(source, target);
    }
    planes.segments(kernel, block, |column, inside, len| {
        columns[column..column + len].copy_from_slice(&padded[inside..inside + len]);
    });
}

/// A sample's planes, each with a zero border ([`Border`]), one after another.
struct Bordered {
    channels: usize,
    border: Border,
}

impl Bordered {
    fn new((channels, height, width): (usize, usize, usize), padding: usize) -> Self {
        let border = Border {
            height,
            width,
            padding,
        };
        Bordered { channels, border }
    }

    /// Values of all the bordered planes.
    fn len(&self) -> usize {
        self.channels * self.border.padded_len()
    }

    /// Every row segment of a sample's block of the column matrix: row (c·K + i)·K + j and
    /// output row h′ read bordered plane c's row h′ + i from column j, as
    /// `visit(start in the columns, start in the bordered planes, W′)`.
    fn segments(&self, kernel: usize, block: Block, mut visit: impl FnMut(usize, usize, usize)) {
        let (out_height, out_width) = block.out;
        let (plane, padded_width) = (self.border.padded_len(), self.border.padded_width());
        for c in 0..self.channels {
            for i in 0..kernel {
                for j in 0..kernel {
                    let row = (c * kernel + i) * kernel + j;
                    for oh in 0..out_height {
                        let column = row * block.stride + block.offset + oh * out_width;
                        visit(column, c * plane + (oh + i) * padded_width + j, out_width);
                    }
                }
            }
        }
    }
}

/// col2im for one sample: dx[pixel] += dC[row, column] for every entry of its block that came
/// from a pixel, a row segment at a time.
fn col2im<T: Element>(
    columns: &Array2<T>,
    kernel: usize,
    window: Window,
    block: Block,
    mut dx: ArrayViewMut3<T>,
    padded: &mut Vec<T>,
) {
    let dims = dx.dim();
    let (_, height, width) = dims;
    let (Some(columns), Some(target)) = (columns.as_slice(), dx.as_slice_mut()) else {
        unreachable!("both are in standard layout")
    };
    if window.stride == 1 {
        return col2im_padded(columns, dims, kernel, window.padding, block, target, padded);
    }
    segments(dims, kernel, window, block.out, |row, c, oh, segment| {
        let Some((h, range, w)) = segment else { return };
        let start = row * block.stride + block.offset + oh * block.out.1;
        let source = &columns[start + range.start..start + range.end];
        let pixels = target[(c * height + h) * width + w..].iter_mut();
        pixels
            .step_by(window.stride)
            .zip(source)
            .for_each(|(t, &s)| *t += s);
    });
}

/// col2im at stride 1: every segment added straight into zero-bordered planes (the border
/// collects what the padding received, which reaches no pixel), whose interior is then added to
/// dx: no bounds to find per segment.
fn col2im_padded<T: Element>(
    columns: &[T],
    dims: (usize, usize, usize),
    kernel: usize,
    padding: usize,
    block: Block,
    dx: &mut [T],
    padded: &mut Vec<T>,
) {
    let planes = Bordered::new(dims, padding);
    padded.clear();
    padded.resize(planes.len(), T::zero());
    planes.segments(kernel, block, |column, inside, len| {
        let sums = padded[inside..inside + len].iter_mut();
        sums.zip(&columns[column..column + len])
            .for_each(|(t, &s)| *t += s);
    });
    let plane = planes.border.padded_len();
    let targets = dx.chunks_exact_mut(dims.1 * dims.2);
    for (source, target) in padded.chunks_exact(plane).zip(targets) {
        planes
            .border
            .write_interior(source, target, GradWrite::Accumulate);
    }
}

/// A group of samples laid side by side in one column matrix: the kernel and window, the
/// samples per group, and each sample's output size (H′, W′).
#[derive(Clone, Copy)]
struct Grouping {
    kernel: usize,
    window: Window,
    group: usize,
    out: (usize, usize),
}

impl Grouping {
    /// Sample g's block.
    fn block(self, g: usize) -> Block {
        let pixels = self.out.0 * self.out.1;
        Block {
            stride: self.group * pixels,
            offset: g * pixels,
            out: self.out,
        }
    }

    /// im2col of every sample of `x_g` into its block of `columns`; `padded` is scratch for
    /// the stride-1 path.
    fn im2col<T: Element>(self, x_g: ArrayView4<T>, columns: &mut Array2<T>, padded: &mut Vec<T>) {
        for (g, x_n) in x_g.outer_iter().enumerate() {
            im2col(
                x_n,
                self.kernel,
                self.window,
                self.block(g),
                columns,
                padded,
            );
        }
    }
}

/// Checks the operands of a forward pass and the output buffer; returns the output shape.
fn check_forward<T>(
    x: &ArrayView4<T>,
    weight: &ArrayView4<T>,
    bias: &Option<ArrayView1<T>>,
    window: Window,
    y: &ArrayViewMut4<T>,
) -> Result<[usize; 4]> {
    let out = output_shape(
        x.shape(),
        weight.shape(),
        bias.as_ref().map(|b| b.shape()),
        window,
    )?;
    check_same(OP, "output", &out, y.shape())?;
    Ok(out)
}

/// Forward: Yₙ = W̃·im2col(Xₙ) + b for every sample.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    bias: Option<ArrayView1<T>>,
    window: Window,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let [_, c_out, out_height, out_width] = check_forward(&x, &weight, &bias, window, &y)?;
    let kernel = weight.shape()[2];
    let (x, weight) = (x.as_standard_layout(), weight.as_standard_layout());
    let weight = weight_matrix(weight.view())?;
    crate::graph::check_elements(OP, &[weight.ncols(), out_height * out_width])?;
    let (out, pixels) = ((out_height, out_width), out_height * out_width);
    // The samples split between the threads; each part builds the column matrix of a group
    // of samples at a time and runs one product for the group.
    in_standard_layout(y.view_mut(), |y| {
        in_parts((Along(x.view(), Axis(0)), Along(y, Axis(0))), &|(
            Along(x, _),
            Along(mut y, _),
        )| {
            let group = samples_per_group(pixels, x.shape()[0]);
            let grouping = Grouping {
                kernel,
                window,
                group,
                out,
            };
            let mut columns = Array2::zeros((weight.ncols(), group * pixels));
            let (mut product, mut padded) = (Array2::zeros((c_out, group * pixels)), Vec::new());
            for (x_g, mut y_g) in x
                .axis_chunks_iter(Axis(0), group)
                .zip(y.axis_chunks_iter_mut(Axis(0), group))
            {
                grouping.im2col(x_g, &mut columns, &mut padded);
                let first = ndarray::s![.., ..x_g.shape()[0] * pixels];
                // (F1×FKK)·(FKK×G·P′) → (F1×G·P′), the bias added as it is stored
                gemm_bias_relu(
                    weight.view(),
                    columns.slice(first),
                    bias.as_ref().map(|b| b.view()),
                    false,
                    product.slice_mut(first),
                )?;
                for (g, y_n) in y_g.outer_iter_mut().enumerate() {
                    let mut y_n = sample_matrix_mut(y_n)?;
                    y_n.assign(&product.slice(ndarray::s![.., g * pixels..(g + 1) * pixels]));
                }
            }
            Ok(())
        })
    })
}

/// Backward: accumulates dW̃ = Σₙ dYₙ·Cₙᵀ, dXₙ = col2im(W̃ᵀ·dYₙ) and db = Σ dY into the given
/// buffers (a `None` buffer is skipped).
pub fn backward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    window: Window,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut4<T>>,
    mut dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let [_, c_out, out_height, out_width] =
        check_gradients(&x, &weight, window, &dy, &dx, &dweight, &dbias)?;
    let kernel = weight.shape()[2];
    let (x, weight, dy) = (
        x.as_standard_layout(),
        weight.as_standard_layout(),
        dy.as_standard_layout(),
    );
    let (x, dy, weight) = (x.view(), dy.view(), weight_matrix(weight.view())?);
    let pixels = out_height * out_width;
    crate::graph::check_elements(OP, &[weight.ncols(), pixels])?;
    let out = (out_height, out_width);
    let group = samples_per_group(pixels, x.shape()[0]);
    let grouping = Grouping {
        kernel,
        window,
        group,
        out,
    };
    // dW̃ sums over the samples, so the threads split dW itself, by input channel: the rows
    // of the column matrix that belong to channels c₀..c₁ are the im2col of those channels
    // alone, so each thread builds only its own rows and runs, per group of samples,
    // (F1×G·P′)·(G·P′×(c₁−c₀)·K²) — or, with fewer output channels than F·K², the faster
    // dW̃ᵀ = Σ columns·dYᵀ (as in conv1x1's dW), chosen from the whole of dW so that every
    // thread count computes alike.
    let transposed = c_out < weight.ncols() && longer_side_as_rows::<T>();
    if let Some(dweight) = dweight {
        in_parts((Along(x, Axis(1)), Along(dweight, Axis(1))), &|(
            Along(x, _),
            Along(dweight, _),
        )| {
            let rows = dweight.shape()[1] * kernel * kernel;
            // This part of dW̃ (or of dW̃ᵀ) is not contiguous in dW: summed here, then added.
            let mut part = match transposed {
                true => Array2::zeros((rows, c_out)),
                false => Array2::zeros((c_out, rows)),
            };
            let (mut columns, mut padded) = (Array2::zeros((rows, group * pixels)), Vec::new());
            let mut gathered = Array2::zeros((c_out, group * pixels));
            for (x_g, dy_g) in x
                .axis_chunks_iter(Axis(0), group)
                .zip(dy.axis_chunks_iter(Axis(0), group))
            {
                grouping.im2col(x_g, &mut columns, &mut padded);
                let first = ndarray::s![.., ..x_g.shape()[0] * pixels];
                side_by_side(dy_g, gathered.slice_mut(first))?;
                let (dy_g, c_g) = (gathered.slice(first), columns.slice(first));
                if transposed {
                    // (FKK×G·P′)·(G·P′×F1) += into (FKK×F1)
                    gemm(T::one(), c_g, dy_g.t(), T::one(), part.view_mut())?;
                } else {
                    // (F1×G·P′)·(G·P′×FKK) += into (F1×FKK)
                    gemm(T::one(), dy_g, c_g.t(), T::one(), part.view_mut())?;
                }
            }
            if transposed {
                part = part.t().as_standard_layout().into_owned();
            }
            let mut dweight = dweight;
            let part = part
                .into_shape_with_order(dweight.raw_dim())
                .map_err(|_| Error::invalid_shape(OP, "weight gradient", dweight.shape()))?;
            dweight += &part;
            Ok(())
        })?;
    }
    if let Some(dbias) = dbias.as_mut() {
        for dy_block in dy.outer_iter() {
            let dy_n = sample_matrix(dy_block)?;
            for (db, row) in dbias.iter_mut().zip(dy_n.outer_iter()) {
                *db += row.sum();
            }
        }
    }
    // dX is per sample: the samples split between the threads, a group at a time.
    let Some(mut dx) = dx else { return Ok(()) };
    in_standard_layout(dx.view_mut(), |dx| {
        in_parts((Along(dy, Axis(0)), Along(dx, Axis(0))), &|(
            Along(dy, _),
            Along(mut dx, _),
        )| {
            let mut dcolumns = Array2::zeros((weight.ncols(), group * pixels));
            let mut padded = Vec::new();
            let mut gathered = Array2::zeros((c_out, group * pixels));
            for (dy_g, mut dx_g) in dy
                .axis_chunks_iter(Axis(0), group)
                .zip(dx.axis_chunks_iter_mut(Axis(0), group))
            {
                let first = ndarray::s![.., ..dy_g.shape()[0] * pixels];
                side_by_side(dy_g, gathered.slice_mut(first))?;
                // (FKK×F1)·(F1×G·P′) → (FKK×G·P′), then scattered back by col2im
                let (dy_g, dc_g) = (gathered.slice(first), dcolumns.slice_mut(first));
                gemm(T::one(), weight.t(), dy_g, T::zero(), dc_g)?;
                for (g, dx_n) in dx_g.outer_iter_mut().enumerate() {
                    let block = grouping.block(g);
                    col2im(&dcolumns, kernel, window, block, dx_n, &mut padded);
                }
            }
            Ok(())
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn check_gradients<T: Element>(
    x: &ArrayView4<T>,
    weight: &ArrayView4<T>,
    window: Window,
    dy: &ArrayView4<T>,
    dx: &Option<ArrayViewMut4<T>>,
    dweight: &Option<ArrayViewMut4<T>>,
    dbias: &Option<ArrayViewMut1<T>>,
) -> Result<[usize; 4]> {
    let out = output_shape(x.shape(), weight.shape(), None, window)?;
    let buffers = grad_shapes(dx, dweight, dbias);
    check_layer_gradients(OP, [x.shape(), weight.shape(), &out, dy.shape()], buffers)?;
    Ok(out)
}

/// The specification: every term of the index form, summed directly (no im2col); output
/// channel o reads every input channel c, scaled by W[o, c, ·, ·].
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    bias: Option<ArrayView1<T>>,
    window: Window,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    check_forward(&x, &weight, &bias, window, &y)?;
    let channels = x.shape()[1];
    let reads = |_| (0..channels).map(|c| (c, c)).collect();
    window_forward_reference(x, weight, bias, window, y, reads);
    Ok(())
}

/// The specification of the backward pass: the index form differentiated term by term.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    window: Window,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut4<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    check_gradients(&x, &weight, window, &dy, &dx, &dweight, &dbias)?;
    let channels = x.shape()[1];
    let reads = |_| (0..channels).map(|c| (c, c)).collect();
    window_backward_reference(x, weight, window, dy, dx, dweight, dbias, reads);
    Ok(())
}
