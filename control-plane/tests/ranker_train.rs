//! The oblivious-tree trainer: it learns, its ordered target statistics do not leak a
//! row's own label, and official CatBoost (the referee virtualenv's `catboost`, from
//! `EDGEREC_REFEREE_PYTHON`) loads what it writes and predicts the same.

use std::path::PathBuf;
use std::process::Command;

use control_plane::config::RankerConfig;
use control_plane::ranker_train::{RankerRows, RankerTrainError, train_ranker};
use edge::ranker::features::ColumnKind;
use edge::ranker::{CatValue, FeatureValue, RankerModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KINDS: [ColumnKind; 5] = [
    ColumnKind::Float,
    ColumnKind::Categorical,
    ColumnKind::Float,
    ColumnKind::Categorical,
    ColumnKind::Categorical,
];
const NAMES: [&str; 5] = ["x0", "color", "x1", "city", "row_id"];

struct Rows {
    values: Vec<FeatureValue>,
    text: Vec<[String; 5]>,
    labels: Vec<f32>,
    groups: Vec<u32>,
}

impl Rows {
    fn view(&self) -> RankerRows<'_> {
        RankerRows {
            columns: &KINDS,
            names: &NAMES,
            values: &self.values,
            labels: &self.labels,
            groups: &self.groups,
        }
    }
}

/// Groups of 4 rows. The label depends on x0, x1 (10% NaN, which lowers the odds), the
/// color (3 values: one-hot) and the city (60 values: CTRs); `row_id` is unique per row
/// and carries nothing.
fn rows(groups: usize, seed: u64, first_id: usize) -> Rows {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let city_effect: Vec<f64> = {
        let mut effects = ChaCha8Rng::seed_from_u64(99);
        (0..60).map(|_| effects.random_range(-1.5..1.5)).collect()
    };
    let mut out = Rows {
        values: Vec::new(),
        text: Vec::new(),
        labels: Vec::new(),
        groups: Vec::new(),
    };
    for group in 0..groups {
        for _ in 0..4 {
            let x0: f32 = rng.random_range(-2.0..2.0);
            let x1: f32 = if rng.random_bool(0.1) {
                f32::NAN
            } else {
                rng.random_range(-2.0..2.0)
            };
            let color = ["red", "green", "blue"][rng.random_range(0..3)];
            let city = rng.random_range(0..60);
            let id = first_id + out.labels.len();
            let logit = 1.5 * f64::from(x0)
                + if x1.is_nan() {
                    -1.0
                } else {
                    f64::from(x1 * x1) - 1.0
                }
                + if color == "red" { 1.0 } else { 0.0 }
                + city_effect[city];
            let label = rng.random_bool(1.0 / (1.0 + (-logit).exp()));
            let city = format!("city_{city}");
            let id = format!("row_{id}");
            out.values.extend([
                FeatureValue::Float(x0),
                FeatureValue::Cat(CatValue::new(color)),
                FeatureValue::Float(x1),
                FeatureValue::Cat(CatValue::new(&city)),
                FeatureValue::Cat(CatValue::new(&id)),
            ]);
            let float = |x: f32| {
                if x.is_nan() {
                    "nan".to_owned()
                } else {
                    format!("{:?}", f64::from(x))
                }
            };
            out.text
                .push([float(x0), color.to_owned(), float(x1), city, id]);
            out.labels.push(f32::from(u8::from(label)));
            out.groups.push(group as u32);
        }
    }
    out
}

fn config(loss: &str) -> RankerConfig {
    RankerConfig {
        iterations: 150,
        learning_rate: 0.1,
        depth: 4,
        early_stopping_rounds: 30,
        loss: loss.into(),
        ..RankerConfig::default()
    }
}

/// Area under the ROC curve of `scores` for binary `labels`.
fn auc(scores: &[f64], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut positives_below, mut pairs_won, mut positives, mut negatives) = (0.0, 0.0, 0.0, 0.0);
    for &i in order.iter().rev() {
        if labels[i] > 0.5 {
            positives += 1.0;
            positives_below += 1.0;
        } else {
            negatives += 1.0;
            pairs_won += positives_below;
        }
    }
    pairs_won / (positives * negatives)
}

#[test]
fn logloss_learns_and_catboost_predicts_what_we_predict() {
    let train = rows(1500, 1, 0);
    let validation = rows(500, 2, 1_000_000);
    let (model, report) = train_ranker(
        &train.view(),
        Some(&validation.view()),
        &config("Logloss"),
        |_, _| {},
    )
    .unwrap();
    assert!(
        report.kept >= 20 && report.kept <= report.iterations,
        "{report:?}"
    );
    let scores = model.predict(&validation.values).unwrap();
    let quality = auc(&scores, &validation.labels);
    eprintln!("Logloss: validation AUC {quality:.4}, {report:?}");
    assert!(quality > 0.80, "validation AUC {quality:.3}, {report:?}");
    assert!(!model.ctrs.is_empty() && !model.cat_features[0].one_hot_values.is_empty());

    // Official CatBoost loads the JSON written here and predicts 10,000 rows the same.
    let fresh = rows(2500, 3, 2_000_000);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("model.json");
    let tsv = dir.path().join("rows.tsv");
    let out = dir.path().join("raw.txt");
    std::fs::write(&json, model.to_catboost_json()).unwrap();
    let text: String = fresh.text.iter().map(|r| r.join("\t") + "\n").collect();
    std::fs::write(&tsv, text).unwrap();
    referee(&[&json, &tsv, &"1,3,4", &out]);
    let theirs: Vec<f64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let ours = model.predict(&fresh.values).unwrap();
    assert_eq!(theirs.len(), 10_000);
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("largest difference from CatBoost over 10,000 rows: {worst:e}");
    assert!(worst <= 1e-6, "largest difference from CatBoost: {worst}");

    // The model reads back from its own JSON unchanged.
    assert_eq!(
        RankerModel::from_catboost_json(&model.to_catboost_json()).unwrap(),
        model
    );
}

