//! The cost model on the seed's example, and the summary table.

use ndarray::{ArrayD, IxDyn};
use pointwise::Graph;

/// "input (256) → 1×1 conv (64) → 4×4 conv (256)" against "input (256) → 4×4 conv (256)":
/// 256·64·17 against 256·256·16 multiply-adds per pixel, 64/17 ≈ 3.76× fewer.
#[test]
fn the_seed_bottleneck_needs_64_over_17_fewer_multiply_adds_per_pixel() {
    let (batch, height, width) = (2, 6, 5);
    let mut graph = Graph::<f32>::new();
    let x = graph.input("x");
    graph
        .set_input(x, ArrayD::zeros(IxDyn(&[batch, 256, height, width])).view())
        .unwrap();
    let reduce_w = graph
        .param("reduce.weight", ArrayD::zeros(IxDyn(&[64, 256])))
        .unwrap();
    let conv_a = graph
        .param("bottleneck.weight", ArrayD::zeros(IxDyn(&[256, 64, 4, 4])))
        .unwrap();
    let conv_b = graph
        .param("direct.weight", ArrayD::zeros(IxDyn(&[256, 256, 4, 4])))
        .unwrap();
    let reduced = graph.conv1x1(x, reduce_w, None).unwrap();
    let bottleneck = graph.conv2d(reduced, conv_a, None, 1, 2).unwrap();
    let direct = graph.conv2d(x, conv_b, None, 1, 2).unwrap();
    graph.forward(bottleneck).unwrap();
    graph.forward(direct).unwrap();

    // Per output pixel of each node: MACs / (N·H′·W′).
    let per_pixel =
        |node, pixels: u64| graph.cost(node).unwrap().forward_macs / (batch as u64 * pixels);
    let out_pixels = ((height + 1) * (width + 1)) as u64; // K = 4, p = 2: H + 1
    let reduce = per_pixel(reduced, (height * width) as u64);
    let expand = per_pixel(bottleneck, out_pixels);
    let full = per_pixel(direct, out_pixels);
    assert_eq!(reduce, 256 * 64);
    assert_eq!(expand, 64 * 256 * 16);
    assert_eq!(reduce + expand, 256 * 64 * 17);
    assert_eq!(full, 256 * 256 * 16);
    let ratio = full as f64 / (reduce + expand) as f64;
    // 256·256·16 / (256·64·17) = 64/17 ≈ 3.76.
    assert!(
        (ratio - 64.0 / 17.0).abs() < 1e-12 && (ratio * 100.0).floor() == 376.0,
        "{ratio}"
    );

    // Parameters and GEMM shapes, as printed by the summary.
    assert_eq!(graph.cost(reduced).unwrap().params, 256 * 64);
    assert_eq!(graph.cost(direct).unwrap().params, 256 * 256 * 16);
    let gemms = graph.cost(reduced).unwrap().gemms;
    assert_eq!(
        gemms,
        vec![
            format!("fwd 2×(64×256)·(256×30)"),
            format!("dW 2×(64×30)·(30×256)")
        ]
    );
    let summary = graph.summary().unwrap();
    assert!(
        summary.contains("[2, 64, 6, 5]") && summary.contains("[2, 256, 7, 6]"),
        "{summary}"
    );
}

#[test]
fn input_gradients_double_the_backward_cost() {
    let mut graph = Graph::<f32>::new();
    let x = graph.input("x");
    let x_grad = graph.input_with_grad("x_grad");
    let image = ArrayD::zeros(IxDyn(&[1, 8, 3, 3]));
    graph.set_input(x, image.view()).unwrap();
    graph.set_input(x_grad, image.view()).unwrap();
    let weight = graph.param("w", ArrayD::zeros(IxDyn(&[4, 8]))).unwrap();
    let first = graph.conv1x1(x, weight, None).unwrap();
    let second = graph.conv1x1(x_grad, weight, None).unwrap();
    graph.forward(second).unwrap();
    let (a, b) = (graph.cost(first).unwrap(), graph.cost(second).unwrap());
    assert_eq!((a.forward_macs, a.backward_macs), (4 * 8 * 9, 4 * 8 * 9));
    assert_eq!(b.backward_macs, 2 * 4 * 8 * 9);
    assert!(
        b.gemms.iter().any(|g| g.starts_with("dX")) && !a.gemms.iter().any(|g| g.starts_with("dX"))
    );
    let before_forward = Graph::<f32>::new().cost(first);
    assert!(before_forward.is_err());
}

/// The partner layers in the cost model: a depthwise 3×3 costs K² multiply-adds per output,
/// a grouped 1×1 1/g of the dense one, batch norm counts its γ and β as parameters.
#[test]
fn depthwise_grouped_and_batch_norm_costs() {
    let mut graph = Graph::<f32>::new();
    let mut nn = pointwise::layers::Layers::new(&mut graph, 0);
    let x = nn.input("x");
    let dw = nn.depthwise("dw", x, [8, 1, 3], [1, 1], false).unwrap();
    let grouped = nn.grouped_conv1x1("g", dw, [8, 16, 4], true).unwrap();
    let bn = nn.batch_norm("bn", grouped, 16).unwrap();
    graph
        .set_input(
            x,
            ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 8, 5, 5])).view(),
        )
        .unwrap();
    graph.forward(bn).unwrap();
    let dw = graph.cost(dw).unwrap();
    assert_eq!((dw.params, dw.forward_macs), (8 * 9, 2 * 8 * 25 * 9));
    let grouped = graph.cost(grouped).unwrap();
    assert_eq!(
        (grouped.params, grouped.forward_macs),
        (16 * 2 + 16, 2 * 16 * 2 * 25)
    );
    assert_eq!(graph.cost(bn).unwrap().params, 32);
    assert!(graph.summary().unwrap().contains("batch_norm"));
}
