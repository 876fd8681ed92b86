//! Weight files.

/// Everything that can be wrong with a weights file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("weights file is truncated")]
    Truncated,
}
