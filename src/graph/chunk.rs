//! Running the backward pass a few samples at a time.
//!
//! Every op computes sample n of its output from sample n of its inputs alone; only the loss
//! mixes samples, and its gradient for sample n depends on sample n alone (and the batch size
//! of the mean). So the pass can run a few samples at a time ([`Graph::set_backward_chunk`]):
//! the same reverse sweep once per chunk, each op reading rows `start..start + len` of the
//! values the forward pass saved for the whole batch. The gradient of an intermediate node then
//! holds one chunk, not the batch; parameter gradients sum over the chunks in order, so they
//! equal the whole-batch ones up to rounding.

use super::{Graph, Node, NodeId};
use crate::element::Element;
use crate::error::{Error, Result};
use ndarray::{ArrayBase, Axis, Dimension, RawData, Slice};
use std::ops::Range;

/// The samples one backward sweep covers: rows `start..start + len` of the batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl Chunk {
    pub(crate) fn rows(self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

impl<T> Node<T> {
    /// The rows of this node's value a chunk reads: a batched value holds the whole batch.
    pub(crate) fn value_rows(&self, chunk: Option<Chunk>) -> Option<Range<usize>> {
        chunk.filter(|_| self.batched).map(Chunk::rows)
    }

    /// The rows of this node's gradient a chunk writes: a batched leaf's gradient holds the
    /// whole batch (it accumulates across passes), an intermediate's only the current chunk.
    pub(crate) fn grad_rows(&self, chunk: Option<Chunk>) -> Option<Range<usize>> {
        chunk
            .filter(|_| self.batched)
            .map(|c| if self.is_leaf() { c.rows() } else { 0..c.len })
    }
}

/// `rows` of a view (shared or mutable) along its first axis (all of it for `None`). The
/// chunk plan guarantees that every batched buffer has the rows asked for.
pub(crate) fn cut<S: RawData, D: Dimension>(
    view: ArrayBase<S, D>,
    rows: Option<Range<usize>>,
) -> ArrayBase<S, D> {
    match rows {
        Some(rows) if view.ndim() > 0 => {
            let len = view.len_of(Axis(0));
            debug_assert!(rows.end <= len, "rows {rows:?} of a buffer of {len}");
            let end = rows.end.min(len);
            view.slice_axis_move(Axis(0), Slice::from(rows.start.min(end)..end))
        }
        _ => view,
    }
}

impl<T: Element> Graph<T> {
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

    /// `Some((batch, samples per chunk))` when the pass from `target` can run in chunks: a
    /// chunk size is set and smaller than the batch, the target is an op, and every node up to
    /// it other than the parameters (and a scalar loss target) carries the batch on axis 0.
    pub(super) fn chunk_plan(&self, target: NodeId) -> Option<(usize, usize)> {
        let samples = self.backward_chunk?;
        let nodes = &self.nodes[..=target.0];
        let batch = *nodes.iter().find(|n| n.batched)?.value.shape().first()?;
        let carries_batch = |(index, node): (usize, &Node<T>)| {
            node.is_param()
                || (index == target.0 && node.value.ndim() == 0)
                || (node.batched && node.value.shape().first() == Some(&batch))
        };
        let applies = samples < batch
            && !nodes[target.0].is_leaf()
            && nodes.iter().enumerate().all(carries_batch);
        applies.then_some((batch, samples))
    }

    /// Sizes every gradient buffer up to `target` (an intermediate batched node's to one chunk
    /// when the pass runs in chunks; leaf gradients keep what earlier passes accumulated), then
    /// runs `sweep` once per chunk, or once on the whole batch.
    pub(super) fn in_chunks(
        &mut self,
        target: NodeId,
        mut sweep: impl FnMut(&mut Self, Option<Chunk>) -> Result<()>,
    ) -> Result<()> {
        let plan = self.chunk_plan(target);
        if plan.is_some() {
            // Each chunk writes its own rows of a batched leaf's gradient: no one pass can
            // overwrite the whole of a cleared one.
            self.settle_cleared_grads();
        }
        for node in &mut self.nodes[..=target.0] {
            if !node.requires_grad {
                continue;
            }
            let mut shape = node.value.raw_dim();
            if let Some((_, samples)) = plan.filter(|_| node.batched && !node.is_leaf()) {
                shape.slice_mut()[0] = samples;
            }
            super::resize(&mut node.grad, shape.slice())?;
        }
        let Some((batch, samples)) = plan else {
            return sweep(self, None);
        };
        for start in (0..batch).step_by(samples) {
            let len = samples.min(batch - start);
            sweep(self, Some(Chunk { start, len }))?;
        }
        Ok(())
    }
}
