//! `recommend`: the serving pipeline, from a request to an ordered list of videos, in the
//! seed's four stages (after the user tower):
//!
//! 1. **retrieval**: the viewer's embedding searches the shard; extra queries, each pulled
//!    toward one of the viewer's top categories (their stated preferences first, then
//!    their history), add up to a quota of that category's videos each; promoted videos
//!    join so that they can fill their slots. Cold viewers (no history and an id the
//!    tower does not know) get the most viewed videos instead, those in their language
//!    first.
//! 2. **filtering**: excluded and (by default) watched ids, content ratings above the
//!    viewer's age, videos not available in their country, languages they did not ask
//!    for. When fewer than `n` survive, popular videos that pass the same filters top the
//!    list up.
//! 3. **ranking**: the ranker's trees on [`ranker_features`], the function training rows
//!    come from (cold viewers: popularity, as there is no two-tower score to rank on).
//! 4. **ordering**: a freshness boost, per-category and per-channel caps (relaxed only
//!    when nothing else is left), and the best promoted videos at their positions.
//!
//! Edge has no clock: the caller times each stage. [`Recommender::recommend`] takes the
//! caller's clock; hosts that cannot lend one (the raw ABI has no imports) drive the
//! stages one by one with [`Recommender::start`], [`Run::run_stage`] and
//! [`Run::finish`], reading their own clock between calls.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::bundle::{BundleView, SectionKind};
use crate::catalog::{Catalog, VideoRef};
use crate::preprocess::Preprocessor;
use crate::ranker::features::{
    COLUMNS, CandidateContext, FIRST_RECENT_COLUMN, ViewerColumns, ViewerContext, ViewerHistory,
    ranker_features, recent_vectors,
};
use crate::ranker::{FeatureValue, RankerModel, RankerScratch};
use crate::rules::{BusinessRules, Experiments};
use crate::shard::{SearchScratch, Shard};
use crate::tower::{TowerTables, UserTower, UserTowerSpec, Viewer, encode_user};

thread_local! {
    static SEARCH_SCRATCH: std::cell::RefCell<SearchScratch> = std::cell::RefCell::default();
    static RANKER_SCRATCH: std::cell::RefCell<RankerScratch> = std::cell::RefCell::default();
}

/// The most results one request may ask for.
pub const MAX_RESULTS: u32 = 200;
/// Results when a request does not say.
pub const DEFAULT_RESULTS: u32 = 20;
/// The longest `watch_history` or `excluded_video_ids` a request may carry (send the most
/// recent ones).
pub const MAX_LIST_IDS: usize = 10_000;
/// The most preferred categories or languages a request may carry.
pub const MAX_PREFERENCES: usize = 100;
/// The longest text field (country, language, device, a preference).
pub const MAX_TEXT: usize = 256;
/// The oldest age a request may give.
pub const MAX_AGE: f64 = 150.0;

/// `Recommender::shard_position_of_row`'s mark for a video the shard does not hold.
const NOT_IN_SHARD: u32 = u32::MAX;

/// `Recommender::row_of_position`'s mark for a shard video the catalogue does not hold.
const NOT_IN_CATALOG: u32 = u32::MAX;

/// What is known about the viewer, all optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFeatures {
    /// Country code (ISO 3166 alpha-2, as in the data).
    #[serde(default)]
    pub country: Option<String>,
    /// Language code.
    #[serde(default)]
    pub language: Option<String>,
    /// Age in years (0 to [`MAX_AGE`]; fractions are truncated).
    #[serde(default)]
    pub age: Option<f64>,
    /// Device class, e.g. `mobile`.
    #[serde(default)]
    pub device: Option<String>,
}

/// What the viewer asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPreferences {
    /// Categories to retrieve from first (each gets a category query).
    #[serde(default)]
    pub categories: Vec<String>,
    /// Only videos in these languages (none: any language).
    #[serde(default)]
    pub languages: Vec<String>,
}

/// A recommendation request: the seed's `POST /recommendations` body plus the time, which
/// edge cannot read itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The viewer's id, if they have one; anonymous viewers are never in an experiment.
    #[serde(default)]
    pub user_id: Option<u64>,
    /// How many videos to return (1 to [`MAX_RESULTS`]).
    #[serde(default = "default_results")]
    pub n: u32,
    /// Unix seconds of the request (the caller's clock).
    pub timestamp: i64,
    /// What is known about the viewer.
    #[serde(default)]
    pub user_features: UserFeatures,
    /// Videos the viewer engaged with, oldest first.
    #[serde(default)]
    pub watch_history: Vec<u64>,
    /// Leave out `watch_history`'s videos (the bundle's rules decide when absent).
    #[serde(default)]
    pub exclude_watched: Option<bool>,
    /// Videos never to return.
    #[serde(default)]
    pub excluded_video_ids: Vec<u64>,
    /// What the viewer asked for.
    #[serde(default)]
    pub user_preferences: UserPreferences,
}

fn default_results() -> u32 {
    DEFAULT_RESULTS
}

impl Request {
    /// A request for `n` videos at `timestamp` with nothing else known.
    pub fn new(n: u32, timestamp: i64) -> Self {
        Self {
            user_id: None,
            n,
            timestamp,
            user_features: UserFeatures::default(),
            watch_history: Vec::new(),
            exclude_watched: None,
            excluded_video_ids: Vec::new(),
            user_preferences: UserPreferences::default(),
        }
    }

