//! The typed configuration file (the seed's `configs/processing_config.yaml`), as TOML.
//!
//! Every section and key has a default, so an empty file is a valid config; a key that
//! is not known, or a value of the wrong type or out of range, is an error that names the
//! key. `control-plane config show` prints the defaults.

use std::path::Path;

use edge::preprocess::PreprocessConfig;
use edge::{ConfigError, EngagementRules};
use serde::{Deserialize, Serialize};

use crate::split::SplitConfig;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The positive-interaction rules and `min_watch_ratio`.
    pub engagement: EngagementRules,
    /// Vocabulary and normalizer fitting.
    pub preprocess: PreprocessConfig,
    /// Train / validation / test split.
    pub split: SplitConfig,
    /// The two-tower retrieval model.
    pub two_tower: TwoTowerConfig,
    /// The ranker.
    pub ranker: RankerConfig,
    /// Offline evaluation of the trained models.
    pub eval: EvalConfig,
    /// The business rules a bundle serves with (retrieval quotas, filters, ordering).
    pub rules: edge::rules::BusinessRules,
    /// The A/B experiments a bundle runs (`[[experiments]]`, each with `[[experiments.variants]]`).
    pub experiments: Vec<edge::rules::Experiment>,
}

/// Two-tower model settings (the seed's values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwoTowerConfig {
    /// Width of id and categorical embeddings.
    pub embedding_dim: usize,
    /// Hidden layer widths of both towers.
    pub hidden_layers: Vec<usize>,
    /// Width of the final, L2-normalised embedding.
    pub output_dim: usize,
    /// Softmax temperature of the in-batch loss.
    pub temperature: f64,
    /// Most recent watched videos the user tower pools.
    pub history_length: usize,
    /// Examples per batch.
    pub batch_size: usize,
    /// Passes over the training data, at most.
    pub epochs: usize,
    /// Keep the epoch with the best validation recall@50, stopping after two epochs
    /// without a gain (the default); false trains every epoch and keeps the last. On
    /// 100,000 videos with 400,000 interactions the best epoch was the first: about 100
    /// optimiser steps, which left the video embeddings near their initialisation (median
    /// pairwise cosine 0.94) and the shard's calibrated beam at ef 1536.
    pub keep_best_epoch: bool,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Uniformly drawn catalogue videos added to each batch's in-batch negatives (mixed
    /// negative sampling: they reach the long tail that in-batch negatives rarely hold).
    pub extra_negatives: usize,
    /// Folder of a BERT sentence encoder for titles (all-MiniLM-L6-v2's `config.json`,
    /// `tokenizer.json`, `model.safetensors`; `cargo xtask fixtures` fetches it). Unset:
    /// titles are a bag of hashed words. `--title-model` overrides it.
    pub title_model: Option<std::path::PathBuf>,
    /// Above this many distinct titles the sentence encoder is skipped for hashed words
    /// (it encodes a few hundred titles a second on 2 cores).
    pub max_title_sentences: usize,
    /// The validation after each epoch (early stopping) ranks the whole catalogue for at
    /// most this many validation users, a seeded sample above that: at 50,000 videos a
    /// user costs about a millisecond, and 10,000 users measure recall@50 to about +-0.005.
    pub validation_users: usize,
    /// How the published tower stores its embedding tables: `"int8"` (one f32 scale per
    /// row; a quarter of the bytes) or `"f32"` (as trained).
    pub table_precision: crate::onnx_export::TablePrecision,
}

/// Offline evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Test evaluations (`train two-tower`'s table, `eval retrieval`, `eval ranking`) use
    /// at most this many test users, a seeded sample above that.
    pub max_users: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { max_users: 10_000 }
    }
}

impl Default for TwoTowerConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 64,
            hidden_layers: vec![256, 128],
            output_dim: 64,
            temperature: 0.05,
            history_length: 50,
            batch_size: 512,
            epochs: 10,
            keep_best_epoch: true,
            learning_rate: 0.001,
            seed: 42,
            extra_negatives: 0,
            title_model: None,
            max_title_sentences: 200_000,
            validation_users: 10_000,
            table_precision: crate::onnx_export::TablePrecision::Int8,
        }
    }
}

