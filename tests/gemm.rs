//! The crate's GEMM (its AVX-512 kernels for f32 where the CPU has them, its AVX2 kernel for
//! shallow f32 products elsewhere, the gemm crate and ndarray otherwise) against
//! an f64 triple loop, on shapes that hit every tile size and edge, with transposed and strided
//! operands and several α, β.

use ndarray::{s, Array2, ArrayView2, ShapeBuilder};
use pointwise::gemm::gemm;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(rows: usize, columns: usize, rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_fn((rows, columns), |_| rng.random_range(-1.0f32..1.0))
}

/// C_expected = α·A·B + β·C in f64, and the bound Σ|α·a·b| + |β·c| that scales the f32 error.
fn expected(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    c: &Array2<f32>,
) -> (Array2<f64>, Array2<f64>) {
    let (m, n) = c.dim();
    let mut value = Array2::zeros((m, n));
    let mut scale = Array2::zeros((m, n));
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut magnitude) = (0.0f64, 0.0f64);
            for p in 0..a.ncols() {
                let term = f64::from(a[[i, p]]) * f64::from(b[[p, j]]);
                sum += term;
                magnitude += term.abs();
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                f64::from(beta) * f64::from(c[[i, j]])
            };
            value[[i, j]] = f64::from(alpha) * sum + old;
            scale[[i, j]] = f64::from(alpha.abs()) * magnitude + old.abs() + 1e-30;
        }
    }
    (value, scale)
}

fn check(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    mut c: Array2<f32>,
    context: &str,
) {
    let (value, scale) = expected(alpha, a, b, beta, &c);
    if beta == 0.0 {
        c.fill(f32::NAN); // β = 0 must ignore C's old values entirely
    }
    gemm(alpha, a, b, beta, c.view_mut()).unwrap();
    for ((index, &got), (&want, &bound)) in c.indexed_iter().zip(value.iter().zip(scale.iter())) {
        // f32 accumulation over k terms: a few ulps of the sum of magnitudes.
        let error = (f64::from(got) - want).abs();
        assert!(
            error <= 4e-6 * bound * (a.ncols() as f64).sqrt().max(1.0),
            "{context} at {index:?}: {got} vs {want}"
        );
    }
}

#[test]
fn gemm_matches_the_triple_loop_on_every_edge_case() {
    let mut rng = StdRng::seed_from_u64(1);
    let dims = [1, 2, 3, 5, 6, 7, 13, 16, 17, 33, 64, 65, 130];
    for (case, &(alpha, beta)) in [(1.0, 0.0), (1.0, 1.0), (0.5, -2.0)].iter().enumerate() {
        for &m in &dims {
            for &n in &dims[case..] {
                let k = dims[(m + n + case) % dims.len()];
                let (a, b, c) = (
                    random(m, k, &mut rng),
                    random(k, n, &mut rng),
                    random(m, n, &mut rng),
                );
                check(
                    alpha,
                    a.view(),
                    b.view(),
                    beta,
                    c.clone(),
                    &format!("NN m{m} n{n} k{k}"),
                );
                // B transposed (columns contiguous): the NT kernel.
                let bt = random(n, k, &mut rng);
                check(
                    alpha,
                    a.view(),
                    bt.t(),
                    beta,
                    c.clone(),
                    &format!("NT m{m} n{n} k{k}"),
                );
                // A transposed (broadcasts along a strided column).
                let at = random(k, m, &mut rng);
                check(
                    alpha,
                    at.t(),
                    b.view(),
                    beta,
                    c.clone(),
                    &format!("TN m{m} n{n} k{k}"),
                );
            }
        }
    }
}

#[test]
fn gemm_handles_long_depths_strided_views_and_other_layouts() {
    let mut rng = StdRng::seed_from_u64(2);
    // K across several NN depth blocks, the W1 shapes, and either side of the AVX2 kernel's
    // deepest products (K = 256 with a small A).
    let shapes = [
        (64, 784, 256),
        (256, 784, 64),
        (64, 256, 784),
        (7, 70, 300),
        (37, 47, 256),
        (37, 47, 257),
    ];
    for (m, n, k) in shapes {
        let (a, b, c) = (
            random(m, k, &mut rng),
            random(k, n, &mut rng),
            random(m, n, &mut rng),
        );
        check(
            1.0,
            a.view(),
            b.view(),
            1.0,
            c.clone(),
            &format!("{m}×{k}·{k}×{n}"),
        );
        let bt = random(n, k, &mut rng);
        check(
            1.0,
            a.view(),
            bt.t(),
            0.0,
            c,
            &format!("NT {m}×{k}·{k}×{n}"),
        );
    }
    // A transposed and small (Wᵀ in dX), deep enough to be copied row-major on the AVX2
    // kernel, with edges of the 8×8 copy blocks, with α and β.
    for (m, n, k) in [(64, 300, 256), (37, 47, 129), (25, 17, 200), (130, 33, 128)] {
        let (at, b, c) = (
            random(k, m, &mut rng),
            random(k, n, &mut rng),
            random(m, n, &mut rng),
        );
        for (alpha, beta) in [(1.0, 0.0), (0.5, -2.0)] {
            let context = format!("TN {m}×{k}·{k}×{n} α {alpha} β {beta}");
            check(alpha, at.t(), b.view(), beta, c.clone(), &context);
        }
    }
    // Long products with B transposed (dW = dYₙ·Xₙᵀ of a small layer on a large map), with
    // α and β.
    // Past one block of copied strips both ways (K > 4096 and N > 128), with edges in each.
    for (m, n, k) in [
        (13, 11, 1100),
        (16, 32, 784),
        (1, 1, 256),
        (7, 300, 513),
        (5, 19, 4099),
        (3, 140, 4200),
        // A linear layer's forward pass on a few samples (Y = X·Wᵀ).
        (1, 512, 1024),
        (6, 13, 37),
        (2, 9, 4103),
    ] {
        let (a, bt, c) = (
            random(m, k, &mut rng),
            random(n, k, &mut rng),
            random(m, n, &mut rng),
        );
        for (alpha, beta) in [(1.0, 0.0), (0.5, -2.0)] {
            let context = format!("dots {m}×{k}·{k}×{n} α {alpha} β {beta}");
            check(alpha, a.view(), bt.t(), beta, c.clone(), &context);
        }
    }
    // Every other column / row: strided operands, and a column-major C (the fallback path).
    let big_a = random(20, 40, &mut rng);
    let big_b = random(40, 60, &mut rng);
    let a = big_a.slice(s![..;2, ..;2]);
    let b = big_b.slice(s![..;2, ..;3]);
    check(1.0, a, b, 0.0, Array2::zeros((10, 20)), "strided");
    let c = Array2::<f32>::zeros((10, 20).f());
    check(1.0, a, b, 0.5, c, "column-major C");
    // Empty depth: C = β·C.
    let mut c = Array2::from_elem((3, 4), 2.0f32);
    gemm(
        1.0,
        Array2::zeros((3, 0)).view(),
        Array2::zeros((0, 4)).view(),
        0.5,
        c.view_mut(),
    )
    .unwrap();
    assert!(c.iter().all(|&v| v == 1.0));
}

