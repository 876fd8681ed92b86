//! Weight files as untrusted input: the fault table of shared RELIABILITY.md, one typed error per
//! case, never a panic; failed saves never destroy the previous file; round trips are exact.

use ndarray::{ArrayD, IxDyn};
use pointwise::checkpoint::{
    self, from_bytes, load, load_into, to_bytes, write_atomically_with, CheckpointError,
    LoadOptions, Metadata, FORMAT_VERSION, HEADER_LEN, MAGIC,
};
use pointwise::data::{generate, SyntheticConfig};
use pointwise::describe::GraphDescription;
use pointwise::export::{graph_from_safetensors, to_safetensors};
use pointwise::model::{Architecture, BottleneckSpec, Layer, Roles};
use pointwise::{Error, Model};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Serialize, Serializer};
use std::path::PathBuf;

fn folder(test: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("checkpoint")
        .join(test);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn model(seed: u64) -> Model {
    Model::new(Architecture::bottleneck(6, 3, 4), seed).unwrap()
}

fn valid_bytes() -> Vec<u8> {
    to_bytes(&model(1), &Metadata::new(1, 2)).unwrap()
}

fn checkpoint_error(result: pointwise::Result<checkpoint::Checkpoint>) -> CheckpointError {
    match result {
        Err(Error::Checkpoint(error)) => error,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

fn all_values(model: &Model) -> Vec<u32> {
    model
        .tensors()
        .iter()
        .flat_map(|(_, t)| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        .collect()
}

// ---- crafting payloads: a mirror of the private payload struct (serde encodes fields in order)

#[derive(Serialize)]
struct RawPayload<D: Serialize> {
    graph: GraphDescription,
    roles: Roles,
    metadata: Metadata,
    tensors: Vec<RawTensor<D>>,
    counters: Vec<(String, u64)>,
    training: Option<()>,
}

/// Format 1's payload: the bottleneck's architecture.
#[derive(Serialize)]
struct RawPayloadV1<D: Serialize> {
    architecture: Architecture,
    layers: Vec<Layer>,
    metadata: Metadata,
    tensors: Vec<RawTensor<D>>,
}

#[derive(Serialize)]
struct RawTensor<D: Serialize> {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    data: D,
}

/// A sequence that claims `0` elements in its length prefix and holds none.
struct ForgedLength(u64);
impl Serialize for ForgedLength {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        serializer.serialize_seq(Some(self.0 as usize))?.end()
    }
}

fn with_header(payload: &[u8]) -> Vec<u8> {
    with_version_header(FORMAT_VERSION, payload)
}

fn with_version_header(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn architecture() -> Architecture {
    Architecture::bottleneck(6, 3, 4)
}

/// The six tensors of `architecture()` with the right shapes, editable before encoding.
fn tensors() -> Vec<RawTensor<Vec<f32>>> {
    architecture()
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let count = shape.iter().product::<usize>();
            RawTensor {
                name,
                dtype: "f32".into(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                data: (0..count).map(|i| i as f32 * 0.1).collect(),
            }
        })
        .collect()
}

fn encode<D: Serialize>(tensors: Vec<RawTensor<D>>) -> Vec<u8> {
    encode_graph(model(0).graph().describe(), tensors)
}

fn encode_graph<D: Serialize>(graph: GraphDescription, tensors: Vec<RawTensor<D>>) -> Vec<u8> {
    let payload = RawPayload {
        graph,
        roles: model(0).roles(),
        metadata: Metadata::new(0, 0),
        tensors,
        counters: Vec::new(),
        training: None,
    };
    with_header(&bincode::serde::encode_to_vec(&payload, bincode::config::standard()).unwrap())
}

fn encode_v1<D: Serialize>(architecture: Architecture, tensors: Vec<RawTensor<D>>) -> Vec<u8> {
    let payload = RawPayloadV1 {
        layers: architecture.layers(),
        architecture,
        metadata: Metadata::new(0, 0),
        tensors,
    };
    let bytes = bincode::serde::encode_to_vec(&payload, bincode::config::standard()).unwrap();
    with_version_header(1, &bytes)
}

// ---- the fault table

#[test]
fn the_crafted_payload_mirror_is_accepted_when_honest() {
    // Guards the tests below: their payloads differ from a valid one only by the fault.
    from_bytes(&encode(tensors()), LoadOptions::default()).unwrap();
    from_bytes(
        &encode_v1(architecture(), tensors()),
        LoadOptions::default(),
    )
    .unwrap();
}

#[test]
fn empty_and_tiny_files_are_bad_magic_or_truncated() {
    assert!(matches!(
        checkpoint_error(from_bytes(&[], LoadOptions::default())),
        CheckpointError::BadMagic { hint: Some(_), .. }
    ));
    for len in 1..HEADER_LEN {
        let error = checkpoint_error(from_bytes(&valid_bytes()[..len], LoadOptions::default()));
        assert!(
            matches!(error, CheckpointError::Truncated { .. }),
            "{len}: {error}"
        );
    }
    let error = checkpoint_error(from_bytes(b"hello", LoadOptions::default()));
    assert!(matches!(error, CheckpointError::BadMagic { .. }), "{error}");
}

#[test]
fn truncation_at_every_byte_offset_is_an_error_and_leaves_the_model_unchanged() {
    let bytes = valid_bytes();
    for len in 0..bytes.len() {
        let error = checkpoint_error(from_bytes(&bytes[..len], LoadOptions::default()));
        assert!(
            matches!(
                error,
                CheckpointError::Truncated { .. } | CheckpointError::BadMagic { .. }
            ),
            "cut at {len}: {error}"
        );
    }
    // Through the file API too, into a live model, for a spread of offsets.
    let dir = folder("truncation");
    let mut live = model(9);
    let before = all_values(&live);
    for len in (0..bytes.len()).step_by(97) {
        let path = dir.join(format!("cut{len}.pw"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        assert!(load_into(&mut live, &path, LoadOptions::default()).is_err());
        assert_eq!(all_values(&live), before);
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let bytes = valid_bytes();
    for index in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[index] ^= 0xFF;
        let error = checkpoint_error(from_bytes(&damaged, LoadOptions::default()));
        let expected = match index {
            0..=7 => matches!(error, CheckpointError::BadMagic { .. }),
            8..=9 => matches!(error, CheckpointError::UnsupportedVersion { .. }),
            10..=17 => matches!(
                error,
                CheckpointError::LimitExceeded { .. }
                    | CheckpointError::Truncated { .. }
                    | CheckpointError::TrailingBytes { .. }
            ),
            _ => matches!(error, CheckpointError::Checksum { .. }),
        };
        assert!(expected, "byte {index}: {error}");
    }
}

#[test]
fn foreign_formats_are_bad_magic_with_a_hint() {
    let safetensors = to_safetensors(&model(1)).unwrap();
    let error = checkpoint_error(from_bytes(&safetensors, LoadOptions::default()));
    assert!(
        matches!(error, CheckpointError::BadMagic { hint: Some(h), .. } if h.contains("safetensors")),
        "{error}"
    );
    let error = checkpoint_error(from_bytes(
        b"PK\x03\x04 a torch zip",
        LoadOptions::default(),
    ));
    assert!(error.to_string().contains(".pt"), "{error}");
}

#[test]
fn a_newer_format_version_names_both_versions() {
    let mut bytes = valid_bytes();
    bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let error = checkpoint_error(from_bytes(&bytes, LoadOptions::default()));
    assert_eq!(
        error,
        CheckpointError::UnsupportedVersion {
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION
        }
    );
    let expected = format!(
        "unsupported format version {}, this build reads ≤ {FORMAT_VERSION}",
        FORMAT_VERSION + 1
    );
    assert!(error.to_string().contains(&expected), "{error}");
    bytes[8..10].copy_from_slice(&0u16.to_le_bytes());
    let error = checkpoint_error(from_bytes(&bytes, LoadOptions::default()));
    assert!(matches!(
        error,
        CheckpointError::UnsupportedVersion { found: 0, .. }
    ));
}

#[test]
fn a_huge_declared_payload_length_is_refused_before_reading() {
    let mut bytes = valid_bytes();
    bytes[10..18].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        checkpoint_error(from_bytes(&bytes, LoadOptions::default())),
        CheckpointError::LimitExceeded { .. }
    ));
    let mut bytes = valid_bytes();
    let longer = (bytes.len() - HEADER_LEN + 1) as u64;
    bytes[10..18].copy_from_slice(&longer.to_le_bytes());
    assert!(matches!(
        checkpoint_error(from_bytes(&bytes, LoadOptions::default())),
        CheckpointError::Truncated { .. }
    ));
}

#[test]
fn a_forged_tensor_length_prefix_is_a_decode_error() {
    for forged in [u64::MAX, 1 << 40, 1 << 20] {
        let crafted: Vec<RawTensor<ForgedLength>> = tensors()
            .into_iter()
            .map(|t| RawTensor {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                data: ForgedLength(forged),
            })
            .collect();
        let error = checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default()));
        assert!(
            matches!(error, CheckpointError::Decode { .. }),
            "{forged}: {error}"
        );
    }
}

#[test]
fn dimensions_whose_product_overflows_are_shape_overflow() {
    let mut crafted = tensors();
    crafted[0].shape = vec![2, 1 << 63];
    let error = checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default()));
    assert!(
        matches!(error, CheckpointError::ShapeOverflow { .. }),
        "{error}"
    );
}

