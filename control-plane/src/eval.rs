//! Offline evaluation of retrieval: full-catalogue ranking, no sampled negatives.
//!
//! For each evaluated user, a retriever ranks the whole catalogue minus the videos the
//! user already engaged with in their history; the relevant set is the videos the user
//! engaged with in the held-out part and not before. With hits the number of relevant
//! videos in the top K:
//!
//! - Recall@K = hits / min(K, |relevant|)
//! - HitRate@K = 1 if hits > 0, else 0
//! - NDCG@K = sum over hit ranks r (0-based) of 1 / log2(r + 2), divided by the same sum
//!   over the first min(K, |relevant|) ranks (binary relevance)
//!
//! each averaged over the users with at least one relevant video. The baselines, measured
//! in the same run as any model: most popular (positive training interactions) and
//! ItemKNN (cosine similarity of the videos' sets of engaged users).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use edge::{EngagementRules, Interaction, Video, engagement_weight};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::split::Split;

/// The cut-offs every report covers.
pub const CUTOFFS: [usize; 4] = [10, 20, 50, 100];

/// One evaluated user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalUser {
    /// Who.
    pub user_id: u64,
    /// Distinct videos engaged with before the held-out part, oldest first.
    pub history: Vec<u64>,
    /// Distinct videos engaged with in the held-out part and not in `history`.
    pub relevant: Vec<u64>,
}

/// Which held-out part to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// History = train; relevant = validation (for early stopping and tuning).
    Validation,
    /// History = train + validation; relevant = test (for reporting).
    Test,
}

/// The users to evaluate, with their histories and relevant videos.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSet {
    /// Users with at least one relevant video.
    pub users: Vec<EvalUser>,
    /// Every video of the catalogue: the candidates.
    pub catalogue: Vec<u64>,
}

/// Each video's duration, which the engagement rules need to judge a watch.
pub fn durations(videos: &[Video]) -> HashMap<u64, u32> {
    videos
        .iter()
        .map(|v| (v.video_id, v.duration_seconds))
        .collect()
}

/// Positive videos of `interactions` per user, first engagement first.
pub fn positives_by_user<'a>(
    interactions: impl IntoIterator<Item = &'a Interaction>,
    durations: &HashMap<u64, u32>,
    rules: &EngagementRules,
) -> BTreeMap<u64, Vec<u64>> {
    let mut events: Vec<&Interaction> = interactions
        .into_iter()
        .filter(|i| {
            let duration = durations.get(&i.video_id).copied().unwrap_or(0);
            rules.is_positive(engagement_weight(
                rules,
                i.interaction_type,
                i.watch_seconds,
                duration,
            ))
        })
        .collect();
    events.sort_by_key(|i| (i.user_id, i.timestamp));
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for user in events.chunk_by(|a, b| a.user_id == b.user_id) {
        let mut seen = HashSet::new();
        out.insert(
            user[0].user_id,
            user.iter()
                .filter(|i| seen.insert(i.video_id))
                .map(|i| i.video_id)
                .collect(),
        );
    }
    out
}

impl EvalSet {
    /// The users of `part`, against the catalogue `videos`.
    pub fn new(split: &Split, videos: &[Video], rules: &EngagementRules, part: Part) -> Self {
        let durations = durations(videos);
        let (history, held_out): (Vec<&Interaction>, &[Interaction]) = match part {
            Part::Validation => (split.train.iter().collect(), &split.validation),
            Part::Test => (
                split.train.iter().chain(&split.validation).collect(),
                &split.test,
            ),
        };
        let histories = positives_by_user(history, &durations, rules);
        let users = positives_by_user(held_out, &durations, rules)
            .into_iter()
            .filter_map(|(user_id, held)| {
                let history = histories.get(&user_id).cloned().unwrap_or_default();
                let seen: HashSet<u64> = history.iter().copied().collect();
                let relevant: Vec<u64> = held.into_iter().filter(|v| !seen.contains(v)).collect();
                (!relevant.is_empty()).then_some(EvalUser {
                    user_id,
                    history,
                    relevant,
                })
            })
            .collect();
        Self {
            users,
            catalogue: videos.iter().map(|v| v.video_id).collect(),
        }
    }

