//! The exported user tower: tract-onnx loads it and computes what candle computes.

use std::collections::HashMap;

use control_plane::config::TwoTowerConfig;
use control_plane::data::Dataset;
use control_plane::eval::positives_by_user;
use control_plane::onnx_export::export_user_tower;
use control_plane::split::{SplitConfig, split};
use control_plane::synthetic::{GeneratorConfig, generate};
use control_plane::two_tower::{TrainingData, train};
use edge::EngagementRules;
use edge::preprocess::{FitInput, PreprocessConfig, Preprocessor};
use edge::tower::{Viewer, encode_user};
use tract_onnx::prelude::*;

#[test]
fn tract_runs_the_exported_tower_like_candle() {
    let dir = tempfile::tempdir().unwrap();
    let generator = GeneratorConfig {
        users: 1_200,
        videos: 400,
        interactions: 40_000,
        ..GeneratorConfig::default()
    };
    generate(&generator, dir.path(), false).unwrap();
    let dataset = Dataset::load(dir.path()).unwrap();
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
    let config = TwoTowerConfig {
        epochs: 1,
        ..TwoTowerConfig::default()
    };
    let (trained, _) = train(&data, &config, false, |_| {}).unwrap();
    let model = &trained.model;
    let bytes = export_user_tower(model).unwrap();

    // Known users with their histories, then anonymous viewers (no id, no demographics).
    let durations: HashMap<u64, u32> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.duration_seconds))
        .collect();
    let categories: HashMap<u64, &str> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.category.as_str()))
        .collect();
    let histories = positives_by_user(&parts.train, &durations, &rules);
    let mut inputs: Vec<_> = dataset
        .users
        .iter()
        .take(1_000)
        .map(|u| {
            let viewer = Viewer {
                user_id: Some(u.user_id),
                country: Some(u.country.clone()),
                language: Some(u.language.clone()),
                age: Some(u.age),
            };
            let history = histories.get(&u.user_id).map(Vec::as_slice).unwrap_or(&[]);
            encode_user(&preprocessor, &model.spec, &viewer, history, |v| {
                categories.get(&v).copied()
            })
        })
        .collect();
    inputs.push(encode_user(
        &preprocessor,
        &model.spec,
        &Viewer::default(),
        &[],
        |_| None,
    ));
    let expected = model.user_embeddings(&inputs).unwrap();

    let n = inputs.len();
    let h = model.spec.history_length;
    let flat = |f: &dyn Fn(&edge::tower::UserTowerInput) -> Vec<i64>| -> Vec<i64> {
        inputs.iter().flat_map(f).collect()
    };
    let tensors: TVec<TValue> = tvec![
        Tensor::from_shape(&[n, h], &flat(&|i| i.history_videos.clone()))
            .unwrap()
            .into(),
        Tensor::from_shape(&[n, h], &flat(&|i| i.history_categories.clone()))
            .unwrap()
            .into(),
        Tensor::from_shape(
            &[n, h],
            &inputs
                .iter()
                .flat_map(|i| i.history_weights.clone())
                .collect::<Vec<f32>>()
        )
        .unwrap()
        .into(),
        Tensor::from_shape(&[n], &flat(&|i| vec![i.country]))
            .unwrap()
            .into(),
        Tensor::from_shape(&[n], &flat(&|i| vec![i.language]))
            .unwrap()
            .into(),
        Tensor::from_shape(&[n], &flat(&|i| vec![i.age_bucket]))
            .unwrap()
            .into(),
        Tensor::from_shape(&[n], &flat(&|i| vec![i.user]))
            .unwrap()
            .into(),
        Tensor::from_shape(
            &[n, 1],
            &inputs.iter().map(|i| i.dense[0]).collect::<Vec<f32>>()
        )
        .unwrap()
        .into(),
    ];
    let runnable = onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let outputs = runnable.run(tensors).unwrap();
    let found = outputs[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(found.shape(), &[n, model.spec.output_dim]);
    let worst = found
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-5,
        "largest difference between tract and candle: {worst}"
    );
}