#[test]
fn a_shape_larger_than_its_data_is_a_data_length_error() {
    let mut crafted = tensors();
    crafted[0].shape = vec![3, 7];
    let error = checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default()));
    assert!(
        matches!(
            error,
            CheckpointError::DataLength {
                expected: 21,
                found: 18,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_valid_shape_that_differs_from_the_architecture_is_a_shape_mismatch() {
    let mut crafted = tensors();
    crafted[0].shape = vec![6, 3]; // reduce.weight stored transposed: (F, F1) instead of (F1, F)
    let error = checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default()));
    assert!(
        matches!(&error, CheckpointError::ShapeMismatch { name, .. } if name == "reduce.weight"),
        "{error}"
    );
}

#[test]
fn missing_and_extra_tensors_are_all_listed() {
    let mut crafted = tensors();
    crafted.remove(3);
    crafted.remove(0);
    crafted.push(RawTensor {
        name: "extra.weight".into(),
        dtype: "f32".into(),
        shape: vec![1],
        data: vec![0.0],
    });
    let error = checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default()));
    assert_eq!(
        error,
        CheckpointError::TensorNames {
            missing: vec!["reduce.weight".into(), "expand.bias".into()],
            unexpected: vec!["extra.weight".into()],
        }
    );
}

#[test]
fn duplicate_tensor_names_are_refused() {
    let mut crafted = tensors();
    let copy = RawTensor {
        name: crafted[1].name.clone(),
        dtype: "f32".into(),
        shape: crafted[1].shape.clone(),
        data: crafted[1].data.clone(),
    };
    crafted.push(copy);
    let error = checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default()));
    assert!(
        matches!(error, CheckpointError::DuplicateTensor { .. }),
        "{error}"
    );
}

