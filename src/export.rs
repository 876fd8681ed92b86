//! safetensors export and import, in PyTorch's layout.
//!
//! | pointwise tensor | shape here | safetensors name | shape there (PyTorch module) |
//! |---|---|---|---|
//! | `reduce.weight` | (R, C) | `reduce.weight` | (R, C, 1, 1): `nn.Conv2d(C, R, kernel_size=1)` |
//! | `reduce.bias` | (R) | `reduce.bias` | (R) |
//! | `expand.weight` | (C, R) | `expand.weight` | (C, R, 1, 1): `nn.Conv2d(R, C, kernel_size=1)` |
//! | `expand.bias` | (C) | `expand.bias` | (C) |
//! | `head.weight` | (K, C) | `head.weight` | (K, C): `nn.Linear(C, K)` |
//! | `head.bias` | (K) | `head.bias` | (K) |
//!
//! A 1×1 convolution's weight gains two trailing axes of length 1; the data are the same bytes in
//! the same row-major order, so a PyTorch module with attributes `reduce`, `expand` and `head`
//! loads the file with `module.load_state_dict(safetensors.torch.load_file(path))`, and a single
//! layer with the prefix stripped.
//!
//! Import goes through the same checks as our own format: every name present exactly once,
//! dtype F32, shape as the architecture expects, values finite.

use crate::checkpoint::write_atomically_with;
use crate::error::CheckpointError;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::model::{Architecture, Model};
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::io::Write;
use std::path::Path;

/// The PyTorch shape of one of our tensors: conv weights (F1, F) become (F1, F, 1, 1).
fn torch_shape(name: &str, shape: &[usize]) -> Vec<usize> {
    let is_conv_weight = name.ends_with(".weight") && !name.starts_with("head");
    let mut shape = shape.to_vec();
    if is_conv_weight {
        shape.extend([1, 1]);
    }
    shape
}

/// The bytes of a safetensors file holding the model's tensors in PyTorch's layout.
pub fn to_safetensors(model: &Model) -> Result<Vec<u8>> {
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .tensors()
        .into_iter()
        .map(|(name, value)| {
            // Logical order via iter(): correct for any memory layout.
            let bytes = value.iter().flat_map(|v| v.to_le_bytes()).collect();
            let shape = torch_shape(&name, value.shape());
            (name, shape, bytes)
        })
        .collect();
    let tensors = tensors
        .into_iter()
        .map(|(name, shape, bytes)| (name, Dtype::F32, shape, bytes))
        .collect();
    serialize(tensors)
}

/// Checks that the file's `names` are exactly the `expected` ones; otherwise lists every
/// missing and every unexpected name.
fn check_names<'a>(
    expected: impl Iterator<Item = &'a str> + Clone,
    names: &[String],
) -> Result<()> {
    let missing: Vec<String> = expected
        .clone()
        .filter(|e| !names.iter().any(|n| n == e))
        .map(str::to_string)
        .collect();
    let mut unexpected: Vec<String> = names
        .iter()
        .filter(|n| !expected.clone().any(|e| e == n.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    Err(CheckpointError::TensorNames {
        missing,
        unexpected,
    }
    .into())
}

/// The bytes of a safetensors file holding `tensors` (name, dtype, shape, little-endian data).
fn serialize(tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Result<Vec<u8>> {
    let encode = |e: safetensors::SafeTensorError| CheckpointError::Encode {
        reason: format!("safetensors: {e}"),
    };
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(encode)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(safetensors::serialize(views, None).map_err(encode)?)
}

/// Saves the model as a safetensors file, atomically.
pub fn save_safetensors(model: &Model, path: &Path) -> Result<()> {
    let bytes = to_safetensors(model)?;
    write_atomically_with(path, &bytes, |file, bytes| file.write_all(bytes))
}

/// Reads the tensors of `architecture` from safetensors bytes (PyTorch layout), validated.
pub fn from_safetensors(
    bytes: &[u8],
    architecture: &Architecture,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Decode {
        reason: format!("safetensors: {e}"),
    })?;
    let expected = architecture.tensor_shapes();
    let names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    check_names(expected.iter().map(|(n, _)| n.as_str()), &names)?;
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let view = file.tensor(&name).map_err(|e| CheckpointError::Decode {
            reason: format!("safetensors: {e}"),
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::DType {
                name,
                found: format!("{:?}", view.dtype()),
            }
            .into());
        }
        let torch = torch_shape(&name, &shape);
        if view.shape() != torch.as_slice() {
            let found = view.shape().iter().map(|&d| d as u64).collect();
            return Err(CheckpointError::ShapeMismatch {
                name,
                expected: torch,
                found,
            }
            .into());
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(CheckpointError::NonFinite { name, index, value }.into());
        }
        let array = ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| {
            Error::from(CheckpointError::Decode {
                reason: format!("safetensors: {name}: {e}"),
            })
        })?;
        tensors.push((name, array));
    }
    Ok(tensors)
}

