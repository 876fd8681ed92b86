//! A model: any graph with the nodes a trainer needs (input, output, loss); and the bottleneck
//! network with its baseline, built with [`Layers`] as a user would build their own.
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

use crate::element::Element;
use crate::error::{printable, Error, Result};
use crate::graph::{Graph, NodeId};
use crate::init::WeightInit;
use crate::layers::Layers;
use ndarray::{Array2, ArrayView4, ArrayViewD, ArrayViewMut4, Axis, Ix2, Ix4};

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
        // Bound the parameter count so that a hostile weight file (or a typo) cannot ask for
        // huge buffers: every tensor and their sum within 2^30 elements.
        let total = self
            .tensor_shapes()
            .iter()
            .try_fold(0usize, |total, (_, shape)| {
                let elements = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?;
                total.checked_add(elements)
            });
        if total.is_none_or(|t| t > 1 << 30) {
            return fail("the parameters would exceed 2^30 elements".to_string());
        }
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

    /// The layers in order, with their channel counts: what each computes, as format-1
    /// checkpoints store the list (the graph [`Model::new`] builds moves the second ReLU after
    /// the pool, the same function).
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

/// The nodes of a model's graph that a trainer feeds and reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Roles {
    /// The input node the images go to.
    pub input: NodeId,
    /// The logits of a classifier, the prediction of a regressor.
    pub output: NodeId,
    /// The scalar loss: `softmax_cross_entropy(output)`, or `mse(output, target)`.
    pub loss: NodeId,
    /// The input node the regression targets go to; `None` for a classifier (labels).
    pub target: Option<NodeId>,
}

/// A network ready to train and to save: a graph and its [`Roles`].
#[derive(Clone, Debug)]
pub struct Model<T = f32> {
    graph: Graph<T>,
    roles: Roles,
}

impl Model<f32> {
    /// The bottleneck network of `architecture` (or its baseline), built with [`Layers`]:
    /// He-normal weights before each ReLU, LeCun-normal for the head, zero biases, drawn from
    /// `seed`.
    pub fn new(architecture: Architecture, seed: u64) -> Result<Self> {
        architecture.validate()?;
        let (c, k) = (architecture.channels, architecture.classes);
        let mut graph = Graph::new();
        let mut nn = Layers::new(&mut graph, seed);
        nn.set_init(WeightInit::KaimingNormal);
        let input = nn.input("input");
        let mut x = input;
        if let Some(spec) = &architecture.bottleneck {
            // Each ReLU is fused into the node before it (one buffer, one pass). The second
            // one follows the pool, which it commutes with (relu(max) = max(relu)): there it
            // touches a quarter of the values, in the backward pass too. With a residual, the
            // Add comes before it.
            let hidden = nn.conv1x1_relu("reduce", x, c, spec.reduced, true)?;
            let mut features = nn.conv1x1("expand", hidden, spec.reduced, c, true)?;
            if spec.residual {
                features = nn.add(features, input)?;
            }
            x = nn.max_pool_relu(features, spec.pool_window, spec.pool_stride)?;
        }
        nn.set_init(WeightInit::LeCunNormal);
        let pooled = nn.global_avg_pool(x)?;
        let logits = nn.linear("head", pooled, c, k, true)?;
        Model::classifier(graph, input, logits)
    }
}

impl<T: Element> Model<T> {
    /// A classifier: adds `softmax_cross_entropy(logits)` to `graph`; trained on labels.
    pub fn classifier(mut graph: Graph<T>, input: NodeId, logits: NodeId) -> Result<Self> {
        let loss = graph.softmax_cross_entropy(logits)?;
        let roles = Roles {
            input,
            output: logits,
            loss,
            target: None,
        };
        Model::from_roles(graph, roles)
    }

    /// A regressor: adds an input `"target"` and `mse(prediction, target)` to `graph`; trained
    /// on target tensors of the prediction's shape.
    pub fn regressor(mut graph: Graph<T>, input: NodeId, prediction: NodeId) -> Result<Self> {
        let target = graph.input("target");
        let loss = graph.mse(prediction, target)?;
        let roles = Roles {
            input,
            output: prediction,
            loss,
            target: Some(target),
        };
        Model::from_roles(graph, roles)
    }

    /// A model from a graph that already holds its loss (a rebuilt weight file). Checks that
    /// the roles fit the graph, and that every trainable parameter reaches the loss.
    pub fn from_roles(graph: Graph<T>, roles: Roles) -> Result<Self> {
        // Ids read from a file name positions: bind them to this graph.
        let roles = Roles {
            input: graph.bind(roles.input)?,
            output: graph.bind(roles.output)?,
            loss: graph.bind(roles.loss)?,
            target: roles.target.map(|t| graph.bind(t)).transpose()?,
        };
        let wrong = |reason: String| Err(Error::invalid_config("model", reason));
        let kind = |id: NodeId| graph.kind(id);
        if kind(roles.input)? != "input" {
            return wrong(format!("node {} is not an input node", roles.input.index()));
        }
        let reads = graph.inputs(roles.loss)?;
        match (kind(roles.loss)?, roles.target) {
            ("softmax_cross_entropy", None) if reads == [roles.output] => {}
            ("mse", Some(target)) if reads == [roles.output, target] => {
                if kind(target)? != "input" {
                    return wrong(format!(
                        "the target node {} is not an input",
                        target.index()
                    ));
                }
            }
            (found, _) => {
                return wrong(format!(
                    "node {} ({found}) is not softmax_cross_entropy of the output, nor mse of \
                     the output and an input target",
                    roles.loss.index()
                ))
            }
        }
        let reached = ancestors(&graph, roles.loss)?;
        for param in graph.params() {
            if graph.is_trainable(param)? && !reached[param.index()] {
                return wrong(format!(
                    "parameter {} does not reach the loss, so it would never train: freeze it \
                     (Graph::set_trainable) or connect it",
                    printable(graph.name(param)?)
                ));
            }
        }
        Ok(Model { graph, roles })
    }

