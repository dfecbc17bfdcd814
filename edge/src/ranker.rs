//! The ranker: an ensemble of oblivious (symmetric) decision trees, as CatBoost builds
//! them, evaluated exactly as CatBoost evaluates them.
//!
//! A [`RankerModel`] is read from and written to CatBoost's JSON model format
//! ([`RankerModel::from_catboost_json`], [`RankerModel::to_catboost_json`]), so a model
//! trained by official CatBoost serves here and one trained by edgerec loads in CatBoost.
//! What the model reads:
//!
//! - float features, compared as f32 against sorted borders (`x > border`); NaN follows
//!   the feature's [`NanTreatment`];
//! - categorical features, hashed once ([`CatValue`], CityHash64 v1.0.2 of the UTF-8 bytes,
//!   low 32 bits, as CatBoost does), either tested for equality with one-hot values or
//!   turned into counter statistics ([`Ctr`]) looked up in tables learnt in training.
//!
//! Every split is a test of one *binary feature*: the borders of every float feature in
//! order, then the one-hot values of every categorical feature, then the borders of every
//! CTR. A tree's leaf index has bit `l` set when its `l`-th split holds. The evaluator
//! ([`RankerModel::predict`]) computes each candidate's binary features once, column by
//! column, then each tree's leaf indices for all candidates together: no branches, one
//! pass per tree level over a byte column.

mod catboost_json;
mod cityhash;
pub mod features;

pub use catboost_json::ctr_identifier;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What a NaN float input means to a feature's splits (CatBoost's `nan_value_treatment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NanTreatment {
    /// NaN compares false with every border (the feature had no NaN in training).
    AsIs,
    /// NaN is below every border: every split on the feature is false (`nan_mode` Min).
    AsFalse,
    /// NaN is above every border: every split on the feature is true (`nan_mode` Max).
    AsTrue,
}

/// A float input column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloatFeature {
    /// The column in an input row.
    pub flat_index: usize,
    /// Sorted ascending; only borders some split uses.
    pub borders: Vec<f32>,
    /// Whether training saw NaN in this column.
    pub has_nans: bool,
    /// What NaN means at evaluation.
    pub nan_treatment: NanTreatment,
    /// The column's name (may be empty).
    pub name: String,
}

/// A categorical input column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatFeature {
    /// The column in an input row.
    pub flat_index: usize,
    /// The category hashes that one-hot splits test for (empty if the feature is only
    /// used through CTRs or not at all).
    pub one_hot_values: Vec<i32>,
    /// The column's name (may be empty).
    pub name: String,
}

/// The kind of counter statistic a [`Ctr`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtrType {
    /// Share of examples with a label above the target border among those with the key.
    Borders,
    /// Share of examples in the target bucket among those with the key.
    Buckets,
    /// How often the key occurred, relative to the most frequent key.
    Counter,
    /// As `Counter` (CatBoost's name for the same computation in some models).
    FeatureFreq,
}

impl CtrType {
    fn name(self) -> &'static str {
        match self {
            CtrType::Borders => "Borders",
            CtrType::Buckets => "Buckets",
            CtrType::Counter => "Counter",
            CtrType::FeatureFreq => "FeatureFreq",
        }
    }
}

/// One part of the key of a CTR: a categorical value, or a binary test folded into the
/// key (CatBoost's feature combinations).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum CtrElement {
    /// The hash of a categorical feature's value.
    CatValue {
        /// Index into [`RankerModel::cat_features`].
        cat_feature: usize,
    },
    /// Whether a float feature is above a border.
    FloatSplit {
        /// Index into [`RankerModel::float_features`].
        float_feature: usize,
        /// The border.
        border: f32,
    },
    /// Whether a categorical feature equals a value.
    CatEquals {
        /// Index into [`RankerModel::cat_features`].
        cat_feature: usize,
        /// The category hash.
        value: i32,
    },
}

/// A counter statistic of a categorical value (or combination), computed from a table
/// learnt in training: `((count + prior_numerator) / (total + prior_denominator) + shift)
/// * scale`, in f32, then compared with `borders`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ctr {
    /// What the key is made of, in hashing order.
    pub elements: Vec<CtrElement>,
    /// The statistic.
    pub ctr_type: CtrType,
    /// Added to the count.
    pub prior_numerator: f32,
    /// Added to the total.
    pub prior_denominator: f32,
    /// Multiplies the result.
    pub scale: f32,
    /// Added before scaling.
    pub shift: f32,
    /// Which target class border (`Borders`) or bucket (`Buckets`) counts as positive.
    pub target_border_index: usize,
    /// Sorted ascending.
    pub borders: Vec<f32>,
    /// Index into [`RankerModel::ctr_tables`].
    pub table: usize,
}

/// Counts per key learnt in training, shared by the CTRs of one key and type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CtrTable {
    /// CatBoost's identifier of the table (JSON text naming the elements and the type).
    pub identifier: String,
    /// For `Counter`: the largest count, the denominator of every key's statistic.
    pub counter_denominator: u32,
    /// Counts per key: per class for `Borders` and `Buckets`, one for `Counter`.
    pub counts: BTreeMap<u64, Vec<u32>>,
    /// Values per key (`hash_stride - 1`).
    pub width: usize,
}

