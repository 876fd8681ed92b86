//! The ops, one per file, each with its forward, its backward and its derivation side by side,
//! plus `forward_reference` / `backward_reference` index loops that are the specification the
//! fast path is tested against.
//!
//! This file holds what several ops share: the shape checks, the plane loops (`sum_pairs`,
//! `in_standard_layout`), and the K×K convolutions' tape plumbing and index form.

pub mod add;
pub mod avg_pool;
pub mod batch_norm;
pub mod channel_shuffle;
pub mod concat;
pub mod conv1x1;
pub mod conv2d;
pub mod depthwise;
pub mod flatten;
pub mod global_avg_pool;
pub mod global_max_pool;
pub mod grouped_conv1x1;
pub mod linear;
pub mod max_pool;
pub mod mse;
pub mod operation;
pub mod relu;
pub mod softmax_cross_entropy;

use crate::error::{Error, Result};
use ndarray::{
    ArrayView, ArrayView1, ArrayView4, ArrayViewD, ArrayViewMut, ArrayViewMut1, ArrayViewMut4,
    ArrayViewMutD, Dimension,
};

use crate::element::Element;
use crate::graph::{Backward, Forward, Graph, NodeId, Port};
pub use operation::{CloneOperation, GradWrite, Operation};

/// A buffer seen with the number of dimensions `op` expects (checked once by its forward).
pub(crate) fn dims<'a, T, D: Dimension>(
    op: &'static str,
    view: ArrayViewD<'a, T>,
) -> Result<ArrayView<'a, T, D>> {
    if D::NDIM.is_some_and(|ndim| ndim != view.ndim()) {
        return Err(wrong_dims::<D>(op, view.shape()));
    }
    view.into_dimensionality()
        .map_err(|_| wrong_dims::<D>(op, &[]))
}

/// The same for a mutable buffer.
pub(crate) fn dims_mut<'a, T, D: Dimension>(
    op: &'static str,
    view: ArrayViewMutD<'a, T>,
) -> Result<ArrayViewMut<'a, T, D>> {
    if D::NDIM.is_some_and(|ndim| ndim != view.ndim()) {
        return Err(wrong_dims::<D>(op, view.shape()));
    }
    view.into_dimensionality()
        .map_err(|_| wrong_dims::<D>(op, &[]))
}

/// A port's value, and its gradient ready to accumulate into (see [`Port::accumulating`]),
/// with the dimensions `op` expects.
#[allow(clippy::type_complexity)]
pub(crate) fn accumulating<'a, T: Element, D: Dimension>(
    op: &'static str,
    port: Port<'a, T>,
) -> Result<(ArrayView<'a, T, D>, Option<ArrayViewMut<'a, T, D>>)> {
    let (value, grad) = port.accumulating()?;
    Ok((dims(op, value)?, grad.map(|g| dims_mut(op, g)).transpose()?))
}

/// The forward pass of a one-input op whose output has the input's shape (an elementwise op):
/// calls `forward(x, y)`.
pub(crate) fn elementwise_forward<T: Element>(
    mut pass: Forward<'_, T>,
    forward: impl FnOnce(ArrayViewD<T>, ArrayViewMutD<T>) -> Result<()>,
) -> Result<()> {
    let x = pass.inputs.get(0);
    forward(x.view(), pass.output(x.shape())?)
}

/// The backward pass of a one-input op that only adds into dx: calls `backward(x, dy, dx)`
/// when the input wants a gradient.
pub(crate) fn unary_backward<T: Element>(
    pass: Backward<'_, T>,
    backward: impl FnOnce(ArrayViewD<T>, ArrayViewD<T>, ArrayViewMutD<T>) -> Result<()>,
) -> Result<()> {
    let Backward { dy, mut inputs, .. } = pass;
    match inputs.port(0)?.accumulating()? {
        (x, Some(dx)) => backward(x, dy.view(), dx),
        _ => Ok(()),
    }
}

fn wrong_dims<D: Dimension>(op: &'static str, shape: &[usize]) -> Error {
    let expected = D::NDIM.map_or("any".to_string(), |n| n.to_string());
    Error::shape_mismatch(op, "buffer dimensions", expected, shape_text(shape))
}

