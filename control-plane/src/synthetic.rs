//! The synthetic data generator: a catalogue and an interaction log with structure that a
//! model can learn and a test can check.
//!
//! The world: every user has a taste over categories (a peaked Dirichlet draw) and a
//! latent vector; every video has a category, a latent vector and a power-law popularity.
//! An engaged view picks a category from the taste, draws a few candidates of that
//! category by popularity and keeps the one whose latent vector fits the user best. Watch
//! time, likes, comments and shares grow with that fit. Each engaged view comes with
//! `negative_ratio` impressions of popular videos that were shown and not clicked.
//!
//! Users and videos are drawn from their own seeded streams (`seed`, kind, id), so the
//! users table and the interactions agree without keeping users in memory, and the same
//! seed gives the same bytes. Memory grows with the catalogue (about 50 bytes a video)
//! and not with the number of interactions, which are streamed to Parquet.

use std::path::Path;

use edge::{Channel, ContentRating, Interaction, InteractionType, User, Video};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::weighted::WeightedAliasIndex;
use rand_distr::{Distribution, Gamma, LogNormal, Normal};
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::data::{DatasetManifest, write_manifest};
use crate::parquet_io::{Table, TableWriter};
use crate::progress;

/// What to generate (the seed's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorConfig {
    /// Number of users.
    pub users: u64,
    /// Number of videos.
    pub videos: u64,
    /// Exact number of interaction rows.
    pub interactions: u64,
    /// Impressions without engagement per engaged view.
    pub negative_ratio: u32,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            users: 5_000,
            videos: 2_000,
            interactions: 50_000,
            negative_ratio: 3,
            seed: 42,
        }
    }
}

/// Dimension of the hidden taste vectors.
const LATENT_DIM: usize = 8;
/// Candidates drawn by popularity before the best-fitting one is kept.
const CANDIDATES_PER_VIEW: usize = 8;
/// How strongly the latent fit decides among candidates.
const LATENT_SHARPNESS: f32 = 4.0;
/// Concentration of the users' category tastes (below 1: peaked on a few categories).
const TASTE_CONCENTRATION: f64 = 0.3;
/// Interactions happen in the 180 days from 2024-01-01 UTC.
const WINDOW_START: i64 = 1_704_067_200;
const WINDOW_SECONDS: i64 = 180 * 86_400;
/// Videos are uploaded in the three years before the window.
const UPLOAD_SPAN_SECONDS: i64 = 3 * 365 * 86_400;
/// Views per session, on average (uniform in 1..=8).
const MEAN_SESSION_VIEWS: f64 = 4.5;
/// Videos per channel, on average.
const VIDEOS_PER_CHANNEL: u64 = 20;

