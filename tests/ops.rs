//! The fast path of every op against its reference index loops (the specification kept in the
//! op's file), forward and backward. Gradient buffers start non-zero, so the tests also check
//! that backward accumulates (`+=`) rather than overwrites.

mod common;

use approx::assert_abs_diff_eq;
use common::{distinct_values, random, CASES};
use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4, IxDyn};
use pointwise::ops::{
    add, avg_pool, conv1x1, global_avg_pool, linear, max_pool, mse,
    relu::{self, Relu},
    softmax_cross_entropy,
};

/// Fast and reference paths sum in different orders; in f64 they agree to rounding.
const TOL: f64 = 1e-12;

fn r4(shape: [usize; 4], seed: u64) -> Array4<f64> {
    random(&shape, seed).into_dimensionality::<Ix4>().unwrap()
}
fn r2(shape: [usize; 2], seed: u64) -> Array2<f64> {
    random(&shape, seed).into_dimensionality::<Ix2>().unwrap()
}
fn r1(len: usize, seed: u64) -> Array1<f64> {
    random(&[len], seed).into_dimensionality::<Ix1>().unwrap()
}

#[test]
fn conv1x1_fast_path_matches_reference_loops() {
    for (i, case) in CASES.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = r4(case.image(), seed);
        let weight = r2([case.c_out, case.c_in], seed + 1);
        let bias = r1(case.c_out, seed + 2);
        let out = [case.batch, case.c_out, case.height, case.width];
        let (mut y, mut y_ref) = (Array4::zeros(out), Array4::zeros(out));
        conv1x1::forward(x.view(), weight.view(), Some(bias.view()), y.view_mut()).unwrap();
        conv1x1::forward_reference(x.view(), weight.view(), Some(bias.view()), y_ref.view_mut())
            .unwrap();
        assert_abs_diff_eq!(y, y_ref, epsilon = TOL);

        let dy = r4(out, seed + 3);
        let (mut dx, mut dw, mut db) = (
            r4(case.image(), 1),
            r2([case.c_out, case.c_in], 2),
            r1(case.c_out, 3),
        );
        let (mut dx_ref, mut dw_ref, mut db_ref) = (dx.clone(), dw.clone(), db.clone());
        conv1x1::backward(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx.view_mut()),
            Some(dw.view_mut()),
            Some(db.view_mut()),
        )
        .unwrap();
        conv1x1::backward_reference(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx_ref.view_mut()),
            Some(dw_ref.view_mut()),
            Some(db_ref.view_mut()),
        )
        .unwrap();
        assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);
        assert_abs_diff_eq!(dw, dw_ref, epsilon = TOL);
        assert_abs_diff_eq!(db, db_ref, epsilon = TOL);
    }
}

#[test]
fn linear_fast_path_matches_reference_loops() {
    for (i, case) in CASES.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = r2([case.batch, case.c_in], seed);
        let weight = r2([case.c_out, case.c_in], seed + 1);
        let bias = r1(case.c_out, seed + 2);
        let (mut y, mut y_ref) = (
            Array2::zeros((case.batch, case.c_out)),
            Array2::zeros((case.batch, case.c_out)),
        );
        linear::forward(x.view(), weight.view(), Some(bias.view()), y.view_mut()).unwrap();
        linear::forward_reference(x.view(), weight.view(), Some(bias.view()), y_ref.view_mut())
            .unwrap();
        assert_abs_diff_eq!(y, y_ref, epsilon = TOL);

        let dy = r2([case.batch, case.c_out], seed + 3);
        let (mut dx, mut dw, mut db) = (
            r2([case.batch, case.c_in], 1),
            r2([case.c_out, case.c_in], 2),
            r1(case.c_out, 3),
        );
        let (mut dx_ref, mut dw_ref, mut db_ref) = (dx.clone(), dw.clone(), db.clone());
        linear::backward(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx.view_mut()),
            Some(dw.view_mut()),
            Some(db.view_mut()),
        )
        .unwrap();
        linear::backward_reference(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx_ref.view_mut()),
            Some(dw_ref.view_mut()),
            Some(db_ref.view_mut()),
        )
        .unwrap();
        assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);
        assert_abs_diff_eq!(dw, dw_ref, epsilon = TOL);
        assert_abs_diff_eq!(db, db_ref, epsilon = TOL);
    }
}

/// A fully-connected layer on (N, F) features and a 1×1 convolution on the same numbers laid
/// out as (N, F, 1, 1) maps are the same function, with the same gradients (the FCN insight).
#[test]
fn fully_connected_layer_is_a_1x1_convolution_on_1x1_maps() {
    let (batch, c_in, c_out) = (4, 7, 3);
    let x = r2([batch, c_in], 1);
    let weight = r2([c_out, c_in], 2);
    let bias = r1(c_out, 3);
    let mut fc = Array2::zeros((batch, c_out));
    linear::forward_reference(x.view(), weight.view(), Some(bias.view()), fc.view_mut()).unwrap();
    let x_map = x
        .clone()
        .into_shape_with_order((batch, c_in, 1, 1))
        .unwrap();
    let mut conv = Array4::zeros((batch, c_out, 1, 1));
    conv1x1::forward(
        x_map.view(),
        weight.view(),
        Some(bias.view()),
        conv.view_mut(),
    )
    .unwrap();
    assert_abs_diff_eq!(
        fc,
        conv.into_shape_with_order((batch, c_out)).unwrap(),
        epsilon = TOL
    );

    let dy = r2([batch, c_out], 4);
    let (mut dw_fc, mut dw_conv) = (Array2::zeros((c_out, c_in)), Array2::zeros((c_out, c_in)));
    linear::backward_reference(
        x.view(),
        weight.view(),
        dy.view(),
        None,
        Some(dw_fc.view_mut()),
        None,
    )
    .unwrap();
    let dy_map = dy.into_shape_with_order((batch, c_out, 1, 1)).unwrap();
    conv1x1::backward(
        x_map.view(),
        weight.view(),
        dy_map.view(),
        None,
        Some(dw_conv.view_mut()),
        None,
    )
    .unwrap();
    assert_abs_diff_eq!(dw_fc, dw_conv, epsilon = TOL);
}

#[test]
fn relu_and_add_fast_paths_match_reference_loops() {
    for (i, case) in CASES.iter().enumerate() {
        let shape = IxDyn(&case.image());
        let (a, b) = (
            random(&case.image(), i as u64),
            random(&case.image(), 100 + i as u64),
        );
        let (mut y, mut y_ref) = (ArrayD::zeros(shape.clone()), ArrayD::zeros(shape.clone()));
        relu::forward(Relu::Plain, a.view(), y.view_mut()).unwrap();
        relu::forward_reference(Relu::Plain, a.view(), y_ref.view_mut()).unwrap();
        assert_eq!(y, y_ref);
        let (mut dx, mut dx_ref) = (b.clone(), b.clone());
        relu::backward(Relu::Plain, a.view(), b.view(), dx.view_mut()).unwrap();
        relu::backward_reference(Relu::Plain, a.view(), b.view(), dx_ref.view_mut()).unwrap();
        assert_eq!(dx, dx_ref);

        add::forward(a.view(), b.view(), y.view_mut()).unwrap();
        add::forward_reference(a.view(), b.view(), y_ref.view_mut()).unwrap();
        assert_eq!(y, y_ref);
        let (mut da, mut da_ref) = (a.clone(), a.clone());
        add::backward(b.view(), da.view_mut()).unwrap();
        add::backward_reference(b.view(), da_ref.view_mut()).unwrap();
        assert_eq!(da, da_ref);
    }
}

#[test]
fn pooling_fast_paths_match_reference_loops() {
    for (i, case) in CASES.iter().enumerate() {
        let x = distinct_values(&case.image(), i as u64, 0.01)
            .into_dimensionality::<Ix4>()
            .unwrap();
        for (window, stride) in [(1, 1), (2, 1), (2, 2), (3, 2)] {
            let Ok(out) = max_pool::output_shape(x.shape(), window, stride) else {
                continue;
            };
            let (mut y, mut y_ref) = (Array4::zeros(out), Array4::zeros(out));
            let mut argmax = vec![0; y.len()];
            max_pool::forward(x.view(), window, stride, y.view_mut(), &mut argmax).unwrap();
            let argmax_ref =
                max_pool::forward_reference(x.view(), window, stride, y_ref.view_mut()).unwrap();
            assert_eq!(y, y_ref);
            assert_eq!(argmax, argmax_ref);
            let dy = r4(out, 7);
            let (mut dx, mut dx_ref) = (r4(case.image(), 8), r4(case.image(), 8));
            max_pool::backward(dy.view(), &argmax, dx.view_mut()).unwrap();
            max_pool::backward_reference(x.view(), window, stride, dy.view(), dx_ref.view_mut())
                .unwrap();
            assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);

            avg_pool::forward(x.view(), window, stride, y.view_mut()).unwrap();
            avg_pool::forward_reference(x.view(), window, stride, y_ref.view_mut()).unwrap();
            assert_abs_diff_eq!(y, y_ref, epsilon = TOL);
            avg_pool::backward(dy.view(), window, stride, dx.view_mut()).unwrap();
            avg_pool::backward_reference(dy.view(), window, stride, dx_ref.view_mut()).unwrap();
            assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);
        }
        let out = (case.batch, case.c_in);
        let (mut y, mut y_ref) = (Array2::zeros(out), Array2::zeros(out));
        global_avg_pool::forward(x.view(), y.view_mut()).unwrap();
        global_avg_pool::forward_reference(x.view(), y_ref.view_mut()).unwrap();
        assert_abs_diff_eq!(y, y_ref, epsilon = TOL);
        let dy = r2([case.batch, case.c_in], 9);
        let (mut dx, mut dx_ref) = (r4(case.image(), 10), r4(case.image(), 10));
        global_avg_pool::backward(dy.view(), dx.view_mut()).unwrap();
        global_avg_pool::backward_reference(dy.view(), dx_ref.view_mut()).unwrap();
        assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);
    }
}

