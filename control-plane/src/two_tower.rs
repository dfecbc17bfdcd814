//! The two-tower retrieval model, trained on CPU with candle.
//!
//! User tower: the recency-weighted mean of the embeddings of the last videos the viewer
//! engaged with (the video-id table is shared with the video tower), the same pooling over
//! their categories, country, language (shared with videos), age bucket and z-score, and a
//! user-id embedding that training drops half of the time so the tower also serves
//! anonymous viewers. Its inputs are computed by [`edge::tower::encode_user`], the function
//! serving calls. Video tower: video id, category, child categories, the title (a learned
//! projection of its frozen sentence vector from `crate::title_encoder` when the
//! caller provides them, else a bag of hashed words), tags, duration (bucket and log
//! z-score), popularity level, language. Both: an MLP with ReLU, then L2 normalisation.
//!
//! Loss: in-batch sampled softmax at a temperature, with the logQ correction (the log of
//! each video's share of training positives is subtracted from its logits, so popular
//! videos are not punished for appearing often as negatives), duplicates of the positive
//! masked out, examples weighted by the seed's engagement rules. Early stopping keeps the
//! epoch with the best validation Recall@50.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{Embedding, Linear, Module, ParamsAdamW};
use edge::preprocess::Preprocessor;
use edge::tower::{UserTowerInput, UserTowerSpec, Viewer, age_bucket_rows, encode_user};
use edge::{EngagementRules, User, Video, engagement_weight};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::TwoTowerConfig;
use crate::eval::{self, EvalSet, EvalUser, Part, Retriever};
use crate::lazy_adam::{LazyAdamW, SparseRows};
use crate::split::Split;

/// Child categories pooled per video.
const CHILDREN: usize = 4;
/// Title words pooled per video.
const TITLE_WORDS: usize = 12;
/// Hash buckets of title words (row 0 is padding).
const TITLE_BUCKETS: u64 = 8192;
/// Tags pooled per video.
const TAGS: usize = 6;
/// Dense video inputs: duration z-score and the popularity one-hot.
const VIDEO_DENSE: usize = 5;
/// Weight of the n-th most recent video in the history is `RECENCY_DECAY^n`.
const RECENCY_DECAY: f32 = 0.9;
/// Share of training examples whose user id is hidden, to teach the anonymous path.
const USER_ID_DROPOUT: f64 = 0.5;
/// Standard deviation of initial embeddings (N(0, 1) trained worse here).
const EMBEDDING_INIT_STD: f32 = 0.1;

/// Why training could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The training split has nothing to learn from.
    #[error("cannot train the two-tower model: {0}")]
    NoData(String),
    /// The saved model and the title vectors given do not match.
    #[error("{0}")]
    TitleMismatch(String),
    /// A tensor operation failed (a bug, or memory exhausted).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Every video's video-tower inputs, encoded once, one row per catalogue video.
struct VideoInputs {
    ids: Vec<u64>,
    row_of: HashMap<u64, u32>,
    video: Tensor,
    category: Tensor,
    children: Tensor,
    children_weights: Tensor,
    title: TitleInput,
    tags: Tensor,
    tags_weights: Tensor,
    duration_bucket: Tensor,
    language: Tensor,
    dense: Tensor,
}

/// A title as the video tower reads it.
enum TitleInput {
    /// Hashed word buckets `[N, TITLE_WORDS]` and their pooling weights.
    Words { rows: Tensor, weights: Tensor },
    /// Frozen sentence vectors `[N, D]`.
    Sentences(Tensor),
}

/// Pads or truncates `items` to `width` rows and equal weights summing to 1.
fn pooled(items: Vec<u32>, width: usize, rows: &mut Vec<u32>, weights: &mut Vec<f32>) {
    let used = items.len().min(width);
    rows.extend(items.iter().take(used));
    rows.extend(std::iter::repeat_n(0, width - used));
    let weight = if used > 0 { 1.0 / used as f32 } else { 0.0 };
    weights.extend(std::iter::repeat_n(weight, used));
    weights.extend(std::iter::repeat_n(0.0, width - used));
}

/// Hash bucket (1-based; 0 is padding) of each lower-cased word of a title.
fn title_words(title: &str) -> Vec<u32> {
    title
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(|word| 1 + (xxh3_64(word.to_lowercase().as_bytes()) % TITLE_BUCKETS) as u32)
        .collect()
}

