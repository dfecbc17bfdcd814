//! CatBoost's JSON model format (what `model.save_model(path, format="json")` writes),
//! read into and written from [`RankerModel`].
//!
//! Facts the format does not state (checked against catboost 1.2.10, see `tests.rs`):
//! splits are applied by `split_index` alone (into the binary features in the order the
//! module docs give; an `OnlineCtr` split does not even say which CTR it uses); every
//! `ctr_data` table holds a spurious entry under key u64::MAX that the exporter leaks and
//! readers skip; `prior_denomerator` is spelled so.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    CatFeature, Ctr, CtrElement, CtrTable, CtrType, FloatFeature, NanTreatment, ObliviousTree,
    RankerModel, invalid,
};
use crate::Error;

#[derive(Deserialize)]
struct Model {
    features_info: FeaturesInfo,
    oblivious_trees: Option<Vec<Tree>>,
    trees: Option<Value>,
    scale_and_bias: Option<(f64, Vec<f64>)>,
    #[serde(default)]
    ctr_data: BTreeMap<String, Table>,
}

#[derive(Deserialize)]
struct FeaturesInfo {
    #[serde(default)]
    float_features: Vec<Float>,
    #[serde(default)]
    categorical_features: Vec<Categorical>,
    #[serde(default)]
    ctrs: Vec<JsonCtr>,
    text_features: Option<Value>,
    embedding_features: Option<Value>,
}

#[derive(Deserialize)]
struct Float {
    #[serde(default)]
    borders: Vec<f64>,
    #[serde(default)]
    feature_id: String,
    feature_index: usize,
    flat_feature_index: Option<usize>,
    #[serde(default)]
    has_nans: bool,
    nan_value_treatment: Option<String>,
}

#[derive(Deserialize)]
struct Categorical {
    #[serde(default)]
    feature_id: String,
    feature_index: usize,
    flat_feature_index: Option<usize>,
    #[serde(default)]
    values: Vec<i64>,
    string_values: Option<Value>,
}

#[derive(Deserialize)]
struct JsonCtr {
    #[serde(default)]
    borders: Vec<f64>,
    ctr_type: String,
    elements: Vec<Element>,
    identifier: String,
    prior_numerator: f64,
    prior_denomerator: f64,
    scale: f64,
    shift: f64,
    target_border_idx: usize,
}

#[derive(Deserialize)]
struct Element {
    combination_element: String,
    cat_feature_index: Option<usize>,
    float_feature_index: Option<usize>,
    border: Option<f64>,
    value: Option<i64>,
}

#[derive(Deserialize)]
struct Tree {
    leaf_values: Vec<f64>,
    splits: Option<Vec<Split>>,
}

#[derive(Deserialize)]
struct Split {
    split_index: u32,
}

#[derive(Deserialize)]
struct Table {
    #[serde(default)]
    counter_denominator: u64,
    hash_stride: usize,
    hash_map: Vec<Value>,
}

/// The key CatBoost's exporter leaks into every table (its hash map's empty marker).
const LEAKED_KEY: u64 = u64::MAX;

fn unsupported(part: &str, why: &str) -> Error {
    invalid(format!("unsupported model part `{part}`: {why}"))
}

fn f32_of(value: f64, part: &str) -> Result<f32, Error> {
    if value.is_nan() {
        return Err(invalid(format!("{part} is NaN")));
    }
    Ok(value as f32)
}

fn i32_of(value: i64, part: &str) -> Result<i32, Error> {
    i32::try_from(value)
        .map_err(|_| invalid(format!("{part} = {value} is not a 32-bit category hash")))
}

impl RankerModel {
    /// Reads a model in CatBoost's JSON format. Parts this evaluator cannot apply exactly
    /// (non-symmetric trees, several prediction dimensions, text or embedding features,
    /// mean-value CTRs) are refused with a message naming the part.
    pub fn from_catboost_json(text: &str) -> Result<Self, Error> {
        let model: Model = serde_json::from_str(text).map_err(|e| Error::Decode {
            artifact: "CatBoost JSON model",
            message: e.to_string(),
        })?;
        if model.trees.is_some() {
            return Err(unsupported(
                "trees",
                "non-symmetric trees (grow_policy Depthwise or Lossguide); train with the default SymmetricTree",
            ));
        }
        let info = model.features_info;
        for (part, value) in [
            ("features_info.text_features", &info.text_features),
            ("features_info.embedding_features", &info.embedding_features),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(unsupported(part, "text and embedding features"));
            }
        }

