//! A graph's state: everything a trained network remembers, by name — PyTorch's `state_dict`.
//!
//! That is every parameter, plus the buffers an op keeps between steps: a batch norm's running
//! mean and variance (named after its weight, `bn1.running_mean`, `bn1.running_var`) and its
//! batch count (`bn1.num_batches_tracked`, a counter). Weight files ([`crate::checkpoint`]) and
//! safetensors files ([`crate::export`]) both hold a state; both load through
//! [`Graph::load_state`], so they check the same things the same way.

use crate::element::Element;
use crate::error::{printable, CheckpointError, Error, Result};
use crate::graph::{Graph, NodeId};
use ndarray::{ArrayD, Ix1};
use std::collections::HashMap;

/// Named tensors and counters, in creation order.
#[derive(Clone, Debug, PartialEq)]
pub struct State<T> {
    /// Every parameter, then every running mean and variance.
    pub tensors: Vec<(String, ArrayD<T>)>,
    /// Every batch count.
    pub counters: Vec<(String, u64)>,
}

/// The names and shapes of a state's tensors, and the names of its counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateLayout {
    pub tensors: Vec<(String, Vec<usize>)>,
    pub counters: Vec<String>,
}

/// What a non-strict [`Graph::load_state`] did not load (a strict one refuses instead).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Names the graph has and the state lacks: left as they were.
    pub missing: Vec<String>,
    /// Names the state has and the graph lacks: ignored.
    pub unexpected: Vec<String>,
}