    /// Decodes a MessagePack request (a map with the field names, as `rmp_serde` writes
    /// with `to_vec_named`).
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, Error> {
        rmp_serde::from_slice(bytes).map_err(|e| Error::InvalidRequest {
            field: "request".into(),
            reason: format!("is not a valid MessagePack request: {e}"),
        })
    }
}

/// One recommended video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The video.
    pub video_id: u64,
    /// Its final score (ranker score plus freshness boost; popularity for cold viewers).
    pub score: f64,
    /// Its primary category.
    pub category: String,
    /// Why it is here: `personalized`, `category:<name>`, `promoted` or `popular`.
    pub source: String,
    /// Its title, for display.
    pub title: String,
    /// Its channel.
    pub channel_id: u64,
}

/// Milliseconds spent in each stage, by the caller's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageMs {
    /// Encoding the viewer and running the user tower.
    pub tower: f64,
    /// Searching the shard.
    pub retrieval: f64,
    /// Filtering.
    pub filtering: f64,
    /// Computing features and evaluating the trees.
    pub ranking: f64,
    /// Boosts, caps and promoted slots.
    pub ordering: f64,
}

/// What the caller may want to know about how a response was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The sum of `stage_ms`.
    pub latency_ms: f64,
    /// Per-stage time.
    pub stage_ms: StageMs,
    /// Distinct candidates that retrieval produced.
    pub candidates_retrieved: u32,
    /// Candidates left after filtering (including any popular top-up).
    pub candidates_after_filtering: u32,
    /// The bundle's model version.
    pub model_version: String,
    /// The experiment the viewer is in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// Their arm of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Whether the viewer was cold and got the popularity fallback.
    pub cold_start: bool,
}

/// The seed's response shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's user id.
    pub user_id: Option<u64>,
    /// Best first.
    pub recommendations: Vec<Item>,
    /// How it was made.
    pub metadata: Metadata,
}

impl Response {
    /// The MessagePack encoding (a map with the field names).
    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a response always serializes")
    }
}

/// A stage of the pipeline, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Encoding the viewer and running the user tower.
    Tower,
    /// Searching the shard.
    Retrieval,
    /// Filtering.
    Filtering,
    /// Features and trees.
    Ranking,
    /// Boosts, caps, promoted slots.
    Ordering,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 5] = [
        Stage::Tower,
        Stage::Retrieval,
        Stage::Filtering,
        Stage::Ranking,
        Stage::Ordering,
    ];

    /// Its name in metadata and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Tower => "tower",
            Stage::Retrieval => "retrieval",
            Stage::Filtering => "filtering",
            Stage::Ranking => "ranking",
            Stage::Ordering => "ordering",
        }
    }
}

impl StageMs {
    /// From per-stage times in [`Stage::ALL`]'s order.
    pub fn from_array(ms: [f64; 5]) -> Self {
        let [tower, retrieval, filtering, ranking, ordering] = ms;
        Self {
            tower,
            retrieval,
            filtering,
            ranking,
            ordering,
        }
    }

    fn total(&self) -> f64 {
        self.tower + self.retrieval + self.filtering + self.ranking + self.ordering
    }
}

/// A loaded bundle as hosts see it: what `/health` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleSummary {
    /// The model version responses carry.
    pub model_version: String,
    /// Videos in the catalogue.
    pub videos: u64,
    /// Videos in the retrieval shard.
    pub indexed_videos: u64,
    /// Trees in the ranker.
    pub trees: u64,
    /// The experiments it runs, by name.
    pub experiments: Vec<String>,
}

/// A loaded bundle, ready to serve: every section decoded and checked once, the tower
/// optimised, the lookups serving needs built.
pub struct Recommender {
    model_version: String,
    tower: UserTower,
    shard: Shard,
    ranker: RankerModel,
    preprocessor: Preprocessor,
    catalog: Catalog,
    rules: BusinessRules,
    experiments: Experiments,
    /// Each catalogue row's shard position (`NOT_IN_SHARD` for a video the shard lacks):
    /// the merge that groups categories finds it, so serving need not search for it.
    shard_position_of_row: Vec<u32>,
    /// Each shard position's catalogue row (`NOT_IN_CATALOG` for a video the catalogue
    /// lacks): the graph search's hits are positions, and a binary search of the
    /// catalogue's ids for each was 5% of a request natively.
    row_of_position: Vec<u32>,
    /// Shard positions of each category's videos, with their catalogue rows.
    category_positions: BTreeMap<String, Vec<(u32, u32)>>,
    /// Each catalogue row's position in the catalogue's popularity order.
    popularity_rank: Vec<u32>,
    /// Catalogue rows of promoted videos.
    promoted_rows: Vec<u32>,
}

impl std::fmt::Debug for Recommender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recommender")
            .field("model_version", &self.model_version)
            .field("videos", &self.catalog.len())
            .field("shard", &self.shard.len())
            .field("trees", &self.ranker.trees.len())
            .finish()
    }
}

fn mismatch(reason: String) -> Error {
    Error::InvalidBundle {
        section: None,
        reason,
    }
}

impl Recommender {
    /// Loads a bundle: checks its format and every section's hash, decodes every section
    /// and checks that they fit together.
    pub fn from_bundle(bytes: &[u8]) -> Result<Self, Error> {
        let view = BundleView::parse(bytes)?;
        let shard = Bytes::copy_from_slice(view.require(SectionKind::Shard)?);
        let tables = view
            .section(SectionKind::TowerTables)
            .map(Bytes::copy_from_slice);
        Self::from_view(view, shard, tables)
    }

