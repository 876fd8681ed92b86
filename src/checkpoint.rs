//! Weight files: a small versioned, checksummed, size-limited container around serde + bincode.
//!
//! ```text
//! offset  size  field                      (integers little-endian)
//! 0       8     magic  "PNTWISE\0"
//! 8       2     format version (u16), currently 1
//! 10      8     payload length L (u64)
//! 18      4     CRC-32 (IEEE) of the payload
//! 22      L     payload: bincode 2, standard config, of
//!               { architecture, layers, metadata, tensors: [{ name, dtype, shape, data }] }
//!               nothing may follow
//! ```
//!
//! A weights file is untrusted input. [`from_bytes`] checks, in this order: the size limit (the
//! caller checks the file's size before reading it), the magic, the version, that the payload
//! length equals what remains, the checksum, then decodes with a byte limit no larger than
//! twice the payload (so a forged length prefix cannot allocate more) and requires every byte
//! consumed; then each tensor: checked element-count arithmetic, data length = element count,
//! dtype, shape = the architecture's, all values finite. Missing and unexpected tensors are all
//! listed in one error. A failed load never touches a model in memory.
//!
//! Saves are atomic: write a temporary file in the same folder, `sync_all`, rename it over the
//! target, sync the folder. A crash or a full disk leaves the previous file intact.
//!
//! bincode is flagged unmaintained (RUSTSEC-2025-0141). It is pinned at 2.0.1 and used only in
//! this module, behind our own header and checks; the format can move to another encoder by
//! bumping the version.

pub use crate::error::CheckpointError;
use crate::error::{Error, Result};
use crate::model::{Architecture, Layer, Model};
use ndarray::{ArrayD, IxDyn};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The 8 bytes every weights file starts with.
pub const MAGIC: [u8; 8] = *b"PNTWISE\0";
/// The newest format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 22;
/// The largest payload accepted: 256 MiB, about 64 million f32 parameters.
pub const MAX_PAYLOAD: u64 = 1 << 28;

/// What the file records besides the weights.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    /// The `pointwise` version that wrote the file.
    pub crate_version: String,
    pub seed: u64,
    pub epochs: u64,
}

impl Metadata {
    /// Metadata for a run of this crate version.
    pub fn new(seed: u64, epochs: u64) -> Self {
        Metadata {
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            seed,
            epochs,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TensorRecord {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    data: Vec<f32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    architecture: Architecture,
    layers: Vec<Layer>,
    metadata: Metadata,
    tensors: Vec<TensorRecord>,
}

/// A validated weights file: build a model from it with [`Checkpoint::into_model`].
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub architecture: Architecture,
    pub metadata: Metadata,
    /// Named tensors in the architecture's order, each of the architecture's shape.
    pub tensors: Vec<(String, ArrayD<f32>)>,
}

/// Options of a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Files larger than this are refused before they are read.
    pub max_file_bytes: u64,
    /// Accept NaN and ±Inf weights (off by default: such a file is almost always a diverged run).
    pub allow_non_finite: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_file_bytes: HEADER_LEN as u64 + MAX_PAYLOAD,
            allow_non_finite: false,
        }
    }
}

impl Checkpoint {
    /// A readable description: the architecture, its layers, each tensor's name, shape and
    /// min/max/mean, and the metadata.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "architecture: {} input channels, {} classes, {}\n",
            self.architecture.channels,
            self.architecture.classes,
            match &self.architecture.bottleneck {
                Some(spec) => format!("bottleneck {spec:?}"),
                None => "baseline (global average pool → linear)".to_string(),
            }
        );
        for layer in self.architecture.layers() {
            text += &format!(
                "  layer {:<10} {:<22} {:>5} → {}\n",
                layer.name, layer.kind, layer.c_in, layer.c_out
            );
        }
        text += "tensors:\n";
        for (name, value) in &self.tensors {
            let count = value.len().max(1) as f64;
            let (min, max) = value
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let mean = value.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
            text += &format!(
                "  {name:<14} {:<12} min {min:>9.4}  max {max:>9.4}  mean {mean:>9.4}\n",
                format!("{:?}", value.shape())
            );
        }
        text += &format!(
            "metadata: written by pointwise {}, seed {}, {} epochs\n",
            self.metadata.crate_version, self.metadata.seed, self.metadata.epochs
        );
        text
    }

    /// Builds a fresh model of the stored architecture holding the stored weights.
    pub fn into_model(self) -> Result<Model> {
        let mut model = Model::new(self.architecture, 0)?;
        model.set_tensors(&self.tensors)?;
        Ok(model)
    }
}

// ------------------------------------------------------------------------------- writing

