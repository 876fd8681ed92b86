//! A training step in steady state allocates nothing: the activations, gradients and
//! optimizer state are reused from step to step, and the f32 kernels keep their copies and
//! sums in per-thread scratch. A counting global allocator (this test binary's own) counts
//! every allocation during a few steps after the warm-up.
//!
//! Only where the crate's own kernels run the f32 products (`gemm::backend`: "avx512", or
//! "avx2+gemm", whose remaining gemm crate calls are not on this network's path): the gemm
//! crate alone allocates its packing buffers on every call.

use pointwise::layers::Layers;
use pointwise::prelude::{Optimizer, OptimizerKind};
use pointwise::{Architecture, Graph, Model};
use std::sync::atomic::Ordering;

#[path = "../examples/common/counting.rs"]
mod counting;
use counting::ALLOCATIONS;

/// Whether this CPU's f32 products run on the crate's own kernels (see the module's note).
fn own_kernels() -> bool {
    let backend = pointwise::gemm::backend::<f32>();
    if !matches!(backend, "avx512" | "avx2+gemm") {
        eprintln!("f32 backend {backend}: the gemm crate allocates per call; not counted");
    }
    matches!(backend, "avx512" | "avx2+gemm")
}

/// Allocations over 5 steps of SGD after 3 of warm-up, inside the pool (`parallel::install`).
fn allocations_in_steady_state(model: &mut Model, labels: &[usize]) -> u64 {
    let mut optimizer = Optimizer::new(OptimizerKind::sgd()).unwrap();
    pointwise::parallel::install(|| {
        // Warm-up: the buffers, and each thread's scratch on its first use.
        for _ in 0..3 {
            model.forward_backward_in_place(labels).unwrap();
            optimizer.step(model.graph_mut(), 1e-6).unwrap();
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..5 {
            model.forward_backward_in_place(labels).unwrap();
            optimizer.step(model.graph_mut(), 1e-6).unwrap();
        }
        ALLOCATIONS.load(Ordering::Relaxed) - before
    })
}

/// Fills the model's input buffer of `shape` with fixed values in [-0.5, 0.5).
fn fill_input(model: &mut Model, shape: [usize; 4]) {
    let mut batch = model.input_mut(shape).unwrap();
    for (i, value) in batch.iter_mut().enumerate() {
        *value = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
    }
}

/// One test for both networks: the counter is global, and two tests counting at once would
/// count each other's allocations.
#[test]
fn training_steps_allocate_nothing_in_steady_state() {
    if !own_kernels() {
        return;
    }
    let bottleneck = allocations_in_steady_state(&mut bottleneck(), &[3, 1, 4, 1]);
    let stack = allocations_in_steady_state(&mut pointwise_stack(), &[3, 1, 4]);
    assert_eq!(
        (bottleneck, stack),
        (0, 0),
        "allocations in 5 steady-state steps of (the bottleneck, the pointwise stack)"
    );
}

/// W2's layers (256 → 64 → 256 on 28×28 maps, 2×2 max pool, 10 classes) at batch 4: the same
/// products per sample as the benchmark's batch of 32, including dW's, whose B is transposed.
fn bottleneck() -> Model {
    let mut model = Model::new(Architecture::bottleneck(256, 64, 10), 0).unwrap();
    fill_input(&mut model, [4, 256, 28, 28]);
    model
}

/// 1×1 layers with biases on 14×14 maps, batch 3, whose middle layer narrows to 24 channels:
/// its dX runs per sample, db's row sums taken by the same product (and kept in the thread's
/// scratch), and the layer after it runs dX as one packed product over the batch.
fn pointwise_stack() -> Model {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, 0);
    let input = nn.input("input");
    let h = nn.conv1x1_relu("expand", input, 16, 96, true).unwrap();
    let h = nn.conv1x1("project", h, 96, 24, true).unwrap();
    let h = nn.conv1x1_relu("expand2", h, 24, 144, true).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear("head", h, 144, 10, true).unwrap();
    let mut model = Model::classifier(graph, input, logits).unwrap();
    fill_input(&mut model, [3, 16, 14, 14]);
    model
}
