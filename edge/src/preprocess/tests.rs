use super::*;
use crate::entities::{ContentRating, InteractionType};

fn user(user_id: u64, country: &str, language: &str, age: u8) -> User {
    User {
        user_id,
        country: country.into(),
        language: language.into(),
        age,
        gender: Some("F".into()),
        occupation: None,
    }
}

fn video(video_id: u64, category: &str, language: &str, duration_seconds: u32) -> Video {
    Video {
        video_id,
        title: format!("video {video_id}"),
        category: category.into(),
        child_categories: vec![format!("{category}/sub")],
        channel_id: video_id % 2,
        duration_seconds,
        tags: vec!["common".into(), format!("tag{video_id}")],
        language: language.into(),
        upload_time: Some(1_600_000_000),
        view_count: video_id * 1000,
        like_count: video_id * 10,
        comment_count: video_id,
        content_rating: ContentRating::General,
        regions: vec![],
    }
}

fn watch(user_id: u64, video_id: u64, timestamp: i64, watch_seconds: u32) -> Interaction {
    Interaction {
        user_id,
        video_id,
        timestamp,
        interaction_type: InteractionType::Watch,
        watch_seconds: Some(watch_seconds),
        device: "mobile".into(),
    }
}

struct Fixture {
    users: Vec<User>,
    videos: Vec<Video>,
    channels: Vec<Channel>,
    train: Vec<Interaction>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            users: vec![
                user(1, "US", "en", 30),
                user(2, "FR", "fr", 50),
                user(3, "DE", "de", 20),
            ],
            videos: vec![
                video(10, "Comedy", "en", 100),
                video(11, "Drama", "fr", 4000),
                video(12, "Horror", "ja", 700),
            ],
            channels: vec![
                Channel {
                    channel_id: 0,
                    subscriber_count: 500,
                },
                Channel {
                    channel_id: 1,
                    subscriber_count: 2_000_000,
                },
            ],
            // User 3 and video 12 only appear outside the training split.
            train: vec![
                watch(1, 10, 100, 90),
                watch(2, 10, 200, 90),
                watch(2, 11, 300, 10),
            ],
        }
    }

    fn fit(&self) -> Preprocessor {
        Preprocessor::fit(
            FitInput {
                users: &self.users,
                videos: &self.videos,
                channels: &self.channels,
                train: &self.train,
            },
            &PreprocessConfig::default(),
            &EngagementRules::default(),
        )
        .unwrap()
    }
}

#[test]
fn vocabulary_orders_by_frequency_then_value() {
    let vocabulary = Vocabulary::fit(["b", "a", "c", "c", "b"].map(String::from), 1, 10, 2);
    assert_eq!(vocabulary.values(), &["b", "c", "a"].map(String::from));
    assert_eq!(vocabulary.known_index("b"), Some(2));
    assert_eq!(vocabulary.known_index("a"), Some(4));
    assert_eq!(vocabulary.value(3).map(String::as_str), Some("c"));
    assert_eq!(vocabulary.value(0), None);
    assert_eq!(vocabulary.len(), 5);
}

#[test]
fn vocabulary_sends_unknowns_to_a_stable_oov_bucket() {
    let vocabulary = Vocabulary::fit([7u64, 8, 9], 1, 10, 4);
    let bucket = vocabulary.index(&12345u64);
    assert!(bucket < 4);
    assert_eq!(bucket, vocabulary.index(&12345u64));
    // The bucket is a function of the key alone, not of the vocabulary's contents.
    assert_eq!(bucket, Vocabulary::fit([1u64], 1, 10, 4).index(&12345u64));
    assert_eq!(bucket as u64, 12345u64.stable_hash() % 4);
}

#[test]
fn vocabulary_min_count_and_max_size() {
    let vocabulary = Vocabulary::fit([1u64, 1, 1, 2, 2, 3], 2, 10, 1);
    assert_eq!(vocabulary.values(), &[1, 2]);
    let vocabulary = Vocabulary::fit([1u64, 1, 1, 2, 2, 3], 1, 1, 1);
    assert_eq!(vocabulary.values(), &[1]);
}

#[test]
fn buckets_use_the_seed_boundaries() {
    let config = PreprocessConfig::default();
    let age = Buckets::new(config.age_boundaries);
    assert_eq!(age.len(), 7);
    assert_eq!(age.index(17.0), 0);
    assert_eq!(age.index(18.0), 1);
    assert_eq!(age.index(64.9), 5);
    assert_eq!(age.index(90.0), 6);
    let duration = Buckets::new(config.duration_boundaries);
    assert_eq!(duration.index(59.0), 0);
    assert_eq!(duration.index(300.0), 2);
    assert_eq!(duration.index(7200.0), 5);
}

#[test]
fn z_score_standardises_and_survives_constant_input() {
    let z = ZScore::fit([1.0, 2.0, 3.0]);
    assert!((z.mean - 2.0).abs() < 1e-12);
    assert!((f64::from(z.apply(3.0)) - 1.224_744_871).abs() < 1e-6);
    let constant = ZScore::fit([5.0, 5.0]);
    assert_eq!(constant.apply(5.0), 0.0);
    assert_eq!(ZScore::fit([]).apply(2.0), 2.0);
}

