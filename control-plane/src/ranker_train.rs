//! Gradient boosting of oblivious trees as CatBoost does it, producing an
//! `edge::ranker::RankerModel` (and so CatBoost's JSON format).
//!
//! - Float columns are quantized on the training rows into at most `border_count`
//!   borders (midpoints between quantiles of the distinct values); a column with NaN
//!   gets CatBoost's extra border at -FLT_MAX and `nan_mode` Min (NaN below everything).
//! - Categorical columns with at most `one_hot_max_size` distinct training values are
//!   one-hot; the others become two CTRs: `Borders` (share of positives, prior 0.5) and
//!   `Counter` (frequency). While training, a row's `Borders` CTR counts only the rows
//!   before it in a seeded random permutation (CatBoost's ordered target statistics), so
//!   its own label never leaks into its feature; the model keeps the counts of all rows,
//!   which is what serving sees.
//! - Each tree is grown level by level with one split per level (oblivious), chosen by
//!   the Newton gain `sum over leaves of G^2 / (H + l2_leaf_reg)` from per-leaf
//!   histograms of gradients and hessians; leaves take the Newton step times the
//!   learning rate.
//! - Losses: `Logloss` (labels 0/1) and `PairLogit` (pairs of a group's rows with
//!   different labels, the higher label preferred).
//! - Early stopping on the validation loss, keeping the best iteration's trees.

use std::collections::BTreeMap;
use std::time::Instant;

use edge::ranker::features::ColumnKind;
use edge::ranker::{
    CatFeature, CatValue, Ctr, CtrElement, CtrTable, CtrType, FeatureValue, FloatFeature,
    NanTreatment, ObliviousTree, RankerModel, cat_ctr_key, ctr_identifier,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::config::RankerConfig;

/// Rows for training or validation: row-major features of the given columns, a label per
/// row, and a group (request) id per row; a group's rows are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct RankerRows<'a> {
    /// The kind of each column.
    pub columns: &'a [ColumnKind],
    /// The column names (written into the model).
    pub names: &'a [&'a str],
    /// `labels.len() * columns.len()` values.
    pub values: &'a [FeatureValue],
    /// 1 for a positive, 0 for a negative (PairLogit: any relevance, higher is better).
    pub labels: &'a [f32],
    /// The request each row belongs to.
    pub groups: &'a [u32],
}