#[test]
fn gemm_rejects_mismatched_shapes() {
    let a = Array2::<f32>::zeros((3, 4));
    let b = Array2::<f32>::zeros((5, 6));
    let mut c = Array2::<f32>::zeros((3, 6));
    assert!(gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).is_err());
}

#[test]
fn gemm_in_f64_goes_through_ndarray_unchanged() {
    let a = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as f64);
    let b = Array2::from_shape_fn((5, 2), |(i, j)| (i as f64) - (j as f64));
    let mut c = Array2::zeros((3, 2));
    gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap();
    assert_eq!(c, a.dot(&b));
}

#[test]
fn gemm_bias_relu_adds_the_bias_to_every_column_then_clamps() {
    let mut rng = StdRng::seed_from_u64(3);
    // Shallow products (K ≤ 32, or ≤ 64 with this epilogue: the AVX2 kernel where there is no
    // AVX-512) across a column block with a masked tail, and deep ones.
    let shapes = [
        (1, 1, 1),
        (7, 70, 13),
        (13, 300, 32),
        (7, 1100, 32),
        (6, 16, 16),
        (11, 300, 64),
        (5, 40, 48),
    ];
    for (m, n, k) in shapes.into_iter().chain([(64, 784, 256), (6, 17, 300)]) {
        let (a, b) = (random(m, k, &mut rng), random(k, n, &mut rng));
        let bias = random(1, m, &mut rng).into_shape_with_order(m).unwrap();
        let (mut value, scale) = expected(1.0, a.view(), b.view(), 0.0, &Array2::zeros((m, n)));
        for (mut row, &b) in value.outer_iter_mut().zip(&bias) {
            row += f64::from(b);
        }
        // Through the kernel (contiguous bias) and through the fallback (a strided bias).
        let strided = ndarray::Array1::from_iter(bias.iter().flat_map(|&v| [v, 0.0]));
        for bias in [bias.view(), strided.slice(s![..;2])] {
            for relu in [false, true] {
                let mut c = Array2::from_elem((m, n), f32::NAN);
                let result = pointwise::gemm::gemm_bias_relu(
                    a.view(),
                    b.view(),
                    Some(bias),
                    relu,
                    c.view_mut(),
                );
                result.unwrap();
                for ((index, &got), (&want, &bound)) in
                    c.indexed_iter().zip(value.iter().zip(scale.iter()))
                {
                    let want = if relu { want.max(0.0) } else { want };
                    let error = (f64::from(got) - want).abs();
                    let context = format!("{m}×{n}×{k} relu {relu} at {index:?}: {got} vs {want}");
                    assert!(
                        error <= 4e-6 * (bound + want.abs()) * (k as f64).sqrt(),
                        "{context}"
                    );
                }
            }
        }
    }
    let mut c = Array2::<f32>::zeros((2, 2));
    let wrong = ndarray::Array1::<f32>::zeros(3);
    let (a, b) = (Array2::zeros((2, 1)), Array2::zeros((1, 2)));
    let result = pointwise::gemm::gemm_bias_relu(
        a.view(),
        b.view(),
        Some(wrong.view()),
        false,
        c.view_mut(),
    );
    assert!(result.is_err());
}

/// Which kernel the f32 products above ran on. On a CPU without AVX-512 the SIMD kernel is
/// never reached and every test above checks the portable path only; `.ci/run` sets
/// `POINTWISE_REQUIRE_SIMD=1` on a CPU that has AVX-512, so that a dispatch bug that silently
/// falls back fails here instead. Run with `--nocapture` to see the line.
#[test]
fn the_f32_backend_is_reported_and_is_the_simd_kernel_when_required() {
    let backend = pointwise::gemm::backend::<f32>();
    println!("f32 GEMM backend: {backend}");
    assert_eq!(pointwise::gemm::backend::<f64>(), "ndarray");
    if std::env::var("POINTWISE_REQUIRE_SIMD").as_deref() == Ok("1") {
        assert_eq!(
            backend, "avx512",
            "POINTWISE_REQUIRE_SIMD=1 but the SIMD kernel is not running"
        );
    }
}
