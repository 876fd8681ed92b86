//! Layers that create their own parameters, named as PyTorch names them.
//!
//! A [`Layers`] builder wraps a [`Graph`] with a name scope and a seeded generator. Each layer
//! method takes the layer's name and sizes, as `nn.Conv2d(c_in, c_out, 1)` does, creates its
//! parameters (`"block1.reduce.weight"`, `"block1.reduce.bias"`: the keys of PyTorch's
//! `state_dict` for the same module tree), initialises them as PyTorch does by default, and
//! adds the op. The builder dereferences to the graph, so the ops without parameters are
//! called on it directly, and the tape stays in view:
//!
//! ```
//! use pointwise::prelude::*;
//! use pointwise::layers::Layers;
//!
//! let mut graph = Graph::<f32>::new();
//! let mut nn = Layers::new(&mut graph, 0);
//! let x = nn.input("x");
//! let mut block = nn.scope("block1");
//! let h = block.conv1x1("reduce", x, 16, 4, true)?;        // block1.reduce.{weight,bias}
//! let h = block.relu(h)?;
//! let h = block.conv1x1("expand", h, 4, 16, true)?;
//! let h = nn.global_avg_pool(h)?;
//! let logits = nn.linear("head", h, 16, 10, true)?;         // head.{weight,bias}
//! assert!(graph.find("block1.expand.bias").is_some());
//! # Ok::<(), pointwise::Error>(())
//! ```
//!
//! Weight layouts are the crate's: a 1×1 convolution's weight is (C_out, C_in), where PyTorch
//! stores (C_out, C_in, 1, 1); the export to safetensors adds the unit axes.

use crate::element::Element;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::init::{self, WeightInit};
use ndarray::ArrayD;
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use std::ops::{Deref, DerefMut};

/// The generator and the scope a layer's parameters are created in.
pub struct Layers<'g, T> {
    graph: &'g mut Graph<T>,
    rng: RngRef<'g>,
    prefix: String,
    init: WeightInit,
}

/// The builder's generator: its own, or its parent's (a scope draws from the same stream).
enum RngRef<'g> {
    Owned(Box<StdRng>),
    Borrowed(&'g mut StdRng),
}

impl RngRef<'_> {
    fn get(&mut self) -> &mut StdRng {
        match self {
            RngRef::Owned(rng) => rng,
            RngRef::Borrowed(rng) => rng,
        }
    }
}

impl<'g, T: Element> Layers<'g, T> {
    /// A builder on `graph` whose initial values are drawn from a generator seeded with `seed`.
    pub fn new(graph: &'g mut Graph<T>, seed: u64) -> Self {
        let rng = RngRef::Owned(Box::new(StdRng::seed_from_u64(seed)));
        Layers {
            graph,
            rng,
            prefix: String::new(),
            init: WeightInit::PyTorch,
        }
    }

    /// Initialises the weights and biases of the layers created from now on with `init`
    /// (PyTorch's defaults until then), in this scope and the scopes opened from it.
    pub fn set_init(&mut self, init: WeightInit) {
        self.init = init;
    }