/// A category with its children, its words and its typical length.
struct CategorySpec {
    name: &'static str,
    children: [&'static str; 3],
    words: [&'static str; 8],
    tags: [&'static str; 6],
    typical_seconds: f64,
    /// Share of the catalogue and of exposure.
    weight: f64,
}

const CATEGORIES: &[CategorySpec] = &[
    CategorySpec {
        name: "Music",
        children: ["Pop", "Rock", "Hip Hop"],
        words: [
            "Live", "Official", "Acoustic", "Remix", "Song", "Session", "Cover", "Album",
        ],
        tags: ["music", "song", "live", "band", "concert", "lyrics"],
        typical_seconds: 240.0,
        weight: 3.0,
    },
    CategorySpec {
        name: "Gaming",
        children: ["Speedrun", "Strategy", "Esports"],
        words: [
            "Playthrough",
            "Boss",
            "Level",
            "Ranked",
            "Build",
            "Clutch",
            "Patch",
            "Raid",
        ],
        tags: [
            "gaming",
            "gameplay",
            "walkthrough",
            "esports",
            "pc",
            "console",
        ],
        typical_seconds: 1200.0,
        weight: 2.5,
    },
    CategorySpec {
        name: "News",
        children: ["World", "Politics", "Business"],
        words: [
            "Report",
            "Breaking",
            "Update",
            "Analysis",
            "Briefing",
            "Interview",
            "Election",
            "Markets",
        ],
        tags: ["news", "politics", "world", "economy", "today", "report"],
        typical_seconds: 420.0,
        weight: 1.5,
    },
    CategorySpec {
        name: "Sports",
        children: ["Football", "Basketball", "Tennis"],
        words: [
            "Highlights",
            "Goal",
            "Final",
            "Match",
            "Season",
            "Derby",
            "Comeback",
            "Training",
        ],
        tags: [
            "sports",
            "highlights",
            "football",
            "match",
            "league",
            "goals",
        ],
        typical_seconds: 600.0,
        weight: 2.0,
    },
    CategorySpec {
        name: "Education",
        children: ["Science", "History", "Math"],
        words: [
            "Explained",
            "Lecture",
            "Lesson",
            "Theory",
            "Introduction",
            "Course",
            "Proof",
            "Experiment",
        ],
        tags: [
            "education",
            "learning",
            "science",
            "tutorial",
            "lecture",
            "study",
        ],
        typical_seconds: 900.0,
        weight: 1.5,
    },
    CategorySpec {
        name: "Comedy",
        children: ["Standup", "Sketch", "Parody"],
        words: [
            "Funny", "Prank", "Sketch", "Standup", "Bloopers", "Roast", "Parody", "Jokes",
        ],
        tags: ["comedy", "funny", "humor", "standup", "sketch", "lol"],
        typical_seconds: 480.0,
        weight: 2.0,
    },
    CategorySpec {
        name: "Cooking",
        children: ["Baking", "Vegan", "Street Food"],
        words: [
            "Recipe", "Kitchen", "Easy", "Dinner", "Bread", "Spicy", "Dessert", "Grill",
        ],
        tags: ["cooking", "recipe", "food", "kitchen", "baking", "chef"],
        typical_seconds: 720.0,
        weight: 1.2,
    },
    CategorySpec {
        name: "Travel",
        children: ["Backpacking", "City Guide", "Road Trip"],
        words: [
            "Journey",
            "Guide",
            "Island",
            "Hidden",
            "Budget",
            "Mountains",
            "Tour",
            "Vlog",
        ],
        tags: ["travel", "vlog", "adventure", "tour", "explore", "trip"],
        typical_seconds: 960.0,
        weight: 1.0,
    },
    CategorySpec {
        name: "Technology",
        children: ["Reviews", "Programming", "Gadgets"],
        words: [
            "Review",
            "Unboxing",
            "Benchmark",
            "Setup",
            "Coding",
            "Tutorial",
            "Teardown",
            "Build",
        ],
        tags: [
            "tech",
            "review",
            "gadgets",
            "programming",
            "unboxing",
            "software",
        ],
        typical_seconds: 780.0,
        weight: 1.5,
    },
    CategorySpec {
        name: "Fitness",
        children: ["Yoga", "Running", "Strength"],
        words: [
            "Workout",
            "Routine",
            "Stretch",
            "Cardio",
            "Challenge",
            "Beginner",
            "Core",
            "Marathon",
        ],
        tags: ["fitness", "workout", "health", "yoga", "gym", "training"],
        typical_seconds: 1500.0,
        weight: 1.0,
    },
    CategorySpec {
        name: "Film",
        children: ["Trailers", "Reviews", "Shorts"],
        words: [
            "Trailer", "Scene", "Review", "Ending", "Director", "Cinema", "Short", "Behind",
        ],
        tags: ["film", "movie", "trailer", "cinema", "review", "shortfilm"],
        typical_seconds: 540.0,
        weight: 1.3,
    },
    CategorySpec {
        name: "Kids",
        children: ["Cartoons", "Nursery", "Learning"],
        words: [
            "Cartoon", "Songs", "Colors", "Story", "Animals", "Fun", "Letters", "Toys",
        ],
        tags: ["kids", "cartoon", "children", "nursery", "family", "toys"],
        typical_seconds: 660.0,
        weight: 1.0,
    },
];

/// (country, its main language, share of users and channels)
const COUNTRIES: &[(&str, &str, f64)] = &[
    ("US", "en", 0.30),
    ("GB", "en", 0.08),
    ("IN", "hi", 0.12),
    ("BR", "pt", 0.08),
    ("MX", "es", 0.06),
    ("ES", "es", 0.04),
    ("FR", "fr", 0.06),
    ("DE", "de", 0.07),
    ("JP", "ja", 0.07),
    ("KR", "ko", 0.04),
    ("CA", "en", 0.04),
    ("AU", "en", 0.04),
];

const DEVICES: &[(&str, f64)] = &[
    ("mobile", 0.55),
    ("desktop", 0.25),
    ("tv", 0.12),
    ("tablet", 0.08),
];
const OCCUPATIONS: &[&str] = &[
    "student",
    "engineer",
    "teacher",
    "artist",
    "healthcare",
    "sales",
    "retired",
    "other",
];
const ADJECTIVES: &[&str] = &[
    "Ultimate", "Quick", "Epic", "Daily", "Complete", "Best", "Classic", "New", "Simple", "Wild",
];

/// Streams of the seeded generator, so that each kind of draw is independent.
#[derive(Clone, Copy)]
enum Stream {
    User = 1,
    Video = 2,
    Channel = 3,
    Activity = 4,
    Events = 5,
}

fn rng_for(seed: u64, stream: Stream, id: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(stream as u64).to_le_bytes());
    key[16..24].copy_from_slice(&id.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Index drawn from unnormalised `weights`.
fn pick(rng: &mut impl Rng, weights: impl Iterator<Item = f64> + Clone) -> usize {
    let total: f64 = weights.clone().sum();
    let mut target = rng.random::<f64>() * total;
    let mut last = 0;
    for (index, weight) in weights.enumerate() {
        if target < weight {
            return index;
        }
        target -= weight;
        last = index;
    }
    last
}

fn latent(rng: &mut impl Rng) -> [f32; LATENT_DIM] {
    let normal = Normal::new(0.0f32, 1.0 / (LATENT_DIM as f32).sqrt()).expect("valid normal");
    std::array::from_fn(|_| normal.sample(rng))
}

fn dot(a: &[f32; LATENT_DIM], b: &[f32; LATENT_DIM]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// A user's hidden state, re-derived from its stream whenever it is needed.
struct UserModel {
    user: User,
    taste: Vec<f64>,
    latent: [f32; LATENT_DIM],
    device: &'static str,
}

fn user_model(seed: u64, user_id: u64) -> UserModel {
    let mut rng = rng_for(seed, Stream::User, user_id);
    let (country, main_language, _) = COUNTRIES[pick(&mut rng, COUNTRIES.iter().map(|c| c.2))];
    let language = if rng.random_bool(0.85) {
        main_language
    } else {
        "en"
    };
    let age = Normal::new(34.0f64, 13.0)
        .expect("valid normal")
        .sample(&mut rng)
        .clamp(13.0, 85.0) as u8;
    let gender = match rng.random_range(0..10) {
        0..=4 => Some("F".to_owned()),
        5..=8 => Some("M".to_owned()),
        _ => None,
    };
    let occupation = Some(OCCUPATIONS[rng.random_range(0..OCCUPATIONS.len())].to_owned());
    let gamma = Gamma::new(TASTE_CONCENTRATION, 1.0).expect("valid gamma");
    let mut taste: Vec<f64> = CATEGORIES
        .iter()
        .map(|c| gamma.sample(&mut rng) * c.weight)
        .collect();
    let total: f64 = taste.iter().sum();
    taste
        .iter_mut()
        .for_each(|t| *t /= total.max(f64::MIN_POSITIVE));
    let latent = latent(&mut rng);
    let device = DEVICES[pick(&mut rng, DEVICES.iter().map(|d| d.1))].0;
    UserModel {
        user: User {
            user_id,
            country: country.to_owned(),
            language: language.to_owned(),
            age,
            gender,
            occupation,
        },
        taste,
        latent,
        device,
    }
}

/// What the event loop needs of a video, kept for the whole catalogue.
struct VideoModel {
    category: u8,
    latent: [f32; LATENT_DIM],
    duration_seconds: u32,
    minimum_age: u8,
    /// Index into `COUNTRIES` plus one of the single region it is limited to; 0 if none.
    region: u8,
}

fn channel_of(seed: u64, channel_id: u64) -> (Channel, usize, &'static str, f64) {
    let mut rng = rng_for(seed, Stream::Channel, channel_id);
    let category = pick(&mut rng, CATEGORIES.iter().map(|c| c.weight));
    let language = COUNTRIES[pick(&mut rng, COUNTRIES.iter().map(|c| c.2))].1;
    // Pareto(1.1) over 100 subscribers: most channels are small, a few are huge.
    let scale = (1.0 - rng.random::<f64>()).powf(-1.0 / 1.1);
    let subscriber_count = (100.0 * scale).min(5e8) as u64;
    (
        Channel {
            channel_id,
            subscriber_count,
        },
        category,
        language,
        scale,
    )
}

fn video_of(seed: u64, video_id: u64, channels: u64) -> (Video, VideoModel, f64) {
    let mut rng = rng_for(seed, Stream::Video, video_id);
    let channel_id = rng.random_range(0..channels);
    let (_, channel_category, channel_language, channel_scale) = channel_of(seed, channel_id);
    let category = if rng.random_bool(0.8) {
        channel_category
    } else {
        pick(&mut rng, CATEGORIES.iter().map(|c| c.weight))
    };
    let spec = &CATEGORIES[category];
    // Pareto(1.2) popularity, lifted by the channel's reach.
    let popularity = (1.0 - rng.random::<f64>()).powf(-1.0 / 1.2) * channel_scale.powf(0.3);
    let duration = LogNormal::new(spec.typical_seconds.ln(), 0.6)
        .expect("valid lognormal")
        .sample(&mut rng)
        .clamp(15.0, 6.0 * 3600.0) as u32;
    let words = &spec.words;
    let title = format!(
        "{} {} {} #{}",
        ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
        words[rng.random_range(0..words.len())],
        words[rng.random_range(0..words.len())],
        video_id
    );
    let child = spec.children[rng.random_range(0..spec.children.len())];
    let mut tags: Vec<String> = (0..rng.random_range(2..=4))
        .map(|_| spec.tags[rng.random_range(0..spec.tags.len())].to_owned())
        .collect();
    tags.sort();
    tags.dedup();
    let rating = match (spec.name, rng.random_range(0..100)) {
        ("Kids", _) => ContentRating::General,
        (_, 0..=29) => ContentRating::General,
        (_, 30..=64) => ContentRating::ParentalGuidance,
        (_, 65..=89) => ContentRating::Teen,
        (_, 90..=97) => ContentRating::Restricted,
        _ => ContentRating::Adult,
    };
    let region = if rng.random_bool(0.1) {
        rng.random_range(0..COUNTRIES.len()) as u8 + 1
    } else {
        0
    };
    let views =
        (popularity * 200.0 * LogNormal::new(0.0, 0.5).expect("valid").sample(&mut rng)) as u64;
    let likes = (views as f64 * rng.random_range(0.01..0.08)) as u64;
    let comments = (likes as f64 * rng.random_range(0.02..0.15)) as u64;
    let video = Video {
        video_id,
        title,
        category: spec.name.to_owned(),
        child_categories: vec![child.to_owned()],
        channel_id,
        duration_seconds: duration,
        tags,
        language: channel_language.to_owned(),
        upload_time: Some(WINDOW_START - rng.random_range(0..UPLOAD_SPAN_SECONDS)),
        view_count: views,
        like_count: likes,
        comment_count: comments,
        content_rating: rating,
        regions: match region {
            0 => vec![],
            r => vec![COUNTRIES[r as usize - 1].0.to_owned()],
        },
    };
    let model = VideoModel {
        category: category as u8,
        latent: latent(&mut rng),
        duration_seconds: duration,
        minimum_age: rating.minimum_age(),
        region,
    };
    (video, model, popularity)
}

/// Videos to draw from, by popularity. Draws use Walker's alias method: O(1) and two
/// memory reads, where a binary search over a million cumulative weights cost about
/// twenty cache misses a draw.
#[derive(Default)]
struct Popularity {
    videos: Vec<u32>,
    weights: Vec<f64>,
    alias: Option<WeightedAliasIndex<f64>>,
}

impl Popularity {
    fn push(&mut self, video: u32, weight: f64) {
        self.videos.push(video);
        self.weights.push(weight);
    }

    /// Builds the alias table; until then (and for an empty set) draws return `None`.
    fn prepare(&mut self) {
        self.alias = WeightedAliasIndex::new(std::mem::take(&mut self.weights)).ok();
    }

    fn draw(&self, rng: &mut impl Rng) -> Option<u32> {
        let alias = self.alias.as_ref()?;
        Some(self.videos[alias.sample(rng)])
    }
}

/// Row counts of what was generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generated {
    /// Users written.
    pub users: u64,
    /// Videos written.
    pub videos: u64,
    /// Channels written.
    pub channels: u64,
    /// Interaction rows written.
    pub interactions: u64,
    /// Engaged views among them.
    pub engaged_views: u64,
}

/// Generates a data set into `out` (created if needed) and returns what was written.
pub fn generate(
    config: &GeneratorConfig,
    out: &Path,
    show_progress: bool,
) -> Result<Generated, DataError> {
    let invalid = |column: &str, message: &str| {
        DataError::bad_value(Path::new("generator settings"), 1, column, message)
    };
    if config.users == 0 {
        return Err(invalid("users", "must be at least 1"));
    }
    if config.videos == 0 {
        return Err(invalid("videos", "must be at least 1"));
    }
    if config.videos > u64::from(u32::MAX) {
        return Err(invalid("videos", "must fit in 32 bits"));
    }
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    crate::data::remove_if_present(&out.join(crate::data::MANIFEST_FILE))?;
    let seed = config.seed;
    let channels = config.videos.div_ceil(VIDEOS_PER_CHANNEL).max(1);

    let mut channel_writer = TableWriter::<Channel>::create(&out.join(Channel::FILE))?;
    for channel_id in 0..channels {
        channel_writer.push(channel_of(seed, channel_id).0)?;
    }
    channel_writer.finish()?;

    let bar = progress_bar(show_progress, config.videos, "videos");
    let mut video_writer = TableWriter::<Video>::create(&out.join(Video::FILE))?;
    let mut models = Vec::with_capacity(config.videos as usize);
    let mut by_category: Vec<Popularity> =
        CATEGORIES.iter().map(|_| Popularity::default()).collect();
    let mut exposure = Popularity::default();
    for video_id in 0..config.videos {
        let (video, model, popularity) = video_of(seed, video_id, channels);
        by_category[model.category as usize].push(video_id as u32, popularity);
        exposure.push(video_id as u32, popularity);
        models.push(model);
        video_writer.push(video)?;
        bar.inc(1);
    }
    video_writer.finish()?;
    by_category.iter_mut().for_each(Popularity::prepare);
    exposure.prepare();
    bar.finish_and_clear();

    let mut user_writer = TableWriter::<User>::create(&out.join(User::FILE))?;
    for user_id in 0..config.users {
        user_writer.push(user_model(seed, user_id).user)?;
    }
    user_writer.finish()?;

    let quotas = activity_quotas(seed, config.users, config.interactions);
    let bar = progress_bar(show_progress, config.interactions, "interactions");
    let mut writer = TableWriter::<Interaction>::create(&out.join(Interaction::FILE))?;
    let mut engaged_views = 0;
    let mut log = Log {
        writer: &mut writer,
        time_range: None,
    };
    let world = World {
        models: &models,
        by_category: &by_category,
        exposure: &exposure,
        negative_ratio: config.negative_ratio,
    };
    for (user_id, quota) in (0..).zip(quotas) {
        if quota == 0 {
            continue;
        }
        let user = user_model(seed, user_id);
        let mut rng = rng_for(seed, Stream::Events, user_id);
        let before = log.writer.rows();
        engaged_views += world.user_events(&user, quota, &mut rng, &mut log)?;
        bar.inc(log.writer.rows() - before);
    }
    let time_range = log.time_range;
    let interactions = writer.finish()?;
    bar.finish_and_clear();

    let generated = Generated {
        users: config.users,
        videos: config.videos,
        channels,
        interactions,
        engaged_views,
    };
    write_manifest(
        out,
        &DatasetManifest {
            version: crate::data::DATASET_VERSION,
            source: "synthetic".into(),
            lineage: serde_json::json!({ "generator": config }),
            counts: crate::data::Counts {
                users: generated.users,
                videos: generated.videos,
                channels: generated.channels,
                interactions: generated.interactions,
            },
            time_range,
        },
    )?;
    Ok(generated)
}

fn progress_bar(show: bool, total: u64, what: &str) -> indicatif::ProgressBar {
    if show {
        progress::bar(total, what, "rows")
    } else {
        indicatif::ProgressBar::hidden()
    }
}

fn session_views(rng: &mut impl Rng) -> u32 {
    rng.random_range(1..=8)
}

/// Splits `rows` among users in proportion to a heavy-tailed activity, exactly.
fn activity_quotas(seed: u64, users: u64, rows: u64) -> Vec<u64> {
    let activity: Vec<f64> = (0..users)
        .map(|user_id| {
            let mut rng = rng_for(seed, Stream::Activity, user_id);
            LogNormal::new(0.0, 1.0)
                .expect("valid lognormal")
                .sample(&mut rng)
        })
        .collect();
    let total: f64 = activity.iter().sum();
    let mut quotas: Vec<u64> = activity
        .iter()
        .map(|a| (a / total * rows as f64).floor() as u64)
        .collect();
    // Flooring loses less than one row per user: hand them out in id order, one each.
    let assigned: u64 = quotas.iter().sum();
    for quota in quotas
        .iter_mut()
        .take(rows.saturating_sub(assigned) as usize)
    {
        *quota += 1;
    }
    // Float error could in principle round the other way; take any excess back.
    let mut excess = assigned.saturating_sub(rows);
    for quota in quotas.iter_mut() {
        let taken = excess.min(*quota);
        *quota -= taken;
        excess -= taken;
    }
    quotas
}

struct World<'a> {
    models: &'a [VideoModel],
    by_category: &'a [Popularity],
    exposure: &'a Popularity,
    negative_ratio: u32,
}

impl World<'_> {
    fn allowed(&self, user: &UserModel, video: u32) -> bool {
        let model = &self.models[video as usize];
        let region_ok =
            model.region == 0 || COUNTRIES[model.region as usize - 1].0 == user.user.country;
        model.minimum_age <= user.user.age && region_ok
    }

    /// The engaged video of one view: a category from the taste, then the best-fitting of
    /// a few popularity-drawn candidates (Gumbel-max over the latent fit).
    fn engaged_video(&self, user: &UserModel, rng: &mut impl Rng) -> Option<(u32, f32, usize)> {
        for _ in 0..4 {
            let category = pick(rng, user.taste.iter().copied());
            let mut best: Option<(u32, f32, f32)> = None;
            for _ in 0..CANDIDATES_PER_VIEW {
                let Some(video) = self.by_category[category].draw(rng) else {
                    break;
                };
                if !self.allowed(user, video) {
                    continue;
                }
                let fit = dot(&user.latent, &self.models[video as usize].latent);
                let gumbel = -(-(rng.random::<f32>().max(1e-12)).ln()).ln();
                let score = LATENT_SHARPNESS * fit + gumbel;
                if best.is_none_or(|(_, _, s)| score > s) {
                    best = Some((video, fit, score));
                }
            }
            if let Some((video, fit, _)) = best {
                return Some((video, fit, category));
            }
        }
        None
    }

    /// Writes up to `quota` rows for one user, in sessions; returns the engaged views.
    fn user_events(
        &self,
        user: &UserModel,
        quota: u64,
        rng: &mut impl Rng,
        log: &mut Log<'_>,
    ) -> Result<u64, DataError> {
        // Sessions start at uniform times in the window; views within one follow each other.
        let rows_per_view = 2.3 + f64::from(self.negative_ratio);
        let sessions =
            ((quota as f64 / rows_per_view / MEAN_SESSION_VIEWS).round() as usize).max(1);
        let mut starts: Vec<i64> = (0..sessions)
            .map(|_| WINDOW_START + rng.random_range(0..WINDOW_SECONDS))
            .collect();
        starts.sort_unstable();
        let mut starts = starts.into_iter();
        let mut now = starts.next().unwrap_or(WINDOW_START);
        let mut left_in_session = session_views(rng);
        let stop_at = log.writer.rows() + quota;
        let mut engaged = 0u64;
        let mut misses = 0;
        while log.writer.rows() < stop_at {
            let Some((video, fit, category)) = self.engaged_video(user, rng) else {
                // Nothing suits this user (e.g. too young for every draw): give up on them
                // after many misses rather than loop for ever.
                misses += 1;
                if misses > 64 {
                    break;
                }
                continue;
            };
            engaged += 1;
            let mut emit = |video: u32, kind, at, watch, rng: &mut _| {
                if log.writer.rows() < stop_at {
                    log.push(user, video, kind, at, watch, rng)
                } else {
                    Ok(())
                }
            };
            for _ in 0..self.negative_ratio {
                if let Some(shown) = self.exposure.draw(rng) {
                    emit(shown, InteractionType::Impression, now, None, rng)?;
                }
            }
            let duration = self.models[video as usize].duration_seconds;
            // Affinity: the latent fit plus how much more than average the user likes the
            // category; it drives watch time and the chance of a like, comment or share.
            let preference = (user.taste[category] * CATEGORIES.len() as f64)
                .ln()
                .clamp(-3.0, 3.0) as f32;
            let affinity = sigmoid(3.0 * fit + 0.8 * preference + rng.random_range(-1.0..1.0));
            let ratio = (affinity * 1.1 + rng.random_range(-0.15..0.15)).clamp(0.02, 1.0);
            let watched = ((duration as f32) * ratio).max(1.0) as u32;
            emit(video, InteractionType::Click, now, None, rng)?;
            now += 2;
            emit(video, InteractionType::Watch, now, Some(watched), rng)?;
            let after = now + i64::from(watched);
            if rng.random_bool(f64::from(0.05 + 0.5 * affinity * ratio)) {
                emit(video, InteractionType::Like, after, None, rng)?;
            }
            if rng.random_bool(f64::from(0.01 + 0.08 * affinity * ratio)) {
                emit(video, InteractionType::Comment, after, None, rng)?;
            }
            if rng.random_bool(f64::from(0.005 + 0.04 * affinity * ratio)) {
                emit(video, InteractionType::Share, after, None, rng)?;
            }
            now = after + rng.random_range(5..60);
            left_in_session -= 1;
            if left_in_session == 0 {
                left_in_session = session_views(rng);
                // Past the last planned session, the user keeps going after a break.
                now = starts.next().unwrap_or(now + 3_600).max(now);
            }
        }
        Ok(engaged)
    }
}

/// The interaction writer and the time range seen so far.
struct Log<'w> {
    writer: &'w mut TableWriter<Interaction>,
    time_range: Option<(i64, i64)>,
}

impl Log<'_> {
    fn push(
        &mut self,
        user: &UserModel,
        video: u32,
        kind: InteractionType,
        timestamp: i64,
        watch_seconds: Option<u32>,
        rng: &mut impl Rng,
    ) -> Result<(), DataError> {
        let device = if rng.random_bool(0.8) {
            user.device
        } else {
            DEVICES[rng.random_range(0..DEVICES.len())].0
        };
        self.time_range = Some(match self.time_range {
            None => (timestamp, timestamp),
            Some((first, last)) => (first.min(timestamp), last.max(timestamp)),
        });
        self.writer.push(Interaction {
            user_id: user.user.user_id,
            video_id: u64::from(video),
            timestamp,
            interaction_type: kind,
            watch_seconds,
            device: device.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
