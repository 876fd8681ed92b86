//! # Depthwise: a K×K convolution of every channel on its own
//!
//! ## What
//! Each input channel is convolved with its own K×K filters (m of them, the channel multiplier)
//! and never mixed with another channel: groups = channels, in PyTorch's terms. It is the
//! spatial half of MobileNet's depthwise-separable convolution; the *pointwise* 1×1 convolution
//! after it does all the channel mixing.
//!
//! ## Shapes
//! x (N, C, H, W), weight (C·m, 1, K, K), bias (C·m) → y (N, C·m, H′, W′) with
//! H′ = ⌊(H + 2p − K)/s⌋ + 1, W′ likewise (stride s, zero padding p on every side). Output
//! channel o reads input channel c(o) = ⌊o/m⌋.
//!
//! ## Derivation
//! Index form, with the input zero outside the image:
//! ```text
//! y[n,o,i,j] = Σ_{a,b} W[o,0,a,b]·x[n, c(o), i·s + a − p, j·s + b − p] + b[o]
//! ```
//! Differentiating term by term:
//! ```text
//! ∂L/∂W[o,0,a,b] = Σ_{n,i,j} dy[n,o,i,j]·x[n, c(o), i·s + a − p, j·s + b − p]
//! ∂L/∂x[n,c,h,w] = Σ_{o: c(o) = c} Σ_{(i,j,a,b): i·s + a − p = h, j·s + b − p = w} dy[n,o,i,j]·W[o,0,a,b]
//! ∂L/∂b[o]       = Σ_{n,i,j} dy[n,o,i,j]
//! ```
//! Each output pixel sends its gradient back to the K×K inputs it read, weighted as it read them.
//!
//! ## Cost
//! Forward N·C·m·H′·W′·K² multiply-adds, backward twice that (dW and dx) plus N·C·m·H′·W′ for
//! db: K²/C_out of a full K×K convolution's. No GEMM: every output reads K² inputs, too few
//! to fill a matrix product, so the work is memory-bound loops.

pub use super::Window;
use super::{
    check_image, check_ndim, check_same, in_standard_layout, layer_forward, shape_text, sum_pairs,
    window_backward, window_backward_reference, window_forward_reference, Border, LayerForward,
};
use crate::cost::Cost;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use crate::parallel::{in_parts, Along};
use ndarray::{
    s, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4, Axis,
};
use std::ops::Range;

const OP: &str = "depthwise";

/// The node on the tape: its stride and padding; nothing saved beyond x and the weight.
#[derive(Clone, Debug)]
pub struct Depthwise {
    window: Window,
}

impl<T: Element> Graph<T> {
    /// A depthwise K×K convolution of `input` (N, C, H, W) by `weight` (C·m, 1, K, K), with an
    /// optional `bias` (C·m), `stride` and zero `padding` on every side.
    pub fn depthwise(
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
        let op = Depthwise {
            window: Window { stride, padding },
        };
        self.push_layer(op, [input, weight], bias, |w, b| {
            check_weights(w, b).map(drop)
        })
    }
}

impl<T: Element> Operation<T> for Depthwise {
    fn kind(&self) -> &'static str {
        OP
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let window = self.window;
        let shape = |x: &[usize], w: &[usize], _: Option<&[usize]>| output_shape(x, w, window);
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
        let (weight, kernel) = (inputs[1], inputs[1][2] * inputs[1][3]);
        let macs = (output.iter().product::<usize>() * kernel) as u64;
        Cost {
            params: weight.iter().product::<usize>() + inputs.get(2).map_or(0, |b| b[0]),
            forward_macs: macs,
            backward_macs: if input_grad { 2 * macs } else { macs },
            gemms: Vec::new(),
        }
    }
}

/// Checks weight (C·m, 1, K, K) with a square, non-empty kernel and bias (C·m); returns K.
fn check_weights(weight: &[usize], bias: Option<&[usize]>) -> Result<usize> {
    check_ndim(OP, "weight (C·m, 1, K, K)", weight, 4)?;
    if weight[0] == 0 || weight[1] != 1 || weight[2] == 0 || weight[2] != weight[3] {
        return Err(Error::invalid_shape(
            OP,
            "weight must be (C·m, 1, K, K) with a square kernel",
            weight,
        ));
    }
    if let Some(bias) = bias {
        check_same(OP, "bias", &weight[..1], bias)?;
    }
    Ok(weight[2])
}