/// One oblivious tree: the same split at every node of a level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObliviousTree {
    /// Binary feature index of each level's split; level 0 is the leaf index's lowest bit.
    pub splits: Vec<u32>,
    /// `2^depth` leaf values.
    pub leaf_values: Vec<f64>,
}

/// One input value of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeatureValue {
    /// A float feature's value (NaN is allowed and means "missing").
    Float(f32),
    /// A categorical feature's value, hashed.
    Cat(CatValue),
}

/// A categorical value as the model sees it: CityHash64 v1.0.2 of its UTF-8 bytes, low 32
/// bits. Hash once, evaluate many times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CatValue(pub u32);

impl CatValue {
    /// The hash of `value` (integers are categories by their decimal text, as in CatBoost).
    pub fn new(value: &str) -> Self {
        Self(cityhash::city_hash64(value.as_bytes()) as u32)
    }

    /// The hash as the signed value CatBoost stores in one-hot splits.
    pub fn as_i32(self) -> i32 {
        self.0 as i32
    }
}

/// A test that a split applies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BinaryFeature {
    Float { feature: usize, border: f32 },
    OneHot { feature: usize, value: i32 },
    Ctr { ctr: usize, border: f32 },
}

/// The version of [`RankerModel::to_bytes`]' encoding.
pub const RANKER_FORMAT_VERSION: u32 = 1;

/// [`RankerModel::to_bytes`]' encoding: the arguments of [`RankerModel::new`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRanker {
    format_version: u32,
    float_features: Vec<FloatFeature>,
    cat_features: Vec<CatFeature>,
    ctrs: Vec<Ctr>,
    ctr_tables: Vec<CtrTable>,
    trees: Vec<ObliviousTree>,
    scale: f64,
    bias: f64,
}

/// An oblivious-tree ensemble with its feature descriptions (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct RankerModel {
    /// Float input columns.
    pub float_features: Vec<FloatFeature>,
    /// Categorical input columns.
    pub cat_features: Vec<CatFeature>,
    /// Counter statistics of categorical values.
    pub ctrs: Vec<Ctr>,
    /// The tables the CTRs read.
    pub ctr_tables: Vec<CtrTable>,
    /// The trees, summed in order.
    pub trees: Vec<ObliviousTree>,
    /// `prediction = scale * sum of leaves + bias`.
    pub scale: f64,
    /// See `scale`.
    pub bias: f64,
    binary: Vec<BinaryFeature>,
    width: usize,
    ctr_index: Vec<CtrIndex>,
    /// One per CTR, in order.
    ctr_bins: Vec<CtrBins>,
    /// What each input column must hold.
    column_kinds: Vec<ColumnKind>,
    max_depth: usize,
    sources: Vec<SplitSource>,
    bin_columns: usize,
    /// Every bin fits a byte (at most 255 borders per column, as with CatBoost's default
    /// 254): the evaluator then compares 16 candidates per 128-bit SIMD operation, not 8.
    narrow_bins: bool,
    /// Every tree's leaf values padded to `1 << max_depth` (when that is at most 256), one
    /// tree after another: with a power-of-two table per tree, a masked leaf index needs no
    /// bounds check in the evaluator's inner loop.
    padded_leaves: Vec<f64>,
}

/// Where binary feature `b` comes from in the quantized rows: it holds when the row's
/// value in bin column `column` is above `threshold`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SplitSource {
    column: u32,
    threshold: u16,
}

impl SplitSource {
    /// The sources of a new bin column's `borders` binary features (border `k` holds when
    /// more than `k` borders lie below the value), advancing the column count.
    fn borders(columns: &mut u32, borders: usize) -> impl Iterator<Item = Self> {
        let column = *columns;
        *columns += 1;
        (0..borders).map(move |k| Self {
            column,
            threshold: k as u16,
        })
    }
}

/// Borders must be strictly ascending numbers, and few enough for a u16 bin index.
fn check_borders(borders: &[f32], part: &str) -> Result<(), Error> {
    if !borders.is_sorted_by(|a, b| a < b) || borders.iter().any(|b| b.is_nan()) {
        return Err(invalid(format!(
            "{part}.borders are not strictly ascending numbers"
        )));
    }
    if borders.len() > usize::from(u16::MAX) {
        return Err(invalid(format!(
            "{part} has {} borders, at most 65535 are supported",
            borders.len()
        )));
    }
    Ok(())
}

/// A CTR table as an open-addressing hash table over its keys, with the counts side by
/// side: serving looks up every CTR of every candidate, and one probe into a table at most
/// half full beats a binary search's eight dependent steps.
#[derive(Debug, Clone, PartialEq)]
struct CtrIndex {
    /// `slots[i]`: the key stored there and its entry, or `EMPTY_SLOT`.
    slots: Vec<(u64, u32)>,
    shift: u32,
    counts: Vec<u32>,
    width: usize,
}

const EMPTY_SLOT: u32 = u32::MAX;

