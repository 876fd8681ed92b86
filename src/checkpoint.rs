//! Weight files: a small versioned, checksummed, size-limited container around serde + bincode.
//!
//! ```text
//! offset  size  field                      (integers little-endian)
//! 0       8     magic  "PNTWISE\0"
//! 8       2     format version (u16): 2 (1 is still read)
//! 10      8     payload length L (u64)
//! 18      4     CRC-32 (IEEE) of the payload
//! 22      L     payload: bincode 2, standard config, of
//!               { graph (the description of every node), roles (input, output, loss, target),
//!                 metadata, tensors: [{ name, dtype, shape, data }], counters: [(name, u64)],
//!                 training: none, or { config, epoch, step, optimizer moments by parameter } }
//!               nothing may follow
//! ```
//!
//! The file describes its own network ([`crate::describe`]): [`load`] rebuilds any graph from
//! the file alone, and [`load_into`] loads into a graph built in code, by name (strictly by
//! default, as PyTorch's `load_state_dict`). A file saved with [`save_training`] also holds the
//! optimizer's moments, the schedule's position and the epoch, so a run resumes bit for bit
//! ([`crate::train::Trainer::resume`]). Format 1 held the bottleneck alone (an `Architecture`);
//! such files load as the same network.
//!
//! A weights file is untrusted input. [`from_bytes`] checks, in this order: the size limit (the
//! caller checks the file's size before reading it), the magic, the version, that the payload
//! length equals what remains, the checksum, then decodes with a byte limit no larger than
//! eight times the payload (so a forged length prefix cannot allocate more) and requires every
//! byte consumed; then each tensor: checked element-count arithmetic, data length = element
//! count, dtype; that the description's parameters hold no more elements than the file stores
//! (so a description cannot make the rebuild allocate more than the file's size); then the
//! rebuild, every op checking its sizes; then names (each once, missing and unexpected all
//! listed in one error), shapes and finite values, through [`Graph::load_state`]. A failed
//! load never touches a model in memory.
//!
//! Saves are atomic: write a temporary file of a unique name in the same folder, `sync_all`,
//! rename it over the target, sync the folder. A crash or a full disk leaves the previous file
//! intact; two saves of one path at once leave one of the two files, whole. A save follows a
//! symbolic link and replaces the file it points to, keeps that file's permissions, and refuses
//! a target that is not a regular file (a device, a FIFO, a folder).
//!
//! bincode is flagged unmaintained (RUSTSEC-2025-0141). It is pinned at 2.0.1 and used only in
//! this module, behind our own header and checks; the format can move to another encoder by
//! bumping the version.

use crate::describe::GraphDescription;
pub use crate::error::CheckpointError;
use crate::error::{printable, Error, Result};
use crate::graph::Graph;
use crate::model::{Architecture, Layer, Model, Roles};
use crate::optim::OptimizerState;
use crate::state::{LoadReport, State};
use crate::train::{TrainConfig, TrainingState};
use ndarray::{ArrayD, IxDyn};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The 8 bytes every weights file starts with.
pub const MAGIC: [u8; 8] = *b"PNTWISE\0";
/// The format version this build writes; it reads this one and every earlier one.
pub const FORMAT_VERSION: u16 = 2;
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

/// Format 2.
#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    graph: GraphDescription,
    roles: Roles,
    metadata: Metadata,
    #[serde(deserialize_with = "crate::bounded::vec")]
    tensors: Vec<TensorRecord>,
    #[serde(deserialize_with = "crate::bounded::vec")]
    counters: Vec<(String, u64)>,
    training: Option<TrainingRecord>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TrainingRecord {
    config: TrainConfig,
    epoch: u64,
    step: u64,
    optimizer_steps: u64,
    /// Per parameter, named as the parameter: SGD's velocity or Adam's first moment.
    #[serde(deserialize_with = "crate::bounded::vec")]
    first: Vec<TensorRecord>,
    /// Adam's second moment.
    #[serde(deserialize_with = "crate::bounded::vec")]
    second: Vec<TensorRecord>,
}

