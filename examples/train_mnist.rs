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
use plotters::prelude::*;
use pointwise::data::Dataset;
use pointwise::models;
use pointwise::optim::{OptimizerKind, Schedule};
use pointwise::train::{evaluate, TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod common;

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
    /// Before training, time 20 training steps node by node and print where the time goes.
    #[arg(long)]
    profile: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arch {
    Nin,
    Mobilenet,
}

const BATCH: usize = 64;
const CLASSES: usize = 10;

fn main() -> ExitCode {
    common::exit_code(run(&Options::parse()))
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
    let mut model = match options.arch {
        Arch::Nin => models::mnist_nin(options.seed)?,
        Arch::Mobilenet => models::mnist_mobilenet(options.seed)?,
    };

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
    if options.profile {
        profile(&mut model, &train)?;
    }

    let mut config = TrainConfig::new(options.epochs as usize, BATCH, 3e-3, OptimizerKind::adam());
    let steps_per_epoch = config.steps_per_epoch(train.len());
    config.schedule =
        Schedule::cosine(config.epochs as u64 * steps_per_epoch).with_warmup(steps_per_epoch);
    config.seed = options.seed;
    let mut trainer = Trainer::new(config, train.len())?;
    // The output folder is checked before training, not after.
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("--out {}: {e}", options.out.display()))?;
    let name = format!("mnist_{:?}", options.arch).to_lowercase();
    let weights = options.out.join(format!("{name}.safetensors"));
    pointwise::checkpoint::check_writable(&weights)?;
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>9}",
        "epoch", "loss", "test acc", "images/s", "train s"
    );
    let (mut losses, mut accuracies) = (Vec::new(), Vec::new());
    let mut evaluation = None;
    for _ in 0..options.epochs {
        let report = common::train_epoch_with_progress(&mut trainer, &mut model, &train)?;
        let result = evaluate(&mut model, &test, 500)?;
        println!(
            "{:>6} {:>10.4} {:>9.2}% {:>10.0} {:>9.2}",
            report.epoch,
            report.train_loss,
            100.0 * result.accuracy,
            report.images_per_second,
            train.len() as f64 / report.images_per_second
        );
        losses.push(report.train_loss);
        accuracies.push(100.0 * result.accuracy);
        evaluation = Some(result);
    }

    pointwise::export::save_safetensors(&model, &weights)?;
    let pw = weights.with_extension("pw");
    let metadata = pointwise::checkpoint::Metadata::new(options.seed, options.epochs);
    pointwise::checkpoint::save(&model, &metadata, &pw)?;
    println!(
        "\nweights: {} (loads into the nn.Sequential of mnist_torch.py with load_state_dict) and {}",
        weights.display(),
        pw.display()
    );
    let curves = options.out.join(format!("{name}_curves.svg"));
    common::draw_runs(&curves, &[("test", &losses, &accuracies)])?;
    let Some(evaluation) = evaluation else {
        return Ok(());
    };
    let confusion = options.out.join(format!("{name}_confusion.svg"));
    draw_confusion(&confusion, &evaluation.predictions, test.labels())?;
    let mistakes = options.out.join(format!("{name}_misclassified.svg"));
    let wrong = draw_misclassified(&mistakes, &test, &evaluation.predictions)?;
    println!(
        "pictures: {}, {} and {} ({wrong} of {} test digits misclassified)",
        curves.display(),
        confusion.display(),
        mistakes.display(),
        test.len()
    );
    Ok(())
}