    /// A builder whose layers are named `name.…` inside this one's scope (PyTorch's submodule).
    pub fn scope(&mut self, name: &str) -> Layers<'_, T> {
        Layers {
            prefix: self.name(name),
            graph: &mut *self.graph,
            rng: RngRef::Borrowed(self.rng.get()),
            init: self.init,
        }
    }

    /// The full name of `name` in this scope (`"block1.reduce"`).
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A parameter `name` (in this scope) with the given initial value.
    pub fn param(&mut self, name: &str, value: ArrayD<T>) -> Result<NodeId> {
        let name = self.name(name);
        self.graph.param(&name, value)
    }

    /// A layer's weight of `shape` and its bias if wanted, initialised as [`Layers::set_init`]
    /// says.
    fn weight_and_bias(
        &mut self,
        layer: &str,
        shape: &[usize],
        bias: bool,
    ) -> Result<(NodeId, Option<NodeId>)> {
        let (weight, bias) = self.init.weight_and_bias(shape, bias, self.rng.get())?;
        let weight = self.param(&format!("{layer}.weight"), weight)?;
        let bias = bias
            .map(|b| self.param(&format!("{layer}.bias"), b))
            .transpose()?;
        Ok((weight, bias))
    }

    /// `nn.Conv2d(c_in, c_out, 1, bias=bias)`: weight (c_out, c_in).
    pub fn conv1x1(
        &mut self,
        name: &str,
        x: NodeId,
        c_in: usize,
        c_out: usize,
        bias: bool,
    ) -> Result<NodeId> {
        let (weight, bias) = self.weight_and_bias(name, &[c_out, c_in], bias)?;
        self.graph.conv1x1(x, weight, bias)
    }

    /// [`Layers::conv1x1`] then a ReLU, as one fused node ([`Graph::conv1x1_relu`]).
    pub fn conv1x1_relu(
        &mut self,
        name: &str,
        x: NodeId,
        c_in: usize,
        c_out: usize,
        bias: bool,
    ) -> Result<NodeId> {
        let (weight, bias) = self.weight_and_bias(name, &[c_out, c_in], bias)?;
        self.graph.conv1x1_relu(x, weight, bias)
    }

    /// `nn.Conv2d(c_in, c_out, 1, groups=groups, bias=bias)`: weight (c_out, c_in/groups).
    pub fn grouped_conv1x1(
        &mut self,
        name: &str,
        x: NodeId,
        [c_in, c_out, groups]: [usize; 3],
        bias: bool,
    ) -> Result<NodeId> {
        let shape = [c_out, c_in / groups.max(1)];
        let (weight, bias) = self.weight_and_bias(name, &shape, bias)?;
        self.graph.grouped_conv1x1(x, weight, bias, groups)
    }

    /// `nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)`: weight (c_out, c_in, K, K).
    pub fn conv2d(
        &mut self,
        name: &str,
        x: NodeId,
        [c_in, c_out, kernel]: [usize; 3],
        [stride, padding]: [usize; 2],
        bias: bool,
    ) -> Result<NodeId> {
        let (weight, bias) = self.weight_and_bias(name, &[c_out, c_in, kernel, kernel], bias)?;
        self.graph.conv2d(x, weight, bias, stride, padding)
    }

    /// `nn.Conv2d(c, c·m, kernel, stride, padding, groups=c, bias=bias)`: weight (c·m, 1, K, K).
    pub fn depthwise(
        &mut self,
        name: &str,
        x: NodeId,
        [channels, multiplier, kernel]: [usize; 3],
        [stride, padding]: [usize; 2],
        bias: bool,
    ) -> Result<NodeId> {
        let shape = [channels * multiplier, 1, kernel, kernel];
        let (weight, bias) = self.weight_and_bias(name, &shape, bias)?;
        self.graph.depthwise(x, weight, bias, stride, padding)
    }

    /// `nn.Linear(features, outputs, bias=bias)`: weight (outputs, features).
    pub fn linear(
        &mut self,
        name: &str,
        x: NodeId,
        features: usize,
        outputs: usize,
        bias: bool,
    ) -> Result<NodeId> {
        let (weight, bias) = self.weight_and_bias(name, &[outputs, features], bias)?;
        self.graph.linear(x, weight, bias)
    }

    /// `nn.BatchNorm2d(channels)`: weight 1, bias 0, running mean 0 and variance 1.
    pub fn batch_norm(&mut self, name: &str, x: NodeId, channels: usize) -> Result<NodeId> {
        let [weight, bias] = self.scale_and_shift(name, channels)?;
        self.graph.batch_norm(x, weight, bias)
    }

    /// [`Layers::batch_norm`] then a ReLU, as one fused node ([`Graph::batch_norm_relu`]).
    pub fn batch_norm_relu(&mut self, name: &str, x: NodeId, channels: usize) -> Result<NodeId> {
        let [weight, bias] = self.scale_and_shift(name, channels)?;
        self.graph.batch_norm_relu(x, weight, bias)
    }

    /// [`Layers::batch_norm`] then a ReLU6, as one fused node ([`Graph::batch_norm_relu6`]).
    pub fn batch_norm_relu6(&mut self, name: &str, x: NodeId, channels: usize) -> Result<NodeId> {
        let [weight, bias] = self.scale_and_shift(name, channels)?;
        self.graph.batch_norm_relu6(x, weight, bias)
    }

    /// A batch norm's γ (ones) and β (zeros).
    fn scale_and_shift(&mut self, name: &str, channels: usize) -> Result<[NodeId; 2]> {
        let weight = self.param(&format!("{name}.weight"), init::ones(&[channels]))?;
        let bias = self.param(&format!("{name}.bias"), init::zeros(&[channels]))?;
        Ok([weight, bias])
    }
}

impl<T> Deref for Layers<'_, T> {
    type Target = Graph<T>;
    fn deref(&self) -> &Graph<T> {
        self.graph
    }
}

impl<T> DerefMut for Layers<'_, T> {
    fn deref_mut(&mut self) -> &mut Graph<T> {
        self.graph
    }
}