#[test]
fn another_dtype_is_refused() {
    let mut crafted = tensors();
    crafted[2].dtype = "f64".into();
    assert!(matches!(
        checkpoint_error(from_bytes(&encode(crafted), LoadOptions::default())),
        CheckpointError::DType { .. }
    ));
}

#[test]
fn trailing_bytes_are_refused_outside_and_inside_the_payload() {
    let mut bytes = valid_bytes();
    bytes.extend_from_slice(b"junk");
    assert_eq!(
        checkpoint_error(from_bytes(&bytes, LoadOptions::default())),
        CheckpointError::TrailingBytes { count: 4 }
    );
    // Inside: a payload with extra bytes that the header length and the checksum both cover.
    let valid = valid_bytes();
    let mut payload = valid[HEADER_LEN..].to_vec();
    payload.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        checkpoint_error(from_bytes(&with_header(&payload), LoadOptions::default())),
        CheckpointError::TrailingBytes { count: 3 }
    );
}

#[test]
fn nan_and_infinite_weights_are_refused_unless_allowed() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut crafted = tensors();
        crafted[4].data[5] = bad;
        let bytes = encode(crafted);
        let error = checkpoint_error(from_bytes(&bytes, LoadOptions::default()));
        assert!(
            matches!(&error, CheckpointError::NonFinite { name, index: 5, .. } if name == "head.weight"),
            "{error}"
        );
        let allowed = LoadOptions {
            allow_non_finite: true,
            ..LoadOptions::default()
        };
        assert!(from_bytes(&bytes, allowed).is_ok());
    }
    // And a model holding NaN refuses to be saved at all.
    let mut diverged = model(1);
    let id = diverged.graph().find("head.bias").unwrap();
    diverged.graph_mut().leaf_value_mut(id).unwrap()[[0]] = f32::NAN;
    assert!(matches!(
        to_bytes(&diverged, &Metadata::new(0, 0)),
        Err(Error::Checkpoint(CheckpointError::NonFinite { .. }))
    ));
}