/// Checks x (N, C, H, W) against the weight and window; returns (N, C·m, H′, W′).
pub fn output_shape(x: &[usize], weight: &[usize], window: Window) -> Result<[usize; 4]> {
    let [batch, channels, height, width] = check_image(OP, x)?;
    let kernel = check_weights(weight, None)?;
    if !weight[0].is_multiple_of(channels) {
        return Err(Error::shape_mismatch(
            OP,
            "weight rows",
            format!("a multiple of the {channels} input channels"),
            shape_text(weight),
        ));
    }
    let out = |len: usize| window.out_len(len, kernel);
    match (out(height), out(width)) {
        (Some(out_height), Some(out_width)) => Ok([batch, weight[0], out_height, out_width]),
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

// ---------------------------------------------------------------- forward and backward
//
// Every pass works on planes padded with p zeros on every side and stored flat, so no loop
// checks bounds: output pixel (i, j) at kernel tap (a, b) reads padded pixel
// (i·s + a, j·s + b). The outputs are computed on a work grid: at stride 1 its rows are as far
// apart as the padded input's (W + 2p), so one tap is a single shift of the whole plane,
// `work[k] += W[a,b]·padded[k + a·(W + 2p) + b]` for every k, one long vectorised loop (the
// K − 1 extra columns of each work row are computed and dropped). At stride s > 1 each
// output row is its own run, reading every s-th input.

/// Forward: `y[n,o,i,j] = Σ_{a,b} W[o,0,a,b]·x[n, ⌊o/m⌋, i·s + a − p, j·s + b − p] + b[o]`;
/// the samples split between the threads.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    bias: Option<ArrayView1<T>>,
    window: Window,
    mut y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), window)?;
    check_same(OP, "output", &out, y.shape())?;
    if let Some(bias) = &bias {
        check_same(OP, "bias", &out[1..2], bias.shape())?;
    }
    let plane = Plane::new(x.shape(), &out, window);
    let multiplier = out[1] / x.shape()[1];
    let (x, weight) = (x.as_standard_layout(), weight.as_standard_layout());
    in_standard_layout(y.view_mut(), |y| {
        in_parts((Along(x.view(), Axis(0)), Along(y, Axis(0))), &|(
            Along(x, _),
            Along(mut y, _),
        )| {
            let (mut padded, mut work) = plane.scratch();
            for (x_n, mut y_n) in x.outer_iter().zip(y.outer_iter_mut()) {
                for (o, mut y_plane) in y_n.outer_iter_mut().enumerate() {
                    if o % multiplier == 0 {
                        plane
                            .border()
                            .pad(flat(x_n.index_axis(Axis(0), o / multiplier)), &mut padded);
                    }
                    work.fill(bias.as_ref().map_or(T::zero(), |b| b[o]));
                    for ((a, b), &w) in weight.slice(s![o, 0, .., ..]).indexed_iter() {
                        plane.runs((a, b), |outputs, source| {
                            gather_axpy(&mut work[outputs], w, &padded[source..], window.stride)
                        });
                    }
                    plane.narrow(&work, flat_mut(&mut y_plane));
                }
            }
            Ok(())
        })
    })
}

