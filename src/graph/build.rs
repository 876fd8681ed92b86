//! Building the tape (leaves, and ops through one `push_op`), and setting the data a step runs
//! on. Each op's builder method (`Graph::conv1x1`, ...) lives in the op's own file.

use super::{Graph, Node, NodeId, Source};
use crate::element::Element;
use crate::error::{printable, Error, Result};
use crate::ops::Operation;
use ndarray::{ArrayD, IxDyn};

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
            grad_cleared: false,
            time: Default::default(),
        });
        self.id(self.nodes.len() - 1)
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
                format!(
                    "parameter name \"{}\" is empty or already used",
                    printable(name)
                ),
            ));
        }
        if value.is_empty() {
            return Err(Error::invalid_shape(
                "param",
                format!("parameter \"{}\" has no elements", printable(name)),
                value.shape(),
            ));
        }
        let id = self.push(name.to_string(), Source::Param, Vec::new());
        // Standard layout, so that every buffer can be read as a flat slice in logical order.
        self.nodes[id.0].value = value.as_standard_layout().into_owned();
        Ok(id)
    }
}
