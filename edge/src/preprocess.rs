//! Fitted preprocessing artifacts (the seed's vocabulary builders and normalizers).
//!
//! They are fitted once on the training split by the control plane, shipped inside the
//! bundle, and applied by the same methods at training and at serving time. Everything is
//! stored in sorted vectors rather than hash maps so that the serialized bytes are a pure
//! function of the training data.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::entities::{Channel, Interaction, User, Video};
use crate::{ConfigError, EngagementRules, Error, engagement_weight};

/// The version of [`Preprocessor`]'s serialized form.
pub const PREPROCESSOR_FORMAT_VERSION: u32 = 1;

/// A key that a [`Vocabulary`] can hold: ordered for lookup, hashed stably for OOV buckets.
pub trait VocabularyKey {
    /// A hash that is the same on every platform and in every run.
    fn stable_hash(&self) -> u64;
}

impl VocabularyKey for str {
    fn stable_hash(&self) -> u64 {
        xxh3_64(self.as_bytes())
    }
}

impl VocabularyKey for String {
    fn stable_hash(&self) -> u64 {
        self.as_str().stable_hash()
    }
}

impl VocabularyKey for u64 {
    fn stable_hash(&self) -> u64 {
        xxh3_64(&self.to_le_bytes())
    }
}

/// A lookup from values to dense indices, with hashed buckets for values it never saw.
///
/// Indices `0..oov_buckets` are the out-of-vocabulary buckets; known values follow, most
/// frequent first, so an embedding table of [`Vocabulary::len`] rows covers every input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary<T> {
    values: Vec<T>,
    /// Positions into `values`, sorted by value, for binary search.
    sorted: Vec<u32>,
    oov_buckets: u32,
}

impl<T: Ord + Clone + VocabularyKey> Vocabulary<T> {
    /// Keeps the values seen at least `min_count` times, at most `max_size` of them (the most
    /// frequent; ties broken by value so the result is deterministic).
    pub fn fit(
        values: impl IntoIterator<Item = T>,
        min_count: u32,
        max_size: usize,
        oov_buckets: u32,
    ) -> Self {
        let mut counts: BTreeMap<T, u64> = BTreeMap::new();
        for value in values {
            *counts.entry(value).or_default() += 1;
        }
        let mut ranked: Vec<(T, u64)> = counts
            .into_iter()
            .filter(|(_, count)| *count >= u64::from(min_count))
            .collect();
        // Stable sort over a value-ordered list: equal counts stay in value order.
        ranked.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        ranked.truncate(max_size);
        Self::from_values(
            ranked.into_iter().map(|(value, _)| value).collect(),
            oov_buckets,
        )
    }

    /// A vocabulary of exactly these values, in this index order (duplicates are dropped).
    pub fn from_values(mut values: Vec<T>, oov_buckets: u32) -> Self {
        let oov_buckets = oov_buckets.max(1);
        let mut seen = std::collections::BTreeSet::new();
        values.retain(|value| seen.insert(value.clone()));
        let mut sorted: Vec<u32> = (0..values.len() as u32).collect();
        sorted.sort_by(|&a, &b| values[a as usize].cmp(&values[b as usize]));
        Self {
            values,
            sorted,
            oov_buckets,
        }
    }

    /// The index of `key`: its row if known, else its hashed OOV bucket.
    pub fn index<Q>(&self, key: &Q) -> u32
    where
        T: Borrow<Q>,
        Q: Ord + VocabularyKey + ?Sized,
    {
        match self.known_index(key) {
            Some(index) => index,
            None => (key.stable_hash() % u64::from(self.oov_buckets)) as u32,
        }
    }