/// Format 1: the bottleneck and its baseline only.
#[derive(serde::Serialize, serde::Deserialize)]
struct PayloadV1 {
    architecture: Architecture,
    layers: Vec<Layer>,
    metadata: Metadata,
    #[serde(deserialize_with = "crate::bounded::vec")]
    tensors: Vec<TensorRecord>,
}

/// A validated weights file: the network it holds, rebuilt, with its weights.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub model: Model,
    pub metadata: Metadata,
    /// Present in a file saved by [`save_training`]: where the run stood.
    pub training: Option<TrainingState>,
}

/// Options of a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Files larger than this are refused before they are read.
    pub max_file_bytes: u64,
    /// Accept NaN and ±Inf weights (off by default: such a file is almost always a diverged run).
    pub allow_non_finite: bool,
    /// [`load_into`]: require exactly the model's tensor names (on by default). Off, the
    /// missing ones keep their values, the unexpected ones are ignored, and both are reported.
    pub strict: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_file_bytes: HEADER_LEN as u64 + MAX_PAYLOAD,
            allow_non_finite: false,
            strict: true,
        }
    }
}

impl Checkpoint {
    /// A readable description: every node, each tensor's name, shape and min/max/mean, and
    /// the metadata. Names from the file are escaped and long shapes cut.
    pub fn describe(&self) -> String {
        let graph = self.model.graph();
        let mut text = format!("graph: {} nodes\n", graph.len());
        for id in graph.node_ids() {
            let (Ok(kind), Ok(name), Ok(inputs)) =
                (graph.kind(id), graph.name(id), graph.inputs(id))
            else {
                continue;
            };
            if kind == "param" {
                continue;
            }
            let inputs: Vec<usize> = inputs.iter().map(|i| i.index()).collect();
            text += &format!(
                "  {:>3} {:<24} {:<22} reads {}\n",
                id.index(),
                printable(name),
                kind,
                printable(&format!("{inputs:?}"))
            );
        }
        text += "tensors:\n";
        for (name, value) in self.model.tensors() {
            let count = value.len().max(1) as f64;
            let (min, max) = value
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let mean = value.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
            text += &format!(
                "  {:<24} {:<16} min {min:>9.4}  max {max:>9.4}  mean {mean:>9.4}\n",
                printable(&name),
                printable(&format!("{:?}", value.shape()))
            );
        }
        if let Some(training) = &self.training {
            text += &format!(
                "training: {} epochs and {} steps done, optimizer {:?}\n",
                training.epoch, training.step, training.config.optimizer
            );
        }
        text += &format!(
            "metadata: written by pointwise {}, seed {}, {} epochs\n",
            printable(&self.metadata.crate_version),
            self.metadata.seed,
            self.metadata.epochs
        );
        text
    }

    /// The model the file holds.
    pub fn into_model(self) -> Model {
        self.model
    }
}

/// What [`load_into`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub metadata: Metadata,
    /// Empty unless the load was not strict.
    pub report: LoadReport,
}

// ------------------------------------------------------------------------------- writing

fn record(name: String, value: &ArrayD<f32>) -> Result<TensorRecord> {
    if let Some((index, &v)) = value.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(CheckpointError::NonFinite {
            name,
            index,
            value: v,
        }
        .into());
    }
    Ok(TensorRecord {
        shape: value.shape().iter().map(|&d| d as u64).collect(),
        // Logical (row-major) order, whatever the memory layout.
        data: value.iter().copied().collect(),
        dtype: "f32".to_string(),
        name,
    })
}

