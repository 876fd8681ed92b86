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
    check_image, check_ndim, check_same, dims, in_standard_layout, layer_forward, layer_gradients,
    shape_text, sum_pairs, window_backward_reference, window_forward_reference, Border,
    LayerForward,
};
use crate::cost::Cost;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::{GradWrite, Operation};
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
        let Backward { dy, mut inputs, .. } = pass;
        let layer = layer_gradients(OP, inputs.ports::<3>()?)?;
        let (dy, weight, window) = (dims(OP, dy.view())?, layer.weight, self.window);
        backward(
            layer.x,
            weight,
            window,
            dy,
            None,
            layer.dweight,
            layer.dbias,
        )?;
        match layer.dx {
            Some((dx, write)) => input_gradient(weight, window, dy, dx, write),
            None => Ok(()),
        }
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
// Every pass works on an input plane padded with p zeros on every side, so no loop checks
// bounds: output pixel (i, j) at kernel tap (a, b) reads padded pixel (i·s + a, j·s + b). At
// stride s > 1 the padded plane is also split into s² *phases*: padded pixel (r, c) goes to
// phase (r mod s, c mod s) at (⌊r/s⌋, ⌊c/s⌋). Then, at any stride, tap (a, b) reads for
// output (i, j) the pixel at (i + ⌊a/s⌋, j + ⌊b/s⌋) of phase (a mod s, b mod s): with the
// outputs on a *work grid* whose rows are as far apart as a phase's (a few extra columns per
// row, computed and dropped), one tap is one shift of the whole plane, and every pass is one
// long run over the grid:
//
//   forward   y[k]            += Σ_t W[t]·src[offset_t + k]   (y starts as the bias)
//   dx        dsrc[offset_t + k] += W[t]·dy[k]                (then un-phased, un-padded)
//   dW        dW[t]           += Σ_k dy[k]·src[offset_t + k]
//
// For a 3×3 kernel in f32 with AVX2 the forward keeps the nine weights, and dW the nine sums,
// in vector registers along the run (see `x86`). The passes as they were before — a pass of
// the plane per tap at stride 1, loops stepping by s (not vectorised) at stride 2 — ran
// MobileNetV2's depthwise layers (batch 16) at 0.9–8.6 GFLOP/s forward at 1 thread.

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
    let plane = Plane::new(x.shape(), &out, weight.shape()[2], window);
    let multiplier = out[1] / x.shape()[1];
    let (x, weight) = (x.as_standard_layout(), weight.as_standard_layout());
    in_standard_layout(y.view_mut(), |y| {
        in_parts((Along(x.view(), Axis(0)), Along(y, Axis(0))), &|(
            Along(x, _),
            Along(mut y, _),
        )| {
            let (mut phases, offsets) = (plane.scratch(), plane.offsets());
            let mut work = plane.work();
            for (x_n, mut y_n) in x.outer_iter().zip(y.outer_iter_mut()) {
                for (o, mut y_plane) in y_n.outer_iter_mut().enumerate() {
                    if o % multiplier == 0 {
                        plane.split(flat(x_n.index_axis(Axis(0), o / multiplier)), &mut phases);
                    }
                    let taps = taps(&weight, o);
                    work.fill(bias.as_ref().map_or(T::zero(), |b| b[o]));
                    gather(&mut work, taps, &phases, &offsets);
                    plane.narrow(&work, flat_mut(&mut y_plane), GradWrite::Overwrite);
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
    if let Some(dx) = &dx {
        check_same(OP, "input gradient", x.shape(), dx.shape())?;
    }
    let plane = Plane::new(x.shape(), &out, weight.shape()[2], window);
    let multiplier = out[1] / x.shape()[1];
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let parameters = (
        dweight.map(|d| Along(d, Axis(0))),
        dbias.map(|d| Along(d, Axis(0))),
    );
    in_parts((0..out[1], parameters), &|(
        channels,
        (mut dweight, mut dbias),
    )| {
        let (mut phases, offsets) = (plane.scratch(), plane.offsets());
        // The work grid's extra columns are never written here: they stay 0 and add nothing.
        let mut work = plane.work();
        // Eight lanes of partial sums per tap, and one for the rows' last W′ mod 8 terms,
        // summed across once per channel.
        let mut sums = vec![T::zero(); offsets.len() * LANES];
        let mut tails = vec![T::zero(); offsets.len()];
        for (i, o) in channels.enumerate() {
            for (x_n, dy_n) in x.outer_iter().zip(dy.outer_iter()) {
                let grad = flat(dy_n.index_axis(Axis(0), o));
                if let Some(Along(dbias, _)) = dbias.as_mut() {
                    let grad = ArrayView1::from(grad);
                    dbias[i] += sum_pairs(grad, grad, |g, _| g);
                }
                if dweight.is_none() {
                    continue;
                }
                plane.split(flat(x_n.index_axis(Axis(0), o / multiplier)), &mut phases);
                plane.widen(grad, &mut work);
                // dW[o,0,a,b] += Σ_{i,j} dy[i,j]·x[source(i,j)]
                correlate(&work, &phases, &offsets, &mut sums, &mut tails);
            }
            if let Some(Along(dweight, _)) = dweight.as_mut() {
                let dweight = dweight.slice_mut(s![i, 0, .., ..]);
                let per_tap = sums.chunks_exact_mut(LANES).zip(tails.iter_mut());
                for (dw, (lanes, tail)) in dweight.into_iter().zip(per_tap) {
                    *dw += lanes.iter().fold(*tail, |total, &lane| total + lane);
                    lanes.fill(T::zero());
                    *tail = T::zero();
                }
            }
        }
        Ok(())
    })?;
    match dx {
        Some(dx) => input_gradient(weight, window, dy.view(), dx, GradWrite::Accumulate),
        None => Ok(()),
    }
}

/// dx alone, written as `write` says (`=` into a gradient that holds no contribution yet, so
/// that it needs no pass of zeros first): every pixel of dx is written once, after its sum
/// over the taps (and the channel's m outputs) is complete. The samples split between the
/// threads.
pub fn input_gradient<T: Element>(
    weight: ArrayView4<T>,
    window: Window,
    dy: ArrayView4<T>,
    mut dx: ArrayViewMut4<T>,
    write: GradWrite,
) -> Result<()> {
    let out = output_shape(dx.shape(), weight.shape(), window)?;
    check_same(OP, "output gradient", &out, dy.shape())?;
    let (kernel, multiplier) = (weight.shape()[2], out[1] / dx.shape()[1]);
    let plane = Plane::new(dx.shape(), &out, kernel, window);
    let (weight, dy) = (weight.as_standard_layout(), dy.as_standard_layout());
    // At stride 1, dx is itself a depthwise convolution: of dy, padded by K − 1 − p, with the
    // kernel turned by 180°, dx[h,w] = Σ_{a,b} W[K−1−a, K−1−b]·dy_padded[h + a, w + b]. Run as
    // the forward pass runs (a gather, one store per value) instead of a scatter per tap.
    let plane_shape = dx.shape();
    let transposed = (window.stride == 1 && window.padding < kernel).then(|| {
        let padding = kernel - 1 - window.padding;
        let window = Window { stride: 1, padding };
        Plane::new(&out, plane_shape, kernel, window)
    });
    in_standard_layout(dx.view_mut(), |dx| {
        in_parts(
            (Along(dy.view(), Axis(0)), Along(dx, Axis(0))),
            &|(Along(dy, _), Along(mut dx, _))| {
                if let Some(transposed) = transposed {
                    let (mut padded, offsets) = (transposed.scratch(), transposed.offsets());
                    let (mut work, mut turned) = (transposed.work(), Vec::new());
                    for (dy_n, mut dx_n) in dy.outer_iter().zip(dx.outer_iter_mut()) {
                        for (c, mut dx_plane) in dx_n.outer_iter_mut().enumerate() {
                            work.fill(T::zero());
                            for o in c * multiplier..(c + 1) * multiplier {
                                turned.clear();
                                turned.extend(taps(&weight, o).iter().rev());
                                transposed.split(flat(dy_n.index_axis(Axis(0), o)), &mut padded);
                                gather(&mut work, &turned, &padded, &offsets);
                            }
                            transposed.narrow(&work, flat_mut(&mut dx_plane), write);
                        }
                    }
                    return Ok(());
                }
                // Here the phases collect the padded plane's gradient, border included.
                let (mut phases, offsets) = (plane.scratch(), plane.offsets());
                let mut work = plane.work();
                for (dy_n, mut dx_n) in dy.outer_iter().zip(dx.outer_iter_mut()) {
                    for (c, mut dx_plane) in dx_n.outer_iter_mut().enumerate() {
                        phases.fill(T::zero());
                        for o in c * multiplier..(c + 1) * multiplier {
                            let taps = taps(&weight, o);
                            plane.widen(flat(dy_n.index_axis(Axis(0), o)), &mut work);
                            // dx[source(i,j)] += W[o,0,a,b]·dy[i,j]
                            scatter(&work, taps, &mut phases, &offsets);
                        }
                        plane.merge(&phases, flat_mut(&mut dx_plane), write);
                    }
                }
                Ok(())
            },
        )
    })
}

/// The lanes of dW's partial sums: a vector of f32 on AVX2.
const LANES: usize = 8;

// The three generic loops below are compiled twice: as they are, for any x86-64 (SSE2: four
// f32 lanes), and inside a function that enables AVX2 and FMA, called where the CPU has them
// (eight lanes). The arithmetic is the same (the compiler fuses no multiply-add, so the results
// are too); only the vector width it may use differs. f32 with a 3×3 kernel goes to the `x86`
// kernels instead, whose fused multiply-adds round once per tap, not twice.

/// One run of outputs: `y[j] += Σ_t taps[t]·sources[offsets[t] + j]`. A 3×3 kernel's nine
/// taps are summed eight outputs at a time, then stored once; other kernels take a pass along
/// the run per tap. Either way each output sums its taps in order after the bias, as the
/// reference loops do.
fn gather<T: Element>(y: &mut [T], taps: &[T], sources: &[T], offsets: &[usize]) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() && x86::gather_3x3(y, taps, sources, offsets) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(y: &mut [T], taps: &[T], sources: &[T], offsets: &[usize]) {
            gather_any(y, taps, sources, offsets)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(y, taps, sources, offsets) };
    }
    gather_any(y, taps, sources, offsets)
}

#[inline(always)]
fn gather_any<T: Element>(y: &mut [T], taps: &[T], sources: &[T], offsets: &[usize]) {
    if let (Ok(taps), Ok(offsets)) = (<&[T; 9]>::try_from(taps), <&[usize; 9]>::try_from(offsets)) {
        let sources: [&[T]; 9] = std::array::from_fn(|t| &sources[offsets[t]..][..y.len()]);
        let whole = y.len() - y.len() % LANES;
        for (block, y) in y[..whole].chunks_exact_mut(LANES).enumerate() {
            let mut sums: [T; LANES] = std::array::from_fn(|lane| y[lane]);
            for (&w, source) in taps.iter().zip(&sources) {
                let source = &source[block * LANES..][..LANES];
                for lane in 0..LANES {
                    sums[lane] += w * source[lane];
                }
            }
            y.copy_from_slice(&sums);
        }
        for (j, y) in y.iter_mut().enumerate().skip(whole) {
            *y = (0..9).fold(*y, |sum, t| sum + taps[t] * sources[t][j]);
        }
        return;
    }
    for (&w, &offset) in taps.iter().zip(offsets) {
        let source = &sources[offset..][..y.len()];
        y.iter_mut().zip(source).for_each(|(y, &x)| *y += w * x);
    }
}

/// dx's run: `targets[offsets[t] + j] += taps[t]·dy[j]`, a pass along the run per tap.
fn scatter<T: Element>(dy: &[T], taps: &[T], targets: &mut [T], offsets: &[usize]) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(dy: &[T], taps: &[T], targets: &mut [T], offsets: &[usize]) {
            scatter_any(dy, taps, targets, offsets)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(dy, taps, targets, offsets) };
    }
    scatter_any(dy, taps, targets, offsets)
}

#[inline(always)]
fn scatter_any<T: Element>(dy: &[T], taps: &[T], targets: &mut [T], offsets: &[usize]) {
    for (&w, &offset) in taps.iter().zip(offsets) {
        let target = &mut targets[offset..][..dy.len()];
        target.iter_mut().zip(dy).for_each(|(t, &g)| *t += w * g);
    }
}

/// One run of dy against the sources of every tap: lane l of tap t's sums gathers
/// `dy[j]·sources[offsets[t] + j]` for j ≡ l (mod 8), `tails[t]` the run's last terms.
fn correlate<T: Element>(
    dy: &[T],
    sources: &[T],
    offsets: &[usize],
    sums: &mut [T],
    tails: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() && x86::correlate_3x3(dy, sources, offsets, sums, tails) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(
            dy: &[T],
            sources: &[T],
            offsets: &[usize],
            sums: &mut [T],
            tails: &mut [T],
        ) {
            correlate_any(dy, sources, offsets, sums, tails)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(dy, sources, offsets, sums, tails) };
    }
    correlate_any(dy, sources, offsets, sums, tails)
}

