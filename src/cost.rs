//! The cost model: parameters, multiply-adds and GEMM shapes of every node, from its shapes.
//!
//! Multiply-adds (MACs) count the GEMM work, the part that grows with channels × channels; the
//! elementwise ops (ReLU, pooling, adds, losses) cost O(elements) and are listed with 0 MACs.
//! A FLOP count is 2 × MACs.
//!
//! The Inception/ResNet-style bottleneck, per output pixel: "256 → 1×1 conv 64 → 4×4 conv 256" costs
//! 256·64 + 64·256·16 = 256·64·17 MACs, "256 → 4×4 conv 256" costs 256·256·16: 64/17 ≈ 3.76×
//! more. `tests/cost.rs` checks these numbers on the cost model itself.

/// What one node costs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Cost {
    /// Trained numbers owned by the node's parameters (weights and bias).
    pub params: usize,
    /// Multiply-adds of the forward pass.
    pub forward_macs: u64,
    /// Multiply-adds of the backward pass (dW, plus dX when the input needs a gradient).
    pub backward_macs: u64,
    /// The GEMMs the node runs, e.g. `fwd 8×(64×256)·(256×784)`.
    pub gemms: Vec<String>,
}

/// The product, saturating: a cost is a count to print, and a huge one must not wrap.
fn product(dims: &[usize]) -> u64 {
    dims.iter().fold(1u64, |p, &d| p.saturating_mul(d as u64))
}

/// A convolution seen as GEMMs: per sample (F1×F·K²)·(F·K²×P′), with P′ output pixels.
pub(crate) fn convolution(
    batch: usize,
    c_in_k2: usize,
    c_out: usize,
    pixels: usize,
    bias: bool,
    input_grad: bool,
) -> Cost {
    let macs = product(&[batch, c_out, c_in_k2, pixels]);
    let mut gemms = vec![
        format!("fwd {batch}×({c_out}×{c_in_k2})·({c_in_k2}×{pixels})"),
        format!("dW {batch}×({c_out}×{pixels})·({pixels}×{c_in_k2})"),
    ];
    if input_grad {
        gemms.push(format!("dX {batch}×({c_in_k2}×{c_out})·({c_out}×{pixels})"));
    }
    Cost {
        params: c_out
            .saturating_mul(c_in_k2)
            .saturating_add(if bias { c_out } else { 0 }),
        forward_macs: macs,
        backward_macs: if input_grad {
            macs.saturating_mul(2)
        } else {
            macs
        },
        gemms,
    }
}

/// conv1x1: x (N, F, H, W) → (N, F1, H, W), P = H·W.
pub(crate) fn conv1x1(x: &[usize], c_out: usize, bias: bool, input_grad: bool) -> Cost {
    convolution(x[0], x[1], c_out, x[2] * x[3], bias, input_grad)
}

/// linear: x (N, F) → (N, F1), a conv1x1 with P = 1, run as one GEMM per product over the
/// batch.
pub(crate) fn linear(x: &[usize], c_out: usize, bias: bool, input_grad: bool) -> Cost {
    let (batch, c_in) = (x[0], x[1]);
    let mut cost = convolution(batch, c_in, c_out, 1, bias, input_grad);
    cost.gemms = vec![
        format!("fwd ({batch}×{c_in})·({c_in}×{c_out})"),
        format!("dW ({c_out}×{batch})·({batch}×{c_in})"),
    ];
    if input_grad {
        cost.gemms
            .push(format!("dX ({batch}×{c_out})·({c_out}×{c_in})"));
    }
    cost
}

/// conv2d: x (N, F, H, W), weight (F1, F, K, K) → y (N, F1, H′, W′).
pub(crate) fn conv2d(
    x: &[usize],
    weight: &[usize],
    y: &[usize],
    bias: bool,
    input_grad: bool,
) -> Cost {
    convolution(
        x[0],
        weight[1] * weight[2] * weight[3],
        weight[0],
        y[2] * y[3],
        bias,
        input_grad,
    )
}