/// Backward: accumulates dW, dx and db (whichever are given) as in the derivation; dW and db
/// sum over the samples, so their channels split between the threads, and dx's samples do.
pub fn backward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    window: Window,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut4<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), window)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    if let Some(dweight) = &dweight {
        check_same(OP, "weight gradient", weight.shape(), dweight.shape())?;
    }
    if let Some(dbias) = &dbias {
        check_same(OP, "bias gradient", &out[1..2], dbias.shape())?;
    }
    let plane = Plane::new(x.shape(), &out, window);
    let multiplier = out[1] / x.shape()[1];
    let (x, weight, dy) = (
        x.as_standard_layout(),
        weight.as_standard_layout(),
        dy.as_standard_layout(),
    );
    let parameters = (
        dweight.map(|d| Along(d, Axis(0))),
        dbias.map(|d| Along(d, Axis(0))),
    );
    in_parts((0..out[1], parameters), &|(
        channels,
        (mut dweight, mut dbias),
    )| {
        // The work grid's extra columns are never written here: they stay 0 and add nothing.
        let (mut padded, mut work) = plane.scratch();
        for (i, o) in channels.enumerate() {
            for (x_n, dy_n) in x.outer_iter().zip(dy.outer_iter()) {
                let grad = flat(dy_n.index_axis(Axis(0), o));
                if let Some(Along(dbias, _)) = dbias.as_mut() {
                    dbias[i] += ArrayView1::from(grad).sum();
                }
                let Some(Along(dweight, _)) = dweight.as_mut() else {
                    continue;
                };
                plane
                    .border()
                    .pad(flat(x_n.index_axis(Axis(0), o / multiplier)), &mut padded);
                plane.widen(grad, &mut work);
                for ((a, b), dw) in dweight.slice_mut(s![i, 0, .., ..]).indexed_iter_mut() {
                    // dW[o,0,a,b] += Σ_{i,j} dy[i,j]·x[source(i,j)]
                    plane.runs((a, b), |outputs, source| {
                        *dw += dot(&work[outputs], &padded[source..], window.stride)
                    });
                }
            }
        }
        Ok(())
    })?;
    let Some(mut dx) = dx else { return Ok(()) };
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    in_standard_layout(dx.view_mut(), |dx| {
        in_parts(
            (Along(dy.view(), Axis(0)), Along(dx, Axis(0))),
            &|(Along(dy, _), Along(mut dx, _))| {
                // Here `padded` collects the padded plane's gradient, border included.
                let (mut padded, mut work) = plane.scratch();
                for (dy_n, mut dx_n) in dy.outer_iter().zip(dx.outer_iter_mut()) {
                    for (c, mut dx_plane) in dx_n.outer_iter_mut().enumerate() {
                        for o in c * multiplier..(c + 1) * multiplier {
                            plane.widen(flat(dy_n.index_axis(Axis(0), o)), &mut work);
                            for ((a, b), &w) in weight.slice(s![o, 0, .., ..]).indexed_iter() {
                                // dx[source(i,j)] += W[o,0,a,b]·dy[i,j]
                                plane.runs((a, b), |outputs, source| {
                                    let target = &mut padded[source..];
                                    scatter_axpy(target, w, &work[outputs], window.stride)
                                });
                            }
                        }
                        plane
                            .border()
                            .add_interior(&padded, flat_mut(&mut dx_plane));
                        padded.fill(T::zero());
                    }
                }
                Ok(())
            },
        )
    })
}

/// One (H, W) plane and its (H′, W′) output, in the padded flat form of the passes above.
#[derive(Clone, Copy, Debug)]
struct Plane {
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    window: Window,
}

impl Plane {
    fn new(x: &[usize], out: &[usize], window: Window) -> Self {
        Plane {
            height: x[2],
            width: x[3],
            out_height: out[2],
            out_width: out[3],
            window,
        }
    }

    /// The input plane with its zero border.
    fn border(&self) -> Border {
        Border {
            height: self.height,
            width: self.width,
            padding: self.window.padding,
        }
    }

    fn padded_width(&self) -> usize {
        self.border().padded_width()
    }

    /// The distance between rows of the work grid: the padded width at stride 1 (so that a
    /// tap is one shift of the whole plane), W′ otherwise.
    fn work_width(&self) -> usize {
        match self.window.stride {
            1 => self.padded_width(),
            _ => self.out_width,
        }
    }

    /// A zeroed padded plane and a zeroed work grid.
    fn scratch<T: Element>(&self) -> (Vec<T>, Vec<T>) {
        let padded = self.border().padded_len();
        let work = (self.out_height.max(1) - 1) * self.work_width() + self.out_width;
        (vec![T::zero(); padded], vec![T::zero(); work])
    }

    /// For kernel tap (a, b): every run of outputs that read it, as `visit(the run in the
    /// work grid, its first source in the padded plane)`; sources are `stride` apart.
    fn runs(&self, (a, b): (usize, usize), mut visit: impl FnMut(Range<usize>, usize)) {
        let (padded_width, stride) = (self.padded_width(), self.window.stride);
        let tap = a * padded_width + b;
        if stride == 1 {
            return visit(
                0..(self.out_height.max(1) - 1) * padded_width + self.out_width,
                tap,
            );
        }
        for i in 0..self.out_height {
            let start = i * self.out_width;
            visit(
                start..start + self.out_width,
                i * stride * padded_width + tap,
            );
        }
    }

