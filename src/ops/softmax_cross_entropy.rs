//! # SoftmaxCrossEntropy: the classification loss
//!
//! ## What
//! The mean over the batch of `−log softmax(logits)[label]`: the negative log-likelihood of the
//! right class under the network's predicted distribution.
//!
//! ## Shapes
//! logits z (N, K), labels (N) in 0..K → loss, a scalar. Saved for backward: the
//! probabilities p (N, K).
//!
//! ## Derivation
//! ```text
//! p[n,k] = exp(z[n,k] − m[n]) / Σ_j exp(z[n,j] − m[n])     m[n] = max_j z[n,j]
//! L = −(1/N) Σₙ log p[n, yₙ]
//! ∂L/∂z[n,k] = (p[n,k] − 1[k = yₙ]) / N
//! ```
//! Subtracting the row maximum `m[n]` changes nothing mathematically (it cancels in the ratio) but
//! keeps every exp ≤ 1, so large logits cannot overflow; log p is computed as
//! (z − m) − log Σ exp(z − m), never as the log of a rounded probability.
//!
//! ## Cost
//! Forward about 3·N·K operations plus N·K exps; backward N·K.

use super::{accumulating, check_ndim, check_same, dims, dims_mut};
use crate::element::{count, Element};
use crate::error::{Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId};
use crate::ops::Operation;
use ndarray::{ArrayD, ArrayView2, ArrayViewMut2, Axis, IxDyn, Slice};

const OP: &str = "softmax_cross_entropy";

/// The node on the tape, with what backward needs: the labels, and the probabilities the
/// forward pass computed (N, K).
#[derive(Clone, Debug)]
pub struct SoftmaxCrossEntropy<T> {
    labels: Vec<usize>,
    probs: ArrayD<T>,
}

impl<T: Element> Graph<T> {
    /// Mean softmax cross-entropy of `logits` (N, K); labels are set with [`Graph::set_labels`].
    pub fn softmax_cross_entropy(&mut self, logits: NodeId) -> Result<NodeId> {
        let op = SoftmaxCrossEntropy {
            labels: Vec::new(),
            probs: ArrayD::zeros(IxDyn(&[0, 0])),
        };
        self.push_op(op, &[logits])
    }

    /// Sets the class labels of a softmax cross-entropy node (checked against the logits at
    /// forward).
    pub fn set_labels(&mut self, loss: NodeId, labels: &[usize]) -> Result<()> {
        let what = "labels can only be set on a softmax_cross_entropy node";
        let op = self.op_mut::<SoftmaxCrossEntropy<T>>(loss, what)?;
        op.labels.clear();
        op.labels.extend_from_slice(labels);
        Ok(())
    }
}

impl<T: Element> Operation<T> for SoftmaxCrossEntropy<T> {
    fn kind(&self) -> &'static str {
        OP
    }

    /// The mean mixes every sample.
    fn batched(&self, _: &[bool]) -> bool {
        false
    }

    fn forward(&mut self, mut pass: Forward<'_, T>) -> Result<()> {
        let logits = pass.inputs.get(0);
        check_ndim(OP, "logits (N, K)", logits.shape(), 2)?;
        crate::graph::resize(&mut self.probs, logits.shape())?;
        let probs = dims_mut(OP, self.probs.view_mut())?;
        let loss = forward(dims(OP, logits)?, &self.labels, probs)?;
        pass.output(&[])?.fill(loss);
        Ok(())
    }

    fn backward(&self, pass: Backward<'_, T>) -> Result<()> {
        let rows = pass.rows();
        let Backward { dy, mut inputs, .. } = pass;
        let (_, Some(dlogits)) = accumulating(OP, inputs.port(0)?)? else {
            return Ok(());
        };
        // The mean is over the whole batch, whichever rows this pass covers.
        let batch = self.probs.shape()[0];
        let rows = rows.unwrap_or(0..batch);
        let probs = self
            .probs
            .view()
            .slice_axis_move(Axis(0), Slice::from(rows.clone()));
        let labels = self.labels.get(rows).unwrap_or_default();
        let dloss = dy.iter().copied().sum();
        backward_part(dims(OP, probs)?, labels, dloss, batch, dlogits)
    }

    fn saved_elements(&self) -> usize {
        self.labels.capacity() + self.probs.len()
    }
}