/// Σᵢ f(aᵢ, bᵢ) over two views of one shape. Contiguous views are summed in eight
/// interleaved partial sums: independent chains that the compiler turns into vector adds (one
/// running sum is a single dependency chain it may not reorder), and that round less in f32;
/// compiled for AVX2 on CPUs that have it (the same sums, in one vector instead of two).
pub(crate) fn sum_pairs<T: Element, D: Dimension>(
    a: ArrayView<T, D>,
    b: ArrayView<T, D>,
    f: impl Fn(T, T) -> T,
) -> T {
    let (Some(a), Some(b)) = (a.as_slice(), b.as_slice()) else {
        return ndarray::Zip::from(&a)
            .and(&b)
            .fold(T::zero(), |sum, &a, &b| sum + f(a, b));
    };
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
            sum_slices(a, b, f)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(a, b, f) };
    }
    sum_slices(a, b, f)
}

#[inline(always)]
fn sum_slices<T: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let (a_lanes, b_lanes) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = (a_lanes.remainder().iter())
        .zip(b_lanes.remainder())
        .fold(T::zero(), |sum, (&a, &b)| sum + f(a, b));
    let mut lanes = [T::zero(); 8];
    for (a, b) in a_lanes.zip(b_lanes) {
        for lane in 0..8 {
            lanes[lane] += f(a[lane], b[lane]);
        }
    }
    lanes.iter().fold(tail, |sum, &lane| sum + lane)
}

/// Σᵢ f(aᵢ, bᵢ) for an f with two values, (Σ first, Σ second), in one pass over two views
/// of one shape, each summed as [`sum_pairs`] sums (eight interleaved partial sums where the
/// views are contiguous): the two sums of a backward pass read their operands once, not twice.
pub(crate) fn two_sums_of_pairs<T: Element, D: Dimension>(
    a: ArrayView<T, D>,
    b: ArrayView<T, D>,
    f: impl Fn(T, T) -> (T, T),
) -> (T, T) {
    let add = |(first, second): (T, T), (a, b): (T, T)| (first + a, second + b);
    let (Some(a), Some(b)) = (a.as_slice(), b.as_slice()) else {
        let zero = (T::zero(), T::zero());
        return ndarray::Zip::from(&a)
            .and(&b)
            .fold(zero, |sums, &a, &b| add(sums, f(a, b)));
    };
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> (T, T)) -> (T, T) {
            two_sums_of_slices(a, b, f)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(a, b, f) };
    }
    two_sums_of_slices(a, b, f)
}

#[inline(always)]
fn two_sums_of_slices<T: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> (T, T)) -> (T, T) {
    let add = |(first, second): (T, T), (a, b): (T, T)| (first + a, second + b);
    let (a_lanes, b_lanes) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails = (a_lanes.remainder().iter())
        .zip(b_lanes.remainder())
        .fold((T::zero(), T::zero()), |sums, (&a, &b)| add(sums, f(a, b)));
    let (mut first, mut second) = ([T::zero(); 8], [T::zero(); 8]);
    for (a, b) in a_lanes.zip(b_lanes) {
        for lane in 0..8 {
            let (one, two) = f(a[lane], b[lane]);
            first[lane] += one;
            second[lane] += two;
        }
    }
    let total = |tail: T, lanes: [T; 8]| lanes.iter().fold(tail, |sum, &lane| sum + lane);
    (total(tails.0, first), total(tails.1, second))
}

/// `out = f(out, a, b)` value by value over three views of one shape (the elementwise passes
/// of batch norm, ReLU and add); where all three are contiguous the loop is compiled for AVX2
/// on CPUs that have it (eight lanes instead of SSE2's four), and an f that ignores `out`
/// compiles to no load of it.
pub(crate) fn zip_values<T: Element, D: Dimension>(
    mut out: ArrayViewMut<T, D>,
    a: ArrayView<T, D>,
    b: ArrayView<T, D>,
    f: impl Fn(T, T, T) -> T,
) {
    let (Some(out), Some(a), Some(b)) = (out.as_slice_mut(), a.as_slice(), b.as_slice()) else {
        ndarray::Zip::from(&mut out)
            .and(&a)
            .and(&b)
            .for_each(|out, &a, &b| *out = f(*out, a, b));
        return;
    };
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T, T) -> T) {
            zip_slices(out, a, b, f)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(out, a, b, f) };
    }
    zip_slices(out, a, b, f)
}

