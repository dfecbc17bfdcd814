//! The ranker's input row, built by one function, [`ranker_features`], that the control
//! plane calls to make training rows and the edge calls at serving: the two cannot drift
//! apart.
//!
//! Columns ([`COLUMNS`]): the seed's categorical features (country, user language,
//! category, child categories, video language, day of week, device), its numeric features
//! (age z-score and bucket, log duration, log view/like/comment counts with like and
//! comment per subscriber, log subscribers and their tier, hour of day on the unit
//! circle), and the viewer-video features that make a second stage worth having: the
//! two-tower score (and its gap to the request's best, and the rank in the personalized
//! query, because raw scores are not comparable across viewers), the viewer's affinity to
//! the video's category and channel, the video's similarity to what the viewer watched
//! last (mean and maximum over the latest [`RECENT_HISTORY`] videos: the two-tower query
//! pools the whole history), the video's age, and which retrieval query found it. Missing numbers are NaN (the model's
//! NaN treatment decides); missing categories are the empty string.

use std::collections::BTreeMap;

use super::{CatValue, FeatureValue};
use crate::catalog::VideoRef;
use crate::preprocess::{Preprocessor, day_of_week, hour_cyclical};

/// Whether a column holds a number or a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A float feature.
    Float,
    /// A categorical feature.
    Categorical,
}

/// The ranker's columns in row order: name and kind.
pub const COLUMNS: [(&str, ColumnKind); 28] = [
    ("country", ColumnKind::Categorical),
    ("user_language", ColumnKind::Categorical),
    ("category", ColumnKind::Categorical),
    ("child_categories", ColumnKind::Categorical),
    ("video_language", ColumnKind::Categorical),
    ("interaction_day", ColumnKind::Categorical),
    ("device", ColumnKind::Categorical),
    ("retrieval_source", ColumnKind::Categorical),
    ("age", ColumnKind::Float),
    ("age_bucket", ColumnKind::Float),
    ("video_duration", ColumnKind::Float),
    ("view_count", ColumnKind::Float),
    ("like_count", ColumnKind::Float),
    ("likes_per_subscriber", ColumnKind::Float),
    ("comment_count", ColumnKind::Float),
    ("comments_per_subscriber", ColumnKind::Float),
    ("channel_subscribers", ColumnKind::Float),
    ("subscriber_tier", ColumnKind::Float),
    ("hour_sin", ColumnKind::Float),
    ("hour_cos", ColumnKind::Float),
    ("two_tower_score", ColumnKind::Float),
    ("two_tower_gap", ColumnKind::Float),
    ("retrieval_rank", ColumnKind::Float),
    ("category_affinity", ColumnKind::Float),
    ("channel_affinity", ColumnKind::Float),
    ("video_age_days", ColumnKind::Float),
    ("recent_similarity", ColumnKind::Float),
    ("recent_max_similarity", ColumnKind::Float),
];

/// The first column that needs the viewer's [`recent_vectors`]: a model with fewer
/// columns (trained before they existed) reads none of them, and serving skips the work.
pub const FIRST_RECENT_COLUMN: usize = 26;

/// How many of the viewer's latest videos `recent_similarity` compares a candidate with.
pub const RECENT_HISTORY: usize = 5;

/// The viewer's latest [`RECENT_HISTORY`] videos' embeddings (`vectors` oldest first, as
/// histories are kept): what a candidate's `recent_similarities` are taken against.
pub fn recent_vectors<V>(vectors: impl DoubleEndedIterator<Item = V>) -> Vec<V> {
    vectors.rev().take(RECENT_HISTORY).collect()
}

/// What the viewer watched before, reduced to what the affinity features need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewerHistory {
    categories: BTreeMap<String, u32>,
    channels: BTreeMap<u64, u32>,
    total: u32,
}

impl ViewerHistory {
    /// From the category and channel of each video in the viewer's history.
    pub fn new<'a>(videos: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut history = Self::default();
        for (category, channel) in videos {
            *history.categories.entry(category.to_owned()).or_default() += 1;
            *history.channels.entry(channel).or_default() += 1;
            history.total += 1;
        }
        history
    }

    /// Videos in the history.
    pub fn len(&self) -> u32 {
        self.total
    }

    /// Whether the viewer has no history.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn share(&self, count: Option<&u32>) -> f32 {
        if self.total == 0 {
            f32::NAN
        } else {
            count.copied().unwrap_or(0) as f32 / self.total as f32
        }
    }
}

