//! Training end to end: the loss falls, the bottleneck learns what the baseline cannot, runs
//! are reproducible, and a diverging run stops with an error instead of corrupting the weights.

use ndarray::{ArrayD, IxDyn};
use pointwise::data::{generate, SyntheticConfig};
use pointwise::optim::{Optimizer, OptimizerKind, Schedule};
use pointwise::train::{accuracy, TrainConfig, Trainer};
use pointwise::{Architecture, Error, Graph, Model};

fn small_data() -> pointwise::data::Synthetic {
    let config = SyntheticConfig {
        train_images: 1024,
        test_images: 256,
        ..SyntheticConfig::default()
    };
    generate(&config, 3).unwrap()
}

fn config(optimizer: OptimizerKind, lr: f64) -> TrainConfig {
    let mut config = TrainConfig::new(4, 16, lr, optimizer);
    // 64 steps an epoch: cosine over the 256 steps after a 25-step warm-up.
    config.schedule = Schedule::cosine(256).with_warmup(25);
    config.seed = 11;
    config
}

/// Trains for 4 epochs × 64 batches = 256 steps; returns (per-epoch losses, test accuracy).
fn train(architecture: Architecture, config: &TrainConfig) -> (Vec<f64>, f64, Model) {
    let data = small_data();
    let mut model = Model::new(architecture, 5).unwrap();
    let mut trainer = Trainer::new(config.clone(), data.train.len()).unwrap();
    let mut losses = Vec::new();
    // The first batch's loss, before any update, is the starting point.
    let mut first = None;
    for _ in 0..config.epochs {
        let report = trainer
            .train_epoch(&mut model, &data.train, |index, _, loss| {
                if index == 0 && first.is_none() {
                    first = Some(loss);
                }
            })
            .unwrap();
        losses.push(report.train_loss);
    }
    losses.insert(0, first.unwrap());
    let test_accuracy = accuracy(&mut model, &data.test, 64).unwrap();
    (losses, test_accuracy, model)
}

#[test]
fn bottleneck_loss_falls_tenfold_and_test_accuracy_exceeds_95_percent() {
    for (optimizer, lr) in [(OptimizerKind::sgd(), 0.05), (OptimizerKind::adam(), 0.01)] {
        let (losses, test_accuracy, _) =
            train(Architecture::bottleneck(32, 8, 4), &config(optimizer, lr));
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(
            last < first / 10.0,
            "{optimizer:?}: loss {first} → {last} did not fall tenfold"
        );
        assert!(
            test_accuracy >= 0.95,
            "{optimizer:?}: test accuracy {test_accuracy}"
        );
    }
}

#[test]
fn residual_bottleneck_also_learns() {
    let mut architecture = Architecture::bottleneck(32, 8, 4);
    architecture.bottleneck.as_mut().unwrap().residual = true;
    let (_, test_accuracy, _) = train(architecture, &config(OptimizerKind::sgd(), 0.05));
    assert!(test_accuracy >= 0.95, "test accuracy {test_accuracy}");
}

#[test]
fn global_average_pooling_alone_stays_near_chance() {
    // 4 classes: chance is 25 %. The blob's signs cancel exactly under the average.
    let (_, test_accuracy, _) = train(
        Architecture::baseline(32, 4),
        &config(OptimizerKind::sgd(), 0.05),
    );
    assert!(
        test_accuracy <= 0.40,
        "baseline test accuracy {test_accuracy}"
    );
}

