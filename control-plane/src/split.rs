//! Train / validation / test splits of a data set's interactions, all temporal.
//!
//! - `leave-last-n`: per user, the last `test_n` videos the user engaged with (ordered by
//!   their first positive interaction) and everything the user did from then on go to test;
//!   the `validation_n` before them, likewise, to validation. Users with too few positives
//!   for that stay whole in train (they still teach the model).
//! - `time-cut`: one global cut: the latest `test_fraction` of interactions is test, the
//!   `validation_fraction` before it validation.
//!
//! Interactions at the same second are ordered by a hash of (seed, user, video), not by
//! id, since ids often follow popularity. A split folder holds `train.parquet`,
//! `validation.parquet`, `test.parquet` and `split.json`.

use std::collections::HashMap;
use std::path::Path;

use edge::{EngagementRules, Interaction, Video, engagement_weight};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::DataError;
use crate::data::{remove_if_present, write_json_atomically};
use crate::parquet_io::{read_table, write_table};

/// File name of the split manifest.
pub const SPLIT_MANIFEST: &str = "split.json";

/// How to split (the `[split]` section of the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// `leave-last-n` or `time-cut`.
    pub strategy: Strategy,
    /// Positives per user held out for test (`leave-last-n`).
    pub test_n: u32,
    /// Positives per user held out for validation (`leave-last-n`).
    pub validation_n: u32,
    /// Share of interactions held out for test (`time-cut`).
    pub test_fraction: f64,
    /// Share of interactions held out for validation (`time-cut`).
    pub validation_fraction: f64,
    /// Seed of the tie-break between interactions at the same second.
    pub seed: u64,
}

/// The split strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Per-user temporal leave-last-N-out.
    LeaveLastN,
    /// One global time cut.
    TimeCut,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::LeaveLastN,
            test_n: 1,
            validation_n: 1,
            test_fraction: 0.1,
            validation_fraction: 0.1,
            seed: 42,
        }
    }
}

impl SplitConfig {
    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), edge::ConfigError> {
        use edge::ConfigError;
        match self.strategy {
            Strategy::LeaveLastN if self.test_n == 0 => {
                Err(ConfigError::new("test_n", "must be at least 1"))
            }
            Strategy::TimeCut => {
                for (key, value) in [
                    ("test_fraction", self.test_fraction),
                    ("validation_fraction", self.validation_fraction),
                ] {
                    if !(0.0..1.0).contains(&value) {
                        return Err(ConfigError::new(
                            key,
                            format!("must be in [0, 1), got {value}"),
                        ));
                    }
                }
                if self.test_fraction == 0.0 || self.test_fraction + self.validation_fraction >= 1.0
                {
                    return Err(ConfigError::new(
                        "test_fraction",
                        "must be above 0 and leave room for training (test + validation < 1)",
                    ));
                }
                Ok(())
            }
            Strategy::LeaveLastN => Ok(()),
        }
    }
}

/// One part of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSummary {
    /// Interactions.
    pub interactions: u64,
    /// Distinct users.
    pub users: u64,
    /// Earliest and latest timestamp.
    pub time_range: Option<(i64, i64)>,
}

/// What `split.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitManifest {
    /// How the split was made.
    pub config: SplitConfig,
    /// The data set folder it was made from.
    pub dataset: String,
    /// Training part.
    pub train: PartSummary,
    /// Validation part.
    pub validation: PartSummary,
    /// Test part.
    pub test: PartSummary,
}

/// The three parts, in time order within each user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    /// Training interactions.
    pub train: Vec<Interaction>,
    /// Validation interactions.
    pub validation: Vec<Interaction>,
    /// Test interactions.
    pub test: Vec<Interaction>,
}

