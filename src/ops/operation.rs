//! The interface between an op and the tape.
//!
//! An op is a struct that holds its settings (a pool's window, whether a bias is added) and
//! the state its backward pass needs (max pool's arg-max, the softmax probabilities), and
//! implements [`Operation`]: `forward` reads its inputs and writes its output, `backward` reads
//! the output gradient and adds into its inputs' gradients. The tape walks its nodes and calls
//! these two methods; it never looks inside. What each call may touch is handed over in a
//! small context ([`Forward`], [`Backward`]), built by the tape.
//!
//! Below the trait: what an op's builder method uses to put its node on the tape (checking
//! its parameters), and how an op's own methods reach their node later (a loss's labels).

use crate::cost::Cost;
use crate::element::Element;
use crate::error::{printable, Error, Result};
use crate::graph::{Backward, Forward, Graph, NodeId, Source};
use std::any::Any;
use std::fmt::Debug;

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

impl GradWrite {
    /// The β of a product C ← A·B + β·C that writes the gradient this way: 1 to add, 0 to
    /// overwrite (with β = 0 the GEMM ignores C's old values, even NaN).
    pub fn beta<T: Element>(self) -> T {
        match self {
            GradWrite::Accumulate => T::one(),
            GradWrite::Overwrite => T::zero(),
        }
    }
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

/// Putting an op on the tape, and reaching it there.
impl<T: Element> Graph<T> {
    /// The shape of parameter `id`, checked to be a parameter playing `role` in `op`.
    pub(crate) fn param_shape(&self, op: &'static str, role: &str, id: NodeId) -> Result<&[usize]> {
        let node = self.node(id)?;
        if !node.is_param() {
            return Err(Error::invalid_config(
                op,
                format!(
                    "the {role} must be a parameter node, found a {} node",
                    node.kind()
                ),
            ));
        }
        Ok(node.value.shape())
    }

    /// Checks that `ids` are pairwise distinct: an op that reads several inputs at once (a
    /// layer's input, weight and bias; a loss's prediction and target) needs distinct nodes.
    pub(crate) fn check_distinct(&self, op: &'static str, ids: &[NodeId]) -> Result<()> {
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(Error::invalid_config(
                    op,
                    format!("node {} is used for two different inputs", id.0),
                ));
            }
        }
        Ok(())
    }

    /// Adds a layer: `op` reading `input`, a `weight` and an optional `bias`, both parameters
    /// whose shapes `check_weights` accepts.
    pub(crate) fn push_layer(
        &mut self,
        op: impl Operation<T> + 'static,
        [input, weight]: [NodeId; 2],
        bias: Option<NodeId>,
        check_weights: impl FnOnce(&[usize], Option<&[usize]>) -> Result<()>,
    ) -> Result<NodeId> {
        let kind = op.kind();
        let ids: Vec<NodeId> = [Some(input), Some(weight), bias]
            .into_iter()
            .flatten()
            .collect();
        self.node(input)?;
        self.check_distinct(kind, &ids)?;
        let weight_shape = self.param_shape(kind, "weight", weight)?;
        let bias_shape = bias
            .map(|b| self.param_shape(kind, "bias", b))
            .transpose()?;
        check_weights(weight_shape, bias_shape)?;
        self.push_op(op, &ids)
    }

    /// The op of node `id` as its own type `O`, to read, if it is one.
    pub(crate) fn op_ref<O: 'static>(&self, id: NodeId) -> Option<&O> {
        match &self.node(id).ok()?.source {
            Source::Op(op) => op.as_any().downcast_ref::<O>(),
            _ => None,
        }
    }

    /// The op of node `id` as its own type `O`: how an op's methods reach their node (a loss's
    /// labels, say). The error names `what` the caller expected.
    pub(crate) fn op_mut<O: 'static>(&mut self, id: NodeId, what: &str) -> Result<&mut O> {
        self.node(id)?;
        self.invalidate();
        let node = &mut self.nodes[id.0];
        let kind = node.kind();
        let op = match &mut node.source {
            Source::Op(op) => op.as_any_mut().downcast_mut::<O>(),
            _ => None,
        };
        op.ok_or_else(|| {
            Error::graph(format!(
                "{what}: node \"{}\" is a {kind}",
                printable(&node.name)
            ))
        })
    }
}
