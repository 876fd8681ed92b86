//! safetensors export and import, in PyTorch's layout, for any graph.
//!
//! The file holds the graph's state ([`crate::state`]): every parameter and every batch norm's
//! running statistics, under their names, so a PyTorch module tree with the same names loads
//! it with `module.load_state_dict(safetensors.torch.load_file(path))`. PyTorch's layout of
//! each tensor is decided by the op that consumes it, not by its name:
//!
//! | tensor | shape here | shape there (PyTorch module) |
//! |---|---|---|
//! | 1×1 convolution weight (plain, fused with a ReLU, grouped) | (C_out, C_in/g) | (C_out, C_in/g, 1, 1): `nn.Conv2d(C_in, C_out, 1, groups=g)` |
//! | K×K and depthwise convolution weight | (C_out, C_in/g, K, K) | the same |
//! | linear weight | (out, in) | the same: `nn.Linear(in, out)` |
//! | biases, batch norm `weight`, `bias`, `running_mean`, `running_var` | (C) | the same |
//! | batch norm `num_batches_tracked` | a counter | a 0-d I64 tensor |
//!
//! A 1×1 convolution's weight gains two trailing axes of length 1; the data are the same bytes
//! in the same row-major order. Import goes through [`Graph::load_state`]: each name present
//! once, dtype F32 (I64 for the counters), PyTorch's shape for that op, values finite,
//! strictly by default; on error nothing in the graph has changed.

use crate::checkpoint::{read_limited, write_atomically_with};
use crate::error::CheckpointError;
use crate::error::{printable, Error, Result};
use crate::graph::{Graph, NodeId};
use crate::model::Model;
use crate::state::{LoadReport, State};
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::io::Write;
use std::path::Path;

/// The bytes of a safetensors file holding the model's state in PyTorch's layout.
pub fn to_safetensors(model: &Model) -> Result<Vec<u8>> {
    graph_to_safetensors(model.graph())
}

/// Saves the model's state as a safetensors file, atomically.
pub fn save_safetensors(model: &Model, path: &Path) -> Result<()> {
    let bytes = to_safetensors(model)?;
    write_atomically_with(path, &bytes, |file, bytes| file.write_all(bytes))
}

/// Loads a safetensors file into a model, strictly; the model is unchanged unless everything
/// checks out. Only a regular file of at most `max_file_bytes` is read.
pub fn load_safetensors_into(model: &mut Model, path: &Path, max_file_bytes: u64) -> Result<()> {
    let bytes = read_limited(path, max_file_bytes)?;
    graph_from_safetensors(model.graph_mut(), &bytes)
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

/// How PyTorch lays out a parameter of ours, decided by the op that consumes it: a weight read
/// by a 1×1 convolution (plain, fused or grouped) gains two trailing axes of length 1; every
/// other tensor has PyTorch's shape already.
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

/// PyTorch's shape of every state tensor, by name.
fn torch_shapes(graph: &Graph<f32>) -> Result<std::collections::HashMap<String, Vec<usize>>> {
    let mut shapes = std::collections::HashMap::new();
    for (name, shape) in graph.state_layout()?.tensors {
        let torch = match graph
            .find(&name)
            .filter(|&id| graph.kind(id).ok() == Some("param"))
        {
            Some(param) => torch_layout(graph, param, &shape)?,
            None => shape,
        };
        shapes.insert(name, torch);
    }
    Ok(shapes)
}

fn f32_bytes<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    values.flat_map(|v| v.to_le_bytes()).collect()
}

/// The bytes of a safetensors file holding the state of `graph` under its names, in PyTorch's
/// layout.
pub fn graph_to_safetensors(graph: &Graph<f32>) -> Result<Vec<u8>> {
    let state = graph.state()?;
    let shapes = torch_shapes(graph)?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, value) in &state.tensors {
        let shape = shapes
            .get(name)
            .cloned()
            .unwrap_or_else(|| value.shape().to_vec());
        // Logical order via iter(): correct for any memory layout.
        tensors.push((name.clone(), Dtype::F32, shape, f32_bytes(value.iter())));
    }
    for (name, count) in &state.counters {
        let count = i64::try_from(*count).unwrap_or(i64::MAX);
        tensors.push((
            name.clone(),
            Dtype::I64,
            Vec::new(),
            count.to_le_bytes().to_vec(),
        ));
    }
    serialize(tensors)
}

/// Loads a safetensors file (PyTorch's layout, e.g. written by `safetensors.torch.save_file`
/// from a module's `state_dict`) into `graph`, strictly: a missing or unexpected tensor, a
/// dtype other than F32 (I64 for `num_batches_tracked`), a shape other than PyTorch's for that
/// op, or a non-finite value is an error, and then nothing in the graph has changed.
pub fn graph_from_safetensors(graph: &mut Graph<f32>, bytes: &[u8]) -> Result<()> {
    graph_from_safetensors_with(graph, bytes, true).map(|_| ())
}

