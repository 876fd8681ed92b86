//! # BatchNorm: normalise every channel, then scale and shift it
//!
//! ## What
//! Each channel c is normalised to zero mean and unit variance, then scaled by γ_c and shifted by
//! β_c. In training mode the mean and variance are those of the batch (over N, H and W), and
//! running averages of them are kept; in evaluation mode the running averages are used. As
//! PyTorch's `BatchNorm2d`: ε = 1e-5, momentum 0.1, the *biased* variance normalises, the
//! *unbiased* one enters the running average.
//!
//! ## Shapes
//! x (N, C, H, W), weight γ (C), bias β (C) → y (N, C, H, W). M = N·H·W values per channel.
//! Running mean and variance (C) live in the node; saved for backward: the mean μ (C) and
//! s = 1/√(σ² + ε) (C) the last forward pass normalised with.
//!
//! ## Derivation
//! Forward, per channel c (sums over the M positions i = (n, h, w)):
//! ```text
//! μ = (1/M) Σᵢ xᵢ          σ² = (1/M) Σᵢ (xᵢ − μ)²          s = 1/√(σ² + ε)
//! x̂ᵢ = (xᵢ − μ)·s          yᵢ = γ·x̂ᵢ + β
//! running_mean ← (1 − m)·running_mean + m·μ
//! running_var  ← (1 − m)·running_var  + m·σ²·M/(M − 1)
//! ```
//! Backward, with gᵢ = ∂L/∂yᵢ. The scale and shift are direct:
//! ```text
//! ∂L/∂β = Σᵢ gᵢ            ∂L/∂γ = Σᵢ gᵢ·x̂ᵢ            ∂L/∂x̂ᵢ = γ·gᵢ
//! ```
//! In training mode μ and s depend on every xⱼ of the channel, so each xⱼ reaches L through
//! x̂ⱼ directly and through μ and σ²:
//! ```text
//! ∂μ/∂xⱼ = 1/M             ∂σ²/∂xⱼ = 2(xⱼ − μ)/M   (the Σᵢ (xᵢ − μ)·∂μ/∂xⱼ term is 0)
//! ∂x̂ᵢ/∂xⱼ = s·(δᵢⱼ − 1/M) − (xᵢ − μ)·s³·(xⱼ − μ)/M = s·(δᵢⱼ − 1/M − x̂ᵢ·x̂ⱼ/M)
//! ∂L/∂xⱼ = Σᵢ γgᵢ·∂x̂ᵢ/∂xⱼ = (γ·s/M)·(M·gⱼ − Σᵢ gᵢ − x̂ⱼ·Σᵢ gᵢ·x̂ᵢ)
//! ```
//! In evaluation mode μ and s are constants: ∂L/∂xⱼ = γ·s·gⱼ.
//!
//! ## Fused ReLU and ReLU6
//! Batch norm is nearly always followed by a ReLU; `batch_norm_relu` computes
//! y = max(γ·x̂ + β, 0) in the same pass, `batch_norm_relu6` MobileNet's min(max(·, 0), 6).
//! The backward pass replaces g by g·𝟙(0 < z) (or 𝟙(0 < z < 6)) in every formula above, with
//! z = γ·x̂ + β computed again from x, which it reads anyway (the same operations, so the same
//! bits): the activation costs no pass and no buffer of its own.
//!
//! ## Cost
//! Forward: two passes over x for the statistics (training) and one to normalise; about 5
//! operations per value. Backward: two passes over x and g (Σ g and Σ g·x̂ together, then dx).
//! No GEMM.

use super::{
    accumulating, check_image, check_same, dims, dims_mut, sum_pairs, two_sums_of_pairs, zip_values,
};
use crate::cost::Cost;
use crate::element::{count, Element};
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId, Port};
use crate::ops::relu::Relu;
use crate::ops::{GradWrite, Operation};
use crate::parallel::{in_parts, Along};
use ndarray::{
    Array1, ArrayD, ArrayView1, ArrayView3, ArrayView4, ArrayViewD, ArrayViewMut1, ArrayViewMut3,
    ArrayViewMut4, Axis, Ix1, Zip,
};

const OP: &str = "batch_norm";

