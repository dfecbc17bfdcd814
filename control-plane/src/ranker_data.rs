//! The ranker's rows, built from a data set and a trained two-tower model with
//! [`edge::ranker::features::ranker_features`] (the function the edge calls at serving).
//!
//! **Training rows** come from the validation part, which the two-tower model did not
//! learn from: its scores there are what serving will see, whereas on the training part
//! they would be inflated by memorisation and the ranker would learn to trust them too
//! much. A request is one viewer's session in that part (interactions less than
//! [`SESSION_GAP_SECONDS`] apart); its positives are the videos with a positive
//! interaction (the engagement rules) among the viewer's retrieved candidates (the
//! two-tower top `candidates`: serving only ranks what retrieval found), and each positive
//! brings `negative_sample_ratio` negatives: `impression_negatives` of them from the
//! session's impressions without engagement, the rest from the retrieved candidates that
//! the viewer did not engage with (impressions again if those run out). The viewer's
//! history (affinities, recent similarities, two-tower query) is their positives of the
//! training part. Requests are assigned to the ranker's own train or early-stopping
//! rows by a hash of the viewer, so one viewer's rows never straddle the two.
//!
//! **Evaluation rows** are what serving ranks: for each user of an [`EvalSet`], the
//! two-tower top `candidates` (history excluded), at the time and on the device of their
//! first held-out interaction. The ranker only reorders them, so the comparison with the
//! two-tower order is of the same candidates.
//!
//! `retrieval_source` is `personalized` on every row: offline there is only the main
//! two-tower query; the edge's category queries (and their sources) serve later.

use std::collections::{BTreeMap, HashMap, HashSet};

use edge::catalog::{Catalog, VideoRef};
use edge::ranker::FeatureValue;
use edge::ranker::features::{
    COLUMNS, CandidateContext, ColumnKind, ViewerColumns, ViewerContext, ViewerHistory,
    ranker_features, recent_vectors,
};
use edge::{Channel, Interaction, User, engagement_weight};
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::config::RankerConfig;
use crate::eval::{EvalSet, EvalUser, Part, Retriever, durations, training_histories};
use crate::ranker_train::RankerRows;
use crate::two_tower::{TrainError, TrainedRetriever, TrainingData};

/// Interactions of one viewer further apart than this start a new request.
pub const SESSION_GAP_SECONDS: i64 = 30 * 60;

/// The retrieval source of every offline row.
const SOURCE: &str = "personalized";

/// The ranker's column kinds, in [`COLUMNS`] order.
pub fn column_kinds() -> Vec<ColumnKind> {
    COLUMNS.iter().map(|c| c.1).collect()
}

/// The ranker's column names, in [`COLUMNS`] order.
pub fn column_names() -> Vec<&'static str> {
    COLUMNS.iter().map(|c| c.0).collect()
}

/// Rows of [`COLUMNS`] with a label, a request and a video each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankerSet {
    /// Row-major features.
    pub values: Vec<FeatureValue>,
    /// 1 for a positive, 0 for a negative.
    pub labels: Vec<f32>,
    /// The request of each row; a request's rows are contiguous.
    pub groups: Vec<u32>,
    /// The viewer of each row.
    pub users: Vec<u64>,
    /// The video of each row.
    pub videos: Vec<u64>,
    /// The two-tower score of each row (also a feature; kept for ordering).
    pub two_tower_scores: Vec<f32>,
}

impl RankerSet {
    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Requests.
    pub fn requests(&self) -> usize {
        self.groups.chunk_by(|a, b| a == b).count()
    }

    /// Positive rows.
    pub fn positives(&self) -> usize {
        self.labels.iter().filter(|&&l| l > 0.5).count()
    }

