//! Export of the trained user tower as an ONNX model (opset 13), built directly from the
//! ONNX protobuf types that tract-onnx exposes, so no Python is needed to publish.
//!
//! The graph takes the inputs documented in `edge::tower` and computes exactly what the
//! candle model computes: Gather + weighted ReduceSum for the pooled history, Gather for
//! the categorical embeddings, Concat, Gemm/Relu layers, and L2 normalisation.

use std::collections::HashMap;

use candle_core::Tensor;
use prost::Message;
use tract_onnx::pb;

use crate::two_tower::TwoTower;

/// The opset the exported graph declares.
pub const OPSET: i64 = 13;
/// ONNX IR version matching opset 13.
const IR_VERSION: i64 = 7;
/// Floor of the norm in the L2 normalisation, as in training.
const NORM_FLOOR: f32 = 1e-12;

const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;
const INT64: i32 = pb::tensor_proto::DataType::Int64 as i32;

/// Why the tower could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A weight the graph needs is not in the model.
    #[error("the model has no weight named {0}")]
    MissingWeight(String),
    /// Reading a weight failed.
    #[error("reading a weight failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

struct Graph {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    weights: HashMap<String, Tensor>,
}

fn attribute_int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_owned(),
        i: value,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

fn value_info(name: &str, elem_type: i32, dims: &[Option<i64>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Some(size) => Value::DimValue(*size),
                                None => Value::DimParam("batch".to_owned()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<pb::AttributeProto>,
    ) {
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|i| (*i).to_owned()).collect(),
            output: vec![output.to_owned()],
            name: output.to_owned(),
            op_type: op.to_owned(),
            attribute: attributes,
            ..Default::default()
        });
    }

    fn floats(&mut self, name: &str, dims: Vec<i64>, values: Vec<f32>) {
        self.initializers.push(pb::TensorProto {
            name: name.to_owned(),
            dims,
            data_type: FLOAT,
            float_data: values,
            ..Default::default()
        });
    }

    fn ints(&mut self, name: &str, values: Vec<i64>) {
        self.initializers.push(pb::TensorProto {
            name: name.to_owned(),
            dims: vec![values.len() as i64],
            data_type: INT64,
            int64_data: values,
            ..Default::default()
        });
    }

    /// Copies a model weight into the graph under `weights.NAME` (some weights share a
    /// name with an input, e.g. `country`); returns that name and the dims.
    fn weight(&mut self, name: &str) -> Result<(String, Vec<i64>), ExportError> {
        let tensor = self
            .weights
            .get(name)
            .ok_or_else(|| ExportError::MissingWeight(name.to_owned()))?;
        let dims: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        let initializer = format!("weights.{name}");
        self.floats(&initializer, dims.clone(), values);
        Ok((initializer, dims))
    }

    /// `[B, H]` rows into `table`, averaged with `weights` `[B, H]` -> `[B, E]`, as a
    /// batched MatMul of `[B, 1, H]` weights by `[B, H, E]` rows: plain Reshape and MatMul
    /// read the same in every runtime, where Unsqueeze, Squeeze and ReduceSum changed
    /// their signatures across opsets.
    fn pooled(
        &mut self,
        table: &str,
        rows: &str,
        weights: &str,
        history: i64,
        out: &str,
    ) -> Result<(), ExportError> {
        let (table, dims) = self.weight(table)?;
        let gathered = format!("{out}.gathered");
        let row_weights = format!("{out}.weights");
        let weights_shape = format!("{out}.weights_shape");
        let pooled_shape = format!("{out}.shape");
        let pooled = format!("{out}.pooled");
        self.ints(&weights_shape, vec![-1, 1, history]);
        self.ints(&pooled_shape, vec![-1, dims[1]]);
        self.node(
            "Gather",
            &[&table, rows],
            &gathered,
            vec![attribute_int("axis", 0)],
        );
        self.node("Reshape", &[weights, &weights_shape], &row_weights, vec![]);
        self.node("MatMul", &[&row_weights, &gathered], &pooled, vec![]);
        self.node("Reshape", &[&pooled, &pooled_shape], out, vec![]);
        Ok(())
    }

    fn lookup(&mut self, table: &str, rows: &str, out: &str) -> Result<(), ExportError> {
        let (table, _) = self.weight(table)?;
        self.node(
            "Gather",
            &[&table, rows],
            out,
            vec![attribute_int("axis", 0)],
        );
        Ok(())
    }
}