#[test]
fn an_invalid_or_inconsistent_architecture_is_refused() {
    // Format 1: a layer list that contradicts the architecture.
    let payload = RawPayloadV1 {
        layers: Architecture::baseline(6, 4).layers(),
        architecture: architecture(),
        metadata: Metadata::new(0, 0),
        tensors: tensors(),
    };
    let bytes = bincode::serde::encode_to_vec(&payload, bincode::config::standard()).unwrap();
    assert!(matches!(
        checkpoint_error(from_bytes(
            &with_version_header(1, &bytes),
            LoadOptions::default()
        )),
        CheckpointError::Architecture { .. }
    ));
    // Format 1: an architecture whose parameters are larger than the file (3 × 16 GiB).
    let huge = Architecture::bottleneck(65536, 65536, 65536);
    let error = checkpoint_error(from_bytes(
        &encode_v1(huge, tensors()),
        LoadOptions::default(),
    ));
    assert!(
        matches!(error, CheckpointError::Architecture { .. }),
        "{error}"
    );
    // Format 2: an op that reads a later node, and one with a window larger than its input.
    let mut graph = model(0).graph().describe();
    let last = graph.nodes.len() - 1;
    match &mut graph.nodes[last - 1] {
        pointwise::describe::NodeDescription::Op { inputs, .. } => inputs[0] = last,
        other => panic!("the head is not an op: {other:?}"),
    }
    let error = checkpoint_error(from_bytes(
        &encode_graph(graph, tensors()),
        LoadOptions::default(),
    ));
    assert!(
        matches!(error, CheckpointError::Architecture { .. }),
        "{error}"
    );
    // Format 2: a described parameter far larger than the one stored.
    let mut graph = model(0).graph().describe();
    for node in &mut graph.nodes {
        if let pointwise::describe::NodeDescription::Param { name, shape, .. } = node {
            if name == "head.weight" {
                *shape = vec![1 << 20, 1 << 20];
            }
        }
    }
    let error = checkpoint_error(from_bytes(
        &encode_graph(graph, tensors()),
        LoadOptions::default(),
    ));
    assert!(
        matches!(&error, CheckpointError::ShapeMismatch { name, .. } if name == "head.weight"),
        "{error}"
    );
    // A file of another architecture does not go into this model: same names, other shapes.
    let dir = folder("architecture");
    let path = dir.join("other.pw");
    let other = Model::new(Architecture::bottleneck(6, 2, 4), 0).unwrap();
    checkpoint::save(&other, &Metadata::new(0, 0), &path).unwrap();
    let mut live = model(3);
    let before = all_values(&live);
    let result = load_into(&mut live, &path, LoadOptions::default());
    assert!(
        matches!(
            result,
            Err(Error::Checkpoint(CheckpointError::ShapeMismatch { .. }))
        ),
        "{result:?}"
    );
    assert_eq!(all_values(&live), before);
}

#[test]
fn a_file_over_the_size_limit_is_refused_before_it_is_read() {
    let dir = folder("size");
    let path = dir.join("w.pw");
    checkpoint::save(&model(1), &Metadata::new(0, 0), &path).unwrap();
    let small = LoadOptions {
        max_file_bytes: 100,
        ..LoadOptions::default()
    };
    assert!(matches!(
        load(&path, small),
        Err(Error::Checkpoint(CheckpointError::TooLarge { .. }))
    ));
    assert!(matches!(
        load(&dir.join("absent.pw"), LoadOptions::default()),
        Err(Error::Io { .. })
    ));
}

// ---- saving

