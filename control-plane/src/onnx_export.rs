//! Export of the trained user tower as an ONNX model (opset 13), built directly from the
//! ONNX protobuf types that tract-onnx exposes, so no Python is needed to publish.
//!
//! The graph takes the inputs documented in `edge::tower` and computes exactly what the
//! candle model computes: Gather + weighted ReduceSum for the pooled history, Gather for
//! the categorical embeddings, Concat, Gemm/Relu layers, and L2 normalisation.
//!
//! The embedding tables are most of the tower (a 100,000-video catalogue's id table alone
//! is 25.6 MB in f32) and are only ever read row by row, so by default they are exported
//! as int8 rows with one f32 scale per row ([`TablePrecision::Int8`]): a lookup is
//! Gather, Cast, and a Mul by the row's gathered scale. That is a quarter of the bytes to
//! ship and to parse at every cold start, for an error of at most half a quantization
//! step (`max |row| / 254`) per weight. Tables of fewer than [`INT8_MIN_ROWS`] rows (the
//! category, country, language and age vocabularies) stay f32: they weigh a few
//! kilobytes, and each quantized table adds three nodes that tract declutters and
//! optimises again at every cold start.

use std::collections::HashMap;

use candle_core::Tensor;
use prost::Message;
use tract_onnx::pb;

use edge::tower::TowerTables;

use crate::two_tower::TwoTower;

/// The opset the exported graph declares.
pub const OPSET: i64 = 13;
/// ONNX IR version matching opset 13.
const IR_VERSION: i64 = 7;
/// Floor of the norm in the L2 normalisation, as in training.
const NORM_FLOOR: f32 = 1e-12;

const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;
const INT64: i32 = pb::tensor_proto::DataType::Int64 as i32;
const INT8: i32 = pb::tensor_proto::DataType::Int8 as i32;

/// The fewest rows a table must have to be stored as int8 by [`TablePrecision::Int8`].
pub const INT8_MIN_ROWS: usize = 256;

/// Whether [`TablePrecision::Int8`] stores a table of `rows` rows as int8.
pub fn quantizes_table(rows: usize) -> bool {
    rows >= INT8_MIN_ROWS
}

/// How the tower's embedding tables are stored in the exported graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TablePrecision {
    /// Each row as int8 with one f32 scale (`row = scale * q`, symmetric, `|q| <= 127`),
    /// for tables of at least [`INT8_MIN_ROWS`] rows; smaller ones as trained.
    #[default]
    Int8,
    /// The trained f32 values, bit for bit.
    F32,
}

/// `rows x width` values as symmetric int8 rows and one scale per row: the largest
/// magnitude of a row maps to 127, an all-zero row gets scale 0.
pub fn quantize_rows(values: &[f32], width: usize) -> (Vec<i8>, Vec<f32>) {
    let mut quantized = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / width.max(1));
    for row in values.chunks(width.max(1)) {
        let largest = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = largest / 127.0;
        scales.push(scale);
        quantized.extend(row.iter().map(|&v| {
            if scale > 0.0 {
                (v / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        }));
    }
    (quantized, scales)
}

/// What [`TablePrecision::Int8`] serves in place of `values`: each weight as its row's
/// scale times its int8 value, computed in f32 as the runtimes do.
pub fn dequantized_rows(values: &[f32], width: usize) -> Vec<f32> {
    let (quantized, scales) = quantize_rows(values, width);
    quantized
        .chunks(width.max(1))
        .zip(scales)
        .flat_map(|(row, scale)| row.iter().map(move |&q| f32::from(q) * scale))
        .collect()
}

/// Why the tower could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A weight the graph needs is not in the model.
    #[error("the model has no weight named {0}")]
    MissingWeight(String),
    /// Reading a weight failed.
    #[error("reading a weight failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The tower to cut is not an ONNX model this code can rewrite.
    #[error("cannot cut the tower's tables: {0}")]
    Cut(String),
}

struct Graph {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    weights: HashMap<String, Tensor>,
    tables: TablePrecision,
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