/// Encodes a model and its metadata as the bytes of a weights file. Refuses non-finite weights.
pub fn to_bytes(model: &Model, metadata: &Metadata) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (name, value) in model.tensors() {
        if let Some((index, &v)) = value.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(CheckpointError::NonFinite {
                name,
                index,
                value: v,
            }
            .into());
        }
        tensors.push(TensorRecord {
            shape: value.shape().iter().map(|&d| d as u64).collect(),
            // Logical (row-major) order, whatever the memory layout.
            data: value.iter().copied().collect(),
            dtype: "f32".to_string(),
            name,
        });
    }
    let architecture = model.architecture().clone();
    let payload = Payload {
        layers: architecture.layers(),
        architecture,
        metadata: metadata.clone(),
        tensors,
    };
    let body =
        bincode::serde::encode_to_vec(&payload, bincode::config::standard()).map_err(|e| {
            CheckpointError::Encode {
                reason: e.to_string(),
            }
        })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Saves a model atomically: the previous file at `path` survives any failure.
pub fn save(model: &Model, metadata: &Metadata, path: &Path) -> Result<()> {
    let bytes = to_bytes(model, metadata)?;
    write_atomically_with(path, &bytes, |file, bytes| file.write_all(bytes))
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary file a save of `path` writes first: `.NAME.tmp` in the same folder, so that
/// the final rename never crosses a file system.
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::Io {
        action: "save to",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        ),
    })?;
    let mut temporary = std::ffi::OsString::from(".");
    temporary.push(name);
    temporary.push(".tmp");
    Ok(path.with_file_name(temporary))
}

/// Writes `bytes` to `path` atomically, through `write` (which tests replace by a writer that
/// fails after k bytes). A stale temporary file left by an earlier crash is removed first.
pub fn write_atomically_with(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let temporary = temporary_path(path)?;
    if temporary.exists() {
        fs::remove_file(&temporary)
            .map_err(io_error("remove the stale temporary file", &temporary))?;
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .map_err(io_error("create", &temporary))?;
        write(&mut file, bytes).map_err(io_error("write", &temporary))?;
        file.sync_all().map_err(io_error("sync", &temporary))?;
        drop(file);
        fs::rename(&temporary, path).map_err(io_error("rename the temporary file over", path))
    })();
    if result.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&temporary);
        return result;
    }
    // Make the rename itself durable. Not every platform can open a folder; a failure here
    // does not undo the save.
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(folder) = File::open(folder) {
            let _ = folder.sync_all();
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------- reading

/// Reads and validates a weights file. Nothing is read when the file is over the size limit.
pub fn load(path: &Path, options: LoadOptions) -> Result<Checkpoint> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let size = file
        .metadata()
        .map_err(io_error("read the metadata of", path))?
        .len();
    if size > options.max_file_bytes {
        return Err(CheckpointError::TooLarge {
            size,
            limit: options.max_file_bytes,
        }
        .into());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // take(): the file could grow between the size check and the read.
    // One byte past the limit shows a file that grew; saturating, so that any limit works.
    file.take(options.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    if bytes.len() as u64 > options.max_file_bytes {
        return Err(CheckpointError::TooLarge {
            size: bytes.len() as u64,
            limit: options.max_file_bytes,
        }
        .into());
    }
    from_bytes(&bytes, options)
}

/// Loads weights into an existing model of the same architecture. The model is unchanged unless
/// everything checks out.
pub fn load_into(model: &mut Model, path: &Path, options: LoadOptions) -> Result<Metadata> {
    let checkpoint = load(path, options)?;
    if &checkpoint.architecture != model.architecture() {
        return Err(CheckpointError::Architecture {
            reason: format!(
                "the file holds {:?}, the model is {:?}",
                checkpoint.architecture,
                model.architecture()
            ),
        }
        .into());
    }
    model.set_tensors(&checkpoint.tensors)?;
    Ok(checkpoint.metadata)
}

/// What a file that is not ours probably is, for the error message.
fn detect_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.is_empty() {
        return Some("an empty file");
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return Some("a zip archive: a PyTorch .pt/.pth or a NumPy .npz file");
    }
    if bytes.starts_with(b"\x93NUMPY") {
        return Some("a NumPy .npy file");
    }
    if bytes.len() >= 9 && bytes[8] == b'{' {
        return Some("a safetensors file");
    }
    if bytes.starts_with(b"\x80") {
        return Some("a Python pickle");
    }
    None
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Decodes with a memory budget proportional to the payload. bincode's limit counts the
/// in-memory size of what it decodes (a 1-byte varint claims 8 bytes as a u64), so the budget
/// is 8× the payload, rounded up to a power of two because the limit is a compile-time constant
/// (hence the ladder). A forged length prefix is refused before it allocates more than that.
fn decode_limited(
    payload: &[u8],
) -> std::result::Result<(Payload, usize), bincode::error::DecodeError> {
    use bincode::config::standard;
    use bincode::serde::decode_from_slice;
    let budget = payload.len().saturating_mul(8);
    macro_rules! ladder {
        ($($bits:literal)*) => {
            $(if budget <= 1usize << $bits {
                return decode_from_slice(payload, standard().with_limit::<{ 1usize << $bits }>());
            })*
        };
    }
    ladder!(12 14 16 18 20 22 24 26 28 30);
    decode_from_slice(
        payload,
        standard().with_limit::<{ 8 * MAX_PAYLOAD as usize }>(),
    )
}

/// Validates the bytes of a weights file and returns its contents.
pub fn from_bytes(bytes: &[u8], options: LoadOptions) -> Result<Checkpoint> {
    let available = bytes.len() as u64;
    if available > options.max_file_bytes {
        return Err(CheckpointError::TooLarge {
            size: available,
            limit: options.max_file_bytes,
        }
        .into());
    }
    let magic_len = MAGIC.len().min(bytes.len());
    if bytes[..magic_len] != MAGIC[..magic_len] || bytes.is_empty() {
        return Err(CheckpointError::BadMagic {
            found: bytes[..magic_len].to_vec(),
            hint: detect_format(bytes),
        }
        .into());
    }
    if bytes.len() < HEADER_LEN {
        return Err(CheckpointError::Truncated {
            what: "the header",
            needed: HEADER_LEN as u64,
            available,
        }
        .into());
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        }
        .into());
    }
    let declared = read_u64(bytes, 10);
    if declared > MAX_PAYLOAD {
        return Err(CheckpointError::LimitExceeded {
            declared,
            limit: MAX_PAYLOAD,
        }
        .into());
    }
    let remaining = available - HEADER_LEN as u64;
    if declared > remaining {
        return Err(CheckpointError::Truncated {
            what: "the payload",
            needed: declared,
            available: remaining,
        }
        .into());
    }
    if declared < remaining {
        return Err(CheckpointError::TrailingBytes {
            count: remaining - declared,
        }
        .into());
    }
    let stored = u32::from_le_bytes([bytes[18], bytes[19], bytes[20], bytes[21]]);
    let payload = &bytes[HEADER_LEN..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CheckpointError::Checksum { stored, computed }.into());
    }
    let (decoded, used) = decode_limited(payload).map_err(|e| CheckpointError::Decode {
        reason: e.to_string(),
    })?;
    if used != payload.len() {
        return Err(CheckpointError::TrailingBytes {
            count: (payload.len() - used) as u64,
        }
        .into());
    }
    validate(decoded, options)
}

