//! A training step in steady state allocates nothing: the activations, gradients and
//! optimizer state are reused from step to step, and the f32 kernels keep their copies and
//! sums in per-thread scratch. A counting global allocator (this test binary's own) counts
//! every allocation during a few steps after the warm-up.
//!
//! Only where the crate's own kernels run the f32 products (`gemm::backend`: "avx512", or
//! "avx2+gemm", whose remaining gemm crate calls are not on this network's path): the gemm
//! crate alone allocates its packing buffers on every call.

use pointwise::prelude::{Optimizer, OptimizerKind};
use pointwise::{Architecture, Model};
use std::sync::atomic::Ordering;

#[path = "../examples/common/counting.rs"]
mod counting;
use counting::ALLOCATIONS;

#[test]
fn a_bottleneck_training_step_allocates_nothing_in_steady_state() {
    let backend = pointwise::gemm::backend::<f32>();
    if !matches!(backend, "avx512" | "avx2+gemm") {
        eprintln!("f32 backend {backend}: the gemm crate allocates per call; not counted");
        return;
    }
    // W2's layers (256 → 64 → 256 on 28×28 maps, 2×2 max pool, 10 classes) at batch 4: the
    // same products per sample as the benchmark's batch of 32, including dW's, whose B is
    // transposed.
    let mut model = Model::new(Architecture::bottleneck(256, 64, 10), 0).unwrap();
    {
        let mut batch = model.input_mut([4, 256, 28, 28]).unwrap();
        for (i, value) in batch.iter_mut().enumerate() {
            *value = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
        }
    }
    let labels = [3, 1, 4, 1];
    let mut optimizer = Optimizer::new(OptimizerKind::sgd()).unwrap();
    let counted = pointwise::parallel::install(|| {
        // Warm-up: the buffers, and each thread's scratch on its first use.
        for _ in 0..3 {
            model.forward_backward_in_place(&labels).unwrap();
            optimizer.step(model.graph_mut(), 1e-6).unwrap();
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..5 {
            model.forward_backward_in_place(&labels).unwrap();
            optimizer.step(model.graph_mut(), 1e-6).unwrap();
        }
        ALLOCATIONS.load(Ordering::Relaxed) - before
    });
    assert_eq!(
        counted, 0,
        "{counted} allocations in 5 steady-state steps ({backend})"
    );
}
