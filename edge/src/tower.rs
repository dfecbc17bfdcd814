//! The user tower's inputs: how a viewer (known or anonymous) and their watch history
//! become the tensors of the user tower. Training builds its examples with
//! [`encode_user`] and serving calls the same function, so the tower never sees features
//! computed two ways.
//!
//! The tensor signature (batch `B`, history length `H` from [`UserTowerSpec`]), which a
//! tower trained elsewhere must accept to be served:
//!
//! | input | type | shape | meaning |
//! | --- | --- | --- | --- |
//! | `history_videos` | i64 | [B, H] | video-id vocabulary rows of the last H positives, newest first, 0-padded |
//! | `history_categories` | i64 | [B, H] | category vocabulary rows of the same videos |
//! | `history_weights` | f32 | [B, H] | recency weights, summing to 1 (all 0 without history) |
//! | `country` | i64 | [B] | country vocabulary row |
//! | `language` | i64 | [B] | language vocabulary row (shared with videos) |
//! | `age_bucket` | i64 | [B] | age bucket, or the extra last bucket when unknown |
//! | `user` | i64 | [B] | user-id vocabulary row; 0 (an OOV bucket) for anonymous viewers |
//! | `dense` | f32 | [B, 1] | age z-score (0 when unknown) |
//!
//! Output `embedding`: f32 [B, D], L2-normalised.

use serde::{Deserialize, Serialize};

use crate::preprocess::Preprocessor;

/// What the exported user tower was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserTowerSpec {
    /// History length H.
    pub history_length: usize,
    /// Weight of the n-th most recent video is `recency_decay^n`, before normalising.
    pub recency_decay: f32,
    /// Output dimension D.
    pub output_dim: usize,
}

impl UserTowerSpec {
    /// The bundle section's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a tower spec always serializes")
    }

    /// Decodes the bundle section; refuses a spec no tower can have.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::Error> {
        let invalid = |reason: String| crate::Error::InvalidBundle {
            section: Some("tower_spec"),
            reason: format!("is invalid: {reason}"),
        };
        let spec: Self = rmp_serde::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if spec.history_length == 0 || spec.output_dim == 0 || !spec.recency_decay.is_finite() {
            return Err(invalid(format!("{spec:?}")));
        }
        Ok(spec)
    }
}

/// A viewer as serving knows them: everything may be missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Viewer {
    /// Known id, if any.
    pub user_id: Option<u64>,
    /// Country code.
    pub country: Option<String>,
    /// Language code.
    pub language: Option<String>,
    /// Age in years.
    pub age: Option<u8>,
}

/// One viewer's user-tower inputs (one row of each tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct UserTowerInput {
    /// See the module table.
    pub history_videos: Vec<i64>,
    /// See the module table.
    pub history_categories: Vec<i64>,
    /// See the module table.
    pub history_weights: Vec<f32>,
    /// See the module table.
    pub country: i64,
    /// See the module table.
    pub language: i64,
    /// See the module table.
    pub age_bucket: i64,
    /// See the module table.
    pub user: i64,
    /// See the module table.
    pub dense: [f32; 1],
}

/// Rows of the age-bucket table: the buckets plus one for "unknown".
pub fn age_bucket_rows(preprocessor: &Preprocessor) -> usize {
    preprocessor.age.buckets.len() + 1
}