impl VideoInputs {
    fn new(
        videos: &[Video],
        preprocessor: &Preprocessor,
        positives: &HashMap<u64, u64>,
        title_vectors: Option<&[f32]>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let n = videos.len();
        let mut video = Vec::with_capacity(n);
        let mut category = Vec::with_capacity(n);
        let (mut children, mut children_weights) = (Vec::new(), Vec::new());
        let (mut title, mut title_weights) = (Vec::new(), Vec::new());
        let (mut tags, mut tags_weights) = (Vec::new(), Vec::new());
        let mut duration_bucket = Vec::with_capacity(n);
        let mut language = Vec::with_capacity(n);
        let mut dense = Vec::with_capacity(n * VIDEO_DENSE);
        for v in videos {
            video.push(preprocessor.video_ids.index(&v.video_id));
            category.push(preprocessor.categories.index(v.category.as_str()));
            pooled(
                v.child_categories
                    .iter()
                    .map(|c| preprocessor.categories.index(c.as_str()))
                    .collect(),
                CHILDREN,
                &mut children,
                &mut children_weights,
            );
            pooled(
                title_words(&v.title),
                TITLE_WORDS,
                &mut title,
                &mut title_weights,
            );
            // Tag rows are shifted by one so that row 0 stays the padding row.
            pooled(
                v.tags
                    .iter()
                    .map(|t| 1 + preprocessor.tags.index(t.as_str()))
                    .collect(),
                TAGS,
                &mut tags,
                &mut tags_weights,
            );
            let duration = f64::from(v.duration_seconds);
            duration_bucket.push(preprocessor.duration.bucket(duration));
            language.push(preprocessor.languages.index(v.language.as_str()));
            dense.push(preprocessor.duration.scaled(duration));
            let count = positives.get(&v.video_id).copied().unwrap_or(0);
            dense.extend(preprocessor.popularity.one_hot(count));
        }
        let column = |values: Vec<u32>| Tensor::from_vec(values, n, device);
        let matrix = |values: Vec<u32>, width: usize| Tensor::from_vec(values, (n, width), device);
        let weights = |values: Vec<f32>, width: usize| Tensor::from_vec(values, (n, width), device);
        Ok(Self {
            ids: videos.iter().map(|v| v.video_id).collect(),
            row_of: videos
                .iter()
                .enumerate()
                .map(|(row, v)| (v.video_id, row as u32))
                .collect(),
            video: column(video)?,
            category: column(category)?,
            children: matrix(children, CHILDREN)?,
            children_weights: weights(children_weights, CHILDREN)?,
            title: match title_vectors {
                Some(vectors) => {
                    let dim = vectors.len() / n.max(1);
                    if dim == 0 || dim * n != vectors.len() {
                        return Err(TrainError::TitleMismatch(format!(
                            "{} title vector values for {n} videos",
                            vectors.len()
                        )));
                    }
                    TitleInput::Sentences(Tensor::from_vec(vectors.to_vec(), (n, dim), device)?)
                }
                None => TitleInput::Words {
                    rows: matrix(title, TITLE_WORDS)?,
                    weights: weights(title_weights, TITLE_WORDS)?,
                },
            },
            tags: matrix(tags, TAGS)?,
            tags_weights: weights(tags_weights, TAGS)?,
            duration_bucket: column(duration_bucket)?,
            language: column(language)?,
            dense: weights(dense, VIDEO_DENSE)?,
        })
    }
}

/// A batch of user-tower inputs as tensors.
struct UserBatch {
    history_videos: Tensor,
    history_categories: Tensor,
    history_weights: Tensor,
    country: Tensor,
    language: Tensor,
    age_bucket: Tensor,
    user: Tensor,
    dense: Tensor,
}

impl UserBatch {
    fn new(inputs: &[UserTowerInput], device: &Device) -> Result<Self, TrainError> {
        let b = inputs.len();
        let h = inputs.first().map_or(0, |i| i.history_videos.len());
        let flat_i64 = |f: &dyn Fn(&UserTowerInput) -> &[i64]| -> Vec<i64> {
            inputs.iter().flat_map(|i| f(i).iter().copied()).collect()
        };
        let scalar =
            |f: &dyn Fn(&UserTowerInput) -> i64| -> Vec<i64> { inputs.iter().map(f).collect() };
        Ok(Self {
            history_videos: Tensor::from_vec(flat_i64(&|i| &i.history_videos), (b, h), device)?,
            history_categories: Tensor::from_vec(
                flat_i64(&|i| &i.history_categories),
                (b, h),
                device,
            )?,
            history_weights: Tensor::from_vec(
                inputs
                    .iter()
                    .flat_map(|i| i.history_weights.iter().copied())
                    .collect::<Vec<f32>>(),
                (b, h),
                device,
            )?,
            country: Tensor::from_vec(scalar(&|i| i.country), b, device)?,
            language: Tensor::from_vec(scalar(&|i| i.language), b, device)?,
            age_bucket: Tensor::from_vec(scalar(&|i| i.age_bucket), b, device)?,
            user: Tensor::from_vec(scalar(&|i| i.user), b, device)?,
            dense: Tensor::from_vec(
                inputs.iter().map(|i| i.dense[0]).collect::<Vec<f32>>(),
                (b, 1),
                device,
            )?,
        })
    }
}