#[test]
fn an_interrupted_save_leaves_the_previous_file_loading_bit_identically() {
    let dir = folder("interrupted");
    let path = dir.join("w.pw");
    let original = model(1);
    checkpoint::save(&original, &Metadata::new(1, 1), &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let replacement = to_bytes(&model(2), &Metadata::new(2, 2)).unwrap();
    for k in (0..replacement.len())
        .step_by(37)
        .chain([replacement.len() - 1])
    {
        // A writer that dies after k bytes, like a crash or a full disk.
        let result = write_atomically_with(&path, &replacement, |file, bytes| {
            use std::io::Write;
            file.write_all(&bytes[..k])?;
            Err(std::io::Error::other(format!(
                "injected failure after {k} bytes"
            )))
        });
        assert!(
            matches!(
                result,
                Err(Error::Io {
                    action: "write",
                    ..
                })
            ),
            "{k}: {result:?}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            good,
            "after a failure at byte {k}"
        );
        let reloaded = load(&path, LoadOptions::default()).unwrap().into_model();
        assert_eq!(all_values(&reloaded), all_values(&original));
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(
            leftovers, 1,
            "a temporary file was left after a failure at {k}"
        );
    }
}

#[test]
fn a_stale_temporary_file_of_a_dead_writer_is_cleaned_up_by_the_next_save() {
    let dir = folder("stale");
    let path = dir.join("w.pw");
    // A process id that no process has (beyond Linux's largest pid, 2²²), and one that is
    // alive (this process): only the dead writer's file goes.
    let dead = dir.join(".w.pw.4194304999.0.tmp");
    std::fs::write(&dead, b"left by a crash").unwrap();
    let live = dir.join(format!(".w.pw.{}.999999.tmp", std::process::id()));
    std::fs::write(&live, b"a save in progress").unwrap();
    checkpoint::save(&model(1), &Metadata::new(0, 0), &path).unwrap();
    if std::path::Path::new("/proc/self").exists() {
        assert!(!dead.exists());
    }
    assert!(live.exists());
    load(&path, LoadOptions::default()).unwrap();
    // Temporary names are unique, and fit in a 255-byte file name whatever the target's.
    let (a, b) = (
        checkpoint::temporary_path(&path).unwrap(),
        checkpoint::temporary_path(&path).unwrap(),
    );
    assert_ne!(a, b);
    let long = dir.join("n".repeat(255));
    checkpoint::save(&model(1), &Metadata::new(0, 0), &long).unwrap();
    load(&long, LoadOptions::default()).unwrap();
}

#[test]
fn saving_over_a_directory_is_an_io_error() {
    let dir = folder("directory");
    let target = dir.join("taken");
    std::fs::create_dir(&target).unwrap();
    assert!(matches!(
        checkpoint::save(&model(1), &Metadata::new(0, 0), &target),
        Err(Error::Io { .. })
    ));
    assert!(target.is_dir());
}

// ---- round trips and compatibility

fn random_architecture(rng: &mut StdRng) -> Architecture {
    let channels = rng.random_range(1..24);
    let classes = rng.random_range(1..9);
    let bottleneck = rng.random_bool(0.7).then(|| BottleneckSpec {
        reduced: rng.random_range(1..12),
        residual: rng.random_bool(0.5),
        pool_window: rng.random_range(1..3),
        pool_stride: rng.random_range(1..3),
    });
    Architecture {
        channels,
        classes,
        bottleneck,
    }
}

#[test]
fn round_trips_over_random_architectures_are_bit_identical() {
    let mut rng = StdRng::seed_from_u64(2024);
    let dir = folder("round_trip");
    for case in 0..40 {
        let architecture = random_architecture(&mut rng);
        let mut original = Model::new(architecture.clone(), case).unwrap();
        // Random values over many magnitudes, including subnormals and signed zeros.
        let tensors: Vec<(String, ArrayD<f32>)> = original
            .tensors()
            .iter()
            .map(|(name, t)| {
                let values = (0..t.len())
                    .map(|_| match rng.random_range(0..4) {
                        0 => rng.random_range(-1.0..1.0),
                        1 => rng.random_range(-1e30f32..1e30),
                        2 => f32::from_bits(rng.random_range(1..0x0080_0000)), // subnormal
                        _ => -0.0,
                    })
                    .collect();
                (
                    name.clone(),
                    ArrayD::from_shape_vec(IxDyn(t.shape()), values).unwrap(),
                )
            })
            .collect();
        let state = pointwise::State {
            tensors: tensors.clone(),
            counters: Vec::new(),
        };
        original.graph_mut().load_state(&state, true).unwrap();
        let path = dir.join(format!("case{case}.pw"));
        checkpoint::save(&original, &Metadata::new(case, 1), &path).unwrap();
        let loaded = load(&path, LoadOptions::default()).unwrap();
        assert_eq!(loaded.model.graph().describe(), original.graph().describe());
        assert_eq!(loaded.metadata.seed, case);
        let mut reloaded = loaded.into_model();
        assert_eq!(all_values(&reloaded), all_values(&original), "case {case}");
        let mut via_safetensors = Model::new(architecture.clone(), 0).unwrap();
        let bytes = to_safetensors(&original).unwrap();
        graph_from_safetensors(via_safetensors.graph_mut(), &bytes).unwrap();
        assert_eq!(
            all_values(&via_safetensors),
            all_values(&original),
            "case {case}: safetensors"
        );

        // Identical forward outputs on a random batch (finite weights only: reset the huge ones).
        let small = Model::new(architecture.clone(), case + 100).unwrap();
        let mut twin = Model::new(architecture.clone(), 0).unwrap();
        let bytes = to_safetensors(&small).unwrap();
        graph_from_safetensors(twin.graph_mut(), &bytes).unwrap();
        let small_state = small.graph().state().unwrap();
        reloaded.graph_mut().load_state(&small_state, true).unwrap();
        let height = 2 + case as usize % 3;
        let images = ndarray::Array4::from_shape_fn(
            (2, architecture.channels, height, 3),
            |(n, c, h, w)| ((n * 31 + c * 7 + h * 3 + w) % 11) as f32 - 5.0,
        );
        let mut small = small;
        let expected = small.logits(images.view()).unwrap();
        assert_eq!(twin.logits(images.view()).unwrap(), expected);
        assert_eq!(reloaded.logits(images.view()).unwrap(), expected);
        let path = dir.join(format!("small{case}.pw"));
        checkpoint::save(&small, &Metadata::new(0, 0), &path).unwrap();
        let mut from_file = load(&path, LoadOptions::default()).unwrap().into_model();
        assert_eq!(from_file.logits(images.view()).unwrap(), expected);
    }
}

#[test]
fn safetensors_uses_pytorch_layout_and_is_validated_on_import() {
    let original = model(4);
    let bytes = to_safetensors(&original).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.tensor("reduce.weight").unwrap().shape(), &[3, 6, 1, 1]);
    assert_eq!(file.tensor("expand.weight").unwrap().shape(), &[6, 3, 1, 1]);
    assert_eq!(file.tensor("head.weight").unwrap().shape(), &[4, 6]);
    assert_eq!(file.tensor("head.bias").unwrap().shape(), &[4]);
    // Imported into another architecture: refused with the expected shape named.
    let mut other = Model::new(Architecture::bottleneck(6, 2, 4), 0).unwrap();
    let error = graph_from_safetensors(other.graph_mut(), &bytes).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Checkpoint(CheckpointError::ShapeMismatch { .. })
        ),
        "{error}"
    );
    let mut baseline = Model::new(Architecture::baseline(6, 4), 0).unwrap();
    let error = graph_from_safetensors(baseline.graph_mut(), &bytes).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Checkpoint(CheckpointError::TensorNames { .. })
        ),
        "{error}"
    );
    assert!(graph_from_safetensors(baseline.graph_mut(), b"garbage").is_err());
}