    /// Written as `raw_data` (little-endian bytes, as ONNX specifies): readers copy it
    /// whole, where `float_data` is decoded value by value.
    fn floats(&mut self, name: &str, dims: Vec<i64>, values: Vec<f32>) {
        self.initializers.push(pb::TensorProto {
            name: name.to_owned(),
            dims,
            data_type: FLOAT,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
    }

    fn int8s(&mut self, name: &str, dims: Vec<i64>, values: Vec<i8>) {
        self.initializers.push(pb::TensorProto {
            name: name.to_owned(),
            dims,
            data_type: INT8,
            raw_data: values.iter().map(|&v| v as u8).collect(),
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
        let (dims, values) = self.values(name)?;
        let initializer = format!("weights.{name}");
        self.floats(&initializer, dims.clone(), values);
        Ok((initializer, dims))
    }

    fn values(&self, name: &str) -> Result<(Vec<i64>, Vec<f32>), ExportError> {
        let tensor = self
            .weights
            .get(name)
            .ok_or_else(|| ExportError::MissingWeight(name.to_owned()))?;
        let dims: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
        Ok((dims, tensor.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Rows `rows` of embedding table `table` into `out`, in the graph's table precision;
    /// returns the table's dims.
    fn gather_rows(&mut self, table: &str, rows: &str, out: &str) -> Result<Vec<i64>, ExportError> {
        let axis = || vec![attribute_int("axis", 0)];
        // The row count from the tensor's shape: `values` would copy the whole table.
        let rows_in_table = self
            .weights
            .get(table)
            .ok_or_else(|| ExportError::MissingWeight(table.to_owned()))?
            .dims()
            .first()
            .copied()
            .unwrap_or(0);
        let precision = match self.tables {
            TablePrecision::Int8 if !quantizes_table(rows_in_table) => TablePrecision::F32,
            precision => precision,
        };
        match precision {
            TablePrecision::F32 => {
                let (table, dims) = self.weight(table)?;
                self.node("Gather", &[&table, rows], out, axis());
                Ok(dims)
            }
            TablePrecision::Int8 => {
                let (dims, values) = self.values(table)?;
                let width = dims.get(1).copied().unwrap_or(1) as usize;
                let (quantized, scales) = quantize_rows(&values, width);
                let int8_table = format!("weights.{table}.int8");
                let scale_table = format!("weights.{table}.scale");
                self.int8s(&int8_table, dims.clone(), quantized);
                self.floats(&scale_table, vec![dims[0], 1], scales);
                let gathered = format!("{out}.int8");
                let widened = format!("{out}.unscaled");
                let row_scales = format!("{out}.scales");
                self.node("Gather", &[&int8_table, rows], &gathered, axis());
                self.node(
                    "Cast",
                    &[&gathered],
                    &widened,
                    vec![attribute_int("to", i64::from(FLOAT))],
                );
                self.node("Gather", &[&scale_table, rows], &row_scales, axis());
                self.node("Mul", &[&widened, &row_scales], out, vec![]);
                Ok(dims)
            }
        }
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
        let gathered = format!("{out}.gathered");
        let dims = self.gather_rows(table, rows, &gathered)?;
        let row_weights = format!("{out}.weights");
        let weights_shape = format!("{out}.weights_shape");
        let pooled_shape = format!("{out}.shape");
        let pooled = format!("{out}.pooled");
        self.ints(&weights_shape, vec![-1, 1, history]);
        self.ints(&pooled_shape, vec![-1, dims[1]]);
        self.node("Reshape", &[weights, &weights_shape], &row_weights, vec![]);
        self.node("MatMul", &[&row_weights, &gathered], &pooled, vec![]);
        self.node("Reshape", &[&pooled, &pooled_shape], out, vec![]);
        Ok(())
    }

    fn lookup(&mut self, table: &str, rows: &str, out: &str) -> Result<(), ExportError> {
        self.gather_rows(table, rows, out).map(drop)
    }
}

/// The user tower of `model` as ONNX bytes, its embedding tables stored as `tables` says.
pub fn export_user_tower(model: &TwoTower, tables: TablePrecision) -> Result<Vec<u8>, ExportError> {
    let history = model.spec.history_length as i64;
    let mut graph = Graph {
        nodes: Vec::new(),
        initializers: Vec::new(),
        weights: model.tensors(),
        tables,
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

/// The graph of `onnx` with its large embedding tables cut out, and those tables, as a
/// bundle carries them (see `edge::tower::TowerTables`).
///
/// Each `Gather` (axis 0) of an initializer of at least `min_rows` rows, int8 or f32,
/// by one of the signature's index inputs becomes a graph input named as the Gather's
/// output, appended after the existing inputs; the table moves out of the graph. A table
/// that any other node also reads stays. The cut graph computes the same values: the
/// serving code gathers the same rows and the rest of the graph is untouched.
pub fn cut_tower_tables(
    onnx: &[u8],
    min_rows: usize,
) -> Result<(Vec<u8>, TowerTables), ExportError> {
    use std::collections::{BTreeMap, HashSet};
    let mut model = pb::ModelProto::decode(onnx)
        .map_err(|e| ExportError::Cut(format!("not an ONNX model: {e}")))?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| ExportError::Cut("the model has no graph".to_owned()))?;
    let inputs: HashMap<&str, &pb::ValueInfoProto> = graph
        .input
        .iter()
        .map(|input| (input.name.as_str(), input))
        .collect();
    let initializers: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|tensor| (tensor.name.as_str(), tensor))
        .collect();
    let is_cut = |node: &pb::NodeProto| {
        let axis_zero = node
            .attribute
            .iter()
            .all(|attribute| attribute.name != "axis" || attribute.i == 0);
        node.op_type == "Gather"
            && node.domain.is_empty()
            && axis_zero
            && node.input.len() == 2
            && node.output.len() == 1
            && edge::tower::INDEX_INPUTS.contains(&node.input[1].as_str())
            && inputs.contains_key(node.input[1].as_str())
            && !inputs.contains_key(node.input[0].as_str())
            && initializers
                .get(node.input[0].as_str())
                .is_some_and(|table| {
                    table
                        .dims
                        .first()
                        .is_some_and(|&rows| rows >= min_rows as i64)
                        && (table.data_type == FLOAT || table.data_type == INT8)
                })
    };
    let gathers: Vec<&pb::NodeProto> = graph.node.iter().filter(|node| is_cut(node)).collect();
    // A table is cut only if every node that reads it is such a Gather.
    let reads = |table: &str, nodes: &[&pb::NodeProto]| {
        nodes
            .iter()
            .flat_map(|node| &node.input)
            .filter(|input| *input == table)
            .count()
    };
    let all_nodes: Vec<&pb::NodeProto> = graph.node.iter().collect();
    let cut_tables: HashSet<&str> = gathers
        .iter()
        .map(|node| node.input[0].as_str())
        .filter(|table| reads(table, &gathers) == reads(table, &all_nodes))
        .collect();

    let mut payload: Vec<u8> = Vec::new();
    let mut offsets: BTreeMap<&str, u64> = BTreeMap::new();
    let mut layouts = Vec::new();
    let mut new_inputs = Vec::new();
    for node in gathers
        .iter()
        .filter(|node| cut_tables.contains(node.input[0].as_str()))
    {
        let table = initializers[node.input[0].as_str()];
        let element = if table.data_type == INT8 {
            edge::tower::TableElement::I8
        } else {
            edge::tower::TableElement::F32
        };
        let offset = match offsets.get(table.name.as_str()) {
            Some(&offset) => offset,
            None => {
                // f32 tables start on a 4-byte boundary of the payload.
                payload.resize(payload.len().next_multiple_of(4), 0);
                let offset = payload.len() as u64;
                payload.extend(table_bytes(table)?);
                offsets.insert(&table.name, offset);
                offset
            }
        };
        let row_shape: Vec<u64> = table.dims[1..].iter().map(|&d| d.max(0) as u64).collect();
        let indices = inputs[node.input[1].as_str()];
        let mut gathered = indices.clone();
        gathered.name = node.output[0].clone();
        let Some(pb::type_proto::Value::TensorType(tensor)) =
            gathered.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            return Err(ExportError::Cut(format!(
                "input {:?} has no tensor type",
                indices.name
            )));
        };
        tensor.elem_type = table.data_type;
        if let Some(shape) = tensor.shape.as_mut() {
            shape.dim.extend(
                row_shape
                    .iter()
                    .map(|&d| pb::tensor_shape_proto::Dimension {
                        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                        ..Default::default()
                    }),
            );
        }
        new_inputs.push(gathered);
        layouts.push(edge::tower::TableLayout {
            indices: node.input[1].clone(),
            gathered: node.output[0].clone(),
            element,
            rows: table.dims[0] as u64,
            row_shape,
            offset,
        });
    }
    // What the cut removes, named by what it added: each Gather by the graph input that
    // replaces its output, each table by its name.
    let cut_outputs: HashSet<String> = layouts.iter().map(|l| l.gathered.clone()).collect();
    let cut_tables: HashSet<String> = offsets.keys().map(|t| (*t).to_owned()).collect();
    graph.node.retain(|node| {
        !node
            .output
            .iter()
            .any(|output| cut_outputs.contains(output))
    });
    graph
        .initializer
        .retain(|tensor| !cut_tables.contains(&tensor.name));
    graph.input.extend(new_inputs);
    let tables = TowerTables::new(layouts, payload).map_err(|e| ExportError::Cut(e.to_string()))?;
    Ok((model.encode_to_vec(), tables))
}

/// An initializer's values as little-endian bytes, wherever the file keeps them.
fn table_bytes(table: &pb::TensorProto) -> Result<Vec<u8>, ExportError> {
    let values: usize = table.dims.iter().map(|&d| d.max(0) as usize).product();
    let element_size = if table.data_type == INT8 { 1 } else { 4 };
    let bytes = if !table.raw_data.is_empty() {
        table.raw_data.clone()
    } else if table.data_type == INT8 {
        // ONNX keeps int8 values one per int32 when not raw.
        table.int32_data.iter().map(|&v| v as i8 as u8).collect()
    } else {
        table
            .float_data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    if bytes.len() != values * element_size {
        return Err(ExportError::Cut(format!(
            "table {:?} holds {} bytes for dims {:?}",
            table.name,
            bytes.len(),
            table.dims
        )));
    }
    Ok(bytes)
}