#[inline(always)]
fn zip_slices<T: Element>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T, T) -> T) {
    let values = out.iter_mut().zip(a.iter().zip(b));
    values.for_each(|(out, (&a, &b))| *out = f(*out, a, b));
}

/// Runs `work` on `view` when it is in standard layout, else on a standard-layout copy that
/// is then written back (the tape's own buffers never need the copy).
pub(crate) fn in_standard_layout<T: Element, D: Dimension>(
    mut view: ArrayViewMut<T, D>,
    work: impl FnOnce(ArrayViewMut<T, D>) -> Result<()>,
) -> Result<()> {
    if view.is_standard_layout() {
        return work(view);
    }
    let mut copy = view.as_standard_layout().into_owned();
    work(copy.view_mut())?;
    view.assign(&copy);
    Ok(())
}

/// `[2, 6, 5, 5]`: how shapes appear in messages.
pub(crate) fn shape_text(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Checks that a shape has `ndim` dimensions.
pub(crate) fn check_ndim(op: &'static str, what: &str, shape: &[usize], ndim: usize) -> Result<()> {
    if shape.len() != ndim {
        return Err(Error::shape_mismatch(
            op,
            format!("{what} dimensions"),
            format!("{ndim}"),
            format!("{} (shape {})", shape.len(), shape_text(shape)),
        ));
    }
    Ok(())
}

/// Checks an (N, C, H, W) shape: four dimensions, and C, H, W all non-zero. A batch of 0 is
/// allowed (the output is an empty batch of the right shape).
pub(crate) fn check_image(op: &'static str, shape: &[usize]) -> Result<[usize; 4]> {
    check_ndim(op, "input (N, C, H, W)", shape, 4)?;
    if shape[1] == 0 || shape[2] == 0 || shape[3] == 0 {
        return Err(Error::invalid_shape(
            op,
            "channels, height and width must all be non-zero",
            shape,
        ));
    }
    Ok([shape[0], shape[1], shape[2], shape[3]])
}

/// Checks that a caller-provided buffer (an output or a gradient) has the shape it must have.
pub(crate) fn check_same(
    op: &'static str,
    what: &str,
    expected: &[usize],
    found: &[usize],
) -> Result<()> {
    if expected != found {
        return Err(Error::shape_mismatch(
            op,
            format!("{what} shape"),
            shape_text(expected),
            shape_text(found),
        ));
    }
    Ok(())
}

/// Stride and zero padding (on every side) of a K×K convolution window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub stride: usize,
    pub padding: usize,
}

impl Window {
    /// The window as a node's attributes (see `describe.rs`).
    pub(crate) fn attributes(self) -> Vec<(&'static str, usize)> {
        vec![("stride", self.stride), ("padding", self.padding)]
    }

    /// Stride 1, no padding.
    pub const UNIT: Window = Window {
        stride: 1,
        padding: 0,
    };

    /// Output length ⌊(len + 2p − K)/s⌋ + 1 along one axis, or `None` when the kernel does not
    /// fit the padded input (or the sizes overflow, or the stride is 0).
    pub fn out_len(self, len: usize, kernel: usize) -> Option<usize> {
        let padded = len.checked_add(self.padding.checked_mul(2)?)?;
        Some(padded.checked_sub(kernel)? / (self.stride > 0).then_some(self.stride)? + 1)
    }

    /// Along one axis of `len` inputs and `out_len` outputs: the output indices i whose
    /// source i·s + a − p (for kernel offset `a`) lies inside, and the first of those sources;
    /// `None` when no output reads offset `a`.
    pub(crate) fn taps(
        self,
        out_len: usize,
        len: usize,
        a: usize,
    ) -> Option<(std::ops::Range<usize>, usize)> {
        let stride = self.stride.max(1);
        // The first i with i·s + a ≥ p, and one past the last with i·s + a − p < len.
        let first = self.padding.saturating_sub(a).div_ceil(stride);
        let end = (len + self.padding)
            .checked_sub(a)
            .map_or(0, |room| room.div_ceil(stride))
            .min(out_len);
        (first < end).then(|| (first..end, first * stride + a - self.padding))
    }