/// The compatibility promise: a file written by format version 1 loads forever, with the
/// predictions it gave when it was written (data/README.md says how it was made).
#[test]
fn the_format_v1_fixture_still_loads_and_predicts_as_recorded() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    let checkpoint = load(&fixture.join("bottleneck_v1.pw"), LoadOptions::default()).unwrap();
    let expected = Model::new(Architecture::bottleneck(32, 8, 4), 0).unwrap();
    assert_eq!(
        checkpoint.model.graph().describe(),
        expected.graph().describe()
    );
    assert_eq!(
        (checkpoint.metadata.seed, checkpoint.metadata.epochs),
        (7, 3)
    );
    let mut model = checkpoint.into_model();
    let data = generate(&SyntheticConfig::default(), 7).unwrap();
    let logits = model
        .logits(data.test.images().slice(ndarray::s![0..8, .., .., ..]))
        .unwrap();
    let recorded = std::fs::read_to_string(fixture.join("bottleneck_v1.logits.txt")).unwrap();
    let rows: Vec<Vec<f32>> = recorded
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 8);
    for (row, expected) in logits.outer_iter().zip(&rows) {
        for (&got, &want) in row.iter().zip(expected) {
            // Not bit-exact: another CPU may run another GEMM kernel (FMA or not).
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{got} vs recorded {want}"
            );
        }
    }
}

#[test]
fn inspect_reports_every_corrupted_file_as_one_line() {
    // What `examples/inspect_weights` prints for a bad file: the error's Display, one line.
    let bytes = valid_bytes();
    for index in (0..bytes.len()).step_by(13) {
        let mut damaged = bytes.clone();
        damaged[index] ^= 0x55;
        let message = from_bytes(&damaged, LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            !message.is_empty() && !message.contains('\n'),
            "{message:?}"
        );
    }
}

/// The example binary as a user runs it: `cargo test` builds the examples beside the test
/// binaries; a test run on its own (`cargo test --test checkpoint`) builds it here.
fn example_binary(name: &str) -> PathBuf {
    let profile_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = profile_dir.join("examples").join(name);
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "could not build the {name} example");
    }
    path
}

#[test]
fn inspect_weights_exits_1_with_a_one_line_reason_on_every_bad_file() {
    let inspect = example_binary("inspect_weights");
    let dir = folder("inspect");
    let good = valid_bytes();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("safetensors".into(), to_safetensors(&model(1)).unwrap()),
    ];
    for len in (0..good.len()).step_by(211) {
        cases.push((format!("cut{len}"), good[..len].to_vec()));
    }
    for index in (0..good.len()).step_by(97) {
        let mut damaged = good.clone();
        damaged[index] ^= 0x40;
        cases.push((format!("flip{index}"), damaged));
    }
    for (name, bytes) in &cases {
        let path = dir.join(format!("{name}.pw"));
        std::fs::write(&path, bytes).unwrap();
        let output = std::process::Command::new(&inspect)
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    let path = dir.join("good.pw");
    std::fs::write(&path, &good).unwrap();
    let output = std::process::Command::new(&inspect)
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("reduce.weight") && stdout.contains("[3, 6]") && stdout.contains("seed 1"),
        "{stdout}"
    );
    let usage = std::process::Command::new(&inspect).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

/// A seeded stand-in for a fuzzer: thousands of random edits of a valid file (flips, inserts,
/// deletes, splices of random bytes, with the checksum sometimes recomputed so that the decoder
/// itself is exercised) and random byte strings. Every one ends in Ok or a typed error; an Ok
/// file always passes validation (finite tensors of the architecture's shapes).
#[test]
fn random_edits_and_random_bytes_never_panic() {
    let valid = valid_bytes();
    let mut rng = StdRng::seed_from_u64(99);
    let mut decoded = 0;
    for round in 0..4000 {
        let mut bytes = if round % 10 == 0 {
            (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect()
        } else {
            valid.clone()
        };
        for _ in 0..rng.random_range(1..4) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..4) {
                0 => bytes[at] ^= 1 << rng.random_range(0..8),
                1 => bytes.insert(at, rng.random()),
                2 => {
                    bytes.remove(at);
                }
                _ => {
                    let end = (at + rng.random_range(1..16)).min(bytes.len());
                    bytes[at..end].iter_mut().for_each(|b| *b = rng.random());
                }
            }
        }
        if bytes.len() > HEADER_LEN && rng.random_bool(0.5) {
            // Make header and checksum agree with the edited payload: the decoder must cope.
            let payload = bytes[HEADER_LEN..].to_vec();
            bytes = with_header(&payload);
        }
        if let Ok(checkpoint) = from_bytes(&bytes, LoadOptions::default()) {
            decoded += 1;
            let expected = architecture().tensor_shapes();
            let tensors = checkpoint.model.tensors();
            assert_eq!(tensors.len(), expected.len());
            for ((name, tensor), (expected_name, shape)) in tensors.iter().zip(&expected) {
                assert_eq!((name, tensor.shape()), (expected_name, shape.as_slice()));
                assert!(tensor.iter().all(|v| v.is_finite()));
            }
        }
    }
    // Most edits are caught; the few that decode are valid files (checked above).
    assert!(decoded < 400, "{decoded} of 4000 edited files decoded");
}

