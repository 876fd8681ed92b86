//! Resume: 2 epochs, a training checkpoint, then 2 more epochs *in another process* give the
//! same bits as 4 epochs straight: parameters, batch-norm statistics, optimizer moments and
//! step counts — for SGD with momentum and for Adam, at 1 and at 2 threads.
//!
//! The second half runs in a child process: this test binary run again on the test
//! `resume_child` alone, with the checkpoint's path in `POINTWISE_RESUME_FROM`.

use pointwise::checkpoint::{self, LoadOptions, Metadata};
use pointwise::data::{generate, Synthetic, SyntheticConfig};
use pointwise::layers::Layers;
use pointwise::optim::{OptimizerKind, Schedule};
use pointwise::train::{TrainConfig, Trainer, TrainingState};
use pointwise::{Graph, Model};
use std::path::{Path, PathBuf};

const RESUME_FROM: &str = "POINTWISE_RESUME_FROM";

fn data() -> Synthetic {
    let config = SyntheticConfig {
        channels: 8,
        train_images: 96,
        test_images: 8,
        ..SyntheticConfig::default()
    };
    generate(&config, 2).unwrap()
}

/// 1×1 conv → batch norm → ReLU → depthwise 3×3 → 1×1 conv → GAP → linear.
fn network() -> Model {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, 7);
    let x = nn.input("x");
    let h = nn.conv1x1("expand", x, 8, 16, false).unwrap();
    let h = nn.batch_norm("bn", h, 16).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.depthwise("dw", h, [16, 1, 3], [1, 1], true).unwrap();
    let h = nn.conv1x1("project", h, 16, 8, true).unwrap();
    let h = nn.global_avg_pool(h).unwrap();
    let logits = nn.linear("head", h, 8, 4, true).unwrap();
    Model::classifier(graph, x, logits).unwrap()
}

fn config(optimizer: OptimizerKind) -> TrainConfig {
    let mut config = TrainConfig::new(4, 16, 0.02, optimizer);
    // 6 steps an epoch: warm-up over the first epoch, cosine to 0 at the end of the fourth.
    config.schedule = Schedule::cosine(24).with_warmup(6);
    config.seed = 3;
    config
}

fn train(model: &mut Model, trainer: &mut Trainer, epochs: usize) {
    let data = data();
    for _ in 0..epochs {
        trainer
            .train_epoch(model, &data.train, |_, _, _| {})
            .unwrap();
    }
}

/// Everything a run carries forward, as bits.
fn bits(model: &Model, training: &TrainingState) -> Vec<u64> {
    let state = model.graph().state().unwrap();
    let mut bits: Vec<u64> = state
        .tensors
        .iter()
        .flat_map(|(_, t)| t.iter().map(|v| u64::from(v.to_bits())).collect::<Vec<_>>())
        .collect();
    bits.extend(state.counters.iter().map(|(_, c)| *c));
    for moment in training
        .optimizer
        .first
        .iter()
        .chain(&training.optimizer.second)
    {
        bits.extend(moment.iter().map(|v| u64::from(v.to_bits())));
    }
    bits.extend([training.epoch, training.step, training.optimizer.steps]);
    bits
}

/// The second half, in the child process: resume from the checkpoint, train the remaining
/// epochs, save beside it (`.out`). Does nothing in a normal test run.
#[test]
fn resume_child() {
    let Some(path) = std::env::var_os(RESUME_FROM) else {
        return;
    };
    let path = PathBuf::from(path);
    let checkpoint = checkpoint::load(&path, LoadOptions::default()).unwrap();
    let mut model = checkpoint.model;
    let training = checkpoint.training.expect("a training checkpoint");
    let remaining = training.config.epochs - training.epoch as usize;
    let mut trainer = Trainer::resume(training, data().train.len()).unwrap();
    train(&mut model, &mut trainer, remaining);
    let out = path.with_extension("out");
    checkpoint::save_training(&model, &trainer.state(), &Metadata::new(3, 4), &out).unwrap();
}

fn resume_in_a_child(path: &Path, threads: usize) -> (Model, TrainingState) {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["resume_child", "--exact", "--test-threads=1"])
        .env(RESUME_FROM, path)
        .env("POINTWISE_THREADS", threads.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "the child process failed");
    let resumed = checkpoint::load(&path.with_extension("out"), LoadOptions::default()).unwrap();
    (resumed.model, resumed.training.unwrap())
}