    /// The index of `key` if the vocabulary holds it.
    pub fn known_index<Q>(&self, key: &Q) -> Option<u32>
    where
        T: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.sorted
            .binary_search_by(|&position| self.values[position as usize].borrow().cmp(key))
            .ok()
            .map(|found| self.oov_buckets + self.sorted[found])
    }

    /// The value at `index`, or `None` for an OOV bucket or an index out of range.
    pub fn value(&self, index: u32) -> Option<&T> {
        index
            .checked_sub(self.oov_buckets)
            .and_then(|position| self.values.get(position as usize))
    }

    /// Rows needed by an embedding table over this vocabulary (OOV buckets included).
    pub fn len(&self) -> usize {
        self.oov_buckets as usize + self.values.len()
    }

    /// Never true: there is always at least one OOV bucket.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// How many known values there are.
    pub fn known_len(&self) -> usize {
        self.values.len()
    }

    /// The number of OOV buckets.
    pub fn oov_buckets(&self) -> u32 {
        self.oov_buckets
    }

    /// Known values in index order.
    pub fn values(&self) -> &[T] {
        &self.values
    }
}

/// Standardisation `(x - mean) / std`, fitted on training values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZScore {
    /// Mean of the fitted values.
    pub mean: f64,
    /// Standard deviation of the fitted values (1 when they were constant).
    pub std: f64,
}

impl ZScore {
    /// Fits mean and population standard deviation; identity for an empty input.
    pub fn fit(values: impl IntoIterator<Item = f64>) -> Self {
        // Welford: one pass, stable for the large counts of view statistics.
        let (mut n, mut mean, mut m2) = (0u64, 0.0f64, 0.0f64);
        for x in values {
            n += 1;
            let delta = x - mean;
            mean += delta / n as f64;
            m2 += delta * (x - mean);
        }
        if n == 0 {
            return Self {
                mean: 0.0,
                std: 1.0,
            };
        }
        let std = (m2 / n as f64).sqrt();
        Self {
            mean,
            std: if std > 1e-12 { std } else { 1.0 },
        }
    }

    /// The standardised value.
    pub fn apply(&self, x: f64) -> f32 {
        ((x - self.mean) / self.std) as f32
    }
}

/// `ln(1 + x)` followed by a fitted [`ZScore`]: for counts and durations, whose tails are long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LogZScore {
    /// The standardisation of `ln(1 + x)`.
    pub z: ZScore,
}

impl LogZScore {
    /// Fits on the log of the values (negative values count as 0).
    pub fn fit(values: impl IntoIterator<Item = f64>) -> Self {
        Self {
            z: ZScore::fit(values.into_iter().map(log1p_clamped)),
        }
    }

    /// The standardised log value.
    pub fn apply(&self, x: f64) -> f32 {
        self.z.apply(log1p_clamped(x))
    }
}

fn log1p_clamped(x: f64) -> f64 {
    x.max(0.0).ln_1p()
}

/// Fixed bucket boundaries: bucket `i` holds `boundaries[i-1] <= x < boundaries[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buckets {
    boundaries: Vec<f64>,
}

impl Buckets {
    /// Boundaries must be finite and strictly increasing (checked by the config).
    pub fn new(boundaries: Vec<f64>) -> Self {
        Self { boundaries }
    }

    /// The bucket of `x`, in `0..=boundaries.len()`.
    pub fn index(&self, x: f64) -> u32 {
        self.boundaries.partition_point(|&boundary| boundary <= x) as u32
    }

    /// The number of buckets (boundaries + 1).
    pub fn len(&self) -> usize {
        self.boundaries.len() + 1
    }

    /// Never true: no boundaries is still one bucket.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The boundaries.
    pub fn boundaries(&self) -> &[f64] {
        &self.boundaries
    }
}

/// A numeric input with both a continuous and a bucketed encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericFeature {
    /// Continuous encoding.
    pub scale: LogOrLinear,
    /// Bucketed encoding.
    pub buckets: Buckets,
}

/// How a [`NumericFeature`] is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LogOrLinear {
    /// Z-score of the raw value.
    Linear(ZScore),
    /// Z-score of `ln(1 + x)`.
    Log(LogZScore),
}

impl NumericFeature {
    /// The continuous encoding of `x`.
    pub fn scaled(&self, x: f64) -> f32 {
        match self.scale {
            LogOrLinear::Linear(z) => z.apply(x),
            LogOrLinear::Log(z) => z.apply(x),
        }
    }

    /// The bucket of `x`.
    pub fn bucket(&self, x: f64) -> u32 {
        self.buckets.index(x)
    }
}

