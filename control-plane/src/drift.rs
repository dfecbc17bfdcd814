//! The data-quality monitor: serving feature distributions (the viewer features of the
//! logged requests) against training's (the same features over the training data set's
//! interactions, so both are weighted by traffic), as the population stability index
//! per feature with an alert threshold.
//!
//! PSI = sum over bins of (serving - training) * ln(serving / training), with every
//! share floored at 1e-4 so an empty bin does not make it infinite. The usual reading:
//! below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a major one; the default
//! alert is at 0.2.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::ingest::InferenceEvent;

/// The default alert threshold.
pub const DEFAULT_THRESHOLD: f64 = 0.2;

/// Categories kept per categorical feature (by training frequency); the rest are
/// "(other)".
const TOP_CATEGORIES: usize = 20;

/// Age bins' upper bounds (exclusive).
const AGE_BOUNDS: [f64; 6] = [18.0, 25.0, 35.0, 45.0, 55.0, 65.0];

/// One bin of one feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bin {
    /// The category or range.
    pub label: String,
    /// Share of training rows.
    pub training: f64,
    /// Share of served requests.
    pub serving: f64,
}

/// One feature's drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureDrift {
    /// `country`, `language`, `age`, `device`.
    pub feature: String,
    /// Population stability index.
    pub psi: f64,
    /// `psi` is above the threshold.
    pub alert: bool,
    /// The bins, training's most common first.
    pub bins: Vec<Bin>,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DriftReport {
    /// The training data set.
    pub data: String,
    /// Only requests served by this model version, if given.
    pub model_version: Option<String>,
    /// Requests compared.
    pub serving_requests: u64,
    /// Training rows compared.
    pub training_rows: u64,
    /// The alert threshold.
    pub threshold: f64,
    /// Per feature.
    pub features: Vec<FeatureDrift>,
    /// One line per alert.
    pub alerts: Vec<String>,
}

/// The population stability index of two distributions over the same bins (shares or
/// counts; each is normalised).
pub fn psi(training: &[f64], serving: &[f64]) -> f64 {
    const FLOOR: f64 = 1e-4;
    let total_t: f64 = training.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let total_s: f64 = serving.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    training
        .iter()
        .zip(serving)
        .map(|(t, s)| {
            let (t, s) = ((t / total_t).max(FLOOR), (s / total_s).max(FLOOR));
            (s - t) * (s / t).ln()
        })
        .sum()
}

fn age_bin(age: Option<f64>) -> String {
    let Some(age) = age.filter(|a| a.is_finite()) else {
        return "(unknown)".to_owned();
    };
    let mut lower = 0.0;
    for upper in AGE_BOUNDS {
        if age < upper {
            return format!("{lower}-{upper}");
        }
        lower = upper;
    }
    format!("{lower}+")
}

/// Counts per label.
type Histogram = HashMap<String, f64>;

fn feature_drift(
    name: &str,
    training: &Histogram,
    serving: &Histogram,
    categorical: bool,
    threshold: f64,
) -> FeatureDrift {
    let mut labels: Vec<(&String, f64)> = training.iter().map(|(l, c)| (l, *c)).collect();
    labels.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let mut kept: Vec<String> = labels.iter().map(|(l, _)| (*l).clone()).collect();
    if categorical {
        kept.truncate(TOP_CATEGORIES);
    }
    for label in serving.keys() {
        if !categorical && !kept.contains(label) {
            kept.push(label.clone());
        }
    }
    let other = "(other)".to_owned();
    let mut training_counts: BTreeMap<&String, f64> = kept.iter().map(|l| (l, 0.0)).collect();
    let mut serving_counts = training_counts.clone();
    let has_other = categorical;
    if has_other {
        training_counts.insert(&other, 0.0);
        serving_counts.insert(&other, 0.0);
    }
    let add = |counts: &mut BTreeMap<&String, f64>, histogram: &Histogram| {
        for (label, count) in histogram {
            match counts.get_mut(label) {
                Some(slot) => *slot += count,
                None => *counts.get_mut(&other).expect("categorical has (other)") += count,
            }
        }
    };
    add(&mut training_counts, training);
    add(&mut serving_counts, serving);
    let order: Vec<&String> = kept.iter().chain(has_other.then_some(&other)).collect();
    let t: Vec<f64> = order.iter().map(|l| training_counts[l]).collect();
    let s: Vec<f64> = order.iter().map(|l| serving_counts[l]).collect();
    let (total_t, total_s) = (
        t.iter().sum::<f64>().max(f64::MIN_POSITIVE),
        s.iter().sum::<f64>().max(f64::MIN_POSITIVE),
    );
    let value = psi(&t, &s);
    FeatureDrift {
        feature: name.to_owned(),
        psi: value,
        alert: value > threshold,
        bins: order
            .iter()
            .zip(t.iter().zip(&s))
            .map(|(label, (t, s))| Bin {
                label: (*label).clone(),
                training: t / total_t,
                serving: s / total_s,
            })
            .collect(),
    }
}

