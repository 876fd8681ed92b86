//! Helpers the examples share: a training loop that reports each epoch, timing, and SVG
//! pictures (curves and weight heatmaps).
//! Each example includes this folder with `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod peak;

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use pointwise::data::{Dataset, Synthetic};
use pointwise::train::{accuracy, EpochReport, TrainConfig, Trainer};
use pointwise::Model;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Times `f`: warm up (at least 2 calls and 0.3 s), then 5 batches of about 0.4 s each.
/// Returns (median, min) milliseconds per call.
pub fn time(mut f: impl FnMut()) -> (f64, f64) {
    let start = Instant::now();
    let mut calls = 0usize;
    while calls < 2 || (start.elapsed().as_secs_f64() < 0.3 && calls < 100) {
        f();
        calls += 1;
    }
    let per_call = start.elapsed().as_secs_f64() / calls as f64;
    let iterations = ((0.4 / per_call).round() as usize).max(1);
    let mut samples: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iterations {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / iterations as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    (samples[samples.len() / 2], samples[0])
}

/// One epoch of `trainer`, with a progress bar (batches done, last loss) when stdout is a
/// terminal.
pub fn train_epoch_with_progress<T: pointwise::Element>(
    trainer: &mut Trainer<T>,
    model: &mut Model<T>,
    data: &Dataset,
) -> AnyResult<EpochReport> {
    let batches = trainer.config().steps_per_epoch(data.len());
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = ProgressBar::new(batches);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} batches  loss {msg}")
        {
            bar.set_style(style);
        }
        bar
    });
    let report = trainer.train_epoch(model, data, |index, _, loss| {
        if let Some(bar) = &bar {
            bar.set_position(index as u64 + 1);
            bar.set_message(format!("{loss:.4}"));
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(report)
}

/// Per-epoch history of one network: training loss, test accuracy (%).
pub struct Run {
    pub losses: Vec<f64>,
    pub test_percent: Vec<f64>,
}

/// Trains `model` for `config.epochs` epochs, printing loss, accuracies and images/s per epoch
/// (with a progress bar on a terminal); returns the history.
pub fn train(
    name: &str,
    model: &mut Model,
    data: &Synthetic,
    config: &TrainConfig,
) -> AnyResult<Run> {
    let mut trainer = Trainer::new(config.clone(), data.train.len())?;
    let mut run = Run {
        losses: Vec::new(),
        test_percent: Vec::new(),
    };
    println!(
        "\n{name}: {} epochs, batch {}, lr {}",
        config.epochs, config.batch_size, config.lr
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10}",
        "epoch", "loss", "train acc", "test acc", "images/s"
    );
    for _ in 0..config.epochs {
        let report = train_epoch_with_progress(&mut trainer, model, &data.train)?;
        let test = accuracy(model, &data.test, 256)?;
        println!(
            "{:>6} {:>10.4} {:>9.1}% {:>9.1}% {:>10.0}",
            report.epoch,
            report.train_loss,
            100.0 * report.train_accuracy,
            100.0 * test,
            report.images_per_second
        );
        run.losses.push(report.train_loss);
        run.test_percent.push(100.0 * test);
    }
    Ok(run)
}

/// A run's curves: its label, the training loss and the test accuracy (%) of each epoch.
pub type Curves<'a> = (&'a str, &'a [f64], &'a [f64]);

/// Two panels side by side, training loss and test accuracy per epoch, a line per run, written
/// as SVG.
pub fn draw_runs(path: &Path, runs: &[Curves]) -> AnyResult<()> {
    let max_loss = runs
        .iter()
        .flat_map(|run| run.1)
        .fold(0.0, |m, &v| f64::max(m, v));
    let panels = [
        ("training loss", 1.1 * max_loss),
        ("test accuracy (%)", 100.0),
    ];
    let root = SVGBackend::new(path, (960, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    for (panel, (area, (title, y_max))) in root.split_evenly((1, 2)).iter().zip(panels).enumerate()
    {
        let epochs = runs.iter().map(|run| run.1.len()).max().unwrap_or(1) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(1.0..epochs.max(2.0), 0.0..y_max.max(1e-3))?;
        chart.configure_mesh().x_desc("epoch").draw()?;
        for (&(label, losses, accuracies), color) in runs.iter().zip([RED, BLUE, GREEN, MAGENTA]) {
            let values = if panel == 0 { losses } else { accuracies };
            let points = (values.iter().enumerate()).map(|(i, &v)| (i as f64 + 1.0, v));
            chart
                .draw_series(LineSeries::new(points, color))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The exit code of an example: 0, or 1 after printing the error (clap itself exits with 2 on
/// a bad flag).
pub fn exit_code(result: AnyResult<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Blue (negative) – white – red (positive), scaled to the matrix's largest magnitude.
fn diverging(value: f32, scale: f32) -> RGBColor {
    let t = (value / scale.max(1e-12)).clamp(-1.0, 1.0);
    let fade = |t: f32| (255.0 * (1.0 - t.abs())) as u8;
    if t >= 0.0 {
        RGBColor(255, fade(t), fade(t))
    } else {
        RGBColor(fade(t), fade(t), 255)
    }
}

/// Matrices drawn as heatmaps one above the other, each (title, matrix, height share in px),
/// written as SVG.
pub fn draw_matrices(
    path: &Path,
    matrices: &[(&str, ndarray::ArrayView2<f32>, u32)],
) -> AnyResult<()> {
    let height = matrices.iter().map(|m| m.2).sum();
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut rest = root.clone();
    for (title, matrix, share) in matrices {
        let (area, below) = rest.split_vertically(*share);
        rest = below;
        let (rows, cols) = matrix.dim();
        let scale = matrix.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut chart = ChartBuilder::on(&area)
            .caption(*title, ("sans-serif", 16))
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
            // Row r spans r..r+1, so the axis labels are row indices.
            Rectangle::new([(c, r), (c + 1, r + 1)], diverging(v, scale).filled())
        }))?;
    }
    root.present()?;
    Ok(())
}
