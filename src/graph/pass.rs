//! What the tape hands an op's forward and backward pass: exactly the buffers the op may
//! touch. [`Forward`] gives the inputs' values and the output buffer (sized by the op);
//! [`Backward`] gives the node's output and its gradient dY, and one [`Port`] per input, with
//! the input's value and, when it wants one, its gradient buffer. When the tape runs the
//! backward pass a few samples at a time (see `chunk.rs`), every view is already cut to the
//! chunk's rows, and [`Backward::rows`] says which rows they are, for state saved for the whole
//! batch.

use super::chunk::{cut, Chunk};
use super::{resize, Node, NodeId};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::GradWrite;
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};
use std::ops::Range;

/// What an op's forward pass may touch: its inputs' values, and its own output buffer.
pub struct Forward<'a, T> {
    /// The inputs' values (a copy of this handle can be kept while the output is held).
    pub inputs: Inputs<'a, T>,
    /// Whether the graph is in training mode ([`crate::Graph::set_training`]).
    pub training: bool,
    pub(super) output: &'a mut ArrayD<T>,
}

/// The values of a node's inputs (in the order the builder passed them).
pub struct Inputs<'a, T> {
    pub(super) nodes: &'a [Node<T>],
    pub(super) ids: &'a [NodeId],
}

impl<T> Clone for Inputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Inputs<'_, T> {}

impl<'a, T> Inputs<'a, T> {
    /// How many inputs the node has.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True for a node without inputs.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The value of input `i` (in the order the builder passed them; the tape built the node
    /// with its inputs, so an op reads only indices it was given).
    pub fn get(&self, i: usize) -> ArrayViewD<'a, T> {
        let nodes = self.nodes;
        nodes[self.ids[i].0].value.view()
    }

    /// The value of input `i`, or `None` when the op was built with fewer (an absent bias).
    pub fn optional(&self, i: usize) -> Option<ArrayViewD<'a, T>> {
        let nodes = self.nodes;
        self.ids.get(i).map(|id| nodes[id.0].value.view())
    }
}

impl<T: Element> Forward<'_, T> {
    /// The output buffer, sized to `shape`: reallocated only when the shape changes, so
    /// steady-state steps allocate nothing. Its old content is stale: the op overwrites it.
    /// A shape over [`crate::graph::MAX_BUFFER_ELEMENTS`] is an error.
    pub fn output(&mut self, shape: &[usize]) -> Result<ArrayViewMutD<'_, T>> {
        resize(self.output, shape)?;
        Ok(self.output.view_mut())
    }
}

/// What an op's backward pass may touch. Its fields are public so that an op can hold the
/// output gradient and its inputs' gradients at once.
pub struct Backward<'a, T> {
    /// The node's output (the rows of this chunk).
    pub y: ArrayViewD<'a, T>,
    /// ∂L/∂y (the rows of this chunk). Mutable so that a fused op may transform it in place;
    /// nothing else reads it after this op.
    pub dy: ArrayViewMutD<'a, T>,
    /// The node's inputs, as ports.
    pub inputs: Ports<'a, T>,
}

impl<T> Backward<'_, T> {
    /// The rows of the batch this pass covers (`None`: all of them): how an op finds its part
    /// of state it saved for the whole batch.
    pub fn rows(&self) -> Option<Range<usize>> {
        self.inputs.chunk.map(Chunk::rows)
    }
}

/// The inputs of a node during its backward pass.
pub struct Ports<'a, T> {
    pub(super) nodes: &'a mut [Node<T>],
    pub(super) inputs: &'a [NodeId],
    pub(super) chunk: Option<Chunk>,
}

/// One input during a backward pass: its value, and its gradient buffer if it wants one.
pub struct Port<'a, T> {
    /// The input's value.
    pub value: ArrayViewD<'a, T>,
    /// Its gradient, with how to write it (`None`: no gradient wanted, or no such input).
    pub grad: Option<(ArrayViewMutD<'a, T>, GradWrite)>,
}

impl<'a, T: Element> Port<'a, T> {
    /// The value, and the gradient buffer ready to accumulate into: zeroed first when this
    /// pass has not written it yet. For ops whose backward only adds.
    #[allow(clippy::type_complexity)]
    pub fn accumulating(self) -> Result<(ArrayViewD<'a, T>, Option<ArrayViewMutD<'a, T>>)> {
        let grad = match self.grad {
            Some((mut grad, GradWrite::Overwrite)) => {
                crate::parallel::fill(grad.view_mut(), T::zero())?;
                Some(grad)
            }
            other => other.map(|(grad, _)| grad),
        };
        Ok((self.value, grad))
    }
}

impl<T: Element> Ports<'_, T> {
    /// How many inputs the node has.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// True for a node without inputs.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Input `i` alone. Taking the same input twice (x + x) gives it both contributions.
    pub fn port(&mut self, i: usize) -> Result<Port<'_, T>> {
        let id = self.id(i)?;
        Ok(open(&mut self.nodes[id], self.chunk))
    }

    /// Inputs 0..K at once (a layer's input, weight and bias). A slot past the node's inputs
    /// (a bias the layer was built without) is an empty port with no gradient.
    pub fn ports<const K: usize>(&mut self) -> Result<[Port<'_, T>; K]> {
        let wanted = &self.inputs[..self.inputs.len().min(K)];
        let mut found: [Option<&mut Node<T>>; K] = std::array::from_fn(|_| None);
        // One walk over the earlier nodes lends each wanted one to its slot; a node named
        // twice fills only its first slot.
        for (index, node) in self.nodes.iter_mut().enumerate() {
            if let Some(slot) = wanted.iter().position(|id| id.0 == index) {
                found[slot] = Some(node);
            }
        }
        if found[..wanted.len()].iter().any(Option::is_none) {
            return Err(Error::graph(format!(
                "the inputs {:?} of a node must be distinct earlier nodes",
                self.inputs
            )));
        }
        let chunk = self.chunk;
        Ok(found.map(|node| match node {
            Some(node) => open(node, chunk),
            None => Port {
                value: ndarray::ArrayView1::from(&[][..]).into_dyn(),
                grad: None,
            },
        }))
    }

    fn id(&self, i: usize) -> Result<usize> {
        self.inputs.get(i).map(|id| id.0).ok_or_else(|| {
            Error::graph(format!(
                "an op asked for input {i} of a node with {} inputs",
                self.inputs.len()
            ))
        })
    }
}

/// An input node's value and, when it wants one, its gradient (how to write it decided by
/// whether this pass has written it before), both cut to the chunk.
fn open<T>(node: &mut Node<T>, chunk: Option<Chunk>) -> Port<'_, T> {
    let (value_rows, grad_rows) = (node.value_rows(chunk), node.grad_rows(chunk));
    let grad = node.requires_grad.then(|| {
        let write = if node.grad_written {
            GradWrite::Accumulate
        } else {
            GradWrite::Overwrite
        };
        node.grad_written = true;
        (cut(node.grad.view_mut(), grad_rows), write)
    });
    Port {
        value: cut(node.value.view(), value_rows),
        grad,
    }
}
