//! # MaxPool: shrinks H and W by keeping the largest value of each window
//!
//! ## What
//! Each output pixel is the maximum over a `window`×`window` patch of its channel, patches taken
//! every `stride` pixels. Channels are never mixed: pooling changes H and W, never C.
//!
//! ## Shapes
//! x (N, C, H, W) → y (N, C, H′, W′) with H′ = ⌊(H − k)/s⌋ + 1, W′ = ⌊(W − k)/s⌋ + 1.
//! Saved for backward: for each output element, the position (h·W + w) of its arg-max in its
//! channel plane, (N·C·H′·W′) 32-bit integers.
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
//! ## Cost
//! Forward k² compares per output element; backward one add per output element.

use super::{check_image, check_same, pooled_len, GradWrite};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::parallel::{in_parts, Along, Items};
use ndarray::{ArrayView2, ArrayView4, ArrayViewMut4, Axis};

const OP: &str = "max_pool";

/// Where a window's maximum is in its channel plane (h·W + w). 32 bits, not 64: the positions
/// are written in the forward pass and read in the backward pass, and half the bytes is half
/// that memory traffic.
pub type Position = u32;

/// Checks the input and the pool settings and returns the output shape.
pub fn output_shape(x: &[usize], window: usize, stride: usize) -> Result<[usize; 4]> {
    let [batch, channels, height, width] = check_image(OP, x)?;
    if height
        .checked_mul(width)
        .is_none_or(|plane| plane > Position::MAX as usize)
    {
        return Err(Error::invalid_shape(
            OP,
            "a channel plane has more pixels than a u32 position can name",
            x,
        ));
    }
    let out_height = pooled_len(OP, height, window, stride, x)?;
    let out_width = pooled_len(OP, width, window, stride, x)?;
    Ok([batch, channels, out_height, out_width])
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

/// Arg-max of one window of one channel plane, first maximum in row-major order.
fn window_argmax<T: Element>(
    plane: &ArrayView2<T>,
    top: usize,
    left: usize,
    window: usize,
) -> (usize, usize) {
    let mut best = (top, left);
    for h in top..top + window {
        for w in left..left + window {
            if plane[[h, w]] > plane[best] {
                best = (h, w);
            }
        }
    }
    best
}

/// Forward: y = window maximum; `argmax` receives the winner's position (h·W + w) in its plane.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut y: ArrayViewMut4<T>,
    argmax: &mut [Position],
) -> Result<()> {
    let out = output_shape(x.shape(), window, stride)?;
    check_same(OP, "output", &out, y.shape())?;
    check_argmax(y.len(), argmax.len())?;
    let width = x.shape()[3];
    if x.is_standard_layout() && y.is_standard_layout() {
        // Row-major memory: the samples split between the threads, each part on slices.
        let [_, channels, out_height, out_width] = out;
        let plane = [x.shape()[2] * width, width];
        let parts = (
            Along(x, Axis(0)),
            Along(y, Axis(0)),
            Items(argmax, channels * out_height * out_width),
        );
        return in_parts(parts, &|(
            Along(x, _),
            Along(mut y, _),
            Items(argmax, _),
        )| {
            let not_contiguous =
                || Error::invalid_shape(OP, "a part of the batch is not contiguous", x.shape());
            let y = y.as_slice_mut().ok_or_else(not_contiguous)?;
            let x = x.as_slice().ok_or_else(not_contiguous)?;
            forward_planes(x, plane, window, stride, y, [out_height, out_width], argmax);
            Ok(())
        });
    }
    let mut winners = argmax.iter_mut();
    for (x_sample, mut y_sample) in x.outer_iter().zip(y.outer_iter_mut()) {
        for (plane, mut y_plane) in x_sample.outer_iter().zip(y_sample.outer_iter_mut()) {
            for ((i, j), y) in y_plane.indexed_iter_mut() {
                let (h, w) = window_argmax(&plane, i * stride, j * stride, window);
                *y = plane[[h, w]];
                if let Some(winner) = winners.next() {
                    *winner = (h * width + w) as Position;
                }
            }
        }
    }
    Ok(())
}

