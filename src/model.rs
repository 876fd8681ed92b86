//! The bottleneck network, built from ops on one [`Graph`], and its baseline.
//!
//! ```text
//! bottleneck:  x (N, C, H, W)
//!   → reduce: 1×1 conv C → R, ReLU           (N, R, H, W)     changes the channel count
//!   → expand: 1×1 conv R → C, ReLU           (N, C, H, W)     (optionally + x, a residual)
//!   → max pool k×k, stride s                 (N, C, H′, W′)   shrinks H and W
//!   → global average pool                    (N, C)
//!   → head: linear C → K                     (N, K)           a 1×1 conv on 1×1 maps
//!   → softmax cross-entropy
//! baseline:    x → global average pool → head → softmax cross-entropy
//! ```

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use ndarray::{Array2, ArrayD, ArrayView4, ArrayViewD, ArrayViewMut4, Axis, Ix2, Ix4};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use ndarray_rand::rand_distr::Normal;
use ndarray_rand::RandomExt;

/// The settings of the bottleneck block.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BottleneckSpec {
    /// Channels after the 1×1 reduction (R).
    pub reduced: usize,
    /// Add the block's input to its output (a residual connection).
    pub residual: bool,
    pub pool_window: usize,
    pub pool_stride: usize,
}

/// What a network looks like: everything needed to rebuild it, and what a weight file stores.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Architecture {
    /// Input channels (C).
    pub channels: usize,
    /// Number of classes (K).
    pub classes: usize,
    /// `None` for the baseline: global average pool → linear.
    pub bottleneck: Option<BottleneckSpec>,
}

/// One layer of an architecture, for display and for the weight-file header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    pub name: String,
    pub kind: String,
    pub c_in: usize,
    pub c_out: usize,
}

impl Architecture {
    /// The bottleneck network: C → R → C, 2×2 max pool, K classes.
    pub fn bottleneck(channels: usize, reduced: usize, classes: usize) -> Self {
        let spec = BottleneckSpec {
            reduced,
            residual: false,
            pool_window: 2,
            pool_stride: 2,
        };
        Architecture {
            channels,
            classes,
            bottleneck: Some(spec),
        }
    }

    /// The baseline: global average pool → linear.
    pub fn baseline(channels: usize, classes: usize) -> Self {
        Architecture {
            channels,
            classes,
            bottleneck: None,
        }
    }

    /// Checks that every size is usable.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::invalid_config("architecture", reason));
        if self.channels == 0 || self.classes == 0 {
            return fail(format!(
                "channels ({}) and classes ({}) must be non-zero",
                self.channels, self.classes
            ));
        }
        if let Some(spec) = &self.bottleneck {
            if spec.reduced == 0 || spec.pool_window == 0 || spec.pool_stride == 0 {
                return fail(format!("bottleneck sizes must be non-zero: {spec:?}"));
            }
        }
        // Bound the parameter count so that a hostile weight file cannot ask for huge buffers.
        let largest = self
            .channels
            .max(self.classes)
            .max(self.bottleneck.as_ref().map_or(0, |s| s.reduced));
        if largest > 1 << 16 {
            return fail(format!(
                "a layer width of {largest} exceeds the supported 65536"
            ));
        }
        Ok(())
    }

    /// The layers in order, with their channel counts.
    pub fn layers(&self) -> Vec<Layer> {
        let layer = |name: &str, kind: &str, c_in, c_out| Layer {
            name: name.to_string(),
            kind: kind.to_string(),
            c_in,
            c_out,
        };
        let (c, k) = (self.channels, self.classes);
        let mut layers = Vec::new();
        if let Some(spec) = &self.bottleneck {
            layers.push(layer("reduce", "conv1x1+relu", c, spec.reduced));
            layers.push(layer("expand", "conv1x1+relu", spec.reduced, c));
            if spec.residual {
                layers.push(layer("residual", "add", c, c));
            }
            let pool = format!("max_pool(k={},s={})", spec.pool_window, spec.pool_stride);
            layers.push(layer("pool", &pool, c, c));
        }
        layers.push(layer("gap", "global_avg_pool", c, c));
        layers.push(layer("head", "linear", c, k));
        layers
    }

    /// The trained tensors: stable names and shapes, in creation order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        if let Some(spec) = &self.bottleneck {
            shapes.push((
                "reduce.weight".to_string(),
                vec![spec.reduced, self.channels],
            ));
            shapes.push(("reduce.bias".to_string(), vec![spec.reduced]));
            shapes.push((
                "expand.weight".to_string(),
                vec![self.channels, spec.reduced],
            ));
            shapes.push(("expand.bias".to_string(), vec![self.channels]));
        }
        shapes.push(("head.weight".to_string(), vec![self.classes, self.channels]));
        shapes.push(("head.bias".to_string(), vec![self.classes]));
        shapes
    }
}