/// [`graph_from_safetensors`], strict or not (see [`Graph::load_state`]).
pub fn graph_from_safetensors_with(
    graph: &mut Graph<f32>,
    bytes: &[u8],
    strict: bool,
) -> Result<LoadReport> {
    let decode = |e: safetensors::SafeTensorError| CheckpointError::Decode {
        reason: format!("safetensors: {e}"),
    };
    check_header(bytes)?;
    let file = SafeTensors::deserialize(bytes).map_err(decode)?;
    let shapes = torch_shapes(graph)?;
    let layout = graph.state_layout()?.tensors;
    let ours: std::collections::HashMap<&str, &[usize]> = layout
        .iter()
        .map(|(name, shape)| (name.as_str(), shape.as_slice()))
        .collect();
    let mut state = State {
        tensors: Vec::new(),
        counters: Vec::new(),
    };
    for (name, view) in file.iter() {
        let name = name.to_string();
        if view.dtype() == Dtype::I64 && name.ends_with(".num_batches_tracked") {
            if !view.shape().is_empty() {
                let found = view.shape().iter().map(|&d| d as u64).collect();
                return Err(CheckpointError::ShapeMismatch {
                    name,
                    expected: Vec::new(),
                    found,
                }
                .into());
            }
            let word: [u8; 8] = view.data().try_into().unwrap_or([0; 8]);
            state
                .counters
                .push((name, i64::from_le_bytes(word).max(0) as u64));
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::DType {
                name,
                found: format!("{:?}", view.dtype()),
            }
            .into());
        }
        // PyTorch's shape for this op, read back into ours; an unknown name keeps its shape
        // (a non-strict load ignores it).
        let shape = match (shapes.get(&name), ours.get(name.as_str())) {
            (Some(torch), Some(&ours)) if view.shape() == torch.as_slice() => ours.to_vec(),
            (Some(torch), Some(_)) => {
                let found = view.shape().iter().map(|&d| d as u64).collect();
                return Err(CheckpointError::ShapeMismatch {
                    name,
                    expected: torch.clone(),
                    found,
                }
                .into());
            }
            _ => view.shape().to_vec(),
        };
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let array = ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| {
            Error::from(CheckpointError::Decode {
                reason: format!("safetensors: {name}: {e}"),
            })
        })?;
        state.tensors.push((name, array));
    }
    graph.load_state(&state, strict)
}

/// The largest safetensors header read: 100 MB, the safetensors format's own limit.
const MAX_HEADER: u64 = 100_000_000;

/// Checks a safetensors file's header before the safetensors crate reads it: an 8-byte length,
/// a JSON object with no key twice, and for every tensor a known dtype, a shape whose element
/// count and byte size fit (checked arithmetic) and equal its data offsets' span, inside the
/// data. A hostile header is a typed error in every build profile.
fn check_header(bytes: &[u8]) -> Result<()> {
    let fail = |reason: String| -> Result<()> {
        Err(CheckpointError::Decode {
            reason: format!("safetensors: {reason}"),
        }
        .into())
    };
    let Some(length) = bytes.get(..8) else {
        return fail("the file is shorter than its 8-byte header length".into());
    };
    let length = u64::from_le_bytes(length.try_into().unwrap_or([0; 8]));
    let available = bytes.len() as u64 - 8;
    if length > available.min(MAX_HEADER) {
        return fail(format!(
            "a header of {length} bytes in a file of {}",
            bytes.len()
        ));
    }
    let header = &bytes[8..8 + length as usize];
    let entries: Entries = match serde_json::from_slice(header) {
        Ok(entries) => entries,
        Err(error) => return fail(format!("the header is not valid: {error}")),
    };
    let data = available - length;
    for (name, entry) in entries.0 {
        if name == "__metadata__" {
            continue;
        }
        let Ok(entry) = serde_json::from_value::<Entry>(entry) else {
            return fail(format!(
                "tensor {:?} is not described properly",
                printable(&name)
            ));
        };
        let size = match entry.dtype.as_str() {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1u64,
            "I16" | "U16" | "F16" | "BF16" => 2,
            "I32" | "U32" | "F32" => 4,
            "I64" | "U64" | "F64" => 8,
            other => {
                return fail(format!(
                    "tensor {:?} has dtype {:?}",
                    printable(&name),
                    printable(other)
                ))
            }
        };
        let bytes_needed = entry
            .shape
            .iter()
            .try_fold(size, |total, &d| total.checked_mul(d));
        let [begin, end] = entry.data_offsets;
        if begin > end || end > data || bytes_needed != Some(end - begin) {
            return fail(format!(
                "tensor {:?}: shape {:?} and data offsets [{begin}, {end}] do not fit {data} bytes of data",
                printable(&name),
                entry.shape
            ));
        }
    }
    Ok(())
}

/// One tensor's entry in a safetensors header.
#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// A header's entries in order; a key given twice is an error (JSON would keep the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Entries, M::Error> {
                let mut entries: Vec<(String, serde_json::Value)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(key.clone()) {
                        let key = printable(&key);
                        return Err(serde::de::Error::custom(format!(
                            "the key {key:?} appears twice"
                        )));
                    }
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}