        let mut float_features = Vec::with_capacity(info.float_features.len());
        for (position, f) in info.float_features.into_iter().enumerate() {
            let part = format!("features_info.float_features[{position}]");
            if f.feature_index != position {
                return Err(invalid(format!(
                    "{part}.feature_index is {}, expected {position}",
                    f.feature_index
                )));
            }
            let flat_index = f
                .flat_feature_index
                .ok_or_else(|| invalid(format!("{part} has no flat_feature_index")))?;
            let nan_treatment = match f.nan_value_treatment.as_deref() {
                Some("AsIs") => NanTreatment::AsIs,
                Some("AsFalse") => NanTreatment::AsFalse,
                Some("AsTrue") => NanTreatment::AsTrue,
                Some(other) => {
                    return Err(unsupported(
                        &format!("{part}.nan_value_treatment"),
                        &format!("value {other:?}"),
                    ));
                }
                None => return Err(invalid(format!("{part} has no nan_value_treatment"))),
            };
            let borders = f
                .borders
                .iter()
                .enumerate()
                .map(|(i, &b)| f32_of(b, &format!("{part}.borders[{i}]")))
                .collect::<Result<_, _>>()?;
            float_features.push(FloatFeature {
                flat_index,
                borders,
                has_nans: f.has_nans,
                nan_treatment,
                name: f.feature_id,
            });
        }

        let mut cat_features = Vec::with_capacity(info.categorical_features.len());
        for (position, c) in info.categorical_features.into_iter().enumerate() {
            let part = format!("features_info.categorical_features[{position}]");
            if c.feature_index != position {
                return Err(invalid(format!(
                    "{part}.feature_index is {}, expected {position}",
                    c.feature_index
                )));
            }
            if c.string_values.is_some() {
                return Err(unsupported(
                    &format!("{part}.string_values"),
                    "one-hot splits on raw strings",
                ));
            }
            let flat_index = c
                .flat_feature_index
                .ok_or_else(|| invalid(format!("{part} has no flat_feature_index")))?;
            let one_hot_values = c
                .values
                .iter()
                .enumerate()
                .map(|(i, &v)| i32_of(v, &format!("{part}.values[{i}]")))
                .collect::<Result<_, _>>()?;
            cat_features.push(CatFeature {
                flat_index,
                one_hot_values,
                name: c.feature_id,
            });
        }

        let mut ctr_tables: Vec<CtrTable> = Vec::new();
        let mut table_of: BTreeMap<String, usize> = BTreeMap::new();
        let mut ctrs = Vec::with_capacity(info.ctrs.len());
        for (position, c) in info.ctrs.into_iter().enumerate() {
            let part = format!("features_info.ctrs[{position}]");
            let ctr_type = match c.ctr_type.as_str() {
                "Borders" => CtrType::Borders,
                "Buckets" => CtrType::Buckets,
                "Counter" => CtrType::Counter,
                "FeatureFreq" => CtrType::FeatureFreq,
                other => {
                    return Err(unsupported(
                        &format!("{part}.ctr_type"),
                        &format!(
                            "CTR type {other:?} (supported: Borders, Buckets, Counter, FeatureFreq)"
                        ),
                    ));
                }
            };
            let elements = c
                .elements
                .iter()
                .enumerate()
                .map(|(i, e)| element(e, &format!("{part}.elements[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let table = match table_of.get(&c.identifier) {
                Some(&index) => index,
                None => {
                    let raw = model.ctr_data.get(&c.identifier).ok_or_else(|| {
                        invalid(format!("{part}: ctr_data has no table {:?}", c.identifier))
                    })?;
                    ctr_tables.push(table(raw, &c.identifier)?);
                    table_of.insert(c.identifier.clone(), ctr_tables.len() - 1);
                    ctr_tables.len() - 1
                }
            };
            let borders = c
                .borders
                .iter()
                .enumerate()
                .map(|(i, &b)| f32_of(b, &format!("{part}.borders[{i}]")))
                .collect::<Result<_, _>>()?;
            ctrs.push(Ctr {
                elements,
                ctr_type,
                prior_numerator: f32_of(c.prior_numerator, &format!("{part}.prior_numerator"))?,
                prior_denominator: f32_of(
                    c.prior_denomerator,
                    &format!("{part}.prior_denomerator"),
                )?,
                scale: f32_of(c.scale, &format!("{part}.scale"))?,
                shift: f32_of(c.shift, &format!("{part}.shift"))?,
                target_border_index: c.target_border_idx,
                borders,
                table,
            });
        }

        let trees = model
            .oblivious_trees
            .ok_or_else(|| invalid("the model has no oblivious_trees"))?
            .into_iter()
            .map(|tree| ObliviousTree {
                splits: tree
                    .splits
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.split_index)
                    .collect(),
                leaf_values: tree.leaf_values,
            })
            .collect();
        let (scale, bias) = match model.scale_and_bias {
            None => (1.0, 0.0),
            Some((scale, bias)) if bias.len() == 1 => (scale, bias[0]),
            Some((_, bias)) => {
                return Err(unsupported(
                    "scale_and_bias",
                    &format!(
                        "{} prediction dimensions (multi-class or multi-target); a ranker predicts one score",
                        bias.len()
                    ),
                ));
            }
        };
        RankerModel::new(
            float_features,
            cat_features,
            ctrs,
            ctr_tables,
            trees,
            scale,
            bias,
        )
    }

