//! The backward pass: every node from the target down, in reverse creation order, each arm
//! calling one op's backward with the gradients of the node's inputs.
//!
//! ## In chunks of samples
//! Every op computes sample n of its output from sample n of its inputs alone; only the loss
//! mixes samples, and its gradient for sample n depends on sample n alone (and the batch size
//! of the mean). So the pass can run a few samples at a time ([`Graph::set_backward_chunk`]):
//! the same reverse sweep once per chunk, each op reading rows `start..start + len` of the
//! values the forward pass saved for the whole batch. The gradient of an intermediate node then
//! holds one chunk, not the batch: in the W2 bottleneck step at N = 32, chunks of 4 samples cut
//! the activation gradients from 38.5 MB to 4.8 MB. Parameter gradients sum over the chunks in
//! order, so they equal the whole-batch ones up to rounding.

use super::{dims, dims_mut, resize};
use super::{Graph, Node, NodeId, Op};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::{
    add, avg_pool, conv1x1, conv2d, global_avg_pool, linear, max_pool, mse, relu,
    softmax_cross_entropy, GradWrite,
};
use ndarray::{
    ArrayBase, ArrayView, ArrayViewD, ArrayViewMut, Axis, Dimension, Ix0, Ix1, Ix2, Ix4, IxDyn,
    RawData, Slice,
};
use std::ops::Range;

/// The samples one backward sweep covers: rows `start..start + len` of the batch.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    start: usize,
    len: usize,
}