/// PyTorch's defaults.
pub const EPS: f64 = 1e-5;
pub const MOMENTUM: f64 = 0.1;

/// The node on the tape: its running statistics, and what the last forward pass normalised
/// with (the mean μ and s = 1/√(σ² + ε) per channel, and whether they were the batch's).
#[derive(Clone, Debug)]
pub struct BatchNorm<T> {
    running_mean: Array1<T>,
    running_var: Array1<T>,
    batches_tracked: u64,
    mean: Array1<T>,
    inv_std: Array1<T>,
    batch_statistics: bool,
    /// The fused ReLU or ReLU6 after the shift, if any.
    activation: Option<Relu>,
}

impl<T: Element> Graph<T> {
    /// Batch normalisation of `input` (N, C, H, W) with scale `weight` γ (C) and shift `bias`
    /// β (C), both parameters; running mean 0 and variance 1 to start, ε = 1e-5, momentum 0.1.
    /// Training or evaluation mode follows [`Graph::set_training`].
    pub fn batch_norm(&mut self, input: NodeId, weight: NodeId, bias: NodeId) -> Result<NodeId> {
        self.push_batch_norm(input, weight, bias, None)
    }

    /// The fused max(batch_norm(...), 0): the same values as `relu(batch_norm(...))` with one
    /// buffer and one pass instead of two.
    pub fn batch_norm_relu(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: NodeId,
    ) -> Result<NodeId> {
        self.push_batch_norm(input, weight, bias, Some(Relu::Plain))
    }

    /// The fused min(max(batch_norm(...), 0), 6): the same values as
    /// `relu6(batch_norm(...))` with one buffer and one pass instead of two (MobileNetV2's
    /// batch norms after its expansions and depthwise convolutions).
    pub fn batch_norm_relu6(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: NodeId,
    ) -> Result<NodeId> {
        self.push_batch_norm(input, weight, bias, Some(Relu::Six))
    }

    fn push_batch_norm(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: NodeId,
        activation: Option<Relu>,
    ) -> Result<NodeId> {
        let channels = self.param_shape(OP, "weight", weight)?.to_vec();
        check_weights(&channels, Some(self.param_shape(OP, "bias", bias)?))?;
        let op = BatchNorm {
            running_mean: Array1::zeros(channels[0]),
            running_var: Array1::ones(channels[0]),
            batches_tracked: 0,
            mean: Array1::zeros(channels[0]),
            inv_std: Array1::zeros(channels[0]),
            batch_statistics: true,
            activation,
        };
        self.push_layer(op, [input, weight], Some(bias), check_weights)
    }

    /// The running mean and variance of a batch-norm node, and the number of training batches
    /// they average (PyTorch's `running_mean`, `running_var`, `num_batches_tracked`).
    pub fn running_stats(&self, id: NodeId) -> Result<(ArrayView1<'_, T>, ArrayView1<'_, T>, u64)> {
        let op = self
            .op_ref::<BatchNorm<T>>(id)
            .ok_or_else(|| Error::graph(format!("node {} is not a batch_norm node", id.index())))?;
        Ok((
            op.running_mean.view(),
            op.running_var.view(),
            op.batches_tracked,
        ))
    }

    /// Replaces the running statistics of a batch-norm node (loading trained weights).
    pub fn set_running_stats(
        &mut self,
        id: NodeId,
        mean: ArrayView1<T>,
        var: ArrayView1<T>,
        batches_tracked: u64,
    ) -> Result<()> {
        let op = self.op_mut::<BatchNorm<T>>(id, "running statistics exist on batch_norm nodes")?;
        check_same(OP, "running mean", op.running_mean.shape(), mean.shape())?;
        check_same(OP, "running variance", op.running_var.shape(), var.shape())?;
        if var.iter().any(|v| !(v.is_finite() && *v >= T::zero()))
            || mean.iter().any(|v| !v.is_finite())
        {
            return Err(Error::invalid_config(
                OP,
                "running statistics must be finite, the variance ≥ 0",
            ));
        }
        op.running_mean.assign(&mean);
        op.running_var.assign(&var);
        op.batches_tracked = batches_tracked;
        Ok(())
    }
}