/// Tables above this many weights are trained lazily (only the rows a batch reads, see
/// `lazy_adam`); smaller ones densely, as plain Adam does, since a step over all their
/// rows costs about what the batch does. MovieLens-100k's tables (the largest is the 8,193
/// title-word buckets) all stay dense; at 200,000 viewers and 50,000 videos the user and
/// video tables hold 16M weights, and dense steps over them were nearly all of training.
const LAZY_TABLE_WEIGHTS: usize = 1 << 20;

fn trained_lazily(table: &Embedding) -> bool {
    table.embeddings().elem_count() > LAZY_TABLE_WEIGHTS
}

/// Where the towers read embedding rows: the tables themselves, or in training per-batch
/// copies of the rows used from the lazily trained tables, whose gradients stay the size of
/// the batch.
#[derive(Clone, Copy)]
enum Lookup<'a> {
    Tables,
    Sparse(&'a SparseRows),
}

impl Lookup<'_> {
    fn rows(self, table: &Embedding, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Lookup::Sparse(sparse) if trained_lazily(table) => {
                sparse.lookup(table.embeddings(), ids)
            }
            _ => table.forward(ids),
        }
    }

    /// Weighted mean of embedding rows: `[B, W]` rows and weights -> `[B, E]`.
    fn pool(
        self,
        table: &Embedding,
        ids: &Tensor,
        weights: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.rows(table, ids)?
            .broadcast_mul(&weights.unsqueeze(2)?)?
            .sum(1)
    }
}

fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// The video tower's title layer, matching [`TitleInput`].
enum TitleLayer {
    /// One embedding row per hashed word bucket.
    Words(Embedding),
    /// A learned projection of the frozen sentence vector.
    Sentences(Linear),
}

struct Mlp(Vec<Linear>);

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.0.iter().enumerate() {
            x = layer.forward(&x)?;
            if i + 1 < self.0.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}

/// Creates variables from a seeded stream, so training is reproducible.
struct Init {
    rng: ChaCha8Rng,
    vars: Vec<(String, Var)>,
    device: Device,
}

impl Init {
    fn var(
        &mut self,
        name: &str,
        shape: (usize, usize),
        values: Vec<f32>,
    ) -> Result<Tensor, TrainError> {
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let tensor = var.as_tensor().clone();
        self.vars.push((name.to_owned(), var));
        Ok(tensor)
    }

    fn embedding(&mut self, name: &str, rows: usize, dim: usize) -> Result<Embedding, TrainError> {
        let normal = Normal::new(0.0, EMBEDDING_INIT_STD).expect("valid normal");
        let values = (0..rows * dim)
            .map(|_| normal.sample(&mut self.rng))
            .collect();
        Ok(Embedding::new(self.var(name, (rows, dim), values)?, dim))
    }

    /// PyTorch's default: weights and biases uniform in ±1/sqrt(fan_in).
    fn linear(&mut self, name: &str, input: usize, output: usize) -> Result<Linear, TrainError> {
        let bound = 1.0 / (input as f32).sqrt();
        let weights = (0..input * output)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        let bias = (0..output)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        let weight = self.var(&format!("{name}.weight"), (output, input), weights)?;
        let bias = self.var(&format!("{name}.bias"), (1, output), bias)?;
        Ok(Linear::new(weight, Some(bias.squeeze(0)?)))
    }

    fn mlp(
        &mut self,
        name: &str,
        input: usize,
        hidden: &[usize],
        output: usize,
    ) -> Result<Mlp, TrainError> {
        let mut widths = vec![input];
        widths.extend_from_slice(hidden);
        widths.push(output);
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, pair)| self.linear(&format!("{name}.{i}"), pair[0], pair[1]))
            .collect::<Result<_, _>>()?;
        Ok(Mlp(layers))
    }
}

/// The trained towers.
pub struct TwoTower {
    vars: Vec<(String, Var)>,
    video: Embedding,
    category: Embedding,
    title: TitleLayer,
    tag: Embedding,
    country: Embedding,
    language: Embedding,
    age_bucket: Embedding,
    duration_bucket: Embedding,
    user: Embedding,
    user_mlp: Mlp,
    video_mlp: Mlp,
    /// What serving needs to encode users for this model.
    pub spec: UserTowerSpec,
}