/// Loads a safetensors file into a model; the model is unchanged unless everything checks out.
pub fn load_safetensors_into(model: &mut Model, path: &Path, max_file_bytes: u64) -> Result<()> {
    let size = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            action: "read the metadata of",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size > max_file_bytes {
        return Err(CheckpointError::TooLarge {
            size,
            limit: max_file_bytes,
        }
        .into());
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let tensors = from_safetensors(&bytes, model.architecture())?;
    model.set_tensors(&tensors)
}

// ---------------------------------------------------------------- any graph

/// How PyTorch lays out a parameter of ours, decided by the op that consumes it (not by its
/// name): a weight read by a 1×1 convolution (plain, fused or grouped) gains two trailing axes
/// of length 1; every other tensor (K×K and depthwise weights, linear weights, biases, batch
/// norm) has PyTorch's shape already.
fn torch_layout(graph: &Graph<f32>, param: NodeId, shape: &[usize]) -> Result<Vec<usize>> {
    let mut shape = shape.to_vec();
    for id in graph.node_ids() {
        let reads_as_weight = graph.inputs(id)?.get(1) == Some(&param);
        if reads_as_weight
            && matches!(
                graph.kind(id)?,
                "conv1x1" | "conv1x1+relu" | "grouped_conv1x1"
            )
        {
            shape.extend([1, 1]);
            break;
        }
    }
    Ok(shape)
}

/// The batch-norm nodes of a graph with the `state_dict` prefix of each (its weight's name
/// without `.weight`): PyTorch keeps `running_mean`, `running_var` and `num_batches_tracked`
/// beside `weight` and `bias`.
fn batch_norms(graph: &Graph<f32>) -> Result<Vec<(NodeId, String)>> {
    let mut found = Vec::new();
    for id in graph.node_ids() {
        if graph.kind(id)? == "batch_norm" {
            let weight = graph.name(graph.inputs(id)?[1])?;
            let prefix = weight.strip_suffix(".weight").unwrap_or(weight).to_string();
            found.push((id, prefix));
        }
    }
    Ok(found)
}

fn f32_bytes<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    values.flat_map(|v| v.to_le_bytes()).collect()
}

/// The bytes of a safetensors file holding every parameter of `graph` (and the running
/// statistics of its batch norms) under its name, in PyTorch's layout: a module tree with the
/// same names loads it with `load_state_dict(safetensors.torch.load_file(path))`.
pub fn graph_to_safetensors(graph: &Graph<f32>) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for param in graph.params() {
        let value = graph.value(param)?;
        let shape = torch_layout(graph, param, value.shape())?;
        tensors.push((
            graph.name(param)?.to_string(),
            Dtype::F32,
            shape,
            f32_bytes(value.iter()),
        ));
    }
    for (id, prefix) in batch_norms(graph)? {
        let (mean, var, tracked) = graph.running_stats(id)?;
        let channels = vec![mean.len()];
        tensors.push((
            format!("{prefix}.running_mean"),
            Dtype::F32,
            channels.clone(),
            f32_bytes(mean.iter()),
        ));
        tensors.push((
            format!("{prefix}.running_var"),
            Dtype::F32,
            channels,
            f32_bytes(var.iter()),
        ));
        let tracked = (tracked as i64).to_le_bytes().to_vec();
        tensors.push((
            format!("{prefix}.num_batches_tracked"),
            Dtype::I64,
            Vec::new(),
            tracked,
        ));
    }
    serialize(tensors)
}

