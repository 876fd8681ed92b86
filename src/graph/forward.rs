//! The forward pass: every node up to the target, in creation order, each arm calling one op.

use super::{resize, typed, typed_mut};
use super::{Graph, Node, NodeId, Op};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::{
    add, avg_pool, conv1x1, conv2d, global_avg_pool, linear, max_pool, mse, relu,
    softmax_cross_entropy,
};
use ndarray::{ArrayViewD, Ix0, Ix1};

impl<T: Element> Graph<T> {
    /// Evaluates every node up to and including `target`, in creation order.
    pub fn forward(&mut self, target: NodeId) -> Result<()> {
        self.node(target)?;
        for index in 0..=target.0 {
            let (before, rest) = self.nodes.split_at_mut(index);
            let Node {
                name,
                op,
                value,
                has_value,
                ..
            } = &mut rest[0];
            match op {
                Op::Input | Op::Param => {
                    if !*has_value {
                        return Err(Error::graph(format!("input {name:?} was never set")));
                    }
                }
                Op::Conv1x1 {
                    input,
                    weight,
                    bias,
                    relu,
                } => {
                    let (x, w) = (&before[input.0].value, &before[weight.0].value);
                    let b = bias.map(|b| &before[b.0].value);
                    resize(
                        value,
                        &conv1x1::output_shape(x.shape(), w.shape(), b.map(|b| b.shape()))?,
                    );
                    let b = b.map(typed::<T, Ix1>).transpose()?;
                    if *relu {
                        conv1x1::forward_relu(typed(x)?, typed(w)?, b, typed_mut(value)?)?;
                    } else {
                        conv1x1::forward(typed(x)?, typed(w)?, b, typed_mut(value)?)?;
                    }
                }
                Op::Conv2d {
                    input,
                    weight,
                    bias,
                    padding,
                } => {
                    let (x, w) = (&before[input.0].value, &before[weight.0].value);
                    let b = bias.map(|b| &before[b.0].value);
                    let shape =
                        conv2d::output_shape(x.shape(), w.shape(), b.map(|b| b.shape()), *padding)?;
                    resize(value, &shape);
                    let b = b.map(typed::<T, Ix1>).transpose()?;
                    conv2d::forward(typed(x)?, typed(w)?, b, *padding, typed_mut(value)?)?;
                }
                Op::Linear {
                    input,
                    weight,
                    bias,
                } => {
                    let (x, w) = (&before[input.0].value, &before[weight.0].value);
                    let b = bias.map(|b| &before[b.0].value);
                    resize(
                        value,
                        &linear::output_shape(x.shape(), w.shape(), b.map(|b| b.shape()))?,
                    );
                    let b = b.map(typed::<T, Ix1>).transpose()?;
                    linear::forward(typed(x)?, typed(w)?, b, typed_mut(value)?)?;
                }
                Op::Relu { input } => {
                    let x = &before[input.0].value;
                    resize(value, x.shape());
                    relu::forward(x.view(), value.view_mut())?;
                }
                Op::MaxPool {
                    input,
                    window,
                    stride,
                    argmax,
                } => {
                    let x = &before[input.0].value;
                    resize(value, &max_pool::output_shape(x.shape(), *window, *stride)?);
                    argmax.resize(value.len(), 0);
                    max_pool::forward(typed(x)?, *window, *stride, typed_mut(value)?, argmax)?;
                }
                Op::AvgPool {
                    input,
                    window,
                    stride,
                } => {
                    let x = &before[input.0].value;
                    resize(value, &avg_pool::output_shape(x.shape(), *window, *stride)?);
                    avg_pool::forward(typed(x)?, *window, *stride, typed_mut(value)?)?;
                }
                Op::GlobalAvgPool { input } => {
                    let x = &before[input.0].value;
                    resize(value, &global_avg_pool::output_shape(x.shape())?);
                    global_avg_pool::forward(typed(x)?, typed_mut(value)?)?;
                }
                Op::Add { left, right } => {
                    let (a, b) = (&before[left.0].value, &before[right.0].value);
                    resize(value, add::output_shape(a.shape(), b.shape())?);
                    add::forward(a.view(), b.view(), value.view_mut())?;
                }
                Op::SoftmaxCrossEntropy {
                    logits,
                    labels,
                    probs,
                } => {
                    let z = &before[logits.0].value;
                    crate::ops::check_ndim("softmax_cross_entropy", "logits (N, K)", z.shape(), 2)?;
                    resize(probs, z.shape());
                    let loss =
                        softmax_cross_entropy::forward(typed(z)?, labels, typed_mut(probs)?)?;
                    resize(value, &[]);
                    typed_mut::<T, Ix0>(value)?[()] = loss;
                }
                Op::MeanSquaredError { prediction, target } => {
                    let (p, t) = (&before[prediction.0].value, &before[target.0].value);
                    let loss = mse::forward(p.view(), t.view())?;
                    resize(value, &[]);
                    typed_mut::<T, Ix0>(value)?[()] = loss;
                }
            }
        }
        Ok(())
    }

    /// The value of a node (after [`Graph::forward`]).
    pub fn value(&self, id: NodeId) -> Result<ArrayViewD<'_, T>> {
        Ok(self.node(id)?.value.view())
    }

    /// The value of a scalar node such as a loss.
    pub fn scalar(&self, id: NodeId) -> Result<T> {
        let value = &self.node(id)?.value;
        if value.ndim() != 0 {
            return Err(Error::graph(format!(
                "node {} is not a scalar: its shape is {:?}",
                id.0,
                value.shape()
            )));
        }
        Ok(value.iter().copied().sum())
    }
}
