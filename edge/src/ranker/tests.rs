//! Models trained by official CatBoost 1.2.10 (`tests/fixtures/catboost/make.py` wrote
//! them, with CatBoost's own predictions for 50 rows each): the evaluator must reproduce
//! those predictions, and its fast path must equal a plain walk of the trees bit for bit.

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/catboost/",
            $name
        ))
    };
}

/// The rows of a fixture CSV as model inputs, and CatBoost's raw predictions.
fn rows_of(model: &RankerModel, csv: &str) -> (Vec<FeatureValue>, Vec<f64>) {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let raw = header.iter().position(|h| *h == "raw").unwrap();
    // Ranking fixtures lead with the group id, which the model does not read.
    let first = usize::from(header[0] == "group_id");
    let cat_columns: Vec<usize> = model.cat_features.iter().map(|c| c.flat_index).collect();
    let (mut rows, mut expected) = (Vec::new(), Vec::new());
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        for column in 0..model.row_width() {
            let cell = cells[first + column];
            rows.push(if cat_columns.contains(&column) {
                FeatureValue::Cat(CatValue::new(cell))
            } else {
                // CatBoost receives float64 and casts to float32, as this does.
                FeatureValue::Float(cell.parse::<f64>().unwrap() as f32)
            });
        }
        expected.push(cells[raw].parse::<f64>().unwrap());
    }
    (rows, expected)
}

/// Each row through each tree, split by split, from the model's descriptions.
fn reference_walk(model: &RankerModel, rows: &[FeatureValue]) -> Vec<f64> {
    let n = rows.len() / model.row_width();
    (0..n)
        .map(|row| {
            let mut sum = 0.0;
            for tree in &model.trees {
                let mut leaf = 0;
                for (level, &split) in tree.splits.iter().enumerate() {
                    if model.binary_feature(rows, row, split as usize) {
                        leaf |= 1 << level;
                    }
                }
                sum += tree.leaf_values[leaf];
            }
            model.scale * sum + model.bias
        })
        .collect()
}

fn check(json: &str, csv: &str) -> RankerModel {
    let model = RankerModel::from_catboost_json(json).unwrap();
    let (rows, expected) = rows_of(&model, csv);
    let predicted = model.predict(&rows).unwrap();
    assert_eq!(predicted.len(), expected.len());
    for (row, (ours, theirs)) in predicted.iter().zip(&expected).enumerate() {
        assert!(
            (ours - theirs).abs() <= 1e-9 * theirs.abs().max(1.0),
            "row {row}: ours {ours}, CatBoost {theirs}"
        );
    }
    let reference = reference_walk(&model, &rows);
    assert_eq!(
        predicted.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
        reference.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
        "the fast path and the reference walk differ"
    );
    model
}

#[test]
fn float_features_with_nan_as_min() {
    let model = check(
        fixture!("float_logloss_nanmin.json"),
        fixture!("float_logloss_nanmin.csv"),
    );
    assert!(
        model
            .float_features
            .iter()
            .any(|f| f.nan_treatment == NanTreatment::AsFalse)
    );
}

#[test]
fn float_features_with_nan_as_max() {
    let model = check(
        fixture!("float_logloss_nanmax.json"),
        fixture!("float_logloss_nanmax.csv"),
    );
    assert!(
        model
            .float_features
            .iter()
            .any(|f| f.nan_treatment == NanTreatment::AsTrue)
    );
}

#[test]
fn one_hot_and_ctr_categorical_features_including_unseen_values() {
    let model = check(fixture!("cat_logloss.json"), fixture!("cat_logloss.csv"));
    assert!(!model.cat_features[0].one_hot_values.is_empty());
    assert!(model.ctrs.iter().any(|c| c.ctr_type == CtrType::Counter));
    assert!(model.ctrs.iter().any(|c| c.ctr_type == CtrType::Borders));
}

#[test]
fn ctrs_over_feature_combinations() {
    let model = check(
        fixture!("probe_cat_combo.json"),
        fixture!("probe_cat_combo.csv"),
    );
    assert!(model.ctrs.iter().any(|c| c.elements.len() > 1));
}

#[test]
fn a_yetirank_ranking_model() {
    check(
        fixture!("rank_yetirank.json"),
        fixture!("rank_yetirank.csv"),
    );
}

#[test]
fn scale_and_bias() {
    let plain = check(
        fixture!("regression_rmse.json"),
        fixture!("regression_rmse.csv"),
    );
    let scaled = check(
        fixture!("regression_scaled.json"),
        fixture!("regression_scaled.csv"),
    );
    assert_ne!(plain.bias, 0.0);
    assert_eq!(scaled.scale, 0.5);
}

