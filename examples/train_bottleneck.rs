//! The main job: train a 1×1 bottleneck network on synthetic data whose class lives in the
//! channel direction of single pixels, beside a "global average pool → linear" baseline that
//! cannot see it; save the weights, reload them, and show what the 1×1 layer learned.
//!
//! ```sh
//! cargo run --example train_bottleneck
//! cargo run --example train_bottleneck -- --epochs 20 --optimizer adam --out /tmp/run
//! ```

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use pointwise::checkpoint::{self, LoadOptions, Metadata};
use pointwise::data::{self, Synthetic, SyntheticConfig};
use pointwise::optim::OptimizerKind;
use pointwise::train::{accuracy, predict_all, EpochReport, TrainConfig, Trainer};
use pointwise::{Architecture, Model};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "\
usage: cargo run --example train_bottleneck -- [options]

options:
  --epochs N          training epochs (default 12)
  --seed N            seed of the data, the initial weights and the shuffles (default 7)
  --batch-size N      mini-batch size (default 32)
  --lr X              base learning rate (default 0.05 for sgd, 0.01 for adam)
  --optimizer NAME    sgd (momentum 0.9, weight decay 5e-4) or adam (default sgd)
  --out DIR           where the weights and pictures go (default target/train_bottleneck)
  --help              this text";

#[derive(Debug)]
struct Options {
    epochs: usize,
    seed: u64,
    batch_size: usize,
    lr: Option<f64>,
    optimizer: OptimizerKind,
    out: PathBuf,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        epochs: 12,
        seed: 7,
        batch_size: 32,
        lr: None,
        optimizer: OptimizerKind::sgd(),
        out: PathBuf::from("target/train_bottleneck"),
    };
    fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
        let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
        value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a valid value"))
    }
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--epochs" => options.epochs = number(&flag, args.next())?,
            "--seed" => options.seed = number(&flag, args.next())?,
            "--batch-size" => options.batch_size = number(&flag, args.next())?,
            "--lr" => options.lr = Some(number(&flag, args.next())?),
            "--optimizer" => {
                options.optimizer = match args.next().as_deref() {
                    Some("sgd") => OptimizerKind::sgd(),
                    Some("adam") => OptimizerKind::adam(),
                    other => {
                        return Err(format!(
                            "--optimizer: expected sgd or adam, found {other:?}"
                        ))
                    }
                }
            }
            "--out" => options.out = PathBuf::from(args.next().ok_or("--out needs a folder")?),
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.epochs == 0 || options.batch_size == 0 {
        return Err("--epochs and --batch-size must be at least 1".to_string());
    }
    if let Some(lr) = options.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!("--lr must be a positive number, found {lr}"));
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Per-epoch history of one network.
struct Run {
    name: &'static str,
    epochs: Vec<EpochReport>,
    test_accuracy: Vec<f64>,
}

fn train(
    name: &'static str,
    model: &mut Model,
    data: &Synthetic,
    config: &TrainConfig,
) -> AnyResult<Run> {
    let mut trainer = Trainer::new(config.clone(), data.train.len())?;
    let mut run = Run {
        name,
        epochs: Vec::new(),
        test_accuracy: Vec::new(),
    };
    let interactive = std::io::stdout().is_terminal();
    println!(
        "\n{name}: {} epochs, batch {}, lr {}",
        config.epochs, config.batch_size, config.lr
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10}",
        "epoch", "loss", "train acc", "test acc", "images/s"
    );
    for _ in 0..config.epochs {
        let bar = interactive.then(|| {
            let bar = ProgressBar::new(data.train.len().div_ceil(config.batch_size) as u64);
            if let Ok(style) =
                ProgressStyle::with_template("{bar:30} {pos}/{len} batches  loss {msg}")
            {
                bar.set_style(style);
            }
            bar
        });
        let report = trainer.train_epoch(model, &data.train, |index, _, loss| {
            if let Some(bar) = &bar {
                bar.set_position(index as u64 + 1);
                bar.set_message(format!("{loss:.4}"));
            }
        })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let test = accuracy(model, &data.test, 256)?;
        println!(
            "{:>6} {:>10.4} {:>9.1}% {:>9.1}% {:>10.0}",
            report.epoch,
            report.train_loss,
            100.0 * report.train_accuracy,
            100.0 * test,
            report.images_per_second
        );
        run.epochs.push(report);
        run.test_accuracy.push(test);
    }
    Ok(run)
}