/// Ranker settings (the seed's values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankerConfig {
    /// Boosting rounds, at most.
    pub iterations: usize,
    /// Shrinkage of each tree.
    pub learning_rate: f64,
    /// Depth of each oblivious tree.
    pub depth: usize,
    /// L2 regularisation of leaf values.
    pub l2_leaf_reg: f64,
    /// Negatives sampled per positive when building training rows.
    pub negative_sample_ratio: usize,
    /// How many of each positive's negatives come from impressions without engagement
    /// (the rest: retrieved candidates not engaged with). Impressions show what the
    /// system that logged them chose to show: worth 1-3 when that was this system, harmful
    /// when it was another policy. On the synthetic data (impressions drawn by
    /// popularity) test NDCG@10 over the two-tower order was +6.2% with 0, +0.3% with 1,
    /// -20.9% with 3.
    pub impression_negatives: usize,
    /// Borders per numeric feature, at most.
    pub border_count: usize,
    /// Stop after this many rounds without improvement on validation.
    pub early_stopping_rounds: usize,
    /// Keep only the trees up to the best validation loss (CatBoost's option of the same
    /// name). Off: every tree trained is kept, e.g. to measure a model of a given size.
    pub use_best_model: bool,
    /// `Logloss` (labels 0/1) or `PairLogit` (pairs within a request).
    pub loss: String,
    /// Categorical columns with at most this many distinct training values are one-hot;
    /// the others become counter statistics (CTRs).
    pub one_hot_max_size: usize,
    /// Seed of the ordered statistics' permutation.
    pub seed: u64,
}

impl Default for RankerConfig {
    fn default() -> Self {
        Self {
            iterations: 1000,
            learning_rate: 0.03,
            depth: 6,
            l2_leaf_reg: 3.0,
            negative_sample_ratio: 3,
            impression_negatives: 0,
            border_count: 254,
            early_stopping_rounds: 50,
            use_best_model: true,
            loss: "Logloss".to_owned(),
            one_hot_max_size: 4,
            seed: 42,
        }
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value out of range.
    #[error("{path}: {cause}")]
    Invalid {
        /// The file.
        path: String,
        /// Which key and why.
        cause: ConfigError,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigFileError::Io {
            path: shown.clone(),
            cause,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigFileError::Parse { message, .. } => ConfigFileError::Parse {
                path: shown.clone(),
                message,
            },
            ConfigFileError::Invalid { cause, .. } => ConfigFileError::Invalid {
                path: shown.clone(),
                cause,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigFileError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigFileError::Parse {
            path: "<config>".into(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config
            .validate()
            .map_err(|cause| ConfigFileError::Invalid {
                path: "<config>".into(),
                cause,
            })?;
        Ok(config)
    }

    /// The defaults, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// Checks every value; the error names the dotted key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.engagement
            .validate()
            .map_err(|e| e.within("engagement"))?;
        self.preprocess
            .validate()
            .map_err(|e| e.within("preprocess"))?;
        self.split.validate().map_err(|e| e.within("split"))?;
        self.two_tower
            .validate()
            .map_err(|e| e.within("two_tower"))?;
        self.ranker.validate().map_err(|e| e.within("ranker"))?;
        at_least_one("max_users", self.eval.max_users).map_err(|e| e.within("eval"))?;
        self.rules.validate().map_err(|e| e.within("rules"))?;
        edge::rules::Experiments {
            experiments: self.experiments.clone(),
        }
        .validate()
    }
}

fn positive(key: &str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("must be a positive number, got {value}"),
        ))
    }
}

fn at_least_one(key: &str, value: usize) -> Result<(), ConfigError> {
    if value >= 1 {
        Ok(())
    } else {
        Err(ConfigError::new(key, "must be at least 1"))
    }
}

impl TwoTowerConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least_one("embedding_dim", self.embedding_dim)?;
        at_least_one("output_dim", self.output_dim)?;
        at_least_one("validation_users", self.validation_users)?;
        at_least_one("history_length", self.history_length)?;
        at_least_one("batch_size", self.batch_size)?;
        at_least_one("epochs", self.epochs)?;
        if self.hidden_layers.contains(&0) {
            return Err(ConfigError::new(
                "hidden_layers",
                "widths must be at least 1",
            ));
        }
        positive("temperature", self.temperature)?;
        positive("learning_rate", self.learning_rate)
    }
}

