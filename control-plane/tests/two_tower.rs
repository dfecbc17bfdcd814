//! The two-tower model on MovieLens-100k (from `EDGEREC_ML100K`, set by `cargo xtask test`):
//! it must beat the baselines by the margins on the held-out test positives.

mod common;

use std::collections::HashSet;

use control_plane::config::TwoTowerConfig;
use control_plane::eval::{EvalSet, ItemKnn, MostPopular, Part, evaluate, training_histories};
use control_plane::movielens;
use control_plane::shard_build::{ShardConfig, build_shard};
use control_plane::title_encoder::TitleEncoder;
use control_plane::two_tower::{TrainError, TrainedRetriever, TrainingData, train};
use edge::InteractionType;
use edge::shard::Shard;

#[test]
fn two_tower_beats_the_baselines_on_movielens() {
    let prepared = common::movielens();
    let data = prepared.training_data(None);
    let common::Prepared {
        dataset,
        rules,
        parts,
        ..
    } = &prepared;
    // Three epochs keep the test short; the default ten gain a few points more.
    let config = TwoTowerConfig {
        epochs: 3,
        ..TwoTowerConfig::default()
    };
    let mut epochs = Vec::new();
    let (trained, report) =
        train(&data, &config, false, |line| epochs.push(line.to_owned())).unwrap();
    assert_eq!(report.epochs, 3, "{epochs:?}");

    let set = EvalSet::new(parts, &dataset.videos, rules, Part::Test);
    let histories = training_histories(parts, &dataset.videos, rules, Part::Test);
    let popular = evaluate(&MostPopular::fit(&histories, &set.catalogue), &set).metric("recall@50");
    let knn = evaluate(&ItemKnn::fit(&histories, &set.catalogue, 100), &set).metric("recall@50");
    let two_tower = evaluate(&trained, &set).metric("recall@50");
    assert!(
        two_tower >= 1.5 * popular && two_tower >= knn,
        "recall@50: two-tower {two_tower:.4}, most-popular {popular:.4}, item-knn {knn:.4}"
    );

    // The shard of the real video embeddings finds what exact search finds, for the
    // real user embeddings as queries.
    let (ids, vectors) = trained.video_embeddings();
    let dim = trained.model.spec.output_dim;
    let (bytes, _) = build_shard(ids, vectors, dim, &ShardConfig::default(), &[]).unwrap();
    let shard = Shard::open(bytes).unwrap();
    let (mut found, mut wanted) = (0usize, 0usize);
    for user in &set.users {
        let query = trained.user_embedding(user).unwrap();
        let mut exact: Vec<(f32, u64)> = vectors
            .chunks_exact(dim)
            .zip(ids)
            .map(|(v, &id)| (v.iter().zip(&query).map(|(a, b)| a * b).sum(), id))
            .collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
        let truth: HashSet<u64> = exact.iter().take(100).map(|e| e.1).collect();
        let hits = shard.nns(100).search(&query).unwrap();
        found += hits.iter().filter(|(id, _)| truth.contains(id)).count();
        wanted += truth.len();
    }
    let recall = found as f64 / wanted as f64;
    assert!(
        recall >= 0.95,
        "shard recall@100 on the trained embeddings: {recall:.4}"
    );
    let err = shard.nns(10).search(&vec![0.1; dim + 1]).unwrap_err();
    assert!(err.to_string().contains(&dim.to_string()), "{err}");
}

#[test]
fn with_minilm_titles_and_extra_negatives_it_still_beats_the_baselines() {
    let title_model = common::title_model_dir();
    let prepared = common::movielens();
    let common::Prepared {
        dataset,
        rules,
        parts,
        ..
    } = &prepared;
    let titles: Vec<&str> = dataset.videos.iter().map(|v| v.title.as_str()).collect();
    let title_vectors = TitleEncoder::load(&title_model)
        .unwrap()
        .encode(&titles, |_| {})
        .unwrap();
    let data = prepared.training_data(Some(&title_vectors));
    let config = TwoTowerConfig {
        epochs: 3,
        keep_best_epoch: false,
        extra_negatives: 128,
        ..TwoTowerConfig::default()
    };
    let (trained, report) = train(&data, &config, false, |_| {}).unwrap();
    assert_eq!(trained.model.title_vector_dim(), Some(384));
    assert_eq!(
        (report.epochs, report.best_epoch),
        (3, 3),
        "every epoch trained, the last kept"
    );

    let set = EvalSet::new(parts, &dataset.videos, rules, Part::Test);
    let histories = training_histories(parts, &dataset.videos, rules, Part::Test);
    let popular = evaluate(&MostPopular::fit(&histories, &set.catalogue), &set).metric("recall@50");
    let knn = evaluate(&ItemKnn::fit(&histories, &set.catalogue, 100), &set).metric("recall@50");
    let two_tower = evaluate(&trained, &set).metric("recall@50");
    assert!(
        two_tower >= 1.5 * popular && two_tower >= knn,
        "recall@50: two-tower {two_tower:.4}, most-popular {popular:.4}, item-knn {knn:.4}"
    );

    // Saved weights come back with the same title vectors, and only with those.
    let spec = trained.model.spec.clone();
    let reloaded = TrainedRetriever::load(trained.model.tensors(), spec.clone(), &data).unwrap();
    assert_eq!(
        evaluate(&reloaded, &set).metric("recall@50"),
        two_tower,
        "a reloaded model ranks as the trained one"
    );
    let without_titles = TrainingData {
        title_vectors: None,
        ..data
    };
    let err = TrainedRetriever::load(trained.model.tensors(), spec, &without_titles)
        .err()
        .unwrap();
    assert!(matches!(err, TrainError::TitleMismatch(_)), "{err}");
    assert!(err.to_string().contains("title model"), "{err}");
}

#[test]
fn a_split_without_positives_is_refused() {
    let mut dataset = movielens::import(&common::movielens_dir()).unwrap();
    for interaction in &mut dataset.interactions {
        interaction.interaction_type = InteractionType::Impression;
    }
    let prepared = common::prepare(dataset);
    let data = prepared.training_data(None);
    let err = train(&data, &TwoTowerConfig::default(), false, |_| {})
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "cannot train the two-tower model: the training split has no positive interactions"
    );
}