/// The 2×2 / 2 window in f32 (eight outputs at a time where the CPU has AVX2, a row's last run
/// overlapping the one before) against the reference loops, bit for bit: rows of 1 to 20
/// outputs, odd sizes, ties (values from a set of five) and NaN, which never replaces a
/// window's first candidate and is never replaced while first.
#[test]
fn max_pool_2x2_f32_matches_reference_loops_with_ties_and_nan() {
    for (i, (batch, channels, height, width)) in [
        (1, 1, 2, 2),
        (2, 3, 5, 15),
        (1, 2, 4, 16),
        (3, 1, 7, 17),
        (1, 3, 6, 31),
        (2, 2, 9, 40),
        (1, 1, 28, 28),
    ]
    .into_iter()
    .enumerate()
    {
        let x = random(&[batch, channels, height, width], 40 + i as u64).mapv(|v| {
            match (v * 1000.0).abs() as usize % 11 {
                0 => f32::NAN,
                k => (k % 5) as f32 - 2.0,
            }
        });
        let x = x.into_dimensionality::<Ix4>().unwrap();
        let out = max_pool::output_shape(x.shape(), 2, 2).unwrap();
        let (mut y, mut y_ref) = (Array4::<f32>::zeros(out), Array4::<f32>::zeros(out));
        let mut argmax = vec![0; y.len()];
        max_pool::forward(x.view(), 2, 2, y.view_mut(), &mut argmax).unwrap();
        let argmax_ref = max_pool::forward_reference(x.view(), 2, 2, y_ref.view_mut()).unwrap();
        assert_eq!(argmax, argmax_ref, "{:?}", x.shape());
        let bits = |a: &Array4<f32>| a.mapv(f32::to_bits);
        assert_eq!(bits(&y), bits(&y_ref), "{:?}", x.shape());
    }
}

/// The fused relu(max_pool(x)) against max_pool(relu(x)) by the reference loops, bit for bit,
/// values and gradients, for ReLU and ReLU6: f32 maps of odd sizes and 28×28 (the 2×2 window's
/// vector path), overlapping and 3×3 windows, ties everywhere (values from a set of seven that
/// includes 0, negatives and values past 6) and NaN.
#[test]
fn max_pool_relu_equals_relu_then_max_pool_with_ties_and_nan() {
    let shapes = [(1, 1, 2, 2), (2, 3, 5, 7), (1, 2, 9, 17), (2, 2, 28, 28)];
    for (i, (batch, channels, height, width)) in shapes.into_iter().enumerate() {
        let x = random(&[batch, channels, height, width], 60 + i as u64).mapv(|v| {
            match (v * 1000.0).abs() as usize % 13 {
                0 => f32::NAN,
                k => [-2.0, -0.5, 0.0, 1.0, 3.0, 6.0, 7.5][k % 7],
            }
        });
        let x = x.into_dimensionality::<Ix4>().unwrap();
        for activation in [Relu::Plain, Relu::Six] {
            for (window, stride) in [(1, 1), (2, 1), (2, 2), (3, 2)] {
                let context = format!("{activation:?} k{window} s{stride} {:?}", x.shape());
                let Ok(out) = max_pool::output_shape(x.shape(), window, stride) else {
                    continue; // a window larger than the map
                };
                let mut y = Array4::<f32>::zeros(out);
                let mut argmax = vec![0; y.len()];
                max_pool::forward_activated(
                    x.view(),
                    window,
                    stride,
                    activation,
                    y.view_mut(),
                    &mut argmax,
                )
                .unwrap();
                let dy = random(&out, 70 + i as u64)
                    .mapv(|v| v as f32)
                    .into_dimensionality::<Ix4>()
                    .unwrap();
                let mut dx = Array4::<f32>::zeros(x.dim());
                max_pool::backward_activated(
                    dy.view(),
                    y.view(),
                    activation,
                    &argmax,
                    dx.view_mut(),
                )
                .unwrap();

                let mut r = ArrayD::<f32>::zeros(IxDyn(x.shape()));
                relu::forward_reference(activation, x.view().into_dyn(), r.view_mut()).unwrap();
                let r = r.into_dimensionality::<Ix4>().unwrap();
                let mut y_ref = Array4::<f32>::zeros(out);
                max_pool::forward_reference(r.view(), window, stride, y_ref.view_mut()).unwrap();
                let mut dr = Array4::<f32>::zeros(x.dim());
                max_pool::backward_reference(r.view(), window, stride, dy.view(), dr.view_mut())
                    .unwrap();
                let mut dx_ref = ArrayD::<f32>::zeros(IxDyn(x.shape()));
                relu::backward_reference(
                    activation,
                    x.view().into_dyn(),
                    dr.view().into_dyn(),
                    dx_ref.view_mut(),
                )
                .unwrap();

                let bits = |a: ArrayD<f32>| a.mapv(f32::to_bits);
                assert_eq!(bits(y.into_dyn()), bits(y_ref.into_dyn()), "{context}");
                assert_eq!(bits(dx.into_dyn()), bits(dx_ref), "{context}");
            }
        }
    }
}

#[test]
fn max_pool_routes_a_tied_window_to_its_first_maximum() {
    let x = Array4::from_shape_vec((1, 1, 2, 2), vec![1.0, 3.0, 3.0, 2.0]).unwrap();
    let mut y = Array4::zeros((1, 1, 1, 1));
    let mut argmax = vec![0];
    max_pool::forward(x.view(), 2, 2, y.view_mut(), &mut argmax).unwrap();
    assert_eq!(argmax, vec![1], "row-major first maximum is (0, 1)");
    let mut dx = Array4::zeros((1, 1, 2, 2));
    max_pool::backward(
        Array4::from_elem((1, 1, 1, 1), 5.0).view(),
        &argmax,
        dx.view_mut(),
    )
    .unwrap();
    assert_eq!(dx.into_raw_vec_and_offset().0, vec![0.0, 5.0, 0.0, 0.0]);
}

#[test]
fn relu_passes_no_gradient_at_exactly_zero() {
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![-1.0, 0.0, 2.0]).unwrap();
    let mut dx = ArrayD::zeros(IxDyn(&[3]));
    relu::backward(
        Relu::Plain,
        x.view(),
        ArrayD::from_elem(IxDyn(&[3]), 1.0).view(),
        dx.view_mut(),
    )
    .unwrap();
    assert_eq!(dx.into_raw_vec_and_offset().0, vec![0.0, 0.0, 1.0]);
}

#[test]
fn loss_fast_paths_match_reference_loops() {
    for (i, case) in CASES.iter().enumerate() {
        let logits = r2([case.batch, case.c_out], i as u64) * 5.0;
        let labels: Vec<usize> = (0..case.batch).map(|n| (n + i) % case.c_out).collect();
        let mut probs = Array2::zeros(logits.dim());
        let loss =
            softmax_cross_entropy::forward(logits.view(), &labels, probs.view_mut()).unwrap();
        let loss_ref = softmax_cross_entropy::forward_reference(logits.view(), &labels).unwrap();
        assert_abs_diff_eq!(loss, loss_ref, epsilon = TOL);
        let (mut dz, mut dz_ref) = (
            r2([case.batch, case.c_out], 1),
            r2([case.batch, case.c_out], 1),
        );
        softmax_cross_entropy::backward(probs.view(), &labels, 0.7, dz.view_mut()).unwrap();
        softmax_cross_entropy::backward_reference(logits.view(), &labels, 0.7, dz_ref.view_mut())
            .unwrap();
        assert_abs_diff_eq!(dz, dz_ref, epsilon = TOL);

        let (p, t) = (
            random(&case.image(), i as u64),
            random(&case.image(), 40 + i as u64),
        );
        let loss = mse::forward(p.view(), t.view()).unwrap();
        assert_abs_diff_eq!(
            loss,
            mse::forward_reference(p.view(), t.view()).unwrap(),
            epsilon = TOL
        );
        let (mut dp, mut dt) = (p.clone(), t.clone());
        let (mut dp_ref, mut dt_ref) = (p.clone(), t.clone());
        mse::backward(
            p.view(),
            t.view(),
            0.7,
            Some(dp.view_mut()),
            Some(dt.view_mut()),
        )
        .unwrap();
        mse::backward_reference(
            p.view(),
            t.view(),
            0.7,
            Some(dp_ref.view_mut()),
            Some(dt_ref.view_mut()),
        )
        .unwrap();
        assert_abs_diff_eq!(dp, dp_ref, epsilon = TOL);
        assert_abs_diff_eq!(dt, dt_ref, epsilon = TOL);
    }
}

#[test]
fn softmax_cross_entropy_is_stable_for_huge_logits() {
    let logits =
        Array2::from_shape_vec((2, 3), vec![1000.0f32, 0.0, -1000.0, 88.0, 89.0, 90.0]).unwrap();
    let mut probs = Array2::zeros((2, 3));
    let loss = softmax_cross_entropy::forward(logits.view(), &[0, 2], probs.view_mut()).unwrap();
    assert!(loss.is_finite() && probs.iter().all(|p| p.is_finite()));
    // Sample 0 is certain and right (loss 0); sample 1 has loss log(1 + e⁻¹ + e⁻²) ≈ 0.4076.
    assert_abs_diff_eq!(loss, 0.407_606 / 2.0, epsilon = 1e-5);
}

#[test]
fn conv2d_fast_path_matches_reference_loops() {
    use pointwise::ops::{conv2d, Window};
    for (i, case) in CASES.iter().enumerate() {
        for (kernel, stride, padding) in [
            (1, 1, 0),
            (3, 1, 1),
            (4, 1, 2),
            (2, 1, 0),
            (3, 1, 0),
            (3, 2, 1),
            (2, 2, 0),
        ] {
            let window = Window { stride, padding };
            let seed = 10 * i as u64 + kernel as u64 + stride as u64;
            let x = r4(case.image(), seed);
            let weight = r4([case.c_out, case.c_in, kernel, kernel], seed + 1);
            let bias = r1(case.c_out, seed + 2);
            let Ok(out) = conv2d::output_shape(x.shape(), weight.shape(), None, window) else {
                continue;
            };
            let (mut y, mut y_ref) = (Array4::zeros(out), Array4::zeros(out));
            conv2d::forward(
                x.view(),
                weight.view(),
                Some(bias.view()),
                window,
                y.view_mut(),
            )
            .unwrap();
            conv2d::forward_reference(
                x.view(),
                weight.view(),
                Some(bias.view()),
                window,
                y_ref.view_mut(),
            )
            .unwrap();
            assert_abs_diff_eq!(y, y_ref, epsilon = TOL);

            let dy = r4(out, seed + 3);
            let (mut dx, mut dw, mut db) = (
                r4(case.image(), 1),
                r4(weight.dim().into(), 2),
                r1(case.c_out, 3),
            );
            let (mut dx_ref, mut dw_ref, mut db_ref) = (dx.clone(), dw.clone(), db.clone());
            conv2d::backward(
                x.view(),
                weight.view(),
                window,
                dy.view(),
                Some(dx.view_mut()),
                Some(dw.view_mut()),
                Some(db.view_mut()),
            )
            .unwrap();
            conv2d::backward_reference(
                x.view(),
                weight.view(),
                window,
                dy.view(),
                Some(dx_ref.view_mut()),
                Some(dw_ref.view_mut()),
                Some(db_ref.view_mut()),
            )
            .unwrap();
            assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);
            assert_abs_diff_eq!(dw, dw_ref, epsilon = TOL);
            assert_abs_diff_eq!(db, db_ref, epsilon = TOL);
        }
    }
}