fn run(options: &Options) -> AnyResult<()> {
    let started = Instant::now();
    let config = SyntheticConfig::default();
    let data = data::generate(&config, options.seed)?;
    println!(
        "data: {} train / {} test images of {}×{}×{} (C×H×W), {} classes (chance level {:.0}%)",
        config.train_images,
        config.test_images,
        config.channels,
        config.height,
        config.width,
        config.classes,
        100.0 / config.classes as f64
    );
    println!(
        "      class k = a {}×{} blob of pixels ±{}·v_k (half +, half −) in N(0, {}²) noise",
        config.blob_side, config.blob_side, config.amplitude, config.noise
    );

    let default_lr = match options.optimizer {
        OptimizerKind::Sgd { .. } => 0.05,
        OptimizerKind::Adam { .. } => 0.01,
    };
    let train_config = TrainConfig {
        epochs: options.epochs,
        batch_size: options.batch_size,
        lr: options.lr.unwrap_or(default_lr),
        optimizer: options.optimizer,
        cosine: true,
        seed: options.seed,
    };
    let architecture =
        Architecture::bottleneck(config.channels, config.channels / 4, config.classes);
    let mut model = Model::new(architecture.clone(), options.seed)?;
    let mut baseline = Model::new(
        Architecture::baseline(config.channels, config.classes),
        options.seed,
    )?;
    let bottleneck_run = train(
        "bottleneck  1×1 32→8 + ReLU → 1×1 8→32 + ReLU → 2×2 max pool → GAP → linear",
        &mut model,
        &data,
        &train_config,
    )?;
    let baseline_run = train(
        "baseline    GAP → linear",
        &mut baseline,
        &data,
        &train_config,
    )?;

    let bottleneck_accuracy = *bottleneck_run.test_accuracy.last().unwrap_or(&0.0);
    let baseline_accuracy = *baseline_run.test_accuracy.last().unwrap_or(&0.0);
    println!(
        "\nfinal test accuracy: bottleneck {:.1}%, baseline {:.1}% (chance {:.0}%)",
        100.0 * bottleneck_accuracy,
        100.0 * baseline_accuracy,
        100.0 / config.classes as f64
    );

    std::fs::create_dir_all(&options.out)?;
    let out = options.out.canonicalize()?;
    let weights_path = out.join("bottleneck.pw");
    checkpoint::save(
        &model,
        &Metadata::new(options.seed, options.epochs as u64),
        &weights_path,
    )?;
    let reloaded = checkpoint::load(&weights_path, LoadOptions::default())?;
    let mut fresh = reloaded.into_model()?;
    let before = predict_all(&mut model, &data.test, 256)?;
    let after = predict_all(&mut fresh, &data.test, 256)?;
    let logits_equal = model.logits(data.test.images())? == fresh.logits(data.test.images())?;
    if before != after || !logits_equal {
        return Err("the reloaded network predicts differently from the trained one".into());
    }
    println!(
        "weights: {} ({} bytes)",
        weights_path.display(),
        std::fs::metadata(&weights_path)?.len()
    );
    println!("reload:  a fresh network loaded from the file gives identical predictions on all {} test images (logits bit-identical)", after.len());

    print_alignment(&model, &data)?;
    let curves = out.join("curves.svg");
    draw_curves(&curves, &[&bottleneck_run, &baseline_run])?;
    let heatmap = out.join("reduce_weights.svg");
    draw_weights(&heatmap, &model, &data)?;
    println!("pictures: {} and {}", curves.display(), heatmap.display());
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// |cos| between each learned reduce row and each class signature: a 1×1 layer learns
/// channel-direction detectors.
fn print_alignment(model: &Model, data: &Synthetic) -> AnyResult<()> {
    let weight = model.tensor("reduce.weight").ok_or("no reduce.weight")?;
    let weight = weight.into_dimensionality::<ndarray::Ix2>()?;
    println!(
        "\nwhat the 1×1 reduce layer learned: |cos(row, v_k)| for each of its {} rows",
        weight.nrows()
    );
    print!("{:>5}", "row");
    for k in 0..data.signatures.nrows() {
        print!(" {:>7}", format!("v_{k}"));
    }
    println!("   best");
    for (i, row) in weight.outer_iter().enumerate() {
        print!("{i:>5}");
        let mut best = (0, 0.0f32);
        for (k, signature) in data.signatures.outer_iter().enumerate() {
            let cosine = (row.dot(&signature)
                / (row.dot(&row).sqrt() * signature.dot(&signature).sqrt()))
            .abs();
            if cosine > best.1 {
                best = (k, cosine);
            }
            print!(" {cosine:>7.2}");
        }
        println!("   v_{} ({:.2})", best.0, best.1);
    }
    Ok(())
}

fn draw_curves(path: &Path, runs: &[&Run]) -> AnyResult<()> {
    let root = SVGBackend::new(path, (960, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(480);
    let max_loss = runs
        .iter()
        .flat_map(|r| r.epochs.iter().map(|e| e.train_loss))
        .fold(0.0, f64::max)
        * 1.1;
    let losses = runs
        .iter()
        .map(|r| r.epochs.iter().map(|e| e.train_loss).collect())
        .collect();
    let accuracies = runs
        .iter()
        .map(|r| r.test_accuracy.iter().map(|a| 100.0 * a).collect())
        .collect();
    draw_panel(&left, "training loss", max_loss.max(1e-3), runs, losses)?;
    draw_panel(&right, "test accuracy (%)", 100.0, runs, accuracies)?;
    root.present()?;
    Ok(())
}

/// One panel of per-epoch curves, one line per run (epochs count from 1).
fn draw_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_max: f64,
    runs: &[&Run],
    curves: Vec<Vec<f64>>,
) -> AnyResult<()> {
    let epochs = curves.iter().map(Vec::len).max().unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(1.0..epochs.max(2.0), 0.0..y_max)?;
    chart.configure_mesh().x_desc("epoch").draw()?;
    for ((run, curve), color) in runs.iter().zip(curves).zip([RED, BLUE]) {
        let points = curve
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as f64 + 1.0, v));
        chart
            .draw_series(LineSeries::new(points, color))?
            .label(run.name.split_whitespace().next().unwrap_or(""))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

/// Blue (negative) – white – red (positive), scaled to the panel's largest magnitude.
fn diverging(value: f32, scale: f32) -> RGBColor {
    let t = (value / scale.max(1e-12)).clamp(-1.0, 1.0);
    let fade = |t: f32| (255.0 * (1.0 - t.abs())) as u8;
    if t >= 0.0 {
        RGBColor(255, fade(t), fade(t))
    } else {
        RGBColor(fade(t), fade(t), 255)
    }
}

fn draw_matrix(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    matrix: ndarray::ArrayView2<f32>,
) -> AnyResult<()> {
    let (rows, cols) = matrix.dim();
    let scale = matrix.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(25)
        .y_label_area_size(30)
        .build_cartesian_2d(0..cols, 0..rows)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("input channel")
        .y_desc("row")
        .draw()?;
    chart.draw_series(matrix.indexed_iter().map(|((r, c), &v)| {
        Rectangle::new(
            // Row r spans r..r+1, so the axis labels are row indices.
            [(c, r), (c + 1, r + 1)],
            diverging(v, scale).filled(),
        )
    }))?;
    Ok(())
}

fn draw_weights(path: &Path, model: &Model, data: &Synthetic) -> AnyResult<()> {
    let weight = model
        .tensor("reduce.weight")
        .ok_or("no reduce.weight")?
        .into_dimensionality::<ndarray::Ix2>()?;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(260);
    draw_matrix(
        &top,
        "learned 1×1 reduce weight (F1 × F): rows are per-pixel channel detectors",
        weight,
    )?;
    draw_matrix(
        &bottom,
        "class signatures v_k (K × C) of the generator",
        data.signatures.view(),
    )?;
    root.present()?;
    Ok(())
}
