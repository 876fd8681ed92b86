//! Every backward pass against central finite differences in f64, for every input of every op
//! (x, weight, bias), on the shapes of `common::CASES`.

mod common;

use common::{away_from_zero, distinct_values, random, Case, CASES};
use ndarray::ArrayD;
use pointwise::gradcheck::{self, TensorReport};
use pointwise::{Graph, NodeId};

/// Finite-difference step: small enough that truncation (≈ ε² = 1e-12) is negligible, large
/// enough that f64 cancellation (≈ 1e-16·|f|/ε = 1e-10·|f|) is too.
const EPS: f64 = 1e-6;
/// Both error sources above are ≤ 1e-9 of the gradient scale on these graphs; a wrong index,
/// factor or missing term gives errors of order 1.
const REL_TOL: f64 = 1e-7;

fn assert_close(reports: &[TensorReport], context: &str) {
    for report in reports {
        assert!(report.elements > 0, "{context}: {report}");
        assert!(
            report.max_gradient > 0.0,
            "{context}: gradient is identically zero, nothing was checked: {report}"
        );
        assert!(
            report.max_rel_error <= REL_TOL,
            "{context}: {report} exceeds {REL_TOL:e}"
        );
    }
}

/// The backward pass runs on the whole batch, then in chunks of 1 and of 2 samples (which
/// splits a batch of 3 unevenly): each run is checked on its own.
const CHUNKS: [Option<usize>; 3] = [None, Some(1), Some(2)];

/// Checks `output` of the graph `build` makes w.r.t. the leaves it returns, for every chunking.
fn check_graph(
    context: &str,
    seed: u64,
    build: impl FnOnce(&mut Graph<f64>) -> (NodeId, Vec<NodeId>),
) {
    let mut graph = Graph::new();
    let (output, wrt) = build(&mut graph);
    check_chunked(&mut graph, output, &wrt, seed, context);
}

fn check_chunked(graph: &mut Graph<f64>, output: NodeId, wrt: &[NodeId], seed: u64, context: &str) {
    for chunk in CHUNKS {
        graph.set_backward_chunk(chunk).unwrap();
        let reports = gradcheck::check(graph, output, wrt, EPS, seed).unwrap();
        assert_eq!(reports.len(), wrt.len());
        assert_close(&reports, &format!("{context}, backward chunk {chunk:?}"));
    }
}

/// `leaf + 0`: what an op under test reads instead of the leaf itself, so that its input is
/// an intermediate node, whose gradient buffer the tape reuses from pass to pass and which the
/// op's backward overwrites (or zeroes) on its first contribution. With the stale buffers
/// `gradcheck::check` leaves behind, a backward that adds into an old gradient fails.
/// The leaf stays what the check perturbs; d(leaf + 0)/d(leaf) = 1.
fn fed(graph: &mut Graph<f64>, leaf: NodeId) -> NodeId {
    let shape = graph.value(leaf).unwrap().raw_dim();
    let zero = graph.input("zero");
    graph.set_input(zero, ArrayD::zeros(shape).view()).unwrap();
    graph.add(leaf, zero).unwrap()
}

fn conv_graph(
    graph: &mut Graph<f64>,
    case: &Case,
    seed: u64,
    with_bias: bool,
) -> (NodeId, Vec<NodeId>) {
    let x = graph.input_with_grad("x");
    graph
        .set_input(x, random(&case.image(), seed).view())
        .unwrap();
    let weight = graph
        .param("weight", random(&[case.c_out, case.c_in], seed + 1))
        .unwrap();
    let mut wrt = vec![x, weight];
    let bias = with_bias.then(|| {
        graph
            .param("bias", random(&[case.c_out], seed + 2))
            .unwrap()
    });
    wrt.extend(bias);
    (
        {
            let fed_x = fed(graph, x);
            graph.conv1x1(fed_x, weight, bias)
        }
        .unwrap(),
        wrt,
    )
}

#[test]
fn conv1x1_dx_dweight_dbias_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("conv1x1 {case:?}"), i as u64, |g| {
            conv_graph(g, case, 10 * i as u64, true)
        });
    }
}