/// The forward pass on row-major memory: one plane (H×W) after another, each window read
/// straight from its slice. The same arithmetic as the indexed loop, without the index checks.
fn forward_planes<T: Element>(
    x: &[T],
    [plane_len, width]: [usize; 2],
    window: usize,
    stride: usize,
    y: &mut [T],
    [out_height, out_width]: [usize; 2],
    argmax: &mut [Position],
) {
    let out_len = out_height * out_width;
    for ((plane, y_plane), winners) in x
        .chunks_exact(plane_len)
        .zip(y.chunks_exact_mut(out_len))
        .zip(argmax.chunks_exact_mut(out_len))
    {
        if window == 2 && stride == 2 {
            // The common 2×2 / 2 case: two input rows at a time, four candidates per output
            // in row-major order (so the first maximum still wins), no inner loops.
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
            continue;
        }
        for i in 0..out_height {
            for j in 0..out_width {
                let corner = i * stride * width + j * stride;
                let mut best = corner;
                for row in (corner..corner + window * width).step_by(width) {
                    for position in row..row + window {
                        if plane[position] > plane[best] {
                            best = position;
                        }
                    }
                }
                y_plane[i * out_width + j] = plane[best];
                winners[i * out_width + j] = best as Position;
            }
        }
    }
}

/// Checks dy against the arg-max buffer and dx (N, C, H, W); returns dx's shape.
fn check_backward<T>(
    dy: &ArrayView4<T>,
    argmax: &[Position],
    dx: &ArrayViewMut4<T>,
) -> Result<[usize; 4]> {
    check_argmax(dy.len(), argmax.len())?;
    let shape = check_image(OP, dx.shape())?;
    check_same(
        OP,
        "output gradient batch and channels",
        &shape[..2],
        &dy.shape()[..2],
    )?;
    Ok(shape)
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

/// Backward: routes each dy to its window's arg-max, dx[arg-max] += dy.
pub fn backward<T: Element>(
    dy: ArrayView4<T>,
    argmax: &[Position],
    mut dx: ArrayViewMut4<T>,
) -> Result<()> {
    let shape = check_backward(&dy, argmax, &dx)?;
    if dy.is_standard_layout() && dx.is_standard_layout() {
        return scatter(dy, argmax, dx, shape, false);
    }
    let [_, _, height, width] = shape;
    let mut winners = argmax.iter();
    for (dy_sample, mut dx_sample) in dy.outer_iter().zip(dx.outer_iter_mut()) {
        for (dy_plane, mut dx_plane) in dy_sample.outer_iter().zip(dx_sample.outer_iter_mut()) {
            for &g in dy_plane.iter() {
                if let Some(&position) = winners.next() {
                    let position = position as usize;
                    let slot = dx_plane.get_mut([position / width, position % width]);
                    *slot.ok_or_else(|| bad_position(height * width, position))? += g;
                }
            }
        }
    }
    Ok(())
}

/// The backward pass on row-major memory (shapes already checked): the samples split between
/// the threads; plane after plane, each gradient added at its winner's offset (the plane
/// zeroed first if `zero_first`).
fn scatter<T: Element>(
    dy: ArrayView4<T>,
    argmax: &[Position],
    dx: ArrayViewMut4<T>,
    [batch, channels, height, width]: [usize; 4],
    zero_first: bool,
) -> Result<()> {
    let plane_len = height * width;
    let out_len = dy.len() / (batch * channels).max(1);
    let parts = (
        Along(dy, Axis(0)),
        Along(dx, Axis(0)),
        Items(argmax, channels * out_len),
    );
    in_parts(parts, &|(
        Along(dy, _),
        Along(mut dx, _),
        Items(argmax, _),
    )| {
        let not_contiguous =
            || Error::invalid_shape(OP, "a part of the batch is not contiguous", dy.shape());
        let dx = dx.as_slice_mut().ok_or_else(not_contiguous)?;
        let dy = dy.as_slice().ok_or_else(not_contiguous)?;
        for ((dy_plane, winners), dx_plane) in dy
            .chunks_exact(out_len)
            .zip(argmax.chunks_exact(out_len))
            .zip(dx.chunks_exact_mut(plane_len))
        {
            if zero_first {
                dx_plane.fill(T::zero());
            }
            for (&g, &position) in dy_plane.iter().zip(winners) {
                let slot = dx_plane
                    .get_mut(position as usize)
                    .ok_or_else(|| bad_position(plane_len, position as usize))?;
                *slot += g;
            }
        }
        Ok(())
    })
}

/// [`backward`], with dx written as `write` says. With [`GradWrite::Overwrite`] each channel
/// plane of dx is zeroed just before its gradients are scattered into it, while it is in L1,
/// instead of zeroing all of dx in a separate pass first.
pub fn backward_with<T: Element>(
    dy: ArrayView4<T>,
    argmax: &[Position],
    dx: ArrayViewMut4<T>,
    write: GradWrite,
) -> Result<()> {
    if write == GradWrite::Accumulate || !dy.is_standard_layout() || !dx.is_standard_layout() {
        let mut dx = dx;
        if write == GradWrite::Overwrite {
            dx.fill(T::zero());
        }
        return backward(dy, argmax, dx);
    }
    let shape = check_backward(&dy, argmax, &dx)?;
    scatter(dy, argmax, dx, shape, true)
}

/// The specification's arg-max of output (n, c, i, j): every position of its window in
/// row-major order, the first maximum kept (a later equal value does not replace it).
fn reference_argmax<T: Element>(
    x: &ArrayView4<T>,
    [n, c, i, j]: [usize; 4],
    window: usize,
    stride: usize,
) -> (usize, usize) {
    let (mut best_h, mut best_w) = (i * stride, j * stride);
    for di in 0..window {
        for dj in 0..window {
            let (h, w) = (i * stride + di, j * stride + dj);
            if x[[n, c, h, w]] > x[[n, c, best_h, best_w]] {
                (best_h, best_w) = (h, w);
            }
        }
    }
    (best_h, best_w)
}

/// The specification: the window maximum by explicit loops over outputs and windows, first
/// maximum wins.
/// Returns the arg-max positions it found, so the tests can compare them too.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    window: usize,
    stride: usize,
    mut y: ArrayViewMut4<T>,
) -> Result<Vec<Position>> {
    let [batch, channels, out_height, out_width] = output_shape(x.shape(), window, stride)?;
    check_same(
        OP,
        "output",
        &[batch, channels, out_height, out_width],
        y.shape(),
    )?;
    let width = x.shape()[3];
    let mut argmax = Vec::with_capacity(y.len());
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..out_height {
                for j in 0..out_width {
                    let (best_h, best_w) = reference_argmax(&x, [n, c, i, j], window, stride);
                    y[[n, c, i, j]] = x[[n, c, best_h, best_w]];
                    argmax.push((best_h * width + best_w) as Position);
                }
            }
        }
    }
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
    let [batch, channels, out_height, out_width] = output_shape(x.shape(), window, stride)?;
    check_same(
        OP,
        "output gradient",
        &[batch, channels, out_height, out_width],
        dy.shape(),
    )?;
    check_same(OP, "input gradient", x.shape(), dx.shape())?;
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..out_height {
                for j in 0..out_width {
                    let (best_h, best_w) = reference_argmax(&x, [n, c, i, j], window, stride);
                    dx[[n, c, best_h, best_w]] += dy[[n, c, i, j]];
                }
            }
        }
    }
    Ok(())
}
