//! Reading the tape: nodes by name and kind, values, gradients, parameters, timings.

use crate::element::Element;
use crate::error::{printable, Error, Result};
use crate::graph::{Graph, NodeId, Source};
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};

/// A parameter seen by an optimizer: its name, its value to update, its gradient.
pub struct ParamMut<'a, T> {
    pub name: &'a str,
    pub value: &'a mut ArrayD<T>,
    pub grad: &'a ArrayD<T>,
    /// False for a frozen parameter ([`Graph::set_trainable`]): it has no gradient.
    pub trainable: bool,
}

impl<T: Element> Graph<T> {
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

    /// Times every op's forward and backward pass from now on (`true`) or stops (`false`);
    /// [`Graph::time`] reads the sums. Either call clears them: read them before turning
    /// profiling off. Off by default: two clock reads per op and pass.
    pub fn set_profiling(&mut self, profiling: bool) {
        self.profiling = profiling;
        for node in &mut self.nodes {
            node.time = Default::default();
        }
    }

    /// The time a node's forward and backward passes took in all, since profiling started.
    pub fn time(&self, id: NodeId) -> Result<[std::time::Duration; 2]> {
        Ok(self.node(id)?.time)
    }

    /// Whether the graph is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The ids of every parameter, in creation order.
    pub fn params(&self) -> Vec<NodeId> {
        self.node_ids()
            .filter(|id| self.nodes[id.0].is_param())
            .collect()
    }

    /// Every parameter with its value (to update) and its gradient, in creation order.
    pub fn params_mut(&mut self) -> impl Iterator<Item = ParamMut<'_, T>> {
        self.invalidate();
        self.settle_cleared_grads();
        self.nodes
            .iter_mut()
            .filter(|node| node.is_param())
            .map(|node| ParamMut {
                name: &node.name,
                value: &mut node.value,
                grad: &node.grad,
                trainable: node.requires_grad,
            })
    }

    /// A mutable view of a leaf's value (a parameter or a set input), e.g. to perturb it.
    pub fn leaf_value_mut(&mut self, id: NodeId) -> Result<ArrayViewMutD<'_, T>> {
        self.node(id)?;
        self.invalidate();
        let node = &mut self.nodes[id.0];
        if !node.is_leaf() || !node.has_value {
            return Err(Error::graph(format!(
                "node \"{}\" is not a leaf with a value",
                printable(&node.name)
            )));
        }
        Ok(node.value.view_mut())
    }

    /// The node's name (`"reduce.weight"`, or `"conv1x1#4"` for an op: kind and position).
    pub fn name(&self, id: NodeId) -> Result<&str> {
        Ok(&self.node(id)?.name)
    }

    /// The kind of node (`"conv1x1"`, `"param"`, `"input"`, ...).
    pub fn kind(&self, id: NodeId) -> Result<&'static str> {
        Ok(self.node(id)?.kind())
    }

    /// The ids a node reads.
    pub fn inputs(&self, id: NodeId) -> Result<&[NodeId]> {
        Ok(&self.node(id)?.inputs)
    }

    /// Every node id, in creation order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        let tag = self.tag;
        (0..self.nodes.len()).map(move |index| NodeId(index, tag))
    }

    /// The node with this name, if any.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .map(|index| self.id(index))
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
                let saved = match &node.source {
                    Source::Op(op) => op.saved_elements(),
                    _ => 0,
                };
                node.value.len() + node.grad.len() + saved
            })
            .sum()
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
    /// The gradient ∂L/∂(node) of a node that requires one (after [`Graph::backward`]).
    pub fn grad(&self, id: NodeId) -> Result<ArrayViewD<'_, T>> {
        let node = self.node(id)?;
        if !node.requires_grad {
            return Err(Error::graph(format!(
                "node \"{}\" does not require a gradient (Graph::require_grad asks for one)",
                printable(&node.name)
            )));
        }
        if !node.has_value || node.grad_cleared {
            return Err(Error::graph(format!(
                "the gradient of node \"{}\" is not there yet: run forward and backward first",
                printable(&node.name)
            )));
        }
        if !node.is_leaf() && !node.grad_written {
            return Err(Error::graph(format!(
                "the gradient of node \"{}\" is not held by the graph: the last backward pass \
                 did not reach it, or lent it (backward_from_mut)",
                printable(&node.name)
            )));
        }
        if node.grad.shape() != node.value.shape() {
            let reason = if node.batched && node.grad.shape().first() < node.value.shape().first() {
                "is not kept: the backward pass ran in chunks of samples and it holds only the \
                 last one (set_backward_chunk(None) keeps every gradient)"
            } else {
                "is not there yet: run forward and backward first"
            };
            return Err(Error::graph(format!(
                "the gradient of node \"{}\" {reason}",
                printable(&node.name)
            )));
        }
        Ok(node.grad.view())
    }
}
