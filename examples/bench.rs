//! Speed and memory of 1×1 training, against this machine's own limits, in one run.
//!
//! ```sh
//! cargo run --release --example bench                    # 1 and 2 threads, a table
//! cargo run --release --example bench -- --json out.json # the same figures as JSON
//! BENCH_THREADS=2 cargo run --release --example bench -- --result-lines   # for ../shared/peers
//! ```
//!
//! Workloads (f32, as in ../shared/peers): W1 = 1×1 conv 256→64 with bias on N = 32, 28×28,
//! forward (0.822 GFLOP) and forward + backward for input, weight and bias from dY = ones
//! (2.466 GFLOP); W2 = one training step of the bottleneck block (1×1 256→64 + ReLU, 1×1 64→256 +
//! ReLU, 2×2 max pool, global average pool, linear 256→10, softmax cross-entropy, backward to
//! every parameter; 4.11 GFLOP; `Model::new` pools before the second ReLU, the same function),
//! the optimizer update timed apart; W3 = the GEMM of W1's forward
//! shape (64×256)·(256×25088) and a 2048³ GEMM, through the crate's GEMM.
//!
//! Each thread count runs in a child process of its own, because the thread count of the GEMM
//! backend is fixed when a process first uses it. Peaks: an FMA loop with independent
//! accumulators (12 with AVX2, 16 with AVX-512: as many as stay in registers; see
//! `common/peak.rs`).

use ndarray::{Array2, Array4, ArrayD, Ix2, Ix4, IxDyn};
use pointwise::ops::{conv1x1, GradWrite};
use pointwise::optim::{Optimizer, OptimizerKind};
use pointwise::{Architecture, Model};
use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::Ordering;

mod common;
use common::time;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------- counting allocator

#[path = "common/counting.rs"]
mod counting;
use counting::ALLOCATIONS;

// ---------------------------------------------------------------- workloads

const N: usize = 32;
const C_IN: usize = 256;
const C_OUT: usize = 64;
const SIDE: usize = 28;
const CLASSES: usize = 10;
const CONV_GFLOP: f64 = 2.0 * (N * SIDE * SIDE * C_IN * C_OUT) as f64 * 1e-9;

/// Deterministic values in [-0.5, 0.5) (xorshift), as the peers' harness makes them.
fn values(seed: u32) -> impl FnMut() -> f32 {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as f32 / u32::MAX as f32 - 0.5
    }
}

/// A tensor of those values, allocated as the tape allocates its own (on a cache line).
fn fill(shape: &[usize], seed: u32) -> ArrayD<f32> {
    let mut tensor = pointwise::aligned_zeros(IxDyn(shape));
    let mut next = values(seed);
    tensor.iter_mut().for_each(|v| *v = next());
    tensor
}

#[derive(Serialize, Deserialize)]
struct Figure {
    workload: String,
    /// (median, min) milliseconds per call.
    ms: (f64, f64),
    gflop: f64,
}

impl Figure {
    fn gflops(&self) -> f64 {
        self.gflop / (self.ms.0 * 1e-3)
    }
}

fn gemm_figures() -> Vec<Figure> {
    let mut figures = Vec::new();
    for (workload, m, k, n) in [
        ("W3_conv_gemm", C_OUT, C_IN, N * SIDE * SIDE),
        ("W3_sq2048", 2048, 2048, 2048),
    ] {
        let a = fill(&[m, k], 1).into_dimensionality().unwrap();
        let b = fill(&[k, n], 2).into_dimensionality().unwrap();
        let mut c = pointwise::aligned_zeros::<f32, _>(Ix2(m, n));
        let ms = time(|| {
            pointwise::gemm::gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap();
            black_box(&c);
        });
        figures.push(Figure {
            workload: workload.to_string(),
            ms,
            gflop: 2.0 * (m * k * n) as f64 * 1e-9,
        });
    }
    figures
}