    /// The model in CatBoost's JSON format, loadable by `CatBoost().load_model(path,
    /// format="json")`.
    pub fn to_catboost_json(&self) -> String {
        let float_features: Vec<Value> = self
            .float_features
            .iter()
            .enumerate()
            .map(|(index, f)| {
                json!({
                    "borders": f.borders.iter().map(|&b| f64::from(b)).collect::<Vec<_>>(),
                    "feature_id": f.name,
                    "feature_index": index,
                    "flat_feature_index": f.flat_index,
                    "has_nans": f.has_nans,
                    "nan_value_treatment": match f.nan_treatment {
                        NanTreatment::AsIs => "AsIs",
                        NanTreatment::AsFalse => "AsFalse",
                        NanTreatment::AsTrue => "AsTrue",
                    },
                })
            })
            .collect();
        let categorical_features: Vec<Value> = self
            .cat_features
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let mut feature = json!({
                    "feature_id": c.name,
                    "feature_index": index,
                    "flat_feature_index": c.flat_index,
                });
                if !c.one_hot_values.is_empty() {
                    feature["values"] = json!(c.one_hot_values);
                }
                feature
            })
            .collect();
        let ctrs: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                json!({
                    "borders": c.borders.iter().map(|&b| f64::from(b)).collect::<Vec<_>>(),
                    "ctr_type": c.ctr_type.name(),
                    "elements": c.elements.iter().map(element_json).collect::<Vec<_>>(),
                    "identifier": self.ctr_tables[c.table].identifier,
                    "prior_denomerator": f64::from(c.prior_denominator),
                    "prior_numerator": f64::from(c.prior_numerator),
                    "scale": f64::from(c.scale),
                    "shift": f64::from(c.shift),
                    "target_border_idx": c.target_border_index,
                })
            })
            .collect();
        let ctr_data: serde_json::Map<String, Value> = self
            .ctr_tables
            .iter()
            .map(|t| {
                let mut hash_map = Vec::with_capacity(t.counts.len() * (t.width + 1));
                for (key, counts) in &t.counts {
                    hash_map.push(json!(key.to_string()));
                    hash_map.extend(counts.iter().map(|&c| json!(c)));
                }
                (
                    t.identifier.clone(),
                    json!({
                        "counter_denominator": t.counter_denominator,
                        "hash_map": hash_map,
                        "hash_stride": t.width + 1,
                    }),
                )
            })
            .collect();
        let trees: Vec<Value> = self
            .trees
            .iter()
            .map(|tree| {
                let splits: Vec<Value> = tree
                    .splits
                    .iter()
                    .map(|&index| self.split_json(index))
                    .collect();
                json!({
                    "leaf_values": tree.leaf_values,
                    "splits": if splits.is_empty() { Value::Null } else { Value::Array(splits) },
                })
            })
            .collect();
        let mut model = json!({
            "features_info": {
                "float_features": float_features,
                "categorical_features": categorical_features,
                "ctrs": ctrs,
            },
            "model_info": {},
            "oblivious_trees": trees,
            "scale_and_bias": [self.scale, [self.bias]],
        });
        if !ctr_data.is_empty() {
            model["ctr_data"] = Value::Object(ctr_data);
        }
        model.to_string()
    }

    fn split_json(&self, index: u32) -> Value {
        match self.binary[index as usize] {
            super::BinaryFeature::Float { feature, border } => json!({
                "border": f64::from(border),
                "float_feature_index": feature,
                "split_index": index,
                "split_type": "FloatFeature",
            }),
            super::BinaryFeature::OneHot { feature, value } => json!({
                "cat_feature_index": feature,
                "split_index": index,
                "split_type": "OneHotFeature",
                "value": value,
            }),
            super::BinaryFeature::Ctr { ctr, border } => json!({
                "border": f64::from(border),
                "ctr_target_border_idx": self.ctrs[ctr].target_border_index,
                "split_index": index,
                "split_type": "OnlineCtr",
            }),
        }
    }
}

