//! The cost model applied to a whole graph: every op node's parameters, multiply-adds and
//! GEMM shapes ([`crate::cost`]), from the shapes of the last forward pass, and a table of them.

use crate::cost::Cost;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Source};

impl<T: Element> Graph<T> {
    /// What a node costs (parameters, multiply-adds, GEMM shapes), from the shapes of the last
    /// forward pass; see [`crate::cost`]. Leaves cost nothing.
    pub fn cost(&self, id: NodeId) -> Result<Cost> {
        let node = self.node(id)?;
        let Source::Op(op) = &node.source else {
            return Ok(Cost::default());
        };
        if !node.has_value {
            return Err(Error::graph(format!(
                "cost of {:?}: run forward first",
                node.name
            )));
        }
        let inputs: Vec<&[usize]> = node
            .inputs
            .iter()
            .map(|input| self.nodes[input.0].value.shape())
            .collect();
        let input_grad = node
            .inputs
            .first()
            .is_some_and(|input| self.nodes[input.0].requires_grad);
        Ok(op.cost(&inputs, node.value.shape(), input_grad))
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

    /// A table of every op node after a forward pass: its output shape (which node changes C,
    /// which changes H and W), its parameters, its multiply-adds and the GEMMs it runs.
    pub fn summary(&self) -> Result<String> {
        let mut text = format!(
            "{:<22} {:<22} {:>18} {:>9} {:>14} {:>14}  GEMMs (per sample × batch)\n",
            "node", "kind", "output shape", "params", "fwd MACs", "bwd MACs"
        );
        for (id, node) in self.node_ids().zip(&self.nodes) {
            if node.is_leaf() {
                continue;
            }
            let cost = self.cost(id)?;
            text += &format!(
                "{:<22} {:<22} {:>18} {:>9} {:>14} {:>14}  {}\n",
                node.name,
                node.kind(),
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
}
