//! Ready-made networks, each a few lines of [`Layers`]: the two MNIST networks of
//! `examples/train_mnist.rs`, named as the `nn.Sequential` of the PyTorch recipe names them
//! (`"0.weight"`, `"1.running_mean"`, …), so that their weights move between the two; and
//! MobileNetV2, named as torchvision names it, whose 1×1 layers `bench_shapes` times.
//! (The bottleneck network and its baseline are [`crate::Model::new`].)

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::layers::Layers;
use crate::model::Model;

/// Classes of MNIST.
pub const MNIST_CLASSES: usize = 10;

/// conv (no bias) + batch norm + ReLU, named `i`, `i+1` as in `conv_bn_relu` of mnist_torch.py;
/// `groups = c_in` makes the conv depthwise. Returns the output and the next index.
fn conv_bn_relu(
    nn: &mut Layers<'_, f32>,
    (x, i): (NodeId, usize),
    [c_in, c_out, kernel, padding]: [usize; 4],
    depthwise: bool,
) -> Result<(NodeId, usize)> {
    let name = i.to_string();
    let h = match (kernel, depthwise) {
        (_, true) => nn.depthwise(&name, x, [c_in, 1, kernel], [1, padding], false)?,
        (1, false) => nn.conv1x1(&name, x, c_in, c_out, false)?,
        _ => nn.conv2d(&name, x, [c_in, c_out, kernel], [1, padding], false)?,
    };
    // Batch norm and ReLU as one node; nn.Sequential counts them as two modules.
    let h = nn.batch_norm_relu(&(i + 1).to_string(), h, c_out)?;
    Ok((h, i + 3))
}

/// Network-in-Network for 28×28 digits (N, 1, 28, 28), PyTorch's default initialisation from
/// `seed`: conv 5×5 1→32 → 1×1 32→32 → max pool → conv 3×3 32→64 → 1×1 64→64 → max pool →
/// conv 3×3 64→128 (each without bias, + batch norm + ReLU), then a 1×1 convolution to one map
/// per class, averaged: the 1×1 convolution *is* the classifier, there is no linear layer.
pub fn mnist_nin(seed: u64) -> Result<Model> {
    mnist(seed, true)
}

/// A MobileNet-style network for 28×28 digits: conv 3×3 1→32, then four depthwise-separable
/// blocks (depthwise 3×3 + 1×1 pointwise, each + batch norm + ReLU; 64, 128, 128, 256
/// channels, max pools after the first two), global average pool, linear 256→10.
pub fn mnist_mobilenet(seed: u64) -> Result<Model> {
    mnist(seed, false)
}

fn mnist(seed: u64, nin: bool) -> Result<Model> {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, seed);
    let x = nn.input("image");
    let logits = if nin {
        let h = conv_bn_relu(&mut nn, (x, 0), [1, 32, 5, 2], false)?;
        let (h, i) = conv_bn_relu(&mut nn, h, [32, 32, 1, 0], false)?;
        let h = (nn.max_pool(h, 2, 2)?, i + 1);
        let h = conv_bn_relu(&mut nn, h, [32, 64, 3, 1], false)?;
        let (h, i) = conv_bn_relu(&mut nn, h, [64, 64, 1, 0], false)?;
        let h = (nn.max_pool(h, 2, 2)?, i + 1);
        let (h, i) = conv_bn_relu(&mut nn, h, [64, 128, 3, 1], false)?;
        // One map per class, averaged: the 1×1 convolution *is* the classifier.
        let maps = nn.conv1x1(&i.to_string(), h, 128, MNIST_CLASSES, true)?;
        nn.global_avg_pool(maps)?
    } else {
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
        nn.linear(&(h.1 + 2).to_string(), pooled, 256, MNIST_CLASSES, true)?
    };
    Model::classifier(graph, x, logits)
}