    /// The view the trainer takes, with `kinds` and `names` from [`column_kinds`] and
    /// [`column_names`].
    pub fn rows<'a>(&'a self, kinds: &'a [ColumnKind], names: &'a [&'a str]) -> RankerRows<'a> {
        RankerRows {
            columns: kinds,
            names,
            values: &self.values,
            labels: &self.labels,
            groups: &self.groups,
        }
    }
}

/// What rows are built from.
pub struct RankerSources<'a> {
    /// The data set's training view (preprocessor, catalogue, users, split, rules).
    pub data: &'a TrainingData<'a>,
    /// Channels, for subscriber counts.
    pub channels: &'a [Channel],
    /// The trained two-tower model over the same catalogue.
    pub retriever: &'a TrainedRetriever<'a>,
}

/// The per-data-set lookups every row needs.
struct Lookups<'a> {
    /// The catalogue as a bundle carries it: rows read the facts serving reads.
    catalog: Catalog,
    users: HashMap<u64, &'a User>,
    rows: HashMap<u64, usize>,
    /// The two-tower video embeddings, row-major in `rows` order.
    vectors: &'a [f32],
    dim: usize,
}

impl<'a> Lookups<'a> {
    fn new(sources: &'a RankerSources<'a>) -> Result<Self, TrainError> {
        let (ids, vectors) = sources.retriever.video_embeddings();
        let catalog = Catalog::build(sources.data.videos, sources.channels, &[])
            .map_err(|e| TrainError::NoData(e.to_string()))?;
        Ok(Self {
            catalog,
            users: sources.data.users.iter().map(|u| (u.user_id, u)).collect(),
            rows: ids.iter().enumerate().map(|(row, &id)| (id, row)).collect(),
            vectors,
            dim: vectors.len() / ids.len().max(1),
        })
    }

    fn history(&self, videos: &[u64]) -> ViewerHistory {
        ViewerHistory::new(
            videos
                .iter()
                .filter_map(|&id| self.catalog.get(id))
                .map(|v| (v.category(), v.channel_id())),
        )
    }

    fn embedding(&self, video_id: u64) -> Option<&[f32]> {
        let row = *self.rows.get(&video_id)?;
        self.vectors.get(row * self.dim..(row + 1) * self.dim)
    }

    /// The [`recent_vectors`] of a history (oldest first), as serving takes them from the
    /// shard.
    fn recent_vectors(&self, videos: &[u64]) -> Vec<&[f32]> {
        recent_vectors(videos.iter().filter_map(|&id| self.embedding(id)))
    }
}

/// Summed in order, so every score of a row is the same bits wherever it is computed.
fn inner_product(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A viewer's query embedding and their scores for the whole catalogue.
struct Scored {
    scores: Vec<f32>,
}

impl Scored {
    fn new(sources: &RankerSources<'_>, user: &EvalUser) -> Result<Self, TrainError> {
        let query = sources.retriever.user_embedding(user)?;
        let (_, vectors) = sources.retriever.video_embeddings();
        let scores = vectors
            .chunks_exact(query.len())
            .map(|v| inner_product(v, &query))
            .collect();
        Ok(Self { scores })
    }

    /// The best `k` catalogue rows not in `excluded`, best first (ties: lower row).
    fn top(&self, k: usize, excluded: &HashSet<u64>, ids: &[u64]) -> Vec<usize> {
        let mut rows: Vec<usize> = (0..self.scores.len())
            .filter(|&row| !excluded.contains(&ids[row]))
            .collect();
        let k = k.min(rows.len());
        if k == 0 {
            return Vec::new();
        }
        let order =
            |a: &usize, b: &usize| self.scores[*b].total_cmp(&self.scores[*a]).then(a.cmp(b));
        rows.select_nth_unstable_by(k - 1, order);
        rows.truncate(k);
        rows.sort_by(order);
        rows
    }
}

/// One request in the making.
struct Request<'a> {
    user: &'a EvalUser,
    time: i64,
    device: &'a str,
    history: &'a ViewerHistory,
    /// The best two-tower score among the request's retrieved candidates.
    best_score: f32,
    /// The viewer's [`recent_vectors`].
    recent: &'a [&'a [f32]],
}

