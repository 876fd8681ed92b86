//! A graph describes itself, and its description rebuilds the same tape.

mod common;

use common::random;
use pointwise::describe::{GraphDescription, NodeDescription};
use pointwise::layers::Layers;
use pointwise::{Graph, NodeId};

/// Three networks that are not the bottleneck: a MobileNetV2 inverted residual block, a
/// SqueezeNet fire module with batch norm, and a ShuffleNet-style stage with a flattened
/// linear head; each returns (graph, input, output).
fn networks() -> Vec<(Graph<f64>, NodeId, NodeId)> {
    let mut built = Vec::new();
    {
        let mut graph = Graph::new();
        let mut nn = Layers::new(&mut graph, 1);
        let x = nn.input("x");
        let h = nn.conv1x1("conv.0", x, 4, 12, false).unwrap();
        // One batch norm + ReLU6 fused, one as two nodes: both kinds are described.
        let h = nn.batch_norm_relu6("conv.1", h, 12).unwrap();
        let h = nn
            .depthwise("conv.3", h, [12, 1, 3], [1, 1], false)
            .unwrap();
        let h = nn.batch_norm("conv.4", h, 12).unwrap();
        let h = nn.relu6(h).unwrap();
        let h = nn.conv1x1("conv.6", h, 12, 4, false).unwrap();
        let h = nn.batch_norm("conv.7", h, 4).unwrap();
        let y = nn.add(h, x).unwrap();
        built.push((graph, x, y));
    }
    {
        let mut graph = Graph::new();
        let mut nn = Layers::new(&mut graph, 2);
        let x = nn.input("x");
        let mut fire = nn.scope("fire2");
        let s = fire.conv1x1("squeeze", x, 4, 2, true).unwrap();
        let s = fire.relu(s).unwrap();
        let a = fire.conv1x1_relu_layer("expand1x1", s, 2, 3);
        let b = fire
            .conv2d("expand3x3", s, [2, 3, 3], [1, 1], true)
            .unwrap();
        let b = fire.relu(b).unwrap();
        let y = fire.concat(&[a, b]).unwrap();
        let y = nn.max_pool(y, 2, 2).unwrap();
        let y = nn.batch_norm("bn", y, 6).unwrap();
        // Both pools with their ReLU fused (on 2×2 maps, windows of 1 and 2).
        let y = nn.max_pool_relu(y, 1, 1).unwrap();
        let y = nn.max_pool_relu6(y, 2, 1).unwrap();
        built.push((graph, x, y));
    }
    {
        let mut graph = Graph::new();
        let mut nn = Layers::new(&mut graph, 3);
        let x = nn.input("x");
        let h = nn.grouped_conv1x1("g1", x, [4, 6, 2], false).unwrap();
        let h = nn.relu(h).unwrap();
        let h = nn.channel_shuffle(h, 2).unwrap();
        let h = nn.conv2d("down", h, [6, 6, 3], [2, 1], true).unwrap();
        let h = nn.avg_pool(h, 1, 1).unwrap();
        let h = nn.flatten(h).unwrap();
        let y = nn.linear("head", h, 6 * 3 * 3, 5, true).unwrap();
        built.push((graph, x, y));
    }
    built
}

/// Helper so the fire module reads like PyTorch's: 1×1 conv with bias, then ReLU.
trait Conv1x1Relu {
    fn conv1x1_relu_layer(&mut self, name: &str, x: NodeId, c_in: usize, c_out: usize) -> NodeId;
}

impl Conv1x1Relu for Layers<'_, f64> {
    fn conv1x1_relu_layer(&mut self, name: &str, x: NodeId, c_in: usize, c_out: usize) -> NodeId {
        let h = self.conv1x1(name, x, c_in, c_out, true).unwrap();
        self.relu(h).unwrap()
    }
}

/// Described, written through serde (bincode) and read back, rebuilt with zeroed parameters,
/// loaded by name: the rebuilt graph gives bit-identical outputs.
#[test]
fn a_description_rebuilds_a_graph_that_computes_the_same() {
    for (i, (mut graph, x, y)) in networks().into_iter().enumerate() {
        let description = graph.describe();
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&description, config).unwrap();
        let (read, _): (GraphDescription, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(read, description);
        let mut rebuilt = Graph::<f64>::from_description(&read).unwrap();
        assert_eq!(rebuilt.describe(), description, "network {i}");
        for param in graph.params() {
            let name = graph.name(param).unwrap();
            let value = graph.value(param).unwrap();
            rebuilt
                .set_param(rebuilt.find(name).unwrap(), value)
                .unwrap();
        }
        let input = random(&[2, 4, 6, 6], 10 + i as u64);
        // Ids belong to their graph: the rebuilt graph's nodes at the same positions.
        let at = |g: &Graph<f64>, id: NodeId| g.node_ids().nth(id.index()).unwrap();
        for g in [&mut graph, &mut rebuilt] {
            let (x, y) = (at(g, x), at(g, y));
            g.set_input(x, input.view()).unwrap();
            g.forward(y).unwrap();
        }
        assert_eq!(
            graph.value(y).unwrap(),
            rebuilt.value(at(&rebuilt, y)).unwrap(),
            "network {i}"
        );
    }
}

/// A description read from a file is input: nodes that read later nodes, unknown kinds,
/// missing settings, impossible sizes and huge parameters are typed errors.
#[test]
fn a_hostile_description_is_an_error_not_a_panic() {
    let param = |name: &str, shape: &[usize]| NodeDescription::Param {
        name: name.into(),
        shape: shape.to_vec(),
        trainable: true,
    };
    let op = |kind: &str, inputs: &[usize], attributes: &[(&str, usize)]| NodeDescription::Op {
        kind: kind.into(),
        inputs: inputs.to_vec(),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
    };
    let input = NodeDescription::Input {
        name: "x".into(),
        gradient: false,
    };
    let cases = [
        vec![input.clone(), op("relu", &[1], &[])],
        vec![input.clone(), op("relu", &[5], &[])],
        vec![input.clone(), op("fancy\n\u{1b}[31mop", &[0], &[])],
        vec![input.clone(), op("max_pool", &[0], &[("window", 2)])],
        vec![
            input.clone(),
            op("max_pool", &[0], &[("window", 0), ("stride", 1)]),
        ],
        vec![
            input.clone(),
            param("w", &[3, 4]),
            op("conv1x1", &[0, 0], &[]),
        ],
        vec![input.clone(), param("w", &[1 << 20, 1 << 20])],
        vec![input.clone(), param("w", &[usize::MAX, 2])],
        vec![input.clone(), param("w", &[0, 2])],
        vec![input.clone(), param("w", &[3, 4]), param("w", &[3, 4])],
        vec![
            input.clone(),
            param("w", &[3, 4]),
            op("conv2d", &[0, 1], &[("stride", 0), ("padding", 0)]),
        ],
        vec![input.clone(), op("concat", &[], &[])],
    ];
    for (i, nodes) in cases.into_iter().enumerate() {
        let result = Graph::<f32>::from_description(&GraphDescription { nodes });
        let error = result
            .err()
            .unwrap_or_else(|| panic!("case {i} was accepted"));
        let message = error.to_string();
        assert!(
            !message.contains('\n') && !message.contains('\u{1b}'),
            "case {i}: {message:?}"
        );
    }
}