    /// The input index i·s + a − p that output index `i` reads at kernel offset `a`, or `None`
    /// where it falls in the padding (outside 0..len).
    pub fn source(self, i: usize, a: usize, len: usize) -> Option<usize> {
        (i * self.stride + a)
            .checked_sub(self.padding)
            .filter(|&h| h < len)
    }
}

/// A plane of H×W with a zero border of `padding` on every side, row-major in (H + 2p)×(W + 2p):
/// what a window reads at stride 1 with no bounds to check (conv2d's im2col and col2im, the
/// depthwise passes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Border {
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) padding: usize,
}

impl Border {
    /// W + 2p: the distance between rows of a bordered plane.
    pub(crate) fn padded_width(self) -> usize {
        self.width + 2 * self.padding
    }

    /// (H + 2p)·(W + 2p) values.
    pub(crate) fn padded_len(self) -> usize {
        (self.height + 2 * self.padding) * self.padded_width()
    }

    /// Copies a plane into the interior of a bordered one (whose border stays 0).
    pub(crate) fn pad<T: Copy>(self, plane: &[T], padded: &mut [T]) {
        let (p, padded_width) = (self.padding, self.padded_width());
        for (r, row) in plane.chunks_exact(self.width.max(1)).enumerate() {
            padded[(r + p) * padded_width + p..][..self.width].copy_from_slice(row);
        }
    }

    /// Writes the interior of a bordered plane into a plane, as `write` says (`+=` or `=`).
    pub(crate) fn write_interior<T: Element>(
        self,
        padded: &[T],
        plane: &mut [T],
        write: GradWrite,
    ) {
        let (p, padded_width) = (self.padding, self.padded_width());
        for (r, row) in plane.chunks_exact_mut(self.width.max(1)).enumerate() {
            let source = &padded[(r + p) * padded_width + p..][..self.width];
            match write {
                GradWrite::Accumulate => row.iter_mut().zip(source).for_each(|(x, &s)| *x += s),
                GradWrite::Overwrite => row.copy_from_slice(source),
            }
        }
    }
}

/// The output shape (N, C, H′, W′) of a `window`×`window` pooling every `stride` pixels.
pub(crate) fn pooled_shape(
    op: &'static str,
    x: &[usize],
    window: usize,
    stride: usize,
) -> Result<[usize; 4]> {
    let [batch, channels, height, width] = check_image(op, x)?;
    let out_height = pooled_len(op, height, window, stride, x)?;
    let out_width = pooled_len(op, width, window, stride, x)?;
    Ok([batch, channels, out_height, out_width])
}

/// The index form of a `window`×`window` pool every `stride` pixels (the pools' reference
/// passes): for every output element [n, c, i, j] of `out`, in row-major order, `visit` gets its
/// index and the input indices its window covers, row by row.
pub(crate) fn each_window(
    out: [usize; 4],
    window: usize,
    stride: usize,
    mut visit: impl FnMut([usize; 4], &[[usize; 4]]),
) {
    let mut cells = Vec::with_capacity(window * window);
    for (n, c, i, j) in ndarray::indices(out) {
        cells.clear();
        for a in 0..window {
            for b in 0..window {
                cells.push([n, c, i * stride + a, j * stride + b]);
            }
        }
        visit([n, c, i, j], &cells);
    }
}

/// Output length of a pooling window sweep along one axis: ⌊(len − window) / stride⌋ + 1.
/// Checks window and stride first, so the subtraction cannot underflow.
pub(crate) fn pooled_len(
    op: &'static str,
    len: usize,
    window: usize,
    stride: usize,
    shape: &[usize],
) -> Result<usize> {
    if window == 0 || stride == 0 {
        return Err(Error::invalid_config(
            op,
            format!("window ({window}) and stride ({stride}) must be at least 1"),
        ));
    }
    if window > len {
        return Err(Error::invalid_shape(
            op,
            format!("window {window} is larger than the input's spatial size {len}"),
            shape,
        ));
    }
    Ok((len - window) / stride + 1)
}

/// Checks the gradient buffers of a layer's backward call: dy against the output shape `out`,
/// and each given gradient (dx, dweight, dbias) against x, the weight and (F1).
pub(crate) fn check_layer_gradients(
    op: &'static str,
    [x, weight, out, dy]: [&[usize]; 4],
    [dx, dweight, dbias]: [Option<&[usize]>; 3],
) -> Result<()> {
    check_same(op, "output gradient", out, dy)?;
    let expected = [x, weight, &out[1..2]];
    let names = ["input gradient", "weight gradient", "bias gradient"];
    for ((found, expected), name) in [dx, dweight, dbias].into_iter().zip(expected).zip(names) {
        if let Some(found) = found {
            check_same(op, name, expected, found)?;
        }
    }
    Ok(())
}