/// Hour of day as a point on the unit circle, so 23:00 sits next to 00:00.
pub fn hour_cyclical(timestamp: i64) -> [f32; 2] {
    let seconds_of_day = timestamp.rem_euclid(86_400) as f64;
    let angle = std::f64::consts::TAU * seconds_of_day / 86_400.0;
    [angle.sin() as f32, angle.cos() as f32]
}

/// Day of week in UTC, Monday = 0.
pub fn day_of_week(timestamp: i64) -> u8 {
    // 1970-01-01 was a Thursday (3 with Monday = 0).
    (timestamp.div_euclid(86_400) + 3).rem_euclid(7) as u8
}

/// Four popularity levels of a video from its count of positive training interactions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopularityLevels {
    /// A count above `thresholds[i]` reaches level `i + 1`.
    pub thresholds: [f64; 3],
}

impl PopularityLevels {
    /// Thresholds at the given quantiles of the per-video counts.
    pub fn fit(counts: impl IntoIterator<Item = u64>, quantiles: [f64; 3]) -> Self {
        let mut counts: Vec<u64> = counts.into_iter().collect();
        counts.sort_unstable();
        let at = |q: f64| -> f64 {
            if counts.is_empty() {
                return 0.0;
            }
            let position = ((counts.len() - 1) as f64 * q).round() as usize;
            counts[position] as f64
        };
        Self {
            thresholds: quantiles.map(at),
        }
    }

    /// The level of a video with `count` positive interactions, 0 (cold) to 3 (top).
    pub fn level(&self, count: u64) -> u8 {
        self.thresholds
            .iter()
            .filter(|&&t| count as f64 > t)
            .count() as u8
    }

    /// The level as a one-hot vector.
    pub fn one_hot(&self, count: u64) -> [f32; 4] {
        let mut encoded = [0.0; 4];
        encoded[self.level(count) as usize] = 1.0;
        encoded
    }
}

/// Settings of the preprocessing fit (the `[preprocess]` section of the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// OOV buckets of every vocabulary.
    pub oov_buckets: u32,
    /// A video id needs this many training interactions to get its own row.
    pub min_video_count: u32,
    /// A user id needs this many training interactions to get its own row.
    pub min_user_count: u32,
    /// A tag needs this many occurrences among training videos.
    pub min_tag_count: u32,
    /// Largest video-id vocabulary.
    pub max_videos: usize,
    /// Largest user-id vocabulary.
    pub max_users: usize,
    /// Largest tag vocabulary.
    pub max_tags: usize,
    /// Age bucket boundaries in years.
    pub age_boundaries: Vec<f64>,
    /// Duration bucket boundaries in seconds.
    pub duration_boundaries: Vec<f64>,
    /// Subscriber tier boundaries.
    pub subscriber_tiers: Vec<f64>,
    /// Quantiles of per-video positive counts that separate the four popularity levels.
    pub popularity_quantiles: [f64; 3],
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            oov_buckets: 1,
            min_video_count: 1,
            min_user_count: 1,
            min_tag_count: 2,
            max_videos: 2_000_000,
            max_users: 10_000_000,
            max_tags: 50_000,
            age_boundaries: vec![18.0, 25.0, 35.0, 45.0, 55.0, 65.0],
            duration_boundaries: vec![60.0, 300.0, 600.0, 1800.0, 3600.0],
            subscriber_tiers: vec![1e3, 1e4, 1e5, 1e6],
            popularity_quantiles: [0.5, 0.9, 0.99],
        }
    }
}

