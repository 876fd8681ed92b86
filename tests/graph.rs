//! The tape's bookkeeping: values used twice, accumulation across backward calls, and memory
//! that stays flat over many steps.

mod common;

use approx::assert_abs_diff_eq;
use common::random;
use ndarray::{ArrayD, IxDyn};
use pointwise::Graph;

#[test]
fn a_value_used_twice_receives_the_sum_of_both_gradients() {
    // h = relu(x); y = h + conv(h): h feeds the residual Add directly and through the conv.
    let mut graph = Graph::<f64>::new();
    let x = graph.input_with_grad("x");
    graph.set_input(x, random(&[2, 3, 2, 2], 1).view()).unwrap();
    let weight = graph.param("weight", random(&[3, 3], 2)).unwrap();
    let hidden = graph.relu(x).unwrap();
    let branch = graph.conv1x1(hidden, weight, None).unwrap();
    let sum = graph.add(hidden, branch).unwrap();
    let upstream = random(&[2, 3, 2, 2], 3);
    graph.forward(sum).unwrap();
    graph.backward_from(sum, upstream.view()).unwrap();

    // By hand: dh = dy + Wᵀ·dy per pixel, then dx = dh where x > 0.
    let w = random(&[3, 3], 2);
    let x_value = random(&[2, 3, 2, 2], 1);
    let mut expected = ArrayD::<f64>::zeros(IxDyn(&[2, 3, 2, 2]));
    for n in 0..2 {
        for c in 0..3 {
            for h in 0..2 {
                for wi in 0..2 {
                    let through_conv: f64 =
                        (0..3).map(|o| w[[o, c]] * upstream[[n, o, h, wi]]).sum();
                    let dh = upstream[[n, c, h, wi]] + through_conv;
                    expected[[n, c, h, wi]] = if x_value[[n, c, h, wi]] > 0.0 {
                        dh
                    } else {
                        0.0
                    };
                }
            }
        }
    }
    assert_abs_diff_eq!(graph.grad(x).unwrap().to_owned(), expected, epsilon = 1e-12);
}

#[test]
fn leaf_gradients_accumulate_across_backward_calls_until_zeroed() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    graph.set_input(x, random(&[2, 4, 3, 3], 1).view()).unwrap();
    let weight = graph.param("weight", random(&[2, 4], 2)).unwrap();
    let conv = graph.conv1x1(x, weight, None).unwrap();
    let pooled = graph.global_avg_pool(conv).unwrap();
    let target = graph.input("target");
    graph.set_input(target, random(&[2, 2], 3).view()).unwrap();
    let loss = graph.mse(pooled, target).unwrap();

    graph.forward(loss).unwrap();
    graph.backward(loss).unwrap();
    let once = graph.grad(weight).unwrap().to_owned();
    assert!(once.iter().any(|g| g.abs() > 1e-3));
    graph.forward(loss).unwrap();
    graph.backward(loss).unwrap();
    assert_abs_diff_eq!(
        graph.grad(weight).unwrap().to_owned(),
        &once * 2.0,
        epsilon = 1e-12
    );
    graph.zero_grad();
    assert!(graph.grad(weight).unwrap().iter().all(|&g| g == 0.0));
    graph.backward(loss).unwrap();
    assert_abs_diff_eq!(
        graph.grad(weight).unwrap().to_owned(),
        once,
        epsilon = 1e-12
    );
}

#[test]
fn intermediate_gradients_are_recomputed_not_accumulated() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input("x");
    graph.set_input(x, random(&[1, 2, 2, 2], 1).view()).unwrap();
    let weight = graph.param("weight", random(&[2, 2], 2)).unwrap();
    let conv = graph.conv1x1(x, weight, None).unwrap();
    let target = graph.input("target");
    graph
        .set_input(target, random(&[1, 2, 2, 2], 3).view())
        .unwrap();
    let loss = graph.mse(conv, target).unwrap();
    graph.forward(loss).unwrap();
    graph.backward(loss).unwrap();
    let first = graph.grad(conv).unwrap().to_owned();
    graph.backward(loss).unwrap();
    assert_abs_diff_eq!(graph.grad(conv).unwrap().to_owned(), first, epsilon = 1e-15);
}

#[test]
fn a_thousand_training_steps_keep_nodes_and_buffers_constant() {
    let mut graph = Graph::<f32>::new();
    let x = graph.input("x");
    let reduce = graph
        .param("reduce.weight", random(&[4, 8], 1).mapv(|v| v as f32))
        .unwrap();
    let expand = graph
        .param("expand.weight", random(&[8, 4], 2).mapv(|v| v as f32))
        .unwrap();
    let head = graph
        .param("head.weight", random(&[3, 8], 3).mapv(|v| v as f32))
        .unwrap();
    let h = graph.conv1x1(x, reduce, None).unwrap();
    let h = graph.relu(h).unwrap();
    let h = graph.conv1x1(h, expand, None).unwrap();
    let h = graph.relu(h).unwrap();
    let h = graph.max_pool(h, 2, 2).unwrap();
    let h = graph.global_avg_pool(h).unwrap();
    let logits = graph.linear(h, head, None).unwrap();
    let loss = graph.softmax_cross_entropy(logits).unwrap();
    let batch = random(&[4, 8, 6, 6], 4).mapv(|v| v as f32);

    let step = |graph: &mut Graph<f32>| {
        graph.set_input(x, batch.view()).unwrap();
        graph.set_labels(loss, &[0, 1, 2, 1]).unwrap();
        graph.zero_grad();
        graph.forward(loss).unwrap();
        graph.backward(loss).unwrap();
        for param in graph.params_mut() {
            param.value.scaled_add(-0.01, param.grad);
        }
        graph.scalar(loss).unwrap()
    };
    let first_loss = step(&mut graph);
    let (nodes, elements) = (graph.len(), graph.buffer_elements());
    let mut last_loss = first_loss;
    for _ in 0..1000 {
        last_loss = step(&mut graph);
        assert_eq!(graph.len(), nodes);
        assert_eq!(graph.buffer_elements(), elements);
    }
    assert!(
        last_loss < first_loss,
        "training did something: {first_loss} → {last_loss}"
    );
}
