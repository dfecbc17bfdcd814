//! Official CatBoost (the PyPI `catboost` package in the referee virtualenv that `cargo
//! xtask test` names in `EDGEREC_REFEREE_PYTHON`) as the referee of `edge::ranker`: a model
//! it trains predicts the same here, and a model written here predicts the same there,
//! each on 10,000 rows with NaN and unseen categories among them.

// The crate does no I/O; its tests talk to the referee through files.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::Command;

use edge::ranker::{
    CatFeature, CatValue, Ctr, CtrElement, CtrTable, CtrType, FeatureValue, FloatFeature,
    NanTreatment, ObliviousTree, RankerModel, cat_ctr_key, ctr_identifier,
};

fn referee(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let python = PathBuf::from(
        std::env::var_os("EDGEREC_REFEREE_PYTHON")
            .expect("EDGEREC_REFEREE_PYTHON is not set: run `cargo xtask test`"),
    );
    let script = manifest_dir().join("tests/referee").join(script);
    let mut command = Command::new(python);
    command.arg(script);
    for arg in args {
        command.arg(arg);
    }
    let output = command.output().expect("the referee python starts");
    assert!(
        output.status.success(),
        "referee failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn assert_close(ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "largest difference from CatBoost over {} rows: {worst:e}",
        ours.len()
    );
    assert!(worst <= 1e-6, "largest difference from CatBoost: {worst}");
}

#[test]
fn a_model_trained_by_catboost_predicts_the_same_here() {
    let dir = tempfile::tempdir().unwrap();
    referee("catboost_train.py", &[&dir.path()]);
    let json = std::fs::read_to_string(dir.path().join("model.json")).unwrap();
    let model = RankerModel::from_catboost_json(&json).unwrap();
    assert!(!model.ctrs.is_empty() && model.cat_features[0].one_hot_values.len() >= 2);
    let tsv = std::fs::read_to_string(dir.path().join("rows.tsv")).unwrap();
    let (mut rows, mut expected) = (Vec::new(), Vec::new());
    for line in tsv.lines() {
        let cells: Vec<&str> = line.split('\t').collect();
        for (column, cell) in cells[..5].iter().enumerate() {
            rows.push(if column == 1 || column == 3 {
                FeatureValue::Cat(CatValue::new(cell))
            } else {
                FeatureValue::Float(cell.parse::<f64>().unwrap() as f32)
            });
        }
        expected.push(cells[5].parse::<f64>().unwrap());
    }
    assert_eq!(expected.len(), 10_000);
    assert_close(&model.predict(&rows).unwrap(), &expected);
}

/// A small deterministic generator (the edge crate has no random source, by design).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
}