/// With K = 1 and no padding, a K×K convolution is a 1×1 convolution: same outputs, same
/// gradients, once the weight (F1, F, 1, 1) is read as (F1, F).
#[test]
fn conv2d_with_a_1x1_kernel_equals_conv1x1() {
    use pointwise::ops::{conv2d, Window};
    for (i, case) in CASES.iter().enumerate() {
        let x = r4(case.image(), i as u64);
        let weight = r2([case.c_out, case.c_in], 50 + i as u64);
        let weight4 = weight
            .clone()
            .into_shape_with_order((case.c_out, case.c_in, 1, 1))
            .unwrap();
        let bias = r1(case.c_out, 60 + i as u64);
        let out = [case.batch, case.c_out, case.height, case.width];
        let (mut y1, mut yk) = (Array4::zeros(out), Array4::zeros(out));
        conv1x1::forward(x.view(), weight.view(), Some(bias.view()), y1.view_mut()).unwrap();
        conv2d::forward(
            x.view(),
            weight4.view(),
            Some(bias.view()),
            Window::UNIT,
            yk.view_mut(),
        )
        .unwrap();
        assert_abs_diff_eq!(y1, yk, epsilon = TOL);
        let dy = r4(out, 70 + i as u64);
        let (mut dx1, mut dxk) = (Array4::zeros(x.dim()), Array4::zeros(x.dim()));
        let (mut dw1, mut dwk) = (Array2::zeros(weight.dim()), Array4::zeros(weight4.dim()));
        conv1x1::backward(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx1.view_mut()),
            Some(dw1.view_mut()),
            None,
        )
        .unwrap();
        conv2d::backward(
            x.view(),
            weight4.view(),
            Window::UNIT,
            dy.view(),
            Some(dxk.view_mut()),
            Some(dwk.view_mut()),
            None,
        )
        .unwrap();
        assert_abs_diff_eq!(dx1, dxk, epsilon = TOL);
        assert_abs_diff_eq!(
            dw1,
            dwk.into_shape_with_order(weight.dim()).unwrap(),
            epsilon = TOL
        );
    }
}

/// The f32 path runs the crate's own GEMM kernels (where the CPU has AVX-512); it must match the
/// same reference loops, within f32 rounding (relative 1e-5 of the values' scale).
#[test]
fn conv1x1_f32_fast_path_matches_reference_loops() {
    let cases = [
        (1, 3, 5, 2, 3),
        (2, 7, 3, 3, 2),
        (3, 256, 64, 5, 7),
        (2, 64, 256, 9, 4),
        (1, 17, 33, 1, 1),
        // 7×7 maps run in groups of 10 samples: on 1 or 2 threads, two groups per thread,
        // the second partial.
        (25, 6, 5, 7, 7),
        // dW of small maps in groups too: 5×5 maps in groups of 20 samples (20, 20, 5), a
        // projection (dW's terms transposed) and an expansion; 3×3 maps, 56 a group.
        (45, 40, 24, 5, 5),
        (45, 24, 40, 5, 5),
        (130, 20, 70, 3, 3),
        // 72 pixels: one product per sample.
        (2, 5, 4, 9, 8),
        // From 64 to 255 pixels, the forward pass and dX are one packed product over the
        // samples' columns side by side: 14×14 maps (a 16-column panel takes its first 4
        // columns from one sample and 12 from the next), depth 700 in two blocks, 13 output
        // channels (a last row tile of one row); a batch of one; 68 pixels (a last panel of
        // 4 columns).
        (3, 700, 13, 14, 14),
        (1, 40, 70, 14, 14),
        (4, 7, 40, 4, 17),
        // From 256 pixels, sample by sample: a projection (dW's terms transposed), an
        // expansion, and more output channels than pixels (two samples a slot of dW's sum, the
        // last slot one).
        (2, 96, 24, 16, 17),
        (1, 16, 96, 20, 20),
        (3, 4, 300, 16, 16),
        // From 256 pixels with 64 channels or more on both sides, the three products apart:
        // odd channel counts and map, and a batch of one.
        (2, 65, 70, 16, 17),
        (1, 80, 64, 17, 16),
    ];
    for (i, &(batch, c_in, c_out, height, width)) in cases.iter().enumerate() {
        let seed = 10 * i as u64;
        let f32s = |a: ArrayD<f64>| a.mapv(|v| v as f32);
        let x = f32s(random(&[batch, c_in, height, width], seed))
            .into_dimensionality::<Ix4>()
            .unwrap();
        let weight = f32s(random(&[c_out, c_in], seed + 1))
            .into_dimensionality::<Ix2>()
            .unwrap();
        let bias = f32s(random(&[c_out], seed + 2))
            .into_dimensionality::<Ix1>()
            .unwrap();
        let out = (batch, c_out, height, width);
        let (mut y, mut y_ref) = (Array4::<f32>::zeros(out), Array4::<f32>::zeros(out));
        conv1x1::forward(x.view(), weight.view(), Some(bias.view()), y.view_mut()).unwrap();
        conv1x1::forward_reference(x.view(), weight.view(), Some(bias.view()), y_ref.view_mut())
            .unwrap();
        let tolerance = 1e-5 * (c_in as f32).sqrt();
        assert_abs_diff_eq!(y, y_ref, epsilon = tolerance);

        let dy = f32s(random(&[batch, c_out, height, width], seed + 3))
            .into_dimensionality::<Ix4>()
            .unwrap();
        let (mut dx, mut dw, mut db) = (
            Array4::<f32>::ones(x.dim()),
            Array2::<f32>::ones(weight.dim()),
            Array1::<f32>::ones(c_out),
        );
        let (mut dx_ref, mut dw_ref, mut db_ref) = (dx.clone(), dw.clone(), db.clone());
        conv1x1::backward(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx.view_mut()),
            Some(dw.view_mut()),
            Some(db.view_mut()),
        )
        .unwrap();
        conv1x1::backward_reference(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx_ref.view_mut()),
            Some(dw_ref.view_mut()),
            Some(db_ref.view_mut()),
        )
        .unwrap();
        let pixels = (batch * height * width) as f32;
        assert_abs_diff_eq!(dx, dx_ref, epsilon = 1e-5 * (c_out as f32).sqrt());
        assert_abs_diff_eq!(dw, dw_ref, epsilon = 1e-5 * pixels.sqrt());
        assert_abs_diff_eq!(db, db_ref, epsilon = 1e-5 * pixels.sqrt());
    }
}

/// The fused conv1x1 + ReLU against the reference loops followed by the ReLU's reference, in
/// f64 and in f32 (the crate's GEMM kernels apply the ReLU as they store).
#[test]
fn conv1x1_relu_fused_path_matches_the_two_reference_ops() {
    fn check<T: pointwise::Element>(case: &common::Case, seed: u64, tolerance: f64) {
        let cast = |a: ArrayD<f64>| a.mapv(T::from_f64);
        let x = cast(random(&case.image(), seed))
            .into_dimensionality::<Ix4>()
            .unwrap();
        let weight = cast(random(&[case.c_out, case.c_in], seed + 1))
            .into_dimensionality::<Ix2>()
            .unwrap();
        let bias = cast(random(&[case.c_out], seed + 2))
            .into_dimensionality::<Ix1>()
            .unwrap();
        let out = (case.batch, case.c_out, case.height, case.width);
        // The fused node as the tape runs it.
        let mut graph = pointwise::Graph::<T>::new();
        let x_node = graph.input_with_grad("x");
        let w_node = graph.param("w", weight.clone().into_dyn()).unwrap();
        let b_node = graph.param("b", bias.clone().into_dyn()).unwrap();
        let y_node = graph.conv1x1_relu(x_node, w_node, Some(b_node)).unwrap();
        graph.set_input(x_node, x.view().into_dyn()).unwrap();
        graph.forward(y_node).unwrap();
        let y = graph.value(y_node).unwrap().to_owned();
        let mut z = Array4::<T>::zeros(out);
        conv1x1::forward_reference(x.view(), weight.view(), Some(bias.view()), z.view_mut())
            .unwrap();
        let mut y_ref = ArrayD::<T>::zeros(IxDyn(&[out.0, out.1, out.2, out.3]));
        relu::forward_reference(Relu::Plain, z.view().into_dyn(), y_ref.view_mut()).unwrap();
        for (a, b) in y.iter().zip(y_ref.iter()) {
            assert!(
                (a.as_f64() - b.as_f64()).abs() <= tolerance,
                "{case:?}: {a} vs {b}"
            );
        }
        let dy = cast(random(&[out.0, out.1, out.2, out.3], seed + 3))
            .into_dimensionality::<Ix4>()
            .unwrap();
        graph.backward_from(y_node, dy.view().into_dyn()).unwrap();
        let grad = |node| graph.grad(node).unwrap().to_owned();
        let (dx, dw, db) = (grad(x_node), grad(w_node), grad(b_node));
        let (mut dx_ref, mut dw_ref, mut db_ref) = (
            Array4::<T>::zeros(x.dim()),
            Array2::<T>::zeros(weight.dim()),
            Array1::<T>::zeros(case.c_out),
        );
        let mut dz = ArrayD::<T>::zeros(IxDyn(&[out.0, out.1, out.2, out.3]));
        relu::backward_reference(
            Relu::Plain,
            z.view().into_dyn(),
            dy.view().into_dyn(),
            dz.view_mut(),
        )
        .unwrap();
        let dz = dz.into_dimensionality::<Ix4>().unwrap();
        conv1x1::backward_reference(
            x.view(),
            weight.view(),
            dz.view(),
            Some(dx_ref.view_mut()),
            Some(dw_ref.view_mut()),
            Some(db_ref.view_mut()),
        )
        .unwrap();
        for (got, want) in [
            (dx, dx_ref.into_dyn()),
            (dw, dw_ref.into_dyn()),
            (db, db_ref.into_dyn()),
        ] {
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (a.as_f64() - b.as_f64()).abs() <= tolerance * 10.0,
                    "{case:?}: {a} vs {b}"
                );
            }
        }
    }
    for (i, case) in CASES.iter().enumerate() {
        check::<f64>(case, 500 + i as u64, TOL);
        check::<f32>(case, 600 + i as u64, 1e-5);
    }
    let big = common::Case {
        batch: 3,
        c_in: 256,
        c_out: 64,
        height: 5,
        width: 7,
    };
    check::<f32>(&big, 700, 1e-4);
    // 14×14 maps: the packed product over the batch, its ReLU on the last depth block only.
    let deep = common::Case {
        batch: 3,
        c_in: 700,
        c_out: 13,
        height: 14,
        width: 14,
    };
    check::<f32>(&deep, 701, 1e-4);
}