#[inline(always)]
fn correlate_any<T: Element>(
    dy: &[T],
    sources: &[T],
    offsets: &[usize],
    sums: &mut [T],
    tails: &mut [T],
) {
    let whole = dy.len() - dy.len() % LANES;
    for ((&offset, lanes), tail) in offsets.iter().zip(sums.chunks_exact_mut(LANES)).zip(tails) {
        let source = &sources[offset..][..dy.len()];
        for (g, x) in dy[..whole]
            .chunks_exact(LANES)
            .zip(source.chunks_exact(LANES))
        {
            for lane in 0..LANES {
                lanes[lane] += g[lane] * x[lane];
            }
        }
        let rest = dy[whole..].iter().zip(&source[whole..]);
        *tail = rest.fold(*tail, |sum, (&g, &x)| sum + g * x);
    }
}

/// f32 and a 3×3 kernel (MobileNet's) with AVX2 and FMA: the nine taps' weights (forward) or
/// sums (dW) live in registers along the whole run, eight outputs a step. The compiler's own
/// vectorisation of the generic loops above shuffled lanes between the taps instead.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use crate::element::Element;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// The slice as f32, if T is f32.
    fn as_f32<T: Element>(values: &[T]) -> Option<&[f32]> {
        // SAFETY: T is f32 (TypeId), so the cast only names the element type.
        (TypeId::of::<T>() == TypeId::of::<f32>())
            .then(|| unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len()) })
    }

    fn as_f32_mut<T: Element>(values: &mut [T]) -> Option<&mut [f32]> {
        // SAFETY: as in `as_f32`.
        (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), values.len())
        })
    }

    /// [`super::gather`] for f32 and nine taps; false (nothing done) otherwise. The caller
    /// has checked AVX2 and FMA.
    pub(super) fn gather_3x3<T: Element>(
        y: &mut [T],
        taps: &[T],
        sources: &[T],
        offsets: &[usize],
    ) -> bool {
        let (Some(taps), Some(sources), Ok(offsets)) = (
            as_f32(taps),
            as_f32(sources),
            <&[usize; 9]>::try_from(offsets),
        ) else {
            return false;
        };
        let (Ok(taps), Some(y)) = (<&[f32; 9]>::try_from(taps), as_f32_mut(y)) else {
            return false;
        };
        assert!(offsets.iter().all(|&o| o + y.len() <= sources.len()));
        // SAFETY: AVX2 and FMA (the caller's check); every source run is inside `sources`.
        unsafe { gather(y, taps, sources, offsets) };
        true
    }

    /// # Safety
    /// AVX2 and FMA; `offsets[t] + y.len() ≤ sources.len()` for every t.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gather(y: &mut [f32], taps: &[f32; 9], sources: &[f32], offsets: &[usize; 9]) {
        let weights = taps.map(|w| _mm256_set1_ps(w));
        let whole = y.len() - y.len() % LANES;
        let (y_ptr, x) = (y.as_mut_ptr(), sources.as_ptr());
        for j in (0..whole).step_by(LANES) {
            // SAFETY: j + 8 ≤ y.len(), and each source run holds y.len() values.
            unsafe {
                let mut sum = _mm256_loadu_ps(y_ptr.add(j));
                for (w, &offset) in weights.iter().zip(offsets) {
                    sum = _mm256_fmadd_ps(*w, _mm256_loadu_ps(x.add(offset + j)), sum);
                }
                _mm256_storeu_ps(y_ptr.add(j), sum);
            }
        }
        for j in whole..y.len() {
            let taps = taps.iter().zip(offsets);
            y[j] = taps.fold(y[j], |sum, (&w, &offset)| {
                w.mul_add(sources[offset + j], sum)
            });
        }
    }

    /// [`super::correlate`] for f32 and nine taps; false (nothing done) otherwise. The caller
    /// has checked AVX2 and FMA.
    pub(super) fn correlate_3x3<T: Element>(
        dy: &[T],
        sources: &[T],
        offsets: &[usize],
        sums: &mut [T],
        tails: &mut [T],
    ) -> bool {
        let (Some(dy), Some(sources), Ok(offsets)) = (
            as_f32(dy),
            as_f32(sources),
            <&[usize; 9]>::try_from(offsets),
        ) else {
            return false;
        };
        let (Some(sums), Some(tails)) = (as_f32_mut(sums), as_f32_mut(tails)) else {
            return false;
        };
        assert!(offsets.iter().all(|&o| o + dy.len() <= sources.len()));
        assert!(sums.len() == 9 * LANES && tails.len() == 9);
        // SAFETY: AVX2 and FMA (the caller's check); every source run is inside `sources`,
        // and `sums` holds nine vectors.
        unsafe { correlate(dy, sources, offsets, sums, tails) };
        true
    }

    /// # Safety
    /// AVX2 and FMA; `offsets[t] + dy.len() ≤ sources.len()` for every t; 72 sums, 9 tails.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn correlate(
        dy: &[f32],
        sources: &[f32],
        offsets: &[usize; 9],
        sums: &mut [f32],
        tails: &mut [f32],
    ) {
        let whole = dy.len() - dy.len() % LANES;
        let (g, x) = (dy.as_ptr(), sources.as_ptr());
        // SAFETY: sums holds 9 vectors of 8.
        let mut lanes: [__m256; 9] =
            std::array::from_fn(|t| unsafe { _mm256_loadu_ps(sums.as_ptr().add(t * LANES)) });
        for j in (0..whole).step_by(LANES) {
            // SAFETY: j + 8 ≤ dy.len(), and each source run holds dy.len() values.
            unsafe {
                let grad = _mm256_loadu_ps(g.add(j));
                for (lane, &offset) in lanes.iter_mut().zip(offsets) {
                    *lane = _mm256_fmadd_ps(grad, _mm256_loadu_ps(x.add(offset + j)), *lane);
                }
            }
        }
        for (t, lane) in lanes.iter().enumerate() {
            // SAFETY: vector t of the 9 in sums.
            unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add(t * LANES), *lane) };
        }
        for (tail, &offset) in tails.iter_mut().zip(offsets) {
            let rest = dy[whole..].iter().zip(&sources[offset + whole..]);
            *tail = rest.fold(*tail, |sum, (&g, &x)| g.mul_add(x, sum));
        }
    }
}