impl CtrIndex {
    fn of(table: &CtrTable) -> Self {
        let bits = (table.counts.len() * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(1);
        let mut index = Self {
            slots: vec![(0, EMPTY_SLOT); 1 << bits],
            shift: 64 - bits,
            counts: table.counts.values().flatten().copied().collect(),
            width: table.width,
        };
        for (entry, &key) in table.counts.keys().enumerate() {
            let mut slot = index.home(key);
            while index.slots[slot].1 != EMPTY_SLOT {
                slot = (slot + 1) & (index.slots.len() - 1);
            }
            index.slots[slot] = (key, entry as u32);
        }
        index
    }

    /// Fibonacci hashing: CatBoost's keys are products whose low bits mix poorly, so the
    /// slot comes from the high bits of a multiply.
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The position of `key` among the table's keys (in key order), if it has counts.
    fn entry(&self, key: u64) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut slot = self.home(key);
        loop {
            let (stored, entry) = self.slots[slot];
            if entry == EMPTY_SLOT {
                return None;
            }
            if stored == key {
                return Some(entry as usize);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn counts_of(&self, entry: usize) -> &[u32] {
        &self.counts[entry * self.width..(entry + 1) * self.width]
    }

    #[cfg(test)]
    fn get(&self, key: u64) -> Option<&[u32]> {
        self.entry(key).map(|entry| self.counts_of(entry))
    }

    fn entries(&self) -> usize {
        self.counts.len() / self.width.max(1)
    }
}

/// What an input column must hold, and the feature that reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ColumnKind {
    /// No feature reads it.
    Unused,
    /// Float feature `.0`.
    Float(usize),
    /// Categorical feature `.0`.
    Cat(usize),
}

impl ColumnKind {
    fn admits(self, value: FeatureValue) -> bool {
        matches!(
            (self, value),
            (Self::Unused, _)
                | (Self::Float(_), FeatureValue::Float(_))
                | (Self::Cat(_), FeatureValue::Cat(_))
        )
    }
}

/// One CTR's bin (the number of its borders below its value) for each key of its table,
/// worked out when the model loads: serving then needs one probe and one load per
/// candidate, not the counts' sums, the division and a border search.
#[derive(Debug, Clone, PartialEq)]
struct CtrBins {
    by_entry: Vec<u16>,
    /// The bin of a key the table does not hold.
    unseen: u16,
}

/// Reusable working memory for [`RankerModel::predict_with`].
#[derive(Debug, Default, Clone)]
pub struct RankerScratch {
    bins: Vec<u16>,
    narrow_bins: Vec<NarrowBin>,
    leaves: Vec<u32>,
    small_leaves: Vec<u8>,
    cats: Vec<i32>,
    values: Vec<f32>,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidRanker {
        reason: reason.into(),
    }
}

/// CatBoost's `CalcHash`: folds `value` into the running key `hash`.
fn fold_hash(hash: u64, value: u64) -> u64 {
    const MAGIC: u64 = 0x4906_ba49_4954_cb65;
    MAGIC.wrapping_mul(hash.wrapping_add(MAGIC.wrapping_mul(value)))
}

/// The key of a CTR table entry for a combination of categorical values (in the CTR's
/// element order), as CatBoost computes it.
pub fn cat_ctr_key(values: &[CatValue]) -> u64 {
    values.iter().fold(0, |hash, value| {
        fold_hash(hash, i64::from(value.as_i32()) as u64)
    })
}

impl RankerModel {
    /// Checks the parts against each other and derives the evaluator's tables. Every
    /// constructor goes through here, so a model that exists can evaluate any row of the
    /// right shape.
    pub fn new(
        float_features: Vec<FloatFeature>,
        cat_features: Vec<CatFeature>,
        ctrs: Vec<Ctr>,
        ctr_tables: Vec<CtrTable>,
        trees: Vec<ObliviousTree>,
        scale: f64,
        bias: f64,
    ) -> Result<Self, Error> {
        if !scale.is_finite() || !bias.is_finite() {
            return Err(invalid(format!(
                "scale_and_bias must be finite, got [{scale}, {bias}]"
            )));
        }
        let mut columns = BTreeMap::new();
        // Each binary feature, and where the evaluator finds it: one bin column per float
        // feature, per one-hot value and per CTR, in the same order.
        let mut binary = Vec::new();
        let mut sources = Vec::new();
        let mut bin_columns = 0u32;
        for (index, feature) in float_features.iter().enumerate() {
            if let Some(other) = columns.insert(feature.flat_index, ("float", index)) {
                return Err(invalid(format!(
                    "float_features[{index}]: column {} is also {}_features[{}]",
                    feature.flat_index, other.0, other.1
                )));
            }
            check_borders(&feature.borders, &format!("float_features[{index}]"))?;
            binary.extend(feature.borders.iter().map(|&border| BinaryFeature::Float {
                feature: index,
                border,
            }));
            sources.extend(SplitSource::borders(
                &mut bin_columns,
                feature.borders.len(),
            ));
        }
        for (index, feature) in cat_features.iter().enumerate() {
            if let Some(other) = columns.insert(feature.flat_index, ("categorical", index)) {
                return Err(invalid(format!(
                    "categorical_features[{index}]: column {} is also {}_features[{}]",
                    feature.flat_index, other.0, other.1
                )));
            }
            binary.extend(
                feature
                    .one_hot_values
                    .iter()
                    .map(|&value| BinaryFeature::OneHot {
                        feature: index,
                        value,
                    }),
            );
            for _ in &feature.one_hot_values {
                sources.extend(SplitSource::borders(&mut bin_columns, 1));
            }
        }
        for (index, ctr) in ctrs.iter().enumerate() {
            let table = ctr_tables
                .get(ctr.table)
                .ok_or_else(|| invalid(format!("ctrs[{index}]: no table {}", ctr.table)))?;
            if ctr.elements.is_empty() {
                return Err(invalid(format!("ctrs[{index}] has no elements")));
            }
            for element in &ctr.elements {
                let fine = match *element {
                    CtrElement::CatValue { cat_feature }
                    | CtrElement::CatEquals { cat_feature, .. } => cat_feature < cat_features.len(),
                    CtrElement::FloatSplit { float_feature, .. } => {
                        float_feature < float_features.len()
                    }
                };
                if !fine {
                    return Err(invalid(format!(
                        "ctrs[{index}]: element {element:?} names a feature the model does not have"
                    )));
                }
            }
            let classes_needed = match ctr.ctr_type {
                CtrType::Borders | CtrType::Buckets => ctr.target_border_index + 1,
                CtrType::Counter | CtrType::FeatureFreq => 1,
            };
            if table.width < classes_needed {
                return Err(invalid(format!(
                    "ctrs[{index}]: its table {:?} holds {} counts per key, {} needed",
                    table.identifier, table.width, classes_needed
                )));
            }
            check_borders(&ctr.borders, &format!("ctrs[{index}]"))?;
            binary.extend(
                ctr.borders
                    .iter()
                    .map(|&border| BinaryFeature::Ctr { ctr: index, border }),
            );
            sources.extend(SplitSource::borders(&mut bin_columns, ctr.borders.len()));
        }
        for (index, table) in ctr_tables.iter().enumerate() {
            if let Some((key, counts)) = table.counts.iter().find(|(_, c)| c.len() != table.width) {
                return Err(invalid(format!(
                    "ctr table {index} ({:?}): key {key} has {} counts, expected {}",
                    table.identifier,
                    counts.len(),
                    table.width
                )));
            }
        }
        for (index, tree) in trees.iter().enumerate() {
            if tree.splits.len() > 16 {
                return Err(invalid(format!(
                    "oblivious_trees[{index}] has depth {}, at most 16 is supported",
                    tree.splits.len()
                )));
            }
            if tree.leaf_values.len() != 1 << tree.splits.len() {
                return Err(invalid(format!(
                    "oblivious_trees[{index}] has {} leaf values for depth {} (expected {})",
                    tree.leaf_values.len(),
                    tree.splits.len(),
                    1usize << tree.splits.len()
                )));
            }
            if let Some(split) = tree.splits.iter().find(|&&s| s as usize >= binary.len()) {
                return Err(invalid(format!(
                    "oblivious_trees[{index}]: split_index {split} is out of range (the model has {} binary features)",
                    binary.len()
                )));
            }
            if tree.leaf_values.iter().any(|v| !v.is_finite()) {
                return Err(invalid(format!(
                    "oblivious_trees[{index}] has a non-finite leaf value"
                )));
            }
        }
        let width = columns.keys().next_back().map_or(0, |&last| last + 1);
        let mut column_kinds = vec![ColumnKind::Unused; width];
        for (index, feature) in float_features.iter().enumerate() {
            column_kinds[feature.flat_index] = ColumnKind::Float(index);
        }
        for (index, feature) in cat_features.iter().enumerate() {
            column_kinds[feature.flat_index] = ColumnKind::Cat(index);
        }
        let ctr_index: Vec<CtrIndex> = ctr_tables.iter().map(CtrIndex::of).collect();
        let ctr_bins = ctrs
            .iter()
            .map(|ctr| {
                let table = &ctr_index[ctr.table];
                let denominator = ctr_tables[ctr.table].counter_denominator;
                let bin = |counts| {
                    let value = ctr_value_of(ctr, denominator, counts);
                    ctr.borders.partition_point(|&border| value > border) as u16
                };
                CtrBins {
                    by_entry: (0..table.entries())
                        .map(|entry| bin(Some(table.counts_of(entry))))
                        .collect(),
                    unseen: bin(None),
                }
            })
            .collect();
        let narrow_bins = float_features.iter().all(|f| f.borders.len() <= 255)
            && ctrs.iter().all(|c| c.borders.len() <= 255);
        let max_depth = trees.iter().map(|t| t.splits.len()).max().unwrap_or(0);
        let padded_leaves = if max_depth <= 8 {
            trees
                .iter()
                .flat_map(|tree| {
                    let padding = (1 << max_depth) - tree.leaf_values.len();
                    tree.leaf_values
                        .iter()
                        .copied()
                        .chain(std::iter::repeat_n(0.0, padding))
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            padded_leaves,
            float_features,
            cat_features,
            ctrs,
            ctr_tables,
            trees,
            scale,
            bias,
            binary,
            width,
            ctr_index,
            ctr_bins,
            column_kinds,
            max_depth,
            narrow_bins,
            sources,
            bin_columns: bin_columns as usize,
        })
    }

    /// The bundle's encoding: MessagePack of the model's parts (field names kept,
    /// `format_version` first). CatBoost's JSON stays the trained artifact, the one other
    /// tools read; this form loads several times faster, as parsing the leaf values' decimal
    /// text was most of the JSON's load.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A copy of the parts: written once, when a bundle is built.
        rmp_serde::to_vec_named(&StoredRanker {
            format_version: RANKER_FORMAT_VERSION,
            float_features: self.float_features.clone(),
            cat_features: self.cat_features.clone(),
            ctrs: self.ctrs.clone(),
            ctr_tables: self.ctr_tables.clone(),
            trees: self.trees.clone(),
            scale: self.scale,
            bias: self.bias,
        })
        .expect("a ranker always serializes")
    }

    /// Decodes [`RankerModel::to_bytes`]' encoding, checking the parts as
    /// [`RankerModel::new`] does.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let stored: StoredRanker = crate::decode_versioned(
            bytes,
            "ranker",
            RANKER_FORMAT_VERSION,
            |stored: &StoredRanker| stored.format_version,
        )?;
        Self::new(
            stored.float_features,
            stored.cat_features,
            stored.ctrs,
            stored.ctr_tables,
            stored.trees,
            stored.scale,
            stored.bias,
        )
    }

