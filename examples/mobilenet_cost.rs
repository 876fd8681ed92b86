//! What the 1×1 layers cost in MobileNet: Howard et al. 2017 ("MobileNets"), Table 2,
//! reproduced from the layer table (Table 1) with the crate's own layers and cost model, then
//! one forward + backward pass timed layer by layer.
//!
//! ```sh
//! cargo run --release --example mobilenet_cost
//! ```
//! MobileNet-v1, width 1.0, 224×224×3 input, 1000 classes: a full 3×3 convolution (stride 2),
//! thirteen depthwise-separable blocks (depthwise 3×3 + BN + ReLU, then *pointwise* 1×1 + BN +
//! ReLU), global average pooling and a fully-connected layer. Parameters are counted as the
//! paper counts them: convolution and FC weights, no biases, no batch-norm terms.

use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use ndarray_rand::rand_distr::Normal;
use ndarray_rand::RandomExt;
use pointwise::{Graph, NodeId};
use std::collections::BTreeMap;

/// Table 1's depthwise-separable blocks: (input channels, output channels, depthwise stride).
/// The 13th depthwise layer is printed "s2" in Table 1, but its output stays 7×7 (so does the
/// next layer's input in the same table): it is stride 1, as in the reference implementations.
const BLOCKS: [(usize, usize, usize); 13] = [
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
];

/// Table 2 of the paper: (layer type, share of mult-adds, share of parameters), in %.
const PAPER: [(&str, Option<f64>, f64); 4] = [
    ("Conv 1×1", Some(94.86), 74.59),
    ("Conv DW 3×3", Some(3.06), 1.06),
    ("Conv 3×3", Some(1.19), 0.02),
    ("Fully Connected", Some(0.18), 24.33),
];

struct Network {
    graph: Graph<f32>,
    input: NodeId,
    loss: NodeId,
}

fn build(batch: usize) -> Network {
    let mut rng = StdRng::seed_from_u64(0);
    let mut graph = Graph::<f32>::new();
    let mut param = |graph: &mut Graph<f32>, name: String, shape: &[usize]| {
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let normal = Normal::new(0.0, (2.0 / fan_in as f32).sqrt()).unwrap();
        graph
            .param(&name, ArrayD::random_using(IxDyn(shape), normal, &mut rng))
            .unwrap()
    };
    let bn_relu = |graph: &mut Graph<f32>, x: NodeId, name: &str, channels: usize| {
        let gamma = graph
            .param(
                &format!("{name}.bn.weight"),
                ArrayD::ones(IxDyn(&[channels])),
            )
            .unwrap();
        let beta = graph
            .param(
                &format!("{name}.bn.bias"),
                ArrayD::zeros(IxDyn(&[channels])),
            )
            .unwrap();
        graph.batch_norm_relu(x, gamma, beta).unwrap()
    };
    let input = graph.input("image");
    let w = param(&mut graph, "stem.weight".into(), &[32, 3, 3, 3]);
    let x = graph.conv2d(input, w, None, 2, 1).unwrap();
    let mut x = bn_relu(&mut graph, x, "stem", 32);
    for (i, (c_in, c_out, stride)) in BLOCKS.into_iter().enumerate() {
        let w = param(&mut graph, format!("block{i}.dw.weight"), &[c_in, 1, 3, 3]);
        let h = graph.depthwise(x, w, None, stride, 1).unwrap();
        let h = bn_relu(&mut graph, h, &format!("block{i}.dw"), c_in);
        let w = param(&mut graph, format!("block{i}.pw.weight"), &[c_out, c_in]);
        let h = graph.conv1x1(h, w, None).unwrap();
        x = bn_relu(&mut graph, h, &format!("block{i}.pw"), c_out);
    }
    let pooled = graph.global_avg_pool(x).unwrap();
    let w = param(&mut graph, "fc.weight".into(), &[1000, 1024]);
    let b = graph
        .param("fc.bias", ArrayD::zeros(IxDyn(&[1000])))
        .unwrap();
    let logits = graph.linear(pooled, w, Some(b)).unwrap();
    let loss = graph.softmax_cross_entropy(logits).unwrap();
    graph
        .set_labels(loss, &(0..batch).map(|n| n * 7 % 1000).collect::<Vec<_>>())
        .unwrap();
    Network { graph, input, loss }
}

/// The paper's layer type of a node, if it has weights.
fn layer_type(kind: &str) -> Option<&'static str> {
    match kind {
        "conv1x1" | "conv1x1+relu" => Some("Conv 1×1"),
        "depthwise" => Some("Conv DW 3×3"),
        "conv2d" => Some("Conv 3×3"),
        "linear" => Some("Fully Connected"),
        _ => None,
    }
}