impl TwoTower {
    fn new(
        preprocessor: &Preprocessor,
        config: &TwoTowerConfig,
        title_vector_dim: Option<usize>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let e = config.embedding_dim;
        let mut init = Init {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            vars: Vec::new(),
            device: device.clone(),
        };
        let video = init.embedding("video", preprocessor.video_ids.len(), e)?;
        let category = init.embedding("category", preprocessor.categories.len(), e)?;
        let title = match title_vector_dim {
            Some(dim) => TitleLayer::Sentences(init.linear("title_projection", dim, e)?),
            None => TitleLayer::Words(init.embedding("title", TITLE_BUCKETS as usize + 1, e)?),
        };
        let tag = init.embedding("tag", preprocessor.tags.len() + 1, e)?;
        let country = init.embedding("country", preprocessor.countries.len(), e)?;
        let language = init.embedding("language", preprocessor.languages.len(), e)?;
        let age_bucket = init.embedding("age_bucket", age_bucket_rows(preprocessor), e)?;
        let duration_bucket =
            init.embedding("duration_bucket", preprocessor.duration.buckets.len(), e)?;
        let user = init.embedding("user", preprocessor.user_ids.len(), e)?;
        let user_mlp = init.mlp(
            "user_mlp",
            6 * e + 1,
            &config.hidden_layers,
            config.output_dim,
        )?;
        let video_mlp = init.mlp(
            "video_mlp",
            7 * e + VIDEO_DENSE,
            &config.hidden_layers,
            config.output_dim,
        )?;
        Ok(Self {
            vars: init.vars,
            video,
            category,
            title,
            tag,
            country,
            language,
            age_bucket,
            duration_bucket,
            user,
            user_mlp,
            video_mlp,
            spec: UserTowerSpec {
                history_length: config.history_length,
                recency_decay: RECENCY_DECAY,
                output_dim: config.output_dim,
            },
        })
    }

    fn users(&self, batch: &UserBatch, lookup: Lookup<'_>) -> candle_core::Result<Tensor> {
        let x = Tensor::cat(
            &[
                lookup.pool(&self.video, &batch.history_videos, &batch.history_weights)?,
                lookup.pool(
                    &self.category,
                    &batch.history_categories,
                    &batch.history_weights,
                )?,
                lookup.rows(&self.country, &batch.country)?,
                lookup.rows(&self.language, &batch.language)?,
                lookup.rows(&self.age_bucket, &batch.age_bucket)?,
                lookup.rows(&self.user, &batch.user)?,
                batch.dense.clone(),
            ],
            1,
        )?;
        l2_normalize(&self.user_mlp.forward(&x)?)
    }

    fn videos(
        &self,
        inputs: &VideoInputs,
        rows: &Tensor,
        lookup: Lookup<'_>,
    ) -> candle_core::Result<Tensor> {
        let pick = |t: &Tensor| t.index_select(rows, 0);
        let x = Tensor::cat(
            &[
                lookup.rows(&self.video, &pick(&inputs.video)?)?,
                lookup.rows(&self.category, &pick(&inputs.category)?)?,
                lookup.pool(
                    &self.category,
                    &pick(&inputs.children)?,
                    &pick(&inputs.children_weights)?,
                )?,
                match (&self.title, &inputs.title) {
                    (TitleLayer::Words(table), TitleInput::Words { rows, weights }) => {
                        lookup.pool(table, &pick(rows)?, &pick(weights)?)?
                    }
                    (TitleLayer::Sentences(projection), TitleInput::Sentences(vectors)) => {
                        projection.forward(&pick(vectors)?)?
                    }
                    _ => candle_core::bail!("title layer and title inputs differ in kind"),
                },
                lookup.pool(
                    &self.tag,
                    &pick(&inputs.tags)?,
                    &pick(&inputs.tags_weights)?,
                )?,
                lookup.rows(&self.duration_bucket, &pick(&inputs.duration_bucket)?)?,
                lookup.rows(&self.language, &pick(&inputs.language)?)?,
                pick(&inputs.dense)?,
            ],
            1,
        )?;
        l2_normalize(&self.video_mlp.forward(&x)?)
    }

