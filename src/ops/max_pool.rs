//! # MaxPool: shrinks H and W by keeping the largest value of each window
//!
//! ## What
//! Each output pixel is the maximum over a `window`×`window` patch of its channel, patches taken
//! every `stride` pixels. Channels are never mixed: pooling changes H and W, never C.
//!
//! ## Shapes
//! x (N, C, H, W) → y (N, C, H′, W′) with H′ = ⌊(H − k)/s⌋ + 1, W′ = ⌊(W − k)/s⌋ + 1.
//! Saved for backward: for each output element, the position (h·W + w) of its arg-max in its
//! channel plane, (N·C·H′·W′) 32-bit integers; the fused node below also reads its output y.
//!
//! ## Derivation
//! ```text
//! y[n,c,i,j] = x[n,c,h*,w*]   where (h*, w*) = arg max over the window at (i·s, j·s)
//! ∂L/∂x[n,c,h,w] = Σ over windows whose arg-max is (h,w) of dy[n,c,i,j]
//! ```
//! The whole gradient of a window goes to one input, its arg-max. **Tie rule:** the first
//! maximum in row-major order within the window wins (a later equal value does not replace it).
//! With overlapping windows (s < k) one input can be the arg-max of several windows and
//! receives the sum. Gradient checks keep windows free of ties, where the max is not
//! differentiable.
//!
//! ## Fused ReLU: pool first
//! A ReLU (or ReLU6) is monotone, so it commutes with a maximum: `max(relu(z)) = relu(max(z))`
//! over any window. The tape's `max_pool+relu` node ([`Graph::max_pool_relu`]) therefore pools
//! the pre-activation z and applies the ReLU to the pooled values, a quarter of them for a 2×2
//! window, as it stores them:
//!
//! ```text
//! y[n,c,i,j] = relu(z[n,c,h*,w*])                 (h*, w*) = arg max of z over the window
//! ∂L/∂z[n,c,h*,w*] += dy[n,c,i,j]·1[y[n,c,i,j] > 0]       (and < 6 for ReLU6)
//! ```
//! The values are those of `max_pool(relu(z))`, and so are the gradients: where the window's
//! maximum is positive both pick the same arg-max, and where it is not both pass nothing.
//! Written the usual way round, the ReLU runs on every element of z, and its backward reads
//! z-sized tensors twice (the mask y and the gradient); after the pool both are pooled-sized.
//!
//! ## Cost
//! Forward k² compares per output element; backward one add per output element.

use super::{check_image, check_same, dims, dims_mut, each_window, pooled_shape, GradWrite};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::relu::Relu;
use crate::ops::Operation;
use crate::parallel::{in_parts, Along, Items};
use ndarray::{ArrayView4, ArrayViewMut4, Axis};

const OP: &str = "max_pool";

/// Where a window's maximum is in its channel plane (h·W + w). 32 bits, not 64: the positions
/// are written in the forward pass and read in the backward pass, and half the bytes is half
/// that memory traffic.
pub type Position = u32;

/// The node on the tape: its window and stride, the ReLU applied to the pooled values if
/// any, and the arg-max of every output value of the last forward pass, one run of positions
/// per sample.
#[derive(Clone, Debug)]
pub struct MaxPool {
    window: usize,
    stride: usize,
    activation: Option<Relu>,
    argmax: Vec<Position>,
}

impl<T: Element> Graph<T> {
    /// Max pooling with a `window`×`window` window every `stride` pixels.
    pub fn max_pool(&mut self, input: NodeId, window: usize, stride: usize) -> Result<NodeId> {
        self.max_pool_with(input, window, stride, None)
    }

    /// The fused relu(max_pool(input)): the same values and gradients as
    /// `max_pool(relu(input))`, with the ReLU on the pooled values (see the module notes).
    pub fn max_pool_relu(&mut self, input: NodeId, window: usize, stride: usize) -> Result<NodeId> {
        self.max_pool_with(input, window, stride, Some(Relu::Plain))
    }

    /// The fused relu6(max_pool(input)), as [`Graph::max_pool_relu`] with a ReLU6.
    pub fn max_pool_relu6(
        &mut self,
        input: NodeId,
        window: usize,
        stride: usize,
    ) -> Result<NodeId> {
        self.max_pool_with(input, window, stride, Some(Relu::Six))
    }