/// Maps of 64 pixels or more take conv1x1's per-sample products (the CASES take the grouped
/// ones for small maps); from 256 pixels the backward pass runs sample by sample — each
/// sample's term of dW, its dXₙ and its row sums for db one after the other, the terms of dW
/// summed in slots and the slots added after (slots shared by several samples: `tests/ops.rs`).
/// Checked on one thread and with the samples split on two.
#[test]
fn conv1x1_on_larger_maps_matches_finite_difference() {
    let case = |batch, c_in, c_out, height, width| Case {
        batch,
        c_in,
        c_out,
        height,
        width,
    };
    let cases = [
        case(2, 3, 5, 9, 8),
        case(1, 5, 2, 16, 16),
        case(2, 3, 5, 16, 17),
    ];
    let before = pointwise::parallel::threads();
    // Split however small the work: these shapes are far below the default.
    pointwise::parallel::set_split_from(0);
    for threads in [1, 2] {
        pointwise::parallel::set_threads(threads).unwrap();
        for (i, case) in cases.iter().enumerate() {
            check_graph(
                &format!("conv1x1 {case:?}, {threads} threads"),
                50 + i as u64,
                |g| conv_graph(g, case, 60 + 10 * i as u64, true),
            );
        }
    }
    pointwise::parallel::set_threads(before).unwrap();
    pointwise::parallel::set_split_from(pointwise::parallel::SPLIT_FROM_VALUES);
}

#[test]
fn conv1x1_without_bias_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("conv1x1 no bias {case:?}"), i as u64, |g| {
            conv_graph(g, case, 10 * i as u64, false)
        });
    }
}

#[test]
fn linear_dx_dweight_dbias_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("linear {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            graph
                .set_input(x, random(&[case.batch, case.c_in], i as u64).view())
                .unwrap();
            let weight = graph
                .param("weight", random(&[case.c_out, case.c_in], 100 + i as u64))
                .unwrap();
            let bias = graph
                .param("bias", random(&[case.c_out], 200 + i as u64))
                .unwrap();
            (
                {
                    let fed_x = fed(graph, x);
                    graph.linear(fed_x, weight, Some(bias))
                }
                .unwrap(),
                vec![x, weight, bias],
            )
        });
    }
}

#[test]
fn relu_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("relu {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            // |x| ≥ 0.05 ≫ EPS: no finite difference straddles the kink at 0.
            graph
                .set_input(x, away_from_zero(&case.image(), i as u64, 0.05).view())
                .unwrap();
            (
                {
                    let fed_x = fed(graph, x);
                    graph.relu(fed_x)
                }
                .unwrap(),
                vec![x],
            )
        });
    }
}

/// (window, stride) settings: non-overlapping, overlapping, and a window covering odd sizes.
const POOLS: [(usize, usize); 3] = [(1, 1), (2, 1), (2, 2)];

#[test]
fn max_pool_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        for &(window, stride) in POOLS
            .iter()
            .filter(|(w, _)| *w <= case.height.min(case.width))
        {
            check_graph(
                &format!("max_pool k{window} s{stride} {case:?}"),
                i as u64,
                |graph| {
                    let x = graph.input_with_grad("x");
                    // Values 0.01 apart ≫ 2·EPS: the arg-max of a window never changes under the step.
                    graph
                        .set_input(x, distinct_values(&case.image(), i as u64, 0.01).view())
                        .unwrap();
                    (
                        {
                            let fed_x = fed(graph, x);
                            graph.max_pool(fed_x, window, stride)
                        }
                        .unwrap(),
                        vec![x],
                    )
                },
            );
        }
    }
}

/// The fused relu(max_pool(x)) and relu6(max_pool(x)) on pairwise distinct values 0.1·k + 0.05
/// (k an integer from about −len/2): 0.1 apart ≫ 2·EPS, and 0.05 off both kinks (0 and 6).
/// Windows whose maximum is negative pass no gradient and the others pass it to their arg-max;
/// with ReLU6, windows whose maximum is above 6 (in the largest case, up to 7.95) pass none
/// either.
#[test]
fn max_pool_relu_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        for &(window, stride) in POOLS
            .iter()
            .filter(|(w, _)| *w <= case.height.min(case.width))
        {
            for six in [false, true] {
                let name = if six {
                    "max_pool+relu6"
                } else {
                    "max_pool+relu"
                };
                check_graph(
                    &format!("{name} k{window} s{stride} {case:?}"),
                    i as u64,
                    |graph| {
                        let x = graph.input_with_grad("x");
                        let values = distinct_values(&case.image(), i as u64, 1.0)
                            .mapv(|v| 0.1 * v.floor() + 0.05);
                        graph.set_input(x, values.view()).unwrap();
                        let fed_x = fed(graph, x);
                        let pooled = match six {
                            false => graph.max_pool_relu(fed_x, window, stride),
                            true => graph.max_pool_relu6(fed_x, window, stride),
                        };
                        (pooled.unwrap(), vec![x])
                    },
                );
            }
        }
    }
}

#[test]
fn avg_pool_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        for &(window, stride) in POOLS
            .iter()
            .filter(|(w, _)| *w <= case.height.min(case.width))
        {
            check_graph(
                &format!("avg_pool k{window} s{stride} {case:?}"),
                i as u64,
                |graph| {
                    let x = graph.input_with_grad("x");
                    graph
                        .set_input(x, random(&case.image(), i as u64).view())
                        .unwrap();
                    (
                        {
                            let fed_x = fed(graph, x);
                            graph.avg_pool(fed_x, window, stride)
                        }
                        .unwrap(),
                        vec![x],
                    )
                },
            );
        }
    }
}