impl Split {
    /// Reads a split folder.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        Ok(Self {
            train: read_table(&dir.join("train.parquet"))?,
            validation: read_table(&dir.join("validation.parquet"))?,
            test: read_table(&dir.join("test.parquet"))?,
        })
    }

    /// Writes the parts, then `split.json`.
    pub fn save(
        &self,
        dir: &Path,
        config: &SplitConfig,
        dataset: &Path,
    ) -> Result<SplitManifest, DataError> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        remove_if_present(&dir.join(SPLIT_MANIFEST))?;
        write_table(&dir.join("train.parquet"), &self.train)?;
        write_table(&dir.join("validation.parquet"), &self.validation)?;
        write_table(&dir.join("test.parquet"), &self.test)?;
        let manifest = SplitManifest {
            config: config.clone(),
            dataset: dataset.display().to_string(),
            train: summarize(&self.train),
            validation: summarize(&self.validation),
            test: summarize(&self.test),
        };
        write_json_atomically(&dir.join(SPLIT_MANIFEST), &manifest)?;
        Ok(manifest)
    }
}

fn summarize(part: &[Interaction]) -> PartSummary {
    let mut users: Vec<u64> = part.iter().map(|i| i.user_id).collect();
    users.sort_unstable();
    users.dedup();
    let times = part.iter().map(|i| i.timestamp);
    PartSummary {
        interactions: part.len() as u64,
        users: users.len() as u64,
        time_range: times.clone().min().zip(times.max()),
    }
}

/// Splits `interactions` as `config` says; `videos` give durations for the engagement rules.
pub fn split(
    interactions: &[Interaction],
    videos: &[Video],
    rules: &EngagementRules,
    config: &SplitConfig,
) -> Result<Split, edge::ConfigError> {
    config.validate().map_err(|e| e.within("split"))?;
    let tie_break = |i: &Interaction| {
        let mut key = [0u8; 24];
        key[..8].copy_from_slice(&config.seed.to_le_bytes());
        key[8..16].copy_from_slice(&i.user_id.to_le_bytes());
        key[16..].copy_from_slice(&i.video_id.to_le_bytes());
        xxh3_64(&key)
    };
    let mut ordered: Vec<&Interaction> = interactions.iter().collect();
    match config.strategy {
        Strategy::LeaveLastN => {
            ordered.sort_by_key(|i| (i.user_id, i.timestamp, tie_break(i)));
            let durations: HashMap<u64, u32> = videos
                .iter()
                .map(|v| (v.video_id, v.duration_seconds))
                .collect();
            let is_positive = |i: &Interaction| {
                let duration = durations.get(&i.video_id).copied().unwrap_or(0);
                rules.is_positive(engagement_weight(
                    rules,
                    i.interaction_type,
                    i.watch_seconds,
                    duration,
                ))
            };
            let mut out = Split::default();
            for user in ordered.chunk_by(|a, b| a.user_id == b.user_id) {
                // Position of each distinct positive video's first positive interaction.
                let mut firsts: Vec<usize> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for (position, interaction) in user.iter().enumerate() {
                    if is_positive(interaction) && seen.insert(interaction.video_id) {
                        firsts.push(position);
                    }
                }
                let held_out = (config.test_n + config.validation_n) as usize;
                if firsts.len() <= held_out {
                    out.train.extend(user.iter().map(|&i| i.clone()));
                    continue;
                }
                let test_from = firsts[firsts.len() - config.test_n as usize];
                let validation_from = firsts[firsts.len() - held_out];
                out.train
                    .extend(user[..validation_from].iter().map(|&i| i.clone()));
                out.validation
                    .extend(user[validation_from..test_from].iter().map(|&i| i.clone()));
                out.test
                    .extend(user[test_from..].iter().map(|&i| i.clone()));
            }
            Ok(out)
        }
        Strategy::TimeCut => {
            ordered.sort_by_key(|i| (i.timestamp, tie_break(i)));
            let total = ordered.len();
            let test_from = total - (total as f64 * config.test_fraction).round() as usize;
            let validation_from = test_from
                .saturating_sub((total as f64 * config.validation_fraction).round() as usize);
            let part = |range: std::ops::Range<usize>| {
                let mut rows: Vec<Interaction> =
                    ordered[range].iter().map(|&i| i.clone()).collect();
                rows.sort_by_key(|i| (i.user_id, i.timestamp, tie_break(i)));
                rows
            };
            Ok(Split {
                train: part(0..validation_from),
                validation: part(validation_from..test_from),
                test: part(test_from..total),
            })
        }
    }
}

#[cfg(test)]
mod tests;
