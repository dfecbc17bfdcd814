//! `control-plane bench ranker`: the edge's tree evaluator on a model of the size serving
//! runs (1,000 trees of depth 6 by default) and one request's worth of candidates.
//!
//! The baseline, measured in the same run, is the same evaluator called once per
//! candidate, as a scorer without batching would: the batched path binarizes each feature
//! column once and walks every tree for all candidates together.

use std::fmt;
use std::time::Instant;

use edge::ranker::{
    CatFeature, CatValue, Ctr, CtrElement, CtrTable, CtrType, FeatureValue, FloatFeature,
    NanTreatment, ObliviousTree, RankerModel, RankerScratch, cat_ctr_key, ctr_identifier,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::latency::Latency;

/// Float columns of the bench model.
const FLOATS: usize = 20;
/// Borders per float column (CatBoost's default quantization keeps up to 254).
const BORDERS: usize = 64;
/// Categorical columns, each one-hot on three values and the source of two CTRs.
const CATS: usize = 4;
/// Distinct values per categorical column seen in training.
const CATEGORIES: usize = 200;

/// What [`bench_ranker`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RankerBenchReport {
    /// Trees in the model.
    pub trees: usize,
    /// Depth of each tree.
    pub depth: usize,
    /// Candidates per call.
    pub candidates: usize,
    /// Timed calls per path.
    pub calls: usize,
    /// All candidates in one call.
    pub batched: Latency,
    /// One call per candidate, for all candidates.
    pub per_candidate: Latency,
}

impl fmt::Display for RankerBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ranker bench: {} trees of depth {}, {} float + {} categorical columns ({} CTRs), {} candidates, {} calls",
            self.trees,
            self.depth,
            FLOATS,
            CATS,
            2 * CATS,
            self.candidates,
            self.calls
        )?;
        writeln!(
            f,
            "{:>24}  {:>10}  {:>10}  {:>8}",
            "path", "median us", "p99 us", "ratio"
        )?;
        for (name, latency) in [
            ("batched (edge)", &self.batched),
            ("one call per candidate", &self.per_candidate),
        ] {
            writeln!(
                f,
                "{:>24}  {:>10.1}  {:>10.1}  {:>7.2}x",
                name,
                latency.median_us,
                latency.p99_us,
                latency.median_us / self.batched.median_us
            )?;
        }
        Ok(())
    }
}

/// A random model with the bench's columns: `trees` trees of `depth` on random splits.
pub fn random_model(trees: usize, depth: usize, rng: &mut ChaCha8Rng) -> RankerModel {
    let mut float_features = Vec::with_capacity(FLOATS);
    for index in 0..FLOATS {
        let mut borders: Vec<f32> = (0..BORDERS).map(|_| rng.random_range(-3.0..3.0)).collect();
        borders.sort_by(f32::total_cmp);
        borders.dedup();
        float_features.push(FloatFeature {
            flat_index: index,
            borders,
            has_nans: true,
            nan_treatment: NanTreatment::AsFalse,
            name: format!("f{index}"),
        });
    }
    let mut cat_features = Vec::with_capacity(CATS);
    let mut ctrs = Vec::new();
    let mut tables = Vec::new();
    for index in 0..CATS {
        cat_features.push(CatFeature {
            flat_index: FLOATS + index,
            one_hot_values: (0..3)
                .map(|v| CatValue::new(&format!("c{index}_{v}")).as_i32())
                .collect(),
            name: format!("c{index}"),
        });
        let elements = vec![CtrElement::CatValue { cat_feature: index }];
        for (ctr_type, width) in [(CtrType::Borders, 2), (CtrType::Counter, 1)] {
            let counts = (0..CATEGORIES)
                .map(|v| {
                    let key = cat_ctr_key(&[CatValue::new(&format!("c{index}_{v}"))]);
                    (key, (0..width).map(|_| rng.random_range(1..100)).collect())
                })
                .collect::<std::collections::BTreeMap<u64, Vec<u32>>>();
            let counter_denominator = counts.values().map(|c| c[0]).max().unwrap_or(1);
            tables.push(CtrTable {
                identifier: ctr_identifier(&elements, ctr_type),
                counter_denominator,
                counts,
                width,
            });
            ctrs.push(Ctr {
                elements: elements.clone(),
                ctr_type,
                prior_numerator: 0.5,
                prior_denominator: 1.0,
                scale: 15.0,
                shift: 0.0,
                target_border_index: 0,
                borders: vec![2.999999, 5.999999, 8.999999, 11.999999],
                table: tables.len() - 1,
            });
        }
    }
    let binary = float_features
        .iter()
        .map(|f| f.borders.len())
        .sum::<usize>()
        + 3 * CATS
        + ctrs.iter().map(|c| c.borders.len()).sum::<usize>();
    let trees = (0..trees)
        .map(|_| ObliviousTree {
            splits: (0..depth)
                .map(|_| rng.random_range(0..binary as u32))
                .collect(),
            leaf_values: (0..1 << depth)
                .map(|_| rng.random_range(-0.1..0.1))
                .collect(),
        })
        .collect();
    RankerModel::new(float_features, cat_features, ctrs, tables, trees, 1.0, 0.0)
        .expect("the bench model is consistent by construction")
}