#[test]
fn global_avg_pool_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("global_avg_pool {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            graph
                .set_input(x, random(&case.image(), i as u64).view())
                .unwrap();
            (
                {
                    let fed_x = fed(graph, x);
                    graph.global_avg_pool(fed_x)
                }
                .unwrap(),
                vec![x],
            )
        });
    }
}

#[test]
fn add_dleft_dright_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("add {case:?}"), i as u64, |graph| {
            let left = graph.input_with_grad("left");
            let right = graph.input_with_grad("right");
            graph
                .set_input(left, random(&case.image(), i as u64).view())
                .unwrap();
            graph
                .set_input(right, random(&case.image(), 50 + i as u64).view())
                .unwrap();
            (
                {
                    let fed_left = fed(graph, left);
                    let fed_right = fed(graph, right);
                    graph.add(fed_left, fed_right)
                }
                .unwrap(),
                vec![left, right],
            )
        });
    }
}

#[test]
fn add_of_a_value_with_itself_matches_finite_difference() {
    check_graph("x + x", 3, |graph| {
        let x = graph.input_with_grad("x");
        graph.set_input(x, random(&[2, 3, 2, 2], 3).view()).unwrap();
        (graph.add(x, x).unwrap(), vec![x])
    });
}

#[test]
fn softmax_cross_entropy_dlogits_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(
            &format!("softmax_cross_entropy {case:?}"),
            i as u64,
            |graph| {
                let logits = graph.input_with_grad("logits");
                // Scaled up so that probabilities are far from uniform.
                graph
                    .set_input(
                        logits,
                        (random(&[case.batch, case.c_out], i as u64) * 3.0).view(),
                    )
                    .unwrap();
                let loss = {
                    let fed_logits = fed(graph, logits);
                    graph.softmax_cross_entropy(fed_logits)
                }
                .unwrap();
                let labels: Vec<usize> =
                    (0..case.batch).map(|n| (n * 7 + i) % case.c_out).collect();
                graph.set_labels(loss, &labels).unwrap();
                (loss, vec![logits])
            },
        );
    }
}

#[test]
fn mse_dprediction_dtarget_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("mse {case:?}"), i as u64, |graph| {
            let prediction = graph.input_with_grad("prediction");
            let target = graph.input_with_grad("target");
            graph
                .set_input(prediction, random(&case.image(), i as u64).view())
                .unwrap();
            graph
                .set_input(target, random(&case.image(), 70 + i as u64).view())
                .unwrap();
            (
                {
                    let fed_prediction = fed(graph, prediction);
                    let fed_target = fed(graph, target);
                    graph.mse(fed_prediction, fed_target)
                }
                .unwrap(),
                vec![prediction, target],
            )
        });
    }
}