fn encode(model: &Model, metadata: &Metadata, training: Option<&TrainingState>) -> Result<Vec<u8>> {
    let graph = model.graph();
    let state = graph.state()?;
    let tensors = state
        .tensors
        .into_iter()
        .map(|(name, value)| record(name, &value))
        .collect::<Result<Vec<_>>>()?;
    let training = training
        .map(|training| -> Result<TrainingRecord> {
            let names: Vec<String> = graph
                .params()
                .into_iter()
                .map(|id| graph.name(id).map(str::to_string))
                .collect::<Result<_>>()?;
            let moments = |buffers: &[ArrayD<f32>]| {
                names
                    .iter()
                    .zip(buffers)
                    .map(|(name, value)| record(name.clone(), value))
                    .collect::<Result<Vec<_>>>()
            };
            Ok(TrainingRecord {
                config: training.config.clone(),
                epoch: training.epoch,
                step: training.step,
                optimizer_steps: training.optimizer.steps,
                first: moments(&training.optimizer.first)?,
                second: moments(&training.optimizer.second)?,
            })
        })
        .transpose()?;
    let payload = Payload {
        graph: graph.describe(),
        roles: model.roles(),
        metadata: metadata.clone(),
        tensors,
        counters: state.counters,
        training,
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

/// Encodes a model (its graph, its weights) and its metadata as the bytes of a weights file.
/// Refuses non-finite weights.
pub fn to_bytes(model: &Model, metadata: &Metadata) -> Result<Vec<u8>> {
    encode(model, metadata, None)
}

/// [`to_bytes`], with where the training run stands (to resume it).
pub fn to_bytes_with_training(
    model: &Model,
    metadata: &Metadata,
    training: &TrainingState,
) -> Result<Vec<u8>> {
    encode(model, metadata, Some(training))
}

/// Saves a model atomically: the previous file at `path` survives any failure.
pub fn save(model: &Model, metadata: &Metadata, path: &Path) -> Result<()> {
    let bytes = to_bytes(model, metadata)?;
    write_atomically_with(path, &bytes, |file, bytes| file.write_all(bytes))
}

/// Saves a model and its trainer's state atomically (a training checkpoint).
pub fn save_training(
    model: &Model,
    training: &TrainingState,
    metadata: &Metadata,
    path: &Path,
) -> Result<()> {
    let bytes = to_bytes_with_training(model, metadata, training)?;
    write_atomically_with(path, &bytes, |file, bytes| file.write_all(bytes))
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn invalid_path(action: &'static str, path: &Path, why: &str) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
    }
}

/// Saves so far by this process: with the process id, what makes temporary names unique.
static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The longest part of the target's name a temporary name repeats: the whole temporary name
/// stays under the usual 255-byte limit of a file name.
const NAME_PART: usize = 200;

/// The prefix of every temporary name of a save of `path`: `.NAME.` (NAME cut to fit).
fn temporary_prefix(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .ok_or_else(|| invalid_path("save to", path, "the path has no file name"))?
        .to_string_lossy();
    let mut end = name.len().min(NAME_PART);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Ok(format!(".{}.", &name[..end]))
}

/// A fresh temporary file name for a save of `path`, in the same folder (so that the final
/// rename never crosses a file system): `.NAME.PID.COUNT.tmp`, unique among the saves of all
/// processes at once.
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let count = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = temporary_prefix(path)?;
    Ok(path.with_file_name(format!("{prefix}{}.{count}.tmp", std::process::id())))
}

/// Removes the temporary files that earlier saves of `path` left when their process died
/// (Linux: a process is alive when /proc/PID exists). Live writers' files, this process's
/// included, are left alone. Best effort.
fn remove_stale_temporaries(path: &Path) -> Result<()> {
    if !Path::new("/proc/self").exists() {
        return Ok(());
    }
    let prefix = temporary_prefix(path)?;
    let folder = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(folder) => folder.to_path_buf(),
        None => PathBuf::from("."),
    };
    let Ok(entries) = fs::read_dir(&folder) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The file a save of `path` replaces: `path`, or the file a symbolic link at `path` points
/// to. Refuses a target that exists and is not a regular file.
fn save_target(path: &Path) -> Result<(PathBuf, Option<fs::Permissions>)> {
    let target = match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(io_error("follow the link", path))?
        }
        _ => path.to_path_buf(),
    };
    match fs::metadata(&target) {
        Ok(meta) if meta.is_file() => Ok((target, Some(meta.permissions()))),
        Ok(_) => Err(invalid_path(
            "save to",
            &target,
            "it exists and is not a regular file",
        )),
        Err(_) => Ok((target, None)),
    }
}