impl<T: Element> Operation<T> for BatchNorm<T> {
    fn kind(&self) -> &'static str {
        match self.activation {
            None => OP,
            Some(Relu::Plain) => "batch_norm+relu",
            Some(Relu::Six) => "batch_norm+relu6",
        }
    }

    /// In training mode every output depends on the whole batch (through μ and σ²).
    fn batched(&self, _: &[bool]) -> bool {
        false
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let (x, weight, bias) = (pass.inputs.get(0), pass.inputs.get(1), pass.inputs.get(2));
        let x: ArrayView4<T> = dims(OP, x)?;
        let shape = output_shape(x.shape(), weight.shape())?;
        self.batch_statistics = pass.training;
        let eps = T::from_f64(EPS);
        if self.batch_statistics {
            let values = shape[0] * shape[2] * shape[3];
            if values < 2 {
                return Err(Error::invalid_shape(
                    OP,
                    "training mode needs more than one value per channel (N·H·W ≥ 2)",
                    x.shape(),
                ));
            }
            statistics(x, self.mean.view_mut(), self.inv_std.view_mut())?;
            // inv_std holds the biased variance here: update the running averages first.
            let (m, unbiased) = (
                T::from_f64(MOMENTUM),
                count::<T>(values) / count::<T>(values - 1),
            );
            Zip::from(&mut self.running_mean)
                .and(&self.mean)
                .for_each(|r, &mean| *r = (T::one() - m) * *r + m * mean);
            Zip::from(&mut self.running_var)
                .and(&self.inv_std)
                .for_each(|r, &var| *r = (T::one() - m) * *r + m * var * unbiased);
            self.inv_std
                .mapv_inplace(|var| T::one() / (var + eps).sqrt());
            self.batches_tracked += 1;
        } else {
            self.mean.assign(&self.running_mean);
            Zip::from(&mut self.inv_std)
                .and(&self.running_var)
                .for_each(|s, &var| *s = T::one() / (var + eps).sqrt());
        }
        let y = dims_mut(OP, pass.output(&shape)?)?;
        let (weight, bias) = (dims(OP, weight)?, dims(OP, bias)?);
        let saved = self.saved();
        normalize(x, weight, bias, saved, self.activation, y)
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        let [Port { value: x, grad: dx }, weight, bias] = inputs.ports::<3>()?;
        let (weight, dweight) = accumulating(OP, weight)?;
        let (bias, dbias) = accumulating::<T, Ix1>(OP, bias)?;
        // With a fused activation, β too: where γ·x̂ + β ≤ 0 (or ≥ 6) the gradient stops.
        let activation = self.activation.map(|activation| (activation, bias));
        let saved = self.saved();
        let dx = match dx {
            Some((dx, write)) => Some((dims_mut(OP, dx)?, write)),
            None => None,
        };
        let (x, dy) = (dims(OP, x)?, dims(OP, dy.view())?);
        gradients(x, weight, activation, saved, dy, dx, dweight, dbias)
    }

    /// γ and β: no multiply-adds of the GEMM kind (about 5 operations per value, O(elements)).
    fn cost(&self, inputs: &[&[usize]], _output: &[usize], _input_grad: bool) -> Cost {
        Cost {
            params: 2 * inputs[1][0],
            ..Cost::default()
        }
    }

    fn saved_elements(&self) -> usize {
        4 * self.mean.len()
    }
}

impl<T: Element> BatchNorm<T> {
    fn saved(&self) -> Saved<'_, T> {
        Saved {
            mean: self.mean.view(),
            inv_std: self.inv_std.view(),
            batch_statistics: self.batch_statistics,
        }
    }
}

/// Whether a node of `kind` is a batch norm (plain or with a fused activation): all keep
/// running statistics.
pub(crate) fn is_batch_norm(kind: &str) -> bool {
    matches!(kind, OP | "batch_norm+relu" | "batch_norm+relu6")
}

/// Checks x (N, C, H, W) against γ (C); returns the output shape.
pub fn output_shape(x: &[usize], weight: &[usize]) -> Result<[usize; 4]> {
    let shape = check_image(OP, x)?;
    check_same(OP, "weight (C)", &shape[1..2], weight)?;
    Ok(shape)
}