#[test]
fn cyclical_hour_and_day_of_week() {
    let [sin, cos] = hour_cyclical(0);
    assert!(sin.abs() < 1e-6 && (cos - 1.0).abs() < 1e-6);
    let [sin, cos] = hour_cyclical(6 * 3600);
    assert!((sin - 1.0).abs() < 1e-6 && cos.abs() < 1e-6);
    let midnight_before = hour_cyclical(86_400 - 60);
    assert!(
        (midnight_before[1] - 1.0).abs() < 1e-3,
        "23:59 is next to 00:00"
    );
    assert_eq!(day_of_week(0), 3, "1970-01-01 was a Thursday");
    assert_eq!(day_of_week(1_732_492_800), 0, "2024-11-25 was a Monday");
    assert_eq!(day_of_week(-1), 2, "1969-12-31 was a Wednesday");
}

#[test]
fn popularity_levels_one_hot() {
    let levels = PopularityLevels::fit(0..=100, [0.5, 0.9, 0.99]);
    assert_eq!(levels.thresholds, [50.0, 90.0, 99.0]);
    assert_eq!(levels.level(0), 0);
    assert_eq!(levels.level(51), 1);
    assert_eq!(levels.level(95), 2);
    assert_eq!(levels.one_hot(100), [0.0, 0.0, 0.0, 1.0]);
}

#[test]
fn fit_uses_the_training_split_only() {
    let fixture = Fixture::new();
    let fitted = fixture.fit();
    assert_eq!(fitted.user_ids.values(), &[2, 1]);
    assert_eq!(
        fitted.user_ids.known_index(&3u64),
        None,
        "user 3 is not in train"
    );
    assert_eq!(fitted.video_ids.values(), &[10, 11]);
    assert_eq!(fitted.languages.values(), &["en", "fr"].map(String::from));
    assert_eq!(
        fitted.languages.known_index("ja"),
        None,
        "video 12 is not in train"
    );
    assert_eq!(fitted.categories.known_len(), 4);
    assert_eq!(
        fitted.tags.values(),
        &["common".to_string()],
        "min_tag_count 2"
    );
    assert_eq!(fitted.countries.known_len(), 2);
    assert_eq!(fitted.genders.values(), &["F".to_string()]);
    assert_eq!(fitted.occupations.known_len(), 0);
    // Ages 30 and 50: mean 40, std 10.
    assert_eq!(fitted.age.scaled(40.0), 0.0);
    assert_eq!(fitted.age.scaled(50.0), 1.0);
    assert_eq!(fitted.age.bucket(50.0), 4);
    // Video 10 has two positive watches; video 11's 10 s of 4000 s is not positive.
    assert_eq!(fitted.popularity.level(2), 1);
    assert_eq!(fitted.subscribers.bucket(2_000_000.0), 4);
}

#[test]
fn fit_refuses_an_empty_training_split() {
    let mut fixture = Fixture::new();
    fixture.train.clear();
    let err = Preprocessor::fit(
        FitInput {
            users: &fixture.users,
            videos: &fixture.videos,
            channels: &fixture.channels,
            train: &fixture.train,
        },
        &PreprocessConfig::default(),
        &EngagementRules::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot fit preprocessing: the training split has no interactions"
    );
}

#[test]
fn fit_is_deterministic_and_round_trips() {
    let fixture = Fixture::new();
    let fitted = fixture.fit();
    let bytes = fitted.to_bytes();
    assert_eq!(bytes, fixture.fit().to_bytes(), "same data, same bytes");
    let decoded = Preprocessor::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, fitted);
    assert_eq!(
        decoded.video_ids.index(&11u64),
        fitted.video_ids.index(&11u64)
    );
    assert_eq!(
        decoded.duration.scaled(600.0),
        fitted.duration.scaled(600.0)
    );
}

#[test]
fn decoding_refuses_garbage_truncation_and_other_versions() {
    let fitted = Fixture::new().fit();
    let bytes = fitted.to_bytes();
    let truncated = Preprocessor::from_bytes(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(
        truncated
            .to_string()
            .starts_with("cannot decode preprocessor:"),
        "{truncated}"
    );
    assert!(Preprocessor::from_bytes(b"not msgpack").is_err());
    let mut future = fitted;
    future.format_version = 99;
    let err = Preprocessor::from_bytes(&future.to_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "preprocessor has format version 99, this build reads version 1"
    );
}

#[test]
fn config_validation_names_the_key() {
    let config = PreprocessConfig {
        age_boundaries: vec![18.0, 18.0],
        ..PreprocessConfig::default()
    };
    let err = config.validate().unwrap_err().within("preprocess");
    assert_eq!(err.key, "preprocess.age_boundaries");
    let config = PreprocessConfig {
        popularity_quantiles: [0.9, 0.5, 0.99],
        ..PreprocessConfig::default()
    };
    assert_eq!(config.validate().unwrap_err().key, "popularity_quantiles");
}