/// Encodes `viewer` with `history` (video ids, oldest first; only the last
/// `spec.history_length` count). `category_of` gives a video's category, when known.
pub fn encode_user<'c>(
    preprocessor: &Preprocessor,
    spec: &UserTowerSpec,
    viewer: &Viewer,
    history: &[u64],
    category_of: impl Fn(u64) -> Option<&'c str>,
) -> UserTowerInput {
    let length = spec.history_length;
    let mut input = UserTowerInput {
        history_videos: vec![0; length],
        history_categories: vec![0; length],
        history_weights: vec![0.0; length],
        country: viewer
            .country
            .as_deref()
            .map_or(0, |c| preprocessor.countries.index(c)) as i64,
        language: viewer
            .language
            .as_deref()
            .map_or(0, |l| preprocessor.languages.index(l)) as i64,
        age_bucket: viewer
            .age
            .map_or(preprocessor.age.buckets.len() as u32, |age| {
                preprocessor.age.bucket(f64::from(age))
            }) as i64,
        user: viewer
            .user_id
            .and_then(|id| preprocessor.user_ids.known_index(&id))
            .unwrap_or(0) as i64,
        dense: [viewer
            .age
            .map_or(0.0, |age| preprocessor.age.scaled(f64::from(age)))],
    };
    let mut total = 0.0;
    let mut weight = 1.0f32;
    for (slot, &video) in history.iter().rev().take(length).enumerate() {
        input.history_videos[slot] = i64::from(preprocessor.video_ids.index(&video));
        input.history_categories[slot] =
            category_of(video).map_or(0, |c| preprocessor.categories.index(c)) as i64;
        input.history_weights[slot] = weight;
        total += weight;
        weight *= spec.recency_decay;
    }
    if total > 0.0 {
        input.history_weights.iter_mut().for_each(|w| *w /= total);
    }
    input
}

/// The user tower, parsed and optimised once (at bundle load) and then only run.
pub struct UserTower {
    model: std::sync::Arc<tract_onnx::prelude::TypedRunnableModel>,
    spec: UserTowerSpec,
}

impl std::fmt::Debug for UserTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTower")
            .field("spec", &self.spec)
            .finish()
    }
}

fn tower_error(stage: &str, error: impl std::fmt::Display) -> crate::Error {
    crate::Error::Decode {
        artifact: "user tower",
        message: format!("{stage}: {error}"),
    }
}

