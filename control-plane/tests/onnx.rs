//! The exported user tower: tract-onnx (what serves it) and the official `onnx` checker and
//! `onnxruntime` (outside referees, from `EDGEREC_REFEREE_PYTHON`, which `cargo xtask test`
//! sets up) load it and compute what candle computes.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use control_plane::config::TwoTowerConfig;
use control_plane::data::Dataset;
use control_plane::eval::positives_by_user;
use control_plane::onnx_export::{
    INT8_MIN_ROWS, TablePrecision, cut_tower_tables, dequantized_rows, export_user_tower,
    quantizes_table,
};
use control_plane::synthetic::{GeneratorConfig, generate};
use control_plane::two_tower::TwoTower;
use control_plane::two_tower::train;
use edge::tower::{TableElement, TowerTables, UserTower, Viewer, encode_user};
use prost::Message;

/// A tower trained once for all tests: its ONNX bytes, inputs and candle's outputs, with
/// the embedding tables exported as trained (f32) and quantized (int8).
struct Fixture {
    onnx: Vec<u8>,
    inputs: Vec<edge::tower::UserTowerInput>,
    expected: Vec<f32>,
    spec: edge::tower::UserTowerSpec,
    int8_onnx: Vec<u8>,
    /// What candle computes with each table replaced by its dequantized rows.
    int8_expected: Vec<f32>,
    /// Weights in those tables.
    table_weights: usize,
}

/// The user tower's embedding tables: what [`TablePrecision::Int8`] quantizes.
const USER_TOWER_TABLES: [&str; 6] = [
    "video",
    "category",
    "country",
    "language",
    "age_bucket",
    "user",
];

/// The tables [`TablePrecision::Int8`] quantizes: those with enough rows.
fn quantized_tables(model: &TwoTower) -> Vec<&'static str> {
    let tensors = model.tensors();
    USER_TOWER_TABLES
        .into_iter()
        .filter(|name| quantizes_table(tensors[*name].dim(0).unwrap()))
        .collect()
}

/// `model` with the user tower's tables replaced by what the int8 export serves.
fn with_dequantized_tables(model: &TwoTower) -> TwoTower {
    let mut tensors = model.tensors();
    for name in quantized_tables(model) {
        let table = &tensors[name];
        let width = table.dim(1).unwrap();
        let values = table.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dequantized = candle_core::Tensor::from_vec(
            dequantized_rows(&values, width),
            table.dims(),
            table.device(),
        )
        .unwrap();
        tensors.insert(name.to_owned(), dequantized);
    }
    TwoTower::from_tensors(tensors, model.spec.clone()).unwrap()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let generator = GeneratorConfig {
        users: 1_200,
        videos: 400,
        interactions: 40_000,
        ..GeneratorConfig::default()
    };
    generate(&generator, dir.path(), false).unwrap();
    let prepared = common::prepare(Dataset::load(dir.path()).unwrap());
    let data = prepared.training_data(None);
    let common::Prepared {
        dataset,
        rules,
        parts,
        preprocessor,
    } = &prepared;
    let config = TwoTowerConfig {
        epochs: 1,
        ..TwoTowerConfig::default()
    };
    let (trained, _) = train(&data, &config, false, |_| {}).unwrap();
    let model = &trained.model;
    let bytes = export_user_tower(model, TablePrecision::F32).unwrap();
    let int8_onnx = export_user_tower(model, TablePrecision::Int8).unwrap();

    // Known users with their histories, then anonymous viewers (no id, no demographics).
    let durations: HashMap<u64, u32> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.duration_seconds))
        .collect();
    let categories: HashMap<u64, &str> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.category.as_str()))
        .collect();
    let histories = positives_by_user(&parts.train, &durations, rules);
    let mut inputs: Vec<_> = dataset
        .users
        .iter()
        .take(1_000)
        .map(|u| {
            let viewer = Viewer {
                user_id: Some(u.user_id),
                country: Some(u.country.clone()),
                language: Some(u.language.clone()),
                age: Some(u.age),
            };
            let history = histories.get(&u.user_id).map(Vec::as_slice).unwrap_or(&[]);
            encode_user(preprocessor, &model.spec, &viewer, history, |v| {
                categories.get(&v).copied()
            })
        })
        .collect();
    inputs.push(encode_user(
        preprocessor,
        &model.spec,
        &Viewer::default(),
        &[],
        |_| None,
    ));
    let expected = model.user_embeddings(&inputs).unwrap();
    let int8_expected = with_dequantized_tables(model)
        .user_embeddings(&inputs)
        .unwrap();
    let tensors = model.tensors();
    Fixture {
        onnx: bytes,
        inputs,
        expected,
        spec: model.spec.clone(),
        int8_onnx,
        int8_expected,
        table_weights: quantized_tables(model)
            .iter()
            .map(|t| tensors[*t].elem_count())
            .sum(),
    }
}