    /// [`Recommender::from_bundle`] for a bundle the caller hands over: the shard is
    /// searched, and the tower's tables read, where they lie in `bundle` instead of being
    /// copied out (the buffer stays alive as long as the recommender).
    pub fn from_shared_bundle(bundle: Bytes) -> Result<Self, Error> {
        let view = BundleView::parse(&bundle)?;
        let shard = bundle.slice_ref(view.require(SectionKind::Shard)?);
        let tables = view
            .section(SectionKind::TowerTables)
            .map(|section| bundle.slice_ref(section));
        Self::from_view(view, shard, tables)
    }

    /// `shard` and `tables` hold the bytes of `view`'s shard and tower-tables sections.
    fn from_view(view: BundleView<'_>, shard: Bytes, tables: Option<Bytes>) -> Result<Self, Error> {
        let spec = UserTowerSpec::from_bytes(view.require(SectionKind::TowerSpec)?)?;
        let tables = tables.map(TowerTables::from_section).transpose()?;
        let tower = UserTower::load_with_tables(
            view.require(SectionKind::UserTower)?,
            tables,
            spec.clone(),
        )?;
        // The bundle's section hash already covered these bytes.
        let shard = Shard::open_verified(shard)?;
        if shard.dim() != spec.output_dim {
            return Err(mismatch(format!(
                "the shard holds {}-d vectors, the user tower outputs {}-d ones",
                shard.dim(),
                spec.output_dim
            )));
        }
        let ranker = RankerModel::from_bundle_section(view.require(SectionKind::Ranker)?)?;
        if ranker.row_width() > COLUMNS.len() {
            return Err(mismatch(format!(
                "the ranker reads {} columns, the edge's feature row has {}",
                ranker.row_width(),
                COLUMNS.len()
            )));
        }
        let preprocessor = Preprocessor::from_bytes(view.require(SectionKind::Preprocessor)?)?;
        let catalog = Catalog::from_bytes(view.require(SectionKind::Videos)?)?;
        let rules = BusinessRules::from_bytes(view.require(SectionKind::Rules)?)?;
        let experiments = Experiments::from_bytes(view.require(SectionKind::Experiments)?)?;
        Ok(Self::assemble(
            view.header.model_version,
            tower,
            shard,
            ranker,
            preprocessor,
            catalog,
            rules,
            experiments,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model_version: String,
        tower: UserTower,
        shard: Shard,
        ranker: RankerModel,
        preprocessor: Preprocessor,
        catalog: Catalog,
        rules: BusinessRules,
        experiments: Experiments,
    ) -> Self {
        // Every cold start runs this over the whole catalogue: linear passes, no sort, no
        // per-video lookups or allocations.
        // Catalogue row of each shard position: both sides are sorted by id, so one merge.
        let mut row_of_position = vec![NOT_IN_CATALOG; shard.len()];
        let mut shard_position_of_row = vec![NOT_IN_SHARD; catalog.len()];
        let catalog_ids = catalog.video_ids();
        let mut row = 0;
        for &(id, position) in shard.positions_by_id() {
            while row < catalog_ids.len() && catalog_ids[row] < id {
                row += 1;
            }
            if catalog_ids.get(row) == Some(&id) {
                row_of_position[position as usize] = row as u32;
                shard_position_of_row[row] = position;
            }
        }
        let category_positions = catalog.group_by_category(
            row_of_position
                .iter()
                .enumerate()
                .filter(|&(_, &row)| row != NOT_IN_CATALOG)
                .map(|(position, &row)| (position as u32, row)),
        );

        let mut popularity_rank = vec![0; catalog.len()];
        for (rank, &row) in catalog.popularity_order().iter().enumerate() {
            popularity_rank[row as usize] = rank as u32;
        }
        let promoted_rows = catalog
            .iter()
            .filter(|v| v.promoted())
            .map(|v| v.row() as u32)
            .collect();
        Self {
            model_version,
            tower,
            shard,
            ranker,
            preprocessor,
            catalog,
            rules,
            experiments,
            shard_position_of_row,
            row_of_position,
            category_positions,
            popularity_rank,
            promoted_rows,
        }
    }

    /// The model version responses carry.
    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// What a host reports about the loaded bundle (the raw ABI's `load_bundle` output).
    pub fn summary(&self) -> BundleSummary {
        BundleSummary {
            model_version: self.model_version.clone(),
            videos: self.catalog.len() as u64,
            indexed_videos: self.shard.len() as u64,
            trees: self.ranker.trees.len() as u64,
            experiments: self
                .experiments
                .experiments
                .iter()
                .map(|e| e.name.clone())
                .collect(),
        }
    }

    /// The videos this bundle can recommend.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The bundle's rules (an experiment arm may serve with others).
    pub fn rules(&self) -> &BusinessRules {
        &self.rules
    }

    /// Runs every stage, timing each with `clock` (milliseconds, any origin).
    pub fn recommend(
        &self,
        request: Request,
        clock: &mut dyn FnMut() -> f64,
    ) -> Result<Response, Error> {
        let mut run = self.start(request)?;
        let mut ms = [0.0; 5];
        while let Some(stage) = run.next_stage() {
            let started = clock();
            run.run_stage(self)?;
            ms[stage as usize] = clock() - started;
        }
        Ok(run.finish(self, StageMs::from_array(ms)))
    }

    /// Checks `request` and assigns the viewer's experiment arm; the stages then run one
    /// by one with [`Run::run_stage`].
    pub fn start(&self, request: Request) -> Result<Run, Error> {
        Run::new(self, request)
    }

    fn rules_of(&self, arm: Option<(usize, usize)>) -> &BusinessRules {
        arm.and_then(|(experiment, variant)| {
            self.experiments.experiments[experiment].variants[variant]
                .rules
                .as_ref()
        })
        .unwrap_or(&self.rules)
    }

    /// The `quota` best videos of `category` for `user` that are not in `seen` (catalogue
    /// rows), as `(catalogue row, score)`, best first. An exact scan of the category:
    /// a graph search pulled toward the category found few of its videos when the
    /// embedding space does not separate categories well, and a category holds a small
    /// share of the shard.
    fn best_in_category(
        &self,
        user: &[f32],
        category: &str,
        quota: usize,
        seen: &BTreeSet<u32>,
    ) -> Vec<(u32, f32)> {
        let Some(positions) = self.category_positions.get(category) else {
            return Vec::new();
        };
        let Some(approximate) = self.shard.approximate_scorer(user) else {
            return Vec::new();
        };
        // Narrowed on the int8 scale, then the kept few scored exactly: the margin covers
        // the places the rounding can swap near the cut.
        let keep = quota.saturating_mul(2).saturating_add(16);
        // Positions ascend within a category, so a category whose first and last are as
        // far apart as it is long is one run (every category, in a grouped shard).
        let run = match (positions.first(), positions.last()) {
            (Some(&(first, _)), Some(&(last, _)))
                if last
                    .checked_sub(first)
                    .is_some_and(|span| span as usize + 1 == positions.len()) =>
            {
                approximate.scores_in(first as usize..last as usize + 1)
            }
            _ => None,
        };
        let narrowed = match run {
            Some(scores) => keep_best_unseen(scores.map(Some), positions, keep, seen),
            None => keep_best_unseen(
                positions
                    .iter()
                    .map(|&(position, _)| approximate.score(position as usize)),
                positions,
                keep,
                seen,
            ),
        };
        let mut scored: Vec<(u32, f32)> = narrowed
            .into_iter()
            .map(|(_, ordinal)| positions[ordinal as usize])
            .filter_map(|(position, row)| {
                Some((row, self.shard.score_at(user, position as usize)?))
            })
            .collect();
        // Rows are in id order, so ties break by id as in a graph search.
        let by_score =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0));
        if scored.len() > quota {
            scored.select_nth_unstable_by(quota, by_score);
            scored.truncate(quota);
        }
        scored.sort_by(by_score);
        scored
    }