fn validate(payload: Payload, options: LoadOptions) -> Result<Checkpoint> {
    let architecture = payload.architecture;
    architecture
        .validate()
        .map_err(|e| CheckpointError::Architecture {
            reason: e.to_string(),
        })?;
    if payload.layers != architecture.layers() {
        return Err(CheckpointError::Architecture {
            reason: "the stored layer list does not match the stored architecture".to_string(),
        }
        .into());
    }
    let expected = architecture.tensor_shapes();
    // A hash set: a file of many distinct names is checked in linear time.
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for record in &payload.tensors {
        if !seen.insert(&record.name) {
            return Err(CheckpointError::DuplicateTensor {
                name: record.name.clone(),
            }
            .into());
        }
    }
    let missing: Vec<String> = expected
        .iter()
        .filter(|(name, _)| !seen.contains(&name.as_str()))
        .map(|(n, _)| n.clone())
        .collect();
    let unexpected: Vec<String> = payload
        .tensors
        .iter()
        .filter(|r| !expected.iter().any(|(name, _)| name == &r.name))
        .map(|r| r.name.clone())
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(CheckpointError::TensorNames {
            missing,
            unexpected,
        }
        .into());
    }
    let mut records = payload.tensors;
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let position = records.iter().position(|r| r.name == name).ok_or_else(|| {
            CheckpointError::TensorNames {
                missing: vec![name.clone()],
                unexpected: vec![],
            }
        })?;
        let record = records.swap_remove(position);
        tensors.push((name, validate_tensor(record, &shape, options)?));
    }
    Ok(Checkpoint {
        architecture,
        metadata: payload.metadata,
        tensors,
    })
}

fn validate_tensor(
    record: TensorRecord,
    expected: &[usize],
    options: LoadOptions,
) -> Result<ArrayD<f32>> {
    let TensorRecord {
        name,
        dtype,
        shape,
        data,
    } = record;
    if dtype != "f32" {
        return Err(CheckpointError::DType { name, found: dtype }.into());
    }
    let count = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let Some(count) = count.filter(|&c| usize::try_from(c).is_ok()) else {
        return Err(CheckpointError::ShapeOverflow { name, shape }.into());
    };
    if count != data.len() as u64 {
        return Err(CheckpointError::DataLength {
            name,
            expected: count,
            found: data.len() as u64,
        }
        .into());
    }
    if shape.len() != expected.len() || shape.iter().zip(expected).any(|(&a, &b)| a != b as u64) {
        return Err(CheckpointError::ShapeMismatch {
            name,
            expected: expected.to_vec(),
            found: shape,
        }
        .into());
    }
    if !options.allow_non_finite {
        if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(CheckpointError::NonFinite { name, index, value }.into());
        }
    }
    ArrayD::from_shape_vec(IxDyn(expected), data).map_err(|e| {
        CheckpointError::DataLength {
            name: format!("{name} ({e})"),
            expected: count,
            found: count,
        }
        .into()
    })
}
