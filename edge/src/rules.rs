//! The bundle's `rules` and `experiments` sections: the business rules that shape
//! retrieval, filtering and ordering, and the A/B experiments that vary them.
//!
//! Both are plain data with a default for every field, written by the control plane from
//! the `[rules]` and `[[experiments]]` of its config, and validated when a bundle loads.
//! Assignment to an experiment's arm is a hash of (salt, user id): every edge that holds
//! the same bundle puts a user in the same arm, with no state and no call home.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Error};

/// What shapes a response besides the models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusinessRules {
    /// Candidates retrieved by the main personalized query.
    pub personalized_candidates: usize,
    /// Extra queries pulled toward the viewer's top categories (0 = none).
    pub category_queries: usize,
    /// Candidates each category query adds.
    pub candidates_per_category: usize,
    /// Leave out videos the viewer already watched.
    pub exclude_watched: bool,
    /// At most this many videos of one category in a response (0 = no cap).
    pub max_per_category: usize,
    /// At most this many videos of one channel in a response (0 = no cap).
    pub max_per_channel: usize,
    /// Score added to a video uploaded just now, halving every `freshness_half_life_days`.
    pub freshness_boost: f32,
    /// See `freshness_boost`.
    pub freshness_half_life_days: f32,
    /// 0-based positions where promoted videos are placed (ahead of ranked ones).
    pub promoted_positions: Vec<usize>,
    /// Videos in the popularity fallback for viewers without history.
    pub popular_fallback: usize,
    /// The age that content ratings are checked against when a request gives none.
    pub age_when_unknown: u8,
}

impl Default for BusinessRules {
    fn default() -> Self {
        Self {
            personalized_candidates: 200,
            category_queries: 2,
            candidates_per_category: 50,
            exclude_watched: true,
            max_per_category: 0,
            max_per_channel: 3,
            freshness_boost: 0.1,
            freshness_half_life_days: 7.0,
            promoted_positions: vec![2],
            popular_fallback: 500,
            age_when_unknown: 13,
        }
    }
}

impl BusinessRules {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.personalized_candidates == 0 {
            return Err(ConfigError::new(
                "personalized_candidates",
                "must be at least 1",
            ));
        }
        if !(self.freshness_boost.is_finite() && self.freshness_boost >= 0.0) {
            return Err(ConfigError::new(
                "freshness_boost",
                "must be a non-negative number",
            ));
        }
        if !(self.freshness_half_life_days.is_finite() && self.freshness_half_life_days > 0.0) {
            return Err(ConfigError::new(
                "freshness_half_life_days",
                "must be a positive number",
            ));
        }
        let mut positions = self.promoted_positions.clone();
        positions.sort_unstable();
        if positions.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::new(
                "promoted_positions",
                "must not repeat a position",
            ));
        }
        Ok(())
    }
}

/// One arm of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Its name in responses and analyses, e.g. `control`.
    pub name: String,
    /// Its share of the traffic, relative to the other arms' weights.
    pub weight: u32,
    /// The rules this arm serves with (the bundle's rules when absent).
    #[serde(default)]
    pub rules: Option<BusinessRules>,
}

/// An experiment: a salt and arms with traffic weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Its name in responses and analyses.
    pub name: String,
    /// Mixed into the assignment hash, so experiments split users independently.
    pub salt: String,
    /// The arms, at least one with a positive weight.
    pub variants: Vec<Variant>,
}

/// The `experiments` section: the experiments a bundle runs (at most one applies to a
/// request: the first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Experiments {
    /// The experiments.
    pub experiments: Vec<Experiment>,
}

/// Assignment resolution: the hash is reduced to one of this many buckets.
const BUCKETS: u64 = 10_000;

impl Experiment {
    /// Checks the arms; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.variants.iter().all(|v| v.weight == 0) {
            return Err(ConfigError::new(
                "variants",
                "need at least one arm with a positive weight",
            ));
        }
        for (index, variant) in self.variants.iter().enumerate() {
            if self.variants[..index]
                .iter()
                .any(|v| v.name == variant.name)
            {
                return Err(ConfigError::new(
                    format!("variants[{index}].name"),
                    format!("{:?} appears twice", variant.name),
                ));
            }
            if let Some(rules) = &variant.rules {
                rules
                    .validate()
                    .map_err(|e| e.within(&format!("variants[{index}].rules")))?;
            }
        }
        Ok(())
    }

    /// The arm of `user_id`: always the same for the same salt, user and arms; each arm
    /// gets users in proportion to its weight.
    pub fn assign(&self, user_id: &str) -> &Variant {
        let mut key = Vec::with_capacity(self.salt.len() + 1 + user_id.len());
        key.extend_from_slice(self.salt.as_bytes());
        // A separator, so ("ab", "c") and ("a", "bc") hash differently.
        key.push(0);
        key.extend_from_slice(user_id.as_bytes());
        let bucket = xxhash_rust::xxh3::xxh3_64(&key) % BUCKETS;
        let total: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
        let mut upper = 0u64;
        for variant in &self.variants {
            upper += u64::from(variant.weight);
            // Bucket b belongs to the arm whose cumulative share first exceeds it.
            if bucket * total < upper * BUCKETS {
                return variant;
            }
        }
        // Unreachable after validation (the shares sum to all buckets); the last arm with
        // weight is the safe answer.
        self.variants
            .iter()
            .rev()
            .find(|v| v.weight > 0)
            .unwrap_or(&self.variants[0])
    }
}