/// A model exercising every part the writer emits: floats with each NaN treatment,
/// one-hot values, Borders and Counter CTRs (one of them over a combination), scale and
/// bias, 60 trees of depth 6 on random splits.
fn random_model(rng: &mut Lcg) -> RankerModel {
    let borders = |rng: &mut Lcg, n: usize, scale: f64| {
        let mut b: Vec<f32> = (0..n)
            .map(|_| ((rng.unit() - 0.5) * scale) as f32)
            .collect();
        b.sort_by(f32::total_cmp);
        b.dedup();
        b
    };
    let float_features = vec![
        FloatFeature {
            flat_index: 0,
            borders: borders(rng, 20, 4.0),
            has_nans: false,
            nan_treatment: NanTreatment::AsIs,
            name: "f0".into(),
        },
        FloatFeature {
            flat_index: 2,
            borders: borders(rng, 10, 4.0),
            has_nans: true,
            nan_treatment: NanTreatment::AsFalse,
            name: "f1".into(),
        },
        FloatFeature {
            flat_index: 4,
            borders: borders(rng, 8, 200.0),
            has_nans: true,
            nan_treatment: NanTreatment::AsTrue,
            name: "f2".into(),
        },
    ];
    let cat_features = vec![
        CatFeature {
            flat_index: 1,
            one_hot_values: vec![
                CatValue::new("red").as_i32(),
                CatValue::new("green").as_i32(),
            ],
            name: "color".into(),
        },
        CatFeature {
            flat_index: 3,
            one_hot_values: vec![],
            name: "city".into(),
        },
    ];
    let city_key = |city: usize| cat_ctr_key(&[CatValue::new(&format!("city_{city}"))]);
    let single = vec![CtrElement::CatValue { cat_feature: 1 }];
    let borders_table = CtrTable {
        identifier: ctr_identifier(&single, CtrType::Borders),
        counter_denominator: 0,
        counts: (0..30)
            .map(|c| {
                (
                    city_key(c),
                    vec![rng.below(50) as u32, rng.below(50) as u32],
                )
            })
            .collect(),
        width: 2,
    };
    let counts: Vec<(u64, Vec<u32>)> = (0..30)
        .map(|c| (city_key(c), vec![1 + rng.below(60) as u32]))
        .collect();
    let counter_table = CtrTable {
        identifier: ctr_identifier(&single, CtrType::Counter),
        counter_denominator: counts.iter().map(|(_, c)| c[0]).max().unwrap(),
        counts: counts.into_iter().collect(),
        width: 1,
    };
    let ctr = |ctr_type, prior_numerator, table, borders: Vec<f32>| Ctr {
        elements: single.clone(),
        ctr_type,
        prior_numerator,
        prior_denominator: 1.0,
        scale: 15.0,
        shift: 0.0,
        target_border_index: 0,
        borders,
        table,
    };
    let ctrs = vec![
        ctr(
            CtrType::Borders,
            0.5,
            0,
            vec![2.999999, 6.999999, 10.999999],
        ),
        ctr(CtrType::Counter, 0.0, 1, vec![4.999999, 9.999999]),
    ];
    let binary = float_features
        .iter()
        .map(|f| f.borders.len())
        .sum::<usize>()
        + 2
        + 5;
    let trees = (0..60)
        .map(|_| ObliviousTree {
            splits: (0..6).map(|_| rng.below(binary) as u32).collect(),
            leaf_values: (0..64).map(|_| rng.unit() - 0.5).collect(),
        })
        .collect();
    RankerModel::new(
        float_features,
        cat_features,
        ctrs,
        vec![borders_table, counter_table],
        trees,
        1.3,
        -0.2,
    )
    .unwrap()
}

#[test]
fn a_model_written_here_predicts_the_same_in_catboost() {
    let mut rng = Lcg(11);
    let model = random_model(&mut rng);
    let colors = ["red", "green", "blue", "mauve"];
    let (mut rows, mut tsv) = (Vec::new(), String::new());
    for _ in 0..10_000 {
        let float = |rng: &mut Lcg, scale: f64| {
            if rng.below(10) == 0 {
                f32::NAN
            } else {
                ((rng.unit() - 0.5) * scale) as f32
            }
        };
        let (f0, f1, f2) = (
            float(&mut rng, 5.0),
            float(&mut rng, 5.0),
            float(&mut rng, 250.0),
        );
        let color = colors[rng.below(4)];
        // Cities 0..30 are in the tables, up to 39 are unseen.
        let city = format!("city_{}", rng.below(40));
        rows.extend([
            FeatureValue::Float(f0),
            FeatureValue::Cat(CatValue::new(color)),
            FeatureValue::Float(f1),
            FeatureValue::Cat(CatValue::new(&city)),
            FeatureValue::Float(f2),
        ]);
        // Exact: the f32 printed as the f64 it equals, which CatBoost casts back.
        let text = |x: f32| {
            if x.is_nan() {
                "nan".to_owned()
            } else {
                format!("{:?}", f64::from(x))
            }
        };
        tsv.push_str(&format!(
            "{}\t{color}\t{}\t{city}\t{}\n",
            text(f0),
            text(f1),
            text(f2)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let (json, rows_path, out) = (
        dir.path().join("model.json"),
        dir.path().join("rows.tsv"),
        dir.path().join("raw.txt"),
    );
    std::fs::write(&json, model.to_catboost_json()).unwrap();
    std::fs::write(&rows_path, tsv).unwrap();
    referee("catboost_predict.py", &[&json, &rows_path, &"1,3", &out]);
    let theirs: Vec<f64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_close(&model.predict(&rows).unwrap(), &theirs);
}

/// The package's folder, read when the test runs: a baked-in `env!` path names whichever
/// checkout compiled the binary, and checkouts sharing a target folder reuse binaries.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