    /// At most `max_users` of the users: all of them, or a sample drawn with `seed` (kept
    /// in user order), so large data sets evaluate in minutes and every run the same way.
    pub fn at_most(mut self, max_users: usize, seed: u64) -> Self {
        if self.users.len() > max_users {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut kept: Vec<usize> =
                rand::seq::index::sample(&mut rng, self.users.len(), max_users).into_vec();
            kept.sort_unstable();
            let mut users = std::mem::take(&mut self.users);
            self.users = kept
                .into_iter()
                .map(|i| std::mem::take(&mut users[i]))
                .collect();
        }
        self
    }
}

/// Anything that turns a user's history into a ranked list of videos.
pub trait Retriever {
    /// Name in reports.
    fn name(&self) -> &str;
    /// The top `k` videos for `user`, best first, none of them in `user.history`.
    fn recommend(&self, user: &EvalUser, k: usize) -> Vec<u64>;
}

/// Mean metrics of one retriever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Retriever name.
    pub model: String,
    /// Users evaluated.
    pub users: usize,
    /// `recall@K`, `ndcg@K`, `hit_rate@K` for K in [`CUTOFFS`].
    pub metrics: BTreeMap<String, f64>,
}

impl RetrievalReport {
    /// A metric by name, e.g. `recall@50`.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics.get(name).copied().unwrap_or(f64::NAN)
    }
}

/// Evaluates `retriever` on every user of `set`.
pub fn evaluate(retriever: &dyn Retriever, set: &EvalSet) -> RetrievalReport {
    let deepest = CUTOFFS[CUTOFFS.len() - 1];
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for user in &set.users {
        let ranked = retriever.recommend(user, deepest);
        let relevant: HashSet<u64> = user.relevant.iter().copied().collect();
        for k in CUTOFFS {
            let (hits, dcg) = ranked
                .iter()
                .take(k)
                .enumerate()
                .filter(|(_, video)| relevant.contains(video))
                .fold((0usize, 0.0f64), |(hits, dcg), (rank, _)| {
                    (hits + 1, dcg + 1.0 / (rank as f64 + 2.0).log2())
                });
            let ideal_hits = k.min(relevant.len());
            let idcg: f64 = (0..ideal_hits).map(|r| 1.0 / (r as f64 + 2.0).log2()).sum();
            *sums.entry(format!("recall@{k}")).or_default() += hits as f64 / ideal_hits as f64;
            *sums.entry(format!("ndcg@{k}")).or_default() += dcg / idcg;
            *sums.entry(format!("hit_rate@{k}")).or_default() += f64::from(hits > 0);
        }
    }
    let users = set.users.len();
    RetrievalReport {
        model: retriever.name().to_owned(),
        users,
        metrics: sums
            .into_iter()
            .map(|(name, sum)| (name, sum / users.max(1) as f64))
            .collect(),
    }
}

/// The reports of one evaluation run, printed as a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// One report per retriever.
    pub reports: Vec<RetrievalReport>,
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<14}", "model")?;
        for k in CUTOFFS {
            write!(
                f,
                " {:>9} {:>9} {:>9}",
                format!("recall@{k}"),
                format!("ndcg@{k}"),
                format!("hit@{k}")
            )?;
        }
        writeln!(f)?;
        for report in &self.reports {
            write!(f, "{:<14}", report.model)?;
            for k in CUTOFFS {
                write!(
                    f,
                    " {:>9.4} {:>9.4} {:>9.4}",
                    report.metric(&format!("recall@{k}")),
                    report.metric(&format!("ndcg@{k}")),
                    report.metric(&format!("hit_rate@{k}"))
                )?;
            }
            writeln!(f)?;
        }
        if let Some(first) = self.reports.first() {
            write!(f, "({} users evaluated)", first.users)?;
        }
        Ok(())
    }
}

/// Videos ranked by positive training interactions (ties: lower id first).
pub struct MostPopular {
    ranked: Vec<u64>,
}

impl MostPopular {
    /// Counts positives in `history_by_user` (one per user and video).
    pub fn fit(history_by_user: &BTreeMap<u64, Vec<u64>>, catalogue: &[u64]) -> Self {
        let mut counts: HashMap<u64, u64> = catalogue.iter().map(|&v| (v, 0)).collect();
        for videos in history_by_user.values() {
            for video in videos {
                *counts.entry(*video).or_default() += 1;
            }
        }
        let mut ranked: Vec<(u64, u64)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Self {
            ranked: ranked.into_iter().map(|(video, _)| video).collect(),
        }
    }

    fn fill(&self, out: &mut Vec<u64>, excluded: &HashSet<u64>, k: usize) {
        for &video in &self.ranked {
            if out.len() >= k {
                break;
            }
            if !excluded.contains(&video) {
                out.push(video);
            }
        }
    }
}

