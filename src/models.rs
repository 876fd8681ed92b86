//! Ready-made networks, each a few lines of [`Layers`]: the two MNIST networks of
//! `examples/train_mnist.rs`, named as the `nn.Sequential` of the PyTorch recipe names them
//! (`"0.weight"`, `"1.running_mean"`, …), so that their weights move between the two.
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
