//! Speed on the shapes of a real network: the 19 distinct pointwise (1×1) layers of
//! MobileNetV2, read off the network as `pointwise::models::mobilenet_v2` builds it, and a
//! linear classifier head, forward + backward (dX, dW, db from dY = ones), as the side-by-side
//! harness times PyTorch's `F.conv2d` on the same shapes.
//!
//! ```sh
//! cargo run --release --example bench_shapes                       # 1 thread (BENCH_THREADS)
//! BENCH_THREADS=2 cargo run --release --example bench_shapes
//! cargo run --release --example bench_shapes -- --shapes FILE      # any list of this format
//! cargo run --release --example bench_shapes -- --forward --batch 1 # inference at batch 1
//! # side by side, layer by layer: each shape here, then the same shape on a peer's program
//! cargo run --release --example bench_shapes -- --rounds 3 \
//!     --peer 'python3 ../shared/peers/shapes/torch_shapes.py {shapes} {threads}'
//! ```
//! Prints one `RESULT pointwise <name> <threads> <median ms> <GFLOP/s>` line per shape
//! (GFLOP = 3 · 2·N·C_in·C_out·H·W: forward, dX and dW; 2·N·C_in·C_out·H·W with `--forward`),
//! then a table with the share of the FMA peak measured in the same run. A shape with H = W = 1
//! runs as a linear layer (N, C_in): what a fully-connected layer is.
//!
//! With `--peer`, each shape is timed here and then at once by the peer's command (given a
//! file holding that one shape, and the thread count), so that both sides of a ratio are
//! measured within a few seconds of each other: on a shared machine the load changes from
//! minute to minute, and a whole list timed on one side and then on the other compares two
//! different machines. The peer prints `RESULT <system> <name> <threads> <median ms> …` lines
//! (`torch_shapes.py` does, one per memory layout); the closing table takes, per layer and
//! side, the median of the rounds' medians, and the peer's fastest system.

use clap::Parser;
use ndarray::ArrayD;
use pointwise::Graph;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

mod common;

/// The batch the MobileNetV2 layers are timed at.
const BATCH: usize = 16;

/// A classifier head after MobileNetV2's layers: a linear layer is a 1×1 convolution on 1×1
/// maps (name N C_in C_out H W).
const LINEAR_HEAD: &str = "linear_head 128 1024 512 1 1";

/// The distinct pointwise layers of MobileNetV2 (224×224, width 1.0) at batch [`BATCH`], read
/// off the network itself: [`pointwise::models::mobilenet_v2`] runs one image forward, and
/// every 1×1 node's input and weight shapes are listed, each (C_in, C_out, H, W) once, named
/// as the side-by-side harness names them (`mnv2_b2_expand_112`: block 2's 1×1 expansion, on
/// 112×112 maps; `mnv2_last_7`: the 1×1 to 1280 channels before the pool).
fn mobilenet_v2_layers() -> pointwise::Result<Vec<Shape>> {
    let mut model = pointwise::models::mobilenet_v2(1000, 0)?;
    model.logits(ndarray::Array4::zeros((1, 3, 224, 224)).view())?;
    let graph = model.graph();
    let mut shapes: Vec<Shape> = Vec::new();
    for id in graph.node_ids() {
        if graph.kind(id)? != "conv1x1" {
            continue;
        }
        let inputs = graph.inputs(id)?;
        let (x, weight) = (graph.value(inputs[0])?, graph.value(inputs[1])?);
        let (&[_, c_in, h, w], &[c_out, _]) = (x.shape(), weight.shape()) else {
            continue;
        };
        if shapes.iter().any(|s| s.dims[1..] == [c_in, c_out, h, w]) {
            continue;
        }
        // The weight is "features.{block}.conv.…" inside a block, "features.18.0.weight" after.
        let weight_name = graph.name(inputs[1])?;
        let name = match weight_name.split('.').nth(1) {
            Some(block) if weight_name.contains(".conv.") => {
                let role = if c_out > c_in { "expand" } else { "project" };
                format!("mnv2_b{block}_{role}_{h}")
            }
            _ => format!("mnv2_last_{h}"),
        };
        shapes.push(Shape {
            name,
            dims: [BATCH, c_in, c_out, h, w],
        });
    }
    Ok(shapes)
}