    fn max_pool_with(
        &mut self,
        input: NodeId,
        window: usize,
        stride: usize,
        activation: Option<Relu>,
    ) -> Result<NodeId> {
        output_shape(&[1, 1, window.max(1), window.max(1)], window, stride)?;
        let op = MaxPool {
            window,
            stride,
            activation,
            argmax: Vec::new(),
        };
        self.push_op(op, &[input])
    }
}

impl<T: Element> Operation<T> for MaxPool {
    fn kind(&self) -> &'static str {
        match self.activation {
            None => OP,
            Some(Relu::Plain) => "max_pool+relu",
            Some(Relu::Six) => "max_pool+relu6",
        }
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let x = dims(OP, pass.inputs.get(0))?;
        let shape = output_shape(x.shape(), self.window, self.stride)?;
        let y = dims_mut(OP, pass.output(&shape)?)?;
        self.argmax.resize(y.len(), 0);
        pool(
            x,
            self.window,
            self.stride,
            self.activation,
            y,
            &mut self.argmax,
        )
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let rows = pass.rows();
        let Backward { y, dy, mut inputs } = pass;
        let Some((dx, write)) = inputs.port(0)?.grad else {
            return Ok(());
        };
        let dy = dims(OP, dy.view())?;
        // One arg-max per output value: the rows' are a contiguous run of them.
        let per_sample = dy.len() / dy.shape()[0].max(1);
        let rows = rows.map_or(0..self.argmax.len(), |r| {
            r.start * per_sample..r.end * per_sample
        });
        let argmax = self.argmax.get(rows).unwrap_or_default();
        let gate = match self.activation {
            Some(activation) => Some((activation, dims(OP, y)?)),
            None => None,
        };
        scatter(dy, gate, argmax, dims_mut(OP, dx)?, write)
    }

    fn attributes(&self) -> Vec<(&'static str, usize)> {
        vec![("window", self.window), ("stride", self.stride)]
    }

    fn saved_elements(&self) -> usize {
        self.argmax.capacity()
    }
}

/// Checks the input and the pool settings and returns the output shape.
pub fn output_shape(x: &[usize], window: usize, stride: usize) -> Result<[usize; 4]> {
    check_positions(OP, x)?;
    pooled_shape(OP, x, window, stride)
}

/// Checks that x is (N, C, H, W) and that a [`Position`] can name every pixel of a plane.
pub(crate) fn check_positions(op: &'static str, x: &[usize]) -> Result<[usize; 4]> {
    let shape = check_image(op, x)?;
    if shape[2]
        .checked_mul(shape[3])
        .is_none_or(|plane| plane > Position::MAX as usize)
    {
        return Err(Error::invalid_shape(
            op,
            "a channel plane has more pixels than a u32 position can name",
            x,
        ));
    }
    Ok(shape)
}

// ---------------------------------------------------------------- forward and backward

/// Forward: y = window maximum; `argmax` receives the winner's position (h·W + w) in its
/// plane. Row-major tensors: one plane (H×W) after another, each window read straight from
/// its slice; the samples split between the threads.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    y: ArrayViewMut4<T>,
    argmax: &mut [Position],
) -> Result<()> {
    pool(x, window, stride, None, y, argmax)
}

/// Forward of the fused node: y = `activation`(window maximum), the arg-max as in
/// [`forward`].
pub fn forward_activated<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    activation: Relu,
    y: ArrayViewMut4<T>,
    argmax: &mut [Position],
) -> Result<()> {
    pool(x, window, stride, Some(activation), y, argmax)
}