fn largest_difference(found: impl IntoIterator<Item = f32>, expected: &[f32]) -> f32 {
    found
        .into_iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn the_edge_runs_the_exported_tower_like_candle() {
    let Fixture {
        onnx: bytes,
        inputs,
        expected,
        spec,
        ..
    } = fixture();
    // `edge::tower::UserTower` (tract-onnx) is what serves the tower.
    let tower = UserTower::load(bytes, spec.clone()).unwrap();
    let found = tower.embed(inputs).unwrap();
    assert_eq!(found.len(), inputs.len() * spec.output_dim);
    let worst = largest_difference(found.iter().copied(), expected);
    assert!(
        worst < 1e-5,
        "largest difference between tract and candle: {worst}"
    );
    // One viewer at a time gives the same rows as the batch.
    for (row, input) in inputs.iter().enumerate().step_by(97) {
        let one = tower.embed(std::slice::from_ref(input)).unwrap();
        let dim = spec.output_dim;
        assert!(largest_difference(one, &found[row * dim..(row + 1) * dim]) < 1e-6);
    }
    assert!(tower.embed(&[]).unwrap().is_empty());
    let mut short = inputs[0].clone();
    short.history_videos.pop();
    assert!(
        tower
            .embed(&[short])
            .unwrap_err()
            .to_string()
            .contains("does not have a history of")
    );
    let err = UserTower::load(&bytes[..bytes.len() / 2], spec.clone()).unwrap_err();
    assert!(
        err.to_string().starts_with("cannot decode user tower"),
        "{err}"
    );
}

#[test]
fn int8_tables_serve_their_dequantized_rows_in_a_quarter_of_the_bytes() {
    let fixture = fixture();
    let tower = UserTower::load(&fixture.int8_onnx, fixture.spec.clone()).unwrap();
    let found = tower.embed(&fixture.inputs).unwrap();
    let worst = largest_difference(found.iter().copied(), &fixture.int8_expected);
    assert!(
        worst < 1e-5,
        "largest difference between tract and candle with dequantized tables: {worst}"
    );
    // The quantization itself moves unit-length embeddings only a little.
    let drift = largest_difference(found.iter().copied(), &fixture.expected);
    assert!(
        drift > 0.0 && drift < 0.05,
        "int8 tables moved an embedding component by {drift}"
    );
    let dim = fixture.spec.output_dim;
    let worst_cosine = found
        .chunks(dim)
        .zip(fixture.expected.chunks(dim))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
        .fold(1.0f32, f32::min);
    assert!(
        worst_cosine > 0.995,
        "cosine to the f32 tower: {worst_cosine}"
    );
    // Only the large vocabularies are quantized; the small ones stay f32 and add no
    // dequantization nodes.
    let graph = tract_onnx::pb::ModelProto::decode(&fixture.int8_onnx[..])
        .unwrap()
        .graph
        .unwrap();
    let int8_tables: Vec<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == tract_onnx::pb::tensor_proto::DataType::Int8 as i32)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(int8_tables, ["weights.video.int8", "weights.user.int8"]);
    let casts = graph.node.iter().filter(|n| n.op_type == "Cast").count();
    assert_eq!(casts, 2, "one dequantizing Cast per int8 table");
    // Three of every table weight's four bytes go, less one f32 scale per row.
    let saved = fixture.onnx.len() - fixture.int8_onnx.len();
    assert!(
        saved as f64 > 2.5 * fixture.table_weights as f64,
        "int8 export {} bytes, f32 {} bytes, {} table weights",
        fixture.int8_onnx.len(),
        fixture.onnx.len(),
        fixture.table_weights
    );
}

