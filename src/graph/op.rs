//! The one interface between the tape and an op.
//!
//! An op is a struct that holds its settings (a pool's window, whether a bias is added) and
//! the state its backward pass needs (max pool's arg-max, the softmax probabilities), and
//! implements [`Operation`]: `forward` reads its inputs and writes its output, `backward` reads
//! the output gradient and adds into its inputs' gradients. The tape walks its nodes and calls
//! these two methods; it never looks inside.
//!
//! Each method receives a small context that hands out exactly the buffers the op may touch:
//! [`Forward`] gives the inputs' values and the output buffer (sized by the op); [`Backward`]
//! gives the node's output and its gradient dY, and one [`Port`] per input, with the input's
//! value and, when it wants one, its gradient buffer. When the tape runs the backward pass a
//! few samples at a time (see `chunk.rs`), every view is already cut to the chunk's rows, and
//! [`Backward::rows`] says which rows they are, for state saved for the whole batch.

use super::chunk::{cut, Chunk};
use super::{resize, Node, NodeId};
use crate::cost::Cost;
use crate::element::Element;
use crate::error::{Error, Result};
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};
use std::any::Any;
use std::fmt::Debug;
use std::ops::Range;

/// How a backward pass writes an input's gradient buffer.
///
/// Backward passes accumulate (`+=`), so that a value read by two nodes receives both
/// contributions. When the tape knows that a buffer holds no contribution yet, a pass that
/// supports it may overwrite it instead (`=`), which saves zeroing the buffer first and reading
/// it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// gradient += contribution
    Accumulate,
    /// gradient = contribution (whatever the buffer held is ignored)
    Overwrite,
}

/// An op on the tape: its forward and backward pass, and what the tape may ask about it.
pub trait Operation<T>: Debug + Send + Sync + CloneOperation<T> {
    /// The op's name in messages and summaries (`"conv1x1"`).
    fn kind(&self) -> &'static str;

    /// Computes the output from the inputs, saving in `self` what backward needs.
    fn forward(&mut self, pass: Forward<'_, T>) -> Result<()>;

    /// Adds the op's contribution to the gradient of every input that wants one.
    fn backward(&self, pass: Backward<'_, T>) -> Result<()>;

    /// Whether sample n of the output depends on sample n of the inputs alone, given which
    /// inputs carry a batch on their first axis: what lets the backward pass run in chunks of
    /// samples. The default is a layer: the data input (the first) carries it, the rest are
    /// parameters. Ops that mix samples (losses) return false.
    fn batched(&self, inputs_batched: &[bool]) -> bool {
        inputs_batched.first() == Some(&true)
    }

    /// Parameters, multiply-adds and GEMM shapes, from the shapes of the last forward pass
    /// (`inputs` in input order); `input_grad` says whether the data input needs a gradient.
    fn cost(&self, _inputs: &[&[usize]], _output: &[usize], _input_grad: bool) -> Cost {
        Cost::default()
    }

    /// The op's settings by name (a window, a stride, a group count): with its kind and its
    /// inputs they rebuild the node (see `describe.rs`).
    fn attributes(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }

    /// Elements held in saved state (beyond the node's value and gradient).
    fn saved_elements(&self) -> usize {
        0
    }
}

/// Cloning and downcasting a boxed op; implemented for every `Clone` op.
pub trait CloneOperation<T> {
    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn Operation<T>>;
    /// The op as `Any`, to reach its own methods (e.g. setting a loss's labels).
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// The same, to read.
    fn as_any(&self) -> &dyn Any;
}

impl<T, O: Operation<T> + Clone + 'static> CloneOperation<T> for O {
    fn clone_box(&self) -> Box<dyn Operation<T>> {
        Box::new(self.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<T> Clone for Box<dyn Operation<T>> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

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
        // Distinct nodes, found with one split per input: sort the ids, and cut the slice
        // just after each in turn.
        let count = self.inputs.len().min(K);
        let mut order: [usize; K] = std::array::from_fn(|slot| slot);
        order[..count].sort_unstable_by_key(|&slot| self.inputs[slot].0);
        let mut found: [Option<&mut Node<T>>; K] = std::array::from_fn(|_| None);
        let (mut rest, mut offset) = (&mut *self.nodes, 0);
        for &slot in &order[..count] {
            let index = self.inputs[slot].0;
            if index < offset || index >= offset + rest.len() {
                return Err(Error::graph(format!(
                    "the inputs {:?} of a node must be distinct earlier nodes",
                    self.inputs
                )));
            }
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(index - offset + 1);
            found[slot] = head.last_mut();
            (rest, offset) = (tail, index + 1);
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