    /// Rebuilds the towers from saved weights (see [`TwoTower::tensors`]).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        spec: UserTowerSpec,
    ) -> Result<Self, TrainError> {
        let mut vars = Vec::new();
        let mut take = |name: &str| -> Result<Tensor, TrainError> {
            let tensor = tensors.get(name).ok_or_else(|| {
                TrainError::NoData(format!("the saved model has no weight {name:?}"))
            })?;
            let var = Var::from_tensor(tensor)?;
            let tensor = var.as_tensor().clone();
            vars.push((name.to_owned(), var));
            Ok(tensor)
        };
        let title = if tensors.contains_key("title_projection.weight") {
            let weight = take("title_projection.weight")?;
            let bias = take("title_projection.bias")?.squeeze(0)?;
            TitleLayer::Sentences(Linear::new(weight, Some(bias)))
        } else {
            let table = take("title")?;
            let dim = table.dim(1)?;
            TitleLayer::Words(Embedding::new(table, dim))
        };
        let mut embedding = |name: &str| -> Result<Embedding, TrainError> {
            let table = take(name)?;
            let dim = table.dim(1)?;
            Ok(Embedding::new(table, dim))
        };
        let video = embedding("video")?;
        let category = embedding("category")?;
        let tag = embedding("tag")?;
        let country = embedding("country")?;
        let language = embedding("language")?;
        let age_bucket = embedding("age_bucket")?;
        let duration_bucket = embedding("duration_bucket")?;
        let user = embedding("user")?;
        let mut mlp = |name: &str| -> Result<Mlp, TrainError> {
            let mut layers = Vec::new();
            while tensors.contains_key(&format!("{name}.{}.weight", layers.len())) {
                let i = layers.len();
                let weight = take(&format!("{name}.{i}.weight"))?;
                let bias = take(&format!("{name}.{i}.bias"))?.squeeze(0)?;
                layers.push(Linear::new(weight, Some(bias)));
            }
            Ok(Mlp(layers))
        };
        let user_mlp = mlp("user_mlp")?;
        let video_mlp = mlp("video_mlp")?;
        Ok(Self {
            vars,
            video,
            category,
            title,
            tag,
            country,
            language,
            age_bucket,
            duration_bucket,
            user,
            user_mlp,
            video_mlp,
            spec,
        })
    }

    /// The width of the title sentence vectors the video tower projects, or `None` if it
    /// reads hashed title words.
    pub fn title_vector_dim(&self) -> Option<usize> {
        match &self.title {
            TitleLayer::Words(_) => None,
            TitleLayer::Sentences(projection) => projection.weight().dim(1).ok(),
        }
    }

    /// User embeddings (row-major `[inputs.len(), output_dim]`) computed by candle.
    pub fn user_embeddings(&self, inputs: &[UserTowerInput]) -> Result<Vec<f32>, TrainError> {
        let batch = UserBatch::new(inputs, &Device::Cpu)?;
        Ok(self
            .users(&batch, Lookup::Tables)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn snapshot(&self) -> candle_core::Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect()
    }

    fn restore(&self, snapshot: &[Tensor]) -> candle_core::Result<()> {
        for ((_, var), saved) in self.vars.iter().zip(snapshot) {
            var.set(saved)?;
        }
        Ok(())
    }

    /// The weights as (dense, large tables trained row by row).
    fn trained_vars(&self) -> (Vec<Var>, Vec<Var>) {
        let lazy: Vec<&Tensor> = [
            &self.video,
            &self.category,
            &self.tag,
            &self.country,
            &self.language,
            &self.age_bucket,
            &self.duration_bucket,
            &self.user,
        ]
        .into_iter()
        .chain(match &self.title {
            TitleLayer::Words(table) => Some(table),
            TitleLayer::Sentences(_) => None,
        })
        .filter(|table| trained_lazily(table))
        .map(|table| table.embeddings())
        .collect();
        self.vars
            .iter()
            .map(|(_, var)| var.clone())
            .partition(|var| !lazy.iter().any(|table| table.id() == var.id()))
    }

    /// The weights by name (for saving as safetensors).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect()
    }
}

/// One training example: the viewer's state before engaging with `video_row`.
struct Example {
    user: u32,
    /// How many of the user's earlier positives form the history.
    position: u32,
    video_row: u32,
    weight: f32,
}

/// A user's positives in time order, with demographics.
struct TrainUser {
    viewer: Viewer,
    positives: Vec<u64>,
}

/// Encodes the user tower input of `user` with its first `position` positives as history.
fn user_input(
    preprocessor: &Preprocessor,
    spec: &UserTowerSpec,
    viewer: &Viewer,
    history: &[u64],
    categories: &HashMap<u64, String>,
) -> UserTowerInput {
    encode_user(preprocessor, spec, viewer, history, |video| {
        categories.get(&video).map(String::as_str)
    })
}

/// What a training run did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    /// Training examples (positives).
    pub examples: usize,
    /// Epochs run.
    pub epochs: usize,
    /// The epoch whose weights were kept (1-based).
    pub best_epoch: usize,
    /// Validation Recall@50 of the kept weights.
    pub best_validation_recall_at_50: f64,
    /// Mean training throughput.
    pub examples_per_second: f64,
    /// Mean wall time of an epoch, validation included.
    pub seconds_per_epoch: f64,
}

