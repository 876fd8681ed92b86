//! The machine's fused-multiply-add peak, measured: `threads` threads each running independent
//! FMA chains, the best of scalar, AVX2 and AVX-512. The ceiling a GEMM-bound op is judged
//! against.
//!
//! Enough chains hide the FMA latency (4 cycles on two pipes needs at least 8 in flight), and
//! every chain must stay in a register: AVX2 has 16 vector registers, so 12 chains plus the two
//! constants; AVX-512 has 32, so 16. (16 AVX2 chains spill to memory, and the meter then reads
//! about half the peak: the GEMMs it judges seemed to run at 130 % of it.)

use std::hint::black_box;
use std::time::Instant;

/// GFLOP/s of `threads` threads each running independent FMA chains.
pub fn fma_peak(threads: usize) -> f64 {
    let run = |threads: usize, kernel: fn(u64) -> f64| -> f64 {
        (0..5)
            .map(|_| {
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..threads)
                        .map(|_| s.spawn(|| kernel(20_000_000)))
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).sum::<f64>()
                })
            })
            .fold(0.0, f64::max)
    };
    let mut best = run(threads, fma_scalar);
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            best = best.max(run(threads, x86::fma_avx2));
        }
        if is_x86_feature_detected!("avx512f") {
            best = best.max(run(threads, x86::fma_avx512));
        }
    }
    best
}

fn fma_scalar(iterations: u64) -> f64 {
    let mut acc = [0.0f32; 16];
    let t = Instant::now();
    for _ in 0..iterations / 16 {
        for a in acc.iter_mut() {
            *a = black_box(*a).mul_add(1.000_000_1, 0.999_999_9);
        }
    }
    black_box(&acc);
    (iterations / 16 * 16 * 2) as f64 / t.elapsed().as_secs_f64() * 1e-9
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    macro_rules! fma_kernel {
        ($name:ident, $inner:ident, $feature:literal, $vector:ty, $set1:ident, $fma:ident, $lanes:expr, $chains:expr) => {
            pub fn $name(iterations: u64) -> f64 {
                // SAFETY: called only after is_x86_feature_detected! confirmed the feature.
                unsafe { $inner(iterations) }
            }
            #[target_feature(enable = $feature)]
            unsafe fn $inner(iterations: u64) -> f64 {
                let a = $set1(1.000_000_1);
                let b = $set1(0.999_999_9);
                let mut acc: [$vector; $chains] = [$set1(0.0); $chains];
                let t = Instant::now();
                for _ in 0..iterations {
                    for slot in acc.iter_mut() {
                        *slot = $fma(*slot, a, b);
                    }
                }
                let seconds = t.elapsed().as_secs_f64();
                black_box(&acc);
                (iterations * $chains * $lanes * 2) as f64 / seconds * 1e-9
            }
        };
    }
    fma_kernel!(
        fma_avx512,
        fma_avx512_inner,
        "avx512f",
        __m512,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        16,
        16
    );
    fma_kernel!(
        fma_avx2,
        fma_avx2_inner,
        "avx2,fma",
        __m256,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        8,
        12
    );
}
