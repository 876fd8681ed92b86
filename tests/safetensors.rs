//! Weights in PyTorch's layout for any graph: export, import, and a file written by PyTorch.

use pointwise::export::{graph_from_safetensors, graph_to_safetensors};
use pointwise::layers::Layers;
use pointwise::{Graph, NodeId};
use safetensors::SafeTensors;

/// The graph of the module below, built with the same names; returns (graph, input, output).
fn net() -> (Graph<f32>, NodeId, NodeId) {
    let mut graph = Graph::new();
    let mut nn = Layers::new(&mut graph, 1);
    let x = nn.input("x");
    let h = nn.conv2d("stem", x, [3, 8, 3], [2, 1], false).unwrap();
    let h = nn.batch_norm("bn", h, 8).unwrap();
    let h = nn.relu(h).unwrap();
    let mut block = nn.scope("block");
    let b = block.conv1x1("reduce", h, 8, 4, true).unwrap();
    let b = block.relu(b).unwrap();
    let b = block.depthwise("dw", b, [4, 1, 3], [1, 1], false).unwrap();
    let b = block.relu(b).unwrap();
    let b = block.grouped_conv1x1("expand", b, [4, 8, 2], true).unwrap();
    let h = nn.add(b, h).unwrap();
    let h = nn.relu(h).unwrap();
    let h = nn.flatten(h).unwrap();
    let y = nn.linear("head", h, 8 * 3 * 3, 5, true).unwrap();
    (graph, x, y)
}

fn tensor(file: &SafeTensors, name: &str) -> ndarray::ArrayD<f32> {
    let view = file.tensor(name).unwrap();
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
    ndarray::ArrayD::from_shape_vec(view.shape(), values.collect()).unwrap()
}

/// `data/torch_fixture/net.safetensors` and `input_output.safetensors` were written by
/// PyTorch 2.15 (`safetensors.torch.save_file`) with this script, run in that folder:
///
/// ```python
/// import torch, torch.nn as nn
/// from safetensors.torch import save_file
/// torch.manual_seed(0)
/// class Block(nn.Module):
///     def __init__(self):
///         super().__init__()
///         self.reduce = nn.Conv2d(8, 4, 1)
///         self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
///         self.expand = nn.Conv2d(4, 8, 1, groups=2)
///     def forward(self, x):
///         return self.expand(torch.relu(self.dw(torch.relu(self.reduce(x)))))
/// class Net(nn.Module):
///     def __init__(self):
///         super().__init__()
///         self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
///         self.bn = nn.BatchNorm2d(8)
///         self.block = Block()
///         self.head = nn.Linear(8 * 3 * 3, 5)
///     def forward(self, x):
///         x = torch.relu(self.bn(self.stem(x)))
///         x = torch.relu(self.block(x) + x)
///         return self.head(torch.flatten(x, 1))
/// net = Net()
/// for _ in range(3):                      # training-mode passes: running statistics move
///     net(torch.randn(4, 3, 6, 6))
/// net.eval()
/// save_file(net.state_dict(), "net.safetensors")
/// x = (torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) * 0.37) % 2.0 - 1.0
/// y = net(x).detach()
/// save_file({"x": x, "y": y}, "input_output.safetensors")
/// print(", ".join(repr(v) for v in y.flatten().tolist()))
/// ```
///
/// It printed the outputs also stored as `y`: 0.32067200541496277, 0.16763901710510254,
/// -0.14670822024345398, 0.077548548579216, -0.0479690358042717, 0.3407212197780609,
/// 0.16979077458381653, -0.15181201696395874, 0.08495302498340607, -0.062034741044044495.
/// The same graph built here loads the file strictly (every tensor, PyTorch's shapes, batch
/// norm's running statistics) and, in evaluation mode, gives those outputs to 1e-6 relative.
#[test]
fn a_file_written_by_pytorch_loads_and_computes_the_same() {
    let root = env!("CARGO_MANIFEST_DIR");
    let weights = std::fs::read(format!("{root}/data/torch_fixture/net.safetensors")).unwrap();
    let io = std::fs::read(format!(
        "{root}/data/torch_fixture/input_output.safetensors"
    ))
    .unwrap();
    let io = SafeTensors::deserialize(&io).unwrap();
    let (mut graph, x, y) = net();
    graph_from_safetensors(&mut graph, &weights).unwrap();
    let bn = graph
        .node_ids()
        .find(|&id| graph.kind(id).unwrap() == "batch_norm")
        .unwrap();
    assert_eq!(graph.running_stats(bn).unwrap().2, 3, "num_batches_tracked");
    graph.set_training(false);
    graph.set_input(x, tensor(&io, "x").view()).unwrap();
    graph.forward(y).unwrap();
    let expected = tensor(&io, "y");
    assert_eq!(expected.len(), 10);
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (got, want) in graph.value(y).unwrap().iter().zip(expected.iter()) {
        assert!(
            (got - want).abs() <= 1e-6 * scale,
            "{got} vs PyTorch {want}"
        );
    }
}