    /// The graph's nodes a trainer feeds and reads.
    pub fn roles(&self) -> Roles {
        self.roles
    }

    /// The underlying tape (for inspection, gradient checks and optimizers).
    pub fn graph(&self) -> &Graph<T> {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut Graph<T> {
        &mut self.graph
    }

    /// Forward and backward on one batch of a classifier: returns the mean loss. Leaf gradients
    /// are zeroed first. A non-finite input or loss is an error, raised before any gradient is
    /// computed.
    pub fn forward_backward(&mut self, images: ArrayView4<T>, labels: &[usize]) -> Result<T> {
        self.graph.set_input(self.roles.input, images.into_dyn())?;
        self.graph.set_labels(self.roles.loss, labels)?;
        self.step()
    }

    /// The model's own input buffer, sized (N, C, H, W), to write a batch into without a copy
    /// (then call [`Model::forward_backward_in_place`]). The training loop gathers its batches
    /// here, so that the batch exists once in memory.
    pub fn input_mut(&mut self, shape: [usize; 4]) -> Result<ArrayViewMut4<'_, T>> {
        self.graph
            .input_mut(self.roles.input, &shape)?
            .into_dimensionality::<Ix4>()
            .map_err(|_| Error::graph("the input buffer is not (N, C, H, W)"))
    }

    /// A regressor's target buffer, of `shape`, to write the batch's targets into.
    pub fn target_mut(&mut self, shape: &[usize]) -> Result<ndarray::ArrayViewMutD<'_, T>> {
        let target = self
            .roles
            .target
            .ok_or_else(|| Error::invalid_config("model", "a classifier takes labels"))?;
        self.graph.input_mut(target, shape)
    }

    /// [`Model::forward_backward`] on the batch already written through [`Model::input_mut`]
    /// (and [`Model::target_mut`] for a regressor; `labels` are then ignored); a non-finite
    /// value in it is an error, raised before any gradient is computed.
    pub fn forward_backward_in_place(&mut self, labels: &[usize]) -> Result<T> {
        self.graph.check_input_finite(self.roles.input)?;
        match self.roles.target {
            Some(target) => self.graph.check_input_finite(target)?,
            None => self.graph.set_labels(self.roles.loss, labels)?,
        }
        self.step()
    }

    fn step(&mut self) -> Result<T> {
        // Forward and backward handed to the thread pool once (see parallel::on_the_pool).
        crate::parallel::on_the_pool(|| self.forward_and_backward())
    }

    fn forward_and_backward(&mut self) -> Result<T> {
        let loss_node = self.roles.loss;
        self.graph.clear_grads();
        self.graph.forward(loss_node)?;
        let loss = self.graph.scalar(loss_node)?;
        if !loss.is_finite() {
            return Err(Error::non_finite(format!("loss is {}", loss.as_f64())));
        }
        let large = self.graph.intermediate_gradient_bytes(loss_node)? > CHUNK_ABOVE_BYTES;
        self.graph
            .set_backward_chunk(large.then_some(BACKWARD_CHUNK))?;
        self.graph.backward(loss_node)?;
        Ok(loss)
    }

    /// The output (logits of a classifier) of the last forward pass.
    pub fn last_output(&self) -> Result<ArrayViewD<'_, T>> {
        self.graph.value(self.roles.output)
    }

    /// The logits (N, K) of the last forward pass.
    pub fn last_logits(&self) -> Result<ndarray::ArrayView2<'_, T>> {
        self.last_output()?
            .into_dimensionality::<Ix2>()
            .map_err(|_| Error::graph("logits are not (N, K)"))
    }

    /// Runs the network up to its output on `images`. Non-finite images are an error.
    pub fn output(&mut self, images: ArrayView4<T>) -> Result<ArrayViewD<'_, T>> {
        self.graph.set_input(self.roles.input, images.into_dyn())?;
        self.graph.forward(self.roles.output)?;
        self.last_output()
    }

    /// Runs the network up to the logits and returns them (N, K).
    pub fn logits(&mut self, images: ArrayView4<T>) -> Result<Array2<T>> {
        self.output(images)?;
        Ok(self.last_logits()?.to_owned())
    }

    /// The predicted class of every image: the arg-max of its logits (first one on a tie).
    pub fn predict(&mut self, images: ArrayView4<T>) -> Result<Vec<usize>> {
        self.output(images)?;
        Ok(argmax_rows(self.last_logits()?))
    }

    /// The parameters with their names, in creation order.
    pub fn tensors(&self) -> Vec<(String, ArrayViewD<'_, T>)> {
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

    /// One named parameter.
    pub fn tensor(&self, name: &str) -> Option<ArrayViewD<'_, T>> {
        self.graph
            .find(name)
            .and_then(|id| self.graph.value(id).ok())
    }
}

/// Which nodes `target` reads, directly or not (itself included), by position.
fn ancestors<T: Element>(graph: &Graph<T>, target: NodeId) -> Result<Vec<bool>> {
    let mut reached = vec![false; graph.len()];
    reached[target.index()] = true;
    for index in (0..=target.index()).rev() {
        if reached[index] {
            for input in graph.inputs(graph.id(index))? {
                reached[input.index()] = true;
            }
        }
    }
    Ok(reached)
}

/// Index of the largest entry of each row (the first one on a tie).
pub fn argmax_rows<T: Element>(logits: ndarray::ArrayView2<T>) -> Vec<usize> {
    logits
        .axis_iter(Axis(0))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, T::neg_infinity()), |best, (k, &v)| {
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