    /// The shard position of the video at catalogue row `row`, if the shard holds it.
    fn shard_position(&self, row: u32) -> Option<usize> {
        self.shard_position_of_row
            .get(row as usize)
            .filter(|&&position| position != NOT_IN_SHARD)
            .map(|&position| position as usize)
    }

    fn two_tower_score(&self, user: &[f32], row: u32) -> f32 {
        self.shard_position(row)
            .and_then(|position| self.shard.score_at(user, position))
            .unwrap_or(f32::NAN)
    }
}

/// The `keep` best of `scores` (one per entry of `positions`, `None` for none) whose rows
/// are not in `seen`, as `(score, index into positions)`, in no order.
///
/// A score below the `keep`-th best so far cannot be kept: the buffer is cut back to its
/// best `keep` whenever it doubles, which raises that bar, so after the first few hundred
/// of a category's thousands of videos hardly any is stored or looked up in `seen`.
/// (Storing every score and selecting once wrote and compared all of them; a binary heap
/// paid a sift for each early one.)
fn keep_best_unseen(
    scores: impl Iterator<Item = Option<f32>>,
    positions: &[(u32, u32)],
    keep: usize,
    seen: &BTreeSet<u32>,
) -> Vec<(f32, u32)> {
    let by_score = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
    let keep = keep.max(1);
    let cut_at = keep.saturating_mul(2);
    let mut kept: Vec<(f32, u32)> = Vec::with_capacity(cut_at.min(positions.len()));
    let mut bar = f32::NEG_INFINITY;
    for ((score, &(_, row)), ordinal) in scores.zip(positions).zip(0..) {
        let Some(score) = score else {
            continue;
        };
        if score < bar || seen.contains(&row) {
            continue;
        }
        kept.push((score, ordinal));
        if kept.len() == cut_at {
            kept.select_nth_unstable_by(keep - 1, by_score);
            kept.truncate(keep);
            bar = kept[keep - 1].0;
        }
    }
    if kept.len() > keep {
        kept.select_nth_unstable_by(keep, by_score);
        kept.truncate(keep);
    }
    kept
}

/// Scales `v` to unit length; false (and `v` unchanged) when it has none.
fn normalize(v: &mut [f32]) -> bool {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter_mut().for_each(|x| *x /= norm);
        true
    } else {
        false
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Personalized,
    Category(String),
    Promoted,
    Popular,
}

