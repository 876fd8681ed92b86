//! Tensors whose first element starts a cache line.
//!
//! Every buffer the tape allocates starts on a 64-byte boundary: one cache line, and the width
//! of an AVX-512 vector. A row whose length is a multiple of 16 floats (28·28 = 784 is) then
//! starts on a line too, and every full-width load or store of a GEMM tile touches one line
//! instead of straddling two. (PyTorch's CPU allocator aligns its tensors to 64 bytes too.)
//!
//! ndarray allocates through a `Vec`, which promises only the element's own alignment (glibc's
//! large allocations sit 16 bytes past a page). So the buffer is a `Vec` one line longer,
//! viewed from its first aligned element: the array owns the whole `Vec` and its data pointer
//! is offset into it, which ndarray supports for any owned array (a sliced one is the same).
//! A clone is a fresh `Vec` and need not be aligned; it is only slower.

use crate::element::Element;
use crate::error::{Error, Result};
use ndarray::{s, Array, Array1, ArrayD, Dimension, IxDyn};

/// The boundary every buffer starts on, in bytes.
pub(crate) const ALIGN: usize = 64;

/// An array of zeros of `shape`, in standard layout, whose first element is 64-byte
/// aligned.
pub fn zeros<T: Element, D: Dimension>(shape: D) -> Array<T, D> {
    let Some(len) = shape.size_checked() else {
        // Too large to exist: ndarray reports it as it always does.
        return Array::zeros(shape);
    };
    let slack = ALIGN / std::mem::size_of::<T>().max(1);
    let storage = vec![T::zero(); len + slack];
    let misalignment = storage.as_ptr() as usize % ALIGN;
    let offset = (ALIGN - misalignment) % ALIGN / std::mem::size_of::<T>().max(1);
    let mut flat = Array1::from_vec(storage);
    flat.slice_collapse(s![offset..offset + len]);
    flat.into_shape_with_order(shape.clone())
        .unwrap_or_else(|_| Array::zeros(shape))
}

/// The most elements one buffer of the tape may have: 2³¹ (8 GiB of f32). A larger shape, or
/// one whose element count overflows, is an error before anything is allocated.
pub const MAX_BUFFER_ELEMENTS: usize = 1 << 31;

/// The element count of `shape`, if it is within [`MAX_BUFFER_ELEMENTS`].
pub(crate) fn check_elements(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |product, &d| product.checked_mul(d))
        .filter(|&count| count <= MAX_BUFFER_ELEMENTS)
        .ok_or_else(|| {
            Error::invalid_shape(
                op,
                format!("a buffer of this shape would exceed {MAX_BUFFER_ELEMENTS} elements"),
                shape,
            )
        })
}

/// Reallocates `buffer` only when its shape changes: the reason steady-state steps allocate
/// nothing. A new buffer starts on a cache line (see [`zeros`]).
pub(crate) fn resize<T: Element>(buffer: &mut ArrayD<T>, shape: &[usize]) -> Result<()> {
    if buffer.shape() != shape {
        check_elements("buffer", shape)?;
        *buffer = zeros(IxDyn(shape));
    }
    Ok(())
}