/// Samples per chunk of the backward pass (see [`Graph::set_backward_chunk`]): the
/// activation gradients then take 4/N of their whole-batch memory, and 4 samples still split
/// evenly between 2 threads.
pub const BACKWARD_CHUNK: usize = 4;

/// The backward pass runs in chunks only when the batch's intermediate gradients would take
/// more than this many bytes. Smaller ones fit in cache, and each chunk's fixed cost (a pass
/// over the tape, the threads' hand-offs) would dominate, as on `train_bottleneck`'s 32×8×8
/// images (about 0.4 MB of gradients per batch).
pub const CHUNK_ABOVE_BYTES: usize = 8 << 20;

/// A network ready to train: its architecture, its graph and the nodes a caller needs.
#[derive(Clone, Debug)]
pub struct Model {
    architecture: Architecture,
    graph: Graph<f32>,
    input: NodeId,
    logits: NodeId,
    loss: NodeId,
}

/// He (Kaiming) normal initialisation: N(0, gain/fan_in). gain = 2 keeps the activation
/// variance constant through a ReLU layer; gain = 1 (LeCun) suits the linear head.
fn he_normal(shape: &[usize], gain: f64, rng: &mut StdRng) -> Result<ArrayD<f32>> {
    let fan_in = shape.get(1).copied().unwrap_or(1).max(1);
    let normal = Normal::new(0.0f32, (gain / fan_in as f64).sqrt() as f32)
        .map_err(|e| Error::invalid_config("init", e.to_string()))?;
    Ok(ArrayD::random_using(shape.to_vec(), normal, rng))
}

