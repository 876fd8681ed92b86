//! Building the tape (leaves, and ops through one `push_op`), and setting the data a step runs
//! on. Each op's builder method (`Graph::conv1x1`, ...) lives in the op's own file.

use super::{resize, Graph, Node, NodeId, Operation, Source};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::parallel::Along;
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, IxDyn, Zip};

impl<T: Element> Graph<T> {
    fn push(&mut self, name: String, source: Source<T>, inputs: Vec<NodeId>) -> NodeId {
        let has_value = matches!(source, Source::Param);
        let (requires_grad, batched) = match &source {
            Source::Input => (false, true),
            Source::Param => (true, false),
            Source::Op(op) => {
                let batched: Vec<bool> = inputs.iter().map(|i| self.nodes[i.0].batched).collect();
                let requires_grad = inputs.iter().any(|i| self.nodes[i.0].requires_grad);
                (requires_grad, op.batched(&batched))
            }
        };
        self.nodes.push(Node {
            name,
            source,
            inputs,
            value: ArrayD::zeros(IxDyn(&[0])),
            grad: ArrayD::zeros(IxDyn(&[0])),
            requires_grad,
            has_value,
            batched,
            grad_written: false,
        });
        NodeId(self.nodes.len() - 1)
    }

    /// Adds an op reading `inputs` (earlier nodes; the same node may appear twice, as in
    /// x + x) and returns its id. Its name is its kind and position, `"conv1x1#4"`. The op's
    /// own builder method checks its settings and its parameters' shapes before calling this.
    pub fn push_op(
        &mut self,
        op: impl Operation<T> + 'static,
        inputs: &[NodeId],
    ) -> Result<NodeId> {
        for id in inputs {
            self.node(*id)?;
        }
        let name = format!("{}#{}", op.kind(), self.nodes.len());
        Ok(self.push(name, Source::Op(Box::new(op)), inputs.to_vec()))
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

    /// A data input that needs no gradient (the common case: a batch of images). Its
    /// gradient can be asked for later with [`Graph::require_grad`].
    pub fn input(&mut self, name: &str) -> NodeId {
        self.push(name.to_string(), Source::Input, Vec::new())
    }

    /// A data input whose gradient is computed (gradient checks of an op's input, saliency).
    pub fn input_with_grad(&mut self, name: &str) -> NodeId {
        let id = self.input(name);
        self.nodes[id.0].requires_grad = true;
        id
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
        let id = self.push(name.to_string(), Source::Param, Vec::new());
        // Standard layout, so that every buffer can be read as a flat slice in logical order.
        self.nodes[id.0].value = value.as_standard_layout().into_owned();
        Ok(id)
    }

    // ---------------------------------------------------------------- data in

    /// Copies `value` into an input node (its buffer is reused when the shape is unchanged),
    /// checking as it copies that every value is finite: one pass over the batch, split between
    /// the threads. A NaN or ±Inf is an [`Error::NonFinite`] naming its position, and the
    /// input then counts as unset.
    pub fn set_input(&mut self, id: NodeId, value: ArrayViewD<T>) -> Result<()> {
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
            finite.then_some(()).ok_or_else(|| Error::non_finite(""))
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

    /// The input's own buffer, sized to `shape`, for the caller to fill in place, so that a
    /// batch exists once in memory rather than twice; [`Graph::check_input_finite`] must
    /// follow. The buffer keeps its previous content until written.
    pub(crate) fn input_mut(
        &mut self,
        id: NodeId,
        shape: &[usize],
    ) -> Result<ArrayViewMutD<'_, T>> {
        let node = self.input_node(id)?;
        resize(&mut node.value, shape);
        node.has_value = true;
        Ok(node.value.view_mut())
    }

    /// Checks that every value of an input written through [`Graph::input_mut`] is finite
    /// (one read pass, split between the threads); if not, the input counts as unset.
    pub(crate) fn check_input_finite(&mut self, id: NodeId) -> Result<()> {
        let node = self.input_node(id)?;
        if !node.has_value {
            return Err(Error::graph(format!("input {:?} was not set", node.name)));
        }
        let check = |Along(part, _): Along<ArrayViewD<T>>| {
            let finite = part.iter().all(|v| v.is_finite());
            finite.then_some(()).ok_or_else(|| Error::non_finite(""))
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
        if !matches!(node.source, Source::Input) {
            let reason = format!(
                "node {:?} is a {} node, not an input",
                node.name,
                node.kind()
            );
            return Err(Error::graph(reason));
        }
        Ok(node)
    }

    /// Asks for the gradient of an input after the graph is built (saliency on a trained
    /// network): every op that reads it, directly or not, now passes a gradient back to it.
    pub fn require_grad(&mut self, id: NodeId) -> Result<()> {
        self.input_node(id)?.requires_grad = true;
        for index in id.0 + 1..self.nodes.len() {
            let reached = self.nodes[index]
                .inputs
                .iter()
                .any(|input| self.nodes[input.0].requires_grad);
            self.nodes[index].requires_grad |= reached;
        }
        Ok(())
    }

    /// Replaces a parameter's value; the new value must have the parameter's shape.
    pub fn set_param(&mut self, id: NodeId, value: ArrayViewD<T>) -> Result<()> {
        self.param_shape("set_param", "node", id)?;
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
    Error::non_finite(format!("element {index} of input {name:?}"))
}
