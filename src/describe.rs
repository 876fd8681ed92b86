//! The graph describes itself: every node's kind, settings and inputs, and every parameter's
//! name and shape, as plain data that serde writes anywhere. A description rebuilds the same
//! tape (parameters zeroed, to be loaded): it is the architecture a weight file stores.

use crate::element::Element;
use crate::error::{printable, Error, Result};
use crate::graph::{Graph, NodeId, Source};
use serde::{Deserialize, Serialize};

/// One node of a graph, as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeDescription {
    /// Data set from outside; `gradient` if its gradient is computed.
    Input { name: String, gradient: bool },
    /// A parameter; `trainable` is false when it is frozen.
    Param {
        name: String,
        shape: Vec<usize>,
        trainable: bool,
    },
    /// An op: its kind (`"conv1x1"`), its settings by name, and the positions of its inputs.
    Op {
        kind: String,
        inputs: Vec<usize>,
        #[serde(deserialize_with = "crate::bounded::vec")]
        attributes: Vec<(String, usize)>,
    },
}

/// Every node, in creation order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphDescription {
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub nodes: Vec<NodeDescription>,
}

impl<T: Element> Graph<T> {
    /// The description of every node, in creation order.
    pub fn describe(&self) -> GraphDescription {
        let nodes = self.nodes.iter().map(|node| match &node.source {
            Source::Input => NodeDescription::Input {
                name: node.name.clone(),
                gradient: node.requires_grad,
            },
            Source::Param => NodeDescription::Param {
                name: node.name.clone(),
                shape: node.value.shape().to_vec(),
                trainable: node.requires_grad,
            },
            Source::Op(op) => NodeDescription::Op {
                kind: op.kind().to_string(),
                inputs: node.inputs.iter().map(|id| id.index()).collect(),
                attributes: op
                    .attributes()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            },
        });
        GraphDescription {
            nodes: nodes.collect(),
        }
    }

    /// The graph a description describes, its parameters zeroed. Every input must name an
    /// earlier node and every size must be accepted by the op's own checks: a hostile
    /// description is an error, not a panic.
    pub fn from_description(description: &GraphDescription) -> Result<Graph<T>> {
        let mut graph = Graph::new();
        for (index, node) in description.nodes.iter().enumerate() {
            match node {
                NodeDescription::Input { name, gradient } => {
                    let id = graph.input(name);
                    if *gradient {
                        graph.require_grad(id)?;
                    }
                }
                NodeDescription::Param {
                    name,
                    shape,
                    trainable,
                } => {
                    let elements = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d));
                    if elements.is_none_or(|e| e > MAX_PARAM_ELEMENTS) {
                        return Err(Error::invalid_shape(
                            "describe",
                            format!(
                                "parameter {:?} is larger than {MAX_PARAM_ELEMENTS} elements",
                                printable(name)
                            ),
                            shape,
                        ));
                    }
                    let id = graph.param(name, ndarray::ArrayD::zeros(shape.as_slice()))?;
                    if !trainable {
                        graph.set_trainable(id, false)?;
                    }
                }
                NodeDescription::Op {
                    kind,
                    inputs,
                    attributes,
                } => {
                    if let Some(&bad) = inputs.iter().find(|&&input| input >= index) {
                        return Err(Error::invalid_config(
                            "describe",
                            format!("node {index} reads node {bad}, which is not an earlier node"),
                        ));
                    }
                    let ids: Vec<NodeId> = inputs.iter().map(|&i| graph.id(i)).collect();
                    crate::ops::rebuild(&mut graph, kind, &ids, attributes)?;
                }
            }
        }
        Ok(graph)
    }
}

/// The most elements one described parameter may have (2³⁰, 4 GiB of f32): a description
/// from a file cannot make the rebuild allocate without bound.
pub const MAX_PARAM_ELEMENTS: usize = 1 << 30;

/// An id is stored as its position alone: a file's ids name nodes of the graph rebuilt from it.
impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0 as u64)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let index = u64::deserialize(deserializer)?;
        let index = usize::try_from(index).map_err(serde::de::Error::custom)?;
        Ok(NodeId(index, crate::graph::UNBOUND))
    }
}
