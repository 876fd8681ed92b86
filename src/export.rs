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
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| CheckpointError::Encode {
                    reason: format!("safetensors: {e}"),
                })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(
        safetensors::serialize(views, None).map_err(|e| CheckpointError::Encode {
            reason: format!("safetensors: {e}"),
        })?,
    )
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
    let missing: Vec<String> = expected
        .iter()
        .filter(|(n, _)| !names.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    let mut unexpected: Vec<String> = names
        .iter()
        .filter(|n| !expected.iter().any(|(e, _)| e == *n))
        .cloned()
        .collect();
    unexpected.sort();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(CheckpointError::TensorNames {
            missing,
            unexpected,
        }
        .into());
    }
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