/// Times 20 training steps (forward + backward, no update) node by node and prints the
/// nodes that take the time, slowest first.
fn profile(model: &mut pointwise::Model, train: &Dataset) -> pointwise::Result<()> {
    let steps = 20;
    let batch: Vec<usize> = (0..BATCH).collect();
    let mut labels = Vec::new();
    train.gather(&batch, model.input_mut([BATCH, 1, 28, 28])?, &mut labels)?;
    model.graph_mut().set_profiling(true);
    let started = std::time::Instant::now();
    for _ in 0..steps {
        model.forward_backward_in_place(&labels)?;
    }
    let wall = started.elapsed().as_secs_f64() / steps as f64;
    let graph = model.graph_mut();
    let mut rows = Vec::new();
    for id in graph.node_ids() {
        let [forward, backward] = graph.time(id)?;
        let cost = graph.cost(id)?;
        let macs = cost.forward_macs + cost.backward_macs;
        rows.push((
            graph.name(id)?.to_string(),
            graph.kind(id)?,
            forward,
            backward,
            macs,
        ));
    }
    graph.set_profiling(false);
    rows.sort_by_key(|row| std::cmp::Reverse(row.2 + row.3));
    println!(
        "one step of batch {BATCH}: {:.2} ms ({} thread(s)), by node:",
        1e3 * wall,
        pointwise::parallel::threads()
    );
    println!(
        "{:<24} {:<16} {:>9} {:>9} {:>8} {:>8}",
        "node", "op", "fwd ms", "bwd ms", "share", "GFLOP/s"
    );
    for (name, kind, forward, backward, macs) in rows.iter().filter(|r| !(r.2 + r.3).is_zero()) {
        let (f, b) = (
            forward.as_secs_f64() / steps as f64,
            backward.as_secs_f64() / steps as f64,
        );
        // The multiply-adds of both passes (the cost model's), two FLOPs each.
        let gflops = if *macs > 0 {
            2.0 * *macs as f64 / (f + b) / 1e9
        } else {
            0.0
        };
        println!(
            "{name:<24} {kind:<16} {:>9.3} {:>9.3} {:>7.1}% {:>8.1}",
            1e3 * f,
            1e3 * b,
            100.0 * (f + b) / wall,
            gflops
        );
    }
    println!();
    Ok(())
}

/// The confusion matrix (true class down, predicted class across), counts in each cell.
fn draw_confusion(path: &Path, predictions: &[usize], labels: &[usize]) -> common::AnyResult<()> {
    let mut counts = [[0usize; CLASSES]; CLASSES];
    for (&p, &l) in predictions.iter().zip(labels) {
        counts[l][p] += 1;
    }
    let largest = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let root = SVGBackend::new(path, (560, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "confusion matrix: true class (rows) × predicted class",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(30)
        .build_cartesian_2d(0..CLASSES, 0..CLASSES)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted")
        .y_desc("true")
        .draw()?;
    for (truth, row) in counts.iter().enumerate() {
        for (predicted, &count) in row.iter().enumerate() {
            // Counts on a log scale, so that a few mistakes are visible beside 200 correct.
            let shade = ((count as f64).ln_1p() / largest.ln_1p() * 255.0) as u8;
            let color = if truth == predicted {
                RGBColor(255 - shade, 255 - shade / 2, 255 - shade)
            } else {
                RGBColor(255, 255 - shade, 255 - shade)
            };
            let cell = [(predicted, truth), (predicted + 1, truth + 1)];
            chart.draw_series(std::iter::once(Rectangle::new(cell, color.filled())))?;
            if count > 0 {
                chart.draw_series(std::iter::once(Text::new(
                    count.to_string(),
                    (predicted, truth + 1),
                    ("sans-serif", 13),
                )))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// Up to 40 misclassified test digits, each labelled "true → predicted"; returns how many
/// digits were misclassified in all.
fn draw_misclassified(
    path: &Path,
    test: &Dataset,
    predictions: &[usize],
) -> common::AnyResult<usize> {
    let wrong: Vec<usize> = (0..test.len())
        .filter(|&i| predictions[i] != test.labels()[i])
        .collect();
    let (columns, cell) = (10usize, 56u32);
    let rows = wrong.len().min(40).div_ceil(columns).max(1);
    let root = SVGBackend::new(path, (columns as u32 * cell, rows as u32 * (cell + 16)))
        .into_drawing_area();
    root.fill(&WHITE)?;
    let images = test.images();
    for (slot, &index) in wrong.iter().take(40).enumerate() {
        let (x0, y0) = (
            (slot % columns) as i32 * cell as i32,
            (slot / columns) as i32 * (cell as i32 + 16),
        );
        let digit = images.index_axis(Axis(0), index);
        let (lowest, highest) = digit
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        for ((_, r, c), &v) in digit.indexed_iter() {
            let ink = 255 - ((v - lowest) / (highest - lowest).max(1e-6) * 255.0) as u8;
            let (x, y) = (x0 + 2 * c as i32, y0 + 2 * r as i32);
            root.draw(&Rectangle::new(
                [(x, y), (x + 2, y + 2)],
                RGBColor(ink, ink, ink).filled(),
            ))?;
        }
        let label = format!("{} → {}", test.labels()[index], predictions[index]);
        root.draw(&Text::new(label, (x0 + 4, y0 + 57), ("sans-serif", 12)))?;
    }
    root.present()?;
    Ok(wrong.len())
}