    /// A bundle's ranker section: [`RankerModel::to_bytes`]' encoding, or CatBoost's JSON
    /// text in bundles built before it (a JSON object starts with `{`, which no
    /// MessagePack map does).
    pub fn from_bundle_section(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.first() != Some(&b'{') {
            return Self::from_bytes(bytes);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Decode {
            artifact: "CatBoost JSON model",
            message: format!("not UTF-8: {e}"),
        })?;
        Self::from_catboost_json(text)
    }

    /// The same features with other trees (a trainer builds the features first).
    pub fn with_trees(self, trees: Vec<ObliviousTree>) -> Result<Self, Error> {
        Self::new(
            self.float_features,
            self.cat_features,
            self.ctrs,
            self.ctr_tables,
            trees,
            self.scale,
            self.bias,
        )
    }

    /// The binary features of `rows`, column-major (`bits[b * n + row]`, 0 or 1), exactly
    /// as the evaluator computes them: what a trainer validates against.
    pub fn binary_features(&self, rows: &[FeatureValue]) -> Result<Vec<u8>, Error> {
        let n = self.check_rows(rows)?;
        let mut scratch = RankerScratch::default();
        if n == 0 {
            return Ok(Vec::new());
        }
        let stride = self.quantize(rows, n, &mut scratch);
        let mut bits = Vec::with_capacity(self.sources.len() * n);
        for source in &self.sources {
            let start = source.column as usize * stride;
            bits.extend(
                scratch.bins[start..start + n]
                    .iter()
                    .map(|&bin| u8::from(bin > source.threshold)),
            );
        }
        Ok(bits)
    }