#[test]
fn category_hashes_match_catboost() {
    // CatBoost lists each training value with its hash when saved with its pool; the
    // probe's values run from 0 to 200 bytes (CityHash has separate paths up to 16, 32,
    // 64 bytes and beyond) and include multi-byte UTF-8 and integers.
    let (mut checked, mut longest) = (0, 0);
    for json in [
        fixture!("probe_hash.json"),
        fixture!("cat_logloss.json"),
        fixture!("regression_rmse.json"),
    ] {
        let model: serde_json::Value = serde_json::from_str(json).unwrap();
        for pair in model["features_info"]["cat_features_hash"]
            .as_array()
            .unwrap()
        {
            let value = pair["value"].as_str().unwrap();
            let hash = pair["hash"].as_u64().unwrap();
            assert_eq!(u64::from(CatValue::new(value).0), hash, "{value:?}");
            checked += 1;
            longest = longest.max(value.len());
        }
    }
    assert!(
        checked > 150 && longest > 128,
        "{checked} values, longest {longest}"
    );
}

#[test]
fn our_json_reads_back_to_the_same_model() {
    for json in [
        fixture!("cat_logloss.json"),
        fixture!("probe_cat_combo.json"),
        fixture!("float_logloss_nanmin.json"),
    ] {
        let model = RankerModel::from_catboost_json(json).unwrap();
        let again = RankerModel::from_catboost_json(&model.to_catboost_json()).unwrap();
        assert_eq!(again, model);
    }
}

#[test]
fn the_bundle_form_reads_back_to_the_same_model_and_refuses_damage() {
    for json in [
        fixture!("cat_logloss.json"),
        fixture!("probe_cat_combo.json"),
        fixture!("float_logloss_nanmin.json"),
    ] {
        let model = RankerModel::from_catboost_json(json).unwrap();
        let bytes = model.to_bytes();
        assert_eq!(RankerModel::from_bytes(&bytes).unwrap(), model);
        assert_eq!(RankerModel::from_bundle_section(&bytes).unwrap(), model);
        // Bundles built before the binary form carry the JSON text.
        assert_eq!(
            RankerModel::from_bundle_section(json.as_bytes()).unwrap(),
            model
        );
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            let message = RankerModel::from_bundle_section(&bytes[..cut])
                .unwrap_err()
                .to_string();
            assert!(message.contains("ranker"), "cut at {cut}: {message}");
        }
        // Any single flipped byte is refused or gives a model that passed `new`'s checks
        // (the bundle's section hash is what catches damage); it never panics.
        for at in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x5a;
            if let Ok(model) = RankerModel::from_bundle_section(&damaged) {
                let rows = vec![FeatureValue::Float(0.5); model.row_width()];
                let _ = model.predict(&rows);
            }
        }
    }
    let model = RankerModel::from_catboost_json(fixture!("cat_logloss.json")).unwrap();
    let mut other_version = model.to_bytes();
    // `format_version` is the first entry: its value is the byte after the 14-byte key.
    let at = 1 + 1 + "format_version".len();
    assert_eq!(other_version[at], RANKER_FORMAT_VERSION as u8);
    other_version[at] = 9;
    assert_eq!(
        RankerModel::from_bytes(&other_version)
            .unwrap_err()
            .to_string(),
        Error::FormatVersion {
            artifact: "ranker",
            found: 9,
            expected: RANKER_FORMAT_VERSION
        }
        .to_string()
    );
}

#[test]
fn unsupported_parts_are_named() {
    let depthwise = RankerModel::from_catboost_json(fixture!("depthwise.json"))
        .unwrap_err()
        .to_string();
    assert!(depthwise.contains("`trees`"), "{depthwise}");
    let multiclass = RankerModel::from_catboost_json(fixture!("multiclass.json"))
        .unwrap_err()
        .to_string();
    assert!(
        multiclass.contains("scale_and_bias") && multiclass.contains("3 prediction dimensions"),
        "{multiclass}"
    );
    let mut mean: serde_json::Value = serde_json::from_str(fixture!("cat_logloss.json")).unwrap();
    mean["features_info"]["ctrs"][1]["ctr_type"] = "FloatTargetMeanValue".into();
    let message = RankerModel::from_catboost_json(&mean.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("features_info.ctrs[1].ctr_type")
            && message.contains("FloatTargetMeanValue"),
        "{message}"
    );
}

#[test]
fn broken_models_are_refused_with_the_part_named() {
    let good: serde_json::Value = serde_json::from_str(fixture!("cat_logloss.json")).unwrap();
    let refuse = |edit: &dyn Fn(&mut serde_json::Value), needle: &str| {
        let mut model = good.clone();
        edit(&mut model);
        let message = RankerModel::from_catboost_json(&model.to_string())
            .unwrap_err()
            .to_string();
        assert!(message.contains(needle), "{needle:?} not in {message}");
    };
    refuse(
        &|m| m["oblivious_trees"][2]["splits"][0]["split_index"] = 10_000.into(),
        "split_index 10000 is out of range",
    );
    refuse(
        &|m| {
            m["oblivious_trees"][0]["leaf_values"]
                .as_array_mut()
                .unwrap()
                .pop();
        },
        "oblivious_trees[0] has 15 leaf values",
    );
    refuse(
        &|m| {
            m["features_info"]["float_features"][0]
                .as_object_mut()
                .unwrap()
                .remove("flat_feature_index");
        },
        "float_features[0] has no flat_feature_index",
    );
    refuse(
        &|m| {
            m["ctr_data"].as_object_mut().unwrap().clear();
        },
        "ctr_data has no table",
    );
    refuse(
        &|m| m["features_info"]["float_features"][1]["borders"] = serde_json::json!([2.0, 1.0]),
        "float_features[1].borders are not strictly ascending",
    );
    let truncated = &fixture!("cat_logloss.json")[..1000];
    let message = RankerModel::from_catboost_json(truncated)
        .unwrap_err()
        .to_string();
    assert!(message.contains("CatBoost JSON model"), "{message}");
}