#[test]
fn the_cut_tower_reads_its_tables_in_place_and_computes_the_same_bits() {
    let fixture = fixture();
    let spec = &fixture.spec;
    for (onnx, element) in [
        (&fixture.int8_onnx, TableElement::I8),
        (&fixture.onnx, TableElement::F32),
    ] {
        let whole = UserTower::load(onnx, spec.clone())
            .unwrap()
            .embed(&fixture.inputs)
            .unwrap();
        let (cut, tables) = cut_tower_tables(onnx, INT8_MIN_ROWS).unwrap();
        // The video and user tables (400 and 1,200 rows) leave the graph; the small
        // vocabularies stay in it.
        let cut_inputs: Vec<(&str, &str, TableElement)> = tables
            .layouts()
            .iter()
            .map(|l| (l.indices.as_str(), l.gathered.as_str(), l.element))
            .collect();
        let expected: Vec<(&str, &str, TableElement)> = match element {
            TableElement::I8 => vec![
                (
                    "history_videos",
                    "pooled_videos.gathered.int8",
                    TableElement::I8,
                ),
                (
                    "history_videos",
                    "pooled_videos.gathered.scales",
                    TableElement::F32,
                ),
                ("user", "user_embedding.int8", TableElement::I8),
                ("user", "user_embedding.scales", TableElement::F32),
            ],
            TableElement::F32 => vec![
                (
                    "history_videos",
                    "pooled_videos.gathered",
                    TableElement::F32,
                ),
                ("user", "user_embedding", TableElement::F32),
            ],
        };
        assert_eq!(cut_inputs, expected);
        let section = tables.to_bytes();
        // The tables' bytes left the graph: it shrank by them, less a few names.
        assert!(
            cut.len() + section.len() < onnx.len() + 1024
                && onnx.len() - cut.len() + 1024 > section.len(),
            "cut graph {} + tables {} bytes against {} whole",
            cut.len(),
            section.len(),
            onnx.len()
        );
        let tables = TowerTables::from_section(section.clone().into()).unwrap();
        let tower = UserTower::load_with_tables(&cut, Some(tables), spec.clone()).unwrap();
        let found = tower.embed(&fixture.inputs).unwrap();
        assert!(
            found
                .iter()
                .zip(&whole)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "largest difference to the whole graph: {}",
            largest_difference(found.iter().copied(), &whole)
        );

        // A row outside a table is refused, as the whole graph's Gather refuses it.
        let mut stranger = fixture.inputs[0].clone();
        stranger.user = 1_000_000;
        let err = tower.embed(std::slice::from_ref(&stranger)).unwrap_err();
        assert!(err.to_string().contains("outside table"), "{err}");
        // The cut graph needs its tables, and tables that do not fit it are refused.
        let err = UserTower::load(&cut, spec.clone()).unwrap_err();
        assert!(err.to_string().contains("followed by the tables"), "{err}");
        let (other_cut, other_tables) = cut_tower_tables(
            if element == TableElement::I8 {
                &fixture.onnx
            } else {
                &fixture.int8_onnx
            },
            INT8_MIN_ROWS,
        )
        .unwrap();
        assert!(UserTower::load_with_tables(&cut, Some(other_tables), spec.clone()).is_err());
        drop(other_cut);

        // Damage: every truncation is refused naming the section, never a panic.
        for end in (0..section.len()).step_by(section.len() / 16 + 1) {
            let err = TowerTables::from_section(section[..end].to_vec().into()).unwrap_err();
            assert!(err.to_string().contains("tower_tables"), "{end}: {err}");
        }
        // The format version is the header's first value (fixmap, fixstr of 14, fixint).
        let mut newer = section.clone();
        assert_eq!(newer[16], 1);
        newer[16] = 2;
        assert!(matches!(
            TowerTables::from_section(newer.into()),
            Err(edge::Error::FormatVersion {
                found: 2,
                expected: 1,
                ..
            })
        ));
    }
    // Nothing to cut below the row floor: the graph comes back whole.
    let (uncut, none) = cut_tower_tables(&fixture.int8_onnx, 1_000_000).unwrap();
    assert!(none.layouts().is_empty());
    assert_eq!(uncut.len(), fixture.int8_onnx.len());
}

