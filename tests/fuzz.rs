//! A seeded fuzzer over both weight formats: valid `.pw` and `.safetensors` files of a network
//! with batch norm, mutated (bit flips, inserted and deleted bytes, spliced runs, forged
//! lengths, copied runs, truncation; a `.pw` header and checksum often recomputed so that the
//! decoder itself is reached). Every case must end in `Ok` or a typed error with a one-line
//! message, and no single allocation may exceed 16× the file (or 1 MiB): no panic, no hang, no
//! unbounded allocation.
//!
//! 20,000 cases per format by default; `POINTWISE_FUZZ_CASES=1000000 cargo test --release
//! --test fuzz` for a long run.

use pointwise::checkpoint::{from_bytes, to_bytes, LoadOptions, Metadata, HEADER_LEN};
use pointwise::export::{graph_from_safetensors, graph_to_safetensors};
use pointwise::layers::Layers;
use pointwise::{Graph, Model};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::atomic::Ordering;

mod common;

use common::LARGEST;

#[global_allocator]
static ALLOCATOR: common::Counting = common::Counting;

fn network() -> Model {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, 1);
    let x = nn.input("x");
    let h = nn.conv1x1("reduce", x, 6, 3, false).unwrap();
    let h = nn.batch_norm("bn", h, 3).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.depthwise("dw", h, [3, 1, 3], [1, 1], true).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear("head", h, 3, 4, true).unwrap();
    Model::classifier(graph, x, logits).unwrap()
}

fn mutate(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    for _ in 0..rng.random_range(1..5) {
        if bytes.is_empty() {
            bytes.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..7) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes.insert(at, rng.random()),
            2 => {
                bytes.remove(at);
            }
            3 => {
                let end = (at + rng.random_range(1..16)).min(bytes.len());
                bytes[at..end].iter_mut().for_each(|b| *b = rng.random());
            }
            4 => {
                // A forged length: a large or random 64-bit word, or bincode's u64 marker.
                let word = match rng.random_range(0..3) {
                    0 => u64::MAX,
                    1 => rng.random::<u64>() >> rng.random_range(0..64),
                    _ => 253 | (u64::MAX << 8),
                };
                let end = (at + 8).min(bytes.len());
                bytes[at..end].copy_from_slice(&word.to_le_bytes()[..end - at]);
            }
            5 => {
                let end = (at + rng.random_range(1..64)).min(bytes.len());
                let run = bytes[at..end].to_vec();
                let to = rng.random_range(0..=bytes.len());
                bytes.splice(to..to, run);
            }
            _ => bytes.truncate(at),
        }
    }
}

/// The `.pw` header (length and checksum) made to agree with whatever payload follows.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() > HEADER_LEN {
        let payload = bytes[HEADER_LEN..].to_vec();
        bytes[10..18].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes[18..22].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    }
}

fn check(format: &str, case: usize, len: usize, result: pointwise::Result<()>) -> bool {
    let largest = LARGEST.load(Ordering::Relaxed);
    let bound = (16 * len).max(1 << 20);
    assert!(
        largest <= bound,
        "{format} case {case}: one allocation of {largest} bytes for a {len}-byte file"
    );
    match result {
        Ok(()) => true,
        Err(error) => {
            let message = error.to_string();
            assert!(
                !message.is_empty() && !message.contains('\n'),
                "{format} case {case}: {message:?}"
            );
            false
        }
    }
}

#[test]
fn mutated_weight_files_are_ok_or_one_line_typed_errors_within_the_memory_bound() {
    let cases: usize = std::env::var("POINTWISE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let model = network();
    let pw = to_bytes(&model, &Metadata::new(1, 1)).unwrap();
    let safetensors = graph_to_safetensors(model.graph()).unwrap();
    let mut rng = StdRng::seed_from_u64(20261129);
    let (mut pw_ok, mut st_ok) = (0, 0);
    for case in 0..cases {
        let mut bytes = pw.clone();
        mutate(&mut bytes, &mut rng);
        if rng.random_bool(0.5) {
            reseal(&mut bytes);
        }
        LARGEST.store(0, Ordering::Relaxed);
        let result = from_bytes(&bytes, LoadOptions::default()).map(|_| ());
        pw_ok += usize::from(check(".pw", case, bytes.len(), result));

        let mut bytes = safetensors.clone();
        mutate(&mut bytes, &mut rng);
        let mut graph = model.graph().clone();
        LARGEST.store(0, Ordering::Relaxed);
        let result = graph_from_safetensors(&mut graph, &bytes);
        st_ok += usize::from(check(".safetensors", case, bytes.len(), result));
    }
    println!("{cases} cases per format: {pw_ok} .pw and {st_ok} .safetensors files still loaded");
    // Most mutations must be caught; the few that load are files that pass every check.
    assert!(pw_ok < cases / 10 && st_ok < cases / 2, "{pw_ok} / {st_ok}");
}