/// The prefix of a batch norm's buffer names: its weight's name without `.weight`.
pub(crate) fn buffer_prefix(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

/// The batch-norm nodes with the name prefix of their buffers (the weight's name without
/// `.weight`).
fn batch_norms<T: Element>(graph: &Graph<T>) -> Result<Vec<(NodeId, String)>> {
    let mut found = Vec::new();
    for id in graph.node_ids() {
        if crate::ops::batch_norm::is_batch_norm(graph.kind(id)?) {
            let weight = graph.name(graph.inputs(id)?[1])?;
            found.push((id, buffer_prefix(weight).to_string()));
        }
    }
    Ok(found)
}

impl<T: Element> Graph<T> {
    /// A copy of the state.
    pub fn state(&self) -> Result<State<T>> {
        let mut tensors = Vec::new();
        for param in self.params() {
            tensors.push((self.name(param)?.to_string(), self.value(param)?.to_owned()));
        }
        let mut counters = Vec::new();
        for (id, prefix) in batch_norms(self)? {
            let (mean, var, tracked) = self.running_stats(id)?;
            tensors.push((format!("{prefix}.running_mean"), mean.to_owned().into_dyn()));
            tensors.push((format!("{prefix}.running_var"), var.to_owned().into_dyn()));
            counters.push((format!("{prefix}.num_batches_tracked"), tracked));
        }
        Ok(State { tensors, counters })
    }

    /// The names and shapes of the state's tensors, and the names of its counters.
    pub fn state_layout(&self) -> Result<StateLayout> {
        let mut tensors = Vec::new();
        for param in self.params() {
            tensors.push((
                self.name(param)?.to_string(),
                self.value(param)?.shape().to_vec(),
            ));
        }
        let mut counters = Vec::new();
        for (id, prefix) in batch_norms(self)? {
            let channels = vec![self.running_stats(id)?.0.len()];
            tensors.push((format!("{prefix}.running_mean"), channels.clone()));
            tensors.push((format!("{prefix}.running_var"), channels));
            counters.push(format!("{prefix}.num_batches_tracked"));
        }
        Ok(StateLayout { tensors, counters })
    }

    /// Loads a state by name. Every tensor present must have its graph shape and finite values
    /// (a running variance also ≥ 0), and no name may appear twice. `strict` (PyTorch's
    /// default too) also requires exactly the graph's names; otherwise the missing ones keep
    /// their values, the unexpected ones are ignored, and both are reported. Nothing in the
    /// graph changes unless the whole load succeeds.
    pub fn load_state(&mut self, state: &State<T>, strict: bool) -> Result<LoadReport> {
        self.load_state_with(state, strict, true)
    }

    /// [`Graph::load_state`], with the finiteness check optional (a weight file loaded with
    /// `allow_non_finite`).
    pub(crate) fn load_state_with(
        &mut self,
        state: &State<T>,
        strict: bool,
        finite: bool,
    ) -> Result<LoadReport> {
        let StateLayout {
            tensors: layout,
            counters: counter_names,
        } = self.state_layout()?;
        let mut given: HashMap<&str, &ArrayD<T>> = HashMap::new();
        for (name, value) in &state.tensors {
            if given.insert(name, value).is_some() {
                return Err(duplicate(name));
            }
        }
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for (name, count) in &state.counters {
            if given.contains_key(name.as_str()) || counts.insert(name, *count).is_some() {
                return Err(duplicate(name));
            }
        }
        let expected: HashMap<&str, &[usize]> = layout
            .iter()
            .map(|(name, shape)| (name.as_str(), shape.as_slice()))
            .collect();
        let mut report = LoadReport::default();
        for (name, _) in &layout {
            if !given.contains_key(name.as_str()) {
                report.missing.push(name.clone());
            }
        }
        for name in &counter_names {
            if !counts.contains_key(name.as_str()) {
                report.missing.push(name.clone());
            }
        }
        for (name, _) in &state.tensors {
            if !expected.contains_key(name.as_str()) {
                report.unexpected.push(name.clone());
            }
        }
        let counter_set: std::collections::HashSet<&str> =
            counter_names.iter().map(String::as_str).collect();
        for (name, _) in &state.counters {
            if !counter_set.contains(name.as_str()) {
                report.unexpected.push(name.clone());
            }
        }
        if strict && !(report.missing.is_empty() && report.unexpected.is_empty()) {
            return Err(CheckpointError::TensorNames {
                missing: report.missing,
                unexpected: report.unexpected,
            }
            .into());
        }
        // Check everything that will be loaded, then load.
        for (name, shape) in &layout {
            if let Some(value) = given.get(name.as_str()) {
                check_tensor(name, shape, value, finite)?;
            }
        }
        for param in self.params() {
            let name = self.name(param)?.to_string();
            if let Some(value) = given.get(name.as_str()) {
                self.set_param(param, value.view())?;
            }
        }
        for (id, prefix) in batch_norms(self)? {
            let (mean, var, tracked) = self.running_stats(id)?;
            let (mut mean, mut var, mut tracked) = (mean.to_owned(), var.to_owned(), tracked);
            if let Some(value) = given.get(format!("{prefix}.running_mean").as_str()) {
                mean.assign(&one_d(value)?);
            }
            if let Some(value) = given.get(format!("{prefix}.running_var").as_str()) {
                var.assign(&one_d(value)?);
            }
            if let Some(count) = counts.get(format!("{prefix}.num_batches_tracked").as_str()) {
                tracked = *count;
            }
            self.set_running_stats(id, mean.view(), var.view(), tracked)?;
        }
        Ok(report)
    }
}

fn duplicate(name: &str) -> Error {
    CheckpointError::DuplicateTensor {
        name: name.to_string(),
    }
    .into()
}

fn one_d<T: Element>(value: &ArrayD<T>) -> Result<ndarray::ArrayView1<'_, T>> {
    value
        .view()
        .into_dimensionality::<Ix1>()
        .map_err(|_| Error::graph("a running statistic is one-dimensional"))
}

/// The shape, finiteness and (for a running variance) sign of one tensor about to be loaded.
fn check_tensor<T: Element>(
    name: &str,
    shape: &[usize],
    value: &ArrayD<T>,
    finite: bool,
) -> Result<()> {
    if value.shape() != shape {
        return Err(CheckpointError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: value.shape().iter().map(|&d| d as u64).collect(),
        }
        .into());
    }
    let mut values = value.iter().enumerate();
    if let Some((index, v)) = values.find(|(_, v)| finite && !v.is_finite()) {
        return Err(CheckpointError::NonFinite {
            name: name.to_string(),
            index,
            value: v.as_f64() as f32,
        }
        .into());
    }
    if name.ends_with(".running_var") && value.iter().any(|v| *v < T::zero()) {
        let reason = format!("{} holds a negative variance", printable(name));
        return Err(CheckpointError::Architecture { reason }.into());
    }
    Ok(())
}
