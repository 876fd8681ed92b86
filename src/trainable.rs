//! Which leaves want gradients: an input's gradient asked for after the graph is built
//! (saliency on a trained network), and parameters frozen or trained again. Ops want a
//! gradient when one of their inputs does; the tape's backward pass skips the others. And
//! how a leaf's gradient starts the next pass: zeroed, or cleared for the pass to overwrite.

use crate::element::Element;
use crate::error::Result;
use crate::graph::{Graph, NodeId};

impl<T: Element> Graph<T> {
    /// Sets the accumulated gradients of every leaf (parameters, inputs) to zero.
    pub fn zero_grad(&mut self) {
        for node in &mut self.nodes {
            if node.is_leaf() {
                node.grad.fill(T::zero());
                node.grad_cleared = false;
            }
        }
    }

    /// Forgets the accumulated gradients of every leaf without touching their buffers, as
    /// PyTorch's `zero_grad(set_to_none=True)` does: the next backward pass writes each one
    /// instead of adding to zeros, which saves a pass over every gradient (a whole batch's,
    /// for an input's). Until that pass, [`Graph::grad`] of a leaf is an error, and an
    /// optimizer sees zeros.
    pub fn clear_grads(&mut self) {
        for node in &mut self.nodes {
            node.grad_cleared = node.is_leaf();
        }
    }

    /// Zeroes the gradients that [`Graph::clear_grads`] forgot, for a reader that needs them.
    pub(crate) fn settle_cleared_grads(&mut self) {
        for node in self.nodes.iter_mut().filter(|node| node.grad_cleared) {
            node.grad.fill(T::zero());
            node.grad_cleared = false;
        }
    }

    /// Asks for the gradient of an input after the graph is built (saliency on a trained
    /// network): every op that reads it, directly or not, now passes a gradient back to it.
    pub fn require_grad(&mut self, id: NodeId) -> Result<()> {
        self.input_node(id)?.requires_grad = true;
        self.propagate_requires_grad();
        Ok(())
    }

    /// Freezes a parameter (`false`: PyTorch's `requires_grad_(False)`) or makes it trained
    /// again. A frozen parameter gets no gradient, the optimizers leave it alone, and ops whose
    /// inputs are all frozen or data skip their backward pass.
    pub fn set_trainable(&mut self, id: NodeId, trainable: bool) -> Result<()> {
        self.param_shape("set_trainable", "node", id)?;
        self.nodes[id.0].requires_grad = trainable;
        self.propagate_requires_grad();
        Ok(())
    }

    /// Whether a parameter is trained (not frozen).
    pub fn is_trainable(&self, id: NodeId) -> Result<bool> {
        self.param_shape("is_trainable", "node", id)?;
        Ok(self.nodes[id.0].requires_grad)
    }

    /// An op wants a gradient when one of its inputs does: recomputed in creation order after
    /// a leaf changes its mind.
    fn propagate_requires_grad(&mut self) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].is_leaf() {
                continue;
            }
            let reached = self.nodes[index]
                .inputs
                .iter()
                .any(|input| self.nodes[input.0].requires_grad);
            self.nodes[index].requires_grad = reached;
        }
    }
}