impl PreprocessConfig {
    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.oov_buckets == 0 {
            return Err(ConfigError::new("oov_buckets", "must be at least 1"));
        }
        for (key, boundaries) in [
            ("age_boundaries", &self.age_boundaries),
            ("duration_boundaries", &self.duration_boundaries),
            ("subscriber_tiers", &self.subscriber_tiers),
        ] {
            if boundaries.iter().any(|b| !b.is_finite())
                || boundaries.windows(2).any(|pair| pair[0] >= pair[1])
            {
                return Err(ConfigError::new(
                    key,
                    format!("must be finite and strictly increasing, got {boundaries:?}"),
                ));
            }
        }
        let q = self.popularity_quantiles;
        if q.iter().any(|q| !(0.0..=1.0).contains(q)) || q[0] > q[1] || q[1] > q[2] {
            return Err(ConfigError::new(
                "popularity_quantiles",
                format!("must be three increasing values in [0, 1], got {q:?}"),
            ));
        }
        for (key, value) in [
            ("max_videos", self.max_videos),
            ("max_users", self.max_users),
            ("max_tags", self.max_tags),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The training data a [`Preprocessor`] is fitted on.
#[derive(Debug, Clone, Copy)]
pub struct FitInput<'a> {
    /// All users of the data set (only those in `train` are used).
    pub users: &'a [User],
    /// All videos of the data set (only those in `train` are used).
    pub videos: &'a [Video],
    /// All channels of the data set (only those of used videos are used).
    pub channels: &'a [Channel],
    /// The training split's interactions.
    pub train: &'a [Interaction],
}

/// Every fitted vocabulary and normalizer that training and serving apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessor {
    /// [`PREPROCESSOR_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Known users (the personal term of the user tower).
    pub user_ids: Vocabulary<u64>,
    /// Known videos (shared by both towers).
    pub video_ids: Vocabulary<u64>,
    /// Known channels.
    pub channel_ids: Vocabulary<u64>,
    /// Categories and child categories, one vocabulary.
    pub categories: Vocabulary<String>,
    /// Video tags.
    pub tags: Vocabulary<String>,
    /// Languages of users and videos, one vocabulary.
    pub languages: Vocabulary<String>,
    /// User countries.
    pub countries: Vocabulary<String>,
    /// Device classes of interactions.
    pub devices: Vocabulary<String>,
    /// User genders.
    pub genders: Vocabulary<String>,
    /// User occupations.
    pub occupations: Vocabulary<String>,
    /// Viewer age (z-score and the seed's age buckets).
    pub age: NumericFeature,
    /// Video duration (log z-score and the seed's duration buckets).
    pub duration: NumericFeature,
    /// Video lifetime views (log z-score).
    pub view_count: LogZScore,
    /// Video lifetime likes (log z-score).
    pub like_count: LogZScore,
    /// Video lifetime comments (log z-score).
    pub comment_count: LogZScore,
    /// Channel subscribers (log z-score and the seed's tiers).
    pub subscribers: NumericFeature,
    /// Popularity levels from positive training interactions.
    pub popularity: PopularityLevels,
}