/// The viewer side of a request (or of a training example: the viewer then).
#[derive(Debug, Clone, Copy)]
pub struct ViewerContext<'a> {
    /// Country code, if known.
    pub country: Option<&'a str>,
    /// Language, if known.
    pub language: Option<&'a str>,
    /// Age in years, if known.
    pub age: Option<u8>,
    /// Device class, if known.
    pub device: Option<&'a str>,
    /// Unix seconds of the request (the caller's clock; edge has none).
    pub time: i64,
    /// What the viewer watched before this request.
    pub history: &'a ViewerHistory,
}

/// One candidate video of a request.
#[derive(Debug, Clone, Copy)]
pub struct CandidateContext<'a> {
    /// The video, from the bundle's catalogue (training rows read the same catalogue).
    pub video: VideoRef<'a>,
    /// Inner product of the user and video embeddings.
    pub two_tower_score: f32,
    /// The best two-tower score among the request's candidates. Scores are only
    /// comparable within one viewer's query (their scale varies from viewer to viewer),
    /// so the ranker sees the gap to the best as well as the score itself.
    pub best_two_tower_score: f32,
    /// Position (0 = best) in the main personalized query's results, if it found this
    /// candidate.
    pub retrieval_rank: Option<u32>,
    /// Which retrieval query found it, e.g. `personalized`, `category`, `popular`.
    pub source: &'a str,
    /// Inner products of its embedding with each of the viewer's [`recent_vectors`]
    /// (empty without a history): the row carries their mean and their maximum.
    pub recent_similarities: &'a [f32],
}

/// The columns of a row that depend on the viewer alone, computed once for all of a
/// request's candidates (the hashes of its categorical values, its scaled age, its hour).
#[derive(Debug, Clone, Copy)]
pub struct ViewerColumns<'a> {
    preprocessor: &'a Preprocessor,
    viewer: ViewerContext<'a>,
    country: FeatureValue,
    language: FeatureValue,
    day: FeatureValue,
    device: FeatureValue,
    age: FeatureValue,
    age_bucket: FeatureValue,
    hour_sin: FeatureValue,
    hour_cos: FeatureValue,
}

impl<'a> ViewerColumns<'a> {
    /// `viewer`'s columns as `preprocessor` scales them.
    pub fn new(preprocessor: &'a Preprocessor, viewer: ViewerContext<'a>) -> Self {
        let cat = |value: &str| FeatureValue::Cat(CatValue::new(value));
        let or_nan = |value: Option<f32>| FeatureValue::Float(value.unwrap_or(f32::NAN));
        let age = viewer.age.map(f64::from);
        let [hour_sin, hour_cos] = hour_cyclical(viewer.time);
        Self {
            preprocessor,
            viewer,
            country: cat(viewer.country.unwrap_or("")),
            language: cat(viewer.language.unwrap_or("")),
            day: cat(&day_of_week(viewer.time).to_string()),
            device: cat(viewer.device.unwrap_or("")),
            age: or_nan(age.map(|a| preprocessor.age.scaled(a))),
            age_bucket: or_nan(age.map(|a| preprocessor.age.bucket(a) as f32)),
            hour_sin: FeatureValue::Float(hour_sin),
            hour_cos: FeatureValue::Float(hour_cos),
        }
    }
}