/// CatBoost's identifier of the table of a CTR over `elements` of `ctr_type`: the key of
/// `ctr_data` and of the CTR's `identifier`.
pub fn ctr_identifier(elements: &[CtrElement], ctr_type: CtrType) -> String {
    // serde_json's maps keep keys sorted, as CatBoost writes them.
    json!({
        "identifier": elements.iter().map(element_json).collect::<Vec<_>>(),
        "type": ctr_type.name(),
    })
    .to_string()
}

fn element_json(element: &CtrElement) -> Value {
    match *element {
        CtrElement::CatValue { cat_feature } => json!({
            "cat_feature_index": cat_feature,
            "combination_element": "cat_feature_value",
        }),
        CtrElement::FloatSplit {
            float_feature,
            border,
        } => json!({
            "border": f64::from(border),
            "combination_element": "float_feature",
            "float_feature_index": float_feature,
        }),
        CtrElement::CatEquals { cat_feature, value } => json!({
            "cat_feature_index": cat_feature,
            "combination_element": "cat_feature_exact_value",
            "value": value,
        }),
    }
}

fn element(e: &Element, part: &str) -> Result<CtrElement, Error> {
    let missing = |field: &str| invalid(format!("{part} has no {field}"));
    match e.combination_element.as_str() {
        "cat_feature_value" => Ok(CtrElement::CatValue {
            cat_feature: e
                .cat_feature_index
                .ok_or_else(|| missing("cat_feature_index"))?,
        }),
        "float_feature" => Ok(CtrElement::FloatSplit {
            float_feature: e
                .float_feature_index
                .ok_or_else(|| missing("float_feature_index"))?,
            border: f32_of(
                e.border.ok_or_else(|| missing("border"))?,
                &format!("{part}.border"),
            )?,
        }),
        "cat_feature_exact_value" => Ok(CtrElement::CatEquals {
            cat_feature: e
                .cat_feature_index
                .ok_or_else(|| missing("cat_feature_index"))?,
            value: i32_of(
                e.value.ok_or_else(|| missing("value"))?,
                &format!("{part}.value"),
            )?,
        }),
        other => Err(unsupported(
            &format!("{part}.combination_element"),
            &format!("{other:?}"),
        )),
    }
}

fn table(raw: &Table, identifier: &str) -> Result<CtrTable, Error> {
    let part = format!("ctr_data[{identifier:?}]");
    if raw.hash_stride < 2 || !raw.hash_map.len().is_multiple_of(raw.hash_stride) {
        return Err(invalid(format!(
            "{part}: hash_map of {} items does not divide into entries of hash_stride {}",
            raw.hash_map.len(),
            raw.hash_stride
        )));
    }
    let mut counts = BTreeMap::new();
    for (entry, chunk) in raw.hash_map.chunks_exact(raw.hash_stride).enumerate() {
        let key = match &chunk[0] {
            Value::String(text) => text.parse::<u64>().ok(),
            Value::Number(number) => number.as_u64(),
            _ => None,
        }
        .ok_or_else(|| invalid(format!("{part}: entry {entry} has no u64 key")))?;
        let values = chunk[1..]
            .iter()
            .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                invalid(format!(
                    "{part}: entry {entry} has a count that is not a 32-bit unsigned integer"
                ))
            })?;
        if key != LEAKED_KEY {
            counts.insert(key, values);
        }
    }
    Ok(CtrTable {
        identifier: identifier.to_owned(),
        counter_denominator: u32::try_from(raw.counter_denominator).map_err(|_| {
            invalid(format!(
                "{part}: counter_denominator {} is out of range",
                raw.counter_denominator
            ))
        })?,
        counts,
        width: raw.hash_stride - 1,
    })
}