/// Any size limit works, u64::MAX included (it once overflowed: a panic in debug builds and
/// "an empty file" for every valid file in release).
#[test]
fn the_largest_size_limit_loads_a_valid_file() {
    let dir = folder("limit");
    let path = dir.join("w.pw");
    checkpoint::save(&model(1), &Metadata::new(0, 0), &path).unwrap();
    let unlimited = LoadOptions {
        max_file_bytes: u64::MAX,
        ..LoadOptions::default()
    };
    load(&path, unlimited).unwrap();
}

/// Names from a file reach messages escaped and capped: a newline or an ANSI escape cannot
/// forge output, a huge name or a list of 10,000 cannot flood it.
#[test]
fn hostile_tensor_names_are_escaped_and_capped_in_messages() {
    let hostile = format!("evil\n\u{1b}[31mred{}", "x".repeat(10_000));
    let mut crafted = tensors();
    crafted[0].name = hostile.clone();
    let mut duplicate = tensors();
    duplicate[1].name = hostile.clone();
    duplicate[0].name = hostile;
    let mut many = tensors();
    for i in 0..10_000 {
        many.push(RawTensor {
            name: format!("extra{i}\u{7}"),
            dtype: "f32".into(),
            shape: vec![1],
            data: vec![0.0],
        });
    }
    for (case, bytes) in [
        ("renamed", encode(crafted)),
        ("twice", encode(duplicate)),
        ("many", encode(many)),
    ] {
        let message = checkpoint_error(from_bytes(&bytes, LoadOptions::default())).to_string();
        assert!(
            !message.contains('\n') && !message.contains('\u{1b}') && !message.contains('\u{7}'),
            "{case}: {message:?}"
        );
        assert!(
            message.len() < 2_000,
            "{case}: a message of {} bytes",
            message.len()
        );
    }
}

// ---- concurrent saves and special files

const SAVE_TO: &str = "POINTWISE_SAVE_TO";

