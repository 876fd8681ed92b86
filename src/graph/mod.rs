//! The tape: a reverse-mode autodiff graph you can read in one sitting.
//!
//! A [`Graph`] is a `Vec` of nodes; a [`NodeId`] is an index into it. A node can only name
//! nodes created before it as inputs, so creation order is already a valid evaluation order and
//! **reverse creation order is a valid backward order**: no topological sort, no recursion.
//!
//! The graph is **built once and re-run**: you declare inputs, parameters and ops once, then for
//! every step set the inputs, call [`Graph::forward`] and [`Graph::backward`]. Every node keeps its
//! value and gradient buffers between steps and reallocates them only when a shape changes
//! (a different batch size), so a training loop at a fixed batch size allocates nothing per step
//! in the graph and its memory does not grow.
//!
//! Gradients are accumulated with `+=`: a value read by two nodes receives both contributions.
//! Intermediate gradients start each backward pass empty (the first contribution overwrites or
//! zeroes the buffer, see [`crate::ops::GradWrite`]); the gradients of leaves (parameters and
//! inputs) keep accumulating across backward calls until [`Graph::zero_grad`].
//!
//! [`Graph::set_backward_chunk`] runs the backward pass a few samples at a time: the same
//! sweep once per chunk, so that the gradient of an intermediate node holds one chunk instead
//! of the batch (see `backward.rs`). [`crate::Model`] uses chunks of 4 samples when the
//! batch's intermediate gradients are large.
//!
//! The math never lives here: each arm of the two `match`es — in `forward.rs` and
//! `backward.rs` beside this file — calls one op module's `forward` or `backward`; `build.rs`
//! adds nodes and sets inputs; this file holds the types and the accessors.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::max_pool;
use ndarray::{ArrayD, ArrayView, ArrayViewD, ArrayViewMut, ArrayViewMutD, Dimension, IxDyn};

/// A node of one graph: an index into its tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) usize);

impl NodeId {
    /// The position of the node on the tape (its creation order).
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a node computes: its input ids and the state its backward pass needs.
#[derive(Debug, Clone)]
pub(crate) enum Op<T> {
    /// Data set from outside every step.
    Input,
    /// A trained parameter: a leaf that persists across steps.
    Param,
    /// With `relu`, the fused conv1x1 + ReLU: the value is the activation.
    Conv1x1 {
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        relu: bool,
    },
    Conv2d {
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        padding: usize,
    },
    Linear {
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    },
    Relu {
        input: NodeId,
    },
    MaxPool {
        input: NodeId,
        window: usize,
        stride: usize,
        argmax: Vec<max_pool::Position>,
    },
    AvgPool {
        input: NodeId,
        window: usize,
        stride: usize,
    },
    GlobalAvgPool {
        input: NodeId,
    },
    Add {
        left: NodeId,
        right: NodeId,
    },
    SoftmaxCrossEntropy {
        logits: NodeId,
        labels: Vec<usize>,
        probs: ArrayD<T>,
    },
    MeanSquaredError {
        prediction: NodeId,
        target: NodeId,
    },
}

impl<T> Op<T> {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Param => "param",
            Op::Conv1x1 { relu: false, .. } => "conv1x1",
            Op::Conv1x1 { relu: true, .. } => "conv1x1+relu",
            Op::Conv2d { .. } => "conv2d",
            Op::Linear { .. } => "linear",
            Op::Relu { .. } => "relu",
            Op::MaxPool { .. } => "max_pool",
            Op::AvgPool { .. } => "avg_pool",
            Op::GlobalAvgPool { .. } => "global_avg_pool",
            Op::Add { .. } => "add",
            Op::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
            Op::MeanSquaredError { .. } => "mse",
        }
    }

    fn inputs(&self) -> Vec<NodeId> {
        match self {
            Op::Input | Op::Param => vec![],
            Op::Conv1x1 {
                input,
                weight,
                bias,
                ..
            }
            | Op::Conv2d {
                input,
                weight,
                bias,
                ..
            }
            | Op::Linear {
                input,
                weight,
                bias,
            } => [Some(*input), Some(*weight), *bias]
                .into_iter()
                .flatten()
                .collect(),
            Op::Relu { input }
            | Op::MaxPool { input, .. }
            | Op::AvgPool { input, .. }
            | Op::GlobalAvgPool { input } => vec![*input],
            Op::Add { left, right } => vec![*left, *right],
            Op::SoftmaxCrossEntropy { logits, .. } => vec![*logits],
            Op::MeanSquaredError { prediction, target } => vec![*prediction, *target],
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Node<T> {
    pub(crate) name: String,
    pub(crate) op: Op<T>,
    pub(crate) value: ArrayD<T>,
    pub(crate) grad: ArrayD<T>,
    /// True when some leaf below this node wants a gradient; backward skips the others.
    pub(crate) requires_grad: bool,
    /// False for an input that was never set.
    pub(crate) has_value: bool,
    /// True when the value's first axis is the batch: inputs, and every op computed
    /// sample by sample from batched data (not parameters, not the scalar losses).
    pub(crate) batched: bool,
    /// During a backward pass: whether `grad` holds a contribution yet. Until it does, its
    /// content is stale, and the first contribution either overwrites it (ops that can) or
    /// zeroes it first. Leaves always count as written: they accumulate across passes.
    pub(crate) grad_written: bool,
}

/// The tape. `T` is `f32` for training and `f64` for gradient checks.
#[derive(Debug, Clone)]
pub struct Graph<T> {
    pub(crate) nodes: Vec<Node<T>>,
    /// Samples per chunk of the backward pass; `None` runs it on the whole batch at once.
    pub(crate) backward_chunk: Option<usize>,
}

impl<T: Element> Default for Graph<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A parameter seen by an optimizer: its name, its value to update, its gradient.
pub struct ParamMut<'a, T> {
    pub name: &'a str,
    pub value: &'a mut ArrayD<T>,
    pub grad: &'a ArrayD<T>,
}

/// Reallocates `buffer` only when its shape changes: the reason steady-state steps allocate
/// nothing. A new buffer starts on a cache line ([`crate::buffer`]).
fn resize<T: Element>(buffer: &mut ArrayD<T>, shape: &[usize]) {
    if buffer.shape() != shape {
        *buffer = crate::buffer::zeros(IxDyn(shape));
    }
}

/// A view whose number of dimensions the op expects.
pub(crate) fn dims<T, D: Dimension>(view: ArrayViewD<'_, T>) -> Result<ArrayView<'_, T, D>> {
    if D::NDIM.is_some_and(|ndim| ndim != view.ndim()) {
        return Err(wrong_dims(view.shape()));
    }
    view.into_dimensionality::<D>()
        .map_err(|_| Error::graph("a buffer has the wrong number of dimensions"))
}

pub(crate) fn dims_mut<T, D: Dimension>(
    view: ArrayViewMutD<'_, T>,
) -> Result<ArrayViewMut<'_, T, D>> {
    if D::NDIM.is_some_and(|ndim| ndim != view.ndim()) {
        return Err(wrong_dims(view.shape()));
    }
    view.into_dimensionality::<D>()
        .map_err(|_| Error::graph("a buffer has the wrong number of dimensions"))
}

fn wrong_dims(shape: &[usize]) -> Error {
    Error::graph(format!(
        "a buffer of shape {shape:?} has the wrong number of dimensions"
    ))
}

/// A typed view of a whole node buffer.
fn typed<T, D: Dimension>(buffer: &ArrayD<T>) -> Result<ArrayView<'_, T, D>> {
    dims(buffer.view())
}

