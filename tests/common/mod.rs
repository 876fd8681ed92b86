//! Helpers shared by the integration tests: seeded random tensors and the table of shapes.
#![allow(dead_code)]

use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use ndarray_rand::rand_distr::Uniform;
use ndarray_rand::RandomExt;

/// Uniform in [-1, 1), seeded.
pub fn random(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let distribution = Uniform::new(-1.0, 1.0).unwrap();
    ArrayD::random_using(IxDyn(shape), distribution, &mut StdRng::seed_from_u64(seed))
}

/// Random values whose magnitude is at least `margin`: safe inputs for ReLU's kink at 0.
pub fn away_from_zero(shape: &[usize], seed: u64, margin: f64) -> ArrayD<f64> {
    random(shape, seed).mapv(|v| if v >= 0.0 { v + margin } else { v - margin })
}

/// Pairwise distinct values at least `spacing` apart, in random order: max-pool windows
/// without ties, even after a finite-difference step smaller than spacing / 2.
pub fn distinct_values(shape: &[usize], seed: u64, spacing: f64) -> ArrayD<f64> {
    let len: usize = shape.iter().product();
    let mut values: Vec<f64> = (0..len)
        .map(|i| (i as f64 - len as f64 / 2.0) * spacing)
        .collect();
    values.shuffle(&mut StdRng::seed_from_u64(seed));
    ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
}

/// One gradient-check shape: (batch, c_in, c_out, height, width).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub height: usize,
    pub width: usize,
}

/// Batch 1, odd channel counts (3, 5, 7), F1 < F and F1 > F, H ≠ W, and 1×1 spatial maps.
pub const CASES: [Case; 5] = [
    Case {
        batch: 1,
        c_in: 3,
        c_out: 5,
        height: 2,
        width: 3,
    },
    Case {
        batch: 2,
        c_in: 7,
        c_out: 3,
        height: 3,
        width: 2,
    },
    Case {
        batch: 3,
        c_in: 5,
        c_out: 5,
        height: 1,
        width: 1,
    },
    Case {
        batch: 2,
        c_in: 4,
        c_out: 6,
        height: 4,
        width: 5,
    },
    Case {
        batch: 1,
        c_in: 8,
        c_out: 2,
        height: 5,
        width: 3,
    },
];

impl Case {
    pub fn image(&self) -> [usize; 4] {
        [self.batch, self.c_in, self.height, self.width]
    }
}

/// A global allocator that forwards to the system's and records the largest single request
/// (`LARGEST`, reset by the test): what the memory-bound tests measure. A test binary installs
/// it with `#[global_allocator] static ALLOCATOR: common::Counting = common::Counting;`.
pub struct Counting;

/// The largest allocation or reallocation requested since the last reset.
pub static LARGEST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is updated.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}