impl Model {
    /// Builds the network with He-initialised weights (zero biases) from `seed`.
    pub fn new(architecture: Architecture, seed: u64) -> Result<Self> {
        architecture.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut graph = Graph::new();
        let mut params = Vec::new();
        for (name, shape) in architecture.tensor_shapes() {
            let value = if name.ends_with(".bias") {
                ArrayD::zeros(shape)
            } else {
                let gain = if name.starts_with("head") { 1.0 } else { 2.0 };
                he_normal(&shape, gain, &mut rng)?
            };
            params.push(graph.param(&name, value)?);
        }
        let input = graph.input("input");
        let mut x = input;
        let mut next = params.into_iter();
        let mut take = || next.next().ok_or_else(|| Error::graph("missing parameter"));
        if let Some(spec) = &architecture.bottleneck {
            let (reduce_w, reduce_b, expand_w, expand_b) = (take()?, take()?, take()?, take()?);
            // Each ReLU is fused into the convolution before it (one buffer, one pass); with
            // a residual, the second ReLU comes after the Add instead.
            let hidden = graph.conv1x1_relu(x, reduce_w, Some(reduce_b))?;
            let features = if spec.residual {
                let expanded = graph.conv1x1(hidden, expand_w, Some(expand_b))?;
                let sum = graph.add(expanded, input)?;
                graph.relu(sum)?
            } else {
                graph.conv1x1_relu(hidden, expand_w, Some(expand_b))?
            };
            x = graph.max_pool(features, spec.pool_window, spec.pool_stride)?;
        }
        let pooled = graph.global_avg_pool(x)?;
        let (head_w, head_b) = (take()?, take()?);
        let logits = graph.linear(pooled, head_w, Some(head_b))?;
        let loss = graph.softmax_cross_entropy(logits)?;
        Ok(Model {
            architecture,
            graph,
            input,
            logits,
            loss,
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// The underlying tape (for inspection, gradient checks and optimizers).
    pub fn graph(&self) -> &Graph<f32> {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut Graph<f32> {
        &mut self.graph
    }

    /// Forward and backward on one batch: returns the mean loss. Leaf gradients are zeroed
    /// first. A non-finite input or loss is an error, raised before any gradient is computed.
    pub fn forward_backward(&mut self, images: ArrayView4<f32>, labels: &[usize]) -> Result<f32> {
        self.graph.set_input(self.input, images.into_dyn())?;
        self.step(labels)
    }

    /// The model's own input buffer, sized (N, C, H, W), to write a batch into without a copy
    /// (then call [`Model::forward_backward_in_place`]). The training loop gathers its batches
    /// here, so that the batch exists once in memory.
    pub fn input_mut(&mut self, shape: [usize; 4]) -> Result<ArrayViewMut4<'_, f32>> {
        self.graph
            .input_mut(self.input, &shape)?
            .into_dimensionality::<Ix4>()
            .map_err(|_| Error::graph("the input buffer is not (N, C, H, W)"))
    }

    /// [`Model::forward_backward`] on the batch already written through [`Model::input_mut`];
    /// a non-finite value in it is an error, raised before any gradient is computed.
    pub fn forward_backward_in_place(&mut self, labels: &[usize]) -> Result<f32> {
        self.graph.check_input_finite(self.input)?;
        self.step(labels)
    }

    fn step(&mut self, labels: &[usize]) -> Result<f32> {
        self.graph.set_labels(self.loss, labels)?;
        self.graph.zero_grad();
        self.graph.forward(self.loss)?;
        let loss = self.graph.scalar(self.loss)?;
        if !loss.is_finite() {
            return Err(Error::non_finite(format!("loss is {loss}")));
        }
        let large = self.graph.intermediate_gradient_bytes(self.loss)? > CHUNK_ABOVE_BYTES;
        self.graph
            .set_backward_chunk(large.then_some(BACKWARD_CHUNK))?;
        self.graph.backward(self.loss)?;
        Ok(loss)
    }

    /// The logits (N, K) of the last forward pass.
    pub fn last_logits(&self) -> Result<ndarray::ArrayView2<'_, f32>> {
        self.graph
            .value(self.logits)?
            .into_dimensionality::<Ix2>()
            .map_err(|_| Error::graph("logits are not (N, K)"))
    }

    /// Runs the network up to the logits and returns them (N, K).
    pub fn logits(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        self.graph.set_input(self.input, images.into_dyn())?;
        self.graph.forward(self.logits)?;
        Ok(self.last_logits()?.to_owned())
    }

    /// The predicted class of every image: the arg-max of its logits (first one on a tie).
    pub fn predict(&mut self, images: ArrayView4<f32>) -> Result<Vec<usize>> {
        self.graph.set_input(self.input, images.into_dyn())?;
        self.graph.forward(self.logits)?;
        Ok(argmax_rows(self.last_logits()?))
    }

    /// The trained tensors with their stable names, in creation order.
    pub fn tensors(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        self.graph
            .params()
            .into_iter()
            .filter_map(|id| {
                Some((
                    self.graph.name(id).ok()?.to_string(),
                    self.graph.value(id).ok()?,
                ))
            })
            .collect()
    }

    /// One named tensor.
    pub fn tensor(&self, name: &str) -> Option<ArrayViewD<'_, f32>> {
        self.graph
            .find(name)
            .and_then(|id| self.graph.value(id).ok())
    }

    /// Replaces every trained tensor. All names and shapes are checked before anything is
    /// written, so on error the model is unchanged.
    pub fn set_tensors(&mut self, tensors: &[(String, ArrayD<f32>)]) -> Result<()> {
        let expected = self.architecture.tensor_shapes();
        if tensors.len() != expected.len() {
            return Err(Error::shape_mismatch(
                "set_tensors",
                "number of tensors",
                expected.len().to_string(),
                tensors.len().to_string(),
            ));
        }
        for ((name, value), (expected_name, shape)) in tensors.iter().zip(&expected) {
            if name != expected_name || value.shape() != shape.as_slice() {
                return Err(Error::shape_mismatch(
                    "set_tensors",
                    format!("tensor {expected_name}"),
                    format!("{expected_name} {shape:?}"),
                    format!("{name} {:?}", value.shape()),
                ));
            }
        }
        for (name, value) in tensors {
            let id = self
                .graph
                .find(name)
                .ok_or_else(|| Error::graph(format!("no tensor {name}")))?;
            self.graph.set_param(id, value.view())?;
        }
        Ok(())
    }
}

/// Index of the largest entry of each row (the first one on a tie).
pub fn argmax_rows(logits: ndarray::ArrayView2<f32>) -> Vec<usize> {
    logits
        .axis_iter(Axis(0))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (k, &v)| {
                    if v > best.1 {
                        (k, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}