fn typed_mut<T, D: Dimension>(buffer: &mut ArrayD<T>) -> Result<ArrayViewMut<'_, T, D>> {
    dims_mut(buffer.view_mut())
}

mod backward;
mod build;
mod forward;

impl<T: Element> Graph<T> {
    /// An empty graph.
    pub fn new() -> Self {
        Graph {
            nodes: Vec::new(),
            backward_chunk: None,
        }
    }

    // ---------------------------------------------------------------- parameters and inspection

    /// The ids of every parameter, in creation order.
    pub fn params(&self) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&i| matches!(self.nodes[i].op, Op::Param))
            .map(NodeId)
            .collect()
    }

    /// Every parameter with its value (to update) and its gradient, in creation order.
    pub fn params_mut(&mut self) -> impl Iterator<Item = ParamMut<'_, T>> {
        self.nodes
            .iter_mut()
            .filter(|node| matches!(node.op, Op::Param))
            .map(|node| ParamMut {
                name: &node.name,
                value: &mut node.value,
                grad: &node.grad,
            })
    }

    /// A mutable view of a leaf's value (a parameter or a set input), e.g. to perturb it.
    pub fn leaf_value_mut(&mut self, id: NodeId) -> Result<ArrayViewMutD<'_, T>> {
        self.node(id)?;
        let node = &mut self.nodes[id.0];
        if !matches!(node.op, Op::Input | Op::Param) || !node.has_value {
            return Err(Error::graph(format!(
                "node {:?} is not a leaf with a value",
                node.name
            )));
        }
        Ok(node.value.view_mut())
    }

    /// The node's name (`"reduce.weight"`, or `"conv1x1#4"` for an op: kind and position).
    pub fn name(&self, id: NodeId) -> Result<&str> {
        Ok(&self.node(id)?.name)
    }

    /// The kind of op a node computes (`"conv1x1"`, `"param"`, ...).
    pub fn kind(&self, id: NodeId) -> Result<&'static str> {
        Ok(self.node(id)?.op.kind())
    }

    /// The ids a node reads.
    pub fn inputs(&self, id: NodeId) -> Result<Vec<NodeId>> {
        Ok(self.node(id)?.op.inputs())
    }

    /// Every node id, in creation order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        (0..self.nodes.len()).map(NodeId)
    }

    /// The node with this name, if any.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .map(NodeId)
    }

    /// Number of nodes on the tape.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for a graph with no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Elements held by all value, gradient and saved buffers: constant across steps of one
    /// batch size (the memory-steadiness test asserts it).
    pub fn buffer_elements(&self) -> usize {
        self.nodes
            .iter()
            .map(|node| {
                let saved = match &node.op {
                    Op::MaxPool { argmax, .. } => argmax.capacity(),
                    Op::SoftmaxCrossEntropy { labels, probs, .. } => {
                        labels.capacity() + probs.len()
                    }
                    _ => 0,
                };
                node.value.len() + node.grad.len() + saved
            })
            .sum()
    }
}