/// The shapes of the gradient buffers a backward call was given (dx, dweight, dbias).
pub(crate) fn grad_shapes<'a, T, A: Dimension, B: Dimension, C: Dimension>(
    dx: &'a Option<ArrayViewMut<T, A>>,
    dweight: &'a Option<ArrayViewMut<T, B>>,
    dbias: &'a Option<ArrayViewMut<T, C>>,
) -> [Option<&'a [usize]>; 3] {
    [
        dx.as_ref().map(|d| d.shape()),
        dweight.as_ref().map(|d| d.shape()),
        dbias.as_ref().map(|d| d.shape()),
    ]
}

/// Adds the op of `kind` with `attributes` reading `inputs` to `graph`, through its builder:
/// how a graph is rebuilt from its description (`describe.rs`). One line per op.
pub(crate) fn rebuild<T: Element>(
    graph: &mut Graph<T>,
    kind: &str,
    inputs: &[NodeId],
    attributes: &[(String, usize)],
) -> Result<NodeId> {
    let input = |i: usize| inputs.get(i).copied().ok_or_else(|| missing(kind, "input"));
    let attribute = |name: &str| {
        let found = attributes.iter().find(|(key, _)| key == name);
        found
            .map(|(_, value)| *value)
            .ok_or_else(|| missing(kind, name))
    };
    let bias = inputs.get(2).copied();
    match kind {
        "add" => graph.add(input(0)?, input(1)?),
        "avg_pool" => graph.avg_pool(input(0)?, attribute("window")?, attribute("stride")?),
        "batch_norm" => graph.batch_norm(input(0)?, input(1)?, input(2)?),
        "batch_norm+relu" => graph.batch_norm_relu(input(0)?, input(1)?, input(2)?),
        "batch_norm+relu6" => graph.batch_norm_relu6(input(0)?, input(1)?, input(2)?),
        "channel_shuffle" => graph.channel_shuffle(input(0)?, attribute("groups")?),
        "concat" => graph.concat(inputs),
        "conv1x1" => graph.conv1x1(input(0)?, input(1)?, bias),
        "conv1x1+relu" => graph.conv1x1_relu(input(0)?, input(1)?, bias),
        "conv2d" => {
            let [stride, padding] = [attribute("stride")?, attribute("padding")?];
            graph.conv2d(input(0)?, input(1)?, bias, stride, padding)
        }
        "depthwise" => {
            let [stride, padding] = [attribute("stride")?, attribute("padding")?];
            graph.depthwise(input(0)?, input(1)?, bias, stride, padding)
        }
        "flatten" => graph.flatten(input(0)?),
        "global_avg_pool" => graph.global_avg_pool(input(0)?),
        "global_max_pool" => graph.global_max_pool(input(0)?),
        "grouped_conv1x1" => {
            graph.grouped_conv1x1(input(0)?, input(1)?, bias, attribute("groups")?)
        }
        "linear" => graph.linear(input(0)?, input(1)?, bias),
        "max_pool" => graph.max_pool(input(0)?, attribute("window")?, attribute("stride")?),
        "max_pool+relu" => {
            graph.max_pool_relu(input(0)?, attribute("window")?, attribute("stride")?)
        }
        "max_pool+relu6" => {
            graph.max_pool_relu6(input(0)?, attribute("window")?, attribute("stride")?)
        }
        "mse" => graph.mse(input(0)?, input(1)?),
        "relu" => graph.relu(input(0)?),
        "relu6" => graph.relu6(input(0)?),
        "softmax_cross_entropy" => graph.softmax_cross_entropy(input(0)?),
        other => Err(Error::invalid_config(
            "describe",
            format!("unknown op kind {:?}", crate::error::printable(other)),
        )),
    }
}

fn missing(kind: &str, what: &str) -> Error {
    Error::invalid_config("describe", format!("a {kind} node needs its {what}"))
}