/// Loads a safetensors file (PyTorch's layout, e.g. written by `safetensors.torch.save_file`
/// from a module's `state_dict`) into `graph`: every parameter and batch-norm statistic by name.
/// Strict: a missing or unexpected tensor, a dtype other than F32 (I64 for
/// `num_batches_tracked`), a shape other than PyTorch's for that op, or a non-finite value is
/// an error, and then nothing in the graph has changed.
pub fn graph_from_safetensors(graph: &mut Graph<f32>, bytes: &[u8]) -> Result<()> {
    let decode = |e: safetensors::SafeTensorError| CheckpointError::Decode {
        reason: format!("safetensors: {e}"),
    };
    let file = SafeTensors::deserialize(bytes).map_err(decode)?;
    // What the graph expects: (name, dtype, PyTorch shape, our shape).
    let mut expected: Vec<(String, Dtype, Vec<usize>, Vec<usize>)> = Vec::new();
    for param in graph.params() {
        let shape = graph.value(param)?.shape().to_vec();
        let torch = torch_layout(graph, param, &shape)?;
        expected.push((graph.name(param)?.to_string(), Dtype::F32, torch, shape));
    }
    let norms = batch_norms(graph)?;
    for (id, prefix) in &norms {
        let channels = vec![graph.running_stats(*id)?.0.len()];
        for stat in ["running_mean", "running_var"] {
            expected.push((
                format!("{prefix}.{stat}"),
                Dtype::F32,
                channels.clone(),
                channels.clone(),
            ));
        }
        expected.push((
            format!("{prefix}.num_batches_tracked"),
            Dtype::I64,
            Vec::new(),
            Vec::new(),
        ));
    }
    let names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    check_names(expected.iter().map(|e| e.0.as_str()), &names)?;
    // Check and convert everything first, then change the graph.
    let mut values: Vec<(String, ArrayD<f32>)> = Vec::new();
    let mut tracked: Vec<(String, u64)> = Vec::new();
    for (name, dtype, torch, shape) in expected {
        let view = file.tensor(&name).map_err(decode)?;
        if view.dtype() != dtype {
            return Err(CheckpointError::DType {
                name,
                found: format!("{:?}", view.dtype()),
            }
            .into());
        }
        if view.shape() != torch.as_slice() {
            let found = view.shape().iter().map(|&d| d as u64).collect();
            return Err(CheckpointError::ShapeMismatch {
                name,
                expected: torch,
                found,
            }
            .into());
        }
        if dtype == Dtype::I64 {
            let count = view
                .data()
                .get(..8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
            tracked.push((name, count.unwrap_or(0).max(0) as u64));
            continue;
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(CheckpointError::NonFinite { name, index, value }.into());
        }
        if name.ends_with(".running_var") && data.iter().any(|v| *v < 0.0) {
            let reason = format!("{name} holds a negative variance");
            return Err(CheckpointError::Architecture { reason }.into());
        }
        let array = ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| {
            Error::from(CheckpointError::Decode {
                reason: format!("safetensors: {name}: {e}"),
            })
        })?;
        values.push((name, array));
    }
    let value = |name: String| {
        values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.view())
    };
    for (id, prefix) in &norms {
        let (Some(mean), Some(var)) = (
            value(format!("{prefix}.running_mean")),
            value(format!("{prefix}.running_var")),
        ) else {
            continue; // listed above as expected, so present
        };
        let count = tracked
            .iter()
            .find(|(n, _)| *n == format!("{prefix}.num_batches_tracked"))
            .map_or(0, |t| t.1);
        let (mean, var) = (
            mean.into_dimensionality()
                .map_err(|_| Error::graph("running mean is 1-d"))?,
            var.into_dimensionality()
                .map_err(|_| Error::graph("running variance is 1-d"))?,
        );
        graph.set_running_stats(*id, mean, var, count)?;
    }
    for param in graph.params() {
        let name = graph.name(param)?.to_string();
        if let Some(array) = value(name) {
            graph.set_param(param, array)?;
        }
    }
    Ok(())
}
