//! The forward pass: every node up to the target, in creation order.

use super::pass::{Forward, Inputs};
use super::{Graph, Node, NodeId, Source};
use crate::element::Element;
use crate::error::{printable, Error, Result};
use std::time::Instant;

impl<T: Element> Graph<T> {
    /// Evaluates every node up to and including `target`, in creation order.
    pub fn forward(&mut self, target: NodeId) -> Result<()> {
        crate::parallel::on_the_pool(|| self.forward_nodes(target))
    }

    fn forward_nodes(&mut self, target: NodeId) -> Result<()> {
        self.node(target)?;
        let current = self.current_to.take();
        let (training, profiling) = (self.training, self.profiling);
        for index in 0..=target.0 {
            let (before, rest) = self.nodes.split_at_mut(index);
            let Node {
                name,
                source,
                inputs,
                value,
                has_value,
                time,
                ..
            } = &mut rest[0];
            match source {
                Source::Input | Source::Param if !*has_value => {
                    return Err(Error::graph(format!(
                        "input \"{}\" was never set (set_input first)",
                        printable(name)
                    )));
                }
                Source::Input | Source::Param => {}
                Source::Op(op) => {
                    let inputs = Inputs {
                        nodes: before,
                        ids: inputs,
                    };
                    let started = profiling.then(Instant::now);
                    op.forward(Forward {
                        inputs,
                        output: value,
                        training,
                    })?;
                    if let Some(started) = started {
                        time[0] += started.elapsed();
                    }
                    *has_value = true;
                }
            }
        }
        self.current_to = Some(current.map_or(target.0, |c| c.max(target.0)));
        Ok(())
    }
}