/// Appends the row of `candidate` for `viewer_columns`' viewer to `out`: [`COLUMNS`], in
/// order, scaled by the preprocessor the viewer's columns were computed with.
pub fn ranker_features(
    viewer_columns: &ViewerColumns<'_>,
    candidate: &CandidateContext<'_>,
    out: &mut Vec<FeatureValue>,
) {
    let preprocessor = viewer_columns.preprocessor;
    let viewer = &viewer_columns.viewer;
    let video = candidate.video;
    let cat = |value: &str| FeatureValue::Cat(CatValue::new(value));
    let float = FeatureValue::Float;
    let or_nan = |value: Option<f32>| float(value.unwrap_or(f32::NAN));
    let subscribers = video.channel_subscribers() as f64;
    let per_subscriber = |count: u64| float((count as f64 / subscribers.max(1.0)) as f32);
    let duration = (video.duration_seconds() > 0).then_some(f64::from(video.duration_seconds()));
    out.extend([
        viewer_columns.country,
        viewer_columns.language,
        cat(video.category()),
        cat(video.child_categories()),
        cat(video.language()),
        viewer_columns.day,
        viewer_columns.device,
        cat(candidate.source),
        viewer_columns.age,
        viewer_columns.age_bucket,
        or_nan(duration.map(|d| preprocessor.duration.scaled(d))),
        float(preprocessor.view_count.apply(video.view_count() as f64)),
        float(preprocessor.like_count.apply(video.like_count() as f64)),
        per_subscriber(video.like_count()),
        float(
            preprocessor
                .comment_count
                .apply(video.comment_count() as f64),
        ),
        per_subscriber(video.comment_count()),
        float(preprocessor.subscribers.scaled(subscribers)),
        float(preprocessor.subscribers.bucket(subscribers) as f32),
        viewer_columns.hour_sin,
        viewer_columns.hour_cos,
        float(candidate.two_tower_score),
        float(candidate.best_two_tower_score - candidate.two_tower_score),
        or_nan(candidate.retrieval_rank.map(|rank| rank as f32)),
        float(
            viewer
                .history
                .share(viewer.history.categories.get(video.category())),
        ),
        float(
            viewer
                .history
                .share(viewer.history.channels.get(&video.channel_id())),
        ),
        or_nan(
            video
                .upload_time()
                .map(|upload| ((viewer.time - upload).max(0) as f64 / 86_400.0) as f32),
        ),
        or_nan((!candidate.recent_similarities.is_empty()).then(|| {
            candidate.recent_similarities.iter().sum::<f32>()
                / candidate.recent_similarities.len() as f32
        })),
        float(
            candidate
                .recent_similarities
                .iter()
                .copied()
                .fold(f32::NAN, f32::max),
        ),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::preprocess::{FitInput, PreprocessConfig};
    use crate::{
        Channel, ContentRating, EngagementRules, Interaction, InteractionType, User, Video,
    };

    fn channels() -> Vec<Channel> {
        vec![
            Channel {
                channel_id: 7,
                subscriber_count: 1000,
            },
            Channel {
                channel_id: 8,
                subscriber_count: 50,
            },
        ]
    }

    fn video(video_id: u64, category: &str, channel_id: u64) -> Video {
        Video {
            video_id,
            title: format!("video {video_id}"),
            category: category.into(),
            child_categories: vec![format!("{category}/a"), format!("{category}/b")],
            channel_id,
            duration_seconds: 300,
            tags: vec![],
            language: "en".into(),
            upload_time: Some(1_700_000_000),
            view_count: 1000 * video_id,
            like_count: 10 * video_id,
            comment_count: video_id,
            content_rating: ContentRating::General,
            regions: vec![],
        }
    }

    fn preprocessor(videos: &[Video]) -> Preprocessor {
        let users = vec![User {
            user_id: 1,
            country: "US".into(),
            language: "en".into(),
            age: 30,
            gender: None,
            occupation: None,
        }];
        let channels = channels();
        let train: Vec<Interaction> = videos
            .iter()
            .map(|v| Interaction {
                user_id: 1,
                video_id: v.video_id,
                timestamp: 1_700_000_000,
                interaction_type: InteractionType::Like,
                watch_seconds: None,
                device: "mobile".into(),
            })
            .collect();
        Preprocessor::fit(
            FitInput {
                users: &users,
                videos,
                channels: &channels,
                train: &train,
            },
            &PreprocessConfig::default(),
            &EngagementRules::default(),
        )
        .unwrap()
    }

    fn value(row: &[FeatureValue], name: &str) -> FeatureValue {
        row[COLUMNS.iter().position(|c| c.0 == name).unwrap()]
    }

    #[test]
    fn a_row_has_every_column_in_order_and_kind() {
        let videos = vec![
            video(1, "music", 7),
            video(2, "news", 8),
            video(3, "music", 7),
        ];
        let pre = preprocessor(&videos);
        let history = ViewerHistory::new([("music", 7), ("music", 7), ("news", 8), ("sport", 9)]);
        let viewer = ViewerContext {
            country: Some("US"),
            language: Some("en"),
            age: Some(30),
            device: Some("mobile"),
            // Ten days after the upload.
            time: 1_700_000_000 + 10 * 86_400,
            history: &history,
        };
        let catalog = Catalog::build(&videos, &channels(), &[]).unwrap();
        let candidate = CandidateContext {
            video: catalog.get(1).unwrap(),
            two_tower_score: 0.75,
            best_two_tower_score: 0.875,
            retrieval_rank: Some(3),
            source: "personalized",
            recent_similarities: &[0.5, 0.0],
        };
        let mut row = Vec::new();
        ranker_features(&ViewerColumns::new(&pre, viewer), &candidate, &mut row);
        assert_eq!(row.len(), COLUMNS.len());
        for (value, (name, kind)) in row.iter().zip(COLUMNS) {
            let fits = matches!(
                (value, kind),
                (FeatureValue::Float(_), ColumnKind::Float)
                    | (FeatureValue::Cat(_), ColumnKind::Categorical)
            );
            assert!(fits, "{name}: {value:?} is not {kind:?}");
        }
        assert_eq!(
            value(&row, "category"),
            FeatureValue::Cat(CatValue::new("music"))
        );
        assert_eq!(
            value(&row, "child_categories"),
            FeatureValue::Cat(CatValue::new("music/a|music/b"))
        );
        assert_eq!(value(&row, "two_tower_score"), FeatureValue::Float(0.75));
        assert_eq!(value(&row, "two_tower_gap"), FeatureValue::Float(0.125));
        assert_eq!(value(&row, "retrieval_rank"), FeatureValue::Float(3.0));
        assert_eq!(value(&row, "category_affinity"), FeatureValue::Float(0.5));
        assert_eq!(value(&row, "channel_affinity"), FeatureValue::Float(0.5));
        assert_eq!(value(&row, "video_age_days"), FeatureValue::Float(10.0));
        assert_eq!(value(&row, "recent_similarity"), FeatureValue::Float(0.25));
        assert_eq!(
            value(&row, "recent_max_similarity"),
            FeatureValue::Float(0.5)
        );
        assert_eq!(
            value(&row, "likes_per_subscriber"),
            FeatureValue::Float(0.01)
        );
        let mut again = Vec::new();
        ranker_features(&ViewerColumns::new(&pre, viewer), &candidate, &mut again);
        assert_eq!(
            format!("{row:?}"),
            format!("{again:?}"),
            "the same inputs give the same row"
        );
    }

    #[test]
    fn the_recent_columns_start_where_serving_looks_for_them() {
        assert_eq!(COLUMNS[FIRST_RECENT_COLUMN].0, "recent_similarity");
        assert_eq!(COLUMNS[FIRST_RECENT_COLUMN + 1].0, "recent_max_similarity");
    }

    #[test]
    fn the_recent_vectors_are_the_latest_five() {
        assert_eq!(recent_vectors(0..8), vec![7, 6, 5, 4, 3]);
        assert_eq!(recent_vectors(0..2), vec![1, 0]);
    }

    #[test]
    fn an_anonymous_viewer_and_unknown_facts_are_missing_not_errors() {
        let mut unknown = video(4, "music", 99);
        unknown.duration_seconds = 0;
        unknown.upload_time = None;
        let pre = preprocessor(std::slice::from_ref(&unknown));
        let history = ViewerHistory::default();
        let viewer = ViewerContext {
            country: None,
            language: None,
            age: None,
            device: None,
            time: 0,
            history: &history,
        };
        let catalog = Catalog::build(std::slice::from_ref(&unknown), &channels(), &[]).unwrap();
        let candidate = CandidateContext {
            video: catalog.get(4).unwrap(),
            two_tower_score: 0.0,
            best_two_tower_score: 0.0,
            retrieval_rank: None,
            source: "popular",
            recent_similarities: &[],
        };
        let mut row = Vec::new();
        ranker_features(&ViewerColumns::new(&pre, viewer), &candidate, &mut row);
        for name in [
            "age",
            "age_bucket",
            "video_duration",
            "category_affinity",
            "channel_affinity",
            "video_age_days",
            "retrieval_rank",
            "recent_similarity",
            "recent_max_similarity",
        ] {
            assert!(
                matches!(value(&row, name), FeatureValue::Float(x) if x.is_nan()),
                "{name} should be missing"
            );
        }
        assert_eq!(value(&row, "country"), FeatureValue::Cat(CatValue::new("")));
        assert!(row.iter().all(|v| match v {
            FeatureValue::Float(x) => !x.is_infinite(),
            FeatureValue::Cat(_) => true,
        }));
    }
}