fn w1_figures() -> Vec<Figure> {
    let x: Array4<f32> = fill(&[N, C_IN, SIDE, SIDE], 3)
        .into_dimensionality()
        .unwrap();
    let weight: Array2<f32> = (fill(&[C_OUT, C_IN], 4) * 0.12)
        .into_dimensionality()
        .unwrap();
    let bias = fill(&[C_OUT], 5)
        .into_dimensionality::<ndarray::Ix1>()
        .unwrap();
    let mut y = pointwise::aligned_zeros::<f32, _>(Ix4(N, C_OUT, SIDE, SIDE));
    let forward = time(|| {
        conv1x1::forward(x.view(), weight.view(), Some(bias.view()), y.view_mut()).unwrap();
        black_box(&y);
    });
    let mut ones = pointwise::aligned_zeros::<f32, _>(Ix4(N, C_OUT, SIDE, SIDE));
    ones.fill(1.0);
    let mut dx = pointwise::aligned_zeros::<f32, _>(x.raw_dim());
    let mut dweight = Array2::<f32>::zeros(weight.dim());
    let mut dbias = ndarray::Array1::<f32>::zeros(C_OUT);
    let forward_backward = time(|| {
        conv1x1::forward(x.view(), weight.view(), Some(bias.view()), y.view_mut()).unwrap();
        // Fresh gradients each call, as with `.grad = None` in the peers: dX is overwritten
        // (what the tape does for a gradient's first contribution), dW and db start from zero.
        dweight.fill(0.0);
        dbias.fill(0.0);
        conv1x1::backward(
            x.view(),
            weight.view(),
            ones.view(),
            None,
            Some(dweight.view_mut()),
            Some(dbias.view_mut()),
        )
        .unwrap();
        conv1x1::input_gradient(
            weight.view(),
            ones.view(),
            dx.view_mut(),
            GradWrite::Overwrite,
        )
        .unwrap();
        black_box((&dx, &dweight, &dbias));
    });
    vec![
        Figure {
            workload: "W1_fwd".to_string(),
            ms: forward,
            gflop: CONV_GFLOP,
        },
        Figure {
            workload: "W1_fwdbwd".to_string(),
            ms: forward_backward,
            gflop: 3.0 * CONV_GFLOP,
        },
    ]
}

/// The W2 model with its batch written straight into its input buffer (the batch exists once,
/// as in a training loop); returns the model and the labels.
fn w2_model() -> (Model, Vec<usize>) {
    let mut model = Model::new(Architecture::bottleneck(C_IN, C_OUT, CLASSES), 0).unwrap();
    let mut next = values(6);
    let mut batch = model.input_mut([N, C_IN, SIDE, SIDE]).unwrap();
    batch.iter_mut().for_each(|v| *v = next());
    let labels = (0..N).map(|n| n % CLASSES).collect();
    (model, labels)
}

#[derive(Serialize, Deserialize)]
struct Memory {
    allocations_per_step: f64,
    peak_rss_mib: f64,
    minimum_mib: f64,
}

/// Peak resident memory of this process so far (Linux), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// params + gradients + optimizer state (SGD momentum) + saved activations + the batch, in MiB.
/// Saved activations: what the backward pass must read — the reduce output (N·64·P: the
/// expand's input, and its ReLU mask can be read from it), the pool's output (N·256·P/4: the
/// ReLU after the pool is gated by it) and its arg-max (N·256·P/4). The expand output, the
/// pool's input, is read by nothing after the forward pass (the tape keeps it all the same).
fn theoretical_minimum_mib() -> f64 {
    let params = (C_OUT * C_IN + C_OUT + C_IN * C_OUT + C_IN + CLASSES * C_IN + CLASSES) as f64;
    let pixels = (SIDE * SIDE) as f64;
    let activations = N as f64 * pixels * (C_OUT as f64 + 2.0 * C_IN as f64 / 4.0);
    let batch = (N * C_IN) as f64 * pixels;
    (3.0 * params + activations + batch) * 4.0 / (1024.0 * 1024.0)
}