/// conv1x1 → relu → conv1x1 → relu → max pool → global avg pool → linear → softmax-CE, checked
/// with respect to every parameter tensor at once; then the same network with the fused
/// conv1x1 + ReLU nodes that `Model` trains (same seeds, so the same values: the unfused run
/// has verified the margins from the kinks).
#[test]
fn whole_bottleneck_network_matches_finite_difference() {
    for (seed, batch, channels, reduced, height, width, classes, fused) in [
        (1, 1, 6, 3, 4, 4, 3, false),
        (2, 3, 5, 7, 5, 4, 4, false),
        (3, 2, 8, 2, 2, 3, 5, false),
        (1, 1, 6, 3, 4, 4, 3, true),
        (2, 3, 5, 7, 5, 4, 4, true),
        (3, 2, 8, 2, 2, 3, 5, true),
    ] {
        let mut graph = Graph::<f64>::new();
        let x = graph.input("x");
        graph
            .set_input(x, random(&[batch, channels, height, width], seed).view())
            .unwrap();
        let reduce_w = graph
            .param("reduce.weight", random(&[reduced, channels], seed + 1))
            .unwrap();
        let reduce_b = graph
            .param("reduce.bias", random(&[reduced], seed + 2) * 0.1)
            .unwrap();
        let expand_w = graph
            .param("expand.weight", random(&[channels, reduced], seed + 3))
            .unwrap();
        let expand_b = graph
            .param("expand.bias", random(&[channels], seed + 4) * 0.1)
            .unwrap();
        let head_w = graph
            .param("head.weight", random(&[classes, channels], seed + 5))
            .unwrap();
        let head_b = graph
            .param("head.bias", random(&[classes], seed + 6))
            .unwrap();
        let layer = |graph: &mut Graph<f64>, x, w, b| {
            if fused {
                let y = graph.conv1x1_relu(x, w, Some(b)).unwrap();
                (y, y)
            } else {
                let pre_activation = graph.conv1x1(x, w, Some(b)).unwrap();
                (pre_activation, graph.relu(pre_activation).unwrap())
            }
        };
        let (reduce, hidden) = layer(&mut graph, x, reduce_w, reduce_b);
        let (expand, features) = layer(&mut graph, hidden, expand_w, expand_b);
        let pooled = graph.max_pool(features, 2, 1).unwrap();
        let summary = graph.global_avg_pool(pooled).unwrap();
        let logits = graph.linear(summary, head_w, Some(head_b)).unwrap();
        let loss = graph.softmax_cross_entropy(logits).unwrap();
        graph
            .set_labels(loss, &(0..batch).map(|n| n % classes).collect::<Vec<_>>())
            .unwrap();
        graph.forward(loss).unwrap();

        // The check is only meaningful away from kinks: every pre-activation well clear of 0
        // and every pooling window with a clear winner (verified, not assumed).
        for pre_activation in [reduce, expand].into_iter().filter(|_| !fused) {
            let margin = graph
                .value(pre_activation)
                .unwrap()
                .iter()
                .fold(f64::INFINITY, |m, v| m.min(v.abs()));
            assert!(
                margin > 1e-4,
                "seed {seed}: a pre-activation is within {margin:e} of the ReLU kink"
            );
        }
        let activations = graph
            .value(features)
            .unwrap()
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        for window in activations.windows((1, 1, 2, 2)) {
            let mut sorted: Vec<f64> = window.iter().copied().collect();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            // A window of ReLU zeros ties at 0, harmlessly: its inputs are all below the kink
            // (checked above), so no step moves them and both sides of the difference agree.
            assert!(
                sorted[0] - sorted[1] > 1e-4 || sorted[0] == 0.0,
                "seed {seed}: a max-pool window has a near tie"
            );
        }

        let params = graph.params();
        assert_eq!(params.len(), 6);
        check_chunked(
            &mut graph,
            loss,
            &params,
            seed,
            &format!("bottleneck seed {seed} fused {fused}"),
        );
    }
}

#[test]
fn gradcheck_detects_a_wrong_gradient() {
    // The checker must be able to fail: compare a correct gradient with a perturbed one.
    let report = gradcheck::compare("w", [1.0, 2.0, 3.0], &[1.0, 2.0, 3.0 + 1e-3]);
    assert!(report.max_rel_error > REL_TOL, "{report}");
    let report = gradcheck::compare("w", [1.0, f64::NAN], &[1.0, 2.0]);
    assert!(report.max_rel_error.is_nan() || report.max_rel_error > REL_TOL);
}

/// (kernel, stride, padding) settings: K = 1 (a 1×1 conv), odd K with "same" padding, even
/// K = 4 with p = 2 (output grows by one), no padding, and stride 2 (a network's stem).
const KERNELS: [(usize, usize, usize); 6] = [
    (1, 1, 0),
    (3, 1, 1),
    (4, 1, 2),
    (2, 1, 0),
    (3, 2, 1),
    (1, 2, 0),
];

#[test]
fn conv2d_dx_dweight_dbias_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        for &(kernel, stride, padding) in &KERNELS {
            if case.height + 2 * padding < kernel || case.width + 2 * padding < kernel {
                continue;
            }
            check_graph(
                &format!("conv2d k{kernel} s{stride} p{padding} {case:?}"),
                i as u64,
                |graph| {
                    let seed = 10 * i as u64 + kernel as u64;
                    let x = graph.input_with_grad("x");
                    graph
                        .set_input(x, random(&case.image(), seed).view())
                        .unwrap();
                    let weight = graph
                        .param(
                            "weight",
                            random(&[case.c_out, case.c_in, kernel, kernel], seed + 1),
                        )
                        .unwrap();
                    let bias = graph
                        .param("bias", random(&[case.c_out], seed + 2))
                        .unwrap();
                    (
                        {
                            let fed_x = fed(graph, x);
                            graph.conv2d(fed_x, weight, Some(bias), stride, padding)
                        }
                        .unwrap(),
                        vec![x, weight, bias],
                    )
                },
            );
        }
    }
}