/// Checks γ (C) and β (C).
fn check_weights(weight: &[usize], bias: Option<&[usize]>) -> Result<()> {
    super::check_ndim(OP, "weight (C)", weight, 1)?;
    check_same(OP, "bias", weight, bias.unwrap_or(&[]))
}

/// What the backward pass needs from the forward one.
#[derive(Clone, Copy, Debug)]
pub struct Saved<'a, T> {
    /// μ per channel.
    pub mean: ArrayView1<'a, T>,
    /// s = 1/√(σ² + ε) per channel.
    pub inv_std: ArrayView1<'a, T>,
    /// Whether μ and s were the batch's (training) or constants (evaluation).
    pub batch_statistics: bool,
}

// ---------------------------------------------------------------- forward and backward

/// The batch's statistics per channel: μ into `mean`, the biased variance σ² into `var`; the
/// channels split between the threads.
pub fn statistics<T: Element>(
    x: ArrayView4<T>,
    mean: ArrayViewMut1<T>,
    var: ArrayViewMut1<T>,
) -> Result<()> {
    check_same(OP, "mean", &x.shape()[1..2], mean.shape())?;
    check_same(OP, "variance", &x.shape()[1..2], var.shape())?;
    let values = count::<T>(x.len() / x.shape()[1].max(1));
    let parts = (0..x.shape()[1], (Along(mean, Axis(0)), Along(var, Axis(0))));
    in_parts(parts, &|(
        channels,
        (Along(mut mean, _), Along(mut var, _)),
    )| {
        for (i, c) in channels.enumerate() {
            let planes = x.index_axis(Axis(1), c);
            let sums = planes.outer_iter().map(|p| sum_pairs(p, p, |v, _| v));
            let mu = sums.sum::<T>() / values;
            // Two passes: the squared deviations from the mean, not E[x²] − μ², which cancels.
            let squares = planes
                .outer_iter()
                .map(|p| sum_pairs(p, p, |v, _| (v - mu) * (v - mu)));
            (mean[i], var[i]) = (mu, squares.sum::<T>() / values);
        }
        Ok(())
    })
}

/// Forward: y = γ·(x − μ)·s + β, per channel; the channels split between the threads.
pub fn forward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView1<T>,
    bias: ArrayView1<T>,
    mean: ArrayView1<T>,
    inv_std: ArrayView1<T>,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let saved = Saved {
        mean,
        inv_std,
        batch_statistics: true,
    };
    normalize(x, weight, bias, saved, None, y)
}

/// y = γ·(x − μ)·s + β, and the activation, if any, in the same pass.
fn normalize<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView1<T>,
    bias: ArrayView1<T>,
    Saved { mean, inv_std, .. }: Saved<'_, T>,
    activation: Option<Relu>,
    y: ArrayViewMut4<T>,
) -> Result<()> {
    let expected = output_shape(x.shape(), weight.shape())?;
    check_same(OP, "output", &expected, y.shape())?;
    for (what, values) in [
        ("bias", &bias),
        ("mean", &mean),
        ("inverse deviation", &inv_std),
    ] {
        check_same(OP, what, weight.shape(), values.shape())?;
    }
    in_parts((0..x.shape()[1], Along(y, Axis(1))), &|(
        channels,
        Along(mut y, _),
    )| {
        for (i, c) in channels.enumerate() {
            let scale = weight[c] * inv_std[c];
            let shift = bias[c] - scale * mean[c];
            // Plane by plane (contiguous in a standard layout), each loop compiled for one
            // function; the activation keeps NaN, as PyTorch's does.
            let six = T::from_f64(6.0);
            let (mut y_c, x_c) = (y.index_axis_mut(Axis(1), i), x.index_axis(Axis(1), c));
            for (y, x) in y_c.outer_iter_mut().zip(x_c.outer_iter()) {
                match activation {
                    None => zip_values(y, x, x, |_, x, _| scale * x + shift),
                    Some(Relu::Plain) => {
                        zip_values(y, x, x, |_, x, _| Relu::Plain.value(scale * x + shift))
                    }
                    Some(Relu::Six) => zip_values(y, x, x, |_, x, _| {
                        // Written out, with 6 built once: through `Relu::Six.value` (the same
                        // selects) this loop took 180–198 ms of a MobileNetV2 step against
                        // 105–129 (batch 16, 1 thread); why was not found. A NaN compares
                        // false and stays.
                        let v = scale * x + shift;
                        let v = if v <= T::zero() { T::zero() } else { v };
                        if v >= six {
                            six
                        } else {
                            v
                        }
                    }),
                }
            }
        }
        Ok(())
    })
}