    /// The number of values an input row must have (the largest column index plus one).
    pub fn row_width(&self) -> usize {
        self.width
    }

    /// The predictions (CatBoost's `RawFormulaVal`) of `rows`, row-major with
    /// [`RankerModel::row_width`] values each.
    pub fn predict(&self, rows: &[FeatureValue]) -> Result<Vec<f64>, Error> {
        let mut out = Vec::new();
        self.predict_with(rows, &mut RankerScratch::default(), &mut out)?;
        Ok(out)
    }

    /// As [`RankerModel::predict`], reusing `scratch` and writing into `out` (cleared first).
    /// Fails only if the rows do not fit the model: a wrong length, or a float where a
    /// category is expected or the reverse.
    pub fn predict_with(
        &self,
        rows: &[FeatureValue],
        scratch: &mut RankerScratch,
        out: &mut Vec<f64>,
    ) -> Result<(), Error> {
        out.clear();
        let n = self.check_rows(rows)?;
        if n == 0 {
            return Ok(());
        }
        let stride = self.quantize(rows, n, scratch);
        let RankerScratch {
            bins,
            narrow_bins,
            leaves,
            small_leaves,
            ..
        } = scratch;
        // Tree sums accumulate in `out` itself: no allocation per call.
        out.resize(n, 0.0);
        let sums = &mut out[..];
        if self.max_depth <= 8 && self.narrow_bins {
            narrow_bins.clear();
            // Lossless: `narrow_bins` says every bin is at most 255.
            narrow_bins.extend(bins.iter().map(|&bin| NarrowBin::new(bin)));
            self.sum_trees(narrow_bins, stride, small_leaves, sums);
        } else if self.max_depth <= 8 {
            self.sum_trees(bins, stride, small_leaves, sums);
        } else {
            self.sum_trees(bins, stride, leaves, sums);
        }
        for sum in sums.iter_mut() {
            *sum = self.scale * *sum + self.bias;
        }
        Ok(())
    }