/// A layer's operands in its forward pass: x, the weight and the optional bias with the
/// dimensions the op expects, and its output buffer, sized by the op's `output_shape`.
pub(crate) struct LayerForward<'p, T, DX, DW, DY> {
    pub(crate) x: ArrayView<'p, T, DX>,
    pub(crate) weight: ArrayView<'p, T, DW>,
    pub(crate) bias: Option<ArrayView1<'p, T>>,
    pub(crate) y: ArrayViewMut<'p, T, DY>,
}

/// Reads inputs 0, 1 and (if given) 2 of a layer, and sizes its output by `output_shape(x,
/// weight, bias)`.
pub(crate) fn layer_forward<
    'p,
    T: Element,
    DX: Dimension,
    DW: Dimension,
    DY: Dimension,
    S: AsRef<[usize]>,
>(
    op: &'static str,
    pass: &'p mut Forward<'_, T>,
    output_shape: impl FnOnce(&[usize], &[usize], Option<&[usize]>) -> Result<S>,
) -> Result<LayerForward<'p, T, DX, DW, DY>> {
    let inputs = pass.inputs;
    let (x, weight, bias) = (inputs.get(0), inputs.get(1), inputs.optional(2));
    let shape = output_shape(x.shape(), weight.shape(), bias.as_ref().map(|b| b.shape()))?;
    Ok(LayerForward {
        x: dims(op, x)?,
        weight: dims(op, weight)?,
        bias: bias.map(|b| dims(op, b)).transpose()?,
        y: dims_mut(op, pass.output(shape.as_ref())?)?,
    })
}

/// A layer's operands in its backward pass: x and its gradient (with how to write it), the
/// weight and its gradient, the bias's gradient; parameter gradients ready to accumulate into.
pub(crate) struct LayerGradients<'p, T, DX, DW> {
    pub(crate) x: ArrayView<'p, T, DX>,
    pub(crate) dx: Option<(ArrayViewMut<'p, T, DX>, GradWrite)>,
    pub(crate) weight: ArrayView<'p, T, DW>,
    pub(crate) dweight: Option<ArrayViewMut<'p, T, DW>>,
    pub(crate) dbias: Option<ArrayViewMut1<'p, T>>,
}

/// Opens a layer's input, weight and bias ports.
pub(crate) fn layer_gradients<'p, T: Element, DX: Dimension, DW: Dimension>(
    op: &'static str,
    [x, weight, bias]: [Port<'p, T>; 3],
) -> Result<LayerGradients<'p, T, DX, DW>> {
    let dx = x
        .grad
        .map(|(dx, write)| dims_mut(op, dx).map(|dx| (dx, write)));
    let (weight, dweight) = accumulating(op, weight)?;
    let (_, dbias) = accumulating(op, bias)?;
    Ok(LayerGradients {
        x: dims(op, x.value)?,
        dx: dx.transpose()?,
        weight,
        dweight,
        dbias,
    })
}

/// One term of a K×K convolution's index form, `y[n,o,i,j] += W[o,k,a,b]·x[n,c,h,w]`, where
/// (h, w) = (i·s + a − p, j·s + b − p) is inside the image; k is the weight's channel index.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Term {
    pub(crate) n: usize,
    pub(crate) o: usize,
    pub(crate) i: usize,
    pub(crate) j: usize,
    pub(crate) c: usize,
    pub(crate) k: usize,
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