/// Backward: dβ += Σ g, dγ += Σ g·x̂, and dx += (γs/M)·(M·g − Σ g − x̂·Σ g·x̂) with batch
/// statistics, or dx += γ·s·g with constant ones; the channels split between the threads.
pub fn backward<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView1<T>,
    saved: Saved<'_, T>,
    dy: ArrayView4<T>,
    dx: Option<ArrayViewMut4<T>>,
    dweight: Option<ArrayViewMut1<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let dx = dx.map(|dx| (dx, GradWrite::Accumulate));
    gradients(x, weight, None, saved, dy, dx, dweight, dbias)
}

/// The backward pass with dx written as its [`GradWrite`] says (`=` into a gradient that holds
/// no contribution yet, so that it needs no pass of zeros first); `activation` holds a fused
/// ReLU or ReLU6 and β, whose gate, g·𝟙(0 < γ·x̂ + β) or g·𝟙(0 < γ·x̂ + β < 6), replaces g.
#[allow(clippy::too_many_arguments)]
fn gradients<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView1<T>,
    activation: Option<(Relu, ArrayView1<T>)>,
    saved: Saved<'_, T>,
    dy: ArrayView4<T>,
    dx: Option<(ArrayViewMut4<T>, GradWrite)>,
    dweight: Option<ArrayViewMut1<T>>,
    dbias: Option<ArrayViewMut1<T>>,
) -> Result<()> {
    let expected = output_shape(x.shape(), weight.shape())?;
    check_same(OP, "output gradient", &expected, dy.shape())?;
    let write = dx
        .as_ref()
        .map_or(GradWrite::Accumulate, |(_, write)| *write);
    let dx = dx.map(|(dx, _)| dx);
    if let Some(dx) = &dx {
        check_same(OP, "input gradient", x.shape(), dx.shape())?;
    }
    for (what, values) in [("mean", &saved.mean), ("inverse deviation", &saved.inv_std)] {
        check_same(OP, what, weight.shape(), values.shape())?;
    }
    if let Some((_, bias)) = &activation {
        check_same(OP, "bias", weight.shape(), bias.shape())?;
    }
    for (what, buffer) in [("weight gradient", &dweight), ("bias gradient", &dbias)] {
        if let Some(buffer) = buffer {
            check_same(OP, what, weight.shape(), buffer.shape())?;
        }
    }
    let values = count::<T>(x.len() / x.shape()[1].max(1));
    let buffers = (
        dx.map(|dx| Along(dx, Axis(1))),
        (
            dweight.map(|d| Along(d, Axis(0))),
            dbias.map(|d| Along(d, Axis(0))),
        ),
    );
    in_parts((0..x.shape()[1], buffers), &|(
        channels,
        (mut dx, (mut dweight, mut dbias)),
    )| {
        for (i, c) in channels.enumerate() {
            let (mu, s) = (saved.mean[c], saved.inv_std[c]);
            let scale = weight[c] * s;
            // The forward pass's own expression for z before the activation, so the same bits.
            let shift = activation
                .as_ref()
                .map(|(activation, bias)| (*activation, bias[c] - scale * mu));
            let (x_c, g_c) = (x.index_axis(Axis(1), c), dy.index_axis(Axis(1), c));
            let dx_c = dx
                .as_mut()
                .map(|Along(dx, _)| dx.index_axis_mut(Axis(1), i));
            let channel = Channel {
                x: x_c,
                g: g_c,
                mu,
                s,
                scale,
                values: saved.batch_statistics.then_some(values),
            };
            // Each gate compiled into loops of its own. Chosen inside them, per value, it kept
            // the loops from being vectorised: batch norm + ReLU6's backward on 96 channels at
            // 112×112, batch 16, 1 thread, took 36.7 ms against 20.2 now (144 at 56×56: 14.8
            // against 8.3; 960 at 7×7: 3.25 against 2.33; fastest of 5 runs, builds alternating).
            let (sum_g, sum_g_xhat) = match shift {
                None => channel.gradients(dx_c, write, |_, g| g),
                Some((Relu::Plain, shift)) => {
                    channel.gradients(dx_c, write, |x, g| Relu::Plain.gate(scale * x + shift, g))
                }
                Some((Relu::Six, shift)) => {
                    channel.gradients(dx_c, write, |x, g| Relu::Six.gate(scale * x + shift, g))
                }
            };
            if let Some(Along(dbias, _)) = dbias.as_mut() {
                dbias[i] += sum_g;
            }
            if let Some(Along(dweight, _)) = dweight.as_mut() {
                dweight[i] += sum_g_xhat;
            }
        }
        Ok(())
    })
}

