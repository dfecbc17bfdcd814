use super::*;
use edge::{ContentRating, InteractionType};

fn video(video_id: u64) -> Video {
    Video {
        video_id,
        title: String::new(),
        category: "c".into(),
        child_categories: vec![],
        channel_id: 0,
        duration_seconds: 100,
        tags: vec![],
        language: "en".into(),
        upload_time: None,
        view_count: 0,
        like_count: 0,
        comment_count: 0,
        content_rating: ContentRating::General,
        regions: vec![],
    }
}

fn event(user_id: u64, video_id: u64, timestamp: i64, kind: InteractionType) -> Interaction {
    Interaction {
        user_id,
        video_id,
        timestamp,
        interaction_type: kind,
        watch_seconds: (kind == InteractionType::Watch).then_some(90),
        device: "tv".into(),
    }
}

fn videos() -> Vec<Video> {
    (0..10).map(video).collect()
}

#[test]
fn leave_last_n_holds_out_the_latest_positives_per_user() {
    use InteractionType::*;
    let interactions = vec![
        // User 1: positives on videos 1, 2, 3 (2 twice), impressions in between.
        event(1, 1, 10, Click),
        event(1, 9, 15, Impression),
        event(1, 2, 20, Watch),
        event(1, 2, 25, Like),
        event(1, 8, 28, Impression),
        event(1, 3, 30, Click),
        event(1, 7, 40, Impression),
        // User 2: two positives only: too few to hold out, all train.
        event(2, 1, 5, Like),
        event(2, 2, 6, Like),
    ];
    let parts = split(
        &interactions,
        &videos(),
        &EngagementRules::default(),
        &SplitConfig::default(),
    )
    .unwrap();
    let ids = |part: &[Interaction]| {
        part.iter()
            .map(|i| (i.user_id, i.video_id, i.timestamp))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&parts.train),
        vec![(1, 1, 10), (1, 9, 15), (2, 1, 5), (2, 2, 6)]
    );
    assert_eq!(
        ids(&parts.validation),
        vec![(1, 2, 20), (1, 2, 25), (1, 8, 28)]
    );
    assert_eq!(ids(&parts.test), vec![(1, 3, 30), (1, 7, 40)]);
}

#[test]
fn a_short_watch_is_not_a_positive() {
    use InteractionType::*;
    let mut short = event(1, 4, 35, Watch);
    short.watch_seconds = Some(10);
    let interactions = vec![
        event(1, 1, 10, Click),
        event(1, 2, 20, Click),
        event(1, 3, 30, Click),
        short,
    ];
    let parts = split(
        &interactions,
        &videos(),
        &EngagementRules::default(),
        &SplitConfig::default(),
    )
    .unwrap();
    assert_eq!(
        parts.test.len(),
        2,
        "the short watch trails the last positive into test"
    );
    assert_eq!(parts.test[0].video_id, 3);
}

#[test]
fn time_cut_is_global() {
    let interactions: Vec<Interaction> = (0..100)
        .map(|t| event(t % 7, t % 10, t as i64, InteractionType::Click))
        .collect();
    let config = SplitConfig {
        strategy: Strategy::TimeCut,
        ..SplitConfig::default()
    };
    let parts = split(
        &interactions,
        &videos(),
        &EngagementRules::default(),
        &config,
    )
    .unwrap();
    assert_eq!(
        (parts.train.len(), parts.validation.len(), parts.test.len()),
        (80, 10, 10)
    );
    assert!(parts.train.iter().all(|i| i.timestamp < 80));
    assert!(
        parts
            .validation
            .iter()
            .all(|i| (80..90).contains(&i.timestamp))
    );
    assert!(parts.test.iter().all(|i| i.timestamp >= 90));
}

#[test]
fn ties_break_by_seed_not_by_id() {
    // Ten positives at the same second: which one is "last" depends on the seed only.
    let interactions: Vec<Interaction> = (0..10)
        .map(|v| event(1, v, 100, InteractionType::Like))
        .collect();
    let held_out = |seed| {
        let config = SplitConfig {
            seed,
            validation_n: 0,
            ..SplitConfig::default()
        };
        let parts = split(
            &interactions,
            &videos(),
            &EngagementRules::default(),
            &config,
        )
        .unwrap();
        assert_eq!(parts.train.len() + parts.test.len(), 10);
        parts.test[0].video_id
    };
    assert_eq!(held_out(1), held_out(1));
    let picks: std::collections::HashSet<u64> = (0..20).map(held_out).collect();
    assert!(picks.len() > 3, "the seed decides: {picks:?}");
}

#[test]
fn bad_settings_name_the_key() {
    let config = SplitConfig {
        test_n: 0,
        ..SplitConfig::default()
    };
    let err = split(&[], &[], &EngagementRules::default(), &config).unwrap_err();
    assert_eq!(err.key, "split.test_n");
}

#[test]
fn save_and_load_round_trip_with_a_manifest() {
    use InteractionType::*;
    let interactions = vec![
        event(1, 1, 10, Click),
        event(1, 2, 20, Click),
        event(1, 3, 30, Click),
    ];
    let config = SplitConfig::default();
    let parts = split(
        &interactions,
        &videos(),
        &EngagementRules::default(),
        &config,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = parts.save(dir.path(), &config, Path::new("data")).unwrap();
    assert_eq!(Split::load(dir.path()).unwrap(), parts);
    assert_eq!(manifest.test.interactions, 1);
    assert_eq!(manifest.test.time_range, Some((30, 30)));
    let text = std::fs::read_to_string(dir.path().join(SPLIT_MANIFEST)).unwrap();
    let read: SplitManifest = serde_json::from_str(&text).unwrap();
    assert_eq!(read, manifest);
}