/// MobileNetV2's inverted residual blocks (Sandler et al. 2018, Table 2): expansion t, output
/// channels c, repeats n, stride s of the first repeat.
const MOBILENET_V2_BLOCKS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// MobileNetV2 (width 1.0) for (N, 3, H, W) images, `classes` outputs, PyTorch's default
/// initialisation from `seed`, with torchvision's module names (`"features.2.conv.0.0.weight"`
/// for block 2's 1×1 expansion, `"classifier.1.weight"` for the linear head), so that a
/// torchvision state dict's keys name the same tensors (torchvision's dropout before the head
/// is left out: it has no parameters). A torchvision 0.29 `mobilenet_v2()` state dict saved
/// with `safetensors.torch.save_file` loads into it strictly
/// ([`crate::export::load_safetensors_into`]), and in evaluation mode the two gave the same
/// logits on two random 224×224 images, within 6·10⁻⁸ (2026-12-07).
///
/// A 3×3 convolution (stride 2) to 32 channels, then 17 inverted residual blocks, each a 1×1
/// *expansion* by t (absent when t = 1), a depthwise 3×3 (stride 1 or 2), and a 1×1
/// *projection* to c channels with no activation after it, plus the block's input when the
/// shapes allow; then a 1×1 convolution to 1280 channels, global average pooling and a linear
/// layer. Convolutions have no bias (each is followed by batch norm), activations are ReLU6,
/// fused into the batch norm before them ([`Graph::batch_norm_relu6`]).
/// At 224×224 it has 3 504 872 parameters for 1000 classes (torchvision's count) and takes
/// 301 million multiply-adds an image, 268 million (89 %) of them in its 1×1 layers (the
/// crate's cost model, [`Graph::cost`]): `cargo run --release --example bench_shapes` times
/// those layers.
pub fn mobilenet_v2(classes: usize, seed: u64) -> Result<Model> {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, seed);
    let x = nn.input("image");
    let mut features = nn.scope("features");
    let h = features.conv2d("0.0", x, [3, 32, 3], [2, 1], false)?;
    let mut h = features.batch_norm_relu6("0.1", h, 32)?;
    let (mut channels, mut index) = (32, 1);
    for (expansion, c_out, repeats, first_stride) in MOBILENET_V2_BLOCKS {
        for repeat in 0..repeats {
            let stride = if repeat == 0 { first_stride } else { 1 };
            let mut block = features.scope(&format!("{index}.conv"));
            h = inverted_residual(&mut block, h, [channels, expansion, c_out, stride])?;
            (channels, index) = (c_out, index + 1);
        }
    }
    let h = features.conv1x1(&format!("{index}.0"), h, channels, 1280, false)?;
    let h = features.batch_norm_relu6(&format!("{index}.1"), h, 1280)?;
    let pooled = nn.global_avg_pool(h)?;
    let logits = nn.linear("classifier.1", pooled, 1280, classes, true)?;
    Model::classifier(graph, x, logits)
}

/// One inverted residual block in the scope `features.{i}.conv`: [1×1 expansion, BN, ReLU6,]
/// depthwise 3×3, BN, ReLU6, 1×1 projection, BN, numbered as torchvision numbers them; plus
/// the input when the stride is 1 and the channels are unchanged.
fn inverted_residual(
    nn: &mut Layers<'_, f32>,
    x: NodeId,
    [c_in, expansion, c_out, stride]: [usize; 4],
) -> Result<NodeId> {
    let hidden = c_in * expansion;
    let (mut h, mut i) = (x, 0);
    if expansion != 1 {
        h = nn.conv1x1(&format!("{i}.0"), h, c_in, hidden, false)?;
        (h, i) = (nn.batch_norm_relu6(&format!("{i}.1"), h, hidden)?, i + 1);
    }
    h = nn.depthwise(&format!("{i}.0"), h, [hidden, 1, 3], [stride, 1], false)?;
    h = nn.batch_norm_relu6(&format!("{i}.1"), h, hidden)?;
    h = nn.conv1x1(&(i + 1).to_string(), h, hidden, c_out, false)?;
    h = nn.batch_norm(&(i + 2).to_string(), h, c_out)?;
    match stride == 1 && c_in == c_out {
        true => nn.add(x, h),
        false => Ok(h),
    }
}