/// Writes `bytes` to `path` atomically, through `write` (which tests replace by a writer that
/// fails after k bytes). The temporary files of dead writers are removed first.
pub fn write_atomically_with(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let (path, permissions) = save_target(path)?;
    let path = path.as_path();
    remove_stale_temporaries(path)?;
    let temporary = temporary_path(path)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .map_err(io_error("create", &temporary))?;
        write(&mut file, bytes).map_err(io_error("write", &temporary))?;
        if let Some(permissions) = permissions {
            file.set_permissions(permissions)
                .map_err(io_error("set the permissions of", &temporary))?;
        }
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

/// Checks, before a long run, that a save to `path` can succeed later: the folder exists and
/// takes a new file, and the target, if any, is a regular file.
pub fn check_writable(path: &Path) -> Result<()> {
    let (path, _) = save_target(path)?;
    let probe = temporary_path(&path)?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(io_error("create a file beside", &path))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

// ------------------------------------------------------------------------------- reading

/// The bytes of the regular file at `path`, refused when over `limit` before it is read. A
/// device or a FIFO is refused before it is opened (opening a FIFO would block).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).map_err(io_error("read the metadata of", path))?;
    if !meta.is_file() {
        return Err(invalid_path("read", path, "it is not a regular file"));
    }
    let file = File::open(path).map_err(io_error("open", path))?;
    let size = file
        .metadata()
        .map_err(io_error("read the metadata of", path))?;
    if !size.is_file() {
        return Err(invalid_path("read", path, "it is not a regular file"));
    }
    if size.len() > limit {
        return Err(CheckpointError::TooLarge {
            size: size.len(),
            limit,
        }
        .into());
    }
    let mut bytes = Vec::with_capacity(size.len() as usize);
    // take(): the file could grow between the size check and the read. One byte past the
    // limit shows a file that grew; saturating, so that any limit works.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    if bytes.len() as u64 > limit {
        return Err(CheckpointError::TooLarge {
            size: bytes.len() as u64,
            limit,
        }
        .into());
    }
    Ok(bytes)
}

/// Reads and validates a weights file, and rebuilds the network it holds. Nothing is read
/// when the file is over the size limit.
pub fn load(path: &Path, options: LoadOptions) -> Result<Checkpoint> {
    let bytes = read_limited(path, options.max_file_bytes)?;
    from_bytes(&bytes, options)
}

/// Loads the weights of a file into `model`, by name: strictly (exactly the model's names)
/// unless `options.strict` is off. Shapes must match either way. The model is unchanged
/// unless everything checks out.
pub fn load_into(model: &mut Model, path: &Path, options: LoadOptions) -> Result<Loaded> {
    load_into_graph(model.graph_mut(), path, options)
}

/// [`load_into`] for a graph of one's own that is not a [`Model`] (no loss, say): the
/// parameters and batch-norm statistics by name.
pub fn load_into_graph(
    graph: &mut Graph<f32>,
    path: &Path,
    options: LoadOptions,
) -> Result<Loaded> {
    let checkpoint = load(path, options)?;
    let state = checkpoint.model.graph().state()?;
    let report = load_state(graph, &state, options)?;
    Ok(Loaded {
        metadata: checkpoint.metadata,
        report,
    })
}

fn load_state(
    graph: &mut Graph<f32>,
    state: &State<f32>,
    options: LoadOptions,
) -> Result<LoadReport> {
    graph.load_state_with(state, options.strict, !options.allow_non_finite)
}