/// Compares the viewer features of `served` requests with the training data set's.
pub fn drift_report(
    dataset: &Dataset,
    data: &str,
    served: &[InferenceEvent],
    model_version: Option<&str>,
    threshold: f64,
) -> DriftReport {
    let users: HashMap<u64, &edge::entities::User> =
        dataset.users.iter().map(|u| (u.user_id, u)).collect();
    let features = ["country", "language", "age", "device"];
    let mut training: Vec<Histogram> = vec![Histogram::new(); features.len()];
    let mut training_rows = 0u64;
    for interaction in &dataset.interactions {
        let Some(user) = users.get(&interaction.user_id) else {
            continue;
        };
        training_rows += 1;
        let values = [
            user.country.clone(),
            user.language.clone(),
            age_bin(Some(f64::from(user.age))),
            interaction.device.clone(),
        ];
        for (histogram, value) in training.iter_mut().zip(values) {
            *histogram.entry(value).or_default() += 1.0;
        }
    }
    let mut serving: Vec<Histogram> = vec![Histogram::new(); features.len()];
    let mut serving_requests = 0u64;
    let unknown = || "(unknown)".to_owned();
    for event in served {
        if model_version.is_some_and(|version| event.model_version != version) {
            continue;
        }
        serving_requests += 1;
        let seen = event.features.clone().unwrap_or_default();
        let values = [
            seen.country.unwrap_or_else(unknown),
            seen.language.unwrap_or_else(unknown),
            age_bin(seen.age),
            seen.device.unwrap_or_else(unknown),
        ];
        for (histogram, value) in serving.iter_mut().zip(values) {
            *histogram.entry(value).or_default() += 1.0;
        }
    }
    let features: Vec<FeatureDrift> = features
        .iter()
        .zip(training.iter().zip(&serving))
        .map(|(name, (t, s))| feature_drift(name, t, s, *name != "age", threshold))
        .collect();
    let alerts = features
        .iter()
        .filter(|f| f.alert)
        .map(|f| {
            format!(
                "{}: PSI {:.3} above {threshold} (serving differs from training)",
                f.feature, f.psi
            )
        })
        .collect();
    DriftReport {
        data: data.to_owned(),
        model_version: model_version.map(str::to_owned),
        serving_requests,
        training_rows,
        threshold,
        features,
        alerts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_equal_shares_and_grows_with_the_shift() {
        assert!(psi(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]).abs() < 1e-12);
        // Textbook: expected [0.5, 0.5], actual [0.6, 0.4]:
        // 0.1 ln(1.2) - 0.1 ln(0.8) = 0.04055.
        assert!((psi(&[0.5, 0.5], &[0.6, 0.4]) - 0.040_546_5).abs() < 1e-6);
        let small = psi(&[0.5, 0.5], &[0.55, 0.45]);
        let large = psi(&[0.5, 0.5], &[0.9, 0.1]);
        assert!(0.0 < small && small < large && large > 0.25);
        // An empty bin is floored, not infinite.
        assert!(psi(&[1.0, 0.0], &[0.5, 0.5]).is_finite());
    }

    #[test]
    fn ages_fall_in_bins() {
        assert_eq!(age_bin(Some(17.0)), "0-18");
        assert_eq!(age_bin(Some(18.0)), "18-25");
        assert_eq!(age_bin(Some(70.0)), "65+");
        assert_eq!(age_bin(None), "(unknown)");
    }

    #[test]
    fn rare_categories_share_one_bin() {
        let training: Histogram = (0..30)
            .map(|i| (format!("c{i:02}"), 100.0 - i as f64))
            .collect();
        let serving: Histogram = [("c00".to_owned(), 5.0), ("zz".to_owned(), 5.0)].into();
        let drift = feature_drift("country", &training, &serving, true, 0.2);
        assert_eq!(drift.bins.len(), TOP_CATEGORIES + 1);
        assert_eq!(drift.bins.last().unwrap().label, "(other)");
        assert!((drift.bins.last().unwrap().serving - 0.5).abs() < 1e-12);
        assert!(drift.alert);
    }
}