fn pool<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    activation: Option<Relu>,
    y: ArrayViewMut4<T>,
    argmax: &mut [Position],
) -> Result<()> {
    let [_, channels, out_height, out_width] = output_shape(x.shape(), window, stride)?;
    check_same(
        OP,
        "output",
        &[x.shape()[0], channels, out_height, out_width],
        y.shape(),
    )?;
    check_argmax(y.len(), argmax.len())?;
    let [height, width] = [x.shape()[2], x.shape()[3]];
    let out_len = out_height * out_width;
    let parts = (
        Along(x, Axis(0)),
        Along(y, Axis(0)),
        Items(argmax, channels * out_len),
    );
    in_parts(parts, &|(
        Along(x, _),
        Along(mut y, _),
        Items(argmax, _),
    )| {
        let (x, y) = (
            row_major(x.as_slice(), x.shape())?,
            row_major(y.as_slice_mut(), &[])?,
        );
        let planes = x
            .chunks_exact(height * width)
            .zip(y.chunks_exact_mut(out_len));
        for ((plane, y_plane), winners) in planes.zip(argmax.chunks_exact_mut(out_len)) {
            if window == 2 && stride == 2 {
                if !avx2::forward_plane_2x2(plane, width, y_plane, out_width, winners) {
                    forward_plane_2x2(plane, width, y_plane, out_width, winners);
                }
            } else {
                plane_maxima(plane, width, window, stride, y_plane, out_width, winners);
            }
            // The plane's outputs are still in L1: the activation costs no pass over memory.
            // Each activation compiled into its own loop (a runtime test per value is slow).
            match activation {
                Some(Relu::Plain) => y_plane.iter_mut().for_each(|y| *y = Relu::Plain.value(*y)),
                Some(Relu::Six) => y_plane.iter_mut().for_each(|y| *y = Relu::Six.value(*y)),
                None => {}
            }
        }
        Ok(())
    })
}

/// Any window and stride on one plane: each window's cells in row-major order.
fn plane_maxima<T: Element>(
    plane: &[T],
    width: usize,
    window: usize,
    stride: usize,
    y_plane: &mut [T],
    out_width: usize,
    winners: &mut [Position],
) {
    for (o, (y, winner)) in y_plane.iter_mut().zip(winners.iter_mut()).enumerate() {
        let (i, j) = (o / out_width, o % out_width);
        let corner = i * stride * width + j * stride;
        let mut best = corner;
        for row in (corner..corner + window * width).step_by(width) {
            for position in row..row + window {
                if plane[position] > plane[best] {
                    best = position;
                }
            }
        }
        (*y, *winner) = (plane[best], best as Position);
    }
}

/// Backward: routes each dy to its window's arg-max, dx[arg-max] += dy.
pub fn backward<T: Element>(
    dy: ArrayView4<T>,
    argmax: &[Position],
    dx: ArrayViewMut4<T>,
) -> Result<()> {
    scatter(dy, None, argmax, dx, GradWrite::Accumulate)
}

/// Backward of the fused node: dx[arg-max] += dy where the output y (= `activation` of the
/// window maximum) lets a gradient through (0 < y, and y < 6 for ReLU6).
pub fn backward_activated<T: Element>(
    dy: ArrayView4<T>,
    y: ArrayView4<T>,
    activation: Relu,
    argmax: &[Position],
    dx: ArrayViewMut4<T>,
) -> Result<()> {
    check_same(OP, "output", dy.shape(), y.shape())?;
    scatter(dy, Some((activation, y)), argmax, dx, GradWrite::Accumulate)
}

// ---------------------------------------------------------------- reference loops

/// The specification's arg-max of a window: its cells in row-major order, the first maximum
/// kept (a later equal value does not replace it).
fn reference_argmax<T: Element>(x: &ArrayView4<T>, cells: &[[usize; 4]]) -> [usize; 4] {
    let first = cells[0];
    (cells.iter()).fold(
        first,
        |best, &cell| if x[cell] > x[best] { cell } else { best },
    )
}

/// The specification: the window maximum, first maximum wins. Returns the arg-max positions
/// it found, so the tests can compare them too.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<Vec<Position>> {
    let out = output_shape(x.shape(), window, stride)?;
    check_same(OP, "output", &out, y.shape())?;
    let width = x.shape()[3];
    let mut argmax = Vec::with_capacity(y.len());
    each_window(out, window, stride, |o, cells| {
        let best = reference_argmax(&x, cells);
        y[o] = x[best];
        let [_, _, h, w] = best;
        argmax.push((h * width + w) as Position);
    });
    Ok(argmax)
}

