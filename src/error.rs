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
    /// During training, `step` (counted from 0 over the whole run), `epoch` (from 1) and
    /// `batch` (from 0 within the epoch) say where.
    #[error("non-finite value: {what}{}", match (step, epoch, batch) {
        (Some(step), Some(epoch), Some(batch)) => format!(" at step {step} (epoch {epoch}, batch {batch})"),
        _ => String::new(),
    })]
    NonFinite {
        what: String,
        step: Option<u64>,
        epoch: Option<usize>,
        batch: Option<usize>,
    },

    /// A node id that does not belong to this graph, or a value that was never set.
    #[error("graph: {reason}")]
    Graph { reason: String },

    /// A weights file is damaged, hostile or does not fit the model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),

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

    /// A non-finite value outside training (no step).
    pub(crate) fn non_finite(what: impl Into<String>) -> Self {
        Error::NonFinite {
            what: what.into(),
            step: None,
            epoch: None,
            batch: None,
        }
    }

    pub(crate) fn graph(reason: impl Into<String>) -> Self {
        Error::Graph {
            reason: reason.into(),
        }
    }
}

/// Everything that can be wrong with a weights file, one variant per case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("weights file is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("weights file is truncated: {what} needs {needed} bytes, {available} remain")]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("not a pointwise weights file: wrong magic bytes {found:02x?}{}", hint.map(|h| format!(" (this looks like {h})")).unwrap_or_default())]
    BadMagic {
        found: Vec<u8>,
        hint: Option<&'static str>,
    },
    #[error("unsupported format version {found}, this build reads ≤ {supported}")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("declared payload length {declared} exceeds the limit of {limit} bytes")]
    LimitExceeded { declared: u64, limit: u64 },
    #[error("checksum mismatch: the file says {stored:08x}, the payload hashes to {computed:08x} (the file is damaged)")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload does not decode: {}", printable(reason))]
    Decode { reason: String },
    #[error("the weights could not be encoded: {reason}")]
    Encode { reason: String },
    #[error("{count} trailing bytes after the payload")]
    TrailingBytes { count: u64 },
    #[error("tensor {}: shape {} has more elements than fit in memory", printable(name), printable(&format!("{shape:?}")))]
    ShapeOverflow { name: String, shape: Vec<u64> },
    #[error(
        "tensor {}: shape holds {expected} elements but {found} values are stored",
        printable(name)
    )]
    DataLength {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "tensor {}: dtype {}, this build reads \"f32\"",
        printable(name),
        printable(found)
    )]
    DType { name: String, found: String },
    #[error(
        "tensor {}: shape {} does not fit the architecture, which expects {expected:?}",
        printable(name),
        printable(&format!("{found:?}"))
    )]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<u64>,
    },
    #[error(
        "tensor names do not match the architecture: missing {}, unexpected {}",
        printable_list(missing),
        printable_list(unexpected)
    )]
    TensorNames {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("tensor {} appears twice", printable(name))]
    DuplicateTensor { name: String },
    #[error("tensor {}: element {index} is {value}, not finite", printable(name))]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("architecture: {}", printable(reason))]
    Architecture { reason: String },
}

/// Text from a file, for a message: control characters escaped, at most 120 characters.
pub(crate) fn printable(text: &str) -> String {
    let escaped: String = text
        .chars()
        .flat_map(char::escape_default)
        .take(120)
        .collect();
    escaped
}

/// A list of names from a file, for a message: each escaped, at most 8 shown, then the count.
pub(crate) fn printable_list(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().take(8).map(|n| printable(n)).collect();
    match names.len() {
        0..=8 => format!("[{}]", shown.join(", ")),
        count => format!("[{}, … {} more]", shown.join(", "), count - 8),
    }
}