/// The user tower of `model` as ONNX bytes.
pub fn export_user_tower(model: &TwoTower) -> Result<Vec<u8>, ExportError> {
    let history = model.spec.history_length as i64;
    let mut graph = Graph {
        nodes: Vec::new(),
        initializers: Vec::new(),
        weights: model.tensors(),
    };
    graph.pooled(
        "video",
        "history_videos",
        "history_weights",
        history,
        "pooled_videos",
    )?;
    graph.pooled(
        "category",
        "history_categories",
        "history_weights",
        history,
        "pooled_categories",
    )?;
    graph.lookup("country", "country", "country_embedding")?;
    graph.lookup("language", "language", "language_embedding")?;
    graph.lookup("age_bucket", "age_bucket", "age_embedding")?;
    graph.lookup("user", "user", "user_embedding")?;
    graph.node(
        "Concat",
        &[
            "pooled_videos",
            "pooled_categories",
            "country_embedding",
            "language_embedding",
            "age_embedding",
            "user_embedding",
            "dense",
        ],
        "features",
        vec![attribute_int("axis", 1)],
    );
    let mut x = "features".to_owned();
    let layers = (0..)
        .take_while(|i| graph.weights.contains_key(&format!("user_mlp.{i}.weight")))
        .count();
    for i in 0..layers {
        let (weight, _) = graph.weight(&format!("user_mlp.{i}.weight"))?;
        // Biases are stored [1, out]; Gemm wants [out].
        let values = graph.weights[&format!("user_mlp.{i}.bias")]
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = format!("weights.user_mlp.{i}.bias");
        graph.floats(&bias, vec![values.len() as i64], values);
        let out = format!("layer{i}");
        graph.node(
            "Gemm",
            &[&x, &weight, &bias],
            &out,
            vec![attribute_int("transB", 1)],
        );
        x = out;
        if i + 1 < layers {
            let out = format!("layer{i}.relu");
            graph.node("Relu", &[&x], &out, vec![]);
            x = out;
        }
    }
    let output_dim = model.spec.output_dim as i64;
    graph.floats("norm_floor", vec![], vec![NORM_FLOOR]);
    graph.floats("ones", vec![output_dim, 1], vec![1.0; output_dim as usize]);
    graph.node("Mul", &[&x, &x], "squares", vec![]);
    graph.node("MatMul", &["squares", "ones"], "sum_of_squares", vec![]);
    graph.node("Sqrt", &["sum_of_squares"], "norm", vec![]);
    graph.node("Max", &["norm", "norm_floor"], "floored_norm", vec![]);
    graph.node("Div", &[&x, "floored_norm"], "embedding", vec![]);

    let model = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "edgerec".to_owned(),
        producer_version: env!("CARGO_PKG_VERSION").to_owned(),
        graph: Some(pb::GraphProto {
            name: "user_tower".to_owned(),
            node: graph.nodes,
            initializer: graph.initializers,
            input: vec![
                value_info("history_videos", INT64, &[None, Some(history)]),
                value_info("history_categories", INT64, &[None, Some(history)]),
                value_info("history_weights", FLOAT, &[None, Some(history)]),
                value_info("country", INT64, &[None]),
                value_info("language", INT64, &[None]),
                value_info("age_bucket", INT64, &[None]),
                value_info("user", INT64, &[None]),
                value_info("dense", FLOAT, &[None, Some(1)]),
            ],
            output: vec![value_info("embedding", FLOAT, &[None, Some(output_dim)])],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}
