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
use ndarray::{s, Array4, Axis};
use ndarray_rand::rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use pointwise::layers::Layers;
use pointwise::optim::{Optimizer, OptimizerKind, Schedule};
use pointwise::{Graph, NodeId};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

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

/// Images (N, 1, 28, 28) normalised as in the recipe, and labels.
fn load(root: &Path) -> pointwise::Result<(Array4<f32>, Vec<usize>)> {
    let folder = root.join("data/mnist-10k");
    let digits = pointwise::idx::read_digits(
        &folder.join("mnist-10k-images-idx3-ubyte.gz"),
        &folder.join("mnist-10k-labels-idx1-ubyte.gz"),
        CLASSES,
    )?;
    Ok((
        digits.images.mapv(|p| (p / 255.0 - 0.1307) / 0.3081),
        digits.labels,
    ))
}

fn accuracy(
    graph: &mut Graph<f32>,
    input: NodeId,
    logits: NodeId,
    images: &Array4<f32>,
    labels: &[usize],
) -> pointwise::Result<f64> {
    graph.set_training(false);
    let mut correct = 0;
    for (chunk, labels) in images
        .axis_chunks_iter(Axis(0), 500)
        .zip(labels.chunks(500))
    {
        graph.set_input(input, chunk.into_dyn())?;
        graph.forward(logits)?;
        let values = graph.value(logits)?;
        for (row, &label) in values.outer_iter().zip(labels) {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (k, &v)| if v > b.1 { (k, v) } else { b },
                );
            correct += usize::from(best.0 == label);
        }
    }
    graph.set_training(true);
    Ok(correct as f64 / labels.len() as f64)
}

fn run(options: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let (images, labels) = load(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let (train_x, test_x) = (
        images.slice(s![..8000, .., .., ..]).to_owned(),
        images.slice(s![8000.., .., .., ..]).to_owned(),
    );
    let (train_y, test_y) = (&labels[..8000], &labels[8000..]);
    let (mut graph, input, logits) = build(options.arch, options.seed)?;
    let loss = graph.softmax_cross_entropy(logits)?;

    // The summary on one batch: which layers do the work.
    graph.set_input(input, train_x.slice(s![..BATCH, .., .., ..]).into_dyn())?;
    graph.set_labels(loss, &train_y[..BATCH])?;
    graph.forward(loss)?;
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

    let steps_per_epoch = train_x.shape()[0].div_ceil(BATCH) as u64;
    let schedule = Schedule::Cosine {
        warmup_steps: steps_per_epoch,
        total_steps: options.epochs * steps_per_epoch,
    };
    let mut optimizer = Optimizer::new(OptimizerKind::adam())?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut order: Vec<usize> = (0..train_x.shape()[0]).collect();
    let mut batch = Array4::<f32>::zeros((BATCH, 1, 28, 28));
    let mut batch_labels = Vec::with_capacity(BATCH);
    let mut step = 0u64;
    println!(
        "{:>6} {:>10} {:>10} {:>10}",
        "epoch", "loss", "test acc", "images/s"
    );
    for epoch in 1..=options.epochs {
        order.shuffle(&mut rng);
        let started = Instant::now();
        let mut loss_sum = 0.0;
        for chunk in order.chunks(BATCH) {
            if batch.shape()[0] != chunk.len() {
                batch = Array4::zeros((chunk.len(), 1, 28, 28));
            }
            batch_labels.clear();
            for (mut slot, &index) in batch.outer_iter_mut().zip(chunk) {
                slot.assign(&train_x.index_axis(Axis(0), index));
                batch_labels.push(train_y[index]);
            }
            graph.set_input(input, batch.view().into_dyn())?;
            graph.set_labels(loss, &batch_labels)?;
            graph.zero_grad();
            graph.forward(loss)?;
            let value = graph.scalar(loss)?;
            if !value.is_finite() {
                return Err(format!("the loss is {value} at step {step} (epoch {epoch})").into());
            }
            loss_sum += f64::from(value) * chunk.len() as f64;
            graph.backward(loss)?;
            optimizer.step(&mut graph, schedule.rate(3e-3, step))?;
            step += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        let test = accuracy(&mut graph, input, logits, &test_x, test_y)?;
        println!(
            "{epoch:>6} {:>10.4} {:>9.2}% {:>10.0}",
            loss_sum / order.len() as f64,
            100.0 * test,
            order.len() as f64 / seconds
        );
    }

    std::fs::create_dir_all(&options.out)?;
    let name = format!("mnist_{:?}.safetensors", options.arch).to_lowercase();
    let path = options.out.join(name);
    let bytes = pointwise::export::graph_to_safetensors(&graph)?;
    pointwise::checkpoint::write_atomically_with(&path, &bytes, |file, bytes| {
        std::io::Write::write_all(file, bytes)
    })?;
    println!(
        "\nweights: {} (loads into the nn.Sequential of mnist_torch.py with load_state_dict)",
        path.display()
    );
    Ok(())
}