/// Checks logits (N, K) against the labels and returns (N, K).
pub fn check<T>(logits: &ArrayView2<T>, labels: &[usize]) -> Result<(usize, usize)> {
    check_ndim(OP, "logits (N, K)", logits.shape(), 2)?;
    let (batch, classes) = logits.dim();
    if batch == 0 {
        return Err(Error::EmptyBatch { op: OP });
    }
    if classes == 0 {
        return Err(Error::invalid_shape(
            OP,
            "there must be at least one class",
            logits.shape(),
        ));
    }
    if labels.len() != batch {
        return Err(Error::shape_mismatch(
            OP,
            "number of labels",
            batch.to_string(),
            labels.len().to_string(),
        ));
    }
    if let Some((sample, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
        return Err(Error::LabelOutOfRange {
            op: OP,
            sample,
            label,
            classes,
        });
    }
    Ok((batch, classes))
}

/// Forward: returns the mean loss and writes the probabilities into `probs`.
pub fn forward<T: Element>(
    logits: ArrayView2<T>,
    labels: &[usize],
    mut probs: ArrayViewMut2<T>,
) -> Result<T> {
    let (batch, _) = check(&logits, labels)?;
    check_same(OP, "probabilities", logits.shape(), probs.shape())?;
    let mut total = T::zero();
    for ((z, mut p), &label) in logits.outer_iter().zip(probs.outer_iter_mut()).zip(labels) {
        let max = z.fold(T::neg_infinity(), |m, &v| m.max(v));
        p.zip_mut_with(&z, |p, &z| *p = (z - max).exp());
        let sum = p.sum();
        p /= sum;
        total -= (z[label] - max) - sum.ln();
    }
    Ok(total / count::<T>(batch))
}

/// Backward: dz += dloss·(p − onehot(y)) / N.
pub fn backward<T: Element>(
    probs: ArrayView2<T>,
    labels: &[usize],
    dloss: T,
    dlogits: ArrayViewMut2<T>,
) -> Result<()> {
    let batch = probs.nrows();
    backward_part(probs, labels, dloss, batch, dlogits)
}

/// [`backward`] for some of the rows of a batch of `batch` samples (the mean is over all of
/// them): `probs`, `labels` and `dlogits` hold those rows only. The tape uses it to run its
/// backward pass a few samples at a time.
pub fn backward_part<T: Element>(
    probs: ArrayView2<T>,
    labels: &[usize],
    dloss: T,
    batch: usize,
    mut dlogits: ArrayViewMut2<T>,
) -> Result<()> {
    let (rows, _) = check(&probs, labels)?;
    check_same(OP, "logits gradient", probs.shape(), dlogits.shape())?;
    if rows > batch {
        return Err(Error::invalid_config(
            OP,
            format!("{rows} rows cannot be part of a batch of {batch}"),
        ));
    }
    let scale = dloss / count::<T>(batch);
    for ((p, mut dz), &label) in probs.outer_iter().zip(dlogits.outer_iter_mut()).zip(labels) {
        dz.zip_mut_with(&p, |dz, &p| *dz += scale * p);
        dz[label] -= scale;
    }
    Ok(())
}

/// The specification's softmax normalizer of row n: m = maxₖ z[n,k] and Σₖ exp(z[n,k] − m).
fn reference_normalizer<T: Element>(logits: &ArrayView2<T>, n: usize) -> (T, T) {
    let classes = logits.ncols();
    let mut max = logits[[n, 0]];
    for k in 1..classes {
        max = max.max(logits[[n, k]]);
    }
    let mut sum = T::zero();
    for k in 0..classes {
        sum += (logits[[n, k]] - max).exp();
    }
    (max, sum)
}

/// The specification: the loss from its formula, with explicit loops.
pub fn forward_reference<T: Element>(logits: ArrayView2<T>, labels: &[usize]) -> Result<T> {
    let (batch, _) = check(&logits, labels)?;
    let mut total = T::zero();
    for n in 0..batch {
        let (max, sum) = reference_normalizer(&logits, n);
        total += sum.ln() - (logits[[n, labels[n]]] - max);
    }
    Ok(total / count::<T>(batch))
}

/// The specification of the backward pass, recomputing p from the logits.
pub fn backward_reference<T: Element>(
    logits: ArrayView2<T>,
    labels: &[usize],
    dloss: T,
    mut dlogits: ArrayViewMut2<T>,
) -> Result<()> {
    let (batch, classes) = check(&logits, labels)?;
    check_same(OP, "logits gradient", logits.shape(), dlogits.shape())?;
    for n in 0..batch {
        let (max, sum) = reference_normalizer(&logits, n);
        for k in 0..classes {
            let p = (logits[[n, k]] - max).exp() / sum;
            let onehot = if k == labels[n] { T::one() } else { T::zero() };
            dlogits[[n, k]] += dloss * (p - onehot) / count::<T>(batch);
        }
    }
    Ok(())
}
