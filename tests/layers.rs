//! Layers that create their parameters: PyTorch's names and default initial values, seeded.

use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use pointwise::init;
use pointwise::layers::Layers;
use pointwise::optim::{Optimizer, OptimizerKind};
use pointwise::Graph;

/// The module tree
/// ```python
/// class Net(nn.Module):   # stem, block1 = Block(...), head
///     stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False); bn = nn.BatchNorm2d(8)
///     block1.reduce = nn.Conv2d(8, 4, 1); block1.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
///     block1.expand = nn.Conv2d(4, 8, 1, groups=2); head = nn.Linear(8, 5)
/// ```
/// has these `state_dict` keys for its weights and biases (in creation order).
#[test]
fn layer_parameters_carry_pytorch_state_dict_names() {
    let mut graph = Graph::<f32>::new();
    let mut nn = Layers::new(&mut graph, 0);
    let x = nn.input("x");
    let h = nn.conv2d("stem", x, [3, 8, 3], [2, 1], false).unwrap();
    let h = nn.batch_norm("bn", h, 8).unwrap();
    let mut block = nn.scope("block1");
    let h = block.conv1x1("reduce", h, 8, 4, true).unwrap();
    let h = block.depthwise("dw", h, [4, 1, 3], [1, 1], true).unwrap();
    let h = block.grouped_conv1x1("expand", h, [4, 8, 2], true).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    nn.linear("head", h, 8, 5, true).unwrap();
    let names: Vec<&str> = graph
        .params()
        .into_iter()
        .map(|p| graph.name(p).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "stem.weight",
            "bn.weight",
            "bn.bias",
            "block1.reduce.weight",
            "block1.reduce.bias",
            "block1.dw.weight",
            "block1.dw.bias",
            "block1.expand.weight",
            "block1.expand.bias",
            "head.weight",
            "head.bias",
        ]
    );
    let shape = |name| {
        graph
            .value(graph.find(name).unwrap())
            .unwrap()
            .shape()
            .to_vec()
    };
    assert_eq!(shape("block1.dw.weight"), [4, 1, 3, 3]);
    assert_eq!(shape("block1.expand.weight"), [8, 2]);
    // A name used twice is refused, as a duplicate state_dict key would be.
    let mut nn = Layers::new(&mut graph, 0);
    assert!(nn.linear("head", x, 8, 5, true).is_err());
}

/// PyTorch's default: weight U(±1/√fan_in) (Kaiming uniform with a = √5), bias U(±1/√fan_in);
/// the empirical variance of a large layer is that of the uniform distribution, bound²/3.
#[test]
fn default_initial_values_are_pytorchs() {
    let mut graph = Graph::<f64>::new();
    let mut nn = Layers::new(&mut graph, 3);
    let x = nn.input("x");
    nn.conv2d("conv", x, [64, 128, 3], [1, 1], true).unwrap();
    let fan_in = 64.0 * 9.0;
    let bound = 1.0 / f64::sqrt(fan_in);
    for name in ["conv.weight", "conv.bias"] {
        let values = graph.value(graph.find(name).unwrap()).unwrap();
        assert!(
            values.iter().all(|v| v.abs() <= bound),
            "{name} outside ±1/√fan_in"
        );
        if name == "conv.weight" {
            let variance = values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64;
            let expected = bound * bound / 3.0;
            assert!(
                (variance / expected - 1.0).abs() < 0.02,
                "variance {variance} vs {expected}"
            );
        }
    }
}

#[test]
fn initialisers_have_their_documented_spread_and_are_seeded() {
    let shape = [256, 128, 3, 3];
    let (fan_in, fan_out) = init::fans(&shape).unwrap();
    assert_eq!((fan_in, fan_out), (128 * 9, 256 * 9));
    let std = |a: &ArrayD<f64>| (a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64).sqrt();
    let rng = &mut StdRng::seed_from_u64(1);
    let cases: [(ArrayD<f64>, f64); 4] = [
        (
            init::kaiming_normal(&shape, rng).unwrap(),
            (2.0 / fan_in as f64).sqrt(),
        ),
        (
            init::kaiming_uniform(&shape, 0.0, rng).unwrap(),
            (2.0 / fan_in as f64).sqrt(),
        ),
        (
            init::xavier_normal(&shape, rng).unwrap(),
            (2.0 / (fan_in + fan_out) as f64).sqrt(),
        ),
        (
            init::xavier_uniform(&shape, rng).unwrap(),
            (2.0 / (fan_in + fan_out) as f64).sqrt(),
        ),
    ];
    for (i, (values, expected)) in cases.iter().enumerate() {
        let measured = std(values);
        assert!(
            (measured / expected - 1.0).abs() < 0.01,
            "scheme {i}: std {measured} vs {expected}"
        );
    }
    let again: ArrayD<f64> = init::kaiming_normal(&shape, &mut StdRng::seed_from_u64(1)).unwrap();
    assert_eq!(again, cases[0].0, "same seed, same values");
    assert_ne!(
        cases[0].0,
        init::kaiming_normal::<f64>(&shape, &mut StdRng::seed_from_u64(2)).unwrap()
    );
    assert_eq!(init::ones::<f32>(&[3]).sum(), 3.0);
    assert!(init::fans(&[4, 0]).is_err());
    assert!(init::fans(&[]).is_err());
}

/// The README's small network, built with layers, trains: the loss falls.
#[test]
fn a_network_built_from_layers_trains() {
    let mut graph = Graph::<f32>::new();
    let mut nn = Layers::new(&mut graph, 7);
    let x = nn.input("x");
    let h = nn.conv1x1("reduce", x, 6, 4, true).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear("head", h, 4, 3, true).unwrap();
    let loss = graph.softmax_cross_entropy(logits).unwrap();
    let images = ArrayD::from_shape_fn(IxDyn(&[6, 6, 3, 3]), |i| {
        if i[1] == i[0] % 3 {
            1.0
        } else {
            0.1 * ((i[2] + i[3]) as f32 - 2.0)
        }
    });
    graph.set_input(x, images.view()).unwrap();
    graph.set_labels(loss, &[0, 1, 2, 0, 1, 2]).unwrap();
    let mut optimizer = Optimizer::new(OptimizerKind::adam()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..60 {
        graph.zero_grad();
        graph.forward(loss).unwrap();
        losses.push(graph.scalar(loss).unwrap());
        graph.backward(loss).unwrap();
        optimizer.step(&mut graph, 0.05).unwrap();
    }
    assert!(
        losses[59] < 0.2 * losses[0],
        "loss {} → {}",
        losses[0],
        losses[59]
    );
}