/// Every term of a K×K convolution's index form, by plain loops (the reference passes'
/// specification). `reads(o)` gives the input channels output channel o mixes, each with the
/// weight channel that scales it: every channel c with k = c (conv2d), or its own alone with
/// k = 0 (depthwise). Terms that would read the zero padding are skipped.
pub(crate) fn each_term(
    x: &[usize],
    out: &[usize],
    kernel: usize,
    window: Window,
    reads: impl Fn(usize) -> Vec<(usize, usize)>,
    mut visit: impl FnMut(Term),
) {
    let s = window.stride;
    // The unpadded position of padded position v along an axis of `len`, if inside.
    let inside = |v: usize, len: usize| v.checked_sub(window.padding).filter(|&v| v < len);
    for n in 0..out[0] {
        for o in 0..out[1] {
            let channels = reads(o);
            for i in 0..out[2] {
                for j in 0..out[3] {
                    for &(c, k) in &channels {
                        for a in 0..kernel {
                            for b in 0..kernel {
                                if let (Some(h), Some(w)) =
                                    (inside(i * s + a, x[2]), inside(j * s + b, x[3]))
                                {
                                    visit(Term {
                                        n,
                                        o,
                                        i,
                                        j,
                                        c,
                                        k,
                                        a,
                                        b,
                                        h,
                                        w,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The reference forward pass of a K×K convolution: y = b, then every term of the index form
/// ([`each_term`]) added.
pub(crate) fn window_forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    bias: Option<ArrayView1<T>>,
    window: Window,
    mut y: ArrayViewMut4<T>,
    reads: impl Fn(usize) -> Vec<(usize, usize)>,
) {
    for ((_, o, _, _), y) in y.indexed_iter_mut() {
        *y = bias.as_ref().map_or(T::zero(), |b| b[o]);
    }
    let out = y.shape().to_vec();
    each_term(x.shape(), &out, weight.shape()[2], window, reads, |t| {
        y[[t.n, t.o, t.i, t.j]] += weight[[t.o, t.k, t.a, t.b]] * x[[t.n, t.c, t.h, t.w]];
    });
}

/// The reference backward pass of a K×K convolution, the index form differentiated term by
/// term: each term W·x sends g = dy[n,o,i,j] to the weight (g·x) and to the input (g·W), and
/// db[o] sums g.
#[allow(clippy::too_many_arguments)]
pub(crate) fn window_backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    window: Window,
    dy: ArrayView4<T>,
    mut dx: Option<ArrayViewMut4<T>>,
    mut dweight: Option<ArrayViewMut4<T>>,
    mut dbias: Option<ArrayViewMut1<T>>,
    reads: impl Fn(usize) -> Vec<(usize, usize)>,
) {
    if let Some(dbias) = dbias.as_mut() {
        for ((_, o, _, _), &g) in dy.indexed_iter() {
            dbias[o] += g;
        }
    }
    each_term(
        x.shape(),
        dy.shape(),
        weight.shape()[2],
        window,
        reads,
        |t| {
            let g = dy[[t.n, t.o, t.i, t.j]];
            if let Some(dweight) = dweight.as_mut() {
                dweight[[t.o, t.k, t.a, t.b]] += g * x[[t.n, t.c, t.h, t.w]];
            }
            if let Some(dx) = dx.as_mut() {
                dx[[t.n, t.c, t.h, t.w]] += g * weight[[t.o, t.k, t.a, t.b]];
            }
        },
    );
}

/// The backward function of a K×K convolution (conv2d, depthwise): x, the weight, the window,
/// dy, and the gradient buffers dx, dW, db it adds into (a `None` one is skipped).
pub(crate) type WindowBackward<T> = fn(
    ArrayView4<T>,
    ArrayView4<T>,
    Window,
    ArrayView4<T>,
    Option<ArrayViewMut4<T>>,
    Option<ArrayViewMut4<T>>,
    Option<ArrayViewMut1<T>>,
) -> Result<()>;

/// A K×K convolution's backward pass on the tape: its ports opened as views, dx made ready to
/// accumulate into, then `backward`.
pub(crate) fn window_backward<T: Element>(
    op: &'static str,
    pass: Backward<'_, T>,
    window: Window,
    backward: WindowBackward<T>,
) -> Result<()> {
    let Backward { dy, mut inputs, .. } = pass;
    let layer = layer_gradients(op, inputs.ports::<3>()?)?;
    let dx = accumulating_dx(layer.dx)?;
    let dy = dims(op, dy.view())?;
    let (x, weight) = (layer.x, layer.weight);
    backward(x, weight, window, dy, dx, layer.dweight, layer.dbias)
}

/// dx ready to accumulate into, for backward passes that only add: zeroed first if this pass
/// has not written it yet.
pub(crate) fn accumulating_dx<'p, T: Element, D: Dimension>(
    dx: Option<(ArrayViewMut<'p, T, D>, GradWrite)>,
) -> Result<Option<ArrayViewMut<'p, T, D>>> {
    match dx {
        Some((mut dx, GradWrite::Overwrite)) => {
            crate::parallel::fill(dx.view_mut(), T::zero())?;
            Ok(Some(dx))
        }
        other => Ok(other.map(|(dx, _)| dx)),
    }
}
