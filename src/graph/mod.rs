//! The tape: a reverse-mode autodiff graph you can read in one sitting.
//!
//! A [`Graph`] is a `Vec` of nodes; a [`NodeId`] is an index into it. A node can only name
//! nodes created before it as inputs, so creation order is already a valid evaluation order and
//! **reverse creation order is a valid backward order**: no topological sort, no recursion.
//!
//! A node is a leaf (an input set from outside, or a trained parameter) or an op: a boxed
//! [`Operation`] that owns its settings, its saved state, its forward and its backward pass
//! (one file each under `src/ops/`, the interface in `ops/operation.rs`). The tape knows no
//! op: `forward.rs` and `backward.rs` are each one loop that calls every node's `forward` or
//! `backward` through that interface, handing it the buffers it may touch (`pass.rs`).
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
//! inputs) keep accumulating across backward calls until [`Graph::zero_grad`] zeroes them, or
//! [`Graph::clear_grads`] lets the next pass overwrite them. `chunk.rs` runs the backward pass
//! a few samples at a time, to keep intermediate gradients small.

mod backward;
mod build;
mod chunk;
mod forward;
mod pass;

pub use crate::buffer::MAX_BUFFER_ELEMENTS;
pub(crate) use crate::buffer::{check_elements, resize};
pub use pass::{Backward, Forward, Inputs, Port, Ports};

use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::Operation;
use ndarray::ArrayD;

/// A node of one graph: its position on the tape, and which graph it belongs to (an id of
/// another graph is an error, not a node of this one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) usize, pub(crate) u32);

impl NodeId {
    /// The position of the node on the tape (its creation order).
    pub fn index(self) -> usize {
        self.0
    }
}

/// The graph tag of an id read from a file: bound to a graph by [`Graph::bind`].
pub(crate) const UNBOUND: u32 = 0;

/// Tags for new graphs; 0 is [`UNBOUND`].
static GRAPHS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Where a node's value comes from.
#[derive(Debug, Clone)]
pub(crate) enum Source<T> {
    /// Data set from outside every step.
    Input,
    /// A trained parameter: a leaf that persists across steps.
    Param,
    /// An op computed from earlier nodes.
    Op(Box<dyn Operation<T>>),
}

#[derive(Debug, Clone)]
pub(crate) struct Node<T> {
    pub(crate) name: String,
    pub(crate) source: Source<T>,
    /// The nodes an op reads, in the order its builder was given them.
    pub(crate) inputs: Vec<NodeId>,
    pub(crate) value: ArrayD<T>,
    pub(crate) grad: ArrayD<T>,
    /// True when some leaf below this node wants a gradient; backward skips the others.
    pub(crate) requires_grad: bool,
    /// False for an input that was never set.
    pub(crate) has_value: bool,
    /// True when the value's first axis is the batch and sample n depends on the inputs'
    /// sample n alone (see [`Operation::batched`]): what lets backward run in chunks.
    pub(crate) batched: bool,
    /// During a backward pass: whether `grad` holds a contribution yet. Until it does, its
    /// content is stale, and the first contribution either overwrites it (ops that can) or
    /// zeroes it first. Leaves count as written (they accumulate across passes) unless cleared.
    /// After a pass, false for an op node whose gradient the pass did not leave in `grad`.
    pub(crate) grad_written: bool,
    /// A leaf whose gradient [`Graph::clear_grads`] forgot: the next backward pass writes it
    /// instead of adding to it, and until then it reads as absent.
    pub(crate) grad_cleared: bool,
    /// Time spent in this node's forward and backward passes while profiling.
    pub(crate) time: [std::time::Duration; 2],
}

impl<T> Node<T> {
    pub(crate) fn is_leaf(&self) -> bool {
        !matches!(self.source, Source::Op(_))
    }

    pub(crate) fn is_param(&self) -> bool {
        matches!(self.source, Source::Param)
    }

    pub(crate) fn kind(&self) -> &'static str
    where
        T: Element,
    {
        match &self.source {
            Source::Input => "input",
            Source::Param => "param",
            Source::Op(op) => op.kind(),
        }
    }
}

/// The tape. `T` is `f32` for training and `f64` for gradient checks.
#[derive(Debug, Clone)]
pub struct Graph<T> {
    pub(crate) nodes: Vec<Node<T>>,
    /// Samples per chunk of the backward pass; `None` runs it on the whole batch at once.
    pub(crate) backward_chunk: Option<usize>,
    /// Training mode (the default) or evaluation mode, for ops that differ (batch norm).
    pub(crate) training: bool,
    /// Whether forward and backward time every op (see [`Graph::set_profiling`]).
    pub(crate) profiling: bool,
    /// This graph's tag, carried by its ids.
    pub(crate) tag: u32,
    /// The nodes up to this position hold the values of the current inputs, parameters and
    /// settings; `None` once any of them changed since the last forward pass.
    pub(crate) current_to: Option<usize>,
}

impl<T: Element> Default for Graph<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The error for a value (a parameter's, an upstream gradient) of the wrong shape.
pub(crate) fn same_shape(action: &'static str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected == found {
        return Ok(());
    }
    Err(Error::shape_mismatch(
        action,
        "shape",
        format!("{expected:?}"),
        format!("{found:?}"),
    ))
}

impl<T: Element> Graph<T> {
    /// An empty graph.
    pub fn new() -> Self {
        let mut tag = GRAPHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if tag == UNBOUND {
            tag = GRAPHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Graph {
            nodes: Vec::new(),
            backward_chunk: None,
            training: true,
            profiling: false,
            tag,
            current_to: None,
        }
    }

    /// Training mode (`true`, the default) or evaluation mode: ops that behave differently
    /// (batch norm: batch statistics and running averages vs the running averages alone) read
    /// it at every forward pass, as `model.train()` / `model.eval()` set it in PyTorch.
    pub fn set_training(&mut self, training: bool) {
        if training != self.training {
            self.current_to = None;
        }
        self.training = training;
    }

    /// The id of the node at `index` of this graph.
    pub(crate) fn id(&self, index: usize) -> NodeId {
        NodeId(index, self.tag)
    }

    /// An id read from a file (it holds a position alone) made an id of this graph; an id
    /// of this graph is returned as it is, and one of another graph is an error.
    pub fn bind(&self, id: NodeId) -> Result<NodeId> {
        let bound = if id.1 == UNBOUND { self.id(id.0) } else { id };
        self.node(bound)?;
        Ok(bound)
    }

    /// Marks every value as out of date: an input, a parameter or a setting changed, and
    /// [`Graph::backward`] refuses to run until [`Graph::forward`] has.
    pub(crate) fn invalidate(&mut self) {
        self.current_to = None;
    }

    pub(crate) fn node(&self, id: NodeId) -> Result<&Node<T>> {
        if id.1 != self.tag {
            return Err(Error::graph(format!(
                "node {} is an id of another graph",
                id.0
            )));
        }
        self.nodes.get(id.0).ok_or_else(|| {
            Error::graph(format!(
                "node {} does not exist (the graph has {} nodes)",
                id.0,
                self.nodes.len()
            ))
        })
    }
}
