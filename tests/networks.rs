//! Networks that are not the bottleneck, through the public API only: built with `Layers`,
//! trained with `Trainer`, saved, and rebuilt from the weight file alone with bit-identical
//! outputs. Also: frozen parameters, parameter groups, a regression, strict and non-strict
//! loading, and a parameter the loss does not reach.

use pointwise::checkpoint::{self, LoadOptions, Metadata};
use pointwise::data::{generate, Dataset, Synthetic, SyntheticConfig};
use pointwise::layers::Layers;
use pointwise::optim::{OptimizerKind, ParamGroup, Schedule};
use pointwise::train::{evaluate, TrainConfig, Trainer};
use pointwise::{Error, Graph, Model};
use std::path::PathBuf;

fn folder(test: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("networks")
        .join(test);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    path
}

/// 8 channels, 8×8 maps, 4 classes; 96 training images.
fn data() -> Synthetic {
    let config = SyntheticConfig {
        channels: 8,
        train_images: 96,
        test_images: 32,
        ..SyntheticConfig::default()
    };
    generate(&config, 1).unwrap()
}

/// A residual block with batch norm: x → 1×1 8→4 → BN → ReLU → 1×1 4→8, + x, ReLU → GAP →
/// linear. Names as PyTorch's `block1.reduce.weight`, ...
fn residual(seed: u64) -> Model {
    residual_with_head(seed, "head")
}

/// [`residual`] with its linear head named `head`.
fn residual_with_head(seed: u64, head: &str) -> Model {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, seed);
    let x = nn.input("x");
    let mut block = nn.scope("block1");
    let h = block.conv1x1("reduce", x, 8, 4, false).unwrap();
    let h = block.batch_norm("bn", h, 4).unwrap();
    let h = block.relu(h).unwrap();
    let h = block.conv1x1("expand", h, 4, 8, true).unwrap();
    let h = nn.add(h, x).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear(head, h, 8, 4, true).unwrap();
    Model::classifier(graph, x, logits).unwrap()
}

/// A linear head on a flattened map: 3×3 conv 8→6 → ReLU → 2×2 max pool → flatten (96) →
/// linear 96→4.
fn flattened(seed: u64) -> Model {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, seed);
    let x = nn.input("x");
    let h = nn.conv2d("conv", x, [8, 6, 3], [1, 1], true).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.max_pool(h, 2, 2).unwrap();
    let h = nn.flatten(h).unwrap();
    let logits = nn.linear("fc", h, 96, 4, true).unwrap();
    Model::classifier(graph, x, logits).unwrap()
}

/// A depthwise-separable block whose two convolutions are frozen: only the batch norm and the
/// head train.
fn frozen(seed: u64) -> Model {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, seed);
    let x = nn.input("x");
    let h = nn.depthwise("dw", x, [8, 1, 3], [1, 1], false).unwrap();
    let h = nn.conv1x1("pw", h, 8, 8, false).unwrap();
    let h = nn.batch_norm("bn", h, 8).unwrap();
    let h = nn.relu6(h).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear("head", h, 8, 4, true).unwrap();
    for name in ["dw.weight", "pw.weight"] {
        let id = graph.find(name).unwrap();
        graph.set_trainable(id, false).unwrap();
    }
    Model::classifier(graph, x, logits).unwrap()
}

fn config(epochs: usize) -> TrainConfig {
    let mut config = TrainConfig::new(epochs, 16, 0.01, OptimizerKind::adam());
    config.schedule = Schedule::cosine(6 * epochs as u64).with_warmup(3);
    config.seed = 4;
    config
}

fn train(model: &mut Model, data: &Dataset, config: TrainConfig) -> Vec<f64> {
    let epochs = config.epochs;
    let mut trainer = Trainer::new(config, data.len()).unwrap();
    (0..epochs)
        .map(|_| {
            trainer
                .train_epoch(model, data, |_, _, _| {})
                .unwrap()
                .train_loss
        })
        .collect()
}

