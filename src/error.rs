//! The one error type of the crate.
//!
//! Every public function whose input can be wrong returns [`Result`]. Messages name the op and
//! both what was expected and what was found, e.g.
//! `conv1x1: input channels: expected 4 (weight is 3×4), found 6 (input shape [2, 6, 5, 5])`.

use std::path::PathBuf;

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `pointwise`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two shapes that must agree do not (channel counts, batch sizes, buffer shapes).
    #[error("{op}: {what}: expected {expected}, found {found}")]
    ShapeMismatch {
        op: &'static str,
        what: String,
        expected: String,
        found: String,
    },

    /// A shape that cannot be used at all: a zero-sized dimension, a pool window larger than
    /// the input, the wrong number of dimensions.
    #[error("{op}: {reason} (shape {shape:?})")]
    InvalidShape {
        op: &'static str,
        reason: String,
        shape: Vec<usize>,
    },

    /// A configuration that makes no sense: stride 0, zero channels, a node used in the wrong
    /// role, a duplicate name.
    #[error("{op}: invalid configuration: {reason}")]
    InvalidConfig { op: &'static str, reason: String },

    /// A loss over zero samples (its mean would be 0/0).
    #[error("{op}: the batch is empty, a mean over 0 samples is undefined")]
    EmptyBatch { op: &'static str },

    /// A class label outside `0..classes`.
    #[error("{op}: label {label} of sample {sample} is out of range: expected 0..{classes}")]
    LabelOutOfRange {
        op: &'static str,
        sample: usize,
        label: usize,
        classes: usize,
    },

    /// A value that must be finite is NaN or infinite (a diverging loss, a bad input batch).
    #[error("non-finite value: {what}")]
    NonFinite { what: String },

    /// A node id that does not belong to this graph, or a value that was never set.
    #[error("graph: {reason}")]
    Graph { reason: String },

    /// A weights file is damaged, hostile or does not fit the model.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),

    /// An operating-system error, with the action and the path it concerned.
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn shape_mismatch(
        op: &'static str,
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Error::ShapeMismatch {
            op,
            what: what.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    pub(crate) fn invalid_shape(
        op: &'static str,
        reason: impl Into<String>,
        shape: &[usize],
    ) -> Self {
        Error::InvalidShape {
            op,
            reason: reason.into(),
            shape: shape.to_vec(),
        }
    }

    pub(crate) fn invalid_config(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            op,
            reason: reason.into(),
        }
    }

    pub(crate) fn graph(reason: impl Into<String>) -> Self {
        Error::Graph {
            reason: reason.into(),
        }
    }
}