/// The specification of the backward pass, recomputing the arg-max from x.
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    dy: ArrayView4<T>,
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let out = output_shape(x.shape(), window, stride)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    each_window(out, window, stride, |o, cells| {
        dx[reference_argmax(&x, cells)] += dy[o];
    });
    Ok(())
}

// ---------------------------------------------------------------- speed variants and helpers

/// The common 2×2 / 2 window on one plane: two input rows at a time, four candidates per
/// output in row-major order (so the first maximum still wins), no inner loops.
fn forward_plane_2x2<T: Element>(
    plane: &[T],
    width: usize,
    y_plane: &mut [T],
    out_width: usize,
    winners: &mut [Position],
) {
    let rows = y_plane
        .chunks_exact_mut(out_width)
        .zip(winners.chunks_exact_mut(out_width));
    for (i, (y_row, winner_row)) in rows.enumerate() {
        let top = 2 * i * width;
        let (upper, lower) = (
            &plane[top..top + width],
            &plane[top + width..top + 2 * width],
        );
        for (j, (y, winner)) in y_row.iter_mut().zip(winner_row.iter_mut()).enumerate() {
            let left = 2 * j;
            let mut best = (upper[left], top + left);
            for candidate in [
                (upper[left + 1], top + left + 1),
                (lower[left], top + width + left),
                (lower[left + 1], top + width + left + 1),
            ] {
                if candidate.0 > best.0 {
                    best = candidate;
                }
            }
            (*y, *winner) = (best.0, best.1 as Position);
        }
    }
}

/// The 2×2 / 2 window eight outputs at a time, for f32 on CPUs with AVX2: the four candidates
/// of eight windows compared as vectors, the winner kept by blends instead of branches. W2's
/// pool (256 channels of 28×28 maps, batch 32) took 3.0 ms a step in [`forward_plane_2x2`],
/// 2.1 ms here, where the reads of x from memory set the pace.
mod avx2 {
    use super::Position;
    use crate::element::Element;