#[test]
fn two_runs_with_one_seed_are_bit_identical() {
    let config = config(OptimizerKind::adam(), 0.01);
    let (losses_a, accuracy_a, model_a) = train(Architecture::bottleneck(32, 8, 4), &config);
    let (losses_b, accuracy_b, model_b) = train(Architecture::bottleneck(32, 8, 4), &config);
    assert_eq!(
        losses_a.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        losses_b.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(accuracy_a, accuracy_b);
    for ((name_a, a), (name_b, b)) in model_a.tensors().into_iter().zip(model_b.tensors()) {
        assert_eq!(name_a, name_b);
        assert!(
            a.iter()
                .zip(b.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name_a} differs"
        );
    }
}

#[test]
fn a_diverging_run_stops_with_a_non_finite_error_naming_the_step() {
    let data = small_data();
    let mut model = Model::new(Architecture::bottleneck(32, 8, 4), 5).unwrap();
    let mut trainer = Trainer::new(config(OptimizerKind::sgd(), 1e6), data.train.len()).unwrap();
    let mut error = None;
    for _ in 0..4 {
        if let Err(e) = trainer.train_epoch(&mut model, &data.train, |_, _, _| {}) {
            error = Some(e);
            break;
        }
    }
    let error = error.expect("lr 1e6 must diverge");
    assert!(
        matches!(&error, Error::NonFinite { what, step: Some(_), epoch: Some(1), batch: Some(_) } if what.contains("loss")),
        "{error}"
    );
    assert!(error.to_string().contains("at step"), "{error}");
}

#[test]
fn a_non_finite_input_is_refused_before_any_update() {
    let data = small_data();
    let mut model = Model::new(Architecture::bottleneck(32, 8, 4), 5).unwrap();
    let before: Vec<Vec<f32>> = model
        .tensors()
        .iter()
        .map(|(_, t)| t.iter().copied().collect())
        .collect();
    let mut images = data
        .train
        .images()
        .slice(ndarray::s![0..4, .., .., ..])
        .to_owned();
    images[[1, 2, 3, 4]] = f32::NAN;
    let error = model
        .forward_backward(images.view(), &[0, 1, 2, 3])
        .unwrap_err();
    assert!(matches!(error, Error::NonFinite { .. }), "{error}");
    let after: Vec<Vec<f32>> = model
        .tensors()
        .iter()
        .map(|(_, t)| t.iter().copied().collect())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn a_batch_written_in_place_trains_exactly_like_a_copied_one() {
    let data = small_data();
    let images = data
        .train
        .images()
        .slice_move(ndarray::s![0..6, .., .., ..]);
    let labels = [0, 1, 2, 3, 0, 1];
    let mut copied = Model::new(Architecture::bottleneck(32, 8, 4), 5).unwrap();
    let mut in_place = copied.clone();
    let loss_copied = copied.forward_backward(images, &labels).unwrap();
    in_place.input_mut([6, 32, 8, 8]).unwrap().assign(&images);
    let loss_in_place = in_place.forward_backward_in_place(&labels).unwrap();
    assert_eq!(loss_copied.to_bits(), loss_in_place.to_bits());
    for id in copied.graph().params() {
        assert_eq!(
            copied.graph().grad(id).unwrap(),
            in_place.graph().grad(id).unwrap()
        );
    }

    // A NaN written in place is found before any gradient, and named by its position.
    in_place.input_mut([6, 32, 8, 8]).unwrap()[[1, 2, 3, 4]] = f32::NAN;
    let error = in_place.forward_backward_in_place(&labels).unwrap_err();
    let position = ((32 + 2) * 8 + 3) * 8 + 4;
    assert!(
        matches!(&error, Error::NonFinite { what, .. } if what.contains(&format!("element {position} "))),
        "{error}"
    );
    // The input then counts as unset: no step runs on it until it is written again.
    assert!(matches!(
        in_place.forward_backward_in_place(&labels),
        Err(Error::Graph { .. })
    ));
    // So are ±∞ at the batch's first and last element.
    for (position, value) in [(0, f32::INFINITY), (images.len() - 1, f32::NEG_INFINITY)] {
        let mut batch = in_place.input_mut([6, 32, 8, 8]).unwrap();
        batch.assign(&images);
        batch.as_slice_mut().unwrap()[position] = value;
        let error = in_place.forward_backward_in_place(&labels).unwrap_err();
        assert!(
            matches!(&error, Error::NonFinite { what, .. } if what.contains(&format!("element {position} "))),
            "{error}"
        );
    }

    // Gathering into a buffer of the wrong shape is refused.
    let mut labels_out = Vec::new();
    let error = data
        .train
        .gather(
            &[0, 1, 2],
            in_place.input_mut([2, 32, 8, 8]).unwrap(),
            &mut labels_out,
        )
        .unwrap_err();
    assert!(matches!(error, Error::ShapeMismatch { .. }), "{error}");
}

#[test]
fn sgd_and_adam_follow_their_update_formulas() {
    // One parameter θ = [1, -2] with loss mse(θ, 0) = (θ₀² + θ₁²)/2, so ∇ = θ.
    let run = |kind: OptimizerKind, steps: usize| {
        let mut graph = Graph::<f64>::new();
        let theta = graph
            .param(
                "theta",
                ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, -2.0]).unwrap(),
            )
            .unwrap();
        let zero = graph.input("zero");
        graph
            .set_input(zero, ArrayD::zeros(IxDyn(&[2])).view())
            .unwrap();
        let loss = graph.mse(theta, zero).unwrap();
        let mut optimizer = Optimizer::new(kind).unwrap();
        for _ in 0..steps {
            graph.zero_grad();
            graph.forward(loss).unwrap();
            graph.backward(loss).unwrap();
            optimizer.step(&mut graph, 0.1).unwrap();
        }
        graph.value(theta).unwrap().to_owned()
    };
    // SGD, μ = 0.9, λ = 0: v₁ = θ₀ → θ₁ = 0.9·θ₀; v₂ = 0.9·θ₀ + 0.9·θ₀ → θ₂ = 0.9θ₀ − 0.1·1.8θ₀ = 0.72θ₀.
    let sgd = run(
        OptimizerKind::Sgd {
            momentum: 0.9,
            weight_decay: 0.0,
        },
        2,
    );
    approx::assert_abs_diff_eq!(sgd[0], 0.72, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(sgd[1], -1.44, epsilon = 1e-12);
    // Adam's first step moves every coordinate by lr·sign(g) (m̂/√ŝ = g/|g|, up to ε).
    let adam = run(OptimizerKind::adam(), 1);
    approx::assert_abs_diff_eq!(adam[0], 0.9, epsilon = 1e-6);
    approx::assert_abs_diff_eq!(adam[1], -1.9, epsilon = 1e-6);
}

#[test]
fn schedules_give_the_documented_rates() {
    let cosine = Schedule::cosine(110).with_warmup(10);
    approx::assert_abs_diff_eq!(cosine.rate(1.0, 0), 0.1, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(cosine.rate(1.0, 10), 1.0, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(cosine.rate(1.0, 60), 0.5, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(cosine.rate(1.0, 110), 0.0, epsilon = 1e-12);
    let step = Schedule::step(5, 0.5);
    assert_eq!(
        (step.rate(1.0, 4), step.rate(1.0, 5), step.rate(1.0, 10)),
        (1.0, 0.5, 0.25)
    );
    // Warm-up, then the step decay counted from the end of the warm-up.
    let warm_step = Schedule::step(5, 0.5).with_warmup(4);
    let rates: Vec<f64> = [0, 3, 4, 8, 9, 14].map(|t| warm_step.rate(1.0, t)).to_vec();
    assert_eq!(rates, [0.25, 1.0, 1.0, 1.0, 0.5, 0.25]);
    let constant = Schedule::constant().with_warmup(2);
    assert_eq!((constant.rate(2.0, 0), constant.rate(2.0, 7)), (1.0, 2.0));
    assert!(Schedule::step(0, 0.5).validate().is_err());
    assert!(Schedule::step(3, f64::NAN).validate().is_err());
}

#[test]
fn bad_training_settings_are_invalid_configs() {
    let zero_epochs = TrainConfig {
        epochs: 0,
        ..config(OptimizerKind::sgd(), 0.1)
    };
    assert!(matches!(
        Trainer::<f32>::new(zero_epochs, 10),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Trainer::<f32>::new(config(OptimizerKind::sgd(), f64::NAN), 10),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Trainer::<f32>::new(config(OptimizerKind::sgd(), 0.1), 0),
        Err(Error::EmptyBatch { .. })
    ));
    let bad_momentum = OptimizerKind::Sgd {
        momentum: 1.5,
        weight_decay: 0.0,
    };
    assert!(matches!(
        Optimizer::<f32>::new(bad_momentum),
        Err(Error::InvalidConfig { .. })
    ));
    let odd_blob = SyntheticConfig {
        blob_side: 3,
        ..SyntheticConfig::default()
    };
    assert!(matches!(
        generate(&odd_blob, 0),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Model::new(Architecture::bottleneck(0, 8, 4), 0),
        Err(Error::InvalidConfig { .. })
    ));
}

/// The model runs its backward pass in chunks only when the batch's intermediate gradients
/// are large (over `CHUNK_ABOVE_BYTES`): there, an intermediate gradient is no longer kept.
#[test]
fn the_model_chunks_its_backward_pass_only_for_large_batches() {
    use pointwise::model::CHUNK_ABOVE_BYTES;
    for (channels, side, chunked) in [(32, 8, false), (128, 32, true)] {
        let mut model = Model::new(Architecture::bottleneck(channels, 32, 4), 1).unwrap();
        let images = ndarray::Array4::from_shape_fn((16, channels, side, side), |(n, c, h, w)| {
            ((n * 7 + c * 3 + h * 5 + w) % 11) as f32 * 0.1 - 0.5
        });
        let labels: Vec<usize> = (0..16).map(|n| n % 4).collect();
        model.forward_backward(images.view(), &labels).unwrap();
        let graph = model.graph();
        let loss = graph.node_ids().last().unwrap();
        let bytes = graph.intermediate_gradient_bytes(loss).unwrap();
        assert_eq!(bytes > CHUNK_ABOVE_BYTES, chunked, "{bytes} bytes");
        let expand = graph
            .node_ids()
            .filter(|&id| graph.kind(id).unwrap() == "conv1x1+relu")
            .last()
            .unwrap();
        assert_eq!(graph.grad(expand).is_err(), chunked);
        // Parameter gradients are there either way.
        for id in graph.params() {
            assert!(graph.grad(id).unwrap().iter().any(|&g| g != 0.0));
        }
    }
}

/// Hyper-parameters are checked as the element type holds them: ε = 1e-50 is 0 in f32 (0/0 on
/// a zero gradient), a weight decay of 1e300 is infinite there, a learning rate of 1e39
/// overflows and one of 1e-300 rounds to 0 (a run that would silently not train).
#[test]
fn hyper_parameters_are_checked_in_the_element_type() {
    let tiny_eps = OptimizerKind::Adam {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-50,
        weight_decay: 0.0,
    };
    assert!(matches!(
        Optimizer::<f32>::new(tiny_eps),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(Optimizer::<f64>::new(tiny_eps).is_ok());
    let huge_decay = OptimizerKind::Sgd {
        momentum: 0.9,
        weight_decay: 1e300,
    };
    assert!(matches!(
        Optimizer::<f32>::new(huge_decay),
        Err(Error::InvalidConfig { .. })
    ));
    let mut model = Model::new(Architecture::bottleneck(4, 2, 3), 0).unwrap();
    let images = ndarray::Array4::<f32>::ones((2, 4, 2, 2));
    model.forward_backward(images.view(), &[0, 1]).unwrap();
    let mut optimizer = Optimizer::<f32>::new(OptimizerKind::sgd()).unwrap();
    for lr in [1e39, 1e-300, f64::NAN, -1.0] {
        assert!(
            matches!(
                optimizer.step(model.graph_mut(), lr),
                Err(Error::InvalidConfig { .. })
            ),
            "{lr}"
        );
    }
    assert_eq!(optimizer.steps(), 0);
}

/// A step whose update of a later parameter overflows changes nothing: not the earlier
/// parameters, not the optimizer's state or step count.
#[test]
fn an_optimizer_step_is_all_or_nothing() {
    // y = W1·x1 + W2·x2 with x1 ~ 1e-3 and x2 ~ 1e3: at lr 1e36 W1's update is finite and
    // W2's overflows f32.
    let mut graph = Graph::<f32>::new();
    let (x1, x2, target) = (graph.input("x1"), graph.input("x2"), graph.input("t"));
    let w1 = graph
        .param("w1", ArrayD::from_elem(IxDyn(&[2, 3]), 0.5))
        .unwrap();
    let w2 = graph
        .param("w2", ArrayD::from_elem(IxDyn(&[2, 3]), 0.5))
        .unwrap();
    let (a, b) = (
        graph.linear(x1, w1, None).unwrap(),
        graph.linear(x2, w2, None).unwrap(),
    );
    let y = graph.add(a, b).unwrap();
    let loss = graph.mse(y, target).unwrap();
    graph
        .set_input(x1, ArrayD::from_elem(IxDyn(&[4, 3]), 1e-3).view())
        .unwrap();
    graph
        .set_input(x2, ArrayD::from_elem(IxDyn(&[4, 3]), 1e3).view())
        .unwrap();
    graph
        .set_input(target, ArrayD::zeros(IxDyn(&[4, 2])).view())
        .unwrap();
    graph.forward(loss).unwrap();
    graph.backward(loss).unwrap();
    let before: Vec<ArrayD<f32>> = [w1, w2]
        .map(|p| graph.value(p).unwrap().to_owned())
        .to_vec();
    let mut optimizer = Optimizer::<f32>::new(OptimizerKind::adam()).unwrap();
    let mut sgd = Optimizer::<f32>::new(OptimizerKind::sgd()).unwrap();
    let error = sgd.step(&mut graph, 1e36).unwrap_err();
    assert!(
        matches!(&error, Error::NonFinite { what, .. } if what.contains("w2")),
        "{error}"
    );
    let after: Vec<ArrayD<f32>> = [w1, w2]
        .map(|p| graph.value(p).unwrap().to_owned())
        .to_vec();
    assert_eq!(before, after);
    assert_eq!(sgd.steps(), 0);
    // The same gradients at a sane rate update both.
    optimizer.step(&mut graph, 1e-3).unwrap();
    assert_ne!(graph.value(w1).unwrap(), before[0]);
    assert_eq!(optimizer.steps(), 1);
}