fn state_bits(model: &Model) -> Vec<(String, Vec<u32>)> {
    let state = model.graph().state().unwrap();
    let mut bits: Vec<(String, Vec<u32>)> = state
        .tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.iter().map(|v| v.to_bits()).collect()))
        .collect();
    bits.extend(
        state
            .counters
            .iter()
            .map(|(name, c)| (name.clone(), vec![*c as u32])),
    );
    bits
}

/// Outputs on the test images in evaluation mode and in training mode, as bits.
fn outputs(model: &mut Model, data: &Dataset) -> Vec<u32> {
    let mut bits = Vec::new();
    for training in [false, true] {
        model.graph_mut().set_training(training);
        let output = model.output(data.images()).unwrap();
        bits.extend(output.iter().map(|v| v.to_bits()));
    }
    bits
}

#[test]
fn three_networks_train_save_and_rebuild_from_the_file_alone_bit_identically() {
    let data = data();
    let dir = folder("three");
    for (name, build) in [
        ("residual", residual as fn(u64) -> Model),
        ("flattened", flattened),
        ("frozen", frozen),
    ] {
        let mut model = build(3);
        let before = state_bits(&model);
        let losses = train(&mut model, &data.train, config(3));
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        assert!(
            losses[2] < losses[0],
            "{name}: the loss did not fall: {losses:?}"
        );
        let after = state_bits(&model);
        // Every trainable tensor moved; the frozen ones did not.
        for ((tensor, old), (_, new)) in before.iter().zip(&after) {
            let frozen = tensor == "dw.weight" || tensor == "pw.weight";
            assert_eq!(old == new, frozen, "{name}: {tensor}");
        }
        let path = dir.join(format!("{name}.pw"));
        checkpoint::save(&model, &Metadata::new(3, 3), &path).unwrap();
        // Rebuilt from the file alone: the same graph, state and outputs, bit for bit.
        let mut rebuilt = checkpoint::load(&path, LoadOptions::default())
            .unwrap()
            .into_model();
        assert_eq!(
            rebuilt.graph().describe(),
            model.graph().describe(),
            "{name}"
        );
        assert_eq!(state_bits(&rebuilt), after, "{name}");
        assert_eq!(
            outputs(&mut rebuilt, &data.test),
            outputs(&mut model, &data.test),
            "{name}"
        );
        let reloaded = evaluate(&mut rebuilt, &data.test, 7).unwrap();
        assert_eq!(
            reloaded,
            evaluate(&mut model, &data.test, 7).unwrap(),
            "{name}"
        );
        // Frozen stays frozen in the file.
        if name == "frozen" {
            let id = rebuilt.graph().find("dw.weight").unwrap();
            assert!(!rebuilt.graph().is_trainable(id).unwrap());
        }
    }
}