/// One channel's x and g (N, H, W) in the backward pass, with its μ, s, γ·s and, with batch
/// statistics, the count M of its values.
struct Channel<'a, T> {
    x: ArrayView3<'a, T>,
    g: ArrayView3<'a, T>,
    mu: T,
    s: T,
    scale: T,
    values: Option<T>,
}

impl<T: Element> Channel<'_, T> {
    /// Returns (Σ g, Σ g·x̂), with g = gate(x, g), and writes dx if given.
    fn gradients(
        &self,
        dx: Option<ArrayViewMut3<T>>,
        write: GradWrite,
        gate: impl Fn(T, T) -> T,
    ) -> (T, T) {
        let Channel { mu, s, scale, .. } = *self;
        let planes = self.x.outer_iter().zip(self.g.outer_iter());
        let (sum_g, sum_g_xc) = planes
            .map(|(x, g)| {
                two_sums_of_pairs(x, g, |x, g| {
                    let g = gate(x, g);
                    (g, g * (x - mu))
                })
            })
            .fold((T::zero(), T::zero()), |(a, b), (c, d)| (a + c, b + d));
        let sum_g_xhat = s * sum_g_xc;
        let Some(mut dx) = dx else {
            return (sum_g, sum_g_xhat);
        };
        let (mean_g, mean_g_xhat) = match self.values {
            Some(values) => (sum_g / values, sum_g_xhat / values),
            None => (T::zero(), T::zero()),
        };
        let gradient = |x: T, g: T| scale * (gate(x, g) - mean_g - (x - mu) * s * mean_g_xhat);
        let planes = dx
            .outer_iter_mut()
            .zip(self.x.outer_iter().zip(self.g.outer_iter()));
        for (dx, (x, g)) in planes {
            match write {
                GradWrite::Overwrite => zip_values(dx, x, g, |_, x, g| gradient(x, g)),
                GradWrite::Accumulate => zip_values(dx, x, g, |dx, x, g| dx + gradient(x, g)),
            }
        }
        (sum_g, sum_g_xhat)
    }
}

// ---------------------------------------------------------------- reference loops

/// The specification in training mode, by index loops: returns y, the batch mean and the
/// biased variance per channel.
pub fn forward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView1<T>,
    bias: ArrayView1<T>,
) -> Result<(ArrayD<T>, Array1<T>, Array1<T>)> {
    let [batch, channels, height, width] = output_shape(x.shape(), weight.shape())?;
    let values = count::<T>(batch * height * width);
    let mut y = ArrayD::zeros(x.shape());
    let (mut mean, mut var) = (Array1::zeros(channels), Array1::zeros(channels));
    for c in 0..channels {
        let (mut sum, mut squares) = (T::zero(), T::zero());
        for n in 0..batch {
            for h in 0..height {
                for w in 0..width {
                    sum += x[[n, c, h, w]];
                }
            }
        }
        mean[c] = sum / values;
        for n in 0..batch {
            for h in 0..height {
                for w in 0..width {
                    squares += (x[[n, c, h, w]] - mean[c]) * (x[[n, c, h, w]] - mean[c]);
                }
            }
        }
        var[c] = squares / values;
        let s = T::one() / (var[c] + T::from_f64(EPS)).sqrt();
        for n in 0..batch {
            for h in 0..height {
                for w in 0..width {
                    y[[n, c, h, w]] = weight[c] * (x[[n, c, h, w]] - mean[c]) * s + bias[c];
                }
            }
        }
    }
    Ok((y, mean, var))
}

