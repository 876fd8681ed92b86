//! The backward pass: every node from the target down, in reverse creation order, each arm
//! calling one op's backward with the gradients of the node's inputs.

use super::{resize, typed, typed_mut};
use super::{Graph, Node, NodeId, Op};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::{
    add, avg_pool, conv1x1, conv2d, global_avg_pool, linear, max_pool, mse, relu,
    softmax_cross_entropy, GradWrite,
};
use ndarray::{ArrayView, ArrayViewD, ArrayViewMut, Dimension, Ix0, Ix1, Ix2, Ix4, IxDyn};

/// Splits an input node into its value (read) and, when it wants one, its gradient, ready to
/// accumulate into (zeroed first if this pass has not written it yet).
#[allow(clippy::type_complexity)]
fn value_and_grad<T: Element, D: Dimension>(
    node: &mut Node<T>,
) -> Result<(ArrayView<'_, T, D>, Option<ArrayViewMut<'_, T, D>>)> {
    let (value, grad) = value_and_fresh_grad(node)?;
    let grad = match grad {
        Some((mut grad, GradWrite::Overwrite)) => {
            crate::parallel::fill(grad.view_mut(), T::zero())?;
            Some(grad)
        }
        other => other.map(|(grad, _)| grad),
    };
    Ok((value, grad))
}

