//! A forged length prefix must be refused before any large allocation. A counting global
//! allocator records the largest single request made while a hostile file is decoded.

use pointwise::checkpoint::{from_bytes, to_bytes, LoadOptions, Metadata, HEADER_LEN};
use pointwise::{Architecture, Model};
use std::sync::atomic::Ordering;

mod common;

use common::LARGEST;

#[global_allocator]
static ALLOCATOR: common::Counting = common::Counting;

/// The tests of this file measure one global counter: they take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn forged_length_prefixes_allocate_no_more_than_a_small_multiple_of_the_file() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = Model::new(Architecture::bottleneck(6, 3, 4), 1).unwrap();
    let valid = to_bytes(&model, &Metadata::new(0, 0)).unwrap();
    // Every varint length position in the payload forged to u64::MAX in turn: bincode's
    // varint marker 253 followed by 8 bytes. The checksum is recomputed so that decoding runs.
    let payload = &valid[HEADER_LEN..];
    let mut decoded_any = 0;
    for position in 0..payload.len() {
        let mut forged = payload[..position].to_vec();
        forged.push(253);
        forged.extend_from_slice(&u64::MAX.to_le_bytes());
        forged.extend_from_slice(&payload[position + 1..]);
        let mut bytes = valid[..10].to_vec();
        bytes.extend_from_slice(&(forged.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&forged).to_le_bytes());
        bytes.extend_from_slice(&forged);
        LARGEST.store(0, Ordering::Relaxed);
        let result = from_bytes(&bytes, LoadOptions::default());
        let largest = LARGEST.load(Ordering::Relaxed);
        // serde preallocates a sequence from its declared length, capped at 1 MiB (its
        // `size_hint::cautious`); beyond that only what the decode budget allows.
        let bound = (16 * bytes.len()).max(1 << 20);
        assert!(
            largest <= bound,
            "byte {position}: one allocation of {largest} bytes for a {}-byte file",
            bytes.len()
        );
        decoded_any += usize::from(result.is_ok());
    }
    // Only forgeries that land on a field no length is read from can decode; most must fail.
    assert!(
        decoded_any < payload.len() / 10,
        "{decoded_any} forged files decoded"
    );
}

#[derive(serde::Serialize)]
struct EmptyRecord {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    data: Vec<f32>,
}

#[derive(serde::Serialize)]
struct RawPayload {
    graph: pointwise::describe::GraphDescription,
    roles: pointwise::Roles,
    metadata: Metadata,
    tensors: Vec<EmptyRecord>,
    counters: Vec<(String, u64)>,
    training: Option<()>,
}

/// A file of many empty tensor records (4 bytes each in the file, about 100 in memory once
/// decoded) must not allocate more than a small multiple of its size: the decoder's budget
/// counts the decoded size, so it refuses the file before the amplification.
#[test]
fn empty_tensor_records_do_not_amplify_memory() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = Model::new(Architecture::bottleneck(6, 3, 4), 1).unwrap();
    for count in [1_000, 100_000, 1_000_000] {
        let payload = RawPayload {
            graph: model.graph().describe(),
            roles: model.roles(),
            metadata: Metadata::new(0, 0),
            tensors: (0..count)
                .map(|_| EmptyRecord {
                    name: String::new(),
                    dtype: String::new(),
                    shape: Vec::new(),
                    data: Vec::new(),
                })
                .collect(),
            counters: Vec::new(),
            training: None,
        };
        let body = bincode::serde::encode_to_vec(&payload, bincode::config::standard()).unwrap();
        let valid = to_bytes(&model, &Metadata::new(0, 0)).unwrap();
        let mut bytes = valid[..10].to_vec();
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        drop(payload);
        LARGEST.store(0, Ordering::Relaxed);
        let result = from_bytes(&bytes, LoadOptions::default());
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(result.is_err(), "{count} empty records loaded");
        let bound = (16 * bytes.len()).max(1 << 20);
        assert!(
            largest <= bound,
            "{count} records: one allocation of {largest} bytes for a {}-byte file",
            bytes.len()
        );
    }
}
