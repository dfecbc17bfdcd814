//! The two-tower model on MovieLens-100k (from `EDGEREC_ML100K`, set by `cargo xtask test`):
//! it must beat the baselines by the margins on the held-out test positives.

use std::path::PathBuf;

use control_plane::config::TwoTowerConfig;
use control_plane::eval::{EvalSet, ItemKnn, MostPopular, Part, evaluate, training_histories};
use control_plane::movielens;
use control_plane::split::{SplitConfig, split};
use control_plane::two_tower::{TrainingData, train};
use edge::preprocess::{FitInput, PreprocessConfig, Preprocessor};
use edge::{EngagementRules, InteractionType};

#[test]
fn two_tower_beats_the_baselines_on_movielens() {
    let dir = PathBuf::from(
        std::env::var_os("EDGEREC_ML100K")
            .expect("EDGEREC_ML100K is not set: run `cargo xtask test`"),
    );
    let dataset = movielens::import(&dir).unwrap();
    let rules = EngagementRules::default();
    let parts = split(
        &dataset.interactions,
        &dataset.videos,
        &rules,
        &SplitConfig::default(),
    )
    .unwrap();
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
    let data = TrainingData {
        preprocessor: &preprocessor,
        videos: &dataset.videos,
        users: &dataset.users,
        split: &parts,
        rules: &rules,
    };
    // Three epochs keep the test short; the default ten gain a few points more.
    let config = TwoTowerConfig {
        epochs: 3,
        ..TwoTowerConfig::default()
    };
    let mut epochs = Vec::new();
    let (trained, report) =
        train(&data, &config, false, |line| epochs.push(line.to_owned())).unwrap();
    assert_eq!(report.epochs, 3, "{epochs:?}");

    let set = EvalSet::new(&parts, &dataset.videos, &rules, Part::Test);
    let histories = training_histories(&parts, &dataset.videos, &rules, Part::Test);
    let popular = evaluate(&MostPopular::fit(&histories, &set.catalogue), &set).metric("recall@50");
    let knn = evaluate(&ItemKnn::fit(&histories, &set.catalogue, 100), &set).metric("recall@50");
    let two_tower = evaluate(&trained, &set).metric("recall@50");
    assert!(
        two_tower >= 1.5 * popular && two_tower >= knn,
        "recall@50: two-tower {two_tower:.4}, most-popular {popular:.4}, item-knn {knn:.4}"
    );
}

#[test]
fn a_split_without_positives_is_refused() {
    let dir = PathBuf::from(
        std::env::var_os("EDGEREC_ML100K")
            .expect("EDGEREC_ML100K is not set: run `cargo xtask test`"),
    );
    let mut dataset = movielens::import(&dir).unwrap();
    for interaction in &mut dataset.interactions {
        interaction.interaction_type = InteractionType::Impression;
    }
    let rules = EngagementRules::default();
    let parts = split(
        &dataset.interactions,
        &dataset.videos,
        &rules,
        &SplitConfig::default(),
    )
    .unwrap();
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
    let data = TrainingData {
        preprocessor: &preprocessor,
        videos: &dataset.videos,
        users: &dataset.users,
        split: &parts,
        rules: &rules,
    };
    let err = train(&data, &TwoTowerConfig::default(), false, |_| {})
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "cannot train the two-tower model: the training split has no positive interactions"
    );
}