    /// [`super::forward_plane_2x2`], the same values and winners; false (nothing done) for
    /// other than f32, rows of fewer than 8 outputs, or a CPU without AVX2.
    pub(super) fn forward_plane_2x2<T: Element>(
        plane: &[T],
        width: usize,
        y_plane: &mut [T],
        out_width: usize,
        winners: &mut [Position],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && out_width >= 8
            && plane.len() <= i32::MAX as usize
            && std::is_x86_feature_detected!("avx2")
        {
            // SAFETY: T is f32 (TypeId above), so the casts only name the element type.
            let (plane, y_plane) = unsafe {
                (
                    std::slice::from_raw_parts(plane.as_ptr().cast::<f32>(), plane.len()),
                    std::slice::from_raw_parts_mut(
                        y_plane.as_mut_ptr().cast::<f32>(),
                        y_plane.len(),
                    ),
                )
            };
            // SAFETY: AVX2 was detected.
            unsafe { x86::plane(plane, width, y_plane, out_width, winners) };
            return true;
        }
        let _ = (plane, width, y_plane, out_width, winners);
        false
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::Position;
        use std::arch::x86_64::*;

        /// Every row of outputs in runs of 8; a row's last run ends at its last output and may
        /// overlap the one before (those outputs are computed twice, alike).
        ///
        /// # Safety
        /// AVX2 must be available; `plane` holds the rows the windows read (two input rows of
        /// `width` ≥ 2·`out_width` per output row), `y_plane` and `winners` whole output rows.
        #[target_feature(enable = "avx2")]
        pub(super) unsafe fn plane(
            plane: &[f32],
            width: usize,
            y_plane: &mut [f32],
            out_width: usize,
            winners: &mut [Position],
        ) {
            let rows = y_plane.len() / out_width;
            for i in 0..rows {
                let top = 2 * i * width;
                let last = out_width - 8;
                for j in (0..last).step_by(8).chain(std::iter::once(last)) {
                    let (input, output) = (top + 2 * j, i * out_width + j);
                    assert!(input + width + 16 <= plane.len() && output + 8 <= y_plane.len());
                    assert!(output + 8 <= winners.len());
                    // SAFETY: the asserts above: 16 values from each of the two input rows, 8
                    // outputs and 8 winners.
                    unsafe {
                        eight(
                            plane.as_ptr().add(input),
                            input as i32,
                            width,
                            y_plane.as_mut_ptr().add(output),
                            winners.as_mut_ptr().add(output),
                        )
                    };
                }
            }
        }

        /// Eight windows whose upper-left cells are `x[0], x[2], …, x[14]` (the row below at
        /// `x + width`): the four candidates in row-major order, a later one replacing the best
        /// only if greater (an ordered compare: NaN never replaces, as `>` in the scalar loop).
        /// Writes the maxima and their positions in the plane, `x` being at `first`.
        ///
        /// # Safety
        /// 16 values readable at `x` and at `x + width`; 8 writable at `y` and at `winners`.
        #[target_feature(enable = "avx2")]
        unsafe fn eight(
            x: *const f32,
            first: i32,
            width: usize,
            y: *mut f32,
            winners: *mut Position,
        ) {
            // SAFETY: the caller's.
            let [upper, lower] = unsafe {
                [x, x.add(width)].map(|row| [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))])
            };
            // Cells 0, 2, …, 14 and 1, 3, …, 15 of each row, in window order.
            let split = |[a, b]: [__m256; 2]| {
                let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
                let order = |v: __m256| {
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
                };
                (order(even), order(odd))
            };
            let ((left_up, right_up), (left_down, right_down)) = (split(upper), split(lower));
            let w = width as i32;
            let mut best = left_up;
            let mut offset = _mm256_setzero_si256();
            for (candidate, cell) in [(right_up, 1), (left_down, w), (right_down, w + 1)] {
                let greater = _mm256_cmp_ps::<_CMP_GT_OQ>(candidate, best);
                best = _mm256_blendv_ps(best, candidate, greater);
                let cell = _mm256_set1_epi32(cell);
                offset = _mm256_blendv_epi8(offset, cell, _mm256_castps_si256(greater));
            }
            let corners = _mm256_add_epi32(
                _mm256_set1_epi32(first),
                _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
            );
            // SAFETY: the caller's.
            unsafe {
                _mm256_storeu_ps(y, best);
                let positions = _mm256_add_epi32(corners, offset);
                _mm256_storeu_si256(winners.cast::<__m256i>(), positions);
            }
        }
    }
}

/// The backward pass: the samples split between the threads; plane after plane, each
/// gradient added at its winner's offset, gated by the activation at the output y if one is
/// fused. With [`GradWrite::Overwrite`] each plane of dx is zeroed just before its gradients
/// are scattered into it, while it is in L1, instead of zeroing all of dx in a separate pass
/// first.
fn scatter<T: Element>(
    dy: ArrayView4<T>,
    gate: Option<(Relu, ArrayView4<T>)>,
    argmax: &[Position],
    dx: ArrayViewMut4<T>,
    write: GradWrite,
) -> Result<()> {
    check_argmax(dy.len(), argmax.len())?;
    let [batch, channels, height, width] = check_image(OP, dx.shape())?;
    check_same(
        OP,
        "output gradient batch and channels",
        &[batch, channels],
        &dy.shape()[..2],
    )?;
    if batch == 0 {
        return Ok(()); // an empty batch has no gradient to route
    }
    let plane_len = height * width;
    let out_len = dy.len() / (batch * channels);
    let activation = gate.as_ref().map(|(activation, _)| *activation);
    let parts = (
        (Along(dy, Axis(0)), gate.map(|(_, y)| Along(y, Axis(0)))),
        Along(dx, Axis(0)),
        Items(argmax, channels * out_len),
    );
    in_parts(parts, &|(
        (Along(dy, _), y),
        Along(mut dx, _),
        Items(argmax, _),
    )| {
        let dy = row_major(dy.as_slice(), dy.shape())?;
        let dx = row_major(dx.as_slice_mut(), &[])?;
        let y = match &y {
            Some(Along(y, _)) => Some(row_major(y.as_slice(), y.shape())?),
            None => None,
        };
        for (plane, ((dy_plane, winners), dx_plane)) in dy
            .chunks_exact(out_len)
            .zip(argmax.chunks_exact(out_len))
            .zip(dx.chunks_exact_mut(plane_len))
            .enumerate()
        {
            if write == GradWrite::Overwrite {
                dx_plane.fill(T::zero());
            }
            // Each gate compiled into its own loop: chosen per element, the activation's
            // test took longer than the scatter.
            let y_plane = y.map(|y| &y[plane * out_len..(plane + 1) * out_len]);
            let zero = T::zero();
            match (activation, y_plane) {
                (Some(Relu::Plain), Some(y)) => route(dy_plane, y, winners, dx_plane, |y, g| {
                    if y > zero {
                        g
                    } else {
                        zero
                    }
                })?,
                (Some(Relu::Six), Some(y)) => {
                    let six = T::from_f64(6.0);
                    route(dy_plane, y, winners, dx_plane, |y, g| {
                        if y > zero && y < six {
                            g
                        } else {
                            zero
                        }
                    })?
                }
                _ => route(dy_plane, dy_plane, winners, dx_plane, |_, g| g)?,
            }
        }
        Ok(())
    })
}