/// The training data and everything derived from it that evaluation also needs.
pub struct TrainingData<'a> {
    /// Fitted on the training split.
    pub preprocessor: &'a Preprocessor,
    /// The catalogue.
    pub videos: &'a [Video],
    /// All users (demographics).
    pub users: &'a [User],
    /// The split.
    pub split: &'a Split,
    /// Positive rules.
    pub rules: &'a EngagementRules,
    /// Frozen sentence vectors of the titles, row-major in `videos` order (see
    /// `crate::title_encoder`), or `None` for hashed title words.
    pub title_vectors: Option<&'a [f32]>,
}

/// A trained model together with the encoded catalogue, ready to retrieve.
pub struct TrainedRetriever<'a> {
    /// The model.
    pub model: TwoTower,
    inputs: VideoInputs,
    data: &'a TrainingData<'a>,
    viewers: HashMap<u64, Viewer>,
    categories: HashMap<u64, String>,
    embeddings: Vec<f32>,
    device: Device,
}

/// Positive training interactions per video.
fn positive_counts(histories: &BTreeMap<u64, Vec<u64>>) -> HashMap<u64, u64> {
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for videos in histories.values() {
        for video in videos {
            *counts.entry(*video).or_default() += 1;
        }
    }
    counts
}

impl<'a> TrainedRetriever<'a> {
    /// `model` over the catalogue of `data`, with video embeddings not yet computed.
    fn assemble(
        model: TwoTower,
        data: &'a TrainingData<'a>,
        histories: &BTreeMap<u64, Vec<u64>>,
    ) -> Result<Self, TrainError> {
        let device = Device::Cpu;
        let inputs = VideoInputs::new(
            data.videos,
            data.preprocessor,
            &positive_counts(histories),
            data.title_vectors,
            &device,
        )?;
        let viewers = data
            .users
            .iter()
            .map(|u| {
                (
                    u.user_id,
                    Viewer {
                        user_id: Some(u.user_id),
                        country: Some(u.country.clone()),
                        language: Some(u.language.clone()),
                        age: Some(u.age),
                    },
                )
            })
            .collect();
        let categories = data
            .videos
            .iter()
            .map(|v| (v.video_id, v.category.clone()))
            .collect();
        Ok(Self {
            model,
            inputs,
            data,
            viewers,
            categories,
            embeddings: Vec::new(),
            device,
        })
    }

    /// A model saved by `train two-tower` (its `model.safetensors`), over the catalogue of
    /// `data`, whose preprocessor must be the one saved with the model.
    pub fn load(
        tensors: HashMap<String, Tensor>,
        spec: UserTowerSpec,
        data: &'a TrainingData<'a>,
    ) -> Result<Self, TrainError> {
        let model = TwoTower::from_tensors(tensors, spec)?;
        let given = data
            .title_vectors
            .map(|v| v.len() / data.videos.len().max(1));
        if model.title_vector_dim() != given {
            let describe = |dim: Option<usize>| match dim {
                Some(dim) => format!("title sentence vectors of {dim} values"),
                None => "hashed title words".to_owned(),
            };
            return Err(TrainError::TitleMismatch(format!(
                "the saved model reads {}, but {} were given (load it with the title model it was trained with)",
                describe(model.title_vector_dim()),
                describe(given)
            )));
        }
        // Training sees the train split only: the histories of the validation part.
        let histories =
            eval::training_histories(data.split, data.videos, data.rules, Part::Validation);
        let mut retriever = Self::assemble(model, data, &histories)?;
        retriever.refresh_embeddings()?;
        Ok(retriever)
    }
}