/// A video of a request with what retrieval said about it.
struct Candidate<'a> {
    video: VideoRef<'a>,
    score: f32,
    rank: Option<u32>,
}

impl Lookups<'_> {
    fn push_row(
        &self,
        preprocessor: &edge::preprocess::Preprocessor,
        request: &Request<'_>,
        candidate: &Candidate<'_>,
        label: f32,
        group: u32,
        out: &mut RankerSet,
    ) {
        let user = self.users.get(&request.user.user_id);
        let viewer = ViewerContext {
            country: user.map(|u| u.country.as_str()),
            language: user.map(|u| u.language.as_str()),
            age: user.map(|u| u.age),
            device: Some(request.device),
            time: request.time,
            history: request.history,
        };
        let video = candidate.video;
        let similarities: Vec<f32> = match self.embedding(video.video_id()) {
            Some(vector) => request
                .recent
                .iter()
                .map(|recent| inner_product(recent, vector))
                .collect(),
            None => Vec::new(),
        };
        let context = CandidateContext {
            video,
            two_tower_score: candidate.score,
            best_two_tower_score: request.best_score,
            retrieval_rank: candidate.rank,
            source: SOURCE,
            recent_similarities: &similarities,
        };
        ranker_features(
            &ViewerColumns::new(preprocessor, viewer),
            &context,
            &mut out.values,
        );
        out.labels.push(label);
        out.groups.push(group);
        out.users.push(request.user.user_id);
        out.videos.push(video.video_id());
        out.two_tower_scores.push(candidate.score);
    }
}

/// Whether a viewer's requests go to the early-stopping rows.
fn held_for_validation(user_id: u64, share: f64, seed: u64) -> bool {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..].copy_from_slice(&user_id.to_le_bytes());
    let draw = xxhash_rust::xxh3::xxh3_64(&key) as f64 / u64::MAX as f64;
    draw < share
}

