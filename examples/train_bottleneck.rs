//! The main job: train a 1×1 bottleneck network on synthetic data whose class lives in the
//! channel direction of single pixels, beside a "global average pool → linear" baseline that
//! cannot see it; save the weights, reload them, and show what the 1×1 layer learned.
//!
//! ```sh
//! cargo run --example train_bottleneck
//! cargo run --example train_bottleneck -- --epochs 20 --optimizer adam --out /tmp/run
//! ```

use clap::{Parser, ValueEnum};
use common::{draw_curves, draw_matrices, train, AnyResult, Curve, Run};
use pointwise::checkpoint::{self, LoadOptions, Metadata};
use pointwise::data::{self, Synthetic, SyntheticConfig};
use pointwise::optim::{OptimizerKind, Schedule};
use pointwise::train::{predict_all, TrainConfig};
use pointwise::{Architecture, Model};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

mod common;

/// Train a 1×1 bottleneck network and a GAP → linear baseline on synthetic data, save and
/// reload the weights, and show what the 1×1 layer learned.
#[derive(Parser, Debug)]
struct Options {
    /// Training epochs.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..100_000))]
    epochs: u64,
    /// Seed of the data, the initial weights and the shuffles.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..1_000_000))]
    batch_size: u64,
    /// Base learning rate [default: 0.05 for sgd, 0.01 for adam].
    #[arg(long, value_parser = positive)]
    lr: Option<f64>,
    /// sgd (momentum 0.9, weight decay 5e-4) or adam.
    #[arg(long, value_enum, default_value_t = Optimizer::Sgd)]
    optimizer: Optimizer,
    /// Where the weights and pictures go.
    #[arg(long, default_value = "target/train_bottleneck")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Optimizer {
    Sgd,
    Adam,
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("expected a positive number, found {text:?}")),
    }
}

fn main() -> ExitCode {
    // clap prints the usage and exits with code 2 on a bad flag, 0 on --help.
    let options = Options::parse();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> AnyResult<()> {
    // The output folder is checked before training, not after: a bad --out fails at once,
    // naming the path.
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("--out {}: {e}", options.out.display()))?;
    for file in ["bottleneck.pw", "bottleneck.safetensors"] {
        checkpoint::check_writable(&options.out.join(file))?;
    }
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

    let (optimizer, default_lr) = match options.optimizer {
        Optimizer::Sgd => (OptimizerKind::sgd(), 0.05),
        Optimizer::Adam => (OptimizerKind::adam(), 0.01),
    };
    let mut train_config = TrainConfig::new(
        options.epochs as usize,
        options.batch_size as usize,
        options.lr.unwrap_or(default_lr),
        optimizer,
    );
    // Cosine decay to 0 at the end, after a linear warm-up of one epoch (at most a tenth of
    // the run).
    let steps_per_epoch = train_config.steps_per_epoch(data.train.len());
    let total_steps = steps_per_epoch * train_config.epochs as u64;
    train_config.schedule =
        Schedule::cosine(total_steps).with_warmup(steps_per_epoch.min(total_steps / 10));
    train_config.seed = options.seed;
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
        &Metadata::new(options.seed, options.epochs),
        &weights_path,
    )?;
    let reloaded = checkpoint::load(&weights_path, LoadOptions::default())?;
    let mut fresh = reloaded.into_model();
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
    // The same weights for other tools: safetensors in PyTorch's layout.
    let torch_path = out.join("bottleneck.safetensors");
    let bytes = pointwise::export::graph_to_safetensors(model.graph())?;
    checkpoint::write_atomically_with(&torch_path, &bytes, |file, bytes| {
        std::io::Write::write_all(file, bytes)
    })?;
    let (c, r, k) = (config.channels, config.channels / 4, config.classes);
    println!(
        "safetensors: {} ({} bytes); in PyTorch:",
        torch_path.display(),
        bytes.len()
    );
    println!("    import torch.nn as nn, safetensors.torch");
    println!("    class Bottleneck(nn.Module):");
    println!("        def __init__(self):");
    println!("            super().__init__()");
    println!(
        "            self.reduce, self.expand = nn.Conv2d({c}, {r}, 1), nn.Conv2d({r}, {c}, 1)"
    );
    println!("            self.head = nn.Linear({c}, {k})");
    println!("        def forward(self, x):");
    println!(
        "            x = nn.functional.max_pool2d(self.expand(self.reduce(x).relu()).relu(), 2)"
    );
    println!("            return self.head(x.mean((2, 3)))");
    println!("    net = Bottleneck()");
    println!(
        "    net.load_state_dict(safetensors.torch.load_file({:?}))",
        torch_path.display().to_string()
    );

    print_alignment(&model, &data)?;
    let curves = out.join("curves.svg");
    draw_runs(&curves, &[&bottleneck_run, &baseline_run])?;
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

/// Loss and test accuracy per epoch of every run, side by side.
fn draw_runs(path: &std::path::Path, runs: &[&Run]) -> AnyResult<()> {
    let label = |run: &Run| run.name.split_whitespace().next().unwrap_or("");
    let losses: Vec<Curve> = runs
        .iter()
        .map(|run| Curve {
            label: label(run),
            values: run.epochs.iter().map(|e| e.train_loss).collect(),
        })
        .collect();
    let max_loss = losses
        .iter()
        .flat_map(|c| c.values.iter().copied())
        .fold(0.0, f64::max);
    let accuracies = runs
        .iter()
        .map(|run| Curve {
            label: label(run),
            values: run.test_accuracy.iter().map(|a| 100.0 * a).collect(),
        })
        .collect();
    draw_curves(
        path,
        &[
            ("training loss", 1.1 * max_loss, losses),
            ("test accuracy (%)", 100.0, accuracies),
        ],
    )
}

/// The learned reduce weight above the class signatures it should align with.
fn draw_weights(path: &std::path::Path, model: &Model, data: &Synthetic) -> AnyResult<()> {
    let weight = model
        .tensor("reduce.weight")
        .ok_or("no reduce.weight")?
        .into_dimensionality::<ndarray::Ix2>()?;
    draw_matrices(
        path,
        &[
            (
                "learned 1×1 reduce weight (F1 × F): rows are per-pixel channel detectors",
                weight,
                260,
            ),
            (
                "class signatures v_k (K × C) of the generator",
                data.signatures.view(),
                160,
            ),
        ],
    )
}