impl TrainedRetriever<'_> {
    fn refresh_embeddings(&mut self) -> Result<(), TrainError> {
        let n = self.inputs.ids.len();
        let mut all = Vec::with_capacity(n * self.model.spec.output_dim);
        for start in (0..n).step_by(4096) {
            let rows: Vec<u32> = (start as u32..(start + 4096).min(n) as u32).collect();
            let rows = Tensor::from_vec(rows.clone(), rows.len(), &self.device)?;
            all.extend(
                self.model
                    .videos(&self.inputs, &rows, Lookup::Tables)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        self.embeddings = all;
        Ok(())
    }

    /// The catalogue's ids and their video-tower embeddings (row-major, L2-normalised).
    pub fn video_embeddings(&self) -> (&[u64], &[f32]) {
        (&self.inputs.ids, &self.embeddings)
    }

    /// The user-tower embedding of an evaluated user (their history and demographics).
    pub fn user_embedding(&self, user: &EvalUser) -> Result<Vec<f32>, TrainError> {
        let viewer = self.viewers.get(&user.user_id).cloned().unwrap_or_default();
        let input = user_input(
            self.data.preprocessor,
            &self.model.spec,
            &viewer,
            &user.history,
            &self.categories,
        );
        let batch = UserBatch::new(&[input], &self.device)?;
        Ok(self
            .model
            .users(&batch, Lookup::Tables)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

impl Retriever for TrainedRetriever<'_> {
    fn name(&self) -> &str {
        "two-tower"
    }

    fn recommend(&self, user: &EvalUser, k: usize) -> Vec<u64> {
        let Ok(query) = self.user_embedding(user) else {
            return Vec::new();
        };
        let seen: HashSet<u64> = user.history.iter().copied().collect();
        let dim = query.len();
        let mut scored: Vec<(f32, u32)> = self
            .embeddings
            .chunks_exact(dim)
            .enumerate()
            .filter(|(row, _)| !seen.contains(&self.inputs.ids[*row]))
            .map(|(row, v)| (v.iter().zip(&query).map(|(a, b)| a * b).sum(), row as u32))
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Vec::new();
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        scored.truncate(k);
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .map(|(_, row)| self.inputs.ids[row as usize])
            .collect()
    }
}

/// Trains the two towers; `progress` receives a line per epoch.
pub fn train<'a>(
    data: &'a TrainingData<'a>,
    config: &TwoTowerConfig,
    show_progress: bool,
    mut progress: impl FnMut(&str),
) -> Result<(TrainedRetriever<'a>, TrainReport), TrainError> {
    let device = Device::Cpu;
    // Training sees the train split only: the histories of the validation part.
    let histories = eval::training_histories(data.split, data.videos, data.rules, Part::Validation);
    let durations = eval::durations(data.videos);
    let mut pair_weight: HashMap<(u64, u64), f32> = HashMap::new();
    for i in &data.split.train {
        let duration = durations.get(&i.video_id).copied().unwrap_or(0);
        let weight = engagement_weight(data.rules, i.interaction_type, i.watch_seconds, duration);
        let entry = pair_weight.entry((i.user_id, i.video_id)).or_default();
        *entry = entry.max(weight);
    }
    let positives_per_video = positive_counts(&histories);
    let title_vector_dim = data
        .title_vectors
        .map(|v| v.len() / data.videos.len().max(1));
    let model = TwoTower::new(data.preprocessor, config, title_vector_dim, &device)?;
    let mut retriever = TrainedRetriever::assemble(model, data, &histories)?;
    let inputs = &retriever.inputs;
    let viewers = &retriever.viewers;

    let mut users = Vec::new();
    let mut examples = Vec::new();
    for (user_id, positives) in &histories {
        let user = users.len() as u32;
        for (position, video) in positives.iter().enumerate() {
            let Some(&video_row) = inputs.row_of.get(video) else {
                continue;
            };
            examples.push(Example {
                user,
                position: position as u32,
                video_row,
                weight: pair_weight.get(&(*user_id, *video)).copied().unwrap_or(1.0),
            });
        }
        users.push(TrainUser {
            viewer: viewers.get(user_id).cloned().unwrap_or_default(),
            positives: positives.clone(),
        });
    }
    if examples.is_empty() {
        return Err(TrainError::NoData(
            "the training split has no positive interactions".into(),
        ));
    }
    // logQ: each video's share of training positives, floored so unseen videos stay finite.
    let total = examples.len() as f64;
    let positive_share: Vec<f64> = inputs
        .ids
        .iter()
        .map(|id| (positives_per_video.get(id).copied().unwrap_or(0) as f64).max(0.5) / total)
        .collect();
    let catalogue = inputs.ids.len() as u32;

    let (dense, tables) = retriever.model.trained_vars();
    let mut optimizer = LazyAdamW::new(
        dense,
        tables,
        ParamsAdamW {
            lr: config.learning_rate,
            ..ParamsAdamW::default()
        },
    )?;
    let validation = EvalSet::new(data.split, data.videos, data.rules, Part::Validation)
        .at_most(config.validation_users, config.seed);

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let (mut best, mut best_epoch, mut best_snapshot) = (f64::NEG_INFINITY, 0, None);
    let started = Instant::now();
    let mut trained_examples = 0usize;
    let mut training_seconds = 0.0;
    let mut epochs = 0;
    let patience = 2;
    for epoch in 1..=config.epochs {
        epochs = epoch;
        order.shuffle(&mut rng);
        let bar = if show_progress {
            crate::progress::bar(examples.len() as u64, &format!("epoch {epoch}"), "examples")
        } else {
            indicatif::ProgressBar::hidden()
        };
        let epoch_started = Instant::now();
        let (mut loss_sum, mut batches) = (0.0, 0);
        for chunk in order.chunks(config.batch_size) {
            if chunk.len() < 2 {
                continue;
            }
            let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
            let user_inputs: Vec<UserTowerInput> = batch
                .iter()
                .map(|e| {
                    let user = &users[e.user as usize];
                    let mut viewer = user.viewer.clone();
                    if rng.random_bool(USER_ID_DROPOUT) {
                        viewer.user_id = None;
                    }
                    user_input(
                        data.preprocessor,
                        &retriever.model.spec,
                        &viewer,
                        &user.positives[..e.position as usize],
                        &retriever.categories,
                    )
                })
                .collect();
            let extra: Vec<u32> = (0..config.extra_negatives)
                .map(|_| rng.random_range(0..catalogue))
                .collect();
            let sparse = SparseRows::default();
            let loss = batch_loss(
                &retriever,
                Lookup::Sparse(&sparse),
                &batch,
                &extra,
                &user_inputs,
                &positive_share,
                config.temperature,
            )?;
            optimizer.backward_step_sparse(&loss, &sparse)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            batches += 1;
            bar.inc(chunk.len() as u64);
            bar.set_message(format!("loss {:.4}", loss_sum / batches as f64));
        }
        bar.finish_and_clear();
        training_seconds += epoch_started.elapsed().as_secs_f64();
        trained_examples += examples.len();

        retriever.refresh_embeddings()?;
        let recall = eval::evaluate(&retriever, &validation).metric("recall@50");
        progress(&format!(
            "epoch {epoch}: loss {:.4}, validation recall@50 {recall:.4}, {:.0} examples/s",
            loss_sum / batches.max(1) as f64,
            examples.len() as f64 / epoch_started.elapsed().as_secs_f64()
        ));
        if !config.keep_best_epoch {
            (best, best_epoch) = (recall, epoch);
        } else if recall > best {
            best = recall;
            best_epoch = epoch;
            best_snapshot = Some(retriever.model.snapshot()?);
        } else if epoch - best_epoch >= patience {
            progress(&format!("early stop: no gain for {patience} epochs"));
            break;
        }
    }
    if let Some(snapshot) = best_snapshot {
        retriever.model.restore(&snapshot)?;
    }
    retriever.refresh_embeddings()?;
    let report = TrainReport {
        examples: examples.len(),
        epochs,
        best_epoch,
        best_validation_recall_at_50: best,
        examples_per_second: trained_examples as f64 / training_seconds.max(1e-9),
        seconds_per_epoch: started.elapsed().as_secs_f64() / epochs.max(1) as f64,
    };
    Ok((retriever, report))
}

/// The weighted sampled-softmax loss of a batch: each user against its own positive, the
/// other examples' positives and the `extra` uniformly drawn videos. Every candidate's
/// logit is lowered by the log of its expected count among the candidates (`B * share +
/// R / N`: in-batch draws follow the positives' distribution, extra ones are uniform), the
/// logQ correction for a mixed proposal.
fn batch_loss(
    retriever: &TrainedRetriever<'_>,
    lookup: Lookup<'_>,
    batch: &[&Example],
    extra: &[u32],
    user_inputs: &[UserTowerInput],
    positive_share: &[f64],
    temperature: f64,
) -> Result<Tensor, TrainError> {
    let device = &retriever.device;
    let b = batch.len();
    let positives: Vec<u32> = batch.iter().map(|e| e.video_row).collect();
    let candidates: Vec<u32> = positives.iter().chain(extra).copied().collect();
    let c = candidates.len();
    let uniform = extra.len() as f64 / positive_share.len().max(1) as f64;
    let correction: Vec<f32> = candidates
        .iter()
        .map(|&row| (b as f64 * positive_share[row as usize] + uniform).ln() as f32)
        .collect();
    // A user's own positive drawn again as another candidate is not a negative.
    let mut mask = vec![0f32; b * c];
    for (i, own) in positives.iter().enumerate() {
        for (j, candidate) in candidates.iter().enumerate() {
            if i != j && own == candidate {
                mask[i * c + j] = -1e9;
            }
        }
    }
    let candidates = Tensor::from_vec(candidates, c, device)?;
    let users = retriever
        .model
        .users(&UserBatch::new(user_inputs, device)?, lookup)?;
    let videos = retriever
        .model
        .videos(&retriever.inputs, &candidates, lookup)?;
    let logits = (users.matmul(&videos.t()?)? / temperature)?
        .broadcast_sub(&Tensor::from_vec(correction, (1, c), device)?)?
        .add(&Tensor::from_vec(mask, (b, c), device)?)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let diagonal = log_probs
        .narrow(1, 0, b)?
        .mul(&Tensor::eye(b, DType::F32, device)?)?
        .sum(1)?;
    let weights = Tensor::from_vec(
        batch.iter().map(|e| e.weight).collect::<Vec<f32>>(),
        b,
        device,
    )?;
    let loss = (diagonal.mul(&weights)?.sum_all()?.neg()?
        / f64::from(weights.sum_all()?.to_scalar::<f32>()?))?;
    Ok(loss)
}