/// Export then import: PyTorch's layout decided by the consuming op (a 1×1 and a grouped 1×1
/// weight gain (…, 1, 1), K×K and depthwise weights and the linear weight keep theirs), batch
/// norm's buffers beside its parameters, and a round trip that changes nothing. A file that
/// lacks a tensor, has an extra one, or a wrong shape is refused with the graph unchanged.
#[test]
fn any_graph_exports_in_pytorch_layout_and_reads_back() {
    let (mut graph, x, y) = net();
    graph
        .set_input(
            x,
            ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 3, 6, 6]), 0.5).view(),
        )
        .unwrap();
    graph.forward(y).unwrap(); // training mode: the running statistics move
    let bytes = graph_to_safetensors(&graph).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let shape = |name: &str| file.tensor(name).unwrap().shape().to_vec();
    assert_eq!(shape("stem.weight"), [8, 3, 3, 3]);
    assert_eq!(shape("block.reduce.weight"), [4, 8, 1, 1]);
    assert_eq!(shape("block.dw.weight"), [4, 1, 3, 3]);
    assert_eq!(shape("block.expand.weight"), [8, 2, 1, 1]);
    assert_eq!(shape("head.weight"), [5, 72]);
    assert_eq!(shape("bn.running_var"), [8]);
    assert_eq!(shape("bn.num_batches_tracked"), Vec::<usize>::new());
    assert_eq!(file.len(), 13); // 10 parameters and 3 batch-norm buffers, as in the state_dict

    let (mut fresh, _, _) = net();
    graph_from_safetensors(&mut fresh, &bytes).unwrap();
    assert_eq!(
        graph_to_safetensors(&fresh).unwrap(),
        bytes,
        "a round trip changes nothing"
    );

    // Refusals leave the graph as it was.
    let before = graph_to_safetensors(&fresh).unwrap();
    let mut lacking = std::collections::HashMap::new();
    let mut wrong = std::collections::HashMap::new();
    let names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    for name in &names {
        let view = file.tensor(name).unwrap();
        if name != "head.bias" {
            lacking.insert(name.clone(), view.clone());
        }
        let shape = if name == "block.reduce.weight" {
            vec![4, 8]
        } else {
            view.shape().to_vec()
        };
        wrong.insert(
            name.clone(),
            safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap(),
        );
    }
    for (case, tensors) in [
        ("missing head.bias", lacking),
        ("reduce weight as (4, 8)", wrong),
    ] {
        let bytes = safetensors::serialize(tensors, None).unwrap();
        assert!(
            graph_from_safetensors(&mut fresh, &bytes).is_err(),
            "{case}"
        );
        assert_eq!(
            graph_to_safetensors(&fresh).unwrap(),
            before,
            "{case}: the graph changed"
        );
    }
}

/// A safetensors file with this JSON header and these data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Hostile headers are typed errors, never a panic inside the safetensors crate (whose size
/// arithmetic overflows in debug builds on shapes like these) nor a silent choice.
#[test]
fn hostile_safetensors_headers_are_errors() {
    let (mut graph, _, _) = net();
    let before = graph_to_safetensors(&graph).unwrap();
    let huge = 1u64 << 62;
    let cases = [
        // Element counts whose byte sizes overflow, alone and summed.
        format!(r#"{{"a":{{"dtype":"F32","shape":[{huge},4],"data_offsets":[0,0]}}}}"#),
        format!(
            r#"{{"a":{{"dtype":"F32","shape":[{huge}],"data_offsets":[0,16]}},"b":{{"dtype":"F32","shape":[{huge}],"data_offsets":[16,32]}}}}"#
        ),
        // A consistent tensor whose end offset plus the header's length overflows.
        r#"{"a":{"dtype":"U8","shape":[18446744073709551600],"data_offsets":[0,18446744073709551600]}}"#.to_string(),
        // Offsets past the data, reversed, or not the shape's size.
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}}"#.to_string(),
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#.to_string(),
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#.to_string(),
        // A key given twice (JSON parsers keep the last one silently).
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_string(),
        // Not an object, an unknown dtype, a missing field.
        "[1, 2]".to_string(),
        r#"{"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}}"#.to_string(),
        r#"{"a":{"dtype":"F32","shape":[2]}}"#.to_string(),
    ];
    for header in &cases {
        let error = graph_from_safetensors(&mut graph, &raw_file(header, &[0; 16])).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("safetensors") && !message.contains('\n'),
            "{header}: {message}"
        );
    }
    // A valid file with its first entry given twice: the safetensors crate alone keeps the
    // last one and loads it.
    let length = u64::from_le_bytes(before[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&before[8..8 + length]).unwrap();
    let first = &header[1..=header.find("},").unwrap()];
    let doubled = format!("{{{first},{}", &header[1..]);
    let error = graph_from_safetensors(&mut graph, &raw_file(&doubled, &before[8 + length..]));
    assert!(error.unwrap_err().to_string().contains("twice"));
    // A header length beyond the file, and a file shorter than the length field.
    let mut long = raw_file("{}", &[]);
    long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(graph_from_safetensors(&mut graph, &long).is_err());
    assert!(graph_from_safetensors(&mut graph, &[1, 2, 3]).is_err());
    assert_eq!(graph_to_safetensors(&graph).unwrap(), before);
}
