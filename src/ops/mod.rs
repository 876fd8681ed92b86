//! The ops, one per file, each with its forward, its backward and its derivation side by side,
//! plus `forward_reference` / `backward_reference` index loops that are the specification the
//! fast path is tested against.
//!
//! This file holds only the shared shape checks.

pub mod add;
pub mod avg_pool;
pub mod conv1x1;
pub mod conv2d;
pub mod global_avg_pool;
pub mod linear;
pub mod max_pool;
pub mod mse;
pub mod relu;
pub mod softmax_cross_entropy;

use crate::error::{Error, Result};

/// How a backward pass writes an input's gradient buffer.
///
/// Backward passes accumulate (`+=`), so that a value read by two nodes receives both
/// contributions. When the tape knows that a buffer holds no contribution yet, a pass that
/// supports it may overwrite it instead (`=`), which saves zeroing the buffer first and reading
/// it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// gradient += contribution
    Accumulate,
    /// gradient = contribution (whatever the buffer held is ignored)
    Overwrite,
}

/// `[2, 6, 5, 5]`: how shapes appear in messages.
pub(crate) fn shape_text(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Checks that a shape has `ndim` dimensions.
pub(crate) fn check_ndim(op: &'static str, what: &str, shape: &[usize], ndim: usize) -> Result<()> {
    if shape.len() != ndim {
        return Err(Error::shape_mismatch(
            op,
            format!("{what} dimensions"),
            format!("{ndim}"),
            format!("{} (shape {})", shape.len(), shape_text(shape)),
        ));
    }
    Ok(())
}

/// Checks an (N, C, H, W) shape: four dimensions, and C, H, W all non-zero. A batch of 0 is
/// allowed (the output is an empty batch of the right shape).
pub(crate) fn check_image(op: &'static str, shape: &[usize]) -> Result<[usize; 4]> {
    check_ndim(op, "input (N, C, H, W)", shape, 4)?;
    if shape[1] == 0 || shape[2] == 0 || shape[3] == 0 {
        return Err(Error::invalid_shape(
            op,
            "channels, height and width must all be non-zero",
            shape,
        ));
    }
    Ok([shape[0], shape[1], shape[2], shape[3]])
}

/// Checks that a caller-provided buffer (an output or a gradient) has the shape it must have.
pub(crate) fn check_same(
    op: &'static str,
    what: &str,
    expected: &[usize],
    found: &[usize],
) -> Result<()> {
    if expected != found {
        return Err(Error::shape_mismatch(
            op,
            format!("{what} shape"),
            shape_text(expected),
            shape_text(found),
        ));
    }
    Ok(())
}

/// Output length of a pooling window sweep along one axis: ⌊(len − window) / stride⌋ + 1.
/// Checks window and stride first, so the subtraction cannot underflow.
pub(crate) fn pooled_len(
    op: &'static str,
    len: usize,
    window: usize,
    stride: usize,
    shape: &[usize],
) -> Result<usize> {
    if window == 0 || stride == 0 {
        return Err(Error::invalid_config(
            op,
            format!("window ({window}) and stride ({stride}) must be at least 1"),
        ));
    }
    if window > len {
        return Err(Error::invalid_shape(
            op,
            format!("window {window} is larger than the input's spatial size {len}"),
            shape,
        ));
    }
    Ok((len - window) / stride + 1)
}