impl RankerConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least_one("iterations", self.iterations)?;
        if !(1..=16).contains(&self.depth) {
            return Err(ConfigError::new(
                "depth",
                format!("must be in 1..=16, got {}", self.depth),
            ));
        }
        if !(1..=254).contains(&self.border_count) {
            return Err(ConfigError::new(
                "border_count",
                format!("must be in 1..=254, got {}", self.border_count),
            ));
        }
        positive("learning_rate", self.learning_rate)?;
        at_least_one("negative_sample_ratio", self.negative_sample_ratio)?;
        if self.impression_negatives > self.negative_sample_ratio {
            return Err(ConfigError::new(
                "impression_negatives",
                format!(
                    "must be at most negative_sample_ratio ({}), got {}",
                    self.negative_sample_ratio, self.impression_negatives
                ),
            ));
        }
        if !(self.l2_leaf_reg >= 0.0 && self.l2_leaf_reg.is_finite()) {
            return Err(ConfigError::new(
                "l2_leaf_reg",
                "must be a non-negative number",
            ));
        }
        match self.loss.as_str() {
            "Logloss" | "PairLogit" => Ok(()),
            other => Err(ConfigError::new(
                "loss",
                format!("unknown loss {other:?}, expected Logloss or PairLogit"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_shipped_configs_parse() {
        let ten_million = Config::parse(include_str!("../../configs/synthetic-10m.toml")).unwrap();
        assert_eq!(ten_million.two_tower.epochs, 2);
        assert_eq!(ten_million.ranker.iterations, 300);
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::default().to_toml();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
        assert!(text.contains("temperature = 0.05"), "{text}");
        assert!(
            text.contains("hidden_layers = [\n    256,\n    128,\n]")
                || text.contains("hidden_layers = [256, 128]"),
            "{text}"
        );
    }

    #[test]
    fn seed_values() {
        let config = Config::default();
        assert_eq!(config.two_tower.hidden_layers, vec![256, 128]);
        assert_eq!(config.two_tower.output_dim, 64);
        assert_eq!(config.two_tower.temperature, 0.05);
        assert_eq!(config.ranker.negative_sample_ratio, 3);
        assert_eq!(config.engagement.min_watch_ratio, 0.4);
        assert_eq!(
            config.preprocess.age_boundaries,
            vec![18.0, 25.0, 35.0, 45.0, 55.0, 65.0]
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[two_tower]\ntemprature = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `temprature`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = Config::parse("[towers]\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `towers`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[ranker]\ndepth = \"six\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("depth") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn out_of_range_value_is_named() {
        let err = Config::parse("[two_tower]\ntemperature = -1.0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "<config>: invalid value for `two_tower.temperature`: must be a positive number, got -1"
        );
        let err = Config::parse("[split]\nstrategy = \"time-cut\"\ntest_fraction = 1.5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`split.test_fraction`"), "{err}");
        let err = Config::parse("[ranker]\nloss = \"RMSE\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`ranker.loss`"), "{err}");
        let err = Config::parse("[engagement]\nmin_watch_ratio = 2.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`engagement.min_watch_ratio`"), "{err}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgerec.toml");
        std::fs::write(&path, "[ranker]\ndepth = 40\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: invalid value for `ranker.depth`",
                path.display()
            )),
            "{err}"
        );
        let err = Config::load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