    /// Adds every tree's leaf value to each candidate's sum, in tree order (so the sums
    /// are bit for bit those of a plain walk). `bins` is column-major, `stride` per column
    /// (see [`RankerModel::quantize`]); `sums` has one entry per candidate.
    fn sum_trees<B: Bin, L: Leaf>(
        &self,
        bins: &[B],
        stride: usize,
        leaves: &mut Vec<L>,
        sums: &mut [f64],
    ) {
        let n = sums.len();
        leaves.clear();
        leaves.resize(TREE_BLOCK * stride, L::default());
        let column = |split: u32| {
            let source = self.sources[split as usize];
            let start = source.column as usize * stride;
            (&bins[start..start + stride], B::threshold(source.threshold))
        };
        let table_len = if self.padded_leaves.is_empty() {
            0
        } else {
            1 << self.max_depth
        };
        for (index, block) in self.trees.chunks(TREE_BLOCK).enumerate() {
            for (tree, leaves) in block.iter().zip(leaves.chunks_exact_mut(stride)) {
                // All levels of a tree in one pass over the candidates: one write per
                // candidate instead of one per level.
                macro_rules! levels {
                    ($depth:literal) => {{
                        let mut columns = [(&bins[..0], B::default()); $depth];
                        for (slot, &split) in columns.iter_mut().zip(&tree.splits) {
                            *slot = column(split);
                        }
                        tree_leaves::<B, L, $depth>(&columns, leaves)
                    }};
                }
                match tree.splits.len() {
                    0 => leaves.fill(L::default()),
                    1 => levels!(1),
                    2 => levels!(2),
                    3 => levels!(3),
                    4 => levels!(4),
                    5 => levels!(5),
                    6 => levels!(6),
                    7 => levels!(7),
                    8 => levels!(8),
                    _ => {
                        leaves.fill(L::default());
                        for (level, &split) in tree.splits.iter().enumerate() {
                            let (column, threshold) = column(split);
                            for (leaf, &bin) in leaves.iter_mut().zip(column) {
                                *leaf = leaf.with_bit(bin > threshold, level);
                            }
                        }
                    }
                }
            }
            // Each tree's leaves take `stride` entries, of which the first `n` are real.
            let tree_leaves = |tree: usize| &leaves[tree * stride..tree * stride + n];
            if block.len() == TREE_BLOCK && table_len > 0 {
                let start = index * TREE_BLOCK * table_len;
                let values = &self.padded_leaves[start..start + TREE_BLOCK * table_len];
                let leaves = std::array::from_fn(tree_leaves);
                match table_len {
                    1 => add_block::<L, 1>(values, leaves, sums),
                    2 => add_block::<L, 2>(values, leaves, sums),
                    4 => add_block::<L, 4>(values, leaves, sums),
                    8 => add_block::<L, 8>(values, leaves, sums),
                    16 => add_block::<L, 16>(values, leaves, sums),
                    32 => add_block::<L, 32>(values, leaves, sums),
                    64 => add_block::<L, 64>(values, leaves, sums),
                    128 => add_block::<L, 128>(values, leaves, sums),
                    _ => add_block::<L, 256>(values, leaves, sums),
                }
            } else if block.len() == TREE_BLOCK {
                // One load and store of each sum per block of trees; the additions stay
                // in tree order, so the sums are the same bits as tree by tree.
                let leaves: [&[L]; TREE_BLOCK] = std::array::from_fn(tree_leaves);
                for (candidate, sum) in sums.iter_mut().enumerate() {
                    let mut s = *sum;
                    for (tree, leaves) in block.iter().zip(&leaves) {
                        s += tree.leaf_values[leaves[candidate].index()];
                    }
                    *sum = s;
                }
            } else {
                for (tree, leaves) in block.iter().zip(leaves.chunks_exact(stride)) {
                    for (sum, &leaf) in sums.iter_mut().zip(leaves) {
                        *sum += tree.leaf_values[leaf.index()];
                    }
                }
            }
        }
    }

    fn check_rows(&self, rows: &[FeatureValue]) -> Result<usize, Error> {
        if self.width == 0 {
            // Without input columns there is no row shape to split the values by.
            return Err(invalid("a model without input columns cannot split rows"));
        }
        if !rows.len().is_multiple_of(self.width) {
            return Err(Error::InvalidRankerInput {
                reason: format!(
                    "{} values is not a whole number of rows of {} columns",
                    rows.len(),
                    self.width
                ),
            });
        }
        let n = rows.len() / self.width;
        let misfit = rows
            .chunks_exact(self.width)
            .enumerate()
            .find_map(|(row, values)| {
                values
                    .iter()
                    .zip(&self.column_kinds)
                    .position(|(&value, kind)| !kind.admits(value))
                    .map(|column| (row, column))
            });
        let Some((row, column)) = misfit else {
            return Ok(n);
        };
        let reason = match self.column_kinds[column] {
            ColumnKind::Float(index) => format!(
                "row {row}, column {column} (float feature {index} {:?}) holds a category",
                self.float_features[index].name
            ),
            ColumnKind::Cat(index) => format!(
                "row {row}, column {column} (categorical feature {index} {:?}) holds a number",
                self.cat_features[index].name
            ),
            ColumnKind::Unused => unreachable!("an unused column admits anything"),
        };
        Err(Error::InvalidRankerInput { reason })
    }

    fn float_at(&self, rows: &[FeatureValue], row: usize, feature: usize) -> f32 {
        let spec = &self.float_features[feature];
        float_input(rows[row * self.width + spec.flat_index], spec.nan_treatment)
    }

    fn cat_at(&self, rows: &[FeatureValue], row: usize, feature: usize) -> CatValue {
        match rows[row * self.width + self.cat_features[feature].flat_index] {
            FeatureValue::Cat(value) => value,
            FeatureValue::Float(_) => CatValue(0),
        }
    }

    /// The CTR's value for one row (CatBoost's `TModelCtr::Calc`, in f32).
    #[cfg(test)]
    fn ctr_value(&self, ctr: &Ctr, key: u64) -> f32 {
        ctr_value_of(
            ctr,
            self.ctr_tables[ctr.table].counter_denominator,
            self.ctr_index[ctr.table].get(key),
        )
    }