/// A second process saving to the same path, for the test below: this test binary run again on
/// this test alone, with the path in `POINTWISE_SAVE_TO`. Does nothing in a normal run.
#[test]
fn concurrent_saver_child() {
    let Some(path) = std::env::var_os(SAVE_TO) else {
        return;
    };
    let seed: u64 = std::env::var("POINTWISE_SAVE_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let path = PathBuf::from(path);
    for _ in 0..100 {
        checkpoint::save(&model(seed), &Metadata::new(seed, 0), &path).unwrap();
    }
}

/// 8 threads and 2 processes save different models to one path, 100 rounds: every save
/// succeeds, and after every round the file loads whole and is one of the models.
#[test]
fn overlapping_saves_never_leave_a_torn_or_missing_file() {
    let dir = folder("concurrent");
    let path = dir.join("shared.pw");
    let models: Vec<Vec<u32>> = (0..10).map(|seed| all_values(&model(seed))).collect();
    let children: Vec<std::process::Child> = [8u64, 9]
        .iter()
        .map(|seed| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["concurrent_saver_child", "--exact", "--test-threads=1"])
                .env(SAVE_TO, &path)
                .env("POINTWISE_SAVE_SEED", seed.to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let barrier = std::sync::Barrier::new(9);
    std::thread::scope(|scope| {
        for seed in 0..8u64 {
            let (barrier, path) = (&barrier, &path);
            scope.spawn(move || {
                let mine = model(seed);
                for _ in 0..100 {
                    checkpoint::save(&mine, &Metadata::new(seed, 0), path).unwrap();
                    barrier.wait();
                    barrier.wait();
                }
            });
        }
        for round in 0..100 {
            barrier.wait();
            let loaded = load(&path, LoadOptions::default()).unwrap().into_model();
            assert!(
                models.contains(&all_values(&loaded)),
                "round {round}: the file is none of the models"
            );
            barrier.wait();
        }
    });
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a saving process failed");
    }
    let loaded = load(&path, LoadOptions::default()).unwrap().into_model();
    assert!(models.contains(&all_values(&loaded)));
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn special_files_are_refused_and_links_and_permissions_are_kept() {
    let dir = folder("special");
    // Loaders read regular files only: a device gives an error at once, a FIFO does not hang.
    for path in ["/dev/zero", "/dev/null"] {
        let error = load(std::path::Path::new(path), LoadOptions::default()).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        let mut live = model(1);
        let error = pointwise::export::load_safetensors_into(
            &mut live,
            std::path::Path::new(path),
            1 << 20,
        )
        .unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }
    let fifo = dir.join("fifo");
    if std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(load(&fifo, LoadOptions::default()).is_err());
        // Saving over it is refused too, and it stays a FIFO.
        assert!(checkpoint::save(&model(1), &Metadata::new(0, 0), &fifo).is_err());
        assert!(!std::fs::metadata(&fifo).unwrap().is_file());
    }
    // Saving to a device is refused, and the device stays one.
    assert!(checkpoint::save(
        &model(1),
        &Metadata::new(0, 0),
        std::path::Path::new("/dev/null")
    )
    .is_err());
    assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // A symbolic link is followed: the link stays, its target holds the new weights.
        let target = dir.join("target.pw");
        let link = dir.join("link.pw");
        checkpoint::save(&model(1), &Metadata::new(0, 0), &target).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        checkpoint::save(&model(2), &Metadata::new(0, 0), &link).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let through_target = load(&target, LoadOptions::default()).unwrap().into_model();
        assert_eq!(all_values(&through_target), all_values(&model(2)));
        // The replaced file keeps its permissions.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        checkpoint::save(&model(3), &Metadata::new(0, 0), &target).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
}

/// A bad output folder fails before training, naming the path, with exit code 1.
#[test]
fn train_bottleneck_checks_its_output_folder_before_training() {
    let binary = example_binary("train_bottleneck");
    let started = std::time::Instant::now();
    let output = std::process::Command::new(binary)
        .args(["--out", "/proc/no/such/folder"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/proc/no/such/folder"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("epoch"));
    assert!(started.elapsed().as_secs() < 30);
}

/// Non-UTF-8 arguments are usage errors (exit 2) or paths (a missing one: exit 1 with the
/// reason), never a panic (exit 101).
#[cfg(unix)]
#[test]
fn non_utf8_arguments_are_usage_errors_or_paths_not_panics() {
    use std::os::unix::ffi::OsStrExt;
    let bytes = std::ffi::OsStr::from_bytes(b"\xff\xfe");
    let output = std::process::Command::new(example_binary("train_bottleneck"))
        .arg("--epochs")
        .arg(bytes)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = std::process::Command::new(example_binary("inspect_weights"))
        .arg(bytes)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
}

/// Tens of thousands of distinct tensor names are checked in linear time (a quadratic check
/// once took 9.7 s on 128 Ki names), and listed in one capped message.
#[test]
fn many_distinct_tensor_names_are_refused_quickly() {
    let mut crafted = tensors();
    for i in 0..50_000 {
        crafted.push(RawTensor {
            name: format!("extra{i}"),
            dtype: "f32".into(),
            shape: vec![1],
            data: vec![0.0],
        });
    }
    let bytes = encode(crafted);
    let started = std::time::Instant::now();
    let error = checkpoint_error(from_bytes(&bytes, LoadOptions::default()));
    assert!(
        started.elapsed().as_secs_f64() < 5.0,
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(error, CheckpointError::TensorNames { .. }),
        "{error}"
    );
    assert!(error.to_string().len() < 2000);
}

/// Node names come from files too: in every message they are escaped and cut, so a newline
/// or an ANSI escape cannot forge a line and a 10,000-character name cannot flood the output.
#[test]
fn hostile_node_names_are_escaped_and_capped_in_messages() {
    let hostile = format!("evil\n\u{1b}[31mred{}", "x".repeat(10_000));
    let mut graph = pointwise::Graph::<f32>::new();
    let x = graph.input(&hostile);
    let pooled = graph.global_avg_pool(x).unwrap();
    let weight_name = format!("{hostile}.weight");
    let weight = graph
        .param(&weight_name, ndarray::ArrayD::zeros(vec![2, 3]))
        .unwrap();
    let logits = graph.linear(pooled, weight, None).unwrap();
    let model = Model::classifier(graph, x, logits).unwrap();
    let bytes = to_bytes(&model, &Metadata::new(0, 0)).unwrap();
    let mut rebuilt = from_bytes(&bytes, LoadOptions::default()).unwrap();
    let description = rebuilt.describe();
    assert!(!description.contains('\u{1b}') && description.lines().all(|l| l.len() < 400));
    let loss = rebuilt.model.roles().loss;
    let messages = [
        rebuilt
            .model
            .graph_mut()
            .forward(loss)
            .unwrap_err()
            .to_string(),
        rebuilt
            .model
            .graph_mut()
            .param(&hostile, ndarray::ArrayD::zeros(vec![1]))
            .unwrap_err()
            .to_string(),
    ];
    for message in messages {
        assert!(
            !message.contains('\n') && !message.contains('\u{1b}'),
            "{message:?}"
        );
        assert!(message.len() < 400, "{} characters", message.len());
    }
}