/// Overwriting a gradient (the tape's first contribution to a buffer) must give exactly what
/// accumulating into a zeroed buffer gives, whatever the buffer held (NaN here).
#[test]
fn overwriting_backward_passes_equal_accumulating_into_zeros() {
    for (i, case) in CASES.iter().enumerate() {
        let x = r4(case.image(), i as u64);
        let weight = r2([case.c_out, case.c_in], 10 + i as u64);
        let dy = r4(
            [case.batch, case.c_out, case.height, case.width],
            20 + i as u64,
        );
        let mut accumulated = Array4::zeros(x.dim());
        conv1x1::backward(
            x.view(),
            weight.view(),
            dy.view(),
            Some(accumulated.view_mut()),
            None,
            None,
        )
        .unwrap();
        let mut overwritten = Array4::from_elem(x.dim(), f64::NAN);
        conv1x1::input_gradient(
            weight.view(),
            dy.view(),
            overwritten.view_mut(),
            pointwise::ops::GradWrite::Overwrite,
        )
        .unwrap();
        assert_eq!(accumulated, overwritten, "conv1x1 {case:?}");
    }
}

/// The same for depthwise's dx, on every path that writes it: stride 1 (as a convolution of
/// dy, and by the scatter when the padding is as wide as the kernel), stride 2 with even and
/// odd padding and rows of odd length, stride 3, and a channel multiplier of 2.
#[test]
fn depthwise_overwriting_input_gradient_equals_accumulating_into_zeros() {
    use pointwise::ops::depthwise::{self, Window};
    use pointwise::ops::GradWrite;
    for (i, (n, c, m, k, stride, padding, h, w)) in [
        (2, 3, 1, 3, 1, 1, 9, 19),
        (1, 2, 2, 1, 1, 1, 3, 4),
        (1, 2, 1, 3, 2, 1, 8, 17),
        (1, 2, 2, 3, 2, 0, 5, 7),
        (2, 4, 3, 5, 2, 2, 6, 3),
        (1, 2, 1, 3, 2, 1, 3, 1),
        (1, 2, 1, 3, 3, 1, 10, 8),
    ]
    .into_iter()
    .enumerate()
    {
        let window = Window { stride, padding };
        let weight = r4([c * m, 1, k, k], 160 + i as u64);
        let out = depthwise::output_shape(&[n, c, h, w], weight.shape(), window).unwrap();
        let dy = r4(out, 170 + i as u64);
        let mut accumulated = Array4::zeros((n, c, h, w));
        let write = GradWrite::Accumulate;
        depthwise::input_gradient(
            weight.view(),
            window,
            dy.view(),
            accumulated.view_mut(),
            write,
        )
        .unwrap();
        let mut overwritten = Array4::from_elem((n, c, h, w), f64::NAN);
        let write = GradWrite::Overwrite;
        depthwise::input_gradient(
            weight.view(),
            window,
            dy.view(),
            overwritten.view_mut(),
            write,
        )
        .unwrap();
        assert_eq!(accumulated, overwritten, "depthwise {window:?} case {i}");
    }
}

#[test]
fn flatten_matches_reference_loops() {
    for (i, case) in CASES.iter().enumerate() {
        let x = random(&case.image(), i as u64);
        let out = pointwise::ops::flatten::output_shape(x.shape()).unwrap();
        let (mut y, mut y_ref) = (ArrayD::zeros(IxDyn(&out)), ArrayD::zeros(IxDyn(&out)));
        pointwise::ops::flatten::forward(x.view(), y.view_mut()).unwrap();
        pointwise::ops::flatten::forward_reference(x.view(), y_ref.view_mut()).unwrap();
        assert_eq!(y, y_ref, "{case:?}");
        let dy = random(&out, 100 + i as u64);
        let (mut dx, mut dx_ref) = (random(&case.image(), 7), random(&case.image(), 7));
        pointwise::ops::flatten::backward(dy.view(), dx.view_mut()).unwrap();
        pointwise::ops::flatten::backward_reference(dy.view(), dx_ref.view_mut()).unwrap();
        assert_eq!(dx, dx_ref, "{case:?}");
    }
    assert!(pointwise::ops::flatten::output_shape(&[4]).is_err());
}