/// One plane: dx[winner] += gate(y, dy) for each output (y: the output that gates it).
fn route<T: Element>(
    dy: &[T],
    y: &[T],
    winners: &[Position],
    dx: &mut [T],
    gate: impl Fn(T, T) -> T,
) -> Result<()> {
    let plane_len = dx.len();
    for ((&g, &y), &position) in dy.iter().zip(y).zip(winners) {
        let slot = dx.get_mut(position as usize);
        *slot.ok_or_else(|| bad_position(plane_len, position as usize))? += gate(y, g);
    }
    Ok(())
}

/// A part of a tensor as one slice in logical order, or the error for a tensor that is not
/// row-major.
fn row_major<S>(slice: Option<S>, shape: &[usize]) -> Result<S> {
    slice.ok_or_else(|| {
        Error::invalid_shape(OP, "tensors must be in standard (row-major) layout", shape)
    })
}

fn check_argmax(len: usize, found: usize) -> Result<()> {
    if len != found {
        return Err(Error::shape_mismatch(
            OP,
            "arg-max buffer length",
            len.to_string(),
            found.to_string(),
        ));
    }
    Ok(())
}

/// The error for an arg-max position outside its plane (possible only with a forged buffer).
fn bad_position(plane_len: usize, position: usize) -> Error {
    Error::shape_mismatch(
        OP,
        "arg-max position",
        format!("< {plane_len}"),
        position.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    /// The tape's overwrite (each plane zeroed just before its scatter) gives exactly what
    /// accumulating into zeros gives, whatever the buffer held (NaN here); accumulating twice
    /// doubles it.
    #[test]
    fn overwriting_scatter_equals_accumulating_into_zeros() {
        let x = Array4::from_shape_fn((2, 3, 5, 6), |(n, c, h, w)| {
            ((n * 131 + c * 71 + h * 17 + w * 7) % 97) as f64 * 0.013
        });
        for (window, stride) in [(1, 1), (2, 2), (3, 3), (2, 1)] {
            let out = output_shape(x.shape(), window, stride).unwrap();
            let mut y = Array4::zeros(out);
            let mut argmax = vec![0; y.len()];
            forward(x.view(), window, stride, y.view_mut(), &mut argmax).unwrap();
            let dy = Array4::from_shape_fn(out, |(n, c, i, j)| (n + 2 * c + 3 * i + 5 * j) as f64);
            let mut accumulated = Array4::zeros(x.dim());
            backward(dy.view(), &argmax, accumulated.view_mut()).unwrap();
            let mut overwritten = Array4::from_elem(x.dim(), f64::NAN);
            scatter(
                dy.view(),
                None,
                &argmax,
                overwritten.view_mut(),
                GradWrite::Overwrite,
            )
            .unwrap();
            assert_eq!(accumulated, overwritten, "k{window} s{stride}");
            let mut twice = accumulated.clone();
            scatter(
                dy.view(),
                None,
                &argmax,
                twice.view_mut(),
                GradWrite::Accumulate,
            )
            .unwrap();
            assert_eq!(twice, &accumulated * 2.0, "k{window} s{stride}");
        }
    }
}
