use std::collections::HashMap;

use super::*;
use crate::data::{Dataset, read_manifest};

fn generate_into(dir: &Path, config: &GeneratorConfig) -> Generated {
    generate(config, dir, false).unwrap()
}

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let config = GeneratorConfig {
        users: 300,
        videos: 200,
        interactions: 5_000,
        ..GeneratorConfig::default()
    };
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    generate_into(a.path(), &config);
    generate_into(b.path(), &config);
    generate_into(
        c.path(),
        &GeneratorConfig {
            seed: 7,
            ..config.clone()
        },
    );
    let (a, b, c) = (read_all(a.path()), read_all(b.path()), read_all(c.path()));
    assert_eq!(a.len(), 5, "four tables and the manifest");
    assert_eq!(a, b);
    let interactions = |files: &[(String, Vec<u8>)]| {
        files
            .iter()
            .find(|f| f.0 == "interactions.parquet")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(interactions(&a), interactions(&c));
}

#[test]
fn writes_exactly_what_was_asked_and_it_validates() {
    let dir = tempfile::tempdir().unwrap();
    let config = GeneratorConfig {
        users: 500,
        videos: 300,
        interactions: 12_345,
        negative_ratio: 2,
        seed: 3,
    };
    let generated = generate_into(dir.path(), &config);
    let dataset = Dataset::load(dir.path()).unwrap();
    assert_eq!(dataset.users.len(), 500);
    assert_eq!(dataset.videos.len(), 300);
    assert_eq!(dataset.channels.len(), 15);
    assert_eq!(dataset.interactions.len(), 12_345);
    assert_eq!(generated.interactions, 12_345);
    let manifest = read_manifest(dir.path()).unwrap();
    assert_eq!(manifest.counts, dataset.counts());
    assert_eq!(manifest.time_range, dataset.time_range());
    assert_eq!(manifest.source, "synthetic");
    // Every engaged view is one click with `negative_ratio` impressions; a user's row budget
    // may cut their last view short after its impressions, hence the tolerance.
    let count = |kind| {
        dataset
            .interactions
            .iter()
            .filter(|i| i.interaction_type == kind)
            .count() as f64
    };
    let clicks = count(InteractionType::Click);
    let impressions = count(InteractionType::Impression);
    assert!(
        (impressions / clicks - 2.0).abs() < 0.2,
        "{impressions} impressions for {clicks} clicks"
    );
    assert!(count(InteractionType::Like) > 0.0 && count(InteractionType::Share) > 0.0);
}

#[test]
fn refuses_an_empty_world() {
    let dir = tempfile::tempdir().unwrap();
    let err = generate(
        &GeneratorConfig {
            users: 0,
            ..GeneratorConfig::default()
        },
        dir.path(),
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("column `users`: must be at least 1"),
        "{err}"
    );
}

/// The data carries signal a model can learn: what a user engaged with in the first half
/// of their history predicts the categories of the second half far above chance, and
/// watch time is longer in a user's favourite category.
#[test]
fn users_come_back_to_their_categories() {
    let dir = tempfile::tempdir().unwrap();
    let config = GeneratorConfig {
        users: 2_000,
        videos: 2_000,
        interactions: 200_000,
        ..GeneratorConfig::default()
    };
    generate_into(dir.path(), &config);
    let dataset = Dataset::load(dir.path()).unwrap();
    let category: HashMap<u64, &str> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.category.as_str()))
        .collect();
    let duration: HashMap<u64, u32> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.duration_seconds))
        .collect();

    let clicks: Vec<&Interaction> = dataset
        .interactions
        .iter()
        .filter(|i| i.interaction_type == InteractionType::Click)
        .collect();
    let mut share: HashMap<&str, f64> = HashMap::new();
    for click in &clicks {
        *share.entry(category[&click.video_id]).or_default() += 1.0 / clicks.len() as f64;
    }

    let (mut hits, mut expected, mut trials) = (0.0, 0.0, 0.0);
    let (mut favourite_ratio, mut other_ratio) = (Vec::new(), Vec::new());
    for user in clicks.chunk_by(|a, b| a.user_id == b.user_id) {
        if user.len() < 8 {
            continue;
        }
        let (first, second) = user.split_at(user.len() / 2);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for click in first {
            *counts.entry(category[&click.video_id]).or_default() += 1;
        }
        let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let top: Vec<&str> = ranked.iter().take(2).map(|r| r.0).collect();
        for click in second {
            trials += 1.0;
            hits += f64::from(top.contains(&category[&click.video_id]));
            expected += top.iter().map(|c| share[c]).sum::<f64>();
        }
        let favourite = top[0];
        for watch in dataset.interactions.iter().filter(|i| {
            i.user_id == user[0].user_id && i.interaction_type == InteractionType::Watch
        }) {
            let ratio =
                f64::from(watch.watch_seconds.unwrap()) / f64::from(duration[&watch.video_id]);
            if category[&watch.video_id] == favourite {
                favourite_ratio.push(ratio);
            } else {
                other_ratio.push(ratio);
            }
        }
    }
    assert!(trials > 5_000.0, "enough users with history: {trials}");
    let lift = hits / expected;
    assert!(
        lift > 2.5,
        "second-half hits {hits} vs {expected:.0} by chance: lift {lift:.2}"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&favourite_ratio) > mean(&other_ratio),
        "watch ratio in the favourite category {:.3} vs elsewhere {:.3}",
        mean(&favourite_ratio),
        mean(&other_ratio)
    );
}