fn invalid(section: &'static str, error: impl std::fmt::Display) -> Error {
    Error::InvalidBundle {
        section: Some(section),
        reason: format!("is invalid: {error}"),
    }
}

impl BusinessRules {
    /// The section's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("rules always serialize")
    }

    /// Decodes and validates the section.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let rules: Self = rmp_serde::from_slice(bytes).map_err(|e| invalid("rules", e))?;
        rules.validate().map_err(|e| invalid("rules", e))?;
        Ok(rules)
    }
}

impl Experiments {
    /// The section's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("experiments always serialize")
    }

    /// Decodes and validates the section.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let experiments: Self =
            rmp_serde::from_slice(bytes).map_err(|e| invalid("experiments", e))?;
        experiments
            .validate()
            .map_err(|e| invalid("experiments", e))?;
        Ok(experiments)
    }

    /// Checks every experiment; the error names `experiments[i].key`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (index, experiment) in self.experiments.iter().enumerate() {
            experiment
                .validate()
                .map_err(|e| e.within(&format!("experiments[{index}]")))?;
            if self.experiments[..index]
                .iter()
                .any(|e| e.name == experiment.name)
            {
                return Err(ConfigError::new(
                    format!("experiments[{index}].name"),
                    format!("{:?} appears twice", experiment.name),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment(weights: &[u32]) -> Experiment {
        Experiment {
            name: "diversity".into(),
            salt: "s1".into(),
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Variant {
                    name: format!("arm{i}"),
                    weight,
                    rules: None,
                })
                .collect(),
        }
    }

    #[test]
    fn assignment_is_stable_and_follows_the_weights() {
        let e = experiment(&[1, 3, 0]);
        e.validate().unwrap();
        let mut counts = [0usize; 3];
        for user in 0..40_000 {
            let id = format!("user-{user}");
            let arm = e.assign(&id);
            assert_eq!(arm, e.assign(&id), "the same user lands in the same arm");
            counts[arm.name[3..].parse::<usize>().unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "a zero-weight arm gets nobody");
        let share = counts[1] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.01, "{counts:?}");
        // Another salt splits the same users independently.
        let mut other = e.clone();
        other.salt = "s2".into();
        let moved = (0..10_000)
            .filter(|u| {
                let id = format!("user-{u}");
                e.assign(&id).name != other.assign(&id).name
            })
            .count();
        assert!((3_000..4_500).contains(&moved), "{moved}");
    }

    #[test]
    fn bad_rules_and_experiments_are_named() {
        let rules = BusinessRules {
            promoted_positions: vec![2, 5, 2],
            ..BusinessRules::default()
        };
        assert_eq!(
            BusinessRules::from_bytes(&rules.to_bytes())
                .unwrap_err()
                .to_string(),
            "invalid bundle: section `rules` is invalid: invalid value for `promoted_positions`: must not repeat a position"
        );
        let mut arms = experiment(&[1, 1]);
        arms.variants[1].name = "arm0".into();
        let section = Experiments {
            experiments: vec![arms],
        };
        assert!(
            Experiments::from_bytes(&section.to_bytes())
                .unwrap_err()
                .to_string()
                .contains("`experiments[0].variants[1].name`")
        );
        let nobody = Experiments {
            experiments: vec![experiment(&[0, 0])],
        };
        assert!(nobody.validate().is_err());
        let fine = Experiments {
            experiments: vec![experiment(&[50, 50])],
        };
        assert_eq!(Experiments::from_bytes(&fine.to_bytes()).unwrap(), fine);
        assert_eq!(
            BusinessRules::from_bytes(&BusinessRules::default().to_bytes()).unwrap(),
            BusinessRules::default()
        );
        assert!(BusinessRules::from_bytes(b"\xc1").is_err());
    }
}