#[test]
fn training_resumed_in_a_new_process_is_bit_identical_to_a_straight_run() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resume");
    std::fs::create_dir_all(&dir).unwrap();
    let data = data();
    for threads in [1, 2] {
        pointwise::parallel::set_threads(threads).unwrap();
        for (name, optimizer) in [
            ("sgd", OptimizerKind::sgd()),
            ("adam", OptimizerKind::adam()),
        ] {
            let mut straight = network();
            let mut trainer = Trainer::new(config(optimizer), data.train.len()).unwrap();
            train(&mut straight, &mut trainer, 4);
            let expected = bits(&straight, &trainer.state());

            let mut first_half = network();
            let mut trainer = Trainer::new(config(optimizer), data.train.len()).unwrap();
            train(&mut first_half, &mut trainer, 2);
            let path = dir.join(format!("{name}-{threads}.pw"));
            let state = trainer.state();
            checkpoint::save_training(&first_half, &state, &Metadata::new(3, 2), &path).unwrap();
            assert_ne!(bits(&first_half, &state), expected);
            let (resumed, training) = resume_in_a_child(&path, threads);
            assert_eq!(training.epoch, 4);
            assert!(
                bits(&resumed, &training) == expected,
                "{name} at {threads} threads: the resumed run differs from the straight one"
            );
        }
    }
}

/// The tests of this file set the global thread count: they take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 1×1 conv 96 → 60 on 12×12 maps (H·W > 128), then a 3×3 conv 60 → 8, forward and
/// backward: every gradient's bits.
fn wide_layer_gradients<T: pointwise::Element>() -> Vec<f64> {
    let mut graph = Graph::<T>::new();
    let mut nn = Layers::new(&mut graph, 5);
    let x = nn.input_with_grad("x");
    let y = nn.conv1x1("layer", x, 96, 60, true).unwrap();
    let y = nn.conv2d("conv", y, [60, 8, 3], [1, 1], true).unwrap();
    let loss = nn.global_avg_pool(y).unwrap();
    let input = ndarray::ArrayD::from_shape_fn(vec![4, 96, 12, 12], |i| {
        T::from_f64(((i[0] * 7 + i[1] * 13 + i[2] * 3 + i[3]) % 17) as f64 / 17.0 - 0.5)
    });
    graph.set_input(x, input.view()).unwrap();
    graph.forward(loss).unwrap();
    let upstream = ndarray::ArrayD::from_shape_fn(vec![4, 8], |i| {
        T::from_f64(((i[0] * 5 + i[1]) % 11) as f64 / 11.0)
    });
    graph.backward_from(loss, upstream.view()).unwrap();
    let mut bits = Vec::new();
    for id in graph.node_ids() {
        if let Ok(grad) = graph.grad(id) {
            bits.extend(grad.iter().map(|v| v.as_f64()));
        }
    }
    bits
}

/// A 1×1 expansion then projection, `channels` → `wide` → `channels` on `side`×`side` maps:
/// values and every gradient's bits. With one sample each product runs outside the ops'
/// parallel parts, so at two or three threads it splits its columns instead; with more output
/// channels than pixels, several samples share a slot of dW's sum.
fn pair_gradients<T: pointwise::Element>(
    batch: usize,
    channels: usize,
    wide: usize,
    side: usize,
) -> Vec<f64> {
    let mut graph = Graph::<T>::new();
    let mut nn = Layers::new(&mut graph, 9);
    let x = nn.input_with_grad("x");
    let y = nn.conv1x1("expand", x, channels, wide, true).unwrap();
    let y = nn.conv1x1("project", y, wide, channels, true).unwrap();
    let input = ndarray::ArrayD::from_shape_fn(vec![batch, channels, side, side], |i| {
        T::from_f64(((i[0] * 7 + i[1] * 13 + i[2] * 3 + i[3]) % 17) as f64 / 17.0 - 0.5)
    });
    graph.set_input(x, input.view()).unwrap();
    graph.forward(y).unwrap();
    let upstream = ndarray::ArrayD::from_shape_fn(vec![batch, channels, side, side], |i| {
        T::from_f64(((i[0] + i[1] * 5 + i[2] + 7 * i[3]) % 11) as f64 / 11.0 - 0.4)
    });
    graph.backward_from(y, upstream.view()).unwrap();
    let mut bits: Vec<f64> = graph.value(y).unwrap().iter().map(|v| v.as_f64()).collect();
    for id in graph.node_ids() {
        if let Ok(grad) = graph.grad(id) {
            bits.extend(grad.iter().map(|v| v.as_f64()));
        }
    }
    bits
}