impl Retriever for MostPopular {
    fn name(&self) -> &str {
        "most-popular"
    }

    fn recommend(&self, user: &EvalUser, k: usize) -> Vec<u64> {
        let excluded: HashSet<u64> = user.history.iter().copied().collect();
        let mut out = Vec::with_capacity(k);
        self.fill(&mut out, &excluded, k);
        out
    }
}

/// Item-based collaborative filtering: cosine similarity between videos' sets of engaged
/// users, keeping each video's `neighbors` most similar videos; a user's score for a video
/// is the sum of its similarities to the user's history. Users whose history reaches too
/// few videos are topped up by popularity.
pub struct ItemKnn {
    index: HashMap<u64, u32>,
    videos: Vec<u64>,
    neighbors: Vec<Vec<(u32, f32)>>,
    popular: MostPopular,
}

impl ItemKnn {
    /// Fits on the training histories.
    pub fn fit(
        history_by_user: &BTreeMap<u64, Vec<u64>>,
        catalogue: &[u64],
        neighbors: usize,
    ) -> Self {
        let videos: Vec<u64> = catalogue.to_vec();
        let index: HashMap<u64, u32> = videos
            .iter()
            .enumerate()
            .map(|(i, &v)| (v, i as u32))
            .collect();
        let baskets: Vec<Vec<u32>> = history_by_user
            .values()
            .map(|history| {
                history
                    .iter()
                    .filter_map(|v| index.get(v).copied())
                    .collect()
            })
            .collect();
        let mut users_of: Vec<Vec<u32>> = vec![Vec::new(); videos.len()];
        for (user, basket) in baskets.iter().enumerate() {
            for &video in basket {
                users_of[video as usize].push(user as u32);
            }
        }
        // One dense row of co-occurrence counts at a time: memory stays O(videos).
        let mut row = vec![0u32; videos.len()];
        let mut touched = Vec::new();
        let mut lists = Vec::with_capacity(videos.len());
        for item in 0..videos.len() {
            for &user in &users_of[item] {
                for &other in &baskets[user as usize] {
                    if other as usize != item {
                        if row[other as usize] == 0 {
                            touched.push(other);
                        }
                        row[other as usize] += 1;
                    }
                }
            }
            let own = users_of[item].len() as f32;
            let mut similar: Vec<(u32, f32)> = touched
                .drain(..)
                .map(|other| {
                    let together = std::mem::take(&mut row[other as usize]) as f32;
                    (
                        other,
                        together / (own * users_of[other as usize].len() as f32).sqrt(),
                    )
                })
                .collect();
            similar.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            similar.truncate(neighbors);
            lists.push(similar);
        }
        Self {
            index,
            videos,
            neighbors: lists,
            popular: MostPopular::fit(history_by_user, catalogue),
        }
    }
}

impl Retriever for ItemKnn {
    fn name(&self) -> &str {
        "item-knn"
    }

    fn recommend(&self, user: &EvalUser, k: usize) -> Vec<u64> {
        let excluded: HashSet<u64> = user.history.iter().copied().collect();
        let mut scores: HashMap<u32, f32> = HashMap::new();
        for video in &user.history {
            if let Some(&item) = self.index.get(video) {
                for &(other, similarity) in &self.neighbors[item as usize] {
                    *scores.entry(other).or_default() += similarity;
                }
            }
        }
        let mut ranked: Vec<(u32, f32)> = scores
            .into_iter()
            .filter(|(item, _)| !excluded.contains(&self.videos[*item as usize]))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out: Vec<u64> = ranked
            .into_iter()
            .take(k)
            .map(|(item, _)| self.videos[item as usize])
            .collect();
        if out.len() < k {
            let mut taken = excluded;
            taken.extend(out.iter().copied());
            self.popular.fill(&mut out, &taken, k);
        }
        out
    }
}

/// The training histories an [`EvalSet`] of `part` assumes, for fitting baselines.
pub fn training_histories(
    split: &Split,
    videos: &[Video],
    rules: &EngagementRules,
    part: Part,
) -> BTreeMap<u64, Vec<u64>> {
    let durations = durations(videos);
    match part {
        Part::Validation => positives_by_user(&split.train, &durations, rules),
        Part::Test => positives_by_user(
            split.train.iter().chain(&split.validation),
            &durations,
            rules,
        ),
    }
}

#[cfg(test)]
mod tests;