/// Times forward + backward (or the forward pass alone) of 1×1 convolutions and linear layers
/// on a list of shapes.
#[derive(Parser)]
struct Options {
    /// A shapes file: lines `name N C_in C_out H W`, `#` comments (default: MobileNetV2's).
    #[arg(long, value_name = "FILE")]
    shapes: Option<PathBuf>,
    /// Time the forward pass alone, on an input that needs no gradient (inference).
    #[arg(long)]
    forward: bool,
    /// Run every shape at this batch size instead of its own (1: one image at a time).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    batch: Option<u32>,
    /// A peer's command to time each shape right after this side does, run by `sh -c` with
    /// `{shapes}` replaced by a file holding that one shape and `{threads}` by the thread
    /// count (also set as OMP_NUM_THREADS); it prints `RESULT` lines.
    #[arg(long, value_name = "COMMAND")]
    peer: Option<String>,
    /// How many times to go through the list (each layer's figure: the median of the rounds').
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

struct Shape {
    name: String,
    dims: [usize; 5],
}

fn parse(text: &str) -> Result<Vec<Shape>, String> {
    let mut shapes = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let dims: Vec<usize> = fields[1..].iter().filter_map(|f| f.parse().ok()).collect();
        let Ok(dims) = <[usize; 5]>::try_from(dims) else {
            return Err(format!(
                "line {}: expected `name N C_in C_out H W`",
                number + 1
            ));
        };
        if dims.contains(&0)
            || dims
                .iter()
                .try_fold(1usize, |p, &d| p.checked_mul(d))
                .is_none()
        {
            return Err(format!(
                "line {}: sizes must be positive and fit",
                number + 1
            ));
        }
        shapes.push(Shape {
            name: fields[0].to_string(),
            dims,
        });
    }
    Ok(shapes)
}

/// Deterministic values in [-0.5, 0.5).
fn fill(shape: &[usize], seed: usize) -> ArrayD<f32> {
    let mut state = seed.wrapping_mul(2654435761) as u32 | 1;
    ArrayD::from_shape_simple_fn(shape.to_vec(), || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as f32 / u32::MAX as f32 - 0.5
    })
}

/// Median and minimum ms of single steps, counted as `torch_shapes.py` counts PyTorch's: 3
/// steps to warm up, then `max(5, min(200, ⌊0.5 / GFLOP⌋ + 1))` steps timed one by one. (A
/// median of single steps leaves out a step another process interrupted; a mean over a batch
/// of steps would carry it, so the two sides must use the same statistic.)
fn time_steps(gflop: f64, mut step: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        step();
    }
    let repeats = ((0.5 / gflop) as usize + 1).clamp(5, 200);
    let mut samples: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    (samples[samples.len() / 2], samples[0])
}

/// GFLOP of one step: 2·N·C_in·C_out·H·W for each product, the forward pass's and, unless
/// `forward` alone is timed, dX's and dW's.
fn gflop(shape: &Shape, forward: bool) -> f64 {
    let [n, c_in, c_out, h, w] = shape.dims;
    let products = if forward { 1.0 } else { 3.0 };
    products * 2.0 * (n * c_in * c_out * h * w) as f64 * 1e-9
}