/// The ranker's training and early-stopping rows from the validation part (see the
/// module's doc); `validation_share` of the viewers go to the second set.
pub fn training_rows(
    sources: &RankerSources<'_>,
    config: &RankerConfig,
    candidates: usize,
    validation_share: f64,
) -> Result<(RankerSet, RankerSet), TrainError> {
    let data = sources.data;
    let lookups = Lookups::new(sources)?;
    let (ids, _) = sources.retriever.video_embeddings();
    let durations = durations(data.videos);
    let histories = training_histories(data.split, data.videos, data.rules, Part::Validation);
    let is_positive = |i: &Interaction| {
        let duration = durations.get(&i.video_id).copied().unwrap_or(0);
        data.rules.is_positive(engagement_weight(
            data.rules,
            i.interaction_type,
            i.watch_seconds,
            duration,
        ))
    };
    let mut by_user: BTreeMap<u64, Vec<&Interaction>> = BTreeMap::new();
    for interaction in &data.split.validation {
        by_user
            .entry(interaction.user_id)
            .or_default()
            .push(interaction);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut train = RankerSet::default();
    let mut validation = RankerSet::default();
    let mut group = 0u32;
    let no_history = Vec::new();
    for (user_id, mut events) in by_user {
        events.sort_by_key(|i| i.timestamp);
        let engaged_in_part: HashSet<u64> = events
            .iter()
            .filter(|i| is_positive(i))
            .map(|i| i.video_id)
            .collect();
        if engaged_in_part.is_empty() {
            continue;
        }
        let history_videos = histories.get(&user_id).unwrap_or(&no_history);
        let user = EvalUser {
            user_id,
            history: history_videos.clone(),
            relevant: Vec::new(),
        };
        let history = lookups.history(history_videos);
        let recent = lookups.recent_vectors(history_videos);
        let scored = Scored::new(sources, &user)?;
        let in_history: HashSet<u64> = history_videos.iter().copied().collect();
        let mut excluded = in_history.clone();
        excluded.extend(&engaged_in_part);
        let retrieved: Vec<u64> = scored
            .top(candidates, &in_history, ids)
            .into_iter()
            .map(|row| ids[row])
            .collect();
        let rank_of: HashMap<u64, u32> = retrieved
            .iter()
            .enumerate()
            .map(|(rank, &id)| (id, rank as u32))
            .collect();
        let best_score = retrieved
            .first()
            .map_or(0.0, |id| scored.scores[lookups.rows[id]]);
        let out = if held_for_validation(user_id, validation_share, config.seed) {
            &mut validation
        } else {
            &mut train
        };
        for session in events.chunk_by(|a, b| b.timestamp - a.timestamp < SESSION_GAP_SECONDS) {
            let positives: Vec<u64> = {
                let mut seen = HashSet::new();
                session
                    .iter()
                    .filter(|i| is_positive(i) && seen.insert(i.video_id))
                    // Serving only ranks what retrieval found: a positive it missed
                    // would teach the ranker about videos it never sees.
                    .filter(|i| rank_of.contains_key(&i.video_id))
                    .map(|i| i.video_id)
                    .collect()
            };
            if positives.is_empty() {
                continue;
            }
            let request = Request {
                user: &user,
                time: session[0].timestamp,
                device: &session[0].device,
                history: &history,
                best_score,
                recent: &recent,
            };
            // Shown in this session and not engaged with anywhere in the part.
            let mut shown: Vec<u64> = session
                .iter()
                .map(|i| i.video_id)
                .filter(|v| !excluded.contains(v))
                .collect();
            shown.sort_unstable();
            shown.dedup();
            shown.shuffle(&mut rng);
            let wanted = positives.len() * config.negative_sample_ratio;
            let from_impressions = (positives.len()
                * config
                    .impression_negatives
                    .min(config.negative_sample_ratio))
            .min(shown.len());
            let mut negatives: Vec<u64> = shown[..from_impressions].to_vec();
            let taken: HashSet<u64> = negatives.iter().copied().collect();
            let pool: Vec<u64> = retrieved
                .iter()
                .copied()
                .filter(|v| !taken.contains(v) && !excluded.contains(v))
                .collect();
            negatives.extend(pool.choose_multiple(&mut rng, wanted - negatives.len()));
            // Too few retrieved candidates left: top up from the impressions.
            let short = wanted - negatives.len();
            negatives.extend(shown[from_impressions..].iter().take(short));
            let labelled = positives
                .iter()
                .map(|&v| (v, 1.0))
                .chain(negatives.iter().map(|&v| (v, 0.0)));
            for (video_id, label) in labelled {
                let (Some(video), Some(&row)) =
                    (lookups.catalog.get(video_id), lookups.rows.get(&video_id))
                else {
                    continue;
                };
                let candidate = Candidate {
                    video,
                    score: scored.scores[row],
                    rank: rank_of.get(&video_id).copied(),
                };
                lookups.push_row(data.preprocessor, &request, &candidate, label, group, out);
            }
            group += 1;
        }
    }
    Ok((train, validation))
}

/// The candidates serving would rank for each user of an evaluation set, with the
/// ordering each scorer gives them.
pub struct CandidateLists {
    /// One request per user of the set, in its order; labels mark relevant videos.
    pub set: RankerSet,
}

/// The first held-out interaction of each user of `part`: the request's time and device.
fn first_held_out(data: &TrainingData<'_>, part: Part) -> HashMap<u64, (i64, String)> {
    let held_out = match part {
        Part::Validation => &data.split.validation,
        Part::Test => &data.split.test,
    };
    let mut first: HashMap<u64, (i64, String)> = HashMap::new();
    for i in held_out {
        let entry = first
            .entry(i.user_id)
            .or_insert_with(|| (i.timestamp, i.device.clone()));
        if i.timestamp < entry.0 {
            *entry = (i.timestamp, i.device.clone());
        }
    }
    first
}

/// The two-tower top `candidates` of every user of `set` (a set of `part`), as rows.
pub fn candidate_lists(
    sources: &RankerSources<'_>,
    set: &EvalSet,
    part: Part,
    candidates: usize,
) -> Result<CandidateLists, TrainError> {
    let lookups = Lookups::new(sources)?;
    let (ids, _) = sources.retriever.video_embeddings();
    let first = first_held_out(sources.data, part);
    let mut out = RankerSet::default();
    for (group, user) in set.users.iter().enumerate() {
        let scored = Scored::new(sources, user)?;
        let excluded: HashSet<u64> = user.history.iter().copied().collect();
        let relevant: HashSet<u64> = user.relevant.iter().copied().collect();
        let history = lookups.history(&user.history);
        let recent = lookups.recent_vectors(&user.history);
        let (time, device) = first
            .get(&user.user_id)
            .map(|(t, d)| (*t, d.as_str()))
            .unwrap_or((0, ""));
        let retrieved = scored.top(candidates, &excluded, ids);
        let request = Request {
            user,
            time,
            device,
            history: &history,
            best_score: retrieved.first().map_or(0.0, |&row| scored.scores[row]),
            recent: &recent,
        };
        for (rank, &row) in retrieved.iter().enumerate() {
            let Some(video) = lookups.catalog.get(ids[row]) else {
                continue;
            };
            let label = f32::from(u8::from(relevant.contains(&ids[row])));
            let candidate = Candidate {
                video,
                score: scored.scores[row],
                rank: Some(rank as u32),
            };
            lookups.push_row(
                sources.data.preprocessor,
                &request,
                &candidate,
                label,
                group as u32,
                &mut out,
            );
        }
    }
    Ok(CandidateLists { set: out })
}

impl CandidateLists {
    /// Each user's candidates ordered by `scores` (one per row; ties keep the two-tower
    /// order), as a retriever that [`crate::eval::evaluate`] can measure.
    pub fn ordered_by(&self, name: &str, scores: &[f64]) -> OrderedLists {
        assert_eq!(scores.len(), self.set.len(), "one score per candidate row");
        let mut lists = HashMap::new();
        let mut start = 0;
        for rows in self.set.groups.chunk_by(|a, b| a == b) {
            let user = self.set.users[start];
            let mut order: Vec<usize> = (start..start + rows.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            lists.insert(
                user,
                order.into_iter().map(|row| self.set.videos[row]).collect(),
            );
            start += rows.len();
        }
        OrderedLists {
            name: name.to_owned(),
            lists,
        }
    }

    /// The two-tower order itself.
    pub fn two_tower_order(&self) -> OrderedLists {
        let scores: Vec<f64> = self
            .set
            .two_tower_scores
            .iter()
            .map(|&s| f64::from(s))
            .collect();
        self.ordered_by("two-tower", &scores)
    }
}

/// Fixed ranked lists per user.
pub struct OrderedLists {
    name: String,
    lists: HashMap<u64, Vec<u64>>,
}

impl Retriever for OrderedLists {
    fn name(&self) -> &str {
        &self.name
    }

    fn recommend(&self, user: &EvalUser, k: usize) -> Vec<u64> {
        self.lists
            .get(&user.user_id)
            .map(|list| list.iter().take(k).copied().collect())
            .unwrap_or_default()
    }
}

/// The two-tower order of `lists` beside the order of each named scorer (one score per
/// candidate row), measured on `set` with [`crate::eval::evaluate`].
pub fn ranking_comparison(
    lists: &CandidateLists,
    set: &EvalSet,
    scorers: &[(&str, &[f64])],
) -> crate::eval::Comparison {
    let mut reports = vec![crate::eval::evaluate(&lists.two_tower_order(), set)];
    for (name, scores) in scorers {
        reports.push(crate::eval::evaluate(&lists.ordered_by(name, scores), set));
    }
    crate::eval::Comparison { reports }
}