/// The fused conv1x1 + ReLU: the same derivative as relu(conv1x1(x)), checked where every
/// pre-activation is clear of the kink.
#[test]
fn conv1x1_relu_dx_dweight_dbias_match_finite_difference() {
    use ndarray::{Array4, Ix1, Ix2, Ix4};
    use pointwise::ops::conv1x1;
    for (i, case) in CASES.iter().enumerate() {
        let seed = 300 + 10 * i as u64;
        let (x, w, b) = (
            random(&case.image(), seed),
            random(&[case.c_out, case.c_in], seed + 1),
            random(&[case.c_out], seed + 2),
        );
        let mut z = Array4::zeros((case.batch, case.c_out, case.height, case.width));
        conv1x1::forward_reference(
            x.view().into_dimensionality::<Ix4>().unwrap(),
            w.view().into_dimensionality::<Ix2>().unwrap(),
            Some(b.view().into_dimensionality::<Ix1>().unwrap()),
            z.view_mut(),
        )
        .unwrap();
        let margin = z.iter().fold(f64::INFINITY, |m, v| m.min(v.abs()));
        assert!(
            margin > 1e-4,
            "{case:?}: a pre-activation is within {margin:e} of the kink"
        );
        assert!(
            z.iter().any(|&v| v < 0.0) && z.iter().any(|&v| v > 0.0),
            "both sides of the ReLU are exercised"
        );
        check_graph(&format!("conv1x1_relu {case:?}"), i as u64, |graph| {
            let xi = graph.input_with_grad("x");
            graph.set_input(xi, x.view()).unwrap();
            let weight = graph.param("weight", w.clone()).unwrap();
            let bias = graph.param("bias", b.clone()).unwrap();
            (
                {
                    let fed_xi = fed(graph, xi);
                    graph.conv1x1_relu(fed_xi, weight, Some(bias))
                }
                .unwrap(),
                vec![xi, weight, bias],
            )
        });
    }
}

#[test]
fn flatten_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("flatten {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            graph
                .set_input(x, random(&case.image(), i as u64).view())
                .unwrap();
            let fed_x = fed(graph, x);
            (graph.flatten(fed_x).unwrap(), vec![x])
        });
    }
}

/// A linear layer on a flattened feature map (a network's classifier head), every input.
#[test]
fn linear_on_a_flattened_map_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("flatten → linear {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            graph
                .set_input(x, random(&case.image(), i as u64).view())
                .unwrap();
            let features = case.c_in * case.height * case.width;
            let weight = graph
                .param(
                    "head.weight",
                    random(&[case.c_out, features], 50 + i as u64),
                )
                .unwrap();
            let bias = graph
                .param("head.bias", random(&[case.c_out], 60 + i as u64))
                .unwrap();
            let fed_x = fed(graph, x);
            let flat = graph.flatten(fed_x).unwrap();
            (
                graph.linear(flat, weight, Some(bias)).unwrap(),
                vec![x, weight, bias],
            )
        });
    }
}

#[test]
fn relu6_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("relu6 {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            // Values in ±[0.05, 8.05], nudged off 6 by ≥ 0.05: no step straddles a kink.
            let values = away_from_zero(&case.image(), i as u64, 0.05).mapv(|v| {
                let v = 8.0 * v;
                if (v - 6.0).abs() < 0.05 {
                    v + 0.1
                } else {
                    v
                }
            });
            graph.set_input(x, values.view()).unwrap();
            let fed_x = fed(graph, x);
            (graph.relu6(fed_x).unwrap(), vec![x])
        });
    }
}

#[test]
fn global_max_pool_dx_matches_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("global_max_pool {case:?}"), i as u64, |graph| {
            let x = graph.input_with_grad("x");
            // Values 0.01 apart ≫ 2·EPS: the arg-max of a plane never changes under the step.
            graph
                .set_input(x, distinct_values(&case.image(), i as u64, 0.01).view())
                .unwrap();
            let fed_x = fed(graph, x);
            (graph.global_max_pool(fed_x).unwrap(), vec![x])
        });
    }
}

/// Three inputs of different channel counts, one of them given twice (both slices of dy reach
/// it), and one input that needs no gradient.
#[test]
fn concat_dinputs_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        check_graph(&format!("concat {case:?}"), i as u64, |graph| {
            let [n, c, h, w] = case.image();
            let a = graph.input_with_grad("a");
            let b = graph.input_with_grad("b");
            let constant = graph.input("constant");
            graph
                .set_input(a, random(&[n, c, h, w], i as u64).view())
                .unwrap();
            graph
                .set_input(b, random(&[n, 2, h, w], 10 + i as u64).view())
                .unwrap();
            graph
                .set_input(constant, random(&[n, 3, h, w], 20 + i as u64).view())
                .unwrap();
            let (fed_a, fed_b) = (fed(graph, a), fed(graph, b));
            let y = graph.concat(&[fed_a, constant, fed_b, fed_a]).unwrap();
            (y, vec![a, b])
        });
    }
}

