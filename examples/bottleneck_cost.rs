//! What a 1×1 reduction buys, predicted by the cost model and measured in one run.
//!
//! ```sh
//! cargo run --release --example bottleneck_cost
//! ```
//! The Inception/ResNet-style bottleneck: "256 → 1×1 conv 64 → 4×4 conv 256" against "256 → 4×4 conv 256", and an
//! Inception-style 5×5 branch with and without its 1×1 reduction (192 → 16 → 5×5 32 against
//! 192 → 5×5 32), on N = 8 images of 28×28. Both paths of a pair have the same input and output
//! shapes; the input needs no gradient (as for a network's first layers).

use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use ndarray_rand::rand_distr::Normal;
use ndarray_rand::RandomExt;
use pointwise::{Graph, NodeId};

mod common;

const BATCH: usize = 8;
const SIDE: usize = 28;

struct Path {
    name: String,
    graph: Graph<f32>,
    output: NodeId,
    upstream: ArrayD<f32>,
}

fn random(shape: &[usize], rng: &mut StdRng) -> ArrayD<f32> {
    let fan_in: usize = shape[1..].iter().product();
    let normal = Normal::new(0.0, (2.0 / fan_in as f32).sqrt()).unwrap();
    ArrayD::random_using(IxDyn(shape), normal, rng)
}

/// input (c_in) → [1×1 conv to `reduced`] → K×K conv (c_out), padding K/2.
fn build(c_in: usize, reduced: Option<usize>, kernel: usize, c_out: usize, seed: u64) -> Path {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut graph = Graph::new();
    let x = graph.input("x");
    let image = random(&[BATCH, c_in, SIDE, SIDE], &mut rng);
    graph.set_input(x, image.view()).unwrap();
    let mut h = x;
    let mut channels = c_in;
    let mut name = format!("{c_in}");
    if let Some(reduced) = reduced {
        let w = graph
            .param("reduce.weight", random(&[reduced, c_in], &mut rng))
            .unwrap();
        h = graph.conv1x1(h, w, None).unwrap();
        channels = reduced;
        name += &format!(" → 1×1 {reduced}");
    }
    let w = graph
        .param(
            "conv.weight",
            random(&[c_out, channels, kernel, kernel], &mut rng),
        )
        .unwrap();
    let output = graph.conv2d(h, w, None, 1, kernel / 2).unwrap();
    name += &format!(" → {kernel}×{kernel} {c_out}");
    graph.forward(output).unwrap();
    let upstream = ArrayD::from_elem(graph.value(output).unwrap().shape(), 1.0);
    Path {
        name,
        graph,
        output,
        upstream,
    }
}

fn total_macs(path: &Path) -> (u64, u64) {
    let total = path.graph.total_cost().unwrap();
    (total.forward_macs, total.backward_macs)
}

fn compare(title: &str, per_pixel: Option<f64>, mut with: Path, mut without: Path) {
    println!("\n== {title}: input (N={BATCH}, C, {SIDE}, {SIDE})");
    for path in [&with, &without] {
        println!("\n{}\n{}", path.name, path.graph.summary().unwrap());
    }
    let (with_fwd, with_bwd) = total_macs(&with);
    let (without_fwd, without_bwd) = total_macs(&without);
    let measure = |path: &mut Path| {
        let forward = common::time(|| path.graph.forward(path.output).unwrap()).0;
        let both = common::time(|| {
            path.graph.zero_grad();
            path.graph.forward(path.output).unwrap();
            path.graph
                .backward_from(path.output, path.upstream.view())
                .unwrap();
        })
        .0;
        (forward, both)
    };
    let (with_f, with_fb) = measure(&mut with);
    let (without_f, without_fb) = measure(&mut without);
    println!(
        "{:<34} {:>12} {:>12} {:>14} {:>14}",
        "", "fwd MACs", "fwd+bwd MACs", "fwd ms", "fwd+bwd ms"
    );
    for (path, fwd, bwd, f, fb) in [
        (&with, with_fwd, with_bwd, with_f, with_fb),
        (&without, without_fwd, without_bwd, without_f, without_fb),
    ] {
        println!(
            "{:<34} {:>12} {:>12} {:>14.2} {:>14.2}",
            path.name,
            fwd,
            fwd + bwd,
            f,
            fb
        );
    }
    if let Some(per_pixel) = per_pixel {
        println!("predicted ratio per pixel (seed's count): {per_pixel:.2}×");
    }
    println!(
        "predicted ratio (cost model, these shapes): forward {:.2}×, forward+backward {:.2}×",
        without_fwd as f64 / with_fwd as f64,
        (without_fwd + without_bwd) as f64 / (with_fwd + with_bwd) as f64
    );
    println!(
        "measured ratio (time, this run):           forward {:.2}×, forward+backward {:.2}×",
        without_f / with_f,
        without_fb / with_fb
    );
}

fn main() {
    compare(
        "the seed's bottleneck: 256 → 1×1 64 → 4×4 256 vs 256 → 4×4 256",
        Some((256.0 * 256.0 * 16.0) / (256.0 * 64.0 * 17.0)),
        build(256, Some(64), 4, 256, 1),
        build(256, None, 4, 256, 2),
    );
    compare(
        "Inception 5×5 branch: 192 → 1×1 16 → 5×5 32 vs 192 → 5×5 32",
        Some((192.0 * 32.0 * 25.0) / (192.0 * 16.0 + 16.0 * 32.0 * 25.0)),
        build(192, Some(16), 5, 32, 3),
        build(192, None, 5, 32, 4),
    );
}
