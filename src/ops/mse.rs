//! # MeanSquaredError: the regression loss
//!
//! ## What
//! The mean over every element of (prediction − target)².
//!
//! ## Shapes
//! prediction and target of the same shape (N, ...) with M elements in all → loss, a scalar.
//!
//! ## Derivation
//! ```text
//! L = (1/M) Σᵢ (pᵢ − tᵢ)²
//! ∂L/∂pᵢ = 2(pᵢ − tᵢ)/M        ∂L/∂tᵢ = −2(pᵢ − tᵢ)/M
//! ```
//!
//! ## Cost
//! Forward 3·M operations; backward 3·M per input that needs a gradient.

use super::check_same;
use crate::element::{count, Element};
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{ArrayViewD, ArrayViewMutD, Zip};

const OP: &str = "mse";

/// The node on the tape, with the element count M of the last forward pass: the mean's
/// denominator when backward runs on part of the batch.
#[derive(Clone, Debug)]
pub struct MeanSquaredError {
    elements: usize,
}

impl<T: Element> Graph<T> {
    /// Mean squared error between `prediction` and `target`.
    pub fn mse(&mut self, prediction: NodeId, target: NodeId) -> Result<NodeId> {
        self.check_distinct(OP, &[prediction, target])?;
        self.push_op(MeanSquaredError { elements: 0 }, &[prediction, target])
    }
}

impl<T: Element> Operation<T> for MeanSquaredError {
    fn kind(&self) -> &'static str {
        OP
    }

    /// The mean mixes every sample.
    fn batched(&self, _: &[bool]) -> bool {
        false
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let (prediction, target) = (pass.inputs.get(0), pass.inputs.get(1));
        let loss = forward(prediction.view(), target.view())?;
        self.elements = prediction.len();
        pass.output(&[])?.fill(loss);
        Ok(())
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let Backward { dy, mut inputs, .. } = pass;
        let dloss = dy.iter().copied().sum();
        let [prediction, target] = inputs.ports::<2>()?;
        let (prediction, dprediction) = prediction.accumulating()?;
        let (target, dtarget) = target.accumulating()?;
        backward_part(
            prediction,
            target,
            dloss,
            self.elements,
            dprediction,
            dtarget,
        )
    }
}

/// Checks that prediction and target agree and are not empty; returns the element count M.
pub fn check<T>(prediction: &ArrayViewD<T>, target: &ArrayViewD<T>) -> Result<usize> {
    check_same(OP, "target", prediction.shape(), target.shape())?;
    if prediction.is_empty() {
        return Err(Error::EmptyBatch { op: OP });
    }
    Ok(prediction.len())
}

/// Forward: the mean squared difference.
pub fn forward<T: Element>(prediction: ArrayViewD<T>, target: ArrayViewD<T>) -> Result<T> {
    let elements = check(&prediction, &target)?;
    let mut total = T::zero();
    Zip::from(&prediction)
        .and(&target)
        .for_each(|&p, &t| total += (p - t) * (p - t));
    Ok(total / count::<T>(elements))
}

/// Backward: dp += dloss·2(p − t)/M and dt −= the same, into whichever buffers are given.
pub fn backward<T: Element>(
    prediction: ArrayViewD<T>,
    target: ArrayViewD<T>,
    dloss: T,
    dprediction: Option<ArrayViewMutD<T>>,
    dtarget: Option<ArrayViewMutD<T>>,
) -> Result<()> {
    let elements = prediction.len();
    backward_part(prediction, target, dloss, elements, dprediction, dtarget)
}

/// [`backward`] for part of the tensors (a few samples of the batch), the mean being over
/// `elements` values in all: how the tape runs its backward pass a few samples at a time.
pub fn backward_part<T: Element>(
    prediction: ArrayViewD<T>,
    target: ArrayViewD<T>,
    dloss: T,
    elements: usize,
    dprediction: Option<ArrayViewMutD<T>>,
    dtarget: Option<ArrayViewMutD<T>>,
) -> Result<()> {
    let part = check(&prediction, &target)?;
    if part > elements {
        return Err(Error::invalid_config(
            OP,
            format!("{part} values cannot be part of a mean over {elements}"),
        ));
    }
    let scale = dloss * T::from_f64(2.0) / count::<T>(elements);
    if let Some(mut dp) = dprediction {
        check_same(OP, "prediction gradient", prediction.shape(), dp.shape())?;
        Zip::from(&mut dp)
            .and(&prediction)
            .and(&target)
            .for_each(|d, &p, &t| *d += scale * (p - t));
    }
    if let Some(mut dt) = dtarget {
        check_same(OP, "target gradient", target.shape(), dt.shape())?;
        Zip::from(&mut dt)
            .and(&prediction)
            .and(&target)
            .for_each(|d, &p, &t| *d -= scale * (p - t));
    }
    Ok(())
}

/// The specification, as a loop over indices.
pub fn forward_reference<T: Element>(
    prediction: ArrayViewD<T>,
    target: ArrayViewD<T>,
) -> Result<T> {
    let elements = check(&prediction, &target)?;
    let mut total = T::zero();
    for (index, &p) in prediction.indexed_iter() {
        let difference = p - target[&index];
        total += difference * difference;
    }
    Ok(total / count::<T>(elements))
}

/// The specification of the backward pass.
pub fn backward_reference<T: Element>(
    prediction: ArrayViewD<T>,
    target: ArrayViewD<T>,
    dloss: T,
    mut dprediction: Option<ArrayViewMutD<T>>,
    mut dtarget: Option<ArrayViewMutD<T>>,
) -> Result<()> {
    let elements = check(&prediction, &target)?;
    if let Some(dp) = &dprediction {
        check_same(OP, "prediction gradient", prediction.shape(), dp.shape())?;
    }
    if let Some(dt) = &dtarget {
        check_same(OP, "target gradient", target.shape(), dt.shape())?;
    }
    for (index, &p) in prediction.indexed_iter() {
        let g = dloss * T::from_f64(2.0) * (p - target[&index]) / count::<T>(elements);
        if let Some(dp) = dprediction.as_mut() {
            dp[&index] += g;
        }
        if let Some(dt) = dtarget.as_mut() {
            dt[&index] -= g;
        }
    }
    Ok(())
}