fn main() {
    // One image for the cost table (it is per image), then a batch of 8 to time.
    let mut one = build(1);
    let image = ArrayD::<f32>::zeros(IxDyn(&[1, 3, 224, 224]));
    one.graph.set_input(one.input, image.view()).unwrap();
    one.graph.set_training(false);
    one.graph.forward(one.loss).unwrap();
    let mut macs: BTreeMap<&str, u64> = BTreeMap::new();
    let mut weights: BTreeMap<&str, usize> = BTreeMap::new();
    for id in one.graph.node_ids() {
        let Some(kind) = layer_type(one.graph.kind(id).unwrap()) else {
            continue;
        };
        *macs.entry(kind).or_default() += one.graph.cost(id).unwrap().forward_macs;
        let weight = one.graph.inputs(id).unwrap()[1];
        *weights.entry(kind).or_default() += one.graph.value(weight).unwrap().len();
    }
    let (total_macs, total_weights) = (macs.values().sum::<u64>(), weights.values().sum::<usize>());
    println!("MobileNet-v1 (224×224×3, width 1.0, 1000 classes), per image:");
    println!(
        "  {:.1} million mult-adds (paper: 569), {:.2} million parameters (paper: 4.2)\n",
        total_macs as f64 * 1e-6,
        total_weights as f64 * 1e-6
    );
    println!(
        "{:<16} {:>14} {:>10} {:>10}   {:>12} {:>10} {:>10}",
        "layer type", "mult-adds", "share", "paper", "parameters", "share", "paper"
    );
    let mut mismatches = Vec::new();
    for (kind, paper_macs, paper_params) in PAPER {
        let (m, p) = (macs[kind], weights[kind]);
        let (m_share, p_share) = (
            100.0 * m as f64 / total_macs as f64,
            100.0 * p as f64 / total_weights as f64,
        );
        let paper_m = paper_macs.map_or("—".to_string(), |v| format!("{v:.2}%"));
        println!("{kind:<16} {m:>14} {m_share:>9.2}% {paper_m:>10}   {p:>12} {p_share:>9.2}% {paper_params:>9.2}%");
        for (what, ours, theirs) in [
            ("mult-adds", m_share, paper_macs),
            ("parameters", p_share, Some(paper_params)),
        ] {
            if let Some(theirs) = theirs.filter(|t| (t - ours).abs() >= 0.005) {
                mismatches.push(format!(
                    "{kind} {what}: {ours:.2}% here, {theirs:.2}% in the paper"
                ));
            }
        }
    }
    let paper_sum: f64 = PAPER.iter().filter_map(|p| p.1).sum();
    println!(
        "{:<16} {:>14} {:>9.2}% {:>9.2}%",
        "sum", total_macs, 100.0, paper_sum
    );
    if mismatches.is_empty() {
        println!("\nEvery share matches the paper's Table 2 to the printed precision.");
    } else {
        println!("\nWhere this table and the paper's Table 2 disagree (computed from the layer table, not adjusted):");
        for line in &mismatches {
            println!("  {line}");
        }
        println!("  The paper's mult-add shares sum to {paper_sum:.2}%, not 100%; the full 3×3 convolution's");
        println!("  share computed from Table 1 (3·3·3·32 weights at 112×112 outputs = 10.8 million) is the");
        println!("  figure that does not agree.");
    }

    // Time one forward + backward at batch 8, layer by layer.
    let batch = 8;
    let mut net = build(batch);
    let images = ArrayD::<f32>::from_shape_fn(IxDyn(&[batch, 3, 224, 224]), |i| {
        ((i[1] * 7 + i[2] * 3 + i[3]) % 17) as f32 / 17.0 - 0.5
    });
    net.graph.set_input(net.input, images.view()).unwrap();
    let step = |graph: &mut Graph<f32>| {
        graph.zero_grad();
        graph.forward(net.loss).unwrap();
        graph.backward(net.loss).unwrap();
    };
    step(&mut net.graph); // warm up: buffers allocated once
    net.graph.set_profiling(true);
    let started = std::time::Instant::now();
    step(&mut net.graph);
    let wall = started.elapsed().as_secs_f64();
    let mut seconds: BTreeMap<&str, f64> = BTreeMap::new();
    for id in net.graph.node_ids() {
        let [forward, backward] = net.graph.time(id).unwrap();
        let kind =
            layer_type(net.graph.kind(id).unwrap()).unwrap_or("other (BN, ReLU, pool, loss)");
        *seconds.entry(kind).or_default() += (forward + backward).as_secs_f64();
    }
    let timed: f64 = seconds.values().sum();
    println!(
        "\nOne forward + backward at batch {batch}: {:.0} ms ({} thread(s), f32 GEMM: {})",
        1e3 * wall,
        pointwise::parallel::threads(),
        pointwise::gemm::backend::<f32>()
    );
    println!(
        "{:<30} {:>10} {:>10} {:>14}",
        "layer type", "ms", "time", "mult-adds"
    );
    for (kind, s) in &seconds {
        let share = macs.get(kind).map_or("—".to_string(), |m| {
            format!("{:.2}%", 100.0 * *m as f64 / total_macs as f64)
        });
        println!(
            "{kind:<30} {:>10.1} {:>9.1}% {share:>14}",
            1e3 * s,
            100.0 * s / timed
        );
    }
}