    fn ctr_key(&self, ctr: &Ctr, rows: &[FeatureValue], row: usize) -> u64 {
        ctr.elements.iter().fold(0, |hash, element| match *element {
            CtrElement::CatValue { cat_feature } => {
                // Sign-extended, as CatBoost widens its i32 hash.
                let value = self.cat_at(rows, row, cat_feature).as_i32();
                fold_hash(hash, i64::from(value) as u64)
            }
            CtrElement::FloatSplit {
                float_feature,
                border,
            } => fold_hash(
                hash,
                u64::from(self.float_at(rows, row, float_feature) > border),
            ),
            CtrElement::CatEquals { cat_feature, value } => fold_hash(
                hash,
                u64::from(self.cat_at(rows, row, cat_feature).as_i32() == value),
            ),
        })
    }

    /// Fills `scratch.bins` column-major with one quantized value per bin column and row
    /// (`bins[column * stride + row]`), and returns `stride`: `n` rounded up to
    /// [`CANDIDATE_PADDING`], the padding rows' bins 0. For a float or CTR column the bin is
    /// the number of its borders below the value, for a one-hot column 1 if the category
    /// matches. Binary feature `b` of a row is then `bins[source.column] > source.threshold`
    /// (see `SplitSource`): quantizing once per column costs a search per value instead of
    /// a pass per border.
    fn quantize(&self, rows: &[FeatureValue], n: usize, scratch: &mut RankerScratch) -> usize {
        let RankerScratch {
            bins, cats, values, ..
        } = scratch;
        let stride = n.next_multiple_of(CANDIDATE_PADDING);
        bins.clear();
        bins.resize(self.bin_columns * stride, 0);
        let mut columns = bins
            .chunks_exact_mut(stride.max(1))
            .map(|column| &mut column[..n]);
        for spec in &self.float_features {
            let column = columns.next().expect("one bin column per float feature");
            values.clear();
            values.extend(
                rows.chunks_exact(self.width)
                    .map(|row| float_input(row[spec.flat_index], spec.nan_treatment)),
            );
            count_borders_below(&spec.borders, values, column);
        }
        for (feature, spec) in self.cat_features.iter().enumerate() {
            cats.clear();
            cats.extend((0..n).map(|row| self.cat_at(rows, row, feature).as_i32()));
            for &value in &spec.one_hot_values {
                let column = columns.next().expect("one bin column per one-hot value");
                for (bin, &hash) in column.iter_mut().zip(cats.iter()) {
                    *bin = u16::from(hash == value);
                }
            }
        }
        for (ctr, bins) in self.ctrs.iter().zip(&self.ctr_bins) {
            let column = columns.next().expect("one bin column per ctr");
            let table = &self.ctr_index[ctr.table];
            for (row, bin) in column.iter_mut().enumerate() {
                *bin = table
                    .entry(self.ctr_key(ctr, rows, row))
                    .map_or(bins.unseen, |entry| bins.by_entry[entry]);
            }
        }
        stride
    }

    /// Whether binary feature `index` holds for `row`, computed from the model's
    /// descriptions directly: the reference the fast path is tested against.
    #[cfg(test)]
    fn binary_feature(&self, rows: &[FeatureValue], row: usize, index: usize) -> bool {
        match self.binary[index] {
            BinaryFeature::Float { feature, border } => self.float_at(rows, row, feature) > border,
            BinaryFeature::OneHot { feature, value } => {
                self.cat_at(rows, row, feature).as_i32() == value
            }
            BinaryFeature::Ctr { ctr, border } => {
                let ctr = &self.ctrs[ctr];
                self.ctr_value(ctr, self.ctr_key(ctr, rows, row)) > border
            }
        }
    }
}

/// The value a float feature compares with its borders: NaN as its treatment says.
fn float_input(value: FeatureValue, nan_treatment: NanTreatment) -> f32 {
    match value {
        FeatureValue::Float(x) if x.is_nan() => match nan_treatment {
            NanTreatment::AsIs => f32::NAN,
            NanTreatment::AsFalse => f32::NEG_INFINITY,
            NanTreatment::AsTrue => f32::INFINITY,
        },
        FeatureValue::Float(x) => x,
        FeatureValue::Cat(_) => f32::NAN,
    }
}

/// A CTR's value given its key's counts, `None` for a key its table does not hold
/// (CatBoost's `TModelCtr::Calc`, in f32).
fn ctr_value_of(ctr: &Ctr, counter_denominator: u32, counts: Option<&[u32]>) -> f32 {
    let (count, total) = match (ctr.ctr_type, counts) {
        (CtrType::Borders, Some(counts)) => {
            let above: u32 = counts[ctr.target_border_index + 1..].iter().sum();
            (above as f32, counts.iter().sum::<u32>() as f32)
        }
        (CtrType::Buckets, Some(counts)) => (
            counts[ctr.target_border_index] as f32,
            counts.iter().sum::<u32>() as f32,
        ),
        (CtrType::Counter | CtrType::FeatureFreq, found) => (
            found.map_or(0.0, |counts| counts[0] as f32),
            counter_denominator as f32,
        ),
        (CtrType::Borders | CtrType::Buckets, None) => (0.0, 0.0),
    };
    let share = (count + ctr.prior_numerator) / (total + ctr.prior_denominator);
    (share + ctr.shift) * ctr.scale
}

/// Rows whose border searches run interleaved in [`count_borders_below`].
const SEARCH_LANES: usize = 8;