/// The specification of the training-mode backward pass: the double sum
/// ∂L/∂xⱼ = Σᵢ γ·gᵢ·s·(δᵢⱼ − 1/M − x̂ᵢ·x̂ⱼ/M) term by term (O(M²) per channel, for small
/// tests), and the sums for γ and β. Returns (dx, dγ, dβ).
pub fn backward_reference<T: Element>(
    x: ArrayView4<T>,
    weight: ArrayView1<T>,
    dy: ArrayView4<T>,
) -> Result<(ArrayD<T>, Array1<T>, Array1<T>)> {
    let (_, mean, var) = forward_reference(x, weight, weight)?;
    let [batch, channels, height, width] = output_shape(x.shape(), weight.shape())?;
    let values = count::<T>(batch * height * width);
    let positions: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|n| (0..height).flat_map(move |h| (0..width).map(move |w| (n, h, w))))
        .collect();
    let mut dx = ArrayD::zeros(x.shape());
    let (mut dweight, mut dbias) = (Array1::zeros(channels), Array1::zeros(channels));
    for c in 0..channels {
        let s = T::one() / (var[c] + T::from_f64(EPS)).sqrt();
        let xhat = |(n, h, w): (usize, usize, usize)| (x[[n, c, h, w]] - mean[c]) * s;
        for &i in &positions {
            let g = dy[[i.0, c, i.1, i.2]];
            dbias[c] += g;
            dweight[c] += g * xhat(i);
            for &j in &positions {
                let delta = if i == j { T::one() } else { T::zero() };
                let derivative = s * (delta - T::one() / values - xhat(i) * xhat(j) / values);
                dx[[j.0, c, j.1, j.2]] += weight[c] * g * derivative;
            }
        }
    }
    Ok((dx, dweight, dbias))
}

// ---------------------------------------------------------------- folding into a convolution

/// The weight and bias of one convolution equal to `conv` (weight (F1, …) with an optional
/// bias (F1)) followed by an evaluation-mode batch norm (γ, β, running mean and variance, ε):
/// per output channel o, with kₒ = γₒ/√(varₒ + ε),
/// ```text
/// W′[o, …] = kₒ·W[o, …]          b′ₒ = kₒ·(bₒ − meanₒ) + βₒ
/// ```
/// since γ·(W·x + b − mean)/√(var + ε) + β = (k·W)·x + k·(b − mean) + β. Inference then runs
/// one op instead of two.
pub fn fold_into_convolution<T: Element>(
    conv_weight: ArrayViewD<T>,
    conv_bias: Option<ArrayView1<T>>,
    [gamma, beta, running_mean, running_var]: [ArrayView1<T>; 4],
    eps: f64,
) -> Result<(ArrayD<T>, Array1<T>)> {
    let c_out = conv_weight.shape().first().copied().unwrap_or(0);
    for (what, shape) in [
        ("γ", gamma.shape()),
        ("β", beta.shape()),
        ("running mean", running_mean.shape()),
        ("running variance", running_var.shape()),
    ] {
        check_same(OP, what, &[c_out], shape)?;
    }
    if let Some(bias) = &conv_bias {
        check_same(OP, "convolution bias", &[c_out], bias.shape())?;
    }
    let k = Zip::from(&gamma)
        .and(&running_var)
        .map_collect(|&g, &v| g / (v + T::from_f64(eps)).sqrt());
    let mut weight = conv_weight.to_owned();
    for (mut row, &k) in weight.outer_iter_mut().zip(&k) {
        row.mapv_inplace(|w| w * k);
    }
    let bias = Zip::from(&k)
        .and(&running_mean)
        .and(&beta)
        .map_collect(|&k, &mean, &beta| beta - k * mean);
    let bias = match conv_bias {
        Some(conv_bias) => Zip::from(&bias)
            .and(&k)
            .and(&conv_bias)
            .map_collect(|&b, &k, &cb| b + k * cb),
        None => bias,
    };
    Ok((weight, bias))
}