fn w2_figures() -> (Vec<Figure>, Memory) {
    let (mut model, labels) = w2_model();
    let step = time(|| {
        black_box(model.forward_backward_in_place(&labels).unwrap());
    });
    let mut optimizer = Optimizer::new(OptimizerKind::sgd()).unwrap();
    let update = time(|| optimizer.step(model.graph_mut(), 1e-6).unwrap());
    // Steady state: count allocations over 20 steps after the warm-up above, with the loop
    // run inside the thread pool as a training loop should be (pointwise::parallel::install).
    let allocations = pointwise::parallel::install(|| {
        // One step first: the pool's threads allocate their GEMM scratch on first use.
        model.forward_backward_in_place(&labels).unwrap();
        optimizer.step(model.graph_mut(), 1e-6).unwrap();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..20 {
            model.forward_backward_in_place(&labels).unwrap();
            optimizer.step(model.graph_mut(), 1e-6).unwrap();
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 20.0
    });
    let memory = Memory {
        allocations_per_step: allocations,
        peak_rss_mib: peak_rss_mib(),
        minimum_mib: theoretical_minimum_mib(),
    };
    let figures = vec![
        Figure {
            workload: "W2_step".to_string(),
            ms: step,
            gflop: 5.0 * CONV_GFLOP,
        },
        Figure {
            workload: "W2_update".to_string(),
            ms: update,
            gflop: 0.0,
        },
    ];
    (figures, memory)
}

// ---------------------------------------------------------------- driver

#[derive(Serialize, Deserialize)]
struct Run {
    threads: usize,
    peak: f64,
    ceiling: f64,
    figures: Vec<Figure>,
    memory: Memory,
}

fn measure(threads: usize) -> Run {
    let peak = common::peak::fma_peak(threads);
    // W2 first: the peak RSS read after it is then W2's own (the process's high-water mark
    // does not yet include the other workloads' buffers).
    let (w2, memory) = w2_figures();
    let mut figures = gemm_figures();
    figures.extend(w1_figures());
    figures.extend(w2);
    let ceiling = figures
        .iter()
        .find(|f| f.workload == "W3_conv_gemm")
        .map_or(f64::NAN, Figure::gflops);
    Run {
        threads,
        peak,
        ceiling,
        figures,
        memory,
    }
}

fn print_run(run: &Run) {
    println!(
        "\n{} thread(s): FMA peak {:.1} GFLOP/s, GEMM ceiling on W1's shape {:.1} GFLOP/s",
        run.threads, run.peak, run.ceiling
    );
    println!(
        "{:<52} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "workload", "ms", "min ms", "GFLOP/s", "%peak", "%ceil"
    );
    for f in &run.figures {
        let (rate, peak, ceil) = if f.gflop > 0.0 {
            let g = f.gflops();
            (
                format!("{g:.1}"),
                format!("{:.0}%", 100.0 * g / run.peak),
                format!("{:.0}%", 100.0 * g / run.ceiling),
            )
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        println!(
            "{:<52} {:>9.2} {:>9.2} {:>9} {:>7} {:>7}",
            describe(&f.workload),
            f.ms.0,
            f.ms.1,
            rate,
            peak,
            ceil
        );
    }
    let m = &run.memory;
    println!(
        "W2 steady state: {:.1} heap allocations per step (fwd + bwd + update); peak RSS {:.0} MiB, theoretical minimum {:.0} MiB ({:.2}×)",
        m.allocations_per_step,
        m.peak_rss_mib,
        m.minimum_mib,
        m.peak_rss_mib / m.minimum_mib
    );
}

fn threads_from_env() -> usize {
    std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Speed and memory of 1×1 training against this machine's FMA peak, at 1 and 2 threads.
#[derive(clap::Parser)]
struct Options {
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// Print one RESULT line per workload at BENCH_THREADS threads (for side-by-side runs).
    #[arg(long, conflicts_with = "json")]
    result_lines: bool,
    /// Internal: measure one thread count and print it as JSON.
    #[arg(long, hide = true)]
    child: bool,
}

fn main() -> std::process::ExitCode {
    let options = <Options as clap::Parser>::parse();
    if options.result_lines {
        let run = measure(threads_from_env());
        for f in run.figures.iter().filter(|f| f.gflop > 0.0) {
            println!(
                "RESULT\tpointwise\t{}\t{}\t{:.4}\t{:.4}\t{:.5}\t{:.2}",
                f.workload,
                run.threads,
                f.ms.0,
                f.ms.1,
                f.gflop,
                f.gflops()
            );
        }
        return std::process::ExitCode::SUCCESS;
    }
    if options.child {
        // One thread count, in a fresh process: print the figures as JSON for the parent.
        let json = serde_json::to_string(&measure(threads_from_env()));
        println!("{}", json.unwrap());
        return std::process::ExitCode::SUCCESS;
    }
    // The output file is created before the long run, so that a path that cannot be written
    // fails at once.
    let mut json_file = match options.json.as_ref().map(std::fs::File::create).transpose() {
        Ok(file) => file,
        Err(error) => {
            eprintln!(
                "error: cannot write {:?}: {error}",
                options.json.unwrap_or_default()
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let exe = std::env::current_exe().unwrap();
    let mut runs = Vec::new();
    for threads in [1, 2] {
        let output = Command::new(&exe)
            .arg("--child")
            .env("BENCH_THREADS", threads.to_string())
            .env("POINTWISE_THREADS", threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("MATMUL_NUM_THREADS", threads.to_string())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        runs.push(serde_json::from_slice::<Run>(&output.stdout).unwrap());
    }
    println!(
        "GEMM backend for f32 on this CPU: {}",
        pointwise::gemm::backend::<f32>()
    );
    for run in &runs {
        print_run(run);
    }
    if let (Some(file), Some(path)) = (json_file.as_mut(), options.json) {
        if let Err(error) = serde_json::to_writer_pretty(file, &runs) {
            eprintln!("error: cannot write {path:?}: {error}");
            return std::process::ExitCode::FAILURE;
        }
        println!("\nfigures written to {}", path.display());
    }
    std::process::ExitCode::SUCCESS
}

fn describe(workload: &str) -> &'static str {
    match workload {
        "W3_conv_gemm" => "GEMM (64×256)·(256×25088), W1 forward as one GEMM",
        "W3_sq2048" => "GEMM 2048³, for reference",
        "W1_fwd" => "W1 forward",
        "W1_fwdbwd" => "W1 forward + backward (dX, dW, db)",
        "W2_step" => "W2 training step (fwd + bwd, no update)",
        _ => "W2 SGD momentum update, apart",
    }
}