/// Output channel o's K×K weights, row-major: tap a·K + b is W[o, 0, a, b].
fn taps<'a, T>(weight: &'a ndarray::CowArray<'_, T, ndarray::Ix4>, o: usize) -> &'a [T] {
    let kernel = weight.shape()[2] * weight.shape()[3];
    let Some(all) = weight.as_slice() else {
        unreachable!("the weight is in standard layout")
    };
    &all[o * kernel..][..kernel]
}

/// One (H, W) plane and its (H′, W′) output, and the padded, phased form the passes read.
#[derive(Clone, Copy, Debug)]
struct Plane {
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    kernel: usize,
    window: Window,
}

impl Plane {
    fn new(x: &[usize], out: &[usize], kernel: usize, window: Window) -> Self {
        Plane {
            height: x[2],
            width: x[3],
            out_height: out[2],
            out_width: out[3],
            kernel,
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

    /// The columns of one phase, ⌈(W + 2p)/s⌉: also the distance between rows of the work
    /// grid the outputs are computed on, so that a tap is one shift of the whole grid.
    fn phase_width(&self) -> usize {
        self.border().padded_width().div_ceil(self.window.stride)
    }

    /// The values of one phase: ⌈(H + 2p)/s⌉ rows.
    fn phase_len(&self) -> usize {
        let padded_height = self.height + 2 * self.window.padding;
        padded_height.div_ceil(self.window.stride) * self.phase_width()
    }

    /// A zeroed buffer for the s² phases (or the padded plane), whose border stays zero.
    fn scratch<T: Element>(&self) -> Vec<T> {
        vec![T::zero(); self.window.stride.pow(2) * self.phase_len()]
    }

    /// Where each tap a·K + b reads for output (0, 0): phase (a mod s, b mod s), row ⌊a/s⌋,
    /// column ⌊b/s⌋. Output (i, j) reads i·[`Plane::phase_width`] + j further on.
    fn offsets(&self) -> Vec<usize> {
        let stride = self.window.stride;
        let offset = |a: usize, b: usize| {
            let phase = (a % stride) * stride + b % stride;
            phase * self.phase_len() + (a / stride) * self.phase_width() + b / stride
        };
        let taps = 0..self.kernel * self.kernel;
        taps.map(|tap| offset(tap / self.kernel, tap % self.kernel))
            .collect()
    }

    /// The work grid: H′ rows of [`Plane::phase_width`] (the last ending at the last output),
    /// of which the first W′ columns are outputs; the others are computed and dropped.
    fn work_len(&self) -> usize {
        (self.out_height.max(1) - 1) * self.phase_width() + self.out_width
    }

    /// A zeroed work grid.
    fn work<T: Element>(&self) -> Vec<T> {
        vec![T::zero(); self.work_len()]
    }

    /// Copies an output plane onto the work grid (its extra columns untouched).
    fn widen<T: Element>(&self, plane: &[T], work: &mut [T]) {
        let step = self.phase_width();
        for (i, row) in plane.chunks_exact(self.out_width.max(1)).enumerate() {
            work[i * step..][..self.out_width].copy_from_slice(row);
        }
    }

    /// Writes the work grid's outputs into an output plane, as `write` says (`+=` or `=`).
    fn narrow<T: Element>(&self, work: &[T], plane: &mut [T], write: GradWrite) {
        let step = self.phase_width();
        for (i, row) in plane.chunks_exact_mut(self.out_width.max(1)).enumerate() {
            let source = &work[i * step..][..self.out_width];
            match write {
                GradWrite::Accumulate => row.iter_mut().zip(source).for_each(|(x, &g)| *x += g),
                GradWrite::Overwrite => row.copy_from_slice(source),
            }
        }
    }

    /// Writes padded pixel (r, c) into phase (r mod s, c mod s) at (⌊r/s⌋, ⌊c/s⌋), the image's
    /// pixels only: the border must be zero, as [`Plane::scratch`] makes it and as it stays
    /// (nothing writes there), so that a plane of a few pixels costs no pass of zeros. At
    /// stride 1, the padded plane.
    fn split<T: Element>(&self, plane: &[T], phases: &mut [T]) {
        let stride = self.window.stride;
        if stride == 1 {
            return self.border().pad(plane, phases);
        }
        if stride == 2 {
            return self.split_pairs(plane, phases);
        }
        let (phase_width, phase_len) = (self.phase_width(), self.phase_len());
        for (index, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
            let (inside, first) = self.phase_columns(index % stride);
            for (k, target) in phase.chunks_exact_mut(phase_width).enumerate() {
                let Some(h) = self.image_row(k * stride + index / stride) else {
                    continue;
                };
                let source = plane[h * self.width + first..].iter().step_by(stride);
                let copied = target[inside.clone()].iter_mut().zip(source);
                copied.for_each(|(t, &x)| *t = x);
            }
        }
    }

    /// Writes (`write`: adds or copies) the image's pixels of the phased, padded gradient into a
    /// plane, every pixel once.
    fn merge<T: Element>(&self, phases: &[T], plane: &mut [T], write: GradWrite) {
        let stride = self.window.stride;
        match stride {
            1 => return self.border().write_interior(phases, plane, write),
            2 => return self.merge_pairs(phases, plane, write),
            _ => {}
        }
        let (phase_width, phase_len) = (self.phase_width(), self.phase_len());
        for (index, phase) in phases.chunks_exact(phase_len).enumerate() {
            let (inside, first) = self.phase_columns(index % stride);
            for (k, source) in phase.chunks_exact(phase_width).enumerate() {
                let Some(h) = self.image_row(k * stride + index / stride) else {
                    continue;
                };
                let row = &mut plane[h * self.width..][..self.width];
                let target = row[first..].iter_mut().step_by(stride);
                let pairs = target.zip(&source[inside.clone()]);
                match write {
                    GradWrite::Accumulate => pairs.for_each(|(x, &g)| *x += g),
                    GradWrite::Overwrite => pairs.for_each(|(x, &g)| *x = g),
                }
            }
        }
    }

    /// [`Plane::split`] at stride 2, a row in one pass: image column w is padded column w + p,
    /// so the even columns all go to column phase p mod 2 and the odd ones to the other, and
    /// splitting the row's pairs of neighbours deals it to both (a loop that vectorises; the
    /// general loop, one strided walk per phase, took 60 % of a stride-2 pass).
    fn split_pairs<T: Element>(&self, plane: &[T], phases: &mut [T]) {
        let (phase_width, phase_len) = (self.phase_width(), self.phase_len());
        let even = self.window.padding % 2;
        let columns = [self.phase_columns(0).0, self.phase_columns(1).0];
        // The two column phases of row phase a are blocks 2a and 2a + 1.
        for (row_phase, blocks) in phases.chunks_exact_mut(2 * phase_len).enumerate() {
            let (first, second) = blocks.split_at_mut(phase_len);
            let rows = first
                .chunks_exact_mut(phase_width)
                .zip(second.chunks_exact_mut(phase_width));
            for (k, (row_0, row_1)) in rows.enumerate() {
                let Some(h) = self.image_row(2 * k + row_phase) else {
                    continue;
                };
                let (inside_0, inside_1) = (columns[0].clone(), columns[1].clone());
                let (targets_0, targets_1) = (&mut row_0[inside_0], &mut row_1[inside_1]);
                let (evens, odds) = match even {
                    0 => (targets_0, targets_1),
                    _ => (targets_1, targets_0),
                };
                deinterleave(&plane[h * self.width..][..self.width], evens, odds);
            }
        }
    }

    /// [`Plane::merge`] at stride 2, a row in one pass (as [`Plane::split_pairs`]).
    fn merge_pairs<T: Element>(&self, phases: &[T], plane: &mut [T], write: GradWrite) {
        let (phase_width, phase_len) = (self.phase_width(), self.phase_len());
        let even = self.window.padding % 2;
        let columns = [self.phase_columns(0).0, self.phase_columns(1).0];
        for (row_phase, blocks) in phases.chunks_exact(2 * phase_len).enumerate() {
            let (first, second) = blocks.split_at(phase_len);
            let rows = first
                .chunks_exact(phase_width)
                .zip(second.chunks_exact(phase_width));
            for (k, (row_0, row_1)) in rows.enumerate() {
                let Some(h) = self.image_row(2 * k + row_phase) else {
                    continue;
                };
                let sources = [&row_0[columns[0].clone()], &row_1[columns[1].clone()]];
                let (evens, odds) = (sources[even], sources[1 - even]);
                let row = &mut plane[h * self.width..][..self.width];
                interleave(evens, odds, row, write);
            }
        }
    }

    /// The image row of padded row r, if it is one.
    fn image_row(&self, r: usize) -> Option<usize> {
        r.checked_sub(self.window.padding)
            .filter(|&h| h < self.height)
    }

    /// The columns k of a column phase q that hold image columns (k·s + q − p inside 0..W),
    /// and the image column of the first.
    fn phase_columns(&self, q: usize) -> (Range<usize>, usize) {
        let (stride, p) = (self.window.stride, self.window.padding);
        let start = p.saturating_sub(q).div_ceil(stride);
        let end = (self.width + p)
            .saturating_sub(q)
            .div_ceil(stride)
            .max(start);
        (start..end, (start * stride + q).saturating_sub(p))
    }
}

/// `evens[k] = row[2k]`, `odds[k] = row[2k + 1]`.
fn deinterleave<T: Element>(row: &[T], evens: &mut [T], odds: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(row: &[T], evens: &mut [T], odds: &mut [T]) {
            deinterleave_any(row, evens, odds)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(row, evens, odds) };
    }
    deinterleave_any(row, evens, odds)
}

#[inline(always)]
fn deinterleave_any<T: Element>(row: &[T], evens: &mut [T], odds: &mut [T]) {
    let (evens, odds) = (
        &mut evens[..row.len().div_ceil(2)],
        &mut odds[..row.len() / 2],
    );
    let pairs = row.chunks_exact(2);
    if let [last] = pairs.remainder() {
        evens[row.len() / 2] = *last;
    }
    for ((pair, even), odd) in pairs.zip(evens.iter_mut()).zip(odds.iter_mut()) {
        *even = pair[0];
        *odd = pair[1];
    }
}

/// `row[2k] += evens[k]`, `row[2k + 1] += odds[k]` (or `=`, as `write` says).
fn interleave<T: Element>(evens: &[T], odds: &[T], row: &mut [T], write: GradWrite) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn wide<T: Element>(evens: &[T], odds: &[T], row: &mut [T], write: GradWrite) {
            interleave_any(evens, odds, row, write)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { wide(evens, odds, row, write) };
    }
    interleave_any(evens, odds, row, write)
}

#[inline(always)]
fn interleave_any<T: Element>(evens: &[T], odds: &[T], row: &mut [T], write: GradWrite) {
    let (evens, odds) = (&evens[..row.len().div_ceil(2)], &odds[..row.len() / 2]);
    let last = row.len() / 2;
    let mut pairs = row.chunks_exact_mut(2);
    let sources = pairs.by_ref().zip(evens).zip(odds);
    match write {
        GradWrite::Accumulate => sources.for_each(|((pair, &even), &odd)| {
            pair[0] += even;
            pair[1] += odd;
        }),
        GradWrite::Overwrite => sources.for_each(|((pair, &even), &odd)| {
            pair[0] = even;
            pair[1] = odd;
        }),
    }
    if let [tail] = pairs.into_remainder() {
        match write {
            GradWrite::Accumulate => *tail += evens[last],
            GradWrite::Overwrite => *tail = evens[last],
        }
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
