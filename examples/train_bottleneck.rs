//! The main job: train a 1×1 bottleneck network on synthetic data whose class lives in the
//! channel direction of single pixels, beside a "global average pool → linear" baseline that
//! cannot see it; save the weights, reload them, and show what the 1×1 layer learned.
//!
//! ```sh
//! cargo run --example train_bottleneck
//! cargo run --example train_bottleneck -- --epochs 20 --optimizer adam --out /tmp/run
//! ```

use clap::{Parser, ValueEnum};
use common::{draw_matrices, draw_runs, train, AnyResult, Run};
use ndarray::ArrayView2;
use pointwise::checkpoint::{self, LoadOptions, Metadata};
use pointwise::data::{self, Synthetic, SyntheticConfig};
use pointwise::optim::{OptimizerKind, Schedule};
use pointwise::train::{predict_all, TrainConfig};
use pointwise::{Architecture, Model};
use std::path::{Path, PathBuf};
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
    common::exit_code(run(&Options::parse()))
}

fn run(options: &Options) -> AnyResult<()> {
    // A bad --out fails at once, naming the path, not after training.
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("--out {}: {e}", options.out.display()))?;
    let out = options.out.canonicalize()?;
    let (weights_path, torch_path) = (
        out.join("bottleneck.pw"),
        out.join("bottleneck.safetensors"),
    );
    checkpoint::check_writable(&weights_path)?;
    checkpoint::check_writable(&torch_path)?;
    let started = Instant::now();
    let config = SyntheticConfig::default();
    let data = data::generate(&config, options.seed)?;
    let (c, r, k) = (config.channels, config.channels / 4, config.classes);
    let chance = 100.0 / k as f64;
    println!(
        "data: {} train / {} test images of {c}×{}×{} (C×H×W), {k} classes (chance {chance:.0}%)\n      \
         class k = a {s}×{s} blob of pixels ±{}·v_k (half +, half −) in N(0, {}²) noise",
        config.train_images,
        config.test_images,
        config.height,
        config.width,
        config.amplitude,
        config.noise,
        s = config.blob_side,
    );

    let (optimizer, default_lr) = match options.optimizer {
        Optimizer::Sgd => (OptimizerKind::sgd(), 0.05),
        Optimizer::Adam => (OptimizerKind::adam(), 0.01),
    };
    let (epochs, batch) = (options.epochs as usize, options.batch_size as usize);
    let lr = options.lr.unwrap_or(default_lr);
    let mut train_config = TrainConfig::new(epochs, batch, lr, optimizer);
    // Cosine decay to 0 at the end, after a linear warm-up of one epoch (at most a tenth of
    // the run).
    let steps_per_epoch = train_config.steps_per_epoch(data.train.len());
    let total_steps = steps_per_epoch * options.epochs;
    train_config.schedule =
        Schedule::cosine(total_steps).with_warmup(steps_per_epoch.min(total_steps / 10));
    train_config.seed = options.seed;
    let mut model = Model::new(Architecture::bottleneck(c, r, k), options.seed)?;
    let mut baseline = Model::new(Architecture::baseline(c, k), options.seed)?;
    let bottleneck_name =
        format!("1×1 {c}→{r} + ReLU → 1×1 {r}→{c} + ReLU → 2×2 max pool → GAP → linear");
    let bottleneck_run = train(&bottleneck_name, &mut model, &data, &train_config)?;
    let baseline_run = train(
        "baseline    GAP → linear",
        &mut baseline,
        &data,
        &train_config,
    )?;
    let last = |run: &Run| run.test_percent.last().copied().unwrap_or(0.0);
    println!(
        "\nfinal test accuracy: bottleneck {:.1}%, baseline {:.1}% (chance {chance:.0}%)",
        last(&bottleneck_run),
        last(&baseline_run),
    );

    // Save, reload into a fresh network, and check that it predicts the same to the bit.
    checkpoint::save(
        &model,
        &Metadata::new(options.seed, options.epochs),
        &weights_path,
    )?;
    let mut fresh = checkpoint::load(&weights_path, LoadOptions::default())?.into_model();
    let before = predict_all(&mut model, &data.test, 256)?;
    let after = predict_all(&mut fresh, &data.test, 256)?;
    if before != after || model.logits(data.test.images())? != fresh.logits(data.test.images())? {
        return Err("the reloaded network predicts differently from the trained one".into());
    }
    let size = |path: &Path| std::fs::metadata(path).map(|m| m.len());
    println!(
        "weights: {} ({} bytes)",
        weights_path.display(),
        size(&weights_path)?
    );
    println!(
        "reload:  a fresh network loaded from the file gives identical predictions on all {} \
         test images (logits bit-identical)",
        after.len()
    );
    // The same weights for other tools: safetensors in PyTorch's layout.
    pointwise::export::save_safetensors(&model, &torch_path)?;
    println!(
        "safetensors: {} ({} bytes); in PyTorch:
    import torch.nn as nn, safetensors.torch
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d({c}, {r}, 1), nn.Conv2d({r}, {c}, 1)
            self.head = nn.Linear({c}, {k})
        def forward(self, x):
            x = nn.functional.max_pool2d(self.expand(self.reduce(x).relu()).relu(), 2)
            return self.head(x.mean((2, 3)))
    net = Bottleneck()
    net.load_state_dict(safetensors.torch.load_file({:?}))",
        torch_path.display(),
        size(&torch_path)?,
        torch_path.display().to_string()
    );

    let weight = model.tensor("reduce.weight").ok_or("no reduce.weight")?;
    let weight = weight.into_dimensionality::<ndarray::Ix2>()?;
    print_alignment(weight.view(), &data)?;
    let curves = out.join("curves.svg");
    let runs = [("bottleneck", &bottleneck_run), ("baseline", &baseline_run)];
    let runs = runs.map(|(name, run)| (name, &run.losses[..], &run.test_percent[..]));
    draw_runs(&curves, &runs)?;
    let heatmap = out.join("reduce_weights.svg");
    let reduce = "learned 1×1 reduce weight (F1 × F): rows are per-pixel channel detectors";
    let signatures = "class signatures v_k (K × C) of the generator";
    let matrices = [
        (reduce, weight.view(), 260),
        (signatures, data.signatures.view(), 160),
    ];
    draw_matrices(&heatmap, &matrices)?;
    println!("pictures: {} and {}", curves.display(), heatmap.display());
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// |cos| between each learned reduce row and each class signature: a 1×1 layer learns
/// channel-direction detectors.
fn print_alignment(weight: ArrayView2<f32>, data: &Synthetic) -> AnyResult<()> {
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
            let norms = row.dot(&row).sqrt() * signature.dot(&signature).sqrt();
            let cosine = (row.dot(&signature) / norms).abs();
            if cosine > best.1 {
                best = (k, cosine);
            }
            print!(" {cosine:>7.2}");
        }
        println!("   v_{} ({:.2})", best.0, best.1);
    }
    Ok(())
}