impl Source {
    /// The ranker's `retrieval_source` value.
    fn feature(&self) -> &'static str {
        match self {
            Source::Personalized => "personalized",
            Source::Category(_) => "category",
            Source::Promoted => "promoted",
            Source::Popular => "popular",
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Category(name) => format!("category:{name}"),
            other => other.feature().to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
struct Candidate {
    row: u32,
    two_tower: f32,
    retrieval_rank: Option<u32>,
    source: Source,
    score: f64,
}

/// One request on its way through the stages. It holds no borrow of the [`Recommender`]
/// (a host keeps both between calls); give each call the one that started it.
#[derive(Debug, Clone)]
pub struct Run {
    request: Request,
    /// Experiment and arm indices.
    arm: Option<(usize, usize)>,
    next: usize,
    age: Option<u8>,
    /// Sorted, deduplicated.
    watched: Vec<u64>,
    /// Sorted, deduplicated.
    excluded: Vec<u64>,
    /// History videos found in the catalogue, oldest first.
    history_rows: Vec<u32>,
    cold: bool,
    user_vector: Option<Vec<f32>>,
    candidates: Vec<Candidate>,
    retrieved: usize,
    after_filtering: usize,
    ordered: Vec<(u32, f64, String)>,
}

fn invalid_request(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidRequest {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_text(field: &str, value: Option<&str>) -> Result<(), Error> {
    match value {
        Some(text) if text.len() > MAX_TEXT => Err(invalid_request(
            field,
            format!(
                "is {} bytes long, at most {MAX_TEXT} are accepted",
                text.len()
            ),
        )),
        _ => Ok(()),
    }
}

fn check_request(request: &Request) -> Result<Option<u8>, Error> {
    if !(1..=MAX_RESULTS).contains(&request.n) {
        return Err(invalid_request(
            "n",
            format!("is {}, it must be between 1 and {MAX_RESULTS}", request.n),
        ));
    }
    let age = match request.user_features.age {
        None => None,
        Some(age) if age.is_finite() && (0.0..=MAX_AGE).contains(&age) => Some(age as u8),
        Some(age) => {
            return Err(invalid_request(
                "user_features.age",
                format!("is {age}, it must be a number of years from 0 to {MAX_AGE}"),
            ));
        }
    };
    for (field, ids) in [
        ("watch_history", &request.watch_history),
        ("excluded_video_ids", &request.excluded_video_ids),
    ] {
        if ids.len() > MAX_LIST_IDS {
            return Err(invalid_request(
                field,
                format!(
                    "holds {} ids, at most {MAX_LIST_IDS} are accepted (send the most recent)",
                    ids.len()
                ),
            ));
        }
    }
    let features = &request.user_features;
    check_text("user_features.country", features.country.as_deref())?;
    check_text("user_features.language", features.language.as_deref())?;
    check_text("user_features.device", features.device.as_deref())?;
    let preferences = &request.user_preferences;
    for (field, values) in [
        ("user_preferences.categories", &preferences.categories),
        ("user_preferences.languages", &preferences.languages),
    ] {
        if values.len() > MAX_PREFERENCES {
            return Err(invalid_request(
                field,
                format!(
                    "holds {} values, at most {MAX_PREFERENCES} are accepted",
                    values.len()
                ),
            ));
        }
        for value in values {
            check_text(field, Some(value))?;
        }
    }
    Ok(age)
}

fn sorted_unique(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl Run {
    fn new(rec: &Recommender, request: Request) -> Result<Self, Error> {
        let age = check_request(&request)?;
        let arm = request.user_id.and_then(|user| {
            let experiment = rec.experiments.experiments.first()?;
            let variant = experiment.assign(&user.to_string());
            let index = experiment
                .variants
                .iter()
                .position(|v| v.name == variant.name)?;
            Some((0, index))
        });
        let history_rows: Vec<u32> = request
            .watch_history
            .iter()
            .filter_map(|&id| rec.catalog.get(id).map(|v| v.row() as u32))
            .collect();
        let known_user = request
            .user_id
            .is_some_and(|id| rec.preprocessor.user_ids.known_index(&id).is_some());
        Ok(Self {
            arm,
            next: 0,
            age,
            watched: sorted_unique(&request.watch_history),
            excluded: sorted_unique(&request.excluded_video_ids),
            cold: history_rows.is_empty() && !known_user,
            history_rows,
            user_vector: None,
            candidates: Vec::new(),
            retrieved: 0,
            after_filtering: 0,
            ordered: Vec::new(),
            request,
        })
    }

    /// The stage that [`Run::run_stage`] runs next, `None` once all have run.
    pub fn next_stage(&self) -> Option<Stage> {
        Stage::ALL.get(self.next).copied()
    }

    /// Runs the next stage (nothing once all have run). Fails only if the bundle's models
    /// misbehave (e.g. a tower that returns the wrong shape).
    pub fn run_stage(&mut self, rec: &Recommender) -> Result<(), Error> {
        let Some(stage) = self.next_stage() else {
            return Ok(());
        };
        match stage {
            Stage::Tower => self.tower(rec)?,
            Stage::Retrieval => self.retrieve(rec)?,
            Stage::Filtering => self.filter(rec),
            Stage::Ranking => self.rank(rec)?,
            Stage::Ordering => self.order(rec),
        }
        self.next += 1;
        Ok(())
    }

    /// The response, with the caller's per-stage times. Stages that have not run yet run
    /// first (untimed).
    pub fn finish(mut self, rec: &Recommender, stage_ms: StageMs) -> Response {
        while self.next_stage().is_some() {
            if self.run_stage(rec).is_err() {
                break;
            }
        }
        let (experiment, variant) = match self.arm {
            Some((e, v)) => {
                let experiment = &rec.experiments.experiments[e];
                (
                    Some(experiment.name.clone()),
                    Some(experiment.variants[v].name.clone()),
                )
            }
            None => (None, None),
        };
        let recommendations = self
            .ordered
            .iter()
            .filter_map(|(row, score, source)| {
                let video = rec.catalog.at(*row as usize)?;
                Some(Item {
                    video_id: video.video_id(),
                    score: *score,
                    category: video.category().to_owned(),
                    source: source.clone(),
                    title: video.title().to_owned(),
                    channel_id: video.channel_id(),
                })
            })
            .collect();
        Response {
            user_id: self.request.user_id,
            recommendations,
            metadata: Metadata {
                latency_ms: stage_ms.total(),
                stage_ms,
                candidates_retrieved: self.retrieved as u32,
                candidates_after_filtering: self.after_filtering as u32,
                model_version: rec.model_version.clone(),
                experiment,
                variant,
                cold_start: self.cold,
            },
        }
    }

    fn viewer(&self) -> Viewer {
        let features = &self.request.user_features;
        Viewer {
            user_id: self.request.user_id,
            country: features.country.clone(),
            language: features.language.clone(),
            age: self.age,
        }
    }

    fn tower(&mut self, rec: &Recommender) -> Result<(), Error> {
        if self.cold {
            return Ok(());
        }
        let input = encode_user(
            &rec.preprocessor,
            rec.tower.spec(),
            &self.viewer(),
            &self.request.watch_history,
            |id| rec.catalog.get(id).map(|v| v.category()),
        );
        let mut vector = rec.tower.embed(&[input])?;
        if vector.iter().any(|v| !v.is_finite()) {
            return Err(Error::Decode {
                artifact: "user tower",
                message: "run: the embedding holds a non-finite value".into(),
            });
        }
        // A tower trained elsewhere may not normalise: scores must keep one scale.
        normalize(&mut vector);
        self.user_vector = Some(vector);
        Ok(())
    }

    /// The viewer's top categories: stated preferences first, then by how often they
    /// appear in the history (ties by name); only categories the shard holds.
    fn top_categories(&self, rec: &Recommender, limit: usize) -> Vec<String> {
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for &row in &self.history_rows {
            if let Some(video) = rec.catalog.at(row as usize) {
                *counts.entry(video.category()).or_default() += 1;
            }
        }
        let mut by_count: Vec<(&str, u32)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut top: Vec<String> = Vec::new();
        let preferred = self.request.user_preferences.categories.iter();
        for category in preferred
            .map(String::as_str)
            .chain(by_count.iter().map(|c| c.0))
        {
            if top.len() == limit {
                break;
            }
            if rec.category_positions.contains_key(category) && !top.iter().any(|t| t == category) {
                top.push(category.to_owned());
            }
        }
        top
    }

    fn retrieve(&mut self, rec: &Recommender) -> Result<(), Error> {
        let rules = rec.rules_of(self.arm);
        let mut candidates = Vec::new();
        let mut seen = BTreeSet::new();
        let push =
            |candidates: &mut Vec<Candidate>, seen: &mut BTreeSet<u32>, candidate: Candidate| {
                if seen.insert(candidate.row) {
                    candidates.push(candidate);
                }
            };
        if let Some(user) = &self.user_vector {
            // The search's visited marks span the whole shard (400 kB at 100k videos):
            // reused per thread rather than allocated and zeroed per request.
            let mut scratch = SEARCH_SCRATCH.take();
            let hits = rec
                .shard
                .nns(rules.personalized_candidates)
                .search_positions_with(user, &mut scratch);
            SEARCH_SCRATCH.set(scratch);
            let hits = hits?;
            for (rank, (position, score)) in hits.into_iter().enumerate() {
                if let Some(&row) = rec
                    .row_of_position
                    .get(position as usize)
                    .filter(|&&row| row != NOT_IN_CATALOG)
                {
                    push(
                        &mut candidates,
                        &mut seen,
                        Candidate {
                            row,
                            two_tower: score,
                            retrieval_rank: Some(rank as u32),
                            source: Source::Personalized,
                            score: 0.0,
                        },
                    );
                }
            }
            let quota = rules.candidates_per_category;
            for category in self.top_categories(rec, rules.category_queries) {
                for (row, score) in rec.best_in_category(user, &category, quota, &seen) {
                    push(
                        &mut candidates,
                        &mut seen,
                        Candidate {
                            row,
                            two_tower: score,
                            retrieval_rank: None,
                            source: Source::Category(category.clone()),
                            score: 0.0,
                        },
                    );
                }
            }
        } else {
            for row in self.popular(rec, rules.popular_fallback, |_| true) {
                push(
                    &mut candidates,
                    &mut seen,
                    self.fallback_candidate(rec, row),
                );
            }
        }
        for &row in &rec.promoted_rows {
            let mut candidate = self.fallback_candidate(rec, row);
            candidate.source = Source::Promoted;
            push(&mut candidates, &mut seen, candidate);
        }
        self.retrieved = candidates.len();
        self.candidates = candidates;
        Ok(())
    }

    fn fallback_candidate(&self, rec: &Recommender, row: u32) -> Candidate {
        let two_tower = self
            .user_vector
            .as_ref()
            .map_or(f32::NAN, |user| rec.two_tower_score(user, row));
        Candidate {
            row,
            two_tower,
            retrieval_rank: None,
            source: Source::Popular,
            score: 0.0,
        }
    }

    /// Whether the video at `row` is in the viewer's languages: the preferred ones, else
    /// their own (any, when they gave neither).
    fn in_language(&self, rec: &Recommender, row: u32) -> bool {
        let preferences = &self.request.user_preferences.languages;
        let own = self.request.user_features.language.as_deref();
        rec.catalog.at(row as usize).is_some_and(|v| {
            if preferences.is_empty() {
                own.is_none_or(|l| v.language() == l)
            } else {
                preferences.iter().any(|l| v.language() == l)
            }
        })
    }

    /// Up to `limit` catalogue rows by views that pass the filters and `keep`: videos in
    /// the viewer's languages first.
    fn popular(&self, rec: &Recommender, limit: usize, keep: impl Fn(u32) -> bool) -> Vec<u32> {
        let mut rows: Vec<u32> = Vec::new();
        for wanted in [true, false] {
            for &row in rec.catalog.popularity_order() {
                if rows.len() == limit {
                    return rows;
                }
                if self.in_language(rec, row) == wanted && self.allowed(rec, row) && keep(row) {
                    rows.push(row);
                }
            }
        }
        rows
    }

    /// A cold viewer's score: 1 for a video in their languages, plus the share of the
    /// catalogue it out-views (so: their languages first, then by views).
    fn popularity_score(&self, rec: &Recommender, row: u32) -> f64 {
        let videos = rec.catalog.len().max(1) as f64;
        let outviewed = 1.0 - f64::from(rec.popularity_rank[row as usize] + 1) / videos;
        f64::from(u8::from(self.in_language(rec, row))) + outviewed
    }

    /// Whether the filters let the video at `row` through.
    fn allowed(&self, rec: &Recommender, row: u32) -> bool {
        let Some(video) = rec.catalog.at(row as usize) else {
            return false;
        };
        let rules = rec.rules_of(self.arm);
        let id = video.video_id();
        let exclude_watched = self
            .request
            .exclude_watched
            .unwrap_or(rules.exclude_watched);
        let age = self.age.unwrap_or(rules.age_when_unknown);
        let languages = &self.request.user_preferences.languages;
        self.excluded.binary_search(&id).is_err()
            && !(exclude_watched && self.watched.binary_search(&id).is_ok())
            && video.content_rating().minimum_age() <= age
            && self
                .request
                .user_features
                .country
                .as_deref()
                .is_none_or(|country| video.available_in(country))
            && (languages.is_empty() || languages.iter().any(|l| l == video.language()))
    }

    fn filter(&mut self, rec: &Recommender) {
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.retain(|c| self.allowed(rec, c.row));
        let wanted = self.request.n as usize;
        if candidates.len() < wanted {
            let present: BTreeSet<u32> = candidates.iter().map(|c| c.row).collect();
            let top_up = self.popular(rec, wanted - candidates.len(), |row| {
                !present.contains(&row)
            });
            candidates.extend(
                top_up
                    .into_iter()
                    .map(|row| self.fallback_candidate(rec, row)),
            );
        }
        self.after_filtering = candidates.len();
        self.candidates = candidates;
    }

    fn rank(&mut self, rec: &Recommender) -> Result<(), Error> {
        if self.candidates.is_empty() {
            return Ok(());
        }
        if self.user_vector.is_none() {
            let mut candidates = std::mem::take(&mut self.candidates);
            for candidate in &mut candidates {
                candidate.score = self.popularity_score(rec, candidate.row);
            }
            self.candidates = candidates;
            return Ok(());
        }
        let history = ViewerHistory::new(
            self.history_rows
                .iter()
                .filter_map(|&row| rec.catalog.at(row as usize))
                .map(|v| (v.category(), v.channel_id())),
        );
        let width = rec.ranker.row_width();
        let recent = if width > FIRST_RECENT_COLUMN {
            recent_vectors(
                self.history_rows
                    .iter()
                    .filter_map(|&row| rec.shard_position(row))
                    .filter_map(|position| rec.shard.vector(position)),
            )
        } else {
            Vec::new()
        };
        let features = &self.request.user_features;
        let viewer = ViewerColumns::new(
            &rec.preprocessor,
            ViewerContext {
                country: features.country.as_deref(),
                language: features.language.as_deref(),
                age: self.age,
                device: features.device.as_deref(),
                time: self.request.timestamp,
                history: &history,
            },
        );
        let best = self
            .candidates
            .iter()
            .map(|c| c.two_tower)
            .filter(|s| s.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut rows: Vec<FeatureValue> = Vec::with_capacity(self.candidates.len() * width);
        let mut row = Vec::with_capacity(COLUMNS.len());
        let mut similarities = Vec::with_capacity(recent.len());
        for candidate in &self.candidates {
            let video: VideoRef<'_> = rec
                .catalog
                .at(candidate.row as usize)
                .expect("candidates are catalogue rows");
            row.clear();
            similarities.clear();
            if !recent.is_empty()
                && let Some(position) = rec.shard_position(candidate.row)
            {
                similarities.extend(
                    recent
                        .iter()
                        .filter_map(|vector| rec.shard.score_at(vector, position)),
                );
            }
            ranker_features(
                &viewer,
                &CandidateContext {
                    video,
                    two_tower_score: candidate.two_tower,
                    best_two_tower_score: best,
                    retrieval_rank: candidate.retrieval_rank,
                    source: candidate.source.feature(),
                    recent_similarities: &similarities,
                },
                &mut row,
            );
            rows.extend_from_slice(&row[..width]);
        }
        let mut scores = Vec::with_capacity(self.candidates.len());
        let mut scratch = RANKER_SCRATCH.take();
        let predicted = rec.ranker.predict_with(&rows, &mut scratch, &mut scores);
        RANKER_SCRATCH.set(scratch);
        predicted?;
        for (candidate, score) in self.candidates.iter_mut().zip(scores) {
            candidate.score = score;
        }
        Ok(())
    }

    fn order(&mut self, rec: &Recommender) {
        let rules = rec.rules_of(self.arm);
        let now = self.request.timestamp;
        let mut candidates = std::mem::take(&mut self.candidates);
        for candidate in &mut candidates {
            let upload = rec
                .catalog
                .at(candidate.row as usize)
                .and_then(|v| v.upload_time());
            if let Some(upload) = upload {
                let age_days = (now.saturating_sub(upload)).max(0) as f64 / 86_400.0;
                let halvings = age_days / f64::from(rules.freshness_half_life_days);
                candidate.score += f64::from(rules.freshness_boost) * 0.5f64.powf(halvings);
            }
        }
        let id_of = |c: &Candidate| {
            rec.catalog
                .at(c.row as usize)
                .map_or(u64::MAX, |v| v.video_id())
        };
        candidates.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| id_of(a).cmp(&id_of(b)))
        });
        let n = self.request.n as usize;

        // The best promoted videos take their slots; the rest compete like any other.
        let mut slots: Vec<usize> = rules
            .promoted_positions
            .iter()
            .copied()
            .filter(|&p| p < n)
            .collect();
        slots.sort_unstable();
        let mut promoted: Vec<Candidate> = Vec::new();
        let mut organic: Vec<Candidate> = Vec::new();
        for candidate in candidates {
            let is_promoted = rec
                .catalog
                .at(candidate.row as usize)
                .is_some_and(|v| v.promoted());
            if is_promoted && promoted.len() < slots.len() {
                promoted.push(candidate);
            } else if candidate.source != Source::Promoted {
                // Retrieved only to compete for a promoted slot: a promotion buys slots,
                // not organic exposure.
                organic.push(candidate);
            }
        }

        // Caps first (promoted videos count toward them); what they held back fills in
        // only if nothing else is left.
        let mut per_category: BTreeMap<&str, usize> = BTreeMap::new();
        let mut per_channel: BTreeMap<u64, usize> = BTreeMap::new();
        for video in promoted
            .iter()
            .filter_map(|c| rec.catalog.at(c.row as usize))
        {
            *per_category.entry(video.category()).or_default() += 1;
            *per_channel.entry(video.channel_id()).or_default() += 1;
        }
        let mut chosen: Vec<Candidate> = Vec::new();
        let mut held_back: Vec<Candidate> = Vec::new();
        let organic_slots = n - promoted.len();
        for candidate in organic {
            if chosen.len() == organic_slots {
                break;
            }
            let Some(video) = rec.catalog.at(candidate.row as usize) else {
                continue;
            };
            let category = per_category.entry(video.category()).or_default();
            let channel = per_channel.entry(video.channel_id()).or_default();
            let within = (rules.max_per_category == 0 || *category < rules.max_per_category)
                && (rules.max_per_channel == 0 || *channel < rules.max_per_channel);
            if within {
                *category += 1;
                *channel += 1;
                chosen.push(candidate);
            } else {
                held_back.push(candidate);
            }
        }
        let missing = organic_slots.saturating_sub(chosen.len());
        chosen.extend(held_back.into_iter().take(missing));

        let mut organic = chosen.into_iter();
        let mut promoted = promoted.into_iter();
        let mut ordered = Vec::with_capacity(n);
        for position in 0..n {
            let next = if slots.binary_search(&position).is_ok() {
                promoted
                    .next()
                    .map(|c| (c, "promoted".to_owned()))
                    .or_else(|| {
                        organic.next().map(|c| {
                            let source = c.source.describe();
                            (c, source)
                        })
                    })
            } else {
                organic
                    .next()
                    .map(|c| {
                        let source = c.source.describe();
                        (c, source)
                    })
                    .or_else(|| promoted.next().map(|c| (c, "promoted".to_owned())))
            };
            let Some((candidate, source)) = next else {
                break;
            };
            ordered.push((candidate.row, candidate.score, source));
        }
        self.ordered = ordered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeping_the_best_unseen_matches_sorting_them_all() {
        // A fixed xorshift stream: scores with many ties (a few dozen distinct values).
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (len, keep) in [(0, 5), (3, 5), (10, 10), (500, 1), (500, 16), (5_000, 106)] {
            let positions: Vec<(u32, u32)> = (0..len).map(|i| (i, 2 * i)).collect();
            let scores: Vec<Option<f32>> = (0..len)
                .map(|_| (next() % 17 != 0).then(|| (next() % 40) as f32 / 8.0))
                .collect();
            let seen: BTreeSet<u32> = (0..len)
                .filter(|_| next() % 5 == 0)
                .map(|i| 2 * i)
                .collect();
            let kept = keep_best_unseen(scores.iter().copied(), &positions, keep, &seen);
            let mut all: Vec<f32> = scores
                .iter()
                .zip(&positions)
                .filter(|(_, (_, row))| !seen.contains(row))
                .filter_map(|(score, _)| *score)
                .collect();
            all.sort_by(|a, b| b.total_cmp(a));
            all.truncate(keep);
            let mut kept_scores: Vec<f32> = kept.iter().map(|&(score, _)| score).collect();
            kept_scores.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(kept_scores, all, "{len} scores, keep {keep}");
            for &(score, ordinal) in &kept {
                let ordinal = ordinal as usize;
                assert_eq!(scores[ordinal], Some(score));
                assert!(!seen.contains(&positions[ordinal].1));
            }
        }
    }
}
