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
//! Intermediate gradients are reset at the start of every backward pass; the gradients of leaves
//! (parameters and inputs) keep accumulating across backward calls until [`Graph::zero_grad`].
//!
//! The math never lives here: each arm of the two `match`es calls one op module's `forward` or
//! `backward`.

use crate::cost::{self, Cost};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::{
    add, avg_pool, conv1x1, conv2d, global_avg_pool, linear, max_pool, mse, relu,
    softmax_cross_entropy, GradWrite,
};
use crate::parallel::Along;
use ndarray::{
    ArrayD, ArrayView, ArrayViewD, ArrayViewMut, ArrayViewMutD, Axis, Dimension, Ix0, Ix1, Ix2,
    Ix4, IxDyn, Zip,
};

/// A node of one graph: an index into its tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(usize);

impl NodeId {
    /// The position of the node on the tape (its creation order).
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a node computes: its input ids and the state its backward pass needs.
#[derive(Debug, Clone)]
enum Op<T> {
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
    fn kind(&self) -> &'static str {
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
struct Node<T> {
    name: String,
    op: Op<T>,
    value: ArrayD<T>,
    grad: ArrayD<T>,
    /// True when some leaf below this node wants a gradient; backward skips the others.
    requires_grad: bool,
    /// False for an input that was never set.
    has_value: bool,
    /// During a backward pass: whether `grad` holds a contribution yet. Until it does, its
    /// content is stale, and the first contribution either overwrites it (ops that can) or
    /// zeroes it first. Leaves always count as written: they accumulate across passes.
    grad_written: bool,
}

/// The tape. `T` is `f32` for training and `f64` for gradient checks.
#[derive(Debug, Clone)]
pub struct Graph<T> {
    nodes: Vec<Node<T>>,
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
/// nothing.
fn resize<T: Element>(buffer: &mut ArrayD<T>, shape: &[usize]) {
    if buffer.shape() != shape {
        *buffer = ArrayD::zeros(IxDyn(shape));
    }
}

/// A typed view of a node buffer whose number of dimensions was already checked.
fn typed<T, D: Dimension>(buffer: &ArrayD<T>) -> Result<ArrayView<'_, T, D>> {
    buffer.view().into_dimensionality::<D>().map_err(|_| {
        Error::graph(format!(
            "a buffer of shape {:?} has the wrong number of dimensions",
            buffer.shape()
        ))
    })
}

fn typed_mut<T, D: Dimension>(buffer: &mut ArrayD<T>) -> Result<ArrayViewMut<'_, T, D>> {
    // Checked first, so that the error message can show the shape without a copy up front.
    if D::NDIM.is_some_and(|ndim| ndim != buffer.ndim()) {
        return Err(Error::graph(format!(
            "a buffer of shape {:?} has the wrong number of dimensions",
            buffer.shape()
        )));
    }
    buffer
        .view_mut()
        .into_dimensionality::<D>()
        .map_err(|_| Error::graph("a buffer has the wrong number of dimensions"))
}

/// Splits an input node into its value (read) and, when it wants one, its gradient, ready to
/// accumulate into (zeroed first if this pass has not written it yet).
#[allow(clippy::type_complexity)]
fn value_and_grad<T: Element, D: Dimension>(
    node: &mut Node<T>,
) -> Result<(ArrayView<'_, T, D>, Option<ArrayViewMut<'_, T, D>>)> {
    let (value, grad) = value_and_fresh_grad(node)?;
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
) -> Result<(
    ArrayView<'_, T, D>,
    Option<(ArrayViewMut<'_, T, D>, GradWrite)>,
)> {
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
        Some((typed_mut(grad)?, write))
    } else {
        None
    };
    Ok((typed(value)?, grad))
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
    /// An empty graph.
    pub fn new() -> Self {
        Graph { nodes: Vec::new() }
    }

    // ---------------------------------------------------------------- building

    fn push(&mut self, name: String, op: Op<T>, requires_grad: bool) -> NodeId {
        let leaf = matches!(op, Op::Param);
        self.nodes.push(Node {
            name,
            op,
            value: ArrayD::zeros(IxDyn(&[0])),
            grad: ArrayD::zeros(IxDyn(&[0])),
            requires_grad,
            has_value: leaf,
            grad_written: false,
        });
        NodeId(self.nodes.len() - 1)
    }

    fn node(&self, id: NodeId) -> Result<&Node<T>> {
        self.nodes.get(id.0).ok_or_else(|| {
            Error::graph(format!(
                "node {} does not exist (the graph has {} nodes)",
                id.0,
                self.nodes.len()
            ))
        })
    }

    /// Checks that every id exists and that they are pairwise distinct; returns whether any of
    /// them requires a gradient.
    fn check_inputs(&self, op: &'static str, ids: &[NodeId]) -> Result<bool> {
        for (i, id) in ids.iter().enumerate() {
            self.node(*id)?;
            if ids[..i].contains(id) {
                return Err(Error::invalid_config(
                    op,
                    format!("node {} is used for two different inputs", id.0),
                ));
            }
        }
        Ok(ids.iter().any(|id| self.nodes[id.0].requires_grad))
    }

    fn check_param(&self, op: &'static str, role: &str, id: NodeId) -> Result<()> {
        if !matches!(self.node(id)?.op, Op::Param) {
            return Err(Error::invalid_config(
                op,
                format!(
                    "the {role} must be a parameter node, found a {} node",
                    self.nodes[id.0].op.kind()
                ),
            ));
        }
        Ok(())
    }

    fn auto_name(&self, kind: &str) -> String {
        format!("{kind}#{}", self.nodes.len())
    }

    /// A data input that needs no gradient (the common case: a batch of images).
    pub fn input(&mut self, name: &str) -> NodeId {
        self.push(name.to_string(), Op::Input, false)
    }

    /// A data input whose gradient is computed (gradient checks of an op's input, saliency).
    pub fn input_with_grad(&mut self, name: &str) -> NodeId {
        self.push(name.to_string(), Op::Input, true)
    }

    /// A trained parameter with its initial value. Names must be unique: they key weight files.
    pub fn param(&mut self, name: &str, value: ArrayD<T>) -> Result<NodeId> {
        if name.is_empty() || self.find(name).is_some() {
            return Err(Error::invalid_config(
                "param",
                format!("parameter name {name:?} is empty or already used"),
            ));
        }
        if value.is_empty() {
            return Err(Error::invalid_shape(
                "param",
                format!("parameter {name:?} has no elements"),
                value.shape(),
            ));
        }
        let id = self.push(name.to_string(), Op::Param, true);
        // Standard layout, so that every buffer can be read as a flat slice in logical order.
        self.nodes[id.0].value = value.as_standard_layout().into_owned();
        Ok(id)
    }

    /// Validates the nodes of a layer: distinct existing ids, weight and bias parameters whose
    /// shapes `check_weights` accepts. Returns whether the layer's output needs a gradient.
    fn check_layer(
        &self,
        op: &'static str,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        check_weights: impl FnOnce(&[usize], Option<&[usize]>) -> Result<()>,
    ) -> Result<bool> {
        let ids: Vec<NodeId> = [Some(input), Some(weight), bias]
            .into_iter()
            .flatten()
            .collect();
        let requires_grad = self.check_inputs(op, &ids)?;
        self.check_param(op, "weight", weight)?;
        if let Some(bias) = bias {
            self.check_param(op, "bias", bias)?;
        }
        check_weights(
            self.nodes[weight.0].value.shape(),
            bias.map(|b| self.nodes[b.0].value.shape()),
        )?;
        Ok(requires_grad)
    }

    /// A 1×1 convolution of `input` (N, F, H, W) by `weight` (F1, F), plus an optional `bias` (F1).
    pub fn conv1x1(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        self.push_conv1x1(input, weight, bias, false)
    }

    /// The fused max(conv1x1(input), 0): the same values as `relu(conv1x1(...))` with one
    /// buffer and one pass instead of two (see [`conv1x1::forward_relu`]).
    pub fn conv1x1_relu(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        self.push_conv1x1(input, weight, bias, true)
    }

    fn push_conv1x1(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        relu: bool,
    ) -> Result<NodeId> {
        let requires_grad = self.check_layer("conv1x1", input, weight, bias, |w, b| {
            conv1x1::check_weights(w, b).map(drop)
        })?;
        let op = Op::Conv1x1 {
            input,
            weight,
            bias,
            relu,
        };
        Ok(self.push(self.auto_name(op.kind()), op, requires_grad))
    }

    /// A K×K convolution of `input` (N, F, H, W) by `weight` (F1, F, K, K), stride 1, zero
    /// padding `padding` on every side, plus an optional `bias` (F1).
    pub fn conv2d(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        padding: usize,
    ) -> Result<NodeId> {
        let requires_grad = self.check_layer("conv2d", input, weight, bias, |w, b| {
            conv2d::check_weights(w, b).map(drop)
        })?;
        let op = Op::Conv2d {
            input,
            weight,
            bias,
            padding,
        };
        Ok(self.push(self.auto_name("conv2d"), op, requires_grad))
    }

    /// A fully-connected layer on `input` (N, F): a 1×1 convolution on 1×1 maps.
    pub fn linear(
        &mut self,
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        let requires_grad = self.check_layer("linear", input, weight, bias, |w, b| {
            conv1x1::check_weights(w, b).map(drop)
        })?;
        let op = Op::Linear {
            input,
            weight,
            bias,
        };
        Ok(self.push(self.auto_name("linear"), op, requires_grad))
    }

    /// max(x, 0), elementwise.
    pub fn relu(&mut self, input: NodeId) -> Result<NodeId> {
        let requires_grad = self.check_inputs("relu", &[input])?;
        Ok(self.push(self.auto_name("relu"), Op::Relu { input }, requires_grad))
    }

    /// Max pooling with a `window`×`window` window every `stride` pixels.
    pub fn max_pool(&mut self, input: NodeId, window: usize, stride: usize) -> Result<NodeId> {
        let requires_grad = self.check_inputs("max_pool", &[input])?;
        max_pool::output_shape(&[1, 1, window.max(1), window.max(1)], window, stride)?;
        Ok(self.push(
            self.auto_name("max_pool"),
            Op::MaxPool {
                input,
                window,
                stride,
                argmax: Vec::new(),
            },
            requires_grad,
        ))
    }

    /// Average pooling with a `window`×`window` window every `stride` pixels.
    pub fn avg_pool(&mut self, input: NodeId, window: usize, stride: usize) -> Result<NodeId> {
        let requires_grad = self.check_inputs("avg_pool", &[input])?;
        avg_pool::output_shape(&[1, 1, window.max(1), window.max(1)], window, stride)?;
        Ok(self.push(
            self.auto_name("avg_pool"),
            Op::AvgPool {
                input,
                window,
                stride,
            },
            requires_grad,
        ))
    }

    /// The mean of every channel: (N, C, H, W) → (N, C).
    pub fn global_avg_pool(&mut self, input: NodeId) -> Result<NodeId> {
        let requires_grad = self.check_inputs("global_avg_pool", &[input])?;
        Ok(self.push(
            self.auto_name("global_avg_pool"),
            Op::GlobalAvgPool { input },
            requires_grad,
        ))
    }

    /// left + right, elementwise; both may be the same node.
    pub fn add(&mut self, left: NodeId, right: NodeId) -> Result<NodeId> {
        self.node(left)?;
        self.node(right)?;
        let requires_grad = self.nodes[left.0].requires_grad || self.nodes[right.0].requires_grad;
        Ok(self.push(
            self.auto_name("add"),
            Op::Add { left, right },
            requires_grad,
        ))
    }

    /// Mean softmax cross-entropy of `logits` (N, K); labels are set with [`Graph::set_labels`].
    pub fn softmax_cross_entropy(&mut self, logits: NodeId) -> Result<NodeId> {
        let requires_grad = self.check_inputs("softmax_cross_entropy", &[logits])?;
        let op = Op::SoftmaxCrossEntropy {
            logits,
            labels: Vec::new(),
            probs: ArrayD::zeros(IxDyn(&[0, 0])),
        };
        Ok(self.push(self.auto_name("softmax_cross_entropy"), op, requires_grad))
    }

    /// Mean squared error between `prediction` and `target`.
    pub fn mse(&mut self, prediction: NodeId, target: NodeId) -> Result<NodeId> {
        let requires_grad = self.check_inputs("mse", &[prediction, target])?;
        Ok(self.push(
            self.auto_name("mse"),
            Op::MeanSquaredError { prediction, target },
            requires_grad,
        ))
    }

    // ---------------------------------------------------------------- data in

    /// Copies `value` into an input node (its buffer is reused when the shape is unchanged).
    pub fn set_input(&mut self, id: NodeId, value: ArrayViewD<T>) -> Result<()> {
        let node = self.input_node(id)?;
        resize(&mut node.value, value.shape());
        node.value.assign(&value);
        node.has_value = true;
        Ok(())
    }

    /// [`Graph::set_input`] for data that must be finite: the copy checks every value as it
    /// goes (one pass over the batch, split between the threads) and a NaN or ±Inf is an
    /// [`Error::NonFinite`] naming its position. The input then counts as unset.
    pub fn set_input_finite(&mut self, id: NodeId, value: ArrayViewD<T>) -> Result<()> {
        let node = self.input_node(id)?;
        node.has_value = false;
        resize(&mut node.value, value.shape());
        let copy = |(Along(source, _), Along(mut target, _)): (
            Along<ArrayViewD<T>>,
            Along<ArrayViewMutD<T>>,
        )| {
            let mut finite = true;
            Zip::from(&mut target).and(&source).for_each(|t, &s| {
                *t = s;
                finite &= s.is_finite();
            });
            if finite {
                Ok(())
            } else {
                Err(Error::NonFinite {
                    what: String::new(),
                })
            }
        };
        let parts = (
            Along(value.view(), Axis(0)),
            Along(node.value.view_mut(), Axis(0)),
        );
        let result = if value.ndim() == 0 {
            copy(parts)
        } else {
            crate::parallel::in_parts(parts, &copy)
        };
        if result.is_err() {
            // Only now look for where: the common, finite case pays for one pass.
            let index = value.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(Error::NonFinite {
                what: format!("element {index} of input {:?}", node.name),
            });
        }
        node.has_value = true;
        Ok(())
    }

    fn input_node(&mut self, id: NodeId) -> Result<&mut Node<T>> {
        self.node(id)?;
        let node = &mut self.nodes[id.0];
        if !matches!(node.op, Op::Input) {
            let reason = format!(
                "node {:?} is a {} node, not an input",
                node.name,
                node.op.kind()
            );
            return Err(Error::graph(reason));
        }
        Ok(node)
    }

    /// Sets the class labels of a softmax cross-entropy node (checked against the logits at forward).
    pub fn set_labels(&mut self, loss: NodeId, new_labels: &[usize]) -> Result<()> {
        self.node(loss)?;
        match &mut self.nodes[loss.0].op {
            Op::SoftmaxCrossEntropy { labels, .. } => {
                labels.clear();
                labels.extend_from_slice(new_labels);
                Ok(())
            }
            other => Err(Error::graph(format!(
                "labels can only be set on a softmax_cross_entropy node, not on a {} node",
                other.kind()
            ))),
        }
    }

    /// Replaces a parameter's value; the new value must have the parameter's shape.
    pub fn set_param(&mut self, id: NodeId, value: ArrayViewD<T>) -> Result<()> {
        self.check_param("set_param", "node", id)?;
        let node = &mut self.nodes[id.0];
        crate::ops::check_same(
            "set_param",
            &format!("parameter {:?}", node.name),
            node.value.shape(),
            value.shape(),
        )?;
        node.value.assign(&value);
        Ok(())
    }

    // ---------------------------------------------------------------- forward

    /// Evaluates every node up to and including `target`, in creation order.
    pub fn forward(&mut self, target: NodeId) -> Result<()> {
        self.node(target)?;
        for index in 0..=target.0 {
            let (before, rest) = self.nodes.split_at_mut(index);
            let Node {
                name,
                op,
                value,
                has_value,
                ..
            } = &mut rest[0];
            match op {
                Op::Input | Op::Param => {
                    if !*has_value {
                        return Err(Error::graph(format!("input {name:?} was never set")));
                    }
                }
                Op::Conv1x1 {
                    input,
                    weight,
                    bias,
                    relu,
                } => {
                    let (x, w) = (&before[input.0].value, &before[weight.0].value);
                    let b = bias.map(|b| &before[b.0].value);
                    resize(
                        value,
                        &conv1x1::output_shape(x.shape(), w.shape(), b.map(|b| b.shape()))?,
                    );
                    let b = b.map(typed::<T, Ix1>).transpose()?;
                    if *relu {
                        conv1x1::forward_relu(typed(x)?, typed(w)?, b, typed_mut(value)?)?;
                    } else {
                        conv1x1::forward(typed(x)?, typed(w)?, b, typed_mut(value)?)?;
                    }
                }
                Op::Conv2d {
                    input,
                    weight,
                    bias,
                    padding,
                } => {
                    let (x, w) = (&before[input.0].value, &before[weight.0].value);
                    let b = bias.map(|b| &before[b.0].value);
                    let shape =
                        conv2d::output_shape(x.shape(), w.shape(), b.map(|b| b.shape()), *padding)?;
                    resize(value, &shape);
                    let b = b.map(typed::<T, Ix1>).transpose()?;
                    conv2d::forward(typed(x)?, typed(w)?, b, *padding, typed_mut(value)?)?;
                }
                Op::Linear {
                    input,
                    weight,
                    bias,
                } => {
                    let (x, w) = (&before[input.0].value, &before[weight.0].value);
                    let b = bias.map(|b| &before[b.0].value);
                    resize(
                        value,
                        &linear::output_shape(x.shape(), w.shape(), b.map(|b| b.shape()))?,
                    );
                    let b = b.map(typed::<T, Ix1>).transpose()?;
                    linear::forward(typed(x)?, typed(w)?, b, typed_mut(value)?)?;
                }
                Op::Relu { input } => {
                    let x = &before[input.0].value;
                    resize(value, x.shape());
                    relu::forward(x.view(), value.view_mut())?;
                }
                Op::MaxPool {
                    input,
                    window,
                    stride,
                    argmax,
                } => {
                    let x = &before[input.0].value;
                    resize(value, &max_pool::output_shape(x.shape(), *window, *stride)?);
                    argmax.resize(value.len(), 0);
                    max_pool::forward(typed(x)?, *window, *stride, typed_mut(value)?, argmax)?;
                }
                Op::AvgPool {
                    input,
                    window,
                    stride,
                } => {
                    let x = &before[input.0].value;
                    resize(value, &avg_pool::output_shape(x.shape(), *window, *stride)?);
                    avg_pool::forward(typed(x)?, *window, *stride, typed_mut(value)?)?;
                }
                Op::GlobalAvgPool { input } => {
                    let x = &before[input.0].value;
                    resize(value, &global_avg_pool::output_shape(x.shape())?);
                    global_avg_pool::forward(typed(x)?, typed_mut(value)?)?;
                }
                Op::Add { left, right } => {
                    let (a, b) = (&before[left.0].value, &before[right.0].value);
                    resize(value, add::output_shape(a.shape(), b.shape())?);
                    add::forward(a.view(), b.view(), value.view_mut())?;
                }
                Op::SoftmaxCrossEntropy {
                    logits,
                    labels,
                    probs,
                } => {
                    let z = &before[logits.0].value;
                    crate::ops::check_ndim("softmax_cross_entropy", "logits (N, K)", z.shape(), 2)?;
                    resize(probs, z.shape());
                    let loss =
                        softmax_cross_entropy::forward(typed(z)?, labels, typed_mut(probs)?)?;
                    resize(value, &[]);
                    typed_mut::<T, Ix0>(value)?[()] = loss;
                }
                Op::MeanSquaredError { prediction, target } => {
                    let (p, t) = (&before[prediction.0].value, &before[target.0].value);
                    let loss = mse::forward(p.view(), t.view())?;
                    resize(value, &[]);
                    typed_mut::<T, Ix0>(value)?[()] = loss;
                }
            }
        }
        Ok(())
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

    // ---------------------------------------------------------------- backward

    /// Back-propagates from a scalar `loss` node (∂L/∂L = 1) into every gradient.
    pub fn backward(&mut self, loss: NodeId) -> Result<()> {
        let one = T::one();
        self.backward_from(loss, ndarray::aview0(&one).into_dyn())
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
        // Size every gradient buffer. Intermediate gradients are not zeroed here: each is
        // marked unwritten, and its first contribution overwrites it or zeroes it first. Leaf
        // gradients keep what earlier backward calls accumulated.
        for node in &mut self.nodes[..=target.0] {
            if node.requires_grad {
                resize(&mut node.grad, node.value.shape());
                node.grad_written = matches!(node.op, Op::Input | Op::Param);
            }
        }
        let seed = &mut self.nodes[target.0];
        if !seed.requires_grad {
            return Ok(());
        }
        if seed.grad_written {
            seed.grad += &upstream;
        } else {
            seed.grad.assign(&upstream);
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
                crate::parallel::fill(node.grad.view_mut(), T::zero())?;
                node.grad_written = true;
                continue;
            }
            if let Op::Conv1x1 {
                input,
                weight,
                bias,
                relu,
            } = &node.op
            {
                let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                let (x, dx) = value_and_fresh_grad::<T, Ix4>(x_node)?;
                let dx_write = dx
                    .as_ref()
                    .map_or(GradWrite::Accumulate, |(_, write)| *write);
                let dx = dx.map(|(dx, _)| dx);
                let (w, dw) = value_and_grad::<T, Ix2>(w_node)?;
                let db = b_node
                    .map(value_and_grad::<T, Ix1>)
                    .transpose()?
                    .and_then(|(_, db)| db);
                if *relu {
                    // The node's own gradient is not read again: it is masked in place.
                    let (y, dy) = (typed(&node.value)?, typed_mut(&mut node.grad)?);
                    conv1x1::backward_relu(x, w, y, dy, dx, dw, db, dx_write)?;
                } else {
                    conv1x1::backward_with(x, w, typed(&node.grad)?, dx, dw, db, dx_write)?;
                }
                continue;
            }
            let node = &*node;
            let dy = &node.grad;
            match &node.op {
                Op::Input | Op::Param | Op::Conv1x1 { .. } => {}
                Op::Conv2d {
                    input,
                    weight,
                    bias,
                    padding,
                } => {
                    let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                    let (x, dx) = value_and_grad::<T, Ix4>(x_node)?;
                    let (w, dw) = value_and_grad::<T, Ix4>(w_node)?;
                    let db = b_node
                        .map(value_and_grad::<T, Ix1>)
                        .transpose()?
                        .and_then(|(_, db)| db);
                    conv2d::backward(x, w, *padding, typed(dy)?, dx, dw, db)?;
                }
                Op::Linear {
                    input,
                    weight,
                    bias,
                } => {
                    let (x_node, w_node, b_node) = weighted_inputs(before, *input, *weight, *bias)?;
                    let (x, dx) = value_and_grad::<T, Ix2>(x_node)?;
                    let (w, dw) = value_and_grad::<T, Ix2>(w_node)?;
                    let db = b_node
                        .map(value_and_grad::<T, Ix1>)
                        .transpose()?
                        .and_then(|(_, db)| db);
                    linear::backward(x, w, typed(dy)?, dx, dw, db)?;
                }
                Op::Relu { input } => {
                    if let (x, Some(dx)) = value_and_grad::<T, IxDyn>(&mut before[input.0])? {
                        relu::backward(x, dy.view(), dx)?;
                    }
                }
                Op::MaxPool { input, argmax, .. } => {
                    if let (_, Some((dx, write))) =
                        value_and_fresh_grad::<T, Ix4>(&mut before[input.0])?
                    {
                        max_pool::backward_with(typed(dy)?, argmax, dx, write)?;
                    }
                }
                Op::AvgPool {
                    input,
                    window,
                    stride,
                } => {
                    if let (_, Some(dx)) = value_and_grad::<T, Ix4>(&mut before[input.0])? {
                        avg_pool::backward(typed(dy)?, *window, *stride, dx)?;
                    }
                }
                Op::GlobalAvgPool { input } => {
                    if let (_, Some(dx)) = value_and_grad::<T, Ix4>(&mut before[input.0])? {
                        global_avg_pool::backward(typed(dy)?, dx)?;
                    }
                }
                Op::Add { left, right } => {
                    // Sequential, so that `x + x` (left == right) simply receives dy twice.
                    for side in [left, right] {
                        if let (_, Some(d_side)) = value_and_grad::<T, IxDyn>(&mut before[side.0])?
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
                    let dloss = typed::<T, Ix0>(dy)?[()];
                    if let (_, Some(dz)) = value_and_grad::<T, Ix2>(&mut before[logits.0])? {
                        softmax_cross_entropy::backward(typed(probs)?, labels, dloss, dz)?;
                    }
                }
                Op::MeanSquaredError { prediction, target } => {
                    let dloss = typed::<T, Ix0>(dy)?[()];
                    let [p_node, t_node] = distinct(before, [*prediction, *target])?;
                    let (p, dp) = value_and_grad::<T, IxDyn>(p_node)?;
                    let (t, dt) = value_and_grad::<T, IxDyn>(t_node)?;
                    mse::backward(p, t, dloss, dp, dt)?;
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

    /// What a node costs (parameters, multiply-adds, GEMM shapes), from the shapes of the last
    /// forward pass; see [`crate::cost`].
    pub fn cost(&self, id: NodeId) -> Result<Cost> {
        let node = self.node(id)?;
        let shape = |id: &NodeId, ndim: usize| -> Result<&[usize]> {
            let shape = self.nodes[id.0].value.shape();
            if shape.len() != ndim {
                return Err(Error::graph(format!(
                    "cost of {:?}: run forward first",
                    node.name
                )));
            }
            Ok(shape)
        };
        let needs_grad = |id: &NodeId| self.nodes[id.0].requires_grad;
        Ok(match &node.op {
            Op::Conv1x1 {
                input,
                weight,
                bias,
                ..
            } => cost::conv1x1(
                shape(input, 4)?,
                shape(weight, 2)?[0],
                bias.is_some(),
                needs_grad(input),
            ),
            Op::Conv2d {
                input,
                weight,
                bias,
                ..
            } => {
                let y = &node.value.shape();
                cost::conv2d(
                    shape(input, 4)?,
                    shape(weight, 4)?,
                    y,
                    bias.is_some(),
                    needs_grad(input),
                )
            }
            Op::Linear {
                input,
                weight,
                bias,
            } => cost::linear(
                shape(input, 2)?,
                shape(weight, 2)?[0],
                bias.is_some(),
                needs_grad(input),
            ),
            _ => Cost::default(),
        })
    }

    /// The sum of every node's cost (after a forward pass).
    pub fn total_cost(&self) -> Result<Cost> {
        let mut total = Cost::default();
        for id in self.node_ids() {
            let cost = self.cost(id)?;
            total.params += cost.params;
            total.forward_macs += cost.forward_macs;
            total.backward_macs += cost.backward_macs;
            total.gemms.extend(cost.gemms);
        }
        Ok(total)
    }

    /// Every node id, in creation order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        (0..self.nodes.len()).map(NodeId)
    }

    /// A table of every op node after a forward pass: its output shape (which node changes C,
    /// which changes H and W), its parameters, its multiply-adds and the GEMMs it runs.
    pub fn summary(&self) -> Result<String> {
        let mut text = format!(
            "{:<22} {:<22} {:>18} {:>9} {:>14} {:>14}  GEMMs (per sample × batch)\n",
            "node", "kind", "output shape", "params", "fwd MACs", "bwd MACs"
        );
        for (index, node) in self.nodes.iter().enumerate() {
            if matches!(node.op, Op::Input | Op::Param) {
                continue;
            }
            let cost = self.cost(NodeId(index))?;
            text += &format!(
                "{:<22} {:<22} {:>18} {:>9} {:>14} {:>14}  {}\n",
                node.name,
                node.op.kind(),
                format!("{:?}", node.value.shape()),
                cost.params,
                cost.forward_macs,
                cost.backward_macs,
                cost.gemms.join("; ")
            );
        }
        let total = self.total_cost()?;
        text += &format!(
            "{:<22} {:<22} {:>18} {:>9} {:>14} {:>14}\n",
            "total", "", "", total.params, total.forward_macs, total.backward_macs
        );
        Ok(text)
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