#[test]
fn relu6_global_max_pool_concat_and_channel_shuffle_match_reference_loops() {
    use pointwise::ops::{channel_shuffle, concat, global_max_pool};
    for (i, case) in CASES.iter().enumerate() {
        let x = r4(case.image(), i as u64).mapv(|v| 8.0 * v);
        let (mut y, mut y_ref) = (ArrayD::zeros(x.shape()), ArrayD::zeros(x.shape()));
        relu::forward(Relu::Six, x.view().into_dyn(), y.view_mut()).unwrap();
        relu::forward_reference(Relu::Six, x.view().into_dyn(), y_ref.view_mut()).unwrap();
        assert_eq!(y, y_ref, "relu6 {case:?}");
        let dy = random(x.shape(), 40 + i as u64);
        let (mut dx, mut dx_ref) = (random(x.shape(), 41), random(x.shape(), 41));
        relu::backward(Relu::Six, x.view().into_dyn(), dy.view(), dx.view_mut()).unwrap();
        relu::backward_reference(Relu::Six, x.view().into_dyn(), dy.view(), dx_ref.view_mut())
            .unwrap();
        assert_eq!(dx, dx_ref, "relu6 {case:?}");

        let x = distinct_values(&case.image(), i as u64, 0.01)
            .into_dimensionality::<Ix4>()
            .unwrap();
        let out = (case.batch, case.c_in);
        let (mut y, mut y_ref) = (Array2::zeros(out), Array2::zeros(out));
        let mut argmax = vec![0; case.batch * case.c_in];
        global_max_pool::forward(x.view(), y.view_mut(), &mut argmax).unwrap();
        let argmax_ref = global_max_pool::forward_reference(x.view(), y_ref.view_mut()).unwrap();
        assert_eq!(
            (&y, &argmax),
            (&y_ref, &argmax_ref),
            "global_max_pool {case:?}"
        );
        let dy = r2([case.batch, case.c_in], 50 + i as u64);
        let (mut dx, mut dx_ref) = (r4(case.image(), 51), r4(case.image(), 51));
        global_max_pool::backward(dy.view(), &argmax, dx.view_mut()).unwrap();
        global_max_pool::backward_reference(x.view(), dy.view(), dx_ref.view_mut()).unwrap();
        assert_eq!(dx, dx_ref, "global_max_pool {case:?}");

        let [n, c, h, w] = case.image();
        let parts = [
            r4([n, c, h, w], 60),
            r4([n, 1, h, w], 61),
            r4([n, 3, h, w], 62),
        ];
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        let (mut y, mut y_ref) = (
            Array4::zeros((n, c + 4, h, w)),
            Array4::zeros((n, c + 4, h, w)),
        );
        concat::forward(&views, y.view_mut()).unwrap();
        concat::forward_reference(&views, y_ref.view_mut()).unwrap();
        assert_eq!(y, y_ref, "concat {case:?}");
        let dy = r4([n, c + 4, h, w], 63);
        let mut dxs = [
            r4([n, c, h, w], 64),
            r4([n, 1, h, w], 65),
            r4([n, 3, h, w], 66),
        ];
        let mut dxs_ref = dxs.clone();
        concat::backward(
            dy.view(),
            &mut dxs.iter_mut().map(|d| d.view_mut()).collect::<Vec<_>>(),
        )
        .unwrap();
        concat::backward_reference(
            dy.view(),
            &mut dxs_ref.iter_mut().map(|d| d.view_mut()).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(dxs, dxs_ref, "concat {case:?}");
        let too_few = Array4::zeros((n, c + 3, h, w));
        assert!(concat::forward(&views, too_few.clone().view_mut()).is_err());

        for groups in (1..=c).filter(|g| c % g == 0) {
            let x = r4(case.image(), 70 + i as u64);
            let (mut y, mut y_ref) = (Array4::zeros(x.dim()), Array4::zeros(x.dim()));
            channel_shuffle::forward(x.view(), groups, y.view_mut()).unwrap();
            channel_shuffle::forward_reference(x.view(), groups, y_ref.view_mut()).unwrap();
            assert_eq!(y, y_ref, "channel_shuffle g{groups} {case:?}");
            let (mut dx, mut dx_ref) = (r4(case.image(), 71), r4(case.image(), 71));
            channel_shuffle::backward(y.view(), groups, dx.view_mut()).unwrap();
            channel_shuffle::backward_reference(y.view(), groups, dx_ref.view_mut()).unwrap();
            assert_eq!(dx, dx_ref, "channel_shuffle g{groups} {case:?}");
        }
    }
}

/// ShuffleNet's shuffle on 2 groups of 3 channels: (0 1 2 | 3 4 5) → (0 3 1 4 2 5).
#[test]
fn channel_shuffle_interleaves_the_groups() {
    let x = Array4::from_shape_fn((1, 6, 1, 1), |(_, c, _, _)| c as f64);
    let mut y = Array4::zeros((1, 6, 1, 1));
    pointwise::ops::channel_shuffle::forward(x.view(), 2, y.view_mut()).unwrap();
    assert_eq!(
        y.iter().copied().collect::<Vec<_>>(),
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    );
    assert!(pointwise::ops::channel_shuffle::output_shape(&[1, 6, 1, 1], 4).is_err());
}

/// Batch norm through the tape against the reference loops: training-mode output and
/// gradients (the O(M²) double sum of the derivation), the running statistics after two steps
/// (momentum 0.1, unbiased variance), and evaluation mode on a batch of 1.
#[test]
fn batch_norm_matches_reference_loops_and_pytorch_semantics() {
    use pointwise::ops::batch_norm;
    for (i, case) in CASES.iter().enumerate() {
        let [n, c, h, w] = case.image();
        if n * h * w < 2 {
            continue;
        }
        let x = r4(case.image(), 80 + i as u64);
        let gamma = random(&[c], 81 + i as u64) + 1.5;
        let beta = random(&[c], 82 + i as u64);
        let mut graph = pointwise::Graph::<f64>::new();
        let x_node = graph.input_with_grad("x");
        let g_node = graph.param("bn.weight", gamma.clone()).unwrap();
        let b_node = graph.param("bn.bias", beta.clone()).unwrap();
        let y_node = graph.batch_norm(x_node, g_node, b_node).unwrap();
        graph.set_input(x_node, x.view().into_dyn()).unwrap();
        graph.forward(y_node).unwrap();
        let (gamma, beta) = (
            gamma.into_dimensionality::<Ix1>().unwrap(),
            beta.into_dimensionality::<Ix1>().unwrap(),
        );
        let (y_ref, mean, var) =
            batch_norm::forward_reference(x.view(), gamma.view(), beta.view()).unwrap();
        assert_abs_diff_eq!(graph.value(y_node).unwrap(), y_ref.view(), epsilon = TOL);

        let dy = r4(case.image(), 83 + i as u64);
        graph.backward_from(y_node, dy.view().into_dyn()).unwrap();
        let (dx_ref, dgamma_ref, dbeta_ref) =
            batch_norm::backward_reference(x.view(), gamma.view(), dy.view()).unwrap();
        assert_abs_diff_eq!(graph.grad(x_node).unwrap(), dx_ref.view(), epsilon = 1e-11);
        assert_abs_diff_eq!(
            graph.grad(g_node).unwrap(),
            dgamma_ref.into_dyn().view(),
            epsilon = 1e-11
        );
        assert_abs_diff_eq!(
            graph.grad(b_node).unwrap(),
            dbeta_ref.into_dyn().view(),
            epsilon = 1e-11
        );

        // Two training steps: running ← 0.9·running + 0.1·batch, with the unbiased variance.
        graph.forward(y_node).unwrap();
        let unbiased = (n * h * w) as f64 / (n * h * w - 1) as f64;
        let (running_mean, running_var, tracked) = graph.running_stats(y_node).unwrap();
        let expected_mean = mean.mapv(|m| 0.9 * (0.1 * m) + 0.1 * m);
        let expected_var = var.mapv(|v| 0.9 * (0.9 + 0.1 * v * unbiased) + 0.1 * v * unbiased);
        assert_abs_diff_eq!(running_mean, expected_mean.view(), epsilon = TOL);
        assert_abs_diff_eq!(running_var, expected_var.view(), epsilon = TOL);
        assert_eq!(tracked, 2);

        // Evaluation mode: the running statistics, on one sample; the statistics do not move.
        graph.set_training(false);
        let sample = x.slice(ndarray::s![0..1, .., .., ..]).to_owned();
        graph.set_input(x_node, sample.view().into_dyn()).unwrap();
        graph.forward(y_node).unwrap();
        let y = graph.value(y_node).unwrap().to_owned();
        for ((index, &got), _) in y.indexed_iter().zip(0..) {
            let ch = index[1];
            let want = gamma[ch] * (sample[[0, ch, index[2], index[3]]] - expected_mean[ch])
                / (expected_var[ch] + 1e-5).sqrt()
                + beta[ch];
            assert!((got - want).abs() < TOL, "eval {case:?}: {got} vs {want}");
        }
        assert_eq!(graph.running_stats(y_node).unwrap().2, 2);
    }
}

/// The public passes check every per-channel vector they index: a wrong length is a typed
/// error, not a panic.
/// The batch statistics in f32 of values with a large mean and a small spread (1000 ± 0.05):
/// the squared deviations from the mean keep the variance's digits, where E[x²] − μ² would
/// lose all of them (x² ≈ 10⁶ carries no digit below 0.06 in f32).
#[test]
fn batch_norm_statistics_keep_a_small_variance_under_a_large_mean() {
    use pointwise::ops::batch_norm;
    let x64 = r4([5, 2, 28, 28], 170).mapv(|v| 1000.0 + 0.1 * v);
    let x32 = x64.mapv(|v| v as f32);
    let (mut mean, mut var) = (Array1::<f32>::zeros(2), Array1::<f32>::zeros(2));
    batch_norm::statistics(x32.view(), mean.view_mut(), var.view_mut()).unwrap();
    for c in 0..2 {
        let channel = x32.index_axis(ndarray::Axis(1), c).mapv(f64::from);
        let mu = channel.mean().unwrap();
        let sigma2 = channel.mapv(|v| (v - mu) * (v - mu)).mean().unwrap();
        assert!(
            (f64::from(mean[c]) - mu).abs() < 1e-4,
            "mean {} against {mu}",
            mean[c]
        );
        let relative = (f64::from(var[c]) - sigma2).abs() / sigma2;
        assert!(relative < 1e-3, "variance {} against {sigma2}", var[c]);
    }
}

#[test]
fn batch_norm_passes_refuse_statistics_of_the_wrong_length() {
    use pointwise::ops::batch_norm;
    let x = r4([2, 3, 2, 2], 1);
    let (gamma, beta, ones) = (Array1::ones(3), Array1::zeros(3), Array1::ones(3));
    let short = Array1::zeros(2);
    let mut y = Array4::zeros((2, 3, 2, 2));
    let (g, b) = (gamma.view(), beta.view());
    let forward = batch_norm::forward(x.view(), g, b, short.view(), ones.view(), y.view_mut());
    assert!(matches!(
        forward,
        Err(pointwise::Error::ShapeMismatch { .. })
    ));
    let saved = batch_norm::Saved {
        mean: ones.view(),
        inv_std: short.view(),
        batch_statistics: true,
    };
    let backward = batch_norm::backward(x.view(), g, saved, x.view(), None, None, None);
    assert!(matches!(
        backward,
        Err(pointwise::Error::ShapeMismatch { .. })
    ));
}

#[test]
fn batch_norm_in_training_mode_refuses_one_value_per_channel() {
    let mut graph = pointwise::Graph::<f64>::new();
    let x = graph.input("x");
    let gamma = graph.param("g", ArrayD::ones(IxDyn(&[2]))).unwrap();
    let beta = graph.param("b", ArrayD::zeros(IxDyn(&[2]))).unwrap();
    let y = graph.batch_norm(x, gamma, beta).unwrap();
    graph
        .set_input(x, ArrayD::ones(IxDyn(&[1, 2, 1, 1])).view())
        .unwrap();
    assert!(matches!(
        graph.forward(y),
        Err(pointwise::Error::InvalidShape {
            op: "batch_norm",
            ..
        })
    ));
    graph.set_training(false);
    graph.forward(y).unwrap();
    let wrong = graph.param("wrong", ArrayD::ones(IxDyn(&[3]))).unwrap();
    assert!(graph.batch_norm(x, wrong, beta).is_err());
}

/// A 1×1 and a 3×3 convolution followed by an evaluation-mode batch norm equal the folded
/// convolution alone.
#[test]
fn folding_batch_norm_into_a_convolution_gives_the_same_outputs() {
    use pointwise::ops::batch_norm::fold_into_convolution;
    for (kernel, with_bias) in [(None, true), (None, false), (Some(3), true)] {
        let (c_in, c_out) = (4, 5);
        let weight_shape: Vec<usize> = match kernel {
            None => vec![c_out, c_in],
            Some(k) => vec![c_out, c_in, k, k],
        };
        let build =
            |graph: &mut pointwise::Graph<f64>, weight: ArrayD<f64>, bias: Option<ArrayD<f64>>| {
                let x = graph.input("x");
                let w = graph.param("w", weight).unwrap();
                let b = bias.map(|b| graph.param("b", b).unwrap());
                let y = match kernel {
                    None => graph.conv1x1(x, w, b).unwrap(),
                    Some(_) => graph.conv2d(x, w, b, 1, 1).unwrap(),
                };
                (x, y)
            };
        let weight = random(&weight_shape, 90);
        let bias = with_bias.then(|| random(&[c_out], 91));
        let stats: Vec<ndarray::Array1<f64>> = (0..4)
            .map(|k| random(&[c_out], 92 + k).into_dimensionality().unwrap())
            .collect();
        let (gamma, beta, mean) = (stats[0].clone() + 1.5, stats[1].clone(), stats[2].clone());
        let var = stats[3].mapv(|v| v + 1.2);

        let mut unfolded = pointwise::Graph::<f64>::new();
        let (x, conv) = build(&mut unfolded, weight.clone(), bias.clone());
        let g = unfolded
            .param("bn.weight", gamma.clone().into_dyn())
            .unwrap();
        let b = unfolded.param("bn.bias", beta.clone().into_dyn()).unwrap();
        let y = unfolded.batch_norm(conv, g, b).unwrap();
        unfolded
            .set_running_stats(y, mean.view(), var.view(), 1)
            .unwrap();
        unfolded.set_training(false);
        let input = random(&[2, c_in, 5, 6], 99);
        unfolded.set_input(x, input.view()).unwrap();
        unfolded.forward(y).unwrap();

        let (w_folded, b_folded) = fold_into_convolution(
            weight.view(),
            bias.as_ref()
                .map(|b| b.view().into_dimensionality().unwrap()),
            [gamma.view(), beta.view(), mean.view(), var.view()],
            1e-5,
        )
        .unwrap();
        let mut folded = pointwise::Graph::<f64>::new();
        let (x, y_folded) = build(&mut folded, w_folded, Some(b_folded.into_dyn()));
        folded.set_input(x, input.view()).unwrap();
        folded.forward(y_folded).unwrap();
        assert_abs_diff_eq!(
            folded.value(y_folded).unwrap(),
            unfolded.value(y).unwrap(),
            epsilon = 1e-12
        );
    }
}

#[test]
fn depthwise_matches_reference_loops() {
    use pointwise::ops::depthwise::{self, Window};
    for (i, (n, c, m, k, stride, padding, h, w)) in [
        (1, 3, 1, 3, 1, 1, 5, 4),
        // Rows of 19 and 17: the eight-lane sums with a remainder, at stride 1 and 2.
        (2, 3, 1, 3, 1, 1, 9, 19),
        (1, 2, 1, 3, 2, 1, 8, 17),
        (2, 5, 1, 3, 2, 1, 7, 5),
        (1, 2, 2, 3, 2, 0, 5, 7),
        (3, 3, 1, 1, 1, 0, 1, 1),
        (2, 4, 3, 5, 2, 2, 6, 3),
        // Stride 3: three phases of columns and of rows.
        (1, 2, 1, 3, 3, 1, 10, 8),
        // Padding as wide as the kernel: dx by the scatter at stride 1 too.
        (1, 2, 2, 1, 1, 1, 3, 4),
        // Stride 2 on one-column maps: the row's pairs are all remainder (padding odd, then
        // wider than the map).
        (1, 2, 1, 3, 2, 1, 3, 1),
        (2, 1, 2, 1, 2, 3, 2, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let window = Window { stride, padding };
        let x = r4([n, c, h, w], 110 + i as u64);
        let weight = r4([c * m, 1, k, k], 111 + i as u64);
        let bias = r1(c * m, 112);
        let out = depthwise::output_shape(x.shape(), weight.shape(), window).unwrap();
        let dy = r4(out, 113 + i as u64);
        // Gradients start non-zero: the passes add to them.
        let start = (
            r4([n, c, h, w], 1),
            r4([c * m, 1, k, k], 2),
            Array1::ones(c * m),
        );
        let fast = depthwise_passes(&x, &weight, &bias, window, &dy, start.clone(), false);
        let reference = depthwise_passes(&x, &weight, &bias, window, &dy, start, true);
        for (fast, reference) in fast.into_iter().zip(reference) {
            assert_abs_diff_eq!(fast, reference, epsilon = TOL);
        }
    }
    let window = Window {
        stride: 1,
        padding: 0,
    };
    assert!(depthwise::output_shape(&[1, 3, 2, 2], &[3, 1, 3, 3], window).is_err());
    assert!(depthwise::output_shape(&[1, 3, 4, 4], &[4, 1, 3, 3], window).is_err());
}

/// The f32 passes (on CPUs with AVX2 and FMA a 3×3 kernel runs on eight-lane vectors with
/// fused multiply-adds) against the f64 reference loops on the same values: MobileNet's 3×3
/// at stride 1 and 2 on maps whose rows are not a multiple of 8, a channel multiplier of 2,
/// and a 5×5 kernel (the generic loops). Tolerance 1e-5·(1 + |reference|): f32 rounding over
/// at most a few hundred terms.
#[test]
fn depthwise_f32_matches_reference_loops() {
    use pointwise::ops::depthwise::{self, Window};
    for (i, (n, c, m, k, stride, padding, h, w)) in [
        (2, 3, 1, 3, 1, 1, 13, 17),
        (1, 4, 1, 3, 2, 1, 14, 14),
        (2, 2, 1, 3, 2, 1, 9, 15),
        (1, 2, 2, 3, 1, 1, 8, 8),
        (1, 3, 1, 5, 1, 2, 9, 11),
    ]
    .into_iter()
    .enumerate()
    {
        let window = Window { stride, padding };
        let single = |a: &Array4<f64>| a.mapv(|v| v as f32);
        let x = single(&r4([n, c, h, w], 130 + i as u64));
        let weight = single(&r4([c * m, 1, k, k], 131 + i as u64));
        let bias = r1(c * m, 132).mapv(|v| v as f32);
        let out = depthwise::output_shape(x.shape(), weight.shape(), window).unwrap();
        let dy = single(&r4(out, 133 + i as u64));
        let zeros = (
            Array4::zeros(x.dim()),
            Array4::zeros(weight.dim()),
            Array1::zeros(c * m),
        );
        let fast = depthwise_passes(&x, &weight, &bias, window, &dy, zeros, false);
        // The reference on the same values, in f64.
        let double = |a: &Array4<f32>| a.mapv(f64::from);
        let (x, weight, dy) = (double(&x), double(&weight), double(&dy));
        let bias = bias.mapv(f64::from);
        let zeros = (
            Array4::zeros(x.dim()),
            Array4::zeros(weight.dim()),
            Array1::zeros(c * m),
        );
        let reference = depthwise_passes(&x, &weight, &bias, window, &dy, zeros, true);
        let named = ["y", "dx", "dW", "db"]
            .iter()
            .zip(fast.into_iter().zip(reference));
        for (what, (fast, reference)) in named {
            for (a, b) in fast.iter().zip(reference.iter()) {
                let tolerance = 1e-5 * (1.0 + b.abs());
                assert!(
                    (f64::from(*a) - b).abs() <= tolerance,
                    "{what}: {a} against {b}"
                );
            }
        }
    }
}

/// y, then dx, dW and db added to `start`, by the fast passes or the reference loops.
fn depthwise_passes<T: pointwise::Element>(
    x: &Array4<T>,
    weight: &Array4<T>,
    bias: &Array1<T>,
    window: pointwise::ops::depthwise::Window,
    dy: &Array4<T>,
    start: (Array4<T>, Array4<T>, Array1<T>),
    reference: bool,
) -> [ArrayD<T>; 4] {
    use pointwise::ops::depthwise;
    let out = depthwise::output_shape(x.shape(), weight.shape(), window).unwrap();
    let (mut y, (mut dx, mut dw, mut db)) = (Array4::zeros(out), start);
    let (x, weight, bias, dy) = (x.view(), weight.view(), Some(bias.view()), dy.view());
    if reference {
        depthwise::forward_reference(x, weight, bias, window, y.view_mut()).unwrap();
        let grads = (dx.view_mut(), dw.view_mut(), db.view_mut());
        depthwise::backward_reference(x, weight, window, dy, grads.0, grads.1, grads.2).unwrap();
    } else {
        depthwise::forward(x, weight, bias, window, y.view_mut()).unwrap();
        let grads = (
            Some(dx.view_mut()),
            Some(dw.view_mut()),
            Some(db.view_mut()),
        );
        depthwise::backward(x, weight, window, dy, grads.0, grads.1, grads.2).unwrap();
    }
    [y.into_dyn(), dx.into_dyn(), dw.into_dyn(), db.into_dyn()]
}

/// The same tensor in column-major order: same values, no contiguous planes.
fn column_major(a: &Array4<f64>) -> Array4<f64> {
    use ndarray::ShapeBuilder;
    let mut f = Array4::zeros(a.dim().f());
    f.assign(a);
    f
}

/// The ops whose fast paths walk contiguous planes take any layout: given column-major
/// inputs, outputs and gradient buffers they compute what they compute on standard ones.
#[test]
fn plane_walking_ops_accept_column_major_buffers() {
    use pointwise::ops::{batch_norm, conv2d, depthwise, Window};
    let window = Window {
        stride: 1,
        padding: 1,
    };
    let x = r4([2, 3, 5, 11], 150);
    let (c_out, weight, depthwise_weight) = (4, r4([4, 3, 3, 3], 151), r4([3, 1, 3, 3], 152));
    // Each op as (forward into y, backward into (dx, dW)) on the given buffers.
    type Forward<'a> = dyn Fn(&Array4<f64>, &mut Array4<f64>) + 'a;
    type Backward<'a> = dyn Fn(&Array4<f64>, &Array4<f64>, &mut Array4<f64>, &mut Array4<f64>) + 'a;
    let conv_forward: &Forward =
        &|x, y| conv2d::forward(x.view(), weight.view(), None, window, y.view_mut()).unwrap();
    let conv_backward: &Backward = &|x, dy, dx, dw| {
        let (dx, dw) = (Some(dx.view_mut()), Some(dw.view_mut()));
        conv2d::backward(x.view(), weight.view(), window, dy.view(), dx, dw, None).unwrap()
    };
    let dw_forward: &Forward = &|x, y| {
        depthwise::forward(
            x.view(),
            depthwise_weight.view(),
            None,
            window,
            y.view_mut(),
        )
        .unwrap()
    };
    let dw_backward: &Backward = &|x, dy, dx, dw| {
        let (dx, dw) = (Some(dx.view_mut()), Some(dw.view_mut()));
        depthwise::backward(
            x.view(),
            depthwise_weight.view(),
            window,
            dy.view(),
            dx,
            dw,
            None,
        )
        .unwrap()
    };
    let cases: [(&Forward, &Backward, usize, [usize; 4]); 2] = [
        (conv_forward, conv_backward, c_out, [4, 3, 3, 3]),
        (dw_forward, dw_backward, 3, [3, 1, 3, 3]),
    ];
    for (forward, backward, channels, weight_shape) in cases {
        let out = [2, channels, 5, 11];
        let dy = r4(out, 153);
        let (mut y, mut dx, mut dw) = (
            Array4::zeros(out),
            r4([2, 3, 5, 11], 154),
            r4(weight_shape, 155),
        );
        let (mut y_f, mut dx_f, mut dw_f) =
            (column_major(&y), column_major(&dx), column_major(&dw));
        forward(&x, &mut y);
        forward(&column_major(&x), &mut y_f);
        assert_abs_diff_eq!(y, y_f, epsilon = TOL);
        backward(&x, &dy, &mut dx, &mut dw);
        backward(&column_major(&x), &column_major(&dy), &mut dx_f, &mut dw_f);
        assert_abs_diff_eq!(dx, dx_f, epsilon = TOL);
        assert_abs_diff_eq!(dw, dw_f, epsilon = TOL);
    }

    let (gamma, beta) = (r1(3, 156) + 1.5, r1(3, 157));
    let (mut mean, mut var) = (Array1::zeros(3), Array1::zeros(3));
    let (y_ref, mean_ref, var_ref) =
        batch_norm::forward_reference(x.view(), gamma.view(), beta.view()).unwrap();
    let x_f = column_major(&x);
    batch_norm::statistics(x_f.view(), mean.view_mut(), var.view_mut()).unwrap();
    assert_abs_diff_eq!(mean, mean_ref, epsilon = TOL);
    assert_abs_diff_eq!(var, var_ref, epsilon = TOL);
    let inv_std = var.mapv(|v: f64| 1.0 / (v + batch_norm::EPS).sqrt());
    let mut y_f = column_major(&Array4::zeros([2, 3, 5, 11]));
    let (g, b) = (gamma.view(), beta.view());
    batch_norm::forward(
        x_f.view(),
        g,
        b,
        mean.view(),
        inv_std.view(),
        y_f.view_mut(),
    )
    .unwrap();
    assert_abs_diff_eq!(y_f.into_dyn(), y_ref, epsilon = TOL);
    let dy = r4([2, 3, 5, 11], 158);
    let (dx_ref, dgamma_ref, dbeta_ref) =
        batch_norm::backward_reference(x.view(), gamma.view(), dy.view()).unwrap();
    let (mut dx_f, mut dgamma, mut dbeta) = (
        column_major(&Array4::zeros([2, 3, 5, 11])),
        Array1::zeros(3),
        Array1::zeros(3),
    );
    let saved = batch_norm::Saved {
        mean: mean.view(),
        inv_std: inv_std.view(),
        batch_statistics: true,
    };
    batch_norm::backward(
        x_f.view(),
        gamma.view(),
        saved,
        column_major(&dy).view(),
        Some(dx_f.view_mut()),
        Some(dgamma.view_mut()),
        Some(dbeta.view_mut()),
    )
    .unwrap();
    assert_abs_diff_eq!(dx_f.into_dyn(), dx_ref, epsilon = 1e-11);
    assert_abs_diff_eq!(dgamma, dgamma_ref, epsilon = 1e-11);
    assert_abs_diff_eq!(dbeta, dbeta_ref, epsilon = 1e-11);
}

#[test]
fn grouped_conv1x1_matches_reference_loops() {
    use pointwise::ops::grouped_conv1x1;
    for (i, (n, groups, fg, f1g, h, w)) in [
        (1, 1, 3, 2, 2, 3),
        (2, 2, 3, 2, 3, 1),
        (1, 3, 1, 3, 1, 1),
        (3, 4, 5, 2, 4, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let x = r4([n, groups * fg, h, w], 120 + i as u64);
        let weight = r2([groups * f1g, fg], 121 + i as u64);
        let bias = random(&[groups * f1g], 122)
            .into_dimensionality::<Ix1>()
            .unwrap();
        let out = grouped_conv1x1::output_shape(x.shape(), weight.shape(), groups).unwrap();
        let (mut y, mut y_ref) = (Array4::zeros(out), Array4::zeros(out));
        grouped_conv1x1::forward(
            x.view(),
            weight.view(),
            Some(bias.view()),
            groups,
            y.view_mut(),
        )
        .unwrap();
        grouped_conv1x1::forward_reference(
            x.view(),
            weight.view(),
            Some(bias.view()),
            groups,
            y_ref.view_mut(),
        )
        .unwrap();
        assert_abs_diff_eq!(y, y_ref, epsilon = TOL);
        let dy = r4(out, 123 + i as u64);
        let (mut dx, mut dw, mut db) = (
            r4(x.dim().into(), 1),
            r2(weight.dim().into(), 2),
            Array1::ones(groups * f1g),
        );
        let (mut dx_ref, mut dw_ref, mut db_ref) = (dx.clone(), dw.clone(), db.clone());
        grouped_conv1x1::backward(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx.view_mut()),
            Some(dw.view_mut()),
            Some(db.view_mut()),
            groups,
        )
        .unwrap();
        grouped_conv1x1::backward_reference(
            x.view(),
            weight.view(),
            dy.view(),
            groups,
            dx_ref.view_mut(),
            dw_ref.view_mut(),
            db_ref.view_mut(),
        )
        .unwrap();
        assert_abs_diff_eq!(dx, dx_ref, epsilon = TOL);
        assert_abs_diff_eq!(dw, dw_ref, epsilon = TOL);
        assert_abs_diff_eq!(db, db_ref, epsilon = TOL);
    }
    assert!(grouped_conv1x1::output_shape(&[1, 6, 2, 2], &[4, 2], 2).is_err());
    assert!(grouped_conv1x1::output_shape(&[1, 6, 2, 2], &[3, 3], 2).is_err());
}

/// NaN goes through ReLU (plain, fused into the 1×1 convolution, and ReLU6) as in PyTorch,
/// so that NaN weights cannot produce a finite loss.
/// The fused batch norm + ReLU (and + ReLU6) gives the values of batch_norm then relu (relu6)
/// (the same bits), and their gradients w.r.t. x, γ and β up to the order of the sums, in both
/// modes, in f64 and f32, with a NaN scale propagating to its channel's outputs as in the two
/// nodes. For ReLU6, γ is large enough that outputs reach the ceiling.
#[test]
fn batch_norm_relu_equals_batch_norm_then_relu() {
    fn run<T: pointwise::Element>(
        (fused, six): (bool, bool),
        training: bool,
        x: &ArrayD<T>,
        nan_channel: Option<usize>,
    ) -> (ArrayD<T>, Vec<ArrayD<T>>) {
        let mut graph = pointwise::Graph::<T>::new();
        let input = graph.input_with_grad("x");
        let c = x.shape()[1];
        let scale = if six { 4.0 } else { 1.0 };
        let mut gamma = ArrayD::from_shape_fn(IxDyn(&[c]), |i| {
            T::from_f64(scale * (0.5 + 0.3 * i[0] as f64))
        });
        if let Some(channel) = nan_channel {
            gamma[[channel]] = T::from_f64(f64::NAN);
        }
        let beta = ArrayD::from_shape_fn(IxDyn(&[c]), |i| T::from_f64(0.2 - 0.15 * i[0] as f64));
        let g = graph.param("bn.weight", gamma).unwrap();
        let b = graph.param("bn.bias", beta).unwrap();
        let y = match (fused, six) {
            (true, false) => graph.batch_norm_relu(input, g, b).unwrap(),
            (true, true) => graph.batch_norm_relu6(input, g, b).unwrap(),
            (false, false) => {
                let z = graph.batch_norm(input, g, b).unwrap();
                graph.relu(z).unwrap()
            }
            (false, true) => {
                let z = graph.batch_norm(input, g, b).unwrap();
                graph.relu6(z).unwrap()
            }
        };
        let mean = ndarray::Array1::from_elem(c, T::from_f64(0.1));
        let var = ndarray::Array1::from_elem(c, T::from_f64(0.8));
        let bn = graph.inputs(y).unwrap()[0];
        let bn = if fused { y } else { bn };
        graph
            .set_running_stats(bn, mean.view(), var.view(), 1)
            .unwrap();
        graph.set_training(training);
        graph.set_input(input, x.view()).unwrap();
        graph.forward(y).unwrap();
        if nan_channel.is_some() {
            return (graph.value(y).unwrap().to_owned(), Vec::new());
        }
        let upstream = ArrayD::from_shape_fn(x.raw_dim(), |i| {
            T::from_f64(((i[0] * 7 + i[1] * 3 + i[2] * 5 + i[3]) % 11) as f64 / 11.0 - 0.4)
        });
        graph.backward_from(y, upstream.view()).unwrap();
        let grads = [input, g, b].map(|id| graph.grad(id).unwrap().to_owned());
        (graph.value(y).unwrap().to_owned(), grads.to_vec())
    }
    let mut capped = 0;
    for (case, six, training) in CASES
        .iter()
        .flat_map(|case| [(case, false), (case, true)])
        .flat_map(|(case, six)| [(case, six, true), (case, six, false)])
    {
        let [n, _, h, w] = case.image();
        if training && n * h * w < 2 {
            continue;
        }
        let x = random(&case.image(), 9);
        let (y_fused, grads_fused) = run((true, six), training, &x, None);
        let (y_plain, grads_plain) = run((false, six), training, &x, None);
        assert_eq!(y_fused, y_plain, "{case:?} six {six} training {training}");
        capped += y_fused.iter().filter(|&&v| v == 6.0).count();
        for (fused, plain) in grads_fused.iter().zip(&grads_plain) {
            assert_abs_diff_eq!(fused, plain, epsilon = 1e-12);
        }
        let x32 = x.mapv(|v| v as f32);
        let (y_fused, grads_fused) = run((true, six), training, &x32, None);
        let (y_plain, grads_plain) = run((false, six), training, &x32, None);
        assert_eq!(
            y_fused, y_plain,
            "f32 {case:?} six {six} training {training}"
        );
        for (fused, plain) in grads_fused.iter().zip(&grads_plain) {
            assert_abs_diff_eq!(fused, plain, epsilon = 1e-5);
        }
    }
    assert!(capped > 0, "some ReLU6 outputs reach the ceiling");
    let x = random(&[2, 3, 4, 4], 10);
    for (training, six) in [(true, false), (false, false), (true, true), (false, true)] {
        let (y, _) = run((true, six), training, &x, Some(2));
        let (nan, finite): (Vec<_>, Vec<_>) = y.indexed_iter().partition(|(i, _)| i[1] == 2);
        assert!(nan.iter().all(|(_, v)| v.is_nan()), "training {training}");
        assert!(
            finite.iter().all(|(_, v)| v.is_finite()),
            "training {training}"
        );
    }
}

#[test]
fn relu_and_fused_relu_propagate_nan() {
    for fused in [false, true] {
        let mut graph = pointwise::Graph::<f32>::new();
        let x = graph.input("x");
        let mut weight = ndarray::ArrayD::<f32>::from_elem(IxDyn(&[4, 3]), 0.5);
        weight[[1, 2]] = f32::NAN;
        let w = graph.param("w", weight).unwrap();
        let y = if fused {
            graph.conv1x1_relu(x, w, None).unwrap()
        } else {
            let z = graph.conv1x1(x, w, None).unwrap();
            graph.relu(z).unwrap()
        };
        let capped = graph.relu6(y).unwrap();
        let pooled = graph.global_avg_pool(capped).unwrap();
        let loss = graph.softmax_cross_entropy(pooled).unwrap();
        graph
            .set_input(x, ArrayD::from_elem(IxDyn(&[2, 3, 5, 5]), 1.0).view())
            .unwrap();
        graph.set_labels(loss, &[0, 1]).unwrap();
        graph.forward(loss).unwrap();
        let y = graph.value(y).unwrap();
        assert!(
            y.slice(ndarray::s![.., 1, .., ..])
                .iter()
                .all(|v| v.is_nan()),
            "fused {fused}"
        );
        assert!(
            y.slice(ndarray::s![.., 0, .., ..])
                .iter()
                .all(|v| *v == 1.5),
            "fused {fused}"
        );
        assert!(
            graph.scalar(loss).unwrap().is_nan(),
            "fused {fused}: the loss must be NaN"
        );
    }
}

/// Batch norm against PyTorch 2.15 itself (float64): training-mode output and gradients of
/// Σ r·y, the running statistics after a second training step, the evaluation-mode output.
/// The values below were printed by this script:
///
/// ```python
/// import torch
/// torch.set_default_dtype(torch.float64)
/// N, C, H, W = 2, 3, 2, 2
/// idx = torch.arange(N * C * H * W, dtype=torch.float64).reshape(N, C, H, W)
/// x = ((idx * 37) % 23) / 7 - 1.5
/// r = ((idx * 11) % 13) / 6 - 1
/// bn = torch.nn.BatchNorm2d(C)
/// with torch.no_grad():
///     bn.weight.copy_(torch.tensor([1.5, 0.5, -2.0]))
///     bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
/// x.requires_grad_(True)
/// y = bn(x)                      # step 1, training mode
/// (y * r).sum().backward()
/// bn(x.detach() * 0.5 + 0.25)    # step 2, training mode
/// bn.eval()
/// y_eval = bn(x.detach())
/// fmt = lambda t: ", ".join(repr(v) for v in t.detach().flatten().tolist())
/// print("y_train", fmt(y)); print("dx", fmt(x.grad)); print("dweight", fmt(bn.weight.grad)); print("dbias", fmt(bn.bias.grad))
/// print("running_mean", fmt(bn.running_mean)); print("running_var", fmt(bn.running_var)); print("tracked", int(bn.num_batches_tracked))
/// print("y_eval", fmt(y_eval))
/// ```
#[test]
fn batch_norm_matches_pytorch() {
    let index = |n: usize, c: usize, h: usize, w: usize| (((n * 3 + c) * 2 + h) * 2 + w) as f64;
    let x = ndarray::Array4::from_shape_fn((2, 3, 2, 2), |(n, c, h, w)| {
        (index(n, c, h, w) * 37.0) % 23.0 / 7.0 - 1.5
    });
    let r = ndarray::Array4::from_shape_fn((2, 3, 2, 2), |(n, c, h, w)| {
        (index(n, c, h, w) * 11.0) % 13.0 / 6.0 - 1.0
    });
    let mut graph = pointwise::Graph::<f64>::new();
    let input = graph.input_with_grad("x");
    let gamma = graph
        .param("bn.weight", ndarray::arr1(&[1.5, 0.5, -2.0]).into_dyn())
        .unwrap();
    let beta = graph
        .param("bn.bias", ndarray::arr1(&[0.1, -0.2, 0.3]).into_dyn())
        .unwrap();
    let y = graph.batch_norm(input, gamma, beta).unwrap();
    graph.set_input(input, x.view().into_dyn()).unwrap();
    graph.forward(y).unwrap();
    graph.backward_from(y, r.view().into_dyn()).unwrap();
    let close = |what: &str, got: ndarray::ArrayViewD<f64>, want: &[f64]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{what}: {g} vs PyTorch {w}"
            );
        }
    };
    close(
        "y (train)",
        graph.value(y).unwrap(),
        &[
            -2.0348565659908355,
            0.9170438709347642,
            -0.9806064099459786,
            1.9712940269796215,
            -0.3204821375797518,
            -1.0433749630582627,
            0.08112498768608754,
            -0.6417678377924233,
            -2.5213687075408955,
            0.017863129245910533,
            2.5570949660327167,
            -1.392821224524537,
            -0.5589063475280357,
            2.3929940893975643,
            0.49534380851682125,
            -1.4023064723639214,
            0.24176783779242322,
            -0.4811249876860876,
            0.6433749630582627,
            -0.07951786242024815,
            1.9928212245245374,
            -1.9570949660327166,
            0.5821368707540894,
            3.1213687075408956,
        ],
    );
    close(
        "dx",
        graph.grad(input).unwrap(),
        &[
            -1.4521034501256311,
            1.178314889934653,
            0.7348610226442178,
            0.1673872227017693,
            0.013603094330340354,
            -0.3030387389095751,
            -0.2894384588163744,
            0.6121279879167564,
            -0.4618080380114256,
            0.01965113270814512,
            0.5011103034277155,
            1.4345455264346212,
            -0.9978652408654557,
            -1.5653390408079044,
            1.1890992319043934,
            0.745645364613958,
            0.30152822206302826,
            -0.015113611176887146,
            -0.0015133310836864628,
            -0.3181551643236019,
            -1.4345455264346214,
            -0.5011103034277157,
            -0.019651132708144895,
            0.4618080380114254,
        ],
    );
    close(
        "dweight",
        graph.grad(gamma).unwrap(),
        &[0.20792155855329117, -1.2717558966751583, 0.5642737415081794],
    );
    close(
        "dbias",
        graph.grad(beta).unwrap(),
        &[0.16666666666666652, -1.8333333333333333, 2.6666666666666665],
    );
    graph
        .set_input(input, x.mapv(|v| v * 0.5 + 0.25).view().into_dyn())
        .unwrap();
    graph.forward(y).unwrap();
    let (mean, var, tracked) = graph.running_stats(y).unwrap();
    let (mean, var) = (mean.to_owned().into_dyn(), var.to_owned().into_dyn());
    close(
        "running_mean",
        mean.view(),
        &[
            0.017500000000000005,
            0.04499999999999999,
            0.014999999999999996,
        ],
    );
    close(
        "running_var",
        var.view(),
        &[0.9457452623906706, 0.9139358600583091, 0.9447813411078718],
    );
    assert_eq!(tracked, 2);
    graph.set_training(false);
    graph.set_input(input, x.view().into_dyn()).unwrap();
    graph.forward(y).unwrap();
    close(
        "y (eval)",
        graph.value(y).unwrap(),
        &[
            -2.240618188680732,
            0.8442163268787171,
            -1.1388915759809288,
            1.9459429395785206,
            -0.2608932758289877,
            -0.9333343586030848,
            0.11268510348995509,
            -0.559755979284142,
            -2.4616000881718274,
            0.18389227942225955,
            2.829384647016347,
            -1.2858257025744553,
            -0.6982009309010075,
            2.386633584658442,
            0.40352568179879567,
            -1.5795822210608501,
            0.26211645521753213,
            -0.41032462755656485,
            0.635694834536475,
            -0.036746248237621966,
            2.2414974542176607,
            -1.873712895373142,
            0.7717794722209452,
            3.4172718398150326,
        ],
    );
}

