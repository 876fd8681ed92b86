//! Building the tape: inputs, parameters and ops, each checked as it is added; and setting the
//! data a step runs on.

use super::resize;
use super::{Graph, Node, NodeId, Op};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::{avg_pool, conv1x1, conv2d, max_pool};
use crate::parallel::Along;
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, IxDyn, Zip};

impl<T: Element> Graph<T> {
    fn push(&mut self, name: String, op: Op<T>, requires_grad: bool) -> NodeId {
        let leaf = matches!(op, Op::Param);
        let batched = |id: &NodeId| self.nodes[id.0].batched;
        let batched = match &op {
            Op::Input => true,
            Op::Param | Op::SoftmaxCrossEntropy { .. } | Op::MeanSquaredError { .. } => false,
            Op::Add { left, right } => batched(left) && batched(right),
            Op::Conv1x1 { input, .. }
            | Op::Conv2d { input, .. }
            | Op::Linear { input, .. }
            | Op::Relu { input }
            | Op::MaxPool { input, .. }
            | Op::AvgPool { input, .. }
            | Op::GlobalAvgPool { input } => batched(input),
        };
        self.nodes.push(Node {
            name,
            op,
            value: ArrayD::zeros(IxDyn(&[0])),
            grad: ArrayD::zeros(IxDyn(&[0])),
            requires_grad,
            has_value: leaf,
            batched,
            grad_written: false,
        });
        NodeId(self.nodes.len() - 1)
    }

    pub(crate) fn node(&self, id: NodeId) -> Result<&Node<T>> {
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
        if crate::parallel::in_parts(parts, &copy).is_err() {
            return Err(non_finite_input(&node.name, value));
        }
        node.has_value = true;
        Ok(())
    }

    /// The input's own buffer, sized to `shape`, for the caller to fill in place: the zero-copy
    /// alternative to [`Graph::set_input`], so that a batch exists once in memory rather than
    /// twice (the caller's and the graph's). The buffer is reallocated only when the shape
    /// changes and keeps its previous content until written; the input counts as set.
    pub fn input_mut(&mut self, id: NodeId, shape: &[usize]) -> Result<ArrayViewMutD<'_, T>> {
        let node = self.input_node(id)?;
        resize(&mut node.value, shape);
        node.has_value = true;
        Ok(node.value.view_mut())
    }

    /// Checks that every value of a set input is finite (one read pass, split between the
    /// threads): for data written through [`Graph::input_mut`]. A NaN or ±Inf is an
    /// [`Error::NonFinite`] naming its position, and the input then counts as unset.
    pub fn check_input_finite(&mut self, id: NodeId) -> Result<()> {
        let node = self.input_node(id)?;
        if !node.has_value {
            return Err(Error::graph(format!("input {:?} was not set", node.name)));
        }
        let check = |Along(part, _): Along<ArrayViewD<T>>| {
            if part.iter().all(|v| v.is_finite()) {
                Ok(())
            } else {
                Err(Error::NonFinite {
                    what: String::new(),
                })
            }
        };
        if crate::parallel::in_parts(Along(node.value.view(), Axis(0)), &check).is_err() {
            node.has_value = false;
            return Err(non_finite_input(&node.name, node.value.view()));
        }
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
}

/// The error for an input holding a NaN or ±Inf, naming the first one. Only called once a
/// check has failed: the common, finite case pays for one pass.
fn non_finite_input<T: Element>(name: &str, values: ArrayViewD<T>) -> Error {
    let index = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Error::NonFinite {
        what: format!("element {index} of input {name:?}"),
    }
}