impl UserTower {
    /// Parses the ONNX bytes and optimises the graph for any batch size.
    pub fn load(bytes: &[u8], spec: UserTowerSpec) -> Result<Self, crate::Error> {
        use tract_onnx::prelude::*;
        let model = onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| tower_error("not an ONNX model tract can read", e))?
            .into_optimized()
            .map_err(|e| tower_error("cannot optimise", e))?
            .into_runnable()
            .map_err(|e| tower_error("cannot plan", e))?;
        Ok(Self { model, spec })
    }

    /// What the tower was trained with.
    pub fn spec(&self) -> &UserTowerSpec {
        &self.spec
    }

    /// The embeddings of `inputs`, row-major (`inputs.len() * spec.output_dim` values).
    pub fn embed(&self, inputs: &[UserTowerInput]) -> Result<Vec<f32>, crate::Error> {
        use tract_onnx::prelude::*;
        let n = inputs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let h = self.spec.history_length;
        if let Some(bad) = inputs.iter().position(|i| {
            i.history_videos.len() != h
                || i.history_categories.len() != h
                || i.history_weights.len() != h
        }) {
            return Err(tower_error(
                "input",
                format!("row {bad} does not have a history of {h}"),
            ));
        }
        let ints = |f: &dyn Fn(&UserTowerInput) -> &[i64]| -> Vec<i64> {
            inputs.iter().flat_map(|i| f(i).iter().copied()).collect()
        };
        let scalar =
            |f: &dyn Fn(&UserTowerInput) -> i64| -> Vec<i64> { inputs.iter().map(f).collect() };
        let shaped = |shape: &[usize], values: Vec<i64>| {
            Tensor::from_shape(shape, &values).map_err(|e| tower_error("input", e))
        };
        let weights: Vec<f32> = inputs
            .iter()
            .flat_map(|i| i.history_weights.iter().copied())
            .collect();
        let dense: Vec<f32> = inputs.iter().map(|i| i.dense[0]).collect();
        let tensors: TVec<TValue> = tvec![
            shaped(&[n, h], ints(&|i| &i.history_videos))?.into(),
            shaped(&[n, h], ints(&|i| &i.history_categories))?.into(),
            Tensor::from_shape(&[n, h], &weights)
                .map_err(|e| tower_error("input", e))?
                .into(),
            shaped(&[n], scalar(&|i| i.country))?.into(),
            shaped(&[n], scalar(&|i| i.language))?.into(),
            shaped(&[n], scalar(&|i| i.age_bucket))?.into(),
            shaped(&[n], scalar(&|i| i.user))?.into(),
            Tensor::from_shape(&[n, 1], &dense)
                .map_err(|e| tower_error("input", e))?
                .into(),
        ];
        let outputs = self.model.run(tensors).map_err(|e| tower_error("run", e))?;
        let view = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| tower_error("output", e))?;
        if view.shape() != [n, self.spec.output_dim] {
            return Err(tower_error(
                "output",
                format!(
                    "shape {:?}, expected [{n}, {}]",
                    view.shape(),
                    self.spec.output_dim
                ),
            ));
        }
        Ok(view.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{FitInput, PreprocessConfig};
    use crate::{
        Channel, ContentRating, EngagementRules, Interaction, InteractionType, User, Video,
    };

    fn preprocessor() -> Preprocessor {
        let users = vec![User {
            user_id: 7,
            country: "US".into(),
            language: "en".into(),
            age: 30,
            gender: None,
            occupation: None,
        }];
        let videos: Vec<Video> = (1..=3)
            .map(|video_id| Video {
                video_id,
                title: String::new(),
                category: format!("c{video_id}"),
                child_categories: vec![],
                channel_id: 0,
                duration_seconds: 60,
                tags: vec![],
                language: "en".into(),
                upload_time: None,
                view_count: 0,
                like_count: 0,
                comment_count: 0,
                content_rating: ContentRating::General,
                regions: vec![],
            })
            .collect();
        let train: Vec<Interaction> = (1..=3)
            .map(|video_id| Interaction {
                user_id: 7,
                video_id,
                timestamp: video_id as i64,
                interaction_type: InteractionType::Like,
                watch_seconds: None,
                device: "tv".into(),
            })
            .collect();
        let channels = vec![Channel {
            channel_id: 0,
            subscriber_count: 1,
        }];
        Preprocessor::fit(
            FitInput {
                users: &users,
                videos: &videos,
                channels: &channels,
                train: &train,
            },
            &PreprocessConfig::default(),
            &EngagementRules::default(),
        )
        .unwrap()
    }

    const SPEC: UserTowerSpec = UserTowerSpec {
        history_length: 2,
        recency_decay: 0.5,
        output_dim: 4,
    };

    #[test]
    fn newest_first_with_normalised_recency_weights() {
        let pre = preprocessor();
        let viewer = Viewer {
            user_id: Some(7),
            country: Some("US".into()),
            language: Some("en".into()),
            age: Some(30),
        };
        let category = |v: u64| Some(["c1", "c2", "c3"][v as usize - 1]);
        let input = encode_user(&pre, &SPEC, &viewer, &[1, 2, 3], category);
        assert_eq!(
            input.history_videos,
            vec![
                i64::from(pre.video_ids.index(&3)),
                i64::from(pre.video_ids.index(&2))
            ]
        );
        assert_eq!(
            input.history_categories[0],
            i64::from(pre.categories.index("c3"))
        );
        assert_eq!(input.history_weights, vec![2.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(input.user, i64::from(pre.user_ids.index(&7)));
        assert!(input.user > 0);
        assert_eq!(input.dense, [0.0], "the only training age is the mean");
    }

    #[test]
    fn anonymous_viewer_without_history() {
        let pre = preprocessor();
        let input = encode_user(&pre, &SPEC, &Viewer::default(), &[], |_| None);
        assert_eq!(input.history_weights, vec![0.0, 0.0]);
        assert_eq!(input.user, 0);
        assert_eq!(input.age_bucket as usize, age_bucket_rows(&pre) - 1);
        let unknown = encode_user(
            &pre,
            &SPEC,
            &Viewer {
                user_id: Some(999),
                ..Viewer::default()
            },
            &[42],
            |_| None,
        );
        assert_eq!(unknown.user, 0, "unknown ids get no personal term");
        assert_eq!(unknown.history_videos[0], 0, "unknown video: the OOV row");
    }
}