/// The same, for ops that can overwrite: the gradient comes with how to write it.
#[allow(clippy::type_complexity)]
fn value_and_fresh_grad<T, D: Dimension>(
    node: &mut Node<T>,
) -> Result<(
    ArrayView<'_, T, D>,
    Option<(ArrayViewMut<'_, T, D>, GradWrite)>,
)> {
    let Node {
        value,
        grad,
        requires_grad,
        grad_written,
        ..
    } = node;
    let grad = if *requires_grad {
        let write = if *grad_written {
            GradWrite::Accumulate
        } else {
            GradWrite::Overwrite
        };
        *grad_written = true;
        Some((typed_mut(grad)?, write))
    } else {
        None
    };
    Ok((typed(value)?, grad))
}

/// Mutable access to K distinct earlier nodes at once (the inputs of the node being
/// differentiated). Construction guarantees the ids are distinct.
fn distinct<T, const K: usize>(
    nodes: &mut [Node<T>],
    ids: [NodeId; K],
) -> Result<[&mut Node<T>; K]> {
    nodes.get_disjoint_mut(ids.map(NodeId::index)).map_err(|_| {
        Error::graph(format!(
            "the inputs {ids:?} of a node must be distinct earlier nodes"
        ))
    })
}

/// The input, weight and optional bias nodes of a layer, mutably and at once.
#[allow(clippy::type_complexity)]
fn weighted_inputs<T>(
    before: &mut [Node<T>],
    input: NodeId,
    weight: NodeId,
    bias: Option<NodeId>,
) -> Result<(&mut Node<T>, &mut Node<T>, Option<&mut Node<T>>)> {
    Ok(match bias {
        Some(bias) => {
            let [x, w, b] = distinct(before, [input, weight, bias])?;
            (x, w, Some(b))
        }
        None => {
            let [x, w] = distinct(before, [input, weight])?;
            (x, w, None)
        }
    })
}

impl<T: Element> Graph<T> {
    /// Back-propagates from a scalar `loss` node (∂L/∂L = 1) into every gradient.
    pub fn backward(&mut self, loss: NodeId) -> Result<()> {
        let one = T::one();
        self.backward_from(loss, ndarray::aview0(&one).into_dyn())
    }

    /// Back-propagates a given upstream gradient ∂L/∂(node) — of the node's shape — through the
    /// tape. Used by [`crate::gradcheck`] with a random upstream gradient.
    pub fn backward_from(&mut self, target: NodeId, upstream: ArrayViewD<T>) -> Result<()> {
        self.node(target)?;
        crate::ops::check_same(
            "backward",
            "upstream gradient",
            self.nodes[target.0].value.shape(),
            upstream.shape(),
        )?;
        // Size every gradient buffer. Intermediate gradients are not zeroed here: each is
        // marked unwritten, and its first contribution overwrites it or zeroes it first. Leaf
        // gradients keep what earlier backward calls accumulated.
        for node in &mut self.nodes[..=target.0] {
            if node.requires_grad {
                resize(&mut node.grad, node.value.shape());
                node.grad_written = matches!(node.op, Op::Input | Op::Param);
            }
        }
        let seed = &mut self.nodes[target.0];
        if !seed.requires_grad {
            return Ok(());
        }
        if seed.grad_written {
            seed.grad += &upstream;
        } else {
            seed.grad.assign(&upstream);
            seed.grad_written = true;
        }
        for index in (0..=target.0).rev() {
            let (before, rest) = self.nodes.split_at_mut(index);
            let node = &mut rest[0];
            if !node.requires_grad {
                continue;
            }
            if !node.grad_written {
                // No gradient reached this node (it does not lead to the target): it has
                // nothing to pass on, and its gradient reads as zero.
                crate::parallel::fill(node.grad.view_mut(), T::zero())?;
                node.grad_written = true;
                continue;
            }
            if let Op::Conv1x1 {
                input,
                weight,
                bias,
                relu,
            } = &node.op
            {
                let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                let (x, dx) = value_and_fresh_grad::<T, Ix4>(x_node)?;
                let dx_write = dx
                    .as_ref()
                    .map_or(GradWrite::Accumulate, |(_, write)| *write);
                let dx = dx.map(|(dx, _)| dx);
                let (w, dw) = value_and_grad::<T, Ix2>(w_node)?;
                let db = b_node
                    .map(value_and_grad::<T, Ix1>)
                    .transpose()?
                    .and_then(|(_, db)| db);
                if *relu {
                    // The node's own gradient is not read again: it is masked in place.
                    let (y, dy) = (typed(&node.value)?, typed_mut(&mut node.grad)?);
                    conv1x1::backward_relu(x, w, y, dy, dx, dw, db, dx_write)?;
                } else {
                    conv1x1::backward_with(x, w, typed(&node.grad)?, dx, dw, db, dx_write)?;
                }
                continue;
            }
            let node = &*node;
            let dy = &node.grad;
            match &node.op {
                Op::Input | Op::Param | Op::Conv1x1 { .. } => {}
                Op::Conv2d {
                    input,
                    weight,
                    bias,
                    padding,
                } => {
                    let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                    let (x, dx) = value_and_grad::<T, Ix4>(x_node)?;
                    let (w, dw) = value_and_grad::<T, Ix4>(w_node)?;
                    let db = b_node
                        .map(value_and_grad::<T, Ix1>)
                        .transpose()?
                        .and_then(|(_, db)| db);
                    conv2d::backward(x, w, *padding, typed(dy)?, dx, dw, db)?;
                }
                Op::Linear {
                    input,
                    weight,
                    bias,
                } => {
                    let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                    let (x, dx) = value_and_grad::<T, Ix2>(x_node)?;
                    let (w, dw) = value_and_grad::<T, Ix2>(w_node)?;
                    let db = b_node
                        .map(value_and_grad::<T, Ix1>)
                        .transpose()?
                        .and_then(|(_, db)| db);
                    linear::backward(x, w, typed(dy)?, dx, dw, db)?;
                }
                Op::Relu { input } => {
                    if let (x, Some(dx)) = value_and_grad::<T, IxDyn>(&mut before[input.0])? {
                        relu::backward(x, dy.view(), dx)?;
                    }
                }
                Op::MaxPool { input, argmax, .. } => {
                    if let (_, Some((dx, write))) =
                        value_and_fresh_grad::<T, Ix4>(&mut before[input.0])?
                    {
                        max_pool::backward_with(typed(dy)?, argmax, dx, write)?;
                    }
                }
                Op::AvgPool {
                    input,
                    window,
                    stride,
                } => {
                    if let (_, Some(dx)) = value_and_grad::<T, Ix4>(&mut before[input.0])? {
                        avg_pool::backward(typed(dy)?, *window, *stride, dx)?;
                    }
                }
                Op::GlobalAvgPool { input } => {
                    if let (_, Some(dx)) = value_and_grad::<T, Ix4>(&mut before[input.0])? {
                        global_avg_pool::backward(typed(dy)?, dx)?;
                    }
                }
                Op::Add { left, right } => {
                    // Sequential, so that `x + x` (left == right) simply receives dy twice.
                    for side in [left, right] {
                        if let (_, Some(d_side)) = value_and_grad::<T, IxDyn>(&mut before[side.0])?
                        {
                            add::backward(dy.view(), d_side)?;
                        }
                    }
                }
                Op::SoftmaxCrossEntropy {
                    logits,
                    labels,
                    probs,
                } => {
                    let dloss = typed::<T, Ix0>(dy)?[()];
                    if let (_, Some(dz)) = value_and_grad::<T, Ix2>(&mut before[logits.0])? {
                        softmax_cross_entropy::backward(typed(probs)?, labels, dloss, dz)?;
                    }
                }
                Op::MeanSquaredError { prediction, target } => {
                    let dloss = typed::<T, Ix0>(dy)?[()];
                    let [p_node, t_node] = distinct(before, [*prediction, *target])?;
                    let (p, dp) = value_and_grad::<T, IxDyn>(p_node)?;
                    let (t, dt) = value_and_grad::<T, IxDyn>(t_node)?;
                    mse::backward(p, t, dloss, dp, dt)?;
                }
            }
        }
        Ok(())
    }

    /// The gradient ∂L/∂(node) of a node that requires one (after [`Graph::backward`]).
    pub fn grad(&self, id: NodeId) -> Result<ArrayViewD<'_, T>> {
        let node = self.node(id)?;
        if !node.requires_grad {
            return Err(Error::graph(format!(
                "node {:?} does not require a gradient",
                node.name
            )));
        }
        Ok(node.grad.view())
    }

    /// Sets the accumulated gradients of every leaf (parameters, inputs) to zero.
    pub fn zero_grad(&mut self) {
        for node in &mut self.nodes {
            if matches!(node.op, Op::Input | Op::Param) {
                node.grad.fill(T::zero());
            }
        }
    }
}
