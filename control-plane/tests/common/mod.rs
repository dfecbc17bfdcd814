//! Set-up shared by the integration tests: a data set split by the default rules, with
//! preprocessing fitted on its training part.

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use control_plane::data::Dataset;
use control_plane::movielens;
use control_plane::split::{Split, SplitConfig, split};
use control_plane::two_tower::TrainingData;
use edge::EngagementRules;
use edge::preprocess::{FitInput, PreprocessConfig, Preprocessor};

/// A data set ready for training.
pub struct Prepared {
    pub dataset: Dataset,
    pub rules: EngagementRules,
    pub parts: Split,
    pub preprocessor: Preprocessor,
}

impl Prepared {
    /// The two-tower model's view of this data set.
    pub fn training_data<'a>(&'a self, title_vectors: Option<&'a [f32]>) -> TrainingData<'a> {
        TrainingData {
            preprocessor: &self.preprocessor,
            videos: &self.dataset.videos,
            users: &self.dataset.users,
            split: &self.parts,
            rules: &self.rules,
            title_vectors,
        }
    }
}

/// MovieLens-100k's folder, which `cargo xtask test` fetches.
pub fn movielens_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("EDGEREC_ML100K")
            .expect("EDGEREC_ML100K is not set: run `cargo xtask test`"),
    )
}

/// The folder of the title model, which `cargo xtask test` fetches.
pub fn title_model_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("EDGEREC_TITLE_MODEL")
            .expect("EDGEREC_TITLE_MODEL is not set: run `cargo xtask test`"),
    )
}

/// `dataset` split with the default rules and config, preprocessing fitted on train.
pub fn prepare(dataset: Dataset) -> Prepared {
    prepare_with(dataset, &SplitConfig::default())
}

/// `dataset` split by `split_config` with the default rules, preprocessing fitted on train.
pub fn prepare_with(mut dataset: Dataset, split_config: &SplitConfig) -> Prepared {
    let rules = EngagementRules::default();
    let parts = split(&dataset.interactions, &dataset.videos, &rules, split_config).unwrap();
    dataset.count_engagement_where_missing(&parts.train);
    let preprocessor = Preprocessor::fit(
        FitInput {
            users: &dataset.users,
            videos: &dataset.videos,
            channels: &dataset.channels,
            train: &parts.train,
        },
        &PreprocessConfig::default(),
        &rules,
    )
    .unwrap();
    Prepared {
        dataset,
        rules,
        parts,
        preprocessor,
    }
}

/// MovieLens-100k, prepared.
pub fn movielens() -> Prepared {
    prepare(movielens::import(&movielens_dir()).unwrap())
}
