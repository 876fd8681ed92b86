//! The backward pass: every node from the target down, in reverse creation order, each op
//! adding its contribution to its inputs' gradients.

use super::chunk::{cut, Chunk};
use super::pass::{Backward, Ports};
use super::{Graph, Node, NodeId, Source};
use crate::element::Element;
use crate::error::Result;
use ndarray::{ArrayD, ArrayViewD};
use std::time::Instant;

impl<T: Element> Graph<T> {
    /// Back-propagates from a scalar `loss` node (∂L/∂L = 1) into every gradient.
    pub fn backward(&mut self, loss: NodeId) -> Result<()> {
        let one = T::one();
        self.backward_from(loss, ndarray::aview0(&one).into_dyn())
    }

    /// Back-propagates a given upstream gradient ∂L/∂(node) — of the node's shape — through the
    /// tape. Used by [`crate::gradcheck`] with a random upstream gradient.
    pub fn backward_from(&mut self, target: NodeId, upstream: ArrayViewD<T>) -> Result<()> {
        self.check_backward(target, upstream.shape())?;
        crate::parallel::on_the_pool(|| {
            self.in_chunks(target, |graph, chunk| {
                graph.sweep(target, Some(upstream.view()), chunk)
            })
        })?;
        self.settle_unreached_leaves();
        Ok(())
    }

    /// The same without copying the upstream gradient: `upstream` is lent to the pass as the
    /// node's gradient buffer, and swapped back after it (as `y.backward(g)` hands `g` to
    /// PyTorch's autograd). An op that transforms dY in place (a fused ReLU masks it) leaves
    /// its mark in `upstream`, and [`Graph::grad`] of the target is an error until the next
    /// pass (the caller holds it). A buffer that cannot be lent (not in standard layout, a leaf
    /// target, a pass in chunks) is copied, as by [`Graph::backward_from`].
    pub fn backward_from_mut(&mut self, target: NodeId, upstream: &mut ArrayD<T>) -> Result<()> {
        self.check_backward(target, upstream.shape())?;
        let lendable = upstream.is_standard_layout()
            && !self.nodes[target.0].is_leaf()
            && self.chunk_plan(target).is_none();
        if !lendable {
            return self.backward_from(target, upstream.view());
        }
        crate::parallel::on_the_pool(|| {
            self.in_chunks(target, |graph, _| {
                std::mem::swap(&mut graph.nodes[target.0].grad, upstream);
                let swept = graph.sweep(target, None, None);
                let seed = &mut graph.nodes[target.0];
                std::mem::swap(&mut seed.grad, upstream);
                // The caller holds the target's gradient: the graph's buffer holds none.
                seed.grad_written = false;
                swept
            })
        })?;
        self.settle_unreached_leaves();
        Ok(())
    }

    /// Refuses a pass from a target whose values are out of date, or an upstream gradient
    /// of another shape than the target's value.
    fn check_backward(&self, target: NodeId, upstream: &[usize]) -> Result<()> {
        self.node(target)?;
        if self.current_to.is_none_or(|c| c < target.0) {
            return Err(crate::error::Error::graph(format!(
                "the values below node {} are out of date (an input, a parameter, a label or \
                 the mode changed since the last forward pass): run forward({0}) first",
                target.0
            )));
        }
        super::same_shape("backward", self.nodes[target.0].value.shape(), upstream)
    }

    /// Cleared gradients the pass did not reach hold no contribution: they read as zero.
    fn settle_unreached_leaves(&mut self) {
        for node in &mut self.nodes {
            if node.grad_cleared {
                if !node.grad_written {
                    node.grad.fill(T::zero());
                }
                node.grad_cleared = false;
            }
        }
    }

    /// One reverse sweep over the samples of `chunk` (all of them for `None`), from the
    /// `upstream` gradient, or (`None`) from one already in the target's gradient buffer.
    fn sweep(
        &mut self,
        target: NodeId,
        upstream: Option<ArrayViewD<T>>,
        chunk: Option<Chunk>,
    ) -> Result<()> {
        // Intermediate gradients are not zeroed: each is marked unwritten, and its first
        // contribution overwrites it or zeroes it first.
        for node in &mut self.nodes {
            node.grad_written = node.is_leaf() && !node.grad_cleared;
        }
        let seed = &mut self.nodes[target.0];
        if !seed.requires_grad {
            return Ok(());
        }
        let (value_rows, grad_rows) = (seed.value_rows(chunk), seed.grad_rows(chunk));
        let mut seed_grad = cut(seed.grad.view_mut(), grad_rows);
        match upstream.map(|upstream| cut(upstream, value_rows)) {
            Some(upstream) if seed.grad_written => seed_grad += &upstream,
            Some(upstream) => seed_grad.assign(&upstream),
            None => debug_assert!(!seed.grad_written, "a lent buffer seeds an op's gradient"),
        }
        seed.grad_written = true;
        let profiling = self.profiling;
        for index in (0..=target.0).rev() {
            let (before, rest) = self.nodes.split_at_mut(index);
            let node = &mut rest[0];
            let (value_rows, grad_rows) = (node.value_rows(chunk), node.grad_rows(chunk));
            let Node {
                source: Source::Op(op),
                inputs,
                value,
                grad,
                requires_grad: true,
                grad_written,
                time,
                ..
            } = node
            else {
                continue;
            };
            if !*grad_written {
                // No gradient reached this node (it does not lead to the target): it has
                // nothing to pass on, and its gradient reads as zero.
                crate::parallel::fill(cut(grad.view_mut(), grad_rows), T::zero())?;
                *grad_written = true;
                continue;
            }
            let started = profiling.then(Instant::now);
            op.backward(Backward {
                y: cut(value.view(), value_rows),
                dy: cut(grad.view_mut(), grad_rows),
                inputs: Ports {
                    nodes: before,
                    inputs,
                    chunk,
                },
            })?;
            if let Some(started) = started {
                time[1] += started.elapsed();
            }
        }
        Ok(())
    }
}