#[test]
fn rows_that_do_not_fit_the_model_are_refused() {
    let model = RankerModel::from_catboost_json(fixture!("cat_logloss.json")).unwrap();
    assert_eq!(model.row_width(), 5);
    let short = vec![FeatureValue::Float(0.0); 4];
    assert!(matches!(
        model.predict(&short),
        Err(Error::InvalidRankerInput { .. })
    ));
    // Column 1 is categorical.
    let swapped = vec![FeatureValue::Float(0.0); 5];
    let message = model.predict(&swapped).unwrap_err().to_string();
    assert!(message.contains("row 0, column 1"), "{message}");
    assert_eq!(model.predict(&[]).unwrap(), Vec::<f64>::new());
}

#[test]
fn deep_trees_take_the_wide_leaf_path_and_agree_with_the_walk() {
    let base = RankerModel::from_catboost_json(fixture!("cat_logloss.json")).unwrap();
    let binary = base.binary.len() as u64;
    let mut state = 7_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let trees = (0..40)
        .map(|_| ObliviousTree {
            splits: (0..10).map(|_| (next() % binary) as u32).collect(),
            leaf_values: (0..1 << 10).map(|_| next() as f64 / 1e10).collect(),
        })
        .collect();
    let deep = base.with_trees(trees).unwrap();
    assert_eq!(deep.max_depth, 10);
    let (rows, _) = rows_of(&deep, fixture!("cat_logloss.csv"));
    let fast = deep.predict(&rows).unwrap();
    let walked = reference_walk(&deep, &rows);
    assert_eq!(
        fast.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
        walked.iter().map(|p| p.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn every_depth_and_both_bin_widths_agree_with_the_walk() {
    let base = RankerModel::from_catboost_json(fixture!("cat_logloss.json")).unwrap();
    // A float feature with more than 255 borders forces the u16 bins.
    let mut wide_features = base.float_features.clone();
    let last = *wide_features[0].borders.last().unwrap();
    wide_features[0]
        .borders
        .extend((1..=300).map(|k| last + k as f32));
    let wide = RankerModel::new(
        wide_features,
        base.cat_features.clone(),
        base.ctrs.clone(),
        base.ctr_tables.clone(),
        Vec::new(),
        base.scale,
        base.bias,
    )
    .unwrap();
    assert!(base.narrow_bins && !wide.narrow_bins);
    // The deepest tree sets the evaluator's leaf table width (2^8, 2^6, 2^3).
    for (model, max_depth) in [base, wide]
        .into_iter()
        .flat_map(|m| [8, 6, 3].map(|d| (m.clone(), d)))
    {
        let binary = model.binary.len() as u64;
        let mut state = 11_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        // Depths 0 to `max_depth`, in a mixed order, with a partial block of trees at the end.
        let trees = (0..18)
            .map(|t| {
                let depth = (t * 5) % (max_depth + 1);
                ObliviousTree {
                    splits: (0..depth).map(|_| (next() % binary) as u32).collect(),
                    leaf_values: (0..1 << depth).map(|_| next() as f64 / 1e10).collect(),
                }
            })
            .collect();
        let model = model.with_trees(trees).unwrap();
        let (rows, _) = rows_of(&model, fixture!("cat_logloss.csv"));
        let fast = model.predict(&rows).unwrap();
        let walked = reference_walk(&model, &rows);
        assert_eq!(
            fast.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
            walked.iter().map(|p| p.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn interleaved_border_counts_equal_partition_point() {
    let probes = [
        f32::NAN,
        f32::NEG_INFINITY,
        f32::INFINITY,
        -2.0,
        -1.0,
        -0.5,
        0.0,
        0.25,
        1.0,
        1.5,
        7.0,
    ];
    for length in 0..20 {
        let borders: Vec<f32> = (0..length).map(|k| k as f32 * 0.5 - 1.0).collect();
        // Every count of values, so that full and short lane chunks are both covered.
        for count in 0..=probes.len() * 2 {
            let values: Vec<f32> = (0..count).map(|i| probes[i % probes.len()]).collect();
            let mut bins = vec![u16::MAX; count];
            count_borders_below(&borders, &values, &mut bins);
            let expected: Vec<u16> = values
                .iter()
                .map(|&x| borders.partition_point(|&b| x > b) as u16)
                .collect();
            assert_eq!(bins, expected, "{length} borders, {count} values");
        }
    }
}
