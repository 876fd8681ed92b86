//! Real data: 10,000 MNIST digits (`data/mnist-10k/`), a Network-in-Network or a MobileNet-style
//! network, the recipe of PyTorch's `mnist_torch.py`, so that the two compare.
//!
//! ```sh
//! cargo run --release --example train_mnist                    # --arch nin
//! cargo run --release --example train_mnist -- --arch mobilenet
//! ```
//! Recipe: the first 8,000 images train, the last 2,000 test; pixels x/255, then
//! (x − 0.1307)/0.3081; Adam (0.9, 0.999, 1e-8), lr 3e-3, linear warm-up over the first epoch
//! and cosine decay to 0; batch 64; 8 epochs; PyTorch's default initialisation; evaluation in
//! eval mode. Parameters are named as the `nn.Sequential` of `mnist_torch.py` names them
//! (`"0.weight"`, `"1.running_mean"`, …), so the written `.safetensors` loads into it.

use clap::{Parser, ValueEnum};
use ndarray::Axis;
use pointwise::data::Dataset;
use pointwise::layers::Layers;
use pointwise::optim::{OptimizerKind, Schedule};
use pointwise::train::{evaluate, TrainConfig, Trainer};
use pointwise::{Graph, Model, NodeId};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Train a Network-in-Network or a MobileNet-style network on 10,000 MNIST digits.
#[derive(Parser, Debug)]
struct Options {
    /// Which network.
    #[arg(long, value_enum, default_value_t = Arch::Nin)]
    arch: Arch,
    /// Training epochs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..1000))]
    epochs: u64,
    /// Seed of the initial weights and the shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the weights go.
    #[arg(long, default_value = "target/train_mnist")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arch {
    Nin,
    Mobilenet,
}

const BATCH: usize = 64;
const CLASSES: usize = 10;

fn main() -> ExitCode {
    let options = Options::parse();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// conv (no bias) + batch norm + ReLU, named `i`, `i+1` as in `conv_bn_relu` of mnist_torch.py;
/// `groups = c_in` makes the conv depthwise. Returns the output and the next index.
fn conv_bn_relu(
    nn: &mut Layers<f32>,
    (x, i): (NodeId, usize),
    [c_in, c_out, kernel, padding]: [usize; 4],
    depthwise: bool,
) -> pointwise::Result<(NodeId, usize)> {
    let name = i.to_string();
    let h = match (kernel, depthwise) {
        (_, true) => nn.depthwise(&name, x, [c_in, 1, kernel], [1, padding], false)?,
        (1, false) => nn.conv1x1(&name, x, c_in, c_out, false)?,
        _ => nn.conv2d(&name, x, [c_in, c_out, kernel], [1, padding], false)?,
    };
    let h = nn.batch_norm(&(i + 1).to_string(), h, c_out)?;
    Ok((nn.relu(h)?, i + 3))
}

/// The network of `mnist_torch.py`; returns (graph, input, logits).
fn build(arch: Arch, seed: u64) -> pointwise::Result<(Graph<f32>, NodeId, NodeId)> {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, seed);
    let x = nn.input("image");
    let logits = match arch {
        Arch::Nin => {
            let h = conv_bn_relu(&mut nn, (x, 0), [1, 32, 5, 2], false)?;
            let (h, i) = conv_bn_relu(&mut nn, h, [32, 32, 1, 0], false)?;
            let h = (nn.max_pool(h, 2, 2)?, i + 1);
            let h = conv_bn_relu(&mut nn, h, [32, 64, 3, 1], false)?;
            let (h, i) = conv_bn_relu(&mut nn, h, [64, 64, 1, 0], false)?;
            let h = (nn.max_pool(h, 2, 2)?, i + 1);
            let (h, i) = conv_bn_relu(&mut nn, h, [64, 128, 3, 1], false)?;
            // One map per class, averaged: the 1×1 convolution *is* the classifier.
            let maps = nn.conv1x1(&i.to_string(), h, 128, CLASSES, true)?;
            nn.global_avg_pool(maps)?
        }
        Arch::Mobilenet => {
            let mut h = conv_bn_relu(&mut nn, (x, 0), [1, 32, 3, 1], false)?;
            for (c_in, c_out, pool) in [
                (32, 64, true),
                (64, 128, true),
                (128, 128, false),
                (128, 256, false),
            ] {
                h = conv_bn_relu(&mut nn, h, [c_in, c_in, 3, 1], true)?;
                h = conv_bn_relu(&mut nn, h, [c_in, c_out, 1, 0], false)?;
                if pool {
                    h = (nn.max_pool(h.0, 2, 2)?, h.1 + 1);
                }
            }
            let pooled = nn.global_avg_pool(h.0)?;
            nn.linear(&(h.1 + 2).to_string(), pooled, 256, CLASSES, true)?
        }
    };
    Ok((graph, x, logits))
}