#[test]
fn use_best_model_off_keeps_every_tree() {
    let train = rows(1500, 1, 0);
    let validation = rows(500, 2, 1_000_000);
    let trained = |use_best_model| {
        let config = RankerConfig {
            iterations: 120,
            // A high rate passes the best validation loss well before the last tree.
            learning_rate: 0.3,
            early_stopping_rounds: 120,
            use_best_model,
            ..config("Logloss")
        };
        train_ranker(&train.view(), Some(&validation.view()), &config, |_, _| {}).unwrap()
    };
    let (best, best_report) = trained(true);
    let (all, all_report) = trained(false);
    assert!(best_report.kept < 120, "{best_report:?}");
    assert_eq!(best.trees.len(), best_report.kept);
    assert_eq!(
        (all_report.kept, all.trees.len()),
        (120, 120),
        "{all_report:?}"
    );
    // The same trees, one model a prefix of the other.
    assert_eq!(all.trees[..best.trees.len()], best.trees[..]);
}

#[test]
fn ordered_statistics_keep_a_row_from_seeing_its_own_label() {
    // `row_id` is unique per row: a CTR computed with the row's own label would separate
    // the training rows perfectly and be chosen first; ordered, it only ever sees the
    // prior, so no tree splits on it.
    let train = rows(1000, 4, 0);
    let (model, _) = train_ranker(&train.view(), None, &config("Logloss"), |_, _| {}).unwrap();
    let row_id = model
        .cat_features
        .iter()
        .position(|c| c.name == "row_id")
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&model.to_catboost_json()).unwrap();
    let ctrs = json["features_info"]["ctrs"].as_array().unwrap();
    // Binary features of the row_id CTRs, in the order split_index counts them.
    let floats: usize = model.float_features.iter().map(|f| f.borders.len()).sum();
    let one_hot: usize = model
        .cat_features
        .iter()
        .map(|c| c.one_hot_values.len())
        .sum();
    let mut first = floats + one_hot;
    let mut leaky = Vec::new();
    for ctr in ctrs {
        let count = ctr["borders"].as_array().unwrap().len();
        if ctr["elements"][0]["cat_feature_index"] == row_id {
            leaky.extend(first..first + count);
        }
        first += count;
    }
    assert!(!leaky.is_empty());
    for tree in &model.trees {
        for split in &tree.splits {
            assert!(
                !leaky.contains(&(*split as usize)),
                "a tree splits on the row id's CTR"
            );
        }
    }
}

#[test]
fn pair_logit_ranks_within_requests() {
    let train = rows(1500, 5, 0);
    let validation = rows(500, 6, 1_000_000);
    let (model, report) = train_ranker(
        &train.view(),
        Some(&validation.view()),
        &config("PairLogit"),
        |_, _| {},
    )
    .unwrap();
    let scores = model.predict(&validation.values).unwrap();
    // Within each request, how often a positive outranks a negative.
    let (mut won, mut pairs) = (0, 0);
    for group in control_plane::ranker_train::group_ranges(&validation.groups) {
        for i in group.clone() {
            for j in group.clone() {
                if validation.labels[i] > validation.labels[j] {
                    pairs += 1;
                    won += usize::from(scores[i] > scores[j]);
                }
            }
        }
    }
    let share = won as f64 / pairs as f64;
    eprintln!("PairLogit: {share:.4} of validation pairs ordered, {report:?}");
    assert!(share > 0.75, "pairs ordered {share:.3}, {report:?}");
}

#[test]
fn bad_rows_and_settings_are_refused() {
    let train = rows(10, 7, 0);
    let mut broken = train.values.clone();
    broken[1] = FeatureValue::Float(1.0);
    let rows_view = RankerRows {
        values: &broken,
        ..train.view()
    };
    let err = train_ranker(&rows_view, None, &config("Logloss"), |_, _| {}).unwrap_err();
    assert!(
        matches!(err, RankerTrainError::Rows(_))
            && err.to_string().contains("row 0, column 1 (color)"),
        "{err}"
    );
    let err = train_ranker(&train.view(), None, &config("YetiRank"), |_, _| {}).unwrap_err();
    assert!(matches!(err, RankerTrainError::Config(_)), "{err}");
    let short = RankerRows {
        labels: &train.labels[..3],
        ..train.view()
    };
    assert!(train_ranker(&short, None, &config("Logloss"), |_, _| {}).is_err());
}

fn referee(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let python = PathBuf::from(
        std::env::var_os("EDGEREC_REFEREE_PYTHON")
            .expect("EDGEREC_REFEREE_PYTHON is not set: run `cargo xtask test`"),
    );
    let script = manifest_dir().join("../edge/tests/referee/catboost_predict.py");
    let mut command = Command::new(python);
    command.arg(script);
    for arg in args {
        command.arg(arg);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "referee failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The package's folder, read when the test runs: a baked-in `env!` path names whichever
/// checkout compiled the binary, and checkouts sharing a target folder reuse binaries.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