/// Random rows for [`random_model`]'s columns, 5% of floats NaN, 10% unseen categories.
pub fn random_rows(count: usize, rng: &mut ChaCha8Rng) -> Vec<FeatureValue> {
    random_rows_with_text(count, rng).0
}

/// [`random_rows`], and the same rows as tab-separated text, one line per row (the
/// categories as the strings whose hashes the rows hold), for another applier to read.
pub fn random_rows_with_text(
    count: usize,
    rng: &mut ChaCha8Rng,
) -> (Vec<FeatureValue>, Vec<String>) {
    let mut rows = Vec::with_capacity(count * (FLOATS + CATS));
    let mut lines = Vec::with_capacity(count);
    for _ in 0..count {
        let mut cells = Vec::with_capacity(FLOATS + CATS);
        for _ in 0..FLOATS {
            let x = if rng.random_bool(0.05) {
                f32::NAN
            } else {
                rng.random_range(-3.5..3.5)
            };
            rows.push(FeatureValue::Float(x));
            cells.push(x.to_string());
        }
        for index in 0..CATS {
            let value = rng.random_range(0..CATEGORIES + CATEGORIES / 10);
            let text = format!("c{index}_{value}");
            rows.push(FeatureValue::Cat(CatValue::new(&text)));
            cells.push(text);
        }
        lines.push(cells.join("\t"));
    }
    (rows, lines)
}

/// The columns of [`random_model`] that hold categories.
pub fn categorical_columns() -> std::ops::Range<usize> {
    FLOATS..FLOATS + CATS
}

/// Times [`RankerModel::predict_with`] on `candidates` rows at once and one row at a time,
/// `calls` times each. Meant for release builds.
pub fn bench_ranker(
    trees: usize,
    depth: usize,
    candidates: usize,
    calls: usize,
    seed: u64,
) -> Result<RankerBenchReport, edge::Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let model = random_model(trees, depth, &mut rng);
    let rows = random_rows(candidates, &mut rng);
    let width = model.row_width();
    let mut scratch = RankerScratch::default();
    let mut out = Vec::with_capacity(candidates);
    let mut one = Vec::with_capacity(1);

    // Both paths must agree before their times mean anything.
    model.predict_with(&rows, &mut scratch, &mut out)?;
    let batched_scores = out.clone();
    for (row, &expected) in rows.chunks_exact(width).zip(&batched_scores) {
        model.predict_with(row, &mut scratch, &mut one)?;
        if one[0].to_bits() != expected.to_bits() {
            return Err(edge::Error::InvalidRankerInput {
                reason: "batched and per-row scores differ".into(),
            });
        }
    }

    let mut batched = Vec::with_capacity(calls);
    let mut per_candidate = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        model.predict_with(&rows, &mut scratch, &mut out)?;
        batched.push(started.elapsed());
        let started = Instant::now();
        for row in rows.chunks_exact(width) {
            model.predict_with(row, &mut scratch, &mut one)?;
        }
        per_candidate.push(started.elapsed());
    }
    Ok(RankerBenchReport {
        trees,
        depth,
        candidates,
        calls,
        batched: Latency::of(batched),
        per_candidate: Latency::of(per_candidate),
    })
}
