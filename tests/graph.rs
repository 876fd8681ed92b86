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

/// `clear_grads` (PyTorch's `set_to_none`) gives exactly the gradients of `zero_grad`, whether
/// the pass runs on the whole batch or in chunks: the next pass overwrites each leaf's stale
/// buffer, a leaf it does not reach reads as zero, and nothing reads a gradient in between.
#[test]
fn cleared_gradients_are_overwritten_by_the_next_pass() {
    for chunk in [None, Some(2)] {
        let mut graph = Graph::<f64>::new();
        let x = graph.input_with_grad("x");
        let weight = graph.param("weight", random(&[3, 4], 2)).unwrap();
        let bias = graph.param("bias", random(&[3], 3)).unwrap();
        let unused = graph.param("unused", random(&[5], 4)).unwrap();
        let conv = graph.conv1x1(x, weight, Some(bias)).unwrap();
        let hidden = graph.relu(conv).unwrap();
        let pooled = graph.global_avg_pool(hidden).unwrap();
        let target = graph.input("target");
        let loss = graph.mse(pooled, target).unwrap();
        graph.set_backward_chunk(chunk).unwrap();
        let leaves = [x, weight, bias, unused];
        let step = |graph: &mut Graph<f64>, seed: u64, clear: bool| {
            graph
                .set_input(x, random(&[5, 4, 3, 3], seed).view())
                .unwrap();
            graph
                .set_input(target, random(&[5, 3], seed + 1).view())
                .unwrap();
            if clear {
                graph.clear_grads();
                for leaf in leaves {
                    assert!(graph.grad(leaf).is_err(), "a cleared gradient was readable");
                }
            } else {
                graph.zero_grad();
            }
            graph.forward(loss).unwrap();
            graph.backward(loss).unwrap();
            leaves.map(|leaf| graph.grad(leaf).unwrap().to_owned())
        };
        // Stale, non-zero buffers first (another batch), then the same step both ways.
        step(&mut graph, 10, false);
        let cleared = step(&mut graph, 20, true);
        step(&mut graph, 30, false);
        let zeroed = step(&mut graph, 20, false);
        for (got, want) in cleared.iter().zip(&zeroed) {
            assert_abs_diff_eq!(got, want, epsilon = 1e-12);
        }
        assert!(cleared[3].iter().all(|&g| g == 0.0), "{chunk:?}");
        assert!(cleared[1].iter().any(|&g| g.abs() > 1e-6), "{chunk:?}");

        // An optimizer reading gradients after clear_grads, with no pass since, sees zeros.
        graph.clear_grads();
        let grads: Vec<f64> = graph.params_mut().flat_map(|p| p.grad.clone()).collect();
        assert!(grads.iter().all(|&g| g == 0.0));
    }
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

/// x (with grad) → conv1x1+relu → conv2d 3×3 → + x → relu → avg pool → max pool → global
/// average → linear → softmax-CE: every op that splits by sample, and a batched leaf gradient.
fn chunkable_graph(batch: usize) -> (Graph<f64>, pointwise::NodeId, Vec<pointwise::NodeId>) {
    let (channels, side, classes) = (3, 6, 4);
    let mut graph = Graph::<f64>::new();
    let x = graph.input_with_grad("x");
    let image = random(&[batch, channels, side, side], batch as u64);
    graph.set_input(x, image.view()).unwrap();
    let w1 = graph.param("w1", random(&[5, channels], 1)).unwrap();
    let b1 = graph.param("b1", random(&[5], 2)).unwrap();
    let w2 = graph.param("w2", random(&[channels, 5, 3, 3], 3)).unwrap();
    let head = graph
        .param("head", random(&[classes, channels], 4))
        .unwrap();
    let hidden = graph.conv1x1_relu(x, w1, Some(b1)).unwrap();
    let branch = graph.conv2d(hidden, w2, None, 1, 1).unwrap();
    let sum = graph.add(branch, x).unwrap();
    let active = graph.relu(sum).unwrap();
    let smooth = graph.avg_pool(active, 2, 2).unwrap();
    let pooled = graph.max_pool(smooth, 2, 1).unwrap();
    let summary = graph.global_avg_pool(pooled).unwrap();
    let logits = graph.linear(summary, head, None).unwrap();
    let loss = graph.softmax_cross_entropy(logits).unwrap();
    let labels: Vec<usize> = (0..batch).map(|n| (3 * n + 1) % classes).collect();
    graph.set_labels(loss, &labels).unwrap();
    (graph, loss, vec![x, w1, b1, w2, head])
}

/// The leaf gradients of one backward pass from `loss` after zeroing.
fn leaf_gradients(
    graph: &mut Graph<f64>,
    loss: pointwise::NodeId,
    leaves: &[pointwise::NodeId],
) -> Vec<ArrayD<f64>> {
    graph.zero_grad();
    graph.backward(loss).unwrap();
    leaves
        .iter()
        .map(|&id| graph.grad(id).unwrap().to_owned())
        .collect()
}

/// Backward in chunks of samples gives the whole-batch gradients for every chunk size, even
/// and uneven splits. Equal up to rounding, not bit for bit: the linear layer's dW is one GEMM
/// over the batch's rows, whose sum a chunked pass splits into partial sums (1e-13 relative is
/// 500× the f64 epsilon; a missing or doubled chunk would be off by order 1).
#[test]
fn backward_in_chunks_gives_the_whole_batch_gradients() {
    for batch in [1, 5, 7] {
        let (mut graph, loss, leaves) = chunkable_graph(batch);
        graph.forward(loss).unwrap();
        let whole = leaf_gradients(&mut graph, loss, &leaves);
        for chunk in [1, 2, 3, 4, batch, batch + 1] {
            graph.set_backward_chunk(Some(chunk)).unwrap();
            let chunked = leaf_gradients(&mut graph, loss, &leaves);
            for ((expected, actual), id) in whole.iter().zip(&chunked).zip(&leaves) {
                let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(scale > 0.0);
                assert_abs_diff_eq!(actual, expected, epsilon = 1e-13 * scale);
                let name = graph.name(*id).unwrap();
                assert_eq!(actual.shape(), expected.shape(), "{name}");
            }
        }
    }
}

#[test]
fn an_intermediate_gradient_is_not_readable_after_a_chunked_pass() {
    let (mut graph, loss, _) = chunkable_graph(5);
    let hidden = graph.find("conv1x1+relu#5").unwrap();
    graph.forward(loss).unwrap();
    graph.set_backward_chunk(Some(2)).unwrap();
    graph.backward(loss).unwrap();
    let error = graph.grad(hidden).unwrap_err();
    assert!(error.to_string().contains("not kept"), "{error}");
    // A chunk as large as the batch is the whole batch: every gradient is kept.
    graph.set_backward_chunk(Some(5)).unwrap();
    graph.backward(loss).unwrap();
    assert_eq!(graph.grad(hidden).unwrap().shape(), &[5, 5, 6, 6]);
    assert!(matches!(
        graph.set_backward_chunk(Some(0)),
        Err(pointwise::Error::InvalidConfig { .. })
    ));
}

/// A parameter used as data (here the second operand of an Add) has no batch axis of its
/// own: the pass then runs on the whole batch, and every gradient stays readable.
#[test]
fn a_graph_without_a_batch_axis_everywhere_runs_whole() {
    let mut graph = Graph::<f64>::new();
    let x = graph.input_with_grad("x");
    graph.set_input(x, random(&[4, 2, 3, 3], 1).view()).unwrap();
    let offset = graph.param("offset", random(&[4, 2, 3, 3], 2)).unwrap();
    let shifted = graph.relu(offset).unwrap();
    let sum = graph.add(x, shifted).unwrap();
    let target = graph.input("target");
    graph
        .set_input(target, random(&[4, 2, 3, 3], 3).view())
        .unwrap();
    let loss = graph.mse(sum, target).unwrap();
    graph.forward(loss).unwrap();
    let whole = leaf_gradients(&mut graph, loss, &[x, offset]);
    graph.set_backward_chunk(Some(1)).unwrap();
    let again = leaf_gradients(&mut graph, loss, &[x, offset]);
    assert_eq!(whole, again);
    assert_eq!(graph.grad(sum).unwrap().shape(), &[4, 2, 3, 3]);
}

#[test]
fn buffers_start_on_a_cache_line() {
    use pointwise::aligned_zeros;
    const ALIGN: usize = 64;
    let is_aligned =
        |view: ndarray::ArrayViewD<f32>| (view.as_ptr() as usize).is_multiple_of(ALIGN);
    for shape in [
        vec![0],
        vec![1],
        vec![3, 5],
        vec![2, 3, 7, 7],
        vec![32, 64, 28, 28],
    ] {
        let single: ArrayD<f32> = aligned_zeros(IxDyn(&shape));
        let double: ArrayD<f64> = aligned_zeros(IxDyn(&shape));
        assert_eq!(single.shape(), shape.as_slice());
        assert_eq!(double.shape(), shape.as_slice());
        assert!(single.is_standard_layout() && double.is_standard_layout());
        assert!(single.iter().all(|&v| v == 0.0) && double.iter().all(|&v| v == 0.0));
        if !shape.contains(&0) {
            assert_eq!(single.as_ptr() as usize % ALIGN, 0, "{shape:?}");
            assert_eq!(double.as_ptr() as usize % ALIGN, 0, "{shape:?}");
        }
    }
    // The tape's own values and gradients are allocated that way.
    let mut graph = Graph::<f32>::new();
    let x = graph.input_with_grad("x");
    graph
        .set_input(x, random(&[3, 4, 5, 5], 1).mapv(|v| v as f32).view())
        .unwrap();
    let weight = graph
        .param("weight", random(&[6, 4], 2).mapv(|v| v as f32))
        .unwrap();
    let y = graph.conv1x1_relu(x, weight, None).unwrap();
    let pooled = graph.global_avg_pool(y).unwrap();
    graph.forward(pooled).unwrap();
    graph
        .backward_from(pooled, ArrayD::ones(IxDyn(&[3, 6])).view())
        .unwrap();
    for id in [x, y, pooled] {
        assert!(is_aligned(graph.value(id).unwrap()));
        assert!(is_aligned(graph.grad(id).unwrap()));
    }
}

/// A lent upstream gradient gives the same gradients as a copied one, bit for bit, and comes
/// back to the caller: whole, in chunks (where it is copied), and from a target whose fused
/// ReLU masks dY in place.
#[test]
fn a_lent_upstream_gradient_gives_the_gradients_of_a_copied_one() {
    for chunk in [None, Some(2)] {
        let mut graph = Graph::<f64>::new();
        let x = graph.input_with_grad("x");
        graph
            .set_input(x, random(&[5, 3, 4, 4], 11).view())
            .unwrap();
        let w1 = graph.param("w1", random(&[6, 3], 12)).unwrap();
        let b1 = graph.param("b1", random(&[6], 13)).unwrap();
        let w2 = graph.param("w2", random(&[2, 6], 14)).unwrap();
        let hidden = graph.conv1x1_relu(x, w1, Some(b1)).unwrap();
        let y = graph.conv1x1(hidden, w2, None).unwrap();
        graph.set_backward_chunk(chunk).unwrap();
        for target in [y, hidden] {
            graph.forward(target).unwrap();
            let shape = graph.value(target).unwrap().shape().to_vec();
            let upstream = random(&shape, 15);
            let leaves = [x, w1, b1, w2];
            let read = |graph: &Graph<f64>| -> Vec<ArrayD<f64>> {
                let grads = leaves.iter().map(|&id| graph.grad(id).unwrap().to_owned());
                grads.collect()
            };
            graph.clear_grads();
            graph.backward_from(target, upstream.view()).unwrap();
            let copied = read(&graph);
            assert_eq!(chunk.is_none(), graph.grad(target).is_ok());
            let mut lent = upstream.clone();
            let address = lent.as_ptr();
            graph.clear_grads();
            graph.backward_from_mut(target, &mut lent).unwrap();
            assert_eq!(read(&graph), copied, "chunk {chunk:?}");
            assert_eq!(lent.as_ptr(), address, "the caller's buffer comes back");
            if target == y {
                assert_eq!(lent, upstream, "a plain conv1x1 leaves dY as it was");
            }
            // Not the graph's to show: the caller holds it (or, in chunks, it is not kept).
            assert!(graph.grad(target).is_err());
        }
    }
}