impl Chunk {
    fn rows(self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

impl<T> Node<T> {
    fn is_leaf(&self) -> bool {
        matches!(self.op, Op::Input | Op::Param)
    }

    /// The rows of this node's value a chunk reads: a batched value holds the whole batch.
    fn value_rows(&self, chunk: Option<Chunk>) -> Option<Range<usize>> {
        chunk.filter(|_| self.batched).map(Chunk::rows)
    }

    /// The rows of this node's gradient a chunk writes: a batched leaf's gradient holds the
    /// whole batch (it accumulates across passes), an intermediate's only the current chunk.
    fn grad_rows(&self, chunk: Option<Chunk>) -> Option<Range<usize>> {
        chunk
            .filter(|_| self.batched)
            .map(|c| if self.is_leaf() { c.rows() } else { 0..c.len })
    }
}

/// `rows` of a view (shared or mutable) along its first axis (all of it for `None`).
fn cut<S: RawData, D: Dimension>(
    view: ArrayBase<S, D>,
    rows: Option<Range<usize>>,
) -> Result<ArrayBase<S, D>> {
    match rows {
        None => Ok(view),
        Some(rows) if view.ndim() > 0 && rows.end <= view.len_of(Axis(0)) => {
            Ok(view.slice_axis_move(Axis(0), Slice::from(rows)))
        }
        Some(rows) => Err(out_of_rows(rows, view.shape())),
    }
}

fn out_of_rows(rows: Range<usize>, shape: &[usize]) -> Error {
    Error::graph(format!(
        "rows {rows:?} are outside a buffer of shape {shape:?}"
    ))
}

/// Splits an input node into its value (read) and, when it wants one, its gradient, ready to
/// accumulate into (zeroed first if this pass has not written it yet); both cut to the chunk.
#[allow(clippy::type_complexity)]
fn value_and_grad<T: Element, D: Dimension>(
    node: &mut Node<T>,
    chunk: Option<Chunk>,
) -> Result<(ArrayView<'_, T, D>, Option<ArrayViewMut<'_, T, D>>)> {
    let (value, grad) = value_and_fresh_grad(node, chunk)?;
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
    chunk: Option<Chunk>,
) -> Result<(
    ArrayView<'_, T, D>,
    Option<(ArrayViewMut<'_, T, D>, GradWrite)>,
)> {
    let (value_rows, grad_rows) = (node.value_rows(chunk), node.grad_rows(chunk));
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
        Some((dims_mut(cut(grad.view_mut(), grad_rows)?)?, write))
    } else {
        None
    };
    Ok((dims(cut(value.view(), value_rows)?)?, grad))
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

    /// Runs later backward passes `samples` samples at a time (`None`: the whole batch at
    /// once, the default). Parameter and input gradients come out the same (up to rounding);
    /// the gradient buffer of every intermediate node shrinks to one chunk, and
    /// [`Graph::grad`] of an intermediate node becomes an error, since it would hold only the
    /// last chunk. A graph whose nodes do not all carry the batch on their first axis (a
    /// parameter fed to an op as data, two losses added) runs on the whole batch regardless.
    pub fn set_backward_chunk(&mut self, samples: Option<usize>) -> Result<()> {
        if samples == Some(0) {
            return Err(Error::invalid_config(
                "set_backward_chunk",
                "a chunk must hold at least one sample",
            ));
        }
        self.backward_chunk = samples;
        Ok(())
    }

    /// Bytes the gradients of the intermediate nodes up to `target` take when the backward
    /// pass runs on the whole batch (their values' sizes, after a forward pass): what running
    /// it in chunks would save.
    pub fn intermediate_gradient_bytes(&self, target: NodeId) -> Result<usize> {
        self.node(target)?;
        Ok(self.nodes[..=target.0]
            .iter()
            .filter(|node| node.requires_grad && !node.is_leaf())
            .map(|node| node.value.len() * std::mem::size_of::<T>())
            .sum())
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
        let plan = self.chunk_plan(target);
        // Size every gradient buffer: an intermediate batched node's to one chunk when the
        // pass runs in chunks. Leaf gradients keep what earlier backward calls accumulated.
        for node in &mut self.nodes[..=target.0] {
            if !node.requires_grad {
                continue;
            }
            let mut shape = node.value.raw_dim();
            if let Some((_, samples)) = plan.filter(|_| node.batched && !node.is_leaf()) {
                shape.slice_mut()[0] = samples;
            }
            resize(&mut node.grad, shape.slice());
        }
        let Some((batch, samples)) = plan else {
            return self.sweep(target, upstream, None);
        };
        for start in (0..batch).step_by(samples) {
            let len = samples.min(batch - start);
            self.sweep(target, upstream.view(), Some(Chunk { start, len }))?;
        }
        Ok(())
    }

    /// `Some((batch, samples per chunk))` when the pass from `target` can run in chunks: a
    /// chunk size is set and smaller than the batch, the target is an op, and every node up to
    /// it other than the parameters (and a scalar loss target) carries the batch on axis 0.
    fn chunk_plan(&self, target: NodeId) -> Option<(usize, usize)> {
        let samples = self.backward_chunk?;
        let nodes = &self.nodes[..=target.0];
        let batch = *nodes.iter().find(|n| n.batched)?.value.shape().first()?;
        let carries_batch = |(index, node): (usize, &Node<T>)| {
            matches!(node.op, Op::Param)
                || (index == target.0 && node.value.ndim() == 0)
                || (node.batched && node.value.shape().first() == Some(&batch))
        };
        let applies = samples < batch
            && !nodes[target.0].is_leaf()
            && nodes.iter().enumerate().all(carries_batch);
        applies.then_some((batch, samples))
    }

    /// One reverse sweep over the samples of `chunk` (all of them for `None`).
    fn sweep(
        &mut self,
        target: NodeId,
        upstream: ArrayViewD<T>,
        chunk: Option<Chunk>,
    ) -> Result<()> {
        // Intermediate gradients are not zeroed: each is marked unwritten, and its first
        // contribution overwrites it or zeroes it first.
        for node in &mut self.nodes[..=target.0] {
            node.grad_written = node.is_leaf();
        }
        let seed = &mut self.nodes[target.0];
        if !seed.requires_grad {
            return Ok(());
        }
        let (value_rows, grad_rows) = (seed.value_rows(chunk), seed.grad_rows(chunk));
        let upstream = cut(upstream, value_rows)?;
        let mut seed_grad = cut(seed.grad.view_mut(), grad_rows)?;
        if seed.grad_written {
            seed_grad += &upstream;
        } else {
            seed_grad.assign(&upstream);
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
                let rows = node.grad_rows(chunk);
                crate::parallel::fill(cut(node.grad.view_mut(), rows)?, T::zero())?;
                node.grad_written = true;
                continue;
            }
            if let Op::Conv1x1 {
                input,
                weight,
                bias,
                relu,
            } = node.op
            {
                let (x_node, w_node, b_node) = weighted_inputs(before, input, weight, bias)?;
                let (x, dx) = value_and_fresh_grad::<T, Ix4>(x_node, chunk)?;
                let dx_write = dx
                    .as_ref()
                    .map_or(GradWrite::Accumulate, |(_, write)| *write);
                let dx = dx.map(|(dx, _)| dx);
                let (w, dw) = value_and_grad::<T, Ix2>(w_node, None)?;
                let db = b_node
                    .map(|b| value_and_grad::<T, Ix1>(b, None))
                    .transpose()?
                    .and_then(|(_, db)| db);
                let (value_rows, grad_rows) = (node.value_rows(chunk), node.grad_rows(chunk));
                if relu {
                    // The node's own gradient is not read again: it is masked in place.
                    let y = cut(node.value.view(), value_rows)?;
                    let dy = cut(node.grad.view_mut(), grad_rows)?;
                    conv1x1::backward_relu(x, w, dims(y)?, dims_mut(dy)?, dx, dw, db, dx_write)?;
                } else {
                    let dy = cut(node.grad.view(), grad_rows)?;
                    conv1x1::backward_with(x, w, dims(dy)?, dx, dw, db, dx_write)?;
                }
                continue;
            }
            let node = &*node;
            let dy = cut(node.grad.view(), node.grad_rows(chunk))?;
            let rows = chunk.map(Chunk::rows);
            match &node.op {
                Op::Input | Op::Param | Op::Conv1x1 { .. } => {}
                Op::Conv2d {
                    input,
                    weight,
                    bias,
                    padding,
                } => {
                    let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                    let (x, dx) = value_and_grad::<T, Ix4>(x_node, chunk)?;
                    let (w, dw) = value_and_grad::<T, Ix4>(w_node, None)?;
                    let db = b_node
                        .map(|b| value_and_grad::<T, Ix1>(b, None))
                        .transpose()?
                        .and_then(|(_, db)| db);
                    conv2d::backward(x, w, *padding, dims(dy)?, dx, dw, db)?;
                }
                Op::Linear {
                    input,
                    weight,
                    bias,
                } => {
                    let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                    let (x, dx) = value_and_grad::<T, Ix2>(x_node, chunk)?;
                    let (w, dw) = value_and_grad::<T, Ix2>(w_node, None)?;
                    let db = b_node
                        .map(|b| value_and_grad::<T, Ix1>(b, None))
                        .transpose()?
                        .and_then(|(_, db)| db);
                    linear::backward(x, w, dims(dy)?, dx, dw, db)?;
                }
                Op::Relu { input } => {
                    if let (x, Some(dx)) = value_and_grad::<T, IxDyn>(&mut before[input.0], chunk)?
                    {
                        relu::backward(x, dy, dx)?;
                    }
                }
                Op::MaxPool { input, argmax, .. } => {
                    // One arg-max per output value: a chunk's are a contiguous run of them.
                    let batch = node.value.shape().first().copied().unwrap_or(1).max(1);
                    let per_sample = argmax.len() / batch;
                    let argmax = match node.value_rows(chunk) {
                        Some(r) => argmax
                            .get(r.start * per_sample..r.end * per_sample)
                            .ok_or_else(|| out_of_rows(r, node.value.shape()))?,
                        None => argmax.as_slice(),
                    };
                    if let (_, Some((dx, write))) =
                        value_and_fresh_grad::<T, Ix4>(&mut before[input.0], chunk)?
                    {
                        max_pool::backward_with(dims(dy)?, argmax, dx, write)?;
                    }
                }
                Op::AvgPool {
                    input,
                    window,
                    stride,
                } => {
                    if let (_, Some(dx)) = value_and_grad::<T, Ix4>(&mut before[input.0], chunk)? {
                        avg_pool::backward(dims(dy)?, *window, *stride, dx)?;
                    }
                }
                Op::GlobalAvgPool { input } => {
                    if let (_, Some(dx)) = value_and_grad::<T, Ix4>(&mut before[input.0], chunk)? {
                        global_avg_pool::backward(dims(dy)?, dx)?;
                    }
                }
                Op::Add { left, right } => {
                    // Sequential, so that `x + x` (left == right) simply receives dy twice.
                    for side in [left, right] {
                        if let (_, Some(d_side)) =
                            value_and_grad::<T, IxDyn>(&mut before[side.0], chunk)?
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
                    let dloss = dims::<T, Ix0>(dy)?[()];
                    // The mean is over the whole batch, whichever rows this chunk holds.
                    let batch = probs.shape().first().copied().unwrap_or(0);
                    let labels = match &rows {
                        Some(r) => labels
                            .get(r.clone())
                            .ok_or_else(|| out_of_rows(r.clone(), probs.shape()))?,
                        None => labels.as_slice(),
                    };
                    let probs = cut(probs.view(), rows)?;
                    if let (_, Some(dz)) = value_and_grad::<T, Ix2>(&mut before[logits.0], chunk)? {
                        softmax_cross_entropy::backward_rows(
                            dims(probs)?,
                            labels,
                            dloss,
                            batch,
                            dz,
                        )?;
                    }
                }
                Op::MeanSquaredError { prediction, target } => {
                    let dloss = dims::<T, Ix0>(dy)?[()];
                    let [p_node, t_node] = distinct(before, [*prediction, *target])?;
                    // The mean is over every value, whichever rows this chunk holds.
                    let elements = p_node.value.len();
                    let (p, dp) = value_and_grad::<T, IxDyn>(p_node, chunk)?;
                    let (t, dt) = value_and_grad::<T, IxDyn>(t_node, chunk)?;
                    mse::backward_part(p, t, dloss, elements, dp, dt)?;
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
        if node.grad.shape() != node.value.shape() {
            return Err(Error::graph(format!(
                "the gradient of intermediate node {:?} is not kept: the backward pass ran in \
                 chunks of samples and it holds only the last one (set_backward_chunk(None) \
                 keeps every gradient)",
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