#[test]
fn a_regressor_trains_on_target_tensors_and_round_trips() {
    let data = data();
    // Targets: per pixel, the first two channels swapped and halved — a 1×1 map to learn.
    let images = data.train.images().to_owned();
    let mut targets = images.slice(ndarray::s![.., 0..2, .., ..]).to_owned();
    targets.invert_axis(ndarray::Axis(1));
    targets *= 0.5;
    let train_set = Dataset::regression(images, targets.into_dyn()).unwrap();
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, 2);
    let x = nn.input("x");
    let prediction = nn.conv1x1("map", x, 8, 2, true).unwrap();
    let mut model = Model::regressor(graph, x, prediction).unwrap();
    let mut config = TrainConfig::new(6, 16, 0.05, OptimizerKind::adam());
    config.seed = 1;
    let losses = train(&mut model, &train_set, config);
    assert!(
        losses[5] < losses[0] / 20.0,
        "the regression did not learn: {losses:?}"
    );
    let loss = evaluate(&mut model, &train_set, 32).unwrap().loss;
    assert!(loss < losses[0] / 20.0, "{loss}");
    let bytes = checkpoint::to_bytes(&model, &Metadata::new(0, 0)).unwrap();
    let rebuilt = checkpoint::from_bytes(&bytes, LoadOptions::default())
        .unwrap()
        .into_model();
    let positions = |m: &Model| {
        let roles = m.roles();
        let target = roles.target.map(|t| t.index());
        (
            roles.input.index(),
            roles.output.index(),
            roles.loss.index(),
            target,
        )
    };
    assert_eq!(positions(&rebuilt), positions(&model));
    assert!(rebuilt.roles().target.is_some());
    // A classification set is refused by a regressor, with a reason.
    let mut trainer =
        Trainer::new(TrainConfig::new(1, 16, 0.01, OptimizerKind::adam()), 96).unwrap();
    assert!(matches!(
        trainer.train_epoch(&mut model, &data.train, |_, _, _| {}),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn a_parameter_group_trains_at_its_own_rate() {
    let data = data();
    let mut model = residual(5);
    let head_before = model.tensor("head.weight").unwrap().to_owned();
    let bias_before = model.tensor("block1.expand.bias").unwrap().to_owned();
    let mut config = config(1);
    config.groups = vec![
        ParamGroup {
            patterns: vec!["head.*".into()],
            lr_scale: 0.0,
            weight_decay: None,
        },
        ParamGroup {
            patterns: vec!["*.bias".into()],
            lr_scale: 1.0,
            weight_decay: Some(0.0),
        },
    ];
    train(&mut model, &data.train, config);
    assert_eq!(model.tensor("head.weight").unwrap(), head_before);
    assert_ne!(model.tensor("block1.expand.bias").unwrap(), bias_before);
    let bad = ParamGroup {
        patterns: vec!["*".into()],
        lr_scale: f64::NAN,
        weight_decay: None,
    };
    let mut config = self::config(1);
    config.groups = vec![bad];
    assert!(matches!(
        Trainer::<f32>::new(config, 96),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn a_parameter_the_loss_does_not_reach_is_named_unless_frozen() {
    let build = |freeze: bool| {
        let mut graph = Graph::<f32>::new();
        let mut nn = Layers::new(&mut graph, 0);
        let x = nn.input("x");
        let h = nn.global_avg_pool(x).unwrap();
        let logits = nn.linear("head", h, 8, 4, true).unwrap();
        let unused = nn
            .param("spare.weight", ndarray::ArrayD::ones(vec![3]))
            .unwrap();
        if freeze {
            graph.set_trainable(unused, false).unwrap();
        }
        Model::classifier(graph, x, logits)
    };
    let error = build(false).unwrap_err();
    assert!(
        matches!(&error, Error::InvalidConfig { .. }) && error.to_string().contains("spare.weight"),
        "{error}"
    );
    build(true).unwrap();
}

#[test]
fn load_into_is_strict_by_default_and_reports_when_not() {
    let dir = folder("load_into");
    let path = dir.join("residual.pw");
    let trained = residual(1);
    checkpoint::save(&trained, &Metadata::new(1, 0), &path).unwrap();
    // The same block with a differently named head.
    let mut mine = residual_with_head(9, "classifier");
    let untouched = state_bits(&mine);
    let error = checkpoint::load_into(&mut mine, &path, LoadOptions::default()).unwrap_err();
    assert!(error.to_string().contains("classifier.weight"), "{error}");
    assert_eq!(state_bits(&mine), untouched);
    let loose = LoadOptions {
        strict: false,
        ..LoadOptions::default()
    };
    let loaded = checkpoint::load_into(&mut mine, &path, loose).unwrap();
    assert_eq!(
        loaded.report.missing,
        ["classifier.weight", "classifier.bias"]
    );
    assert_eq!(loaded.report.unexpected, ["head.weight", "head.bias"]);
    assert_eq!(
        mine.tensor("block1.reduce.weight").unwrap(),
        trained.tensor("block1.reduce.weight").unwrap()
    );
    assert_ne!(
        mine.tensor("classifier.weight").unwrap(),
        trained.tensor("head.weight").unwrap()
    );
    // A plain graph (no loss, no model) loads by name too: here the block alone.
    let mut graph = Graph::<f32>::new();
    let mut nn = Layers::new(&mut graph, 2);
    let x = nn.input("x");
    let mut block = nn.scope("block1");
    let h = block.conv1x1("reduce", x, 8, 4, false).unwrap();
    block.batch_norm("bn", h, 4).unwrap();
    let loaded = checkpoint::load_into_graph(&mut graph, &path, loose).unwrap();
    assert!(loaded.report.missing.is_empty());
    assert_eq!(loaded.report.unexpected.len(), 4); // block1.expand.{weight,bias}, head.*
    let id = graph.find("block1.reduce.weight").unwrap();
    assert_eq!(
        graph.value(id).unwrap(),
        trained.tensor("block1.reduce.weight").unwrap()
    );
}

/// The trainer is generic over the element type: the same network trains in f64.
#[test]
fn a_network_trains_in_f64_too() {
    let data = data();
    let mut graph = Graph::<f64>::new();
    let mut nn = Layers::new(&mut graph, 3);
    let x = nn.input("x");
    let h = nn.conv1x1("reduce", x, 8, 4, true).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear("head", h, 4, 4, true).unwrap();
    let mut model = Model::<f64>::classifier(graph, x, logits).unwrap();
    let mut trainer = Trainer::<f64>::new(config(4), data.train.len()).unwrap();
    let losses: Vec<f64> = (0..4)
        .map(|_| {
            trainer
                .train_epoch(&mut model, &data.train, |_, _, _| {})
                .unwrap()
                .train_loss
        })
        .collect();
    assert!(losses[3] < losses[0], "{losses:?}");
    let evaluation = evaluate(&mut model, &data.test, 16).unwrap();
    assert!(evaluation.loss.is_finite() && evaluation.predictions.len() == 32);
}

/// NaN or infinite images are an error for prediction as for training, not class 0.
#[test]
fn predicting_on_non_finite_images_is_an_error() {
    let data = data();
    let mut model = residual(1);
    let mut images = data.test.images().to_owned();
    images[[3, 1, 2, 2]] = f32::NAN;
    assert!(matches!(
        model.predict(images.view()),
        Err(Error::NonFinite { .. })
    ));
    images[[3, 1, 2, 2]] = f32::INFINITY;
    assert!(matches!(
        model.logits(images.view()),
        Err(Error::NonFinite { .. })
    ));
    let bad = Dataset::new(images, data.test.labels().to_vec()).unwrap();
    assert!(matches!(
        evaluate(&mut model, &bad, 8),
        Err(Error::NonFinite { .. })
    ));
    // A hand-made data set with more labels than images is refused when it is made.
    let images = data.test.images().to_owned();
    assert!(Dataset::new(images, vec![0; 33]).is_err());
}

/// MobileNetV2 as torchvision builds it: its parameter count and names, and its pointwise
/// layers at 224×224 — the 19 distinct (C_in, C_out, H) that `bench_shapes` times, as Table 2
/// of Sandler et al. (2018) gives them.
#[test]
fn mobilenet_v2_has_torchvisions_parameters_and_pointwise_layers() {
    let mut model = pointwise::models::mobilenet_v2(1000, 0).unwrap();
    let graph = model.graph();
    let count: usize = graph
        .params()
        .into_iter()
        .map(|id| graph.value(id).unwrap().len())
        .sum();
    assert_eq!(
        count, 3_504_872,
        "torchvision's mobilenet_v2() has 3 504 872"
    );
    for (name, shape) in [
        ("features.0.0.weight", &[32, 3, 3, 3][..]),
        ("features.1.conv.0.0.weight", &[32, 1, 3, 3]),
        ("features.1.conv.1.weight", &[16, 32]),
        ("features.2.conv.0.0.weight", &[96, 16]),
        ("features.2.conv.1.0.weight", &[96, 1, 3, 3]),
        ("features.2.conv.2.weight", &[24, 96]),
        ("features.2.conv.3.bias", &[24]),
        ("features.17.conv.2.weight", &[320, 960]),
        ("features.18.0.weight", &[1280, 320]),
        ("features.18.1.weight", &[1280]),
        ("classifier.1.weight", &[1000, 1280]),
        ("classifier.1.bias", &[1000]),
    ] {
        let id = graph.find(name).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(graph.value(id).unwrap().shape(), shape, "{name}");
    }

    model
        .logits(ndarray::Array4::zeros((1, 3, 224, 224)).view())
        .unwrap();
    let graph = model.graph();
    let mut pointwise = Vec::new();
    let mut distinct = Vec::new();
    let (mut macs, mut pointwise_macs) = (0, 0);
    for id in graph.node_ids() {
        // The loss has not run (logits only): it is the one node without a value.
        let Ok(cost) = graph.cost(id) else { continue };
        macs += cost.forward_macs;
        if graph.kind(id).unwrap() != "conv1x1" {
            continue;
        }
        pointwise_macs += cost.forward_macs;
        let inputs = graph.inputs(id).unwrap();
        let (x, weight) = (
            graph.value(inputs[0]).unwrap(),
            graph.value(inputs[1]).unwrap(),
        );
        let layer = [x.shape()[1], weight.shape()[0], x.shape()[2]];
        assert_eq!(x.shape()[2], x.shape()[3]);
        pointwise.push(layer);
        if !distinct.contains(&layer) {
            distinct.push(layer);
        }
    }
    // 17 projections, 16 expansions (the first block has none), the last 1×1; "300M"
    // multiply-adds in the paper's Table 3.
    assert_eq!(pointwise.len(), 34);
    assert_eq!((macs, pointwise_macs), (300_774_272, 267_939_840));
    let table: [[usize; 3]; 19] = [
        [32, 16, 112],
        [16, 96, 112],
        [96, 24, 56],
        [24, 144, 56],
        [144, 24, 56],
        [144, 32, 28],
        [32, 192, 28],
        [192, 32, 28],
        [192, 64, 14],
        [64, 384, 14],
        [384, 64, 14],
        [384, 96, 14],
        [96, 576, 14],
        [576, 96, 14],
        [576, 160, 7],
        [160, 960, 7],
        [960, 160, 7],
        [960, 320, 7],
        [320, 1280, 7],
    ];
    assert_eq!(distinct, table);
}

/// MobileNetV2 trains end to end: one step on two 32×32 images gives every parameter a
/// finite gradient and every weight a nonzero one (its maps shrink to 1×1 there; depthwise
/// padding keeps them valid). Not every shift: a batch norm whose output reaches the loss only
/// through other batch norms (every projection's) has Σ dY = 0 per channel, since a batch
/// norm's input gradient sums to zero over the batch; with two values per channel (blocks
/// 14–17, on 1×1 maps at this size) that zero is exact.
#[test]
fn mobilenet_v2_takes_a_training_step() {
    let mut model = pointwise::models::mobilenet_v2(10, 1).unwrap();
    let images = ndarray::Array4::from_shape_fn((2, 3, 32, 32), |(n, c, h, w)| {
        ((n * 7 + c * 5 + h * 3 + w) % 11) as f32 / 11.0 - 0.5
    });
    let loss = model.forward_backward(images.view(), &[3, 7]).unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    let graph = model.graph();
    for id in graph.params() {
        let grad = graph.grad(id).unwrap();
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{}",
            graph.name(id).unwrap()
        );
        let name = graph.name(id).unwrap();
        if name.ends_with(".weight") {
            assert!(grad.iter().any(|&g| g != 0.0), "no gradient reaches {name}");
        }
    }
}
