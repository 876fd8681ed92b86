//! The Network-in-Network learns real digits: a few hundred steps on 1,000 MNIST images, in the
//! debug build `cargo test` runs.

use ndarray::Axis;
use pointwise::data::Dataset;
use pointwise::models::{mnist_nin, MNIST_CLASSES};
use pointwise::optim::{OptimizerKind, Schedule};
use pointwise::train::{evaluate, TrainConfig, Trainer};
use std::path::Path;

/// The first `train` digits for training and `test` digits from the recipe's test range
/// (images 8,000 on), normalised as the recipe normalises them.
fn digits(train: usize, test: usize) -> (Dataset, Dataset) {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist-10k");
    let all = pointwise::idx::read_digits(
        &folder.join("mnist-10k-images-idx3-ubyte.gz"),
        &folder.join("mnist-10k-labels-idx1-ubyte.gz"),
        MNIST_CLASSES,
    )
    .unwrap();
    let images = all.images.mapv(|p| (p / 255.0 - 0.1307) / 0.3081);
    let pick = |start: usize, count: usize| {
        let range: Vec<usize> = (start..start + count).collect();
        Dataset::new(
            images.select(Axis(0), &range),
            range.iter().map(|&i| all.labels[i]).collect(),
        )
        .unwrap()
    };
    (pick(0, train), pick(8000, test))
}

#[test]
fn the_nin_network_learns_digits_from_a_1000_image_subset() {
    let (train, test) = digits(1000, 500);
    let mut model = mnist_nin(0).unwrap();
    let before = evaluate(&mut model, &test, 250).unwrap();
    let mut config = TrainConfig::new(3, 16, 3e-3, OptimizerKind::adam());
    let steps_per_epoch = config.steps_per_epoch(train.len()); // 63: 189 steps in all
    config.schedule = Schedule::cosine(3 * steps_per_epoch).with_warmup(steps_per_epoch);
    let mut trainer = Trainer::new(config, train.len()).unwrap();
    let losses: Vec<f64> = (0..3)
        .map(|_| {
            trainer
                .train_epoch(&mut model, &train, |_, _, _| {})
                .unwrap()
                .train_loss
        })
        .collect();
    let after = evaluate(&mut model, &test, 250).unwrap();
    println!(
        "losses {losses:?}; test accuracy {:.1} % before, {:.1} % after",
        100.0 * before.accuracy,
        100.0 * after.accuracy
    );
    assert!(
        losses[2] < losses[0] / 3.0,
        "the loss did not fall: {losses:?}"
    );
    // Chance is 10 %; the floor leaves room for another CPU's rounding.
    assert!(after.accuracy > 0.85, "test accuracy {:.3}", after.accuracy);
}