/// Sets `bins[i]` to the number of `borders` (ascending) below `values[i]`, as
/// `borders.partition_point(|&b| values[i] > b)` would (so NaN counts none). A lone
/// branch-free binary search waits on each load before the next; running
/// `SEARCH_LANES` searches in step lets their loads overlap, as the step count depends
/// on the borders' length only.
fn count_borders_below(borders: &[f32], values: &[f32], bins: &mut [u16]) {
    if borders.is_empty() {
        bins.fill(0);
        return;
    }
    for (values, bins) in values
        .chunks(SEARCH_LANES)
        .zip(bins.chunks_mut(SEARCH_LANES))
    {
        // A short last chunk is padded with NaN, which no border is below.
        let mut lane_values = [f32::NAN; SEARCH_LANES];
        lane_values[..values.len()].copy_from_slice(values);
        let mut base = [0usize; SEARCH_LANES];
        let mut size = borders.len();
        while size > 1 {
            let half = size / 2;
            for (base, &value) in base.iter_mut().zip(&lane_values) {
                let middle = *base + half;
                // A plain `if` (even `base += half * bit`) compiles to a branch, and that
                // branch is a coin toss on every step.
                *base = std::hint::select_unpredictable(value > borders[middle], middle, *base);
            }
            size -= half;
        }
        for ((bin, base), &value) in bins.iter_mut().zip(base).zip(&lane_values) {
            *bin = (base + usize::from(value > borders[base])) as u16;
        }
    }
}

/// Adds a block of trees' leaf values to each candidate's sum, in tree order (the same
/// bits as tree by tree). `values` holds the block's tables of `LEAVES` values each; a
/// leaf index masked to `LEAVES - 1` is provably in range, so the loop has no bounds checks
/// and keeps each table's address in a register.
fn add_block<L: Leaf, const LEAVES: usize>(
    values: &[f64],
    leaves: [&[L]; TREE_BLOCK],
    sums: &mut [f64],
) {
    let n = sums.len();
    let tables: [&[f64; LEAVES]; TREE_BLOCK] = std::array::from_fn(|tree| {
        values[tree * LEAVES..(tree + 1) * LEAVES]
            .try_into()
            .expect("a table of LEAVES values")
    });
    let leaves: [&[L]; TREE_BLOCK] = std::array::from_fn(|tree| &leaves[tree][..n]);
    let mask = LEAVES - 1;
    for (candidate, sum) in sums.iter_mut().enumerate() {
        let mut s = *sum;
        for (table, leaves) in tables.iter().zip(&leaves) {
            s += table[leaves[candidate].index() & mask];
        }
        *sum = s;
    }
}

/// Bin columns are padded to a multiple of this many candidates: the leaf-index loop then
/// runs in whole 128-bit vectors of byte bins, with no scalar tail (which cost as much as
/// all the vectors of 200 candidates' trees together).
const CANDIDATE_PADDING: usize = 16;

/// Trees whose leaf indices are computed before their values are added: each candidate's
/// running sum is then loaded and stored once per block rather than once per tree.
const TREE_BLOCK: usize = 4;

/// A quantized value: a byte when every column has at most 255 borders, else a u16.
trait Bin: Copy + Default + PartialOrd {
    fn threshold(threshold: u16) -> Self;
}

/// A bin of at most 255 as a signed byte, offset by -128 so that signed order is the
/// bins' order: x86's SSE2 compares signed bytes in one instruction, unsigned ones in
/// three.
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd)]
struct NarrowBin(i8);

impl NarrowBin {
    fn new(bin: u16) -> Self {
        // Only used when every bin is at most 255 (`narrow_bins`).
        Self((bin as u8 ^ 0x80) as i8)
    }
}

impl Bin for NarrowBin {
    fn threshold(threshold: u16) -> Self {
        Self::new(threshold)
    }
}

impl Bin for u16 {
    fn threshold(threshold: u16) -> Self {
        threshold
    }
}

/// A leaf index: a byte up to depth 8 (more candidates per SIMD operation), else a u32.
trait Leaf: Copy + Default {
    fn with_bit(self, bit: bool, level: usize) -> Self;
    fn index(self) -> usize;
}

impl Leaf for u8 {
    fn with_bit(self, bit: bool, level: usize) -> Self {
        self | (u8::from(bit) << level)
    }
    fn index(self) -> usize {
        usize::from(self)
    }
}

impl Leaf for u32 {
    fn with_bit(self, bit: bool, level: usize) -> Self {
        self | (u32::from(bit) << level)
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// The leaf index of each candidate in a tree of `DEPTH` levels, each level a bin column
/// and the threshold its bins must exceed. A constant depth lets the compiler unroll the
/// levels and vectorise across candidates.
fn tree_leaves<B: Bin, L: Leaf, const DEPTH: usize>(
    columns: &[(&[B], B); DEPTH],
    leaves: &mut [L],
) {
    let n = leaves.len();
    let columns: [(&[B], B); DEPTH] =
        std::array::from_fn(|level| (&columns[level].0[..n], columns[level].1));
    for (candidate, leaf) in leaves.iter_mut().enumerate() {
        // Built in the leaf's own width, so a byte-wide leaf vectorises 16 candidates to
        // a 128-bit register.
        let mut bits = L::default();
        for (level, (column, threshold)) in columns.iter().enumerate() {
            bits = bits.with_bit(column[candidate] > *threshold, level);
        }
        *leaf = bits;
    }
}

#[cfg(test)]
mod tests;