/// The linear layer's f32 path (one GEMM over the batch per product: on AVX-512 the SIMD
/// kernel with a transposed operand; the forward pass on at most 8 samples as dot products of
/// rows on AVX2) against the f64 reference loops, on odd shapes: batch 1, one feature, channel
/// counts that are not multiples of 8 or 16, a large batch; through the tape, so that dX's
/// first write overwrites a stale buffer.
#[test]
fn linear_in_f32_matches_the_reference_on_odd_shapes() {
    let shapes = [
        (1, 1, 1),
        (1, 17, 5),
        (2, 40, 9),
        (3, 1030, 4),
        (5, 100, 37),
        (6, 8, 3),
        (7, 33, 19),
        (8, 50, 11),
        (9, 20, 6),
        (130, 100, 70),
    ];
    for (i, &(batch, c_in, c_out)) in shapes.iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let (x, weight, bias) = (
            r2([batch, c_in], seed),
            r2([c_out, c_in], seed + 1),
            r1(c_out, seed + 2),
        );
        let dy = r2([batch, c_out], seed + 3);
        let mut y_ref = Array2::zeros((batch, c_out));
        linear::forward_reference(x.view(), weight.view(), Some(bias.view()), y_ref.view_mut())
            .unwrap();
        let (mut dx_ref, mut dw_ref, mut db_ref) = (
            Array2::zeros((batch, c_in)),
            Array2::zeros((c_out, c_in)),
            ndarray::Array1::zeros(c_out),
        );
        linear::backward_reference(
            x.view(),
            weight.view(),
            dy.view(),
            Some(dx_ref.view_mut()),
            Some(dw_ref.view_mut()),
            Some(db_ref.view_mut()),
        )
        .unwrap();
        let mut graph = pointwise::Graph::<f32>::new();
        let input = graph.input_with_grad("x");
        let w = graph
            .param("w", weight.mapv(|v| v as f32).into_dyn())
            .unwrap();
        let b = graph
            .param("b", bias.mapv(|v| v as f32).into_dyn())
            .unwrap();
        let y = graph.linear(input, w, Some(b)).unwrap();
        // A first step with other values leaves stale buffers behind.
        let stale = x.mapv(|v| (v * 3.0 + 1.0) as f32).into_dyn();
        graph.set_input(input, stale.view()).unwrap();
        graph.forward(y).unwrap();
        graph
            .backward_from(y, dy.mapv(|v| v as f32).into_dyn().view())
            .unwrap();
        graph.zero_grad();
        graph
            .set_input(input, x.mapv(|v| v as f32).into_dyn().view())
            .unwrap();
        graph.forward(y).unwrap();
        graph
            .backward_from(y, dy.mapv(|v| v as f32).into_dyn().view())
            .unwrap();
        let close = |got: ndarray::ArrayViewD<f32>, want: ndarray::ArrayViewD<f64>, what: &str| {
            let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-5 * scale,
                    "{what} {batch}×{c_in}→{c_out}: {g} vs {w}"
                );
            }
        };
        close(graph.value(y).unwrap(), y_ref.view().into_dyn(), "y");
        close(graph.grad(input).unwrap(), dx_ref.view().into_dyn(), "dx");
        close(graph.grad(w).unwrap(), dw_ref.view().into_dyn(), "dw");
        close(graph.grad(b).unwrap(), db_ref.view().into_dyn(), "db");
    }
}