/// Loads a file's tensors into the network the file describes: strictly, whatever the options
/// say (a file holds its own network's state exactly).
fn load_own_state(
    model: &mut Model,
    tensors: Vec<(String, ArrayD<f32>)>,
    counters: Vec<(String, u64)>,
    options: LoadOptions,
) -> Result<()> {
    let state = State { tensors, counters };
    let strict = LoadOptions {
        strict: true,
        ..options
    };
    load_state(model.graph_mut(), &state, strict).map(|_| ())
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
fn decode_limited<P: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> std::result::Result<(P, usize), bincode::error::DecodeError> {
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

fn decode<P: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<P> {
    // The decoded sequences may take 4× the payload and 1 MiB more (a description of many
    // small nodes); the vectors holding them at most twice that, while they grow.
    let budget = payload.len().saturating_mul(4).saturating_add(1 << 20);
    let decoded = crate::bounded::with_budget(budget, || decode_limited(payload));
    let (decoded, used) = decoded.map_err(|e| CheckpointError::Decode {
        reason: e.to_string(),
    })?;
    if used != payload.len() {
        return Err(CheckpointError::TrailingBytes {
            count: (payload.len() - used) as u64,
        }
        .into());
    }
    Ok(decoded)
}

/// Validates the bytes of a weights file and rebuilds the network it holds.
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
    if !(1..=FORMAT_VERSION).contains(&version) {
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
    match version {
        1 => validate_v1(decode(payload)?, options),
        _ => validate(decode(payload)?, options),
    }
}

/// The tensors of the records, each checked on its own (dtype, element count, data length),
/// with their names; no name twice.
fn tensors_of(records: Vec<TensorRecord>) -> Result<Vec<(String, ArrayD<f32>)>> {
    let mut seen = std::collections::HashSet::new();
    let mut tensors = Vec::with_capacity(records.len());
    for record in records {
        let TensorRecord {
            name,
            dtype,
            shape,
            data,
        } = record;
        if !seen.insert(name.clone()) {
            return Err(CheckpointError::DuplicateTensor { name }.into());
        }
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
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        match ArrayD::from_shape_vec(IxDyn(&dims), data) {
            Ok(array) => tensors.push((name, array)),
            Err(_) => return Err(CheckpointError::ShapeOverflow { name, shape }.into()),
        }
    }
    Ok(tensors)
}

fn architecture_error(reason: impl std::fmt::Display) -> Error {
    CheckpointError::Architecture {
        reason: reason.to_string(),
    }
    .into()
}

/// Checks the stored tensors against the names and parameter shapes the description implies,
/// before anything is built: the rebuild then allocates no parameter larger than one stored.
fn check_against_description(
    description: &GraphDescription,
    tensors: &[(String, ArrayD<f32>)],
    counters: &[(String, u64)],
) -> Result<()> {
    use crate::describe::NodeDescription;
    let mut expected: Vec<(String, Option<&[usize]>)> = Vec::new();
    let mut expected_counters = Vec::new();
    for node in &description.nodes {
        match node {
            NodeDescription::Param { name, shape, .. } => {
                expected.push((name.clone(), Some(shape)))
            }
            NodeDescription::Op { kind, inputs, .. }
                if crate::ops::batch_norm::is_batch_norm(kind) =>
            {
                let weight = inputs.get(1).and_then(|&i| description.nodes.get(i));
                if let Some(NodeDescription::Param { name, .. }) = weight {
                    let prefix = crate::state::buffer_prefix(name);
                    expected.push((format!("{prefix}.running_mean"), None));
                    expected.push((format!("{prefix}.running_var"), None));
                    expected_counters.push(format!("{prefix}.num_batches_tracked"));
                }
            }
            _ => {}
        }
    }
    // Hash sets throughout: a file of many names is checked in linear time.
    use std::collections::{HashMap, HashSet};
    let stored: HashMap<&str, &ArrayD<f32>> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let stored_counters: HashSet<&str> = counters.iter().map(|(n, _)| n.as_str()).collect();
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let wanted_counters: HashSet<&str> = expected_counters.iter().map(String::as_str).collect();
    let missing: Vec<String> = expected
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !stored.contains_key(n.as_str()))
        .chain(
            expected_counters
                .iter()
                .filter(|n| !stored_counters.contains(n.as_str())),
        )
        .cloned()
        .collect();
    let unexpected: Vec<String> = tensors
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !wanted.contains(n.as_str()))
        .chain(
            counters
                .iter()
                .map(|(n, _)| n)
                .filter(|n| !wanted_counters.contains(n.as_str())),
        )
        .cloned()
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(CheckpointError::TensorNames {
            missing,
            unexpected,
        }
        .into());
    }
    for (name, shape) in &expected {
        if let (Some(shape), Some(value)) = (shape, stored.get(name.as_str())) {
            if value.shape() != *shape {
                return Err(CheckpointError::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.to_vec(),
                    found: value.shape().iter().map(|&d| d as u64).collect(),
                }
                .into());
            }
        }
    }
    Ok(())
}