/// The layers above on one sample (48×48 maps), on five whose expansion has more output
/// channels (300) than pixels (256), and on three with 64 channels or more on both sides of
/// each layer (their backward products run apart: dW split between the threads by its rows or
/// columns, dX packed over the batch); and a linear layer's outputs on 1, 5 and 8 samples
/// (dot products of rows, the threads splitting the outputs) and on 9 (one GEMM over the
/// batch).
fn pairs<T: pointwise::Element>() -> [Vec<f64>; 4] {
    [
        pair_gradients::<T>(1, 16, 96, 48),
        pair_gradients::<T>(5, 16, 300, 16),
        pair_gradients::<T>(3, 64, 80, 16),
        [1, 5, 8, 9]
            .into_iter()
            .flat_map(linear_outputs::<T>)
            .collect(),
    ]
}

/// A linear layer 100 → 37 on `batch` samples: its outputs.
fn linear_outputs<T: pointwise::Element>(batch: usize) -> Vec<f64> {
    let mut graph = Graph::<T>::new();
    let mut nn = Layers::new(&mut graph, 11);
    let x = nn.input("x");
    let y = nn.linear("head", x, 100, 37, true).unwrap();
    let input = ndarray::ArrayD::from_shape_fn(vec![batch, 100], |i| {
        T::from_f64(((i[0] * 7 + i[1] * 13) % 17) as f64 / 17.0 - 0.5)
    });
    graph.set_input(x, input.view()).unwrap();
    graph.forward(y).unwrap();
    graph.value(y).unwrap().iter().map(|v| v.as_f64()).collect()
}

/// Same seed, same bits, whatever the thread count — where the matrix products run on
/// ndarray's GEMM (always in f64) or the gemm crate's (f32 on CPUs without AVX-512): the
/// threads split samples, channels, the columns of dW or a batch-1 product's columns, and each
/// element is summed in the same order either way. (On the AVX-512 kernel, dW of a layer with H·W > 128 could round
/// differently between thread counts; not checked there: README, "Determinism".)
#[test]
fn results_do_not_depend_on_the_thread_count_off_the_avx512_kernel() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let f32_checked = pointwise::gemm::backend::<f32>() != "avx512";
    let (mut wide64, mut wide32, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    // Split however small the work (the shapes here are small), and once as by default.
    let default = pointwise::parallel::SPLIT_FROM_VALUES;
    for (threads, split_from) in [(1, 0), (2, 0), (3, 0), (2, default)] {
        pointwise::parallel::set_threads(threads).unwrap();
        pointwise::parallel::set_split_from(split_from);
        wide64.push((wide_layer_gradients::<f64>(), pairs::<f64>()));
        if f32_checked {
            wide32.push((wide_layer_gradients::<f32>(), pairs::<f32>()));
            let mut model = network();
            let mut trainer =
                Trainer::new(config(OptimizerKind::adam()), data().train.len()).unwrap();
            train(&mut model, &mut trainer, 2);
            runs.push(bits(&model, &trainer.state()));
        }
    }
    pointwise::parallel::set_threads(1).unwrap();
    pointwise::parallel::set_split_from(default);
    assert!(
        wide64.windows(2).all(|w| w[0] == w[1]),
        "f64 gradients differ"
    );
    assert!(
        wide32.windows(2).all(|w| w[0] == w[1]),
        "f32 gradients differ"
    );
    assert!(runs.windows(2).all(|w| w[0] == w[1]), "training differs");
    println!(
        "thread-count independence checked in f64{}",
        if f32_checked {
            " and f32 (training too)"
        } else {
            ""
        }
    );
}