#[test]
fn channel_shuffle_dx_matches_finite_difference() {
    for (i, (batch, groups, per_group, height, width)) in [
        (1, 3, 2, 2, 3),
        (2, 2, 3, 3, 1),
        (3, 5, 1, 1, 1),
        (2, 4, 2, 2, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let shape = [batch, groups * per_group, height, width];
        check_graph(
            &format!("channel_shuffle {shape:?} g{groups}"),
            i as u64,
            |graph| {
                let x = graph.input_with_grad("x");
                graph.set_input(x, random(&shape, i as u64).view()).unwrap();
                let fed_x = fed(graph, x);
                (graph.channel_shuffle(fed_x, groups).unwrap(), vec![x])
            },
        );
    }
}

/// Batch norm in training mode (through the batch statistics) w.r.t. x, γ and β, and in
/// evaluation mode (running statistics, set away from 0 and 1 first) with a batch of 1 too.
#[test]
fn batch_norm_dx_dweight_dbias_match_finite_difference() {
    for (i, case) in CASES.iter().enumerate() {
        for training in [true, false] {
            let [n, c, h, w] = case.image();
            if training && n * h * w < 2 {
                continue; // one value per channel has no variance (an error, as in PyTorch)
            }
            check_graph(
                &format!("batch_norm training {training} {case:?}"),
                i as u64,
                |graph| {
                    let x = graph.input_with_grad("x");
                    // Not seed i: gradcheck's weighting R uses it, and R = x makes the true
                    // gradient of Σ R·BN(x) w.r.t. x vanish (to O(ε/σ²)).
                    graph
                        .set_input(x, random(&[n, c, h, w], 100 + i as u64).view())
                        .unwrap();
                    let gamma = graph
                        .param("bn.weight", random(&[c], 30 + i as u64) + 1.5)
                        .unwrap();
                    let beta = graph.param("bn.bias", random(&[c], 40 + i as u64)).unwrap();
                    let fed_x = fed(graph, x);
                    let y = graph.batch_norm(fed_x, gamma, beta).unwrap();
                    let mean = random(&[c], 50 + i as u64).into_dimensionality().unwrap();
                    let var = (random(&[c], 60 + i as u64) + 1.5)
                        .into_dimensionality()
                        .unwrap();
                    graph
                        .set_running_stats(y, mean.view(), var.view(), 3)
                        .unwrap();
                    graph.set_training(training);
                    (y, vec![x, gamma, beta])
                },
            );
        }
    }
}

/// The fused batch norm + ReLU and + ReLU6, in training and evaluation mode: the same
/// derivative as relu(batch_norm(x)) (relu6), checked where every pre-activation γ·x̂ + β is
/// clear of the kinks (0, and 6 for ReLU6; γ is 3 times larger there so that the ceiling is
/// reached) and every side of them is exercised.
#[test]
fn batch_norm_relu_dx_dweight_dbias_match_finite_difference() {
    use ndarray::Ix4;
    use pointwise::ops::batch_norm;
    let mut above_six = 0;
    for (i, case, six) in CASES
        .iter()
        .enumerate()
        .flat_map(|(i, case)| [(i, case, false), (i, case, true)])
    {
        for training in [true, false] {
            let [n, c, h, w] = case.image();
            if training && n * h * w < 2 {
                continue; // one value per channel has no variance (an error, as in PyTorch)
            }
            let seed = 500 + 10 * i as u64;
            let x = random(&[n, c, h, w], seed);
            let gamma = (random(&[c], seed + 1) + 1.5) * if six { 3.0 } else { 1.0 };
            let beta = random(&[c], seed + 2) * 0.5;
            let mean = random(&[c], seed + 3);
            let var = random(&[c], seed + 4) + 1.5;
            let (gamma1, beta1) = (
                gamma.view().into_dimensionality().unwrap(),
                beta.view().into_dimensionality().unwrap(),
            );
            // The pre-activations the node will compute.
            let z = if training {
                let x4 = x.view().into_dimensionality::<Ix4>().unwrap();
                batch_norm::forward_reference(x4, gamma1, beta1).unwrap().0
            } else {
                let mut z = x.clone();
                for ((_, ch, _, _), v) in z
                    .view_mut()
                    .into_dimensionality::<Ix4>()
                    .unwrap()
                    .indexed_iter_mut()
                {
                    let s = 1.0 / (var[ch] + batch_norm::EPS).sqrt();
                    *v = gamma[ch] * (*v - mean[ch]) * s + beta[ch];
                }
                z
            };
            let kinks: &[f64] = if six { &[0.0, 6.0] } else { &[0.0] };
            let margin = z.iter().fold(f64::INFINITY, |m, v| {
                kinks.iter().fold(m, |m, kink| m.min((v - kink).abs()))
            });
            assert!(
                margin > 1e-4,
                "{case:?} six {six} training {training}: a pre-activation is within {margin:e} of a kink"
            );
            if z.len() > 2 {
                assert!(
                    z.iter().any(|&v| v < 0.0) && z.iter().any(|&v| v > 0.0),
                    "{case:?}: both sides of the ReLU are exercised"
                );
            }
            let name = format!("batch_norm_relu six {six} training {training} {case:?}");
            check_graph(&name, i as u64, |graph| {
                let xi = graph.input_with_grad("x");
                graph.set_input(xi, x.view()).unwrap();
                let g = graph.param("bn.weight", gamma.clone()).unwrap();
                let b = graph.param("bn.bias", beta.clone()).unwrap();
                let fed_x = fed(graph, xi);
                let y = match six {
                    true => graph.batch_norm_relu6(fed_x, g, b).unwrap(),
                    false => graph.batch_norm_relu(fed_x, g, b).unwrap(),
                };
                let (mean, var) = (
                    mean.view().into_dimensionality().unwrap(),
                    var.view().into_dimensionality().unwrap(),
                );
                graph.set_running_stats(y, mean, var, 3).unwrap();
                graph.set_training(training);
                (y, vec![xi, g, b])
            });
            above_six += z.iter().filter(|&&v| six && v > 6.0).count();
        }
    }
    assert!(above_six > 0, "the ReLU6 ceiling is exercised");
}

/// SqueezeNet's fire module: squeeze 1×1 + ReLU, then a 1×1 and a 3×3 (padding 1) expand side
/// by side, each + ReLU, concatenated on channels; w.r.t. every parameter and the input.
#[test]
fn squeezenet_fire_module_matches_finite_difference() {
    for (seed, batch, c_in, squeeze, expand, side) in [(1, 1, 5, 3, 2, 3), (2, 2, 4, 2, 3, 4)] {
        check_graph(&format!("fire module seed {seed}"), seed, |graph| {
            let x = graph.input_with_grad("x");
            graph
                .set_input(x, random(&[batch, c_in, side, side], seed).view())
                .unwrap();
            let mut param = |name: &str, shape: &[usize], k: u64| {
                graph
                    .param(name, random(shape, 10 * seed + k) * 0.7)
                    .unwrap()
            };
            let squeeze_w = param("squeeze.weight", &[squeeze, c_in], 1);
            let squeeze_b = param("squeeze.bias", &[squeeze], 2);
            let e1_w = param("expand1x1.weight", &[expand, squeeze], 3);
            let e1_b = param("expand1x1.bias", &[expand], 4);
            let e3_w = param("expand3x3.weight", &[expand, squeeze, 3, 3], 5);
            let e3_b = param("expand3x3.bias", &[expand], 6);
            let fed_x = fed(graph, x);
            let s = graph
                .conv1x1_relu(fed_x, squeeze_w, Some(squeeze_b))
                .unwrap();
            let left = graph.conv1x1_relu(s, e1_w, Some(e1_b)).unwrap();
            let right = graph.conv2d(s, e3_w, Some(e3_b), 1, 1).unwrap();
            let right = graph.relu(right).unwrap();
            let y = graph.concat(&[left, right]).unwrap();
            (y, vec![x, squeeze_w, squeeze_b, e1_w, e1_b, e3_w, e3_b])
        });
    }
}

/// (batch, channels, multiplier, kernel, stride, padding, height, width).
type DepthwiseCase = (usize, usize, usize, usize, usize, usize, usize, usize);

/// Batch 1, odd sizes, stride 1, 2 and 3, "same" padding and none, a channel multiplier of 2,
/// a 1×1 map.
const DEPTHWISE: [DepthwiseCase; 6] = [
    (1, 3, 1, 3, 1, 1, 5, 4),
    (2, 5, 1, 3, 2, 1, 7, 5),
    (1, 2, 2, 3, 2, 0, 5, 7),
    (3, 3, 1, 1, 1, 0, 1, 1),
    (2, 4, 2, 5, 1, 2, 3, 3),
    (1, 2, 1, 3, 3, 1, 8, 7),
];

#[test]
fn depthwise_dx_dweight_dbias_match_finite_difference() {
    for (i, (n, c, m, k, stride, padding, h, w)) in DEPTHWISE.into_iter().enumerate() {
        let context = format!("depthwise {:?}", DEPTHWISE[i]);
        check_graph(&context, i as u64, |graph| {
            let x = graph.input_with_grad("x");
            graph
                .set_input(x, random(&[n, c, h, w], 100 + i as u64).view())
                .unwrap();
            let weight = graph
                .param("dw.weight", random(&[c * m, 1, k, k], 200 + i as u64))
                .unwrap();
            let bias = graph
                .param("dw.bias", random(&[c * m], 300 + i as u64))
                .unwrap();
            let fed_x = fed(graph, x);
            let y = graph
                .depthwise(fed_x, weight, Some(bias), stride, padding)
                .unwrap();
            (y, vec![x, weight, bias])
        });
    }
}

/// MobileNetV2's inverted residual block: 1×1 expand + BN + ReLU6 → depthwise 3×3 + BN +
/// ReLU6 → 1×1 project + BN, plus the input (stride 1, same channels), in training mode;
/// w.r.t. every parameter and the input. The margins from the ReLU6 kinks are checked, not
/// assumed.
#[test]
fn mobilenet_v2_inverted_residual_block_matches_finite_difference() {
    for (seed, batch, channels, expand, side) in [(1, 2, 3, 6, 4), (2, 3, 4, 8, 3)] {
        let mut graph = Graph::<f64>::new();
        let x = graph.input_with_grad("x");
        graph
            .set_input(x, random(&[batch, channels, side, side], 10 * seed).view())
            .unwrap();
        let mut param = |name: &str, shape: &[usize], k: u64, shift: f64| {
            graph
                .param(name, random(shape, 10 * seed + k) + shift)
                .unwrap()
        };
        let expand_w = param("conv.0.0.weight", &[expand, channels], 1, 0.0);
        let bn0 = [
            param("conv.0.1.weight", &[expand], 2, 1.5),
            param("conv.0.1.bias", &[expand], 3, 1.0),
        ];
        let dw_w = param("conv.1.0.weight", &[expand, 1, 3, 3], 4, 0.0);
        let bn1 = [
            param("conv.1.1.weight", &[expand], 5, 1.5),
            param("conv.1.1.bias", &[expand], 6, 1.0),
        ];
        let project_w = param("conv.2.weight", &[channels, expand], 7, 0.0);
        let bn2 = [
            param("conv.3.weight", &[channels], 8, 1.5),
            param("conv.3.bias", &[channels], 9, 0.0),
        ];
        let h = graph.conv1x1(x, expand_w, None).unwrap();
        let pre0 = graph.batch_norm(h, bn0[0], bn0[1]).unwrap();
        let h = graph.relu6(pre0).unwrap();
        let h = graph.depthwise(h, dw_w, None, 1, 1).unwrap();
        let pre1 = graph.batch_norm(h, bn1[0], bn1[1]).unwrap();
        let h = graph.relu6(pre1).unwrap();
        let h = graph.conv1x1(h, project_w, None).unwrap();
        let h = graph.batch_norm(h, bn2[0], bn2[1]).unwrap();
        let y = graph.add(h, x).unwrap();
        graph.forward(y).unwrap();
        for pre in [pre0, pre1] {
            let margin = graph
                .value(pre)
                .unwrap()
                .iter()
                .fold(f64::INFINITY, |m, v| m.min(v.abs()).min((v - 6.0).abs()));
            assert!(
                margin > 1e-4,
                "seed {seed}: a pre-activation is within {margin:e} of a kink"
            );
        }
        let mut wrt = graph.params();
        wrt.push(x);
        assert_eq!(wrt.len(), 10);
        check_chunked(
            &mut graph,
            y,
            &wrt,
            seed,
            &format!("inverted residual seed {seed}"),
        );
    }
}

/// Grouped 1×1 convolutions: 1 group (a plain 1×1), 2 and 3 groups, batch 1, odd sizes, a
/// 1×1 map; then ShuffleNet's unit core: grouped 1×1 → ReLU → channel shuffle → grouped 1×1.
#[test]
fn grouped_conv1x1_dx_dweight_dbias_match_finite_difference() {
    for (i, (n, groups, fg, f1g, h, w)) in [
        (1, 1, 3, 2, 2, 3),
        (2, 2, 3, 2, 3, 1),
        (1, 3, 1, 3, 1, 1),
        (3, 3, 2, 1, 2, 2),
    ]
    .into_iter()
    .enumerate()
    {
        check_graph(
            &format!("grouped_conv1x1 g{groups} case {i}"),
            i as u64,
            |graph| {
                let x = graph.input_with_grad("x");
                graph
                    .set_input(x, random(&[n, groups * fg, h, w], 100 + i as u64).view())
                    .unwrap();
                let weight = graph
                    .param("w", random(&[groups * f1g, fg], 200 + i as u64))
                    .unwrap();
                let bias = graph
                    .param("b", random(&[groups * f1g], 300 + i as u64))
                    .unwrap();
                let fed_x = fed(graph, x);
                let y = graph
                    .grouped_conv1x1(fed_x, weight, Some(bias), groups)
                    .unwrap();
                (y, vec![x, weight, bias])
            },
        );
    }
    check_graph("shufflenet unit core", 9, |graph| {
        let x = graph.input_with_grad("x");
        graph
            .set_input(x, away_from_zero(&[2, 6, 3, 3], 9, 0.05).view())
            .unwrap();
        let w1 = graph.param("w1", random(&[6, 3], 10) * 0.5).unwrap();
        let w2 = graph.param("w2", random(&[4, 3], 11)).unwrap();
        let h = graph.grouped_conv1x1(x, w1, None, 2).unwrap();
        let h = graph.relu(h).unwrap();
        let h = graph.channel_shuffle(h, 2).unwrap();
        (
            graph.grouped_conv1x1(h, w2, None, 2).unwrap(),
            vec![x, w1, w2],
        )
    });
}
