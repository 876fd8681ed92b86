//! IDX files, the format of MNIST and Fashion-MNIST, read as untrusted input.
//!
//! ```text
//! offset  bytes  content (big-endian)
//! 0       4      magic: 0x00 0x00, the element type (0x08 = u8), the number of dimensions
//! 4       4·d    the size of each dimension (u32)
//! 4 + 4d  …      the elements, row-major
//! ```
//! Images are `0x00000803, count, rows, columns`, labels `0x00000801, count`. A file may be
//! gzip-compressed (as distributed); [`read_images`] and [`read_labels`] detect it from its
//! first two bytes. Every size is checked before anything is allocated: a wrong magic, sizes
//! that disagree with the file's length, a truncated file, more elements than
//! [`MAX_ELEMENTS`], images and labels of different counts, or a label outside the classes is
//! a typed error naming the file.

use crate::error::{Error, Result};
use ndarray::{Array4, ArrayView1};
use std::io::Read;
use std::path::Path;

/// The most elements one file may hold (2²⁸ bytes): the full MNIST training set holds 47
/// million. A file claiming more is refused before it is decompressed or allocated.
pub const MAX_ELEMENTS: u64 = 1 << 28;

/// Images (N, 1, rows, columns) as f32 pixel values 0–255, and labels as class indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Digits {
    pub images: Array4<f32>,
    pub labels: Vec<usize>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::invalid_config(
        "idx",
        format!(
            "{}: {}",
            crate::error::printable(&path.display().to_string()),
            reason.into()
        ),
    )
}

/// The file's bytes, decompressed if gzip, at most `MAX_ELEMENTS` + a header of them.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        action: "open",
        path: path.to_path_buf(),
        source,
    })?;
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(bad(path, "not a regular file"));
    }
    let limit = MAX_ELEMENTS + 4 + 4 * 255;
    let mut raw = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(|source| Error::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
    let mut bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("gzip: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() as u64 > limit {
        return Err(bad(path, format!("more than {MAX_ELEMENTS} elements")));
    }
    bytes.shrink_to_fit();
    Ok(bytes)
}

/// Checks the header against `dimensions` and the file's length; returns (sizes, elements).
fn parse<'a>(path: &Path, bytes: &'a [u8], dimensions: u8) -> Result<(Vec<usize>, &'a [u8])> {
    let header = 4 + 4 * dimensions as usize;
    if bytes.len() < header {
        return Err(bad(
            path,
            format!(
                "truncated: {} bytes, the header needs {header}",
                bytes.len()
            ),
        ));
    }
    if bytes[..4] != [0, 0, 0x08, dimensions] {
        return Err(bad(path, format!(
            "magic {:02x?}, expected [00, 00, 08, {dimensions:02x}] (u8 elements, {dimensions} dimensions)",
            &bytes[..4]
        )));
    }
    let sizes: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let elements = sizes.iter().try_fold(1u64, |p, &d| p.checked_mul(d as u64));
    let elements = match elements {
        Some(e) if e <= MAX_ELEMENTS => e as usize,
        _ => {
            return Err(bad(
                path,
                format!("sizes {sizes:?} hold more than {MAX_ELEMENTS} elements"),
            ))
        }
    };
    let body = &bytes[header..];
    if body.len() != elements {
        return Err(bad(
            path,
            format!(
                "sizes {sizes:?} need {elements} bytes after the header, the file has {}",
                body.len()
            ),
        ));
    }
    Ok((sizes, body))
}

/// Reads an IDX image file: (N, 1, rows, columns), pixel values 0–255 as f32.
pub fn read_images(path: &Path) -> Result<Array4<f32>> {
    let bytes = read_bytes(path)?;
    let (sizes, pixels) = parse(path, &bytes, 3)?;
    let shape = (sizes[0], 1, sizes[1], sizes[2]);
    Array4::from_shape_vec(shape, pixels.iter().map(|&p| f32::from(p)).collect())
        .map_err(|e| bad(path, e.to_string()))
}

/// Reads an IDX label file: one class index per image, each below `classes`.
pub fn read_labels(path: &Path, classes: usize) -> Result<Vec<usize>> {
    let bytes = read_bytes(path)?;
    let (_, labels) = parse(path, &bytes, 1)?;
    if let Some((index, label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(bad(
            path,
            format!("label {label} of image {index} is not below {classes} classes"),
        ));
    }
    Ok(labels.iter().map(|&l| l as usize).collect())
}

/// Reads an image file and its label file, checking that they hold as many items.
pub fn read_digits(images_path: &Path, labels_path: &Path, classes: usize) -> Result<Digits> {
    let (images, labels) = (
        read_images(images_path)?,
        read_labels(labels_path, classes)?,
    );
    if images.shape()[0] != labels.len() {
        let reason = format!("{} labels for {} images", labels.len(), images.shape()[0]);
        return Err(bad(labels_path, reason));
    }
    Ok(Digits { images, labels })
}

/// How many of each class `labels` holds (labels at or above `classes` are not counted).
pub fn class_counts(labels: ArrayView1<usize>, classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for &label in labels.iter().filter(|&&l| l < classes) {
        counts[label] += 1;
    }
    counts
}