const REFEREE: &str = r#"
import json, sys
import numpy as np
import onnx, onnxruntime

model_path, inputs_path, outputs_path = sys.argv[1:4]
onnx.checker.check_model(onnx.load(model_path), full_check=True)
inputs = json.load(open(inputs_path))
feeds = {name: np.array(value["data"], dtype=value["dtype"]).reshape(value["shape"])
         for name, value in inputs.items()}
session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
(embedding,) = session.run(["embedding"], feeds)
json.dump({"shape": list(embedding.shape), "data": embedding.ravel().tolist()}, open(outputs_path, "w"))
"#;

#[test]
fn onnx_checker_and_onnxruntime_agree_with_candle() {
    let python = std::env::var_os("EDGEREC_REFEREE_PYTHON").expect(
        "EDGEREC_REFEREE_PYTHON is not set: run `cargo xtask test`, which installs onnx and onnxruntime",
    );
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let n = fixture.inputs.len();
    let h = fixture.spec.history_length;
    let ints = |f: &dyn Fn(&edge::tower::UserTowerInput) -> Vec<i64>| -> Vec<i64> {
        fixture.inputs.iter().flat_map(f).collect()
    };
    let floats = |f: &dyn Fn(&edge::tower::UserTowerInput) -> Vec<f32>| -> Vec<f32> {
        fixture.inputs.iter().flat_map(f).collect()
    };
    let feeds = serde_json::json!({
        "history_videos": {"dtype": "int64", "shape": [n, h], "data": ints(&|i| i.history_videos.clone())},
        "history_categories": {"dtype": "int64", "shape": [n, h], "data": ints(&|i| i.history_categories.clone())},
        "history_weights": {"dtype": "float32", "shape": [n, h], "data": floats(&|i| i.history_weights.clone())},
        "country": {"dtype": "int64", "shape": [n], "data": ints(&|i| vec![i.country])},
        "language": {"dtype": "int64", "shape": [n], "data": ints(&|i| vec![i.language])},
        "age_bucket": {"dtype": "int64", "shape": [n], "data": ints(&|i| vec![i.age_bucket])},
        "user": {"dtype": "int64", "shape": [n], "data": ints(&|i| vec![i.user])},
        "dense": {"dtype": "float32", "shape": [n, 1], "data": floats(&|i| i.dense.to_vec())},
    });
    let inputs = dir.path().join("inputs.json");
    std::fs::write(&inputs, feeds.to_string()).unwrap();
    for (name, onnx, expected) in [
        ("f32", &fixture.onnx, &fixture.expected),
        ("int8", &fixture.int8_onnx, &fixture.int8_expected),
    ] {
        let model = dir.path().join(format!("user_tower.{name}.onnx"));
        std::fs::write(&model, onnx).unwrap();
        let outputs = dir.path().join("outputs.json");
        let run = std::process::Command::new(&python)
            .arg("-c")
            .arg(REFEREE)
            .arg(&model)
            .arg(&inputs)
            .arg(&outputs)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "the referee refused the {name} model:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let result: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&outputs).unwrap()).unwrap();
        assert_eq!(
            result["shape"],
            serde_json::json!([n, fixture.spec.output_dim])
        );
        let found = result["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32);
        let worst = largest_difference(found, expected);
        assert!(
            worst < 1e-5,
            "{name} tables: largest difference between onnxruntime and candle: {worst}"
        );
    }
}