impl Preprocessor {
    /// Fits every artifact on the training split. Users, videos and channels that no
    /// training interaction touches are ignored, so nothing from validation or test leaks in.
    pub fn fit(
        input: FitInput<'_>,
        config: &PreprocessConfig,
        rules: &EngagementRules,
    ) -> Result<Self, Error> {
        config.validate().map_err(|e| e.within("preprocess"))?;
        if input.train.is_empty() {
            return Err(Error::EmptyInput {
                what: "preprocessing",
                reason: "the training split has no interactions".into(),
            });
        }
        let user_by_id: BTreeMap<u64, &User> = input.users.iter().map(|u| (u.user_id, u)).collect();
        let video_by_id: BTreeMap<u64, &Video> =
            input.videos.iter().map(|v| (v.video_id, v)).collect();
        let channel_by_id: BTreeMap<u64, &Channel> =
            input.channels.iter().map(|c| (c.channel_id, c)).collect();

        let train_users: Vec<&User> = dedup_ids(input.train.iter().map(|i| i.user_id))
            .filter_map(|id| user_by_id.get(&id).copied())
            .collect();
        let train_videos: Vec<&Video> = dedup_ids(input.train.iter().map(|i| i.video_id))
            .filter_map(|id| video_by_id.get(&id).copied())
            .collect();
        let train_channels: Vec<&Channel> = dedup_ids(train_videos.iter().map(|v| v.channel_id))
            .filter_map(|id| channel_by_id.get(&id).copied())
            .collect();

        let mut positives: BTreeMap<u64, u64> =
            input.videos.iter().map(|v| (v.video_id, 0)).collect();
        for interaction in input.train {
            let duration = video_by_id
                .get(&interaction.video_id)
                .map_or(0, |v| v.duration_seconds);
            let weight = engagement_weight(
                rules,
                interaction.interaction_type,
                interaction.watch_seconds,
                duration,
            );
            if rules.is_positive(weight) {
                *positives.entry(interaction.video_id).or_default() += 1;
            }
        }

        let oov = config.oov_buckets;
        let strings = |values: Vec<&String>, min_count, max| {
            Vocabulary::fit(values.into_iter().cloned(), min_count, max, oov)
        };
        Ok(Self {
            format_version: PREPROCESSOR_FORMAT_VERSION,
            user_ids: Vocabulary::fit(
                input.train.iter().map(|i| i.user_id),
                config.min_user_count,
                config.max_users,
                oov,
            ),
            video_ids: Vocabulary::fit(
                input.train.iter().map(|i| i.video_id),
                config.min_video_count,
                config.max_videos,
                oov,
            ),
            channel_ids: Vocabulary::fit(
                train_videos.iter().map(|v| v.channel_id),
                1,
                usize::MAX,
                oov,
            ),
            categories: strings(
                train_videos
                    .iter()
                    .flat_map(|v| std::iter::once(&v.category).chain(&v.child_categories))
                    .collect(),
                1,
                usize::MAX,
            ),
            tags: strings(
                train_videos.iter().flat_map(|v| &v.tags).collect(),
                config.min_tag_count,
                config.max_tags,
            ),
            languages: strings(
                train_users
                    .iter()
                    .map(|u| &u.language)
                    .chain(train_videos.iter().map(|v| &v.language))
                    .collect(),
                1,
                usize::MAX,
            ),
            countries: strings(
                train_users.iter().map(|u| &u.country).collect(),
                1,
                usize::MAX,
            ),
            devices: strings(
                input.train.iter().map(|i| &i.device).collect(),
                1,
                usize::MAX,
            ),
            genders: strings(
                train_users
                    .iter()
                    .filter_map(|u| u.gender.as_ref())
                    .collect(),
                1,
                usize::MAX,
            ),
            occupations: strings(
                train_users
                    .iter()
                    .filter_map(|u| u.occupation.as_ref())
                    .collect(),
                1,
                usize::MAX,
            ),
            age: NumericFeature {
                scale: LogOrLinear::Linear(ZScore::fit(
                    train_users.iter().map(|u| f64::from(u.age)),
                )),
                buckets: Buckets::new(config.age_boundaries.clone()),
            },
            duration: NumericFeature {
                scale: LogOrLinear::Log(LogZScore::fit(
                    train_videos.iter().map(|v| f64::from(v.duration_seconds)),
                )),
                buckets: Buckets::new(config.duration_boundaries.clone()),
            },
            view_count: LogZScore::fit(train_videos.iter().map(|v| v.view_count as f64)),
            like_count: LogZScore::fit(train_videos.iter().map(|v| v.like_count as f64)),
            comment_count: LogZScore::fit(train_videos.iter().map(|v| v.comment_count as f64)),
            subscribers: NumericFeature {
                scale: LogOrLinear::Log(LogZScore::fit(
                    train_channels.iter().map(|c| c.subscriber_count as f64),
                )),
                buckets: Buckets::new(config.subscriber_tiers.clone()),
            },
            popularity: PopularityLevels::fit(positives.into_values(), config.popularity_quantiles),
        })
    }

    /// The MessagePack encoding (field names kept, so later readers can add fields).
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a Preprocessor always serializes")
    }

    /// Decodes bytes written by [`Preprocessor::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        crate::decode_versioned(
            bytes,
            "preprocessor",
            PREPROCESSOR_FORMAT_VERSION,
            |preprocessor: &Self| preprocessor.format_version,
        )
    }
}

/// Distinct ids in first-seen order would depend on input order; sorted ids do not.
fn dedup_ids(ids: impl Iterator<Item = u64>) -> impl Iterator<Item = u64> {
    ids.collect::<std::collections::BTreeSet<u64>>().into_iter()
}

#[cfg(test)]
mod tests;
