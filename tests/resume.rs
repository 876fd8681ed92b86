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