/// The recipe's split of the digits, normalised: the first 8,000 train, the last 2,000 test.
fn load(root: &Path) -> pointwise::Result<(Dataset, Dataset)> {
    let folder = root.join("data/mnist-10k");
    let digits = pointwise::idx::read_digits(
        &folder.join("mnist-10k-images-idx3-ubyte.gz"),
        &folder.join("mnist-10k-labels-idx1-ubyte.gz"),
        CLASSES,
    )?;
    let images = digits.images.mapv(|p| (p / 255.0 - 0.1307) / 0.3081);
    let (train, test) = images.view().split_at(Axis(0), 8000);
    Ok((
        Dataset::new(train.to_owned(), digits.labels[..8000].to_vec())?,
        Dataset::new(test.to_owned(), digits.labels[8000..].to_vec())?,
    ))
}

fn run(options: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let (train, test) = load(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let (graph, input, logits) = build(options.arch, options.seed)?;
    let mut model = Model::classifier(graph, input, logits)?;

    // The summary on one batch: which layers do the work.
    let first: Vec<usize> = (0..BATCH).collect();
    let mut labels = Vec::new();
    train.gather(&first, model.input_mut([BATCH, 1, 28, 28])?, &mut labels)?;
    model.forward_backward_in_place(&labels)?;
    let graph = model.graph();
    print!("{}", graph.summary()?);
    let (mut all, mut pointwise_macs) = (0u64, 0u64);
    for id in graph.node_ids() {
        let macs = graph.cost(id)?.forward_macs;
        all += macs;
        if graph.kind(id)?.starts_with("conv1x1") {
            pointwise_macs += macs;
        }
    }
    println!(
        "1×1 layers: {:.1} % of the forward multiply-adds\n",
        100.0 * pointwise_macs as f64 / all as f64
    );

    let mut config = TrainConfig::new(options.epochs as usize, BATCH, 3e-3, OptimizerKind::adam());
    let steps_per_epoch = config.steps_per_epoch(train.len());
    config.schedule =
        Schedule::cosine(config.epochs as u64 * steps_per_epoch).with_warmup(steps_per_epoch);
    config.seed = options.seed;
    let mut trainer = Trainer::new(config, train.len())?;
    println!(
        "{:>6} {:>10} {:>10} {:>10}",
        "epoch", "loss", "test acc", "images/s"
    );
    for _ in 0..options.epochs {
        let report = trainer.train_epoch(&mut model, &train, |_, _, _| {})?;
        let evaluation = evaluate(&mut model, &test, 500)?;
        println!(
            "{:>6} {:>10.4} {:>9.2}% {:>10.0}",
            report.epoch,
            report.train_loss,
            100.0 * evaluation.accuracy,
            report.images_per_second
        );
    }

    std::fs::create_dir_all(&options.out)?;
    let name = format!("mnist_{:?}.safetensors", options.arch).to_lowercase();
    let path = options.out.join(name);
    pointwise::export::save_safetensors(&model, &path)?;
    println!(
        "\nweights: {} (loads into the nn.Sequential of mnist_torch.py with load_state_dict)",
        path.display()
    );
    Ok(())
}