/// Why training could not run.
#[derive(Debug, thiserror::Error)]
pub enum RankerTrainError {
    /// The rows are inconsistent.
    #[error("ranker rows: {0}")]
    Rows(String),
    /// The configuration names something this trainer does not do.
    #[error("ranker config: {0}")]
    Config(String),
    /// The trained model was refused by the evaluator (a bug).
    #[error(transparent)]
    Model(#[from] edge::Error),
}

/// What a training run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RankerReport {
    /// Trees grown.
    pub iterations: usize,
    /// Trees kept (the best validation loss), or all without validation rows.
    pub kept: usize,
    /// The validation loss of the kept trees.
    pub best_validation_loss: Option<f64>,
    /// Wall time.
    pub seconds: f64,
    /// Binary features the trees chose from.
    pub binary_features: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Loss {
    Logloss,
    PairLogit,
}

/// One quantized feature the trees can split on: a bin per row; a split on border `k`
/// sends rows with `bin > k` right. `binary_offset` is the index of its first border in
/// the model's binary feature list.
struct SplitFeature {
    bins: Vec<u8>,
    borders: usize,
    binary_offset: usize,
}

/// How a categorical column is used.
enum CatUse {
    OneHot(Vec<i32>),
    Ctrs {
        borders_ctr: usize,
        counter_ctr: usize,
    },
}

/// The Borders CTR's prior and the CTRs' scale, CatBoost's defaults.
const CTR_PRIOR: f32 = 0.5;
const CTR_SCALE: f32 = 15.0;
/// CTR values are quantized uniformly over [0, CTR_SCALE] into this many borders.
const CTR_BORDERS: usize = 15;

fn check(rows: &RankerRows<'_>, name: &str) -> Result<usize, RankerTrainError> {
    let width = rows.columns.len();
    let n = rows.labels.len();
    if width == 0 || rows.values.len() != n * width || rows.groups.len() != n {
        return Err(RankerTrainError::Rows(format!(
            "{name}: {} values, {n} labels and {} groups for {width} columns",
            rows.values.len(),
            rows.groups.len()
        )));
    }
    if rows.names.len() != width {
        return Err(RankerTrainError::Rows(format!(
            "{name}: {} names for {width} columns",
            rows.names.len()
        )));
    }
    for (row, values) in rows.values.chunks_exact(width).enumerate() {
        for (column, (value, kind)) in values.iter().zip(rows.columns).enumerate() {
            let fits = matches!(
                (value, kind),
                (FeatureValue::Float(_), ColumnKind::Float)
                    | (FeatureValue::Cat(_), ColumnKind::Categorical)
            );
            if !fits {
                return Err(RankerTrainError::Rows(format!(
                    "{name}: row {row}, column {column} ({}) is not {kind:?}",
                    rows.names[column]
                )));
            }
        }
    }
    if let Some(row) = rows.labels.iter().position(|l| !l.is_finite()) {
        return Err(RankerTrainError::Rows(format!(
            "{name}: row {row} has label {}",
            rows.labels[row]
        )));
    }
    Ok(n)
}

fn float_of(value: FeatureValue) -> f32 {
    match value {
        FeatureValue::Float(x) => x,
        FeatureValue::Cat(_) => f32::NAN,
    }
}

fn cat_of(value: FeatureValue) -> CatValue {
    match value {
        FeatureValue::Cat(c) => c,
        FeatureValue::Float(_) => CatValue(0),
    }
}

/// Up to `count` borders between the distinct values, at quantiles of the values.
fn quantile_borders(mut values: Vec<f32>, count: usize) -> Vec<f32> {
    values.sort_by(f32::total_cmp);
    let mut distinct = values.clone();
    distinct.dedup();
    if distinct.len() <= 1 {
        return Vec::new();
    }
    let mut borders: Vec<f32> = if distinct.len() <= count + 1 {
        distinct
            .windows(2)
            .map(|w| w[0] + (w[1] - w[0]) / 2.0)
            .collect()
    } else {
        (1..=count)
            .filter_map(|k| {
                let at = k * values.len() / (count + 1);
                let low = values[at.saturating_sub(1)];
                let high = values[at];
                // Between two distinct values, else no border here.
                (high > low).then(|| low + (high - low) / 2.0)
            })
            .collect()
    };
    borders.sort_by(f32::total_cmp);
    borders.dedup();
    borders
}

fn bin_of(x: f32, borders: &[f32]) -> u8 {
    // The number of borders below x: `x > border` for each, NaN below all (nan_mode Min).
    borders.partition_point(|&b| x > b) as u8
}

/// Trains on `train`, stopping early on `validation`'s loss; `progress` gets the
/// iteration and the validation loss (if any) every few iterations.
pub fn train_ranker(
    train: &RankerRows<'_>,
    validation: Option<&RankerRows<'_>>,
    config: &RankerConfig,
    mut progress: impl FnMut(usize, Option<f64>),
) -> Result<(RankerModel, RankerReport), RankerTrainError> {
    let started = Instant::now();
    let loss = match config.loss.as_str() {
        "Logloss" => Loss::Logloss,
        "PairLogit" => Loss::PairLogit,
        other => {
            return Err(RankerTrainError::Config(format!(
                "loss {other:?} is not trained here (Logloss or PairLogit)"
            )));
        }
    };
    let n = check(train, "train")?;
    if n == 0 {
        return Err(RankerTrainError::Rows("train: no rows".into()));
    }
    if let Some(v) = validation {
        check(v, "validation")?;
        if v.columns != train.columns {
            return Err(RankerTrainError::Rows(
                "validation rows have other columns than train rows".into(),
            ));
        }
    }
    let width = train.columns.len();
    let positive = |label: f32| label > 0.5;

    // Quantization and categorical handling, decided on train.
    let mut float_features = Vec::new();
    let mut cat_features = Vec::new();
    let mut float_column_of = Vec::new();
    let mut cat_column_of = Vec::new();
    for (column, kind) in train.columns.iter().enumerate() {
        let values = train.values.iter().skip(column).step_by(width).copied();
        match kind {
            ColumnKind::Float => {
                let xs: Vec<f32> = values.map(float_of).collect();
                let has_nans = xs.iter().any(|x| x.is_nan());
                let mut borders = quantile_borders(
                    xs.into_iter().filter(|x| !x.is_nan()).collect(),
                    config.border_count,
                );
                if has_nans {
                    borders.insert(0, f32::MIN);
                    borders.truncate(config.border_count.max(1));
                }
                float_features.push(FloatFeature {
                    flat_index: column,
                    borders,
                    has_nans,
                    nan_treatment: if has_nans {
                        NanTreatment::AsFalse
                    } else {
                        NanTreatment::AsIs
                    },
                    name: train.names[column].to_owned(),
                });
                float_column_of.push(column);
            }
            ColumnKind::Categorical => {
                cat_features.push(CatFeature {
                    flat_index: column,
                    one_hot_values: Vec::new(),
                    name: train.names[column].to_owned(),
                });
                cat_column_of.push(column);
            }
        }
    }
    let mut cat_uses = Vec::with_capacity(cat_features.len());
    let mut ctrs: Vec<Ctr> = Vec::new();
    let mut tables: Vec<CtrTable> = Vec::new();
    for (index, &column) in cat_column_of.iter().enumerate() {
        let mut counts: BTreeMap<i32, [u32; 2]> = BTreeMap::new();
        for (row, label) in train.labels.iter().enumerate() {
            let hash = cat_of(train.values[row * width + column]).as_i32();
            counts.entry(hash).or_default()[usize::from(positive(*label))] += 1;
        }
        if counts.len() <= config.one_hot_max_size {
            let values: Vec<i32> = counts.keys().copied().collect();
            cat_features[index].one_hot_values = values.clone();
            cat_uses.push(CatUse::OneHot(values));
            continue;
        }
        let elements = vec![CtrElement::CatValue { cat_feature: index }];
        let key = |hash: i32| cat_ctr_key(&[CatValue(hash as u32)]);
        let ctr_borders: Vec<f32> = (1..=CTR_BORDERS)
            .map(|k| k as f32 * CTR_SCALE / (CTR_BORDERS + 1) as f32)
            .collect();
        tables.push(CtrTable {
            identifier: ctr_identifier(&elements, CtrType::Borders),
            counter_denominator: 0,
            counts: counts
                .iter()
                .map(|(&hash, c)| (key(hash), c.to_vec()))
                .collect(),
            width: 2,
        });
        ctrs.push(Ctr {
            elements: elements.clone(),
            ctr_type: CtrType::Borders,
            prior_numerator: CTR_PRIOR,
            prior_denominator: 1.0,
            scale: CTR_SCALE,
            shift: 0.0,
            target_border_index: 0,
            borders: ctr_borders.clone(),
            table: tables.len() - 1,
        });
        let borders_ctr = ctrs.len() - 1;
        let totals: BTreeMap<u64, Vec<u32>> = counts
            .iter()
            .map(|(&hash, c)| (key(hash), vec![c[0] + c[1]]))
            .collect();
        tables.push(CtrTable {
            identifier: ctr_identifier(&elements, CtrType::Counter),
            counter_denominator: totals.values().map(|c| c[0]).max().unwrap_or(1),
            counts: totals,
            width: 1,
        });
        ctrs.push(Ctr {
            elements,
            ctr_type: CtrType::Counter,
            prior_numerator: 0.0,
            prior_denominator: 1.0,
            scale: CTR_SCALE,
            shift: 0.0,
            target_border_index: 0,
            borders: ctr_borders,
            table: tables.len() - 1,
        });
        cat_uses.push(CatUse::Ctrs {
            borders_ctr,
            counter_ctr: ctrs.len() - 1,
        });
    }

    // The split features in the model's binary feature order: float borders, one-hot
    // values, CTR borders.
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut features: Vec<SplitFeature> = Vec::new();
    let mut offset = 0;
    for (feature, &column) in float_features.iter().zip(&float_column_of) {
        let bins = (0..n)
            .map(|row| {
                bin_of(
                    float_of(train.values[row * width + column]),
                    &feature.borders,
                )
            })
            .collect();
        features.push(SplitFeature {
            bins,
            borders: feature.borders.len(),
            binary_offset: offset,
        });
        offset += feature.borders.len();
    }
    for (uses, &column) in cat_uses.iter().zip(&cat_column_of) {
        if let CatUse::OneHot(values) = uses {
            for &value in values {
                let bins = (0..n)
                    .map(|row| {
                        u8::from(cat_of(train.values[row * width + column]).as_i32() == value)
                    })
                    .collect();
                features.push(SplitFeature {
                    bins,
                    borders: 1,
                    binary_offset: offset,
                });
                offset += 1;
            }
        }
    }
    // Ordered statistics: each row's Borders CTR from the rows before it in a permutation.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let mut ctr_bins: Vec<Vec<u8>> = vec![vec![0; n]; ctrs.len()];
    for (uses, &column) in cat_uses.iter().zip(&cat_column_of) {
        let CatUse::Ctrs {
            borders_ctr,
            counter_ctr,
        } = *uses
        else {
            continue;
        };
        let mut seen: BTreeMap<i32, [u32; 2]> = BTreeMap::new();
        let counter = &ctrs[counter_ctr];
        let counter_table = &tables[counter.table];
        for &row in &order {
            let hash = cat_of(train.values[row * width + column]).as_i32();
            let before = seen.entry(hash).or_default();
            let share = (before[1] as f32 + CTR_PRIOR) / ((before[0] + before[1]) as f32 + 1.0);
            ctr_bins[borders_ctr][row] = bin_of(share * CTR_SCALE, &ctrs[borders_ctr].borders);
            before[usize::from(positive(train.labels[row]))] += 1;
            // The counter uses no label: every row's count, as serving sees it.
            let count = counter_table
                .counts
                .get(&cat_ctr_key(&[CatValue(hash as u32)]))
                .map_or(0, |c| c[0]);
            let frequency = count as f32 / counter_table.counter_denominator as f32;
            ctr_bins[counter_ctr][row] = bin_of(frequency * CTR_SCALE, &counter.borders);
        }
    }
    for (ctr, bins) in ctrs.iter().zip(ctr_bins) {
        features.push(SplitFeature {
            bins,
            borders: ctr.borders.len(),
            binary_offset: offset,
        });
        offset += ctr.borders.len();
    }
    let binary_features = offset;

    // The model's own binarization of the validation rows, as serving will see them.
    let mut model = RankerModel::new(
        float_features,
        cat_features,
        ctrs,
        tables,
        Vec::new(),
        1.0,
        0.0,
    )?;
    let validation_bits = validation
        .map(|v| model.binary_features(v.values))
        .transpose()?;

    let depth = config.depth;
    let lambda = config.l2_leaf_reg;
    let mut approx = vec![0.0_f64; n];
    let mut validation_approx = validation.map(|v| vec![0.0_f64; v.labels.len()]);
    let mut gradients = vec![0.0_f64; n];
    let mut hessians = vec![0.0_f64; n];
    let mut leaf_of = vec![0u32; n];
    let mut trees: Vec<ObliviousTree> = Vec::new();
    let (mut best_loss, mut best_kept) = (f64::INFINITY, 0);
    for iteration in 1..=config.iterations {
        derivatives(
            loss,
            &approx,
            train.labels,
            train.groups,
            &mut gradients,
            &mut hessians,
        );
        leaf_of.fill(0);
        let mut splits = Vec::with_capacity(depth);
        for level in 0..depth {
            let leaves = 1usize << level;
            let mut best: Option<(f64, usize, usize)> = None;
            for (index, feature) in features.iter().enumerate() {
                let bins = feature.borders + 1;
                let mut g = vec![0.0_f64; leaves * bins];
                let mut h = vec![0.0_f64; leaves * bins];
                for row in 0..n {
                    let at = leaf_of[row] as usize * bins + feature.bins[row] as usize;
                    g[at] += gradients[row];
                    h[at] += hessians[row];
                }
                // For each border: right = bins above it. Prefix sums per leaf.
                let mut scores = vec![0.0_f64; feature.borders];
                for leaf in 0..leaves {
                    let (lg, lh) = (
                        &g[leaf * bins..(leaf + 1) * bins],
                        &h[leaf * bins..(leaf + 1) * bins],
                    );
                    let (total_g, total_h): (f64, f64) = (lg.iter().sum(), lh.iter().sum());
                    let (mut left_g, mut left_h) = (0.0, 0.0);
                    for (border, score) in scores.iter_mut().enumerate() {
                        left_g += lg[border];
                        left_h += lh[border];
                        let (right_g, right_h) = (total_g - left_g, total_h - left_h);
                        *score += left_g * left_g / (left_h + lambda)
                            + right_g * right_g / (right_h + lambda);
                    }
                }
                for (border, &score) in scores.iter().enumerate() {
                    let binary = feature.binary_offset + border;
                    if splits.iter().any(|&(_, _, b)| b == binary) {
                        continue;
                    }
                    if best.is_none_or(|(s, _, _)| score > s + 1e-12) {
                        best = Some((score, index, border));
                    }
                }
            }
            let Some((_, index, border)) = best else {
                break;
            };
            let feature = &features[index];
            for (leaf, &bin) in leaf_of.iter_mut().zip(&feature.bins) {
                *leaf |= u32::from(bin as usize > border) << level;
            }
            splits.push((index, border, feature.binary_offset + border));
        }
        // Newton step per leaf, shrunk by the learning rate.
        let leaves = 1usize << splits.len();
        let (mut g, mut h) = (vec![0.0_f64; leaves], vec![0.0_f64; leaves]);
        for row in 0..n {
            g[leaf_of[row] as usize] += gradients[row];
            h[leaf_of[row] as usize] += hessians[row];
        }
        let leaf_values: Vec<f64> = g
            .iter()
            .zip(&h)
            .map(|(g, h)| config.learning_rate * g / (h + lambda))
            .collect();
        for (value, &leaf) in approx.iter_mut().zip(&leaf_of) {
            *value += leaf_values[leaf as usize];
        }
        let tree = ObliviousTree {
            splits: splits.iter().map(|&(_, _, b)| b as u32).collect(),
            leaf_values,
        };
        let mut validation_loss = None;
        if let (Some(v), Some(bits), Some(approx)) =
            (validation, &validation_bits, validation_approx.as_mut())
        {
            let rows = v.labels.len();
            for (row, value) in approx.iter_mut().enumerate() {
                let mut leaf = 0;
                for (level, &split) in tree.splits.iter().enumerate() {
                    leaf |= usize::from(bits[split as usize * rows + row]) << level;
                }
                *value += tree.leaf_values[leaf];
            }
            let value = loss_value(loss, approx, v.labels, v.groups);
            validation_loss = Some(value);
            if value < best_loss - 1e-12 {
                best_loss = value;
                best_kept = iteration;
            }
        }
        trees.push(tree);
        if iteration % 10 == 0 || iteration == config.iterations {
            progress(iteration, validation_loss);
        }
        if validation.is_some() && iteration - best_kept >= config.early_stopping_rounds {
            break;
        }
    }
    let iterations = trees.len();
    let kept = if validation.is_some() && config.use_best_model {
        best_kept.max(1)
    } else {
        iterations
    };
    trees.truncate(kept);
    model = model.with_trees(trees)?;
    Ok((
        model,
        RankerReport {
            iterations,
            kept,
            best_validation_loss: validation.map(|_| best_loss),
            seconds: started.elapsed().as_secs_f64(),
            binary_features,
        },
    ))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Gradients (the direction that lowers the loss) and hessians per row.
fn derivatives(
    loss: Loss,
    approx: &[f64],
    labels: &[f32],
    groups: &[u32],
    gradients: &mut [f64],
    hessians: &mut [f64],
) {
    match loss {
        Loss::Logloss => {
            for row in 0..approx.len() {
                let p = sigmoid(approx[row]);
                gradients[row] = f64::from(labels[row]) - p;
                hessians[row] = (p * (1.0 - p)).max(1e-16);
            }
        }
        Loss::PairLogit => {
            gradients.fill(0.0);
            hessians.fill(0.0);
            for group in group_ranges(groups) {
                for i in group.clone() {
                    for j in group.clone() {
                        if labels[i] <= labels[j] {
                            continue;
                        }
                        // i should rank above j.
                        let p = sigmoid(approx[i] - approx[j]);
                        gradients[i] += 1.0 - p;
                        gradients[j] -= 1.0 - p;
                        let curvature = p * (1.0 - p);
                        hessians[i] += curvature;
                        hessians[j] += curvature;
                    }
                }
            }
        }
    }
}

/// Mean loss: log loss per row, or PairLogit per pair.
fn loss_value(loss: Loss, approx: &[f64], labels: &[f32], groups: &[u32]) -> f64 {
    match loss {
        Loss::Logloss => {
            let total: f64 = approx
                .iter()
                .zip(labels)
                .map(|(&a, &y)| {
                    // log(1 + e^-a) for y = 1, log(1 + e^a) for y = 0, computed stably.
                    let signed = if y > 0.5 { a } else { -a };
                    (-signed).max(0.0) + (-signed.abs()).exp().ln_1p()
                })
                .sum();
            total / approx.len().max(1) as f64
        }
        Loss::PairLogit => {
            let (mut total, mut pairs) = (0.0, 0usize);
            for group in group_ranges(groups) {
                for i in group.clone() {
                    for j in group.clone() {
                        if labels[i] > labels[j] {
                            let d = approx[i] - approx[j];
                            total += (-d).max(0.0) + (-d.abs()).exp().ln_1p();
                            pairs += 1;
                        }
                    }
                }
            }
            total / pairs.max(1) as f64
        }
    }
}

/// The row ranges of consecutive equal group ids.
pub fn group_ranges(groups: &[u32]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for row in 1..=groups.len() {
        if row == groups.len() || groups[row] != groups[start] {
            ranges.push(start..row);
            start = row;
        }
    }
    ranges
}
