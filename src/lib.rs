//! # pointwise: training 1×1 convolutions, and how it works
//!
//! `pointwise` trains networks built from 1×1 (pointwise) convolutions with a small
//! reverse-mode autodiff tape whose every backward pass is derived by hand, written as GEMMs, and
//! checked against finite differences. This page is a short tutorial; each section points to the
//! file that holds the details.
//!
//! ## 1. A 1×1 convolution is one GEMM per sample
//!
//! A 1×1 convolution maps every pixel's channel vector through the same matrix. On an input x of
//! shape (N, F, H, W) with a weight W of shape (F1, F) and a bias b (F1) it gives y of shape
//! (N, F1, H, W):
//!
//! ```text
//! y[n, o, h, w] = Σ_c W[o, c]·x[n, c, h, w] + b[o]
//! ```
//!
//! Write P = H·W. In a row-major tensor the (F, H, W) block of sample n is already an (F, P)
//! matrix Xₙ, so the whole layer is, per sample, one matrix product with no copy and no im2col:
//!
//! ```text
//! Yₙ = W·Xₙ + b·1ᵀ          (F1×F)·(F×P) → (F1×P)
//! ```
//!
//! It changes the depth of the filter space (F1 < F reduces it, as in the Inception and ResNet
//! bottlenecks; F1 > F expands it) and leaves H and W alone.
//!
//! ## 2. Its backward pass is two GEMMs and a sum
//!
//! Given dY = ∂L/∂Y, differentiate the index form `Yₙ[o,p] = Σ_c W[o,c]·Xₙ[c,p] + b[o]` with
//! respect to each of its inputs. W and b are shared by every sample and every pixel, so their
//! gradients sum over n and p; each sample's input is its own:
//!
//! ```text
//! ∂L/∂W[o,c]  = Σₙ Σₚ dYₙ[o,p]·Xₙ[c,p]   →  dW  = Σₙ dYₙ·Xₙᵀ     (F1×P)·(P×F)  → (F1×F)
//! ∂L/∂Xₙ[c,p] = Σ_o W[o,c]·dYₙ[o,p]      →  dXₙ = Wᵀ·dYₙ         (F×F1)·(F1×P) → (F×P)
//! ∂L/∂b[o]    = Σₙ Σₚ dYₙ[o,p]           →  db  = Σₙ Σₚ dYₙ[:, p]  a sum of rows    → (F1)
//! ```
//!
//! Two GEMMs and a row sum: db needs no product at all.
//!
//! [`ops::conv1x1`] holds this derivation beside the code that runs it: [`gemm::gemm`] called
//! with transposed *views* (Xₙᵀ and Wᵀ are not copied by the op) and β = 1, so that dW
//! accumulates over the samples in place. Every op file has the same layout: forward, backward,
//! derivation with shapes, and plain index loops (`forward_reference`, `backward_reference`)
//! that are the specification the fast path is tested against. How the GEMM itself is made fast
//! (register tiles, AVX-512, prefetching) is in [`gemm`], behind that one function.
//!
//! ## 3. Finite differences in f64 are the judge
//!
//! A derivation can be wrong in a way no type checker sees: a missing transpose that happens to
//! fit square shapes, a factor of N, a sum over the wrong axis. [`gradcheck::check`] compares the
//! tape's gradients with central differences (f(θ+ε) − f(θ−ε)) / 2ε, whose error is O(ε²).
//! It runs in f64 because the difference of two nearly equal numbers loses about
//! |f|·ε_mach/ε of accuracy: with ε = 1e-6 that is ~1e-10·|f| in f64, but ~0.06·|f| in f32
//! (ε_mach ≈ 6e-8), which leaves at most one significant digit. The whole crate is generic over
//! [`Element`] (f32 or f64): the ops' code checked in f64 is the code that trains in f32, except
//! the matrix products, which run on ndarray's GEMM in f64 and, in f32, on the crate's own
//! AVX-512 or AVX2 kernels or the gemm crate's (tested against a triple loop). The tests check
//! every input of every op on shapes with batch 1, odd channel counts, F1 < F and F1 > F,
//! H ≠ W and 1×1 maps, to a relative error of 1e-7.
//!
//! ```
//! use ndarray::{ArrayD, IxDyn};
//! use pointwise::{gradcheck, Graph};
//!
//! let mut graph = Graph::<f64>::new();
//! let x = graph.input_with_grad("x");
//! let weight = graph.param("weight", ArrayD::from_shape_fn(IxDyn(&[3, 5]), |i| 0.1 * i[0] as f64 - 0.07 * i[1] as f64))?;
//! let y = graph.conv1x1(x, weight, None)?;                  // (2, 5, 4, 3) → (2, 3, 4, 3)
//! graph.set_input(x, ArrayD::from_shape_fn(IxDyn(&[2, 5, 4, 3]), |i| (i[1] + 2 * i[3]) as f64 * 0.3 - 1.0).view())?;
//! for report in gradcheck::check(&mut graph, y, &[x, weight], 1e-6, 42)? {
//!     assert!(report.max_rel_error < 1e-7, "{report}");
//! }
//! # Ok::<(), pointwise::Error>(())
//! ```
//!
//! ## 4. 1×1 layers change C, pooling changes H and W
//!
//! The two kinds of layer divide the work. A 1×1 convolution mixes channels at each pixel and
//! never looks at a neighbour; pooling ([`ops::max_pool`], [`ops::avg_pool`],
//! [`ops::global_avg_pool`]) shrinks H and W and never mixes channels. After a 1×1 convolution a
//! ReLU makes the per-pixel map non-linear: a 1×1 conv + ReLU stack is a small MLP applied at
//! every pixel (Network-in-Network). [`Graph::summary`] prints each node's output shape, so you
//! can see which node changes which dimension. The `train_bottleneck` example shows why the
//! order matters: its data hide the class in ±vₖ pixel patterns that a global average cancels,
//! and only a 1×1 conv + ReLU *before* the pooling recovers it.
//!
//! ## 5. A fully-connected layer is a 1×1 convolution
//!
//! A fully-connected layer on C features is a 1×1 convolution on a 1×1 map with C channels
//! (the observation behind fully-convolutional networks): the three products of
//! [`ops::conv1x1`] with P = 1. The test `fully_connected_layer_is_a_1x1_convolution_on_1x1_maps`
//! in `tests/ops.rs` compares the textbook fully-connected loops with the 1×1 convolution,
//! forward and backward. One pixel per sample also shows why [`ops::linear`] does not *run* as
//! conv1x1 does: one GEMM per sample would be a matrix-vector product, far from the machine's
//! peak, so it puts the samples side by side and runs one GEMM per product over the batch
//! (Y = X·Wᵀ, dW = dYᵀ·X, dX = dY·W): 35× faster on a 1024 → 512 head at batch 128.
//!
//! ## 6. What a 1×1 reduction saves
//!
//! "256 channels → 1×1 conv to 64 → 4×4 conv back to 256" costs 256·64 + 64·256·16 = 256·64·17
//! multiply-adds per pixel; "256 → 4×4 conv 256" costs 256·256·16, which is 64/17 ≈ 3.76× more.
//! [`cost`] computes these numbers (and the GEMM shapes) for every node, `tests/cost.rs` checks
//! them, and `cargo run --release --example bottleneck_cost` times both paths, with the
//! [`ops::conv2d`] K×K node, beside the prediction.
//!
//! ## 7. The tape
//!
//! [`Graph`] is built once and re-run every step. Nodes are stored in creation order, so the
//! reverse order is a valid backward order. Gradients accumulate with `+=` (a value used twice
//! gets both contributions); leaf gradients keep accumulating until [`Graph::zero_grad`]
//! zeroes them, or [`Graph::clear_grads`] (PyTorch's `set_to_none`) lets the next pass write
//! them without a pass of zeros first.
//!
//! ```
//! use ndarray::{ArrayD, IxDyn};
//! use pointwise::optim::{Optimizer, OptimizerKind};
//! use pointwise::Graph;
//!
//! let mut graph = Graph::<f32>::new();
//! let x = graph.input("x");
//! let reduce = graph.param("reduce.weight", ArrayD::from_elem(IxDyn(&[2, 4]), 0.1))?;
//! let head = graph.param("head.weight", ArrayD::from_elem(IxDyn(&[3, 2]), 0.1))?;
//! let h = graph.conv1x1(x, reduce, None)?;                  // (N, 4, H, W) → (N, 2, H, W)
//! let h = graph.relu(h)?;
//! let h = graph.global_avg_pool(h)?;                        // (N, 2, H, W) → (N, 2)
//! let logits = graph.linear(h, head, None)?;                // (N, 2) → (N, 3)
//! let loss = graph.softmax_cross_entropy(logits)?;
//!
//! let mut optimizer = Optimizer::new(OptimizerKind::sgd())?;
//! graph.set_input(x, ArrayD::from_elem(IxDyn(&[2, 4, 3, 3]), 1.0).view())?;
//! graph.set_labels(loss, &[0, 2])?;
//! for _ in 0..3 {
//!     graph.clear_grads();
//!     graph.forward(loss)?;
//!     graph.backward(loss)?;
//!     optimizer.step(&mut graph, 0.1)?;
//! }
//! assert!(graph.scalar(loss)?.is_finite());
//! # Ok::<(), pointwise::Error>(())
//! ```
//!
//! ## Using it from your own crate
//!
//! Cargo builds a dependency with *your* profile, so in a debug build of your project this
//! crate's loops run unoptimised. Add to your `Cargo.toml`:
//!
//! ```toml
//! [profile.dev.package.pointwise]
//! opt-level = 3
//! ```
//!
//! `pointwise::ndarray` re-exports the ndarray this crate uses, and [`prelude`] the names most
//! programs need.
//!
//! ## Glossary
//!
//! | math | meaning | code |
//! |---|---|---|
//! | N | batch size | `batch` |
//! | F, F1 | input / output channels | `c_in`, `c_out` |
//! | H, W | spatial height / width | `height`, `width` |
//! | P | pixels per sample, H·W | `pixels` |
//! | W, b | weight (F1×F), bias (F1) | `weight`, `bias` |
//! | dX | gradient of the loss with respect to X | `dx`, `dy`, `dweight`, `dbias` |
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod bounded;
mod buffer;
pub mod checkpoint;
pub mod cost;
pub mod data;
pub mod describe;
pub mod element;
pub mod error;
pub mod export;
pub mod gemm;
pub mod gradcheck;
pub mod graph;
pub mod idx;
pub mod init;
mod input;
mod inspect;
pub mod layers;
pub mod model;
pub mod models;
pub mod ops;
pub mod optim;
pub mod parallel;
pub mod state;
mod summary;
pub mod train;
mod trainable;

/// The README's code blocks, compiled and run as doc tests, so that the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The ndarray this crate is built on, so that dependents need not pin the same version.
pub use ndarray;

/// Tensors allocated as the tape allocates its own: zeros, row-major, the first element on a
/// 64-byte cache line (see `buffer.rs` for why that matters to the GEMM).
pub use buffer::zeros as aligned_zeros;
pub use element::Element;
pub use error::{Error, Result};
pub use graph::{Graph, NodeId};
pub use inspect::ParamMut;
pub use model::{Architecture, Model, Roles};
pub use state::{LoadReport, State, StateLayout};

/// What most programs use: `use pointwise::prelude::*;`.
pub mod prelude {
    pub use crate::data::Dataset;
    pub use crate::gradcheck;
    pub use crate::layers::Layers;
    pub use crate::optim::{Optimizer, OptimizerKind, ParamGroup, Schedule};
    pub use crate::train::{evaluate, TrainConfig, Trainer};
    pub use crate::{Architecture, Element, Error, Graph, Model, NodeId, Result};
    pub use ndarray::{Array, ArrayD, ArrayView, ArrayViewD, Axis, IxDyn};
}