/// Median and minimum ms of one forward + backward on `shape`, or of one forward pass alone.
fn measure(shape: &Shape, forward: bool) -> pointwise::Result<(f64, f64)> {
    let [n, c_in, c_out, h, w] = shape.dims;
    let linear = h == 1 && w == 1;
    let mut graph = Graph::<f32>::new();
    let x = match forward {
        true => graph.input("x"),
        false => graph.input_with_grad("x"),
    };
    let weight = graph.param("weight", fill(&[c_out, c_in], 1).mapv(|v| v * 0.1))?;
    let bias = graph.param("bias", fill(&[c_out], 2).mapv(|v| v * 0.1))?;
    let (input_shape, output_shape) = if linear {
        (vec![n, c_in], vec![n, c_out])
    } else {
        (vec![n, c_in, h, w], vec![n, c_out, h, w])
    };
    let y = if linear {
        graph.linear(x, weight, Some(bias))?
    } else {
        graph.conv1x1(x, weight, Some(bias))?
    };
    graph.set_input(x, fill(&input_shape, 3).view())?;
    let mut ones = ArrayD::<f32>::ones(output_shape);
    let mut failure = None;
    let timing = pointwise::parallel::install(|| {
        time_steps(gflop(shape, forward), || {
            let step = match forward {
                true => graph.forward(y),
                false => {
                    // As the PyTorch side sets `.grad = None`: dX is written, not added to
                    // zeros. And as `y.backward(ones)` hands `ones` to autograd, dY is lent,
                    // not copied.
                    graph.clear_grads();
                    graph
                        .forward(y)
                        .and_then(|()| graph.backward_from_mut(y, &mut ones))
                }
            };
            if let Err(error) = step {
                failure.get_or_insert(error);
            }
        })
    });
    match failure {
        Some(error) => Err(error),
        None => Ok(timing),
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    let shapes = match &options.shapes {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => parse(&text),
            Err(error) => {
                eprintln!("error: cannot read {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => mobilenet_v2_layers()
            .map_err(|error| format!("building MobileNetV2: {error}"))
            .and_then(|mut layers| {
                layers.extend(parse(LINEAR_HEAD)?);
                Ok(layers)
            }),
    };
    let shapes = match shapes {
        Ok(mut shapes) => {
            if let Some(batch) = options.batch {
                shapes
                    .iter_mut()
                    .for_each(|shape| shape.dims[0] = batch as usize);
            }
            shapes
        }
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let threads = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(1);
    if let Err(error) = pointwise::parallel::set_threads(threads) {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    let peak = common::peak::fma_peak(threads);
    // Per shape, this side's median of each round; per (peer system, shape), the peer's.
    let mut ours: Vec<Vec<(f64, f64)>> = vec![Vec::new(); shapes.len()];
    let mut theirs: Vec<(String, String, f64)> = Vec::new();
    for _ in 0..options.rounds {
        for (shape, rounds) in shapes.iter().zip(&mut ours) {
            match measure(shape, options.forward) {
                Ok((median, min)) => {
                    let rate = gflop(shape, options.forward) / (median * 1e-3);
                    println!(
                        "RESULT\tpointwise\t{}\t{threads}\t{median:.4}\t{rate:.1}",
                        shape.name
                    );
                    rounds.push((median, min));
                }
                Err(error) => {
                    eprintln!("error: {}: {error}", shape.name);
                    return ExitCode::FAILURE;
                }
            }
            if let Some(command) = &options.peer {
                match run_peer(command, shape, threads) {
                    Ok(lines) => theirs.extend(lines),
                    Err(error) => {
                        eprintln!("error: peer on {}: {error}", shape.name);
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    let pass = match options.forward {
        true => "forward pass alone",
        false => "forward + backward",
    };
    println!("\n{threads} thread(s), {pass}, FMA peak {peak:.1} GFLOP/s (measured in this run)");
    println!(
        "{:<22} {:>22} {:>10} {:>10} {:>9} {:>6}",
        "layer", "N×C_in→C_out×H×W", "median ms", "min ms", "GFLOP/s", "%peak"
    );
    let mut total = 0.0;
    let mut medians = Vec::new();
    for (shape, rounds) in shapes.iter().zip(&ours) {
        let median = median_of(rounds.iter().map(|&(median, _)| median).collect());
        let min = rounds
            .iter()
            .map(|&(_, min)| min)
            .fold(f64::INFINITY, f64::min);
        let rate = gflop(shape, options.forward) / (median * 1e-3);
        let [n, c_in, c_out, h, w] = shape.dims;
        println!(
            "{:<22} {:>22} {median:>10.3} {min:>10.3} {rate:>9.1} {:>5.0}%",
            shape.name,
            format!("{n}×{c_in}→{c_out}×{h}×{w}"),
            100.0 * rate / peak
        );
        if !shape.name.starts_with("linear") {
            total += median;
        }
        medians.push(median);
    }
    println!("sum of the convolution layers' medians: {total:.2} ms");
    if options.peer.is_some() {
        side_by_side(&shapes, &medians, &theirs, options.rounds);
    }
    ExitCode::SUCCESS
}

/// The median of some values (the mean of the middle two for an even count).
fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs the peer's command on `shape` alone; returns its `RESULT` lines as (system, name,
/// median ms), echoing them.
fn run_peer(
    command: &str,
    shape: &Shape,
    threads: usize,
) -> Result<Vec<(String, String, f64)>, String> {
    let path = std::env::temp_dir().join(format!("pointwise-peer-{}.txt", std::process::id()));
    let [n, c_in, c_out, h, w] = shape.dims;
    let line = format!("{} {n} {c_in} {c_out} {h} {w}\n", shape.name);
    std::fs::write(&path, line).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let command = command
        .replace("{shapes}", &path.display().to_string())
        .replace("{threads}", &threads.to_string());
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .map_err(|e| format!("cannot run `{command}`: {e}"));
    let _ = std::fs::remove_file(&path);
    let output = output?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`{command}` failed ({}): {stderr}", output.status));
    }
    let mut lines = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["RESULT", system, name, _, ms, ..] = fields[..] {
            if let Ok(ms) = ms.parse::<f64>() {
                println!("{line}");
                lines.push((system.to_string(), name.to_string(), ms));
            }
        }
    }
    match lines.is_empty() {
        true => Err(format!("`{command}` printed no RESULT line")),
        false => Ok(lines),
    }
}

/// The table of ratios: per layer this side's median against the peer's fastest system (the
/// median of each system's rounds), the sums over the convolution layers, and the layers where
/// this side is slower.
fn side_by_side(shapes: &[Shape], medians: &[f64], theirs: &[(String, String, f64)], rounds: u32) {
    println!("\nside by side, each layer here then on the peer, {rounds} round(s); medians of the rounds' medians");
    println!(
        "{:<22} {:>12} {:>12} {:>8}  peer's fastest",
        "layer", "this, ms", "peer, ms", "ratio"
    );
    let (mut ours_total, mut theirs_total, mut slower) = (0.0, 0.0, Vec::new());
    for (shape, &median) in shapes.iter().zip(medians) {
        let mut by_system: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (system, name, ms) in theirs {
            if *name == shape.name {
                by_system.entry(system).or_default().push(*ms);
            }
        }
        let best = by_system
            .into_iter()
            .map(|(system, times)| (median_of(times), system))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((peer, system)) = best else {
            println!("{:<22} {median:>12.3} {:>12} {:>8}", shape.name, "-", "-");
            continue;
        };
        let ratio = peer / median;
        println!(
            "{:<22} {median:>12.3} {peer:>12.3} {ratio:>7.2}×  {system}",
            shape.name
        );
        if !shape.name.starts_with("linear") {
            ours_total += median;
            theirs_total += peer;
            if ratio < 1.0 {
                slower.push(format!("{} {ratio:.2}×", shape.name));
            }
        }
    }
    println!(
        "sum of the convolution layers: {ours_total:.2} against {theirs_total:.2} ms ({:.2}×); slower here: {}",
        theirs_total / ours_total,
        match slower.is_empty() {
            true => "none".to_string(),
            false => format!("{} ({})", slower.len(), slower.join(", ")),
        }
    );
}