fn validate(payload: Payload, options: LoadOptions) -> Result<Checkpoint> {
    let tensors = tensors_of(payload.tensors)?;
    check_against_description(&payload.graph, &tensors, &payload.counters)?;
    let graph = Graph::from_description(&payload.graph).map_err(architecture_error)?;
    let mut model = Model::from_roles(graph, payload.roles).map_err(architecture_error)?;
    load_own_state(&mut model, tensors, payload.counters, options)?;
    let training = payload
        .training
        .map(|record| training_state(record, &model))
        .transpose()?;
    Ok(Checkpoint {
        model,
        metadata: payload.metadata,
        training,
    })
}

/// The trainer's state of a record: one moment of each kind per parameter, by name, in the
/// parameters' order and shapes.
fn training_state(record: TrainingRecord, model: &Model) -> Result<TrainingState> {
    let graph = model.graph();
    let layout: Vec<(String, Vec<usize>)> = graph
        .params()
        .into_iter()
        .map(|id| {
            Ok((
                graph.name(id)?.to_string(),
                graph.value(id)?.shape().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let moments = |records: Vec<TensorRecord>| -> Result<Vec<ArrayD<f32>>> {
        let tensors = tensors_of(records)?;
        if tensors.is_empty() {
            return Ok(Vec::new()); // saved before the first step
        }
        let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        let expected: Vec<String> = layout.iter().map(|(n, _)| n.clone()).collect();
        if names != expected {
            return Err(CheckpointError::TensorNames {
                missing: expected
                    .into_iter()
                    .filter(|n| !names.contains(n))
                    .collect(),
                unexpected: names
                    .into_iter()
                    .filter(|n| !layout.iter().any(|(e, _)| e == n))
                    .collect(),
            }
            .into());
        }
        for ((name, value), (_, shape)) in tensors.iter().zip(&layout) {
            if value.shape() != shape.as_slice() {
                return Err(CheckpointError::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: value.shape().iter().map(|&d| d as u64).collect(),
                }
                .into());
            }
            if let Some((index, &v)) = value.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(CheckpointError::NonFinite {
                    name: name.clone(),
                    index,
                    value: v,
                }
                .into());
            }
        }
        Ok(tensors.into_iter().map(|(_, t)| t).collect())
    };
    let (first, second) = (moments(record.first)?, moments(record.second)?);
    if first.len() != second.len() {
        return Err(architecture_error(
            "the optimizer's first and second moments differ in count",
        ));
    }
    Ok(TrainingState {
        config: record.config,
        epoch: record.epoch,
        step: record.step,
        optimizer: OptimizerState {
            steps: record.optimizer_steps,
            first,
            second,
        },
    })
}

/// Format 1: the stored architecture is rebuilt as the bottleneck network, then the tensors
/// load into it by name, strictly.
fn validate_v1(payload: PayloadV1, options: LoadOptions) -> Result<Checkpoint> {
    let architecture = payload.architecture;
    architecture.validate().map_err(architecture_error)?;
    if payload.layers != architecture.layers() {
        return Err(architecture_error(
            "the stored layer list does not match the stored architecture",
        ));
    }
    let tensors = tensors_of(payload.tensors)?;
    // Building the network allocates its parameters: no more than the file holds.
    let stored: usize = tensors.iter().map(|(_, t)| t.len()).sum();
    let described = architecture
        .tensor_shapes()
        .iter()
        .try_fold(0usize, |total, (_, shape)| {
            let elements = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?;
            total.checked_add(elements)
        });
    if described.is_none_or(|d| d > stored) {
        return Err(architecture_error(format!(
            "the architecture's parameters hold more elements than the {stored} stored"
        )));
    }
    let mut model = Model::new(architecture, 0)?;
    load_own_state(&mut model, tensors, Vec::new(), options)?;
    Ok(Checkpoint {
        model,
        metadata: payload.metadata,
        training: None,
    })
}
