//! Every error variant, triggered through the public API; messages name the op and both shapes.

mod common;

use common::random;
use ndarray::{Array2, Array4};
use pointwise::ops::{conv1x1, max_pool, softmax_cross_entropy};
use pointwise::{Error, Graph, NodeId};

fn conv_graph(c_in: usize) -> (Graph<f64>, NodeId, NodeId) {
    let mut graph = Graph::new();
    let x = graph.input("x");
    let weight = graph.param("weight", random(&[3, c_in], 1)).unwrap();
    let y = graph.conv1x1(x, weight, None).unwrap();
    (graph, x, y)
}

#[test]
fn channel_mismatch_is_a_shape_mismatch_naming_op_and_shapes() {
    let (mut graph, x, y) = conv_graph(4);
    graph.set_input(x, random(&[2, 6, 5, 5], 2).view()).unwrap();
    let error = graph.forward(y).unwrap_err();
    assert!(
        matches!(error, Error::ShapeMismatch { op: "conv1x1", .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("conv1x1") && message.contains('4') && message.contains("[2, 6, 5, 5]"),
        "{message}"
    );
}

#[test]
fn wrong_number_of_dimensions_is_a_shape_mismatch() {
    let (mut graph, x, y) = conv_graph(4);
    graph.set_input(x, random(&[2, 4], 2).view()).unwrap();
    assert!(matches!(
        graph.forward(y),
        Err(Error::ShapeMismatch { op: "conv1x1", .. })
    ));
}

#[test]
fn bias_of_the_wrong_length_is_a_shape_mismatch() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    let weight = graph.param("weight", random(&[3, 4], 1)).unwrap();
    let bias = graph.param("bias", random(&[4], 2)).unwrap();
    assert!(matches!(
        graph.conv1x1(x, weight, Some(bias)),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn pool_window_larger_than_the_input_is_an_invalid_shape() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    let pooled = graph.max_pool(x, 3, 1).unwrap();
    graph.set_input(x, random(&[1, 2, 2, 5], 1).view()).unwrap();
    let error = graph.forward(pooled).unwrap_err();
    assert!(
        matches!(error, Error::InvalidShape { op: "max_pool", .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("window 3"), "{error}");

    let x = Array4::<f64>::zeros((1, 1, 2, 2));
    assert!(matches!(
        pointwise::ops::avg_pool::output_shape(x.shape(), 4, 1),
        Err(Error::InvalidShape { op: "avg_pool", .. })
    ));
}

#[test]
fn zero_sized_dimensions_are_invalid_shapes() {
    for shape in [[1, 0, 3, 3], [1, 4, 0, 3], [1, 4, 3, 0]] {
        let (mut graph, x, y) = conv_graph(4);
        graph
            .set_input(x, Array4::<f64>::zeros(shape).into_dyn().view())
            .unwrap();
        assert!(
            matches!(graph.forward(y), Err(Error::InvalidShape { .. })),
            "{shape:?}"
        );
    }
    let mut graph = Graph::<f64>::new();
    let error = graph
        .param("weight", Array2::zeros((0, 4)).into_dyn())
        .unwrap_err();
    assert!(
        matches!(error, Error::InvalidShape { op: "param", .. }),
        "{error:?}"
    );
    assert!(matches!(
        conv1x1::output_shape(&[1, 4, 2, 2], &[3, 0], None),
        Err(Error::InvalidShape { .. })
    ));
}

#[test]
fn an_empty_batch_flows_forward_with_the_right_shape() {
    let (mut graph, x, y) = conv_graph(4);
    graph
        .set_input(x, Array4::<f64>::zeros((0, 4, 3, 3)).into_dyn().view())
        .unwrap();
    graph.forward(y).unwrap();
    assert_eq!(graph.value(y).unwrap().shape(), &[0, 3, 3, 3]);
}

#[test]
fn stride_zero_and_window_zero_are_invalid_configs() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    assert!(matches!(
        graph.max_pool(x, 2, 0),
        Err(Error::InvalidConfig { op: "max_pool", .. })
    ));
    assert!(matches!(
        graph.avg_pool(x, 0, 1),
        Err(Error::InvalidConfig { op: "avg_pool", .. })
    ));
    assert!(matches!(
        max_pool::output_shape(&[1, 1, 4, 4], 2, 0),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn misused_nodes_are_invalid_configs() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    let weight = graph.param("weight", random(&[3, 4], 1)).unwrap();
    // The weight of a conv must be a parameter; a name may be used once.
    assert!(matches!(
        graph.conv1x1(weight, x, None),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        graph.conv1x1(weight, weight, None),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        graph.param("weight", random(&[1], 2)),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(graph.mse(x, x), Err(Error::InvalidConfig { .. })));
}

#[test]
fn a_loss_over_an_empty_batch_is_an_empty_batch_error() {
    let mut graph = Graph::<f64>::new();
    let logits = graph.input("logits");
    let loss = graph.softmax_cross_entropy(logits).unwrap();
    graph
        .set_input(logits, Array2::<f64>::zeros((0, 3)).into_dyn().view())
        .unwrap();
    graph.set_labels(loss, &[]).unwrap();
    assert!(matches!(
        graph.forward(loss),
        Err(Error::EmptyBatch {
            op: "softmax_cross_entropy"
        })
    ));

    let mut graph = Graph::<f64>::new();
    let (prediction, target) = (graph.input("p"), graph.input("t"));
    let loss = graph.mse(prediction, target).unwrap();
    graph
        .set_input(prediction, Array2::<f64>::zeros((0, 3)).into_dyn().view())
        .unwrap();
    graph
        .set_input(target, Array2::<f64>::zeros((0, 3)).into_dyn().view())
        .unwrap();
    assert!(matches!(
        graph.forward(loss),
        Err(Error::EmptyBatch { op: "mse" })
    ));
}

#[test]
fn a_label_out_of_range_is_reported_with_its_sample() {
    let mut graph = Graph::<f64>::new();
    let logits = graph.input("logits");
    let loss = graph.softmax_cross_entropy(logits).unwrap();
    graph.set_input(logits, random(&[3, 4], 1).view()).unwrap();
    graph.set_labels(loss, &[0, 4, 1]).unwrap();
    let error = graph.forward(loss).unwrap_err();
    assert!(
        matches!(
            error,
            Error::LabelOutOfRange {
                sample: 1,
                label: 4,
                classes: 4,
                ..
            }
        ),
        "{error:?}"
    );
    graph.set_labels(loss, &[0, 1]).unwrap();
    assert!(matches!(
        graph.forward(loss),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut probs = Array2::zeros((1, 2));
    let result = softmax_cross_entropy::forward(
        Array2::<f64>::zeros((1, 2)).view(),
        &[usize::MAX],
        probs.view_mut(),
    );
    assert!(matches!(result, Err(Error::LabelOutOfRange { .. })));
}

#[test]
fn unset_inputs_and_foreign_ids_are_graph_errors() {
    let (mut graph, x, y) = conv_graph(4);
    assert!(matches!(graph.forward(y), Err(Error::Graph { .. })));
    let mut other = Graph::<f64>::new();
    let foreign = (0..10).map(|i| other.input(&i.to_string())).last().unwrap();
    assert!(matches!(graph.forward(foreign), Err(Error::Graph { .. })));
    assert!(matches!(graph.relu(foreign), Err(Error::Graph { .. })));
    // A gradient was not asked for; labels belong to a loss; inputs are set, not ops.
    assert!(matches!(graph.grad(x), Err(Error::Graph { .. })));
    assert!(matches!(
        graph.set_labels(y, &[0]),
        Err(Error::Graph { .. })
    ));
    assert!(matches!(
        graph.set_input(y, random(&[1], 1).view()),
        Err(Error::Graph { .. })
    ));
}

#[test]
fn gradient_buffers_of_the_wrong_shape_are_rejected_by_the_ops() {
    let x = Array4::<f64>::zeros((1, 4, 2, 2));
    let weight = Array2::<f64>::zeros((3, 4));
    let dy = Array4::<f64>::zeros((1, 3, 2, 2));
    let mut dweight = Array2::<f64>::zeros((4, 3));
    let result = conv1x1::backward(
        x.view(),
        weight.view(),
        dy.view(),
        None,
        Some(dweight.view_mut()),
        None,
    );
    assert!(matches!(result, Err(Error::ShapeMismatch { .. })));
}

/// A scalar (0-d) input goes through the same finiteness checks as a batch: it is one item
/// the threads do not cut.
#[test]
fn a_scalar_input_is_checked_for_finiteness_like_a_batch() {
    use ndarray::aview0;
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    graph.set_input(x, aview0(&2.0).into_dyn()).unwrap();
    let error = graph
        .set_input(x, aview0(&f64::NAN).into_dyn())
        .unwrap_err();
    assert!(
        matches!(&error, Error::NonFinite { what, .. } if what.contains("element 0")),
        "{error}"
    );
    let error = graph.forward(x).unwrap_err();
    assert!(error.to_string().contains("never set"), "{error}");
    graph
        .set_input(x, aview0(&f64::INFINITY).into_dyn())
        .unwrap_err();
}

/// An empty batch (N = 0) flows forward and backward through every pooling op and the
/// channel ops without a panic (chunk sizes of 0 once did).
#[test]
fn an_empty_batch_flows_through_pools_forward_and_backward() {
    use ndarray::{ArrayD, IxDyn};
    let mut graph = pointwise::Graph::<f64>::new();
    let x = graph.input_with_grad("x");
    let outputs = [
        graph.max_pool(x, 2, 2).unwrap(),
        graph.avg_pool(x, 2, 2).unwrap(),
        graph.global_max_pool(x).unwrap(),
        graph.global_avg_pool(x).unwrap(),
        graph.channel_shuffle(x, 2).unwrap(),
        graph.flatten(x).unwrap(),
        graph.concat(&[x, x]).unwrap(),
        graph.relu6(x).unwrap(),
    ];
    graph
        .set_input(x, ArrayD::zeros(IxDyn(&[0, 4, 4, 4])).view())
        .unwrap();
    for y in outputs {
        graph.forward(y).unwrap();
        let upstream = ArrayD::zeros(graph.value(y).unwrap().raw_dim());
        graph.backward_from(y, upstream.view()).unwrap();
        assert_eq!(graph.grad(x).unwrap().shape(), &[0, 4, 4, 4]);
    }
}

/// The same through conv1x1 on maps small (one product for a group of samples) and large
/// (sample by sample, dW's terms added after), with every gradient asked for.
#[test]
fn an_empty_batch_flows_through_conv1x1_forward_and_backward() {
    use ndarray::{ArrayD, IxDyn};
    for side in [4, 16] {
        let mut graph = pointwise::Graph::<f64>::new();
        let x = graph.input_with_grad("x");
        let weight = graph.param("w", ArrayD::ones(IxDyn(&[3, 4]))).unwrap();
        let bias = graph.param("b", ArrayD::ones(IxDyn(&[3]))).unwrap();
        let y = graph.conv1x1(x, weight, Some(bias)).unwrap();
        graph
            .set_input(x, ArrayD::zeros(IxDyn(&[0, 4, side, side])).view())
            .unwrap();
        graph.forward(y).unwrap();
        let upstream = ArrayD::zeros(graph.value(y).unwrap().raw_dim());
        graph.backward_from(y, upstream.view()).unwrap();
        assert_eq!(graph.grad(x).unwrap().shape(), &[0, 4, side, side]);
        assert!(graph.grad(weight).unwrap().iter().all(|&g| g == 0.0));
        assert!(graph.grad(bias).unwrap().iter().all(|&g| g == 0.0));
    }
}

/// Sizes that cannot exist are typed errors before anything is allocated: no abort, no panic
/// (each of these once aborted on an allocation of terabytes or panicked in ndarray).
#[test]
fn impossible_sizes_are_errors_before_allocating() {
    use pointwise::data::{generate, SyntheticConfig};
    use pointwise::{Architecture, Model};
    let mut model = Model::new(Architecture::bottleneck(4, 2, 3), 0).unwrap();
    for shape in [
        [1 << 40, 4, 8, 8],
        [usize::MAX, 2, 1, 1],
        [1 << 16, 1 << 16, 1 << 16, 1],
    ] {
        assert!(
            matches!(model.input_mut(shape), Err(Error::InvalidShape { .. })),
            "{shape:?}"
        );
    }
    // A broadcast view of 2^40 elements given as an input.
    let mut graph = Graph::<f32>::new();
    let x = graph.input("x");
    let one = ndarray::ArrayD::<f32>::zeros(vec![1, 1]);
    let huge = one.broadcast(vec![1 << 20, 1 << 20]).unwrap();
    assert!(matches!(
        graph.set_input(x, huge),
        Err(Error::InvalidShape { .. })
    ));
    // Paddings whose outputs cannot exist.
    for padding in [1 << 20, 1 << 31] {
        let mut graph = Graph::<f32>::new();
        let x = graph.input("x");
        let weight = graph
            .param("w", ndarray::ArrayD::zeros(vec![4, 2, 3, 3]))
            .unwrap();
        let y = graph.conv2d(x, weight, None, 1, padding).unwrap();
        graph
            .set_input(x, ndarray::ArrayD::zeros(vec![1, 2, 5, 5]).view())
            .unwrap();
        let error = graph.forward(y).unwrap_err();
        assert!(
            matches!(error, Error::InvalidShape { .. }),
            "{padding}: {error}"
        );
    }
    // Class signatures of 2^40 × 32, and an architecture of 3 × 2^32 parameters.
    let config = SyntheticConfig {
        classes: 1 << 40,
        ..SyntheticConfig::default()
    };
    assert!(matches!(
        generate(&config, 0),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Model::new(Architecture::bottleneck(65536, 65536, 65536), 0),
        Err(Error::InvalidConfig { .. })
    ));
}

/// Misuse that once passed silently: an id of another graph of the same shape, a backward pass
/// over values that no longer match the inputs, parameters or labels, and gradients asked for
/// before they exist. Each is an error that says what to do.
#[test]
fn stale_values_and_foreign_ids_are_refused() {
    let (mut graph, x, y) = conv_graph(4);
    let (other, other_x, _) = conv_graph(4);
    assert_eq!(x.index(), other_x.index());
    // Same position, other graph: refused, not taken for this graph's node.
    let error = graph
        .set_input(other_x, random(&[1, 4, 2, 2], 1).view())
        .unwrap_err();
    assert!(error.to_string().contains("another graph"), "{error}");
    drop(other);
    // Before any forward pass there is no gradient, not an empty one.
    let error = graph.grad(y).unwrap_err();
    assert!(error.to_string().contains("run forward"), "{error}");
    let loss = graph.global_avg_pool(y).unwrap();
    let weight = graph.find("weight").unwrap();
    let error = graph.grad(weight).unwrap_err();
    assert!(
        error.to_string().contains("run forward and backward"),
        "{error}"
    );
    // A new input after the forward pass: backward refuses the stale values.
    graph.set_input(x, random(&[2, 4, 3, 3], 2).view()).unwrap();
    graph.forward(loss).unwrap();
    graph.set_input(x, random(&[2, 4, 3, 3], 3).view()).unwrap();
    let upstream = ndarray::ArrayD::<f64>::ones(vec![2, 3]);
    let error = graph.backward_from(loss, upstream.view()).unwrap_err();
    assert!(error.to_string().contains("run forward"), "{error}");
    // A forward pass that stopped below the target does not count for it.
    graph.forward(y).unwrap();
    assert!(graph.backward_from(loss, upstream.view()).is_err());
    graph.forward(loss).unwrap();
    graph.backward_from(loss, upstream.view()).unwrap();
    // A parameter changed (an optimizer step) or the mode switched: forward again first.
    let value = graph.value(weight).unwrap().to_owned();
    graph.set_param(weight, value.view()).unwrap();
    assert!(graph.backward_from(loss, upstream.view()).is_err());
    graph.forward(loss).unwrap();
    graph.set_training(false);
    assert!(graph.backward_from(loss, upstream.view()).is_err());
}

/// Labels set after the forward pass: the loss's saved probabilities belong to the old ones.
#[test]
fn labels_changed_after_the_forward_pass_need_a_new_one() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    let loss = graph.softmax_cross_entropy(x).unwrap();
    graph.set_input(x, random(&[2, 3], 1).view()).unwrap();
    graph.set_labels(loss, &[0, 1]).unwrap();
    graph.forward(loss).unwrap();
    graph.set_labels(loss, &[2, 2]).unwrap();
    assert!(graph.backward(loss).is_err());
    graph.forward(loss).unwrap();
    graph.backward(loss).unwrap();
}

/// A product of broadcast views whose multiply-adds overflow (or would take hours) is refused,
/// not run (it once hung in release builds).
#[test]
fn a_gemm_of_impossible_size_is_refused() {
    let one = ndarray::Array2::<f32>::ones((1, 1));
    let a = one.broadcast((4, 1 << 60)).unwrap();
    let b = one.broadcast((1 << 60, 4)).unwrap();
    let mut c = ndarray::Array2::<f32>::zeros((4, 4));
    let result = pointwise::gemm::gemm(1.0, a, b, 0.0, c.view_mut());
    assert!(
        matches!(result, Err(Error::InvalidShape { .. })),
        "{result:?}"
    );
}