    /// Copies an output plane onto the work grid (its extra columns untouched).
    fn widen<T: Element>(&self, plane: &[T], work: &mut [T]) {
        let step = self.work_width();
        for (i, row) in plane.chunks_exact(self.out_width.max(1)).enumerate() {
            work[i * step..][..self.out_width].copy_from_slice(row);
        }
    }

    /// Copies the work grid's outputs into an output plane.
    fn narrow<T: Element>(&self, work: &[T], plane: &mut [T]) {
        let step = self.work_width();
        for (i, row) in plane.chunks_exact_mut(self.out_width.max(1)).enumerate() {
            row.copy_from_slice(&work[i * step..][..self.out_width]);
        }
    }
}

/// y[k] += w·x[k·stride] along a segment.
fn gather_axpy<T: Element>(y: &mut [T], w: T, x: &[T], stride: usize) {
    if stride == 1 {
        // Two slices of one length: the compiler vectorises this loop.
        let x = &x[..y.len()];
        y.iter_mut().zip(x).for_each(|(y, &x)| *y += w * x);
    } else {
        let x = x.iter().step_by(stride);
        y.iter_mut().zip(x).for_each(|(y, &x)| *y += w * x);
    }
}

/// dx[k·stride] += w·g[k] along a segment.
fn scatter_axpy<T: Element>(dx: &mut [T], w: T, g: &[T], stride: usize) {
    if stride == 1 {
        let dx = &mut dx[..g.len()];
        dx.iter_mut().zip(g).for_each(|(dx, &g)| *dx += w * g);
    } else {
        let dx = dx.iter_mut().step_by(stride);
        dx.zip(g).for_each(|(dx, &g)| *dx += w * g);
    }
}

/// Σₖ g[k]·x[k·stride] along a segment.
fn dot<T: Element>(g: &[T], x: &[T], stride: usize) -> T {
    if stride == 1 {
        sum_pairs(g.into(), x[..g.len()].into(), |g, x| g * x)
    } else {
        let x = x.iter().step_by(stride);
        g.iter().zip(x).fold(T::zero(), |sum, (&g, &x)| sum + g * x)
    }
}

/// A plane of a standard-layout tensor as one slice.
fn flat<T>(plane: ArrayView2<'_, T>) -> &[T] {
    let Some(flat) = plane.to_slice() else {
        unreachable!("planes of standard-layout tensors are contiguous")
    };
    flat
}

fn flat_mut<'a, T>(plane: &'a mut ArrayViewMut2<T>) -> &'a mut [T] {
    let Some(flat) = plane.as_slice_mut() else {
        unreachable!("planes of standard-layout tensors are contiguous")
    };
    flat
}

// ---------------------------------------------------------------- reference loops

/// The specification: every term of the index form, summed directly; output channel o reads
/// input channel ⌊o/m⌋ alone, scaled by W[o, 0, ·, ·].
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    bias: Option<ArrayView1<T>>,
    window: Window,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), window)?;
    check_same(OP, "output", &out, y.shape())?;
    let multiplier = out[1] / x.shape()[1];
    window_forward_reference(x, weight, bias, window, y, |o| vec![(o / multiplier, 0)]);
    Ok(())
}

/// The specification of the backward pass, term by term from the index form.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView4<T>,
    window: Window,
    dy: ArrayView4<T>,
    dx: ArrayViewMut4<T>,
    dweight: ArrayViewMut4<T>,
    dbias: ArrayViewMut1<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), weight.shape(), window)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    check_same(OP, "weight gradient", weight.shape(), dweight.shape())?;
    check_same(OP, "bias gradient", &out[1..2], dbias.shape())?;
    let multiplier = out[1] / x.shape()[1];
    let (dx, dweight, dbias) = (Some(dx), Some(dweight), Some(dbias));
    let reads = |o| vec![(o / multiplier, 0)];
    window_backward_reference(x, weight, window, dy, dx, dweight, dbias, reads);
    Ok(())
}
