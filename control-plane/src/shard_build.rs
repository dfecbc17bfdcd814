//! Building the compact HNSW shard that the edge module searches (`edge::shard`).
//!
//! hnsw_rs builds the graph (it does not build for wasm, so the edge only gets the
//! export): [`build_shard`] inserts the L2-normalised video embeddings in parallel, exports
//! every layer's neighbour lists and the entry point, and writes them with
//! `edge::shard::ShardWriter`. [`bench_shard`] measures the result against exact search on
//! clustered synthetic embeddings.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::latency::Latency;

use edge::Video;
use edge::shard::{LayerLists, MAX_POINTS, SearchScratch, Shard, ShardGraph, ShardWriter};
use hnsw_rs::prelude::{Distance, Hnsw};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// How to build a shard's graph and how wide its searches look by default.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardConfig {
    /// Neighbours per point on the upper layers; layer 0 keeps up to `2 * m`.
    pub m: usize,
    /// The beam width while inserting: larger builds a better graph, slower.
    pub ef_construction: usize,
    /// The beam width recorded in the shard for searches that do not set one. `None`
    /// (the default) calibrates it: the smallest width on [`EF_LADDER`] whose recall@100
    /// against exact f32 search reaches `target_recall` on the calibration queries. The
    /// width a given recall needs grows with the catalogue (on clustered embeddings of dim
    /// 64, recall@100 0.96 needs about 100 at 100,000 videos and several hundred at
    /// 1,000,000), so no fixed default serves every shard.
    pub ef_search: Option<usize>,
    /// The recall@100 the calibrated width must reach. Above the 0.95 floor so that the
    /// floor holds on queries the calibration did not see.
    pub target_recall: f64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            ef_search: None,
            target_recall: 0.96,
        }
    }
}

/// The beam widths calibration tries, in order; it keeps the first that reaches the
/// target, or the last if none does.
pub const EF_LADDER: [usize; 12] = [100, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536];
/// Queries calibration measures (their exact top 100 is a brute-force pass each).
pub const CALIBRATION_QUERIES: usize = 200;
/// The k of calibration's recall@k.
const CALIBRATION_K: usize = 100;

/// How the shard's default beam width was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// The beam width recorded in the shard.
    pub ef: usize,
    /// Mean recall@100 at that width on the calibration queries (`None` when the width
    /// was configured rather than measured).
    pub recall: Option<f64>,
    /// The recall it aimed for.
    pub target: f64,
    /// The number of queries measured.
    pub queries: usize,
    /// Whether the queries were the caller's or a sample of the catalogue's own vectors.
    pub from_catalogue: bool,
    /// Time spent measuring.
    pub time: Duration,
}

impl Calibration {
    /// Whether the recorded width reached the target (configured widths count as met).
    pub fn met(&self) -> bool {
        self.recall.is_none_or(|recall| recall >= self.target)
    }
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.recall {
            None => write!(f, "default ef {} (configured)", self.ef),
            Some(recall) => write!(
                f,
                "default ef {}: recall@{CALIBRATION_K} {recall:.4} on {} {} queries (target {}{}), {:.1} s",
                self.ef,
                self.queries,
                if self.from_catalogue {
                    "catalogue"
                } else {
                    "calibration"
                },
                self.target,
                if self.met() { "" } else { ", NOT reached" },
                self.time.as_secs_f64()
            ),
        }
    }
}

/// hnsw_rs's graphs have at most 16 layers.
const HNSW_MAX_LAYERS: usize = 16;
/// How far an embedding's L2 norm may be from 1.
const NORM_TOLERANCE: f32 = 1e-3;

/// Why a shard could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardBuildError {
    /// There are no embeddings.
    #[error("cannot build a shard from zero videos")]
    NoPoints,
    /// More embeddings than the shard format holds.
    #[error("{points} videos; a shard holds at most {MAX_POINTS}")]
    TooManyPoints {
        /// The number given.
        points: usize,
    },
    /// The dimension is 0.
    #[error("embedding dimension is 0")]
    ZeroDimension,
    /// The vectors do not hold `dim` values per id.
    #[error("{values} embedding values for {ids} ids of dimension {dim} (expected {expected})")]
    LengthMismatch {
        /// The number of ids.
        ids: usize,
        /// The dimension.
        dim: usize,
        /// The number of values given.
        values: usize,
        /// `ids * dim`, or `usize::MAX` if that overflows.
        expected: usize,
    },
    /// An embedding holds NaN or an infinity.
    #[error("embedding of video {id} (row {row}): value {column} is {value}, not a finite number")]
    NonFinite {
        /// The video id.
        id: u64,
        /// 0-based row.
        row: usize,
        /// 0-based component.
        column: usize,
        /// The value.
        value: f32,
    },
    /// An embedding is not L2-normalised (the graph's distance, `1 - <a, b>`, assumes it).
    #[error(
        "embedding of video {id} (row {row}) has L2 norm {norm}, expected 1 (normalise the embeddings)"
    )]
    NotNormalised {
        /// The video id.
        id: u64,
        /// 0-based row.
        row: usize,
        /// Its norm.
        norm: f32,
    },
    /// Two rows have the same video id.
    #[error("video id {id} appears twice")]
    DuplicateId {
        /// The id.
        id: u64,
    },
    /// A configuration value is out of range.
    #[error("invalid value for `{key}`: {message}")]
    Config {
        /// The field of [`ShardConfig`].
        key: &'static str,
        /// Why it is refused.
        message: String,
    },
    /// hnsw_rs's graph could not be exported as a shard (a bug here or in hnsw_rs).
    #[error("cannot export the hnsw_rs graph: {0}")]
    Export(String),
    /// The calibration queries are malformed.
    #[error("calibration queries: {0}")]
    CalibrationQueries(String),
    /// The bench's shard file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The shard writer refused the exported graph.
    #[error(transparent)]
    Shard(#[from] edge::Error),
}

/// What a build produced and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildReport {
    /// The number of videos.
    pub points: usize,
    /// The embedding dimension.
    pub dim: usize,
    /// The size of the shard's bytes.
    pub bytes: usize,
    /// Members of each layer, layer 0 first.
    pub layer_sizes: Vec<usize>,
    /// The mean number of neighbours per point on layer 0.
    pub mean_degree: f64,
    /// The largest number of neighbours of a point on layer 0.
    pub max_degree: usize,
    /// Upper-layer edges of hnsw_rs's export that named a point absent from their layer,
    /// dropped (a few dozen in 20,000 points; hnsw_rs searches a layer from its current
    /// entry point whatever that point's level, and can keep it as a neighbour there).
    pub dropped_edges: usize,
    /// Layer-0 edges added so that every video is reachable from the entry point
    /// (hnsw_rs's pruning can remove the last edge into a point).
    pub linked_edges: usize,
    /// Time spent inserting into hnsw_rs.
    pub graph_time: Duration,
    /// Time spent exporting the graph and writing the shard.
    pub write_time: Duration,
    /// How the default beam width was chosen.
    pub calibration: Calibration,
}

impl BuildReport {
    /// The shard's bytes divided by its videos, everything included.
    pub fn bytes_per_video(&self) -> f64 {
        self.bytes as f64 / self.points as f64
    }

    /// Graph building, writing and calibration.
    pub fn total_time(&self) -> Duration {
        self.graph_time + self.write_time + self.calibration.time
    }
}

impl fmt::Display for BuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} videos x {} dims: {} bytes ({:.1} bytes/video), layers {:?}, layer-0 degree mean {:.1} max {}, edges dropped {} linked {}, built in {:.1} s (graph {:.1} s, export and write {:.2} s); {}",
            self.points,
            self.dim,
            self.bytes,
            self.bytes_per_video(),
            self.layer_sizes,
            self.mean_degree,
            self.max_degree,
            self.dropped_edges,
            self.linked_edges,
            self.total_time().as_secs_f64(),
            self.graph_time.as_secs_f64(),
            self.write_time.as_secs_f64(),
            self.calibration,
        )
    }
}

/// `1 - <a, b>` floored at 0. Not hnsw_rs's `DistDot`: that one asserts `1 - <a, b> >= 0`,
/// and two equal unit vectors can have a dot product a rounding error above 1, so a
/// catalogue with two identical embeddings would panic inside hnsw_rs's worker threads.
#[derive(Debug, Clone, Copy, Default)]
struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight sums so that the compiler can vectorize (see `edge::shard`'s `dot_i8`).
    let mut sums = [0.0_f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((sum, x), y) in sums.iter_mut().zip(a).zip(b) {
            *sum += x * y;
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// Builds a shard of `ids` and their embeddings (`vectors`, row-major, `dim` values per
/// row, L2-normalised), searched by inner product.
///
/// Unless `config.ef_search` fixes it, the shard's default beam width is calibrated on
/// `calibration_queries` (row-major, `dim` values each; the queries the shard will serve,
/// such as user embeddings, are the best choice), or, when that is empty, on up to
/// [`CALIBRATION_QUERIES`] of the catalogue's own vectors.
pub fn build_shard(
    ids: &[u64],
    vectors: &[f32],
    dim: usize,
    config: &ShardConfig,
    calibration_queries: &[f32],
) -> Result<(Vec<u8>, BuildReport), ShardBuildError> {
    build_grouped_shard(ids, vectors, dim, None, config, calibration_queries)
}

/// [`build_shard`], with each group's points stored in one run of positions when `groups`
/// labels them (one label per id; see [`ShardWriter::groups`]). Grouping changes where
/// points are stored, not the graph or what a search finds.
pub fn build_grouped_shard(
    ids: &[u64],
    vectors: &[f32],
    dim: usize,
    groups: Option<&[u32]>,
    config: &ShardConfig,
    calibration_queries: &[f32],
) -> Result<(Vec<u8>, BuildReport), ShardBuildError> {
    check_config(config)?;
    check_input(ids, vectors, dim)?;
    check_calibration_queries(calibration_queries, dim)?;
    let points = ids.len();

    let started = Instant::now();
    let hnsw: Hnsw<'_, f32, UnitDot> = Hnsw::new(
        config.m,
        points,
        HNSW_MAX_LAYERS,
        config.ef_construction,
        UnitDot,
    );
    let rows: Vec<(&[f32], usize)> = vectors.chunks_exact(dim).zip(0..points).collect();
    // The first point alone: inserted concurrently, the first two can both find no entry
    // point and the second would be left without neighbours.
    hnsw.insert_slice(rows[0]);
    hnsw.parallel_insert_slice(&rows[1..].to_vec());
    let graph_time = started.elapsed();

    let started = Instant::now();
    let (graph, repairs) = export(&hnsw, points)?;
    drop(hnsw);
    let first_ef = config.ef_search.unwrap_or(EF_LADDER[0]);
    let mut writer = ShardWriter::new(dim).search_ef(first_ef);
    if let Some(groups) = groups {
        writer = writer.groups(groups.to_vec());
    }
    let mut bytes = writer.write(ids, vectors, &graph)?;
    let write_time = started.elapsed();

    let calibration = match config.ef_search {
        Some(ef) => Calibration {
            ef,
            recall: None,
            target: config.target_recall,
            queries: 0,
            from_catalogue: false,
            time: Duration::ZERO,
        },
        None => {
            let shard = Shard::open(bytes)?;
            let calibration = calibrate(
                &shard,
                ids,
                vectors,
                dim,
                calibration_queries,
                config.target_recall,
            )?;
            bytes = shard.with_search_ef(calibration.ef)?.into_bytes();
            calibration
        }
    };

    let degrees = graph.layers[0].iter().map(|(_, list)| list.len());
    let report = BuildReport {
        points,
        dim,
        bytes: bytes.len(),
        layer_sizes: graph.layers.iter().map(Vec::len).collect(),
        mean_degree: degrees.clone().sum::<usize>() as f64 / points as f64,
        max_degree: degrees.max().unwrap_or(0),
        dropped_edges: repairs.dropped,
        linked_edges: repairs.linked,
        graph_time,
        write_time,
        calibration,
    };
    Ok((bytes, report))
}

/// One group label per id for [`build_grouped_shard`]: the rank of the video's category
/// among the catalogue's category names, so that each category's videos are stored
/// together (the edge's category queries scan them whole). Ids without a video go last.
pub fn category_groups(ids: &[u64], videos: &[Video]) -> Vec<u32> {
    let names: BTreeSet<&str> = videos.iter().map(|v| v.category.as_str()).collect();
    let rank: BTreeMap<&str, u32> = names.into_iter().zip(0..).collect();
    let category: BTreeMap<u64, u32> = videos
        .iter()
        .map(|v| (v.video_id, rank[v.category.as_str()]))
        .collect();
    ids.iter()
        .map(|id| category.get(id).copied().unwrap_or(u32::MAX))
        .collect()
}

/// Measures recall@100 against exact f32 search up [`EF_LADDER`] and keeps the first
/// width that reaches `target`.
fn calibrate(
    shard: &Shard,
    ids: &[u64],
    vectors: &[f32],
    dim: usize,
    queries: &[f32],
    target: f64,
) -> Result<Calibration, ShardBuildError> {
    let started = Instant::now();
    let from_catalogue = queries.is_empty();
    let sampled: Vec<f32>;
    let queries = if from_catalogue {
        // Evenly spaced rows: deterministic, and spread over the catalogue's order.
        let points = ids.len();
        let count = CALIBRATION_QUERIES.min(points);
        sampled = (0..count)
            .flat_map(|i| {
                let row = i * points / count;
                vectors[row * dim..(row + 1) * dim].iter().copied()
            })
            .collect();
        &sampled[..]
    } else {
        queries
    };
    let k = CALIBRATION_K.min(ids.len());
    let exact: Vec<Vec<u64>> = queries
        .chunks_exact(dim)
        .map(|q| {
            exact_top_k(vectors, dim, q, k)
                .into_iter()
                .map(|row| ids[row])
                .collect()
        })
        .collect();
    let count = exact.len();
    let mut scratch = SearchScratch::default();
    let mut chosen = (EF_LADDER[0], 0.0);
    for &ef in &EF_LADDER {
        let search = shard.nns(k).ef(ef);
        let mut total = 0.0;
        for (query, truth) in queries.chunks_exact(dim).zip(&exact) {
            let found: Vec<u64> = search
                .search_with(query, &mut scratch)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            total += recall(&found, truth);
        }
        chosen = (ef, total / count.max(1) as f64);
        // A beam as wide as the catalogue is exhaustive: wider cannot do better.
        if chosen.1 >= target || ef >= ids.len() {
            break;
        }
    }
    Ok(Calibration {
        ef: chosen.0,
        recall: Some(chosen.1),
        target,
        queries: count,
        from_catalogue,
        time: started.elapsed(),
    })
}

fn check_calibration_queries(queries: &[f32], dim: usize) -> Result<(), ShardBuildError> {
    if dim > 0 && !queries.len().is_multiple_of(dim) {
        return Err(ShardBuildError::CalibrationQueries(format!(
            "{} values is not a whole number of queries of dimension {dim}",
            queries.len()
        )));
    }
    if let Some(at) = queries.iter().position(|v| !v.is_finite()) {
        return Err(ShardBuildError::CalibrationQueries(format!(
            "value {} of query {} is {}, not a finite number",
            at % dim.max(1),
            at / dim.max(1),
            queries[at]
        )));
    }
    Ok(())
}

fn check_config(config: &ShardConfig) -> Result<(), ShardBuildError> {
    // hnsw_rs ends the process (not a panic) for m > 256.
    if !(2..=256).contains(&config.m) {
        return Err(ShardBuildError::Config {
            key: "m",
            message: format!("must be in 2..=256, got {}", config.m),
        });
    }
    if !(config.target_recall > 0.0 && config.target_recall <= 1.0) {
        return Err(ShardBuildError::Config {
            key: "target_recall",
            message: format!("must be in (0, 1], got {}", config.target_recall),
        });
    }
    for (key, value) in [
        ("ef_construction", config.ef_construction),
        ("ef_search", config.ef_search.unwrap_or(1)),
    ] {
        if value == 0 || u32::try_from(value).is_err() {
            return Err(ShardBuildError::Config {
                key,
                message: format!("must be in 1..=u32::MAX, got {value}"),
            });
        }
    }
    Ok(())
}

fn check_input(ids: &[u64], vectors: &[f32], dim: usize) -> Result<(), ShardBuildError> {
    if ids.is_empty() {
        return Err(ShardBuildError::NoPoints);
    }
    if ids.len() > MAX_POINTS {
        return Err(ShardBuildError::TooManyPoints { points: ids.len() });
    }
    if dim == 0 {
        return Err(ShardBuildError::ZeroDimension);
    }
    let expected = ids.len().checked_mul(dim);
    if expected != Some(vectors.len()) {
        return Err(ShardBuildError::LengthMismatch {
            ids: ids.len(),
            dim,
            values: vectors.len(),
            expected: expected.unwrap_or(usize::MAX),
        });
    }
    for (row, (vector, &id)) in vectors.chunks_exact(dim).zip(ids).enumerate() {
        if let Some(column) = vector.iter().position(|v| !v.is_finite()) {
            return Err(ShardBuildError::NonFinite {
                id,
                row,
                column,
                value: vector[column],
            });
        }
        let norm = dot(vector, vector).sqrt();
        if (norm - 1.0).abs() > NORM_TOLERANCE {
            return Err(ShardBuildError::NotNormalised { id, row, norm });
        }
    }
    let mut seen = BTreeSet::new();
    if let Some(&id) = ids.iter().find(|&&id| !seen.insert(id)) {
        return Err(ShardBuildError::DuplicateId { id });
    }
    Ok(())
}

/// The layers as `ShardGraph` wants them, with the repairs of [`Repairs`].
///
/// hnsw_rs's origin ids are our row positions. A point's `get_neighborhood_id()` has one
/// list per possible layer, and hnsw_rs can leave an entry above the point's own level
/// (from the greedy descent of its insertion), so only layers `0..=level` are read.
fn export(
    hnsw: &Hnsw<'_, f32, UnitDot>,
    points: usize,
) -> Result<(ShardGraph, Repairs), ShardBuildError> {
    let indexation = hnsw.get_point_indexation();
    let mut levels: Vec<Option<usize>> = vec![None; points];
    let mut neighbourhoods: Vec<Vec<Vec<u32>>> = vec![Vec::new(); points];
    for point in indexation {
        let row = point.get_origin_id();
        let level = usize::from(point.get_point_id().0);
        let slot = levels
            .get_mut(row)
            .ok_or_else(|| ShardBuildError::Export(format!("unknown origin id {row}")))?;
        if slot.replace(level).is_some() {
            return Err(ShardBuildError::Export(format!(
                "origin id {row} appears twice"
            )));
        }
        neighbourhoods[row] = point
            .get_neighborhood_id()
            .into_iter()
            .take(level + 1)
            .map(|layer| layer.iter().map(|n| n.d_id as u32).collect())
            .collect();
    }
    if let Some(row) = levels.iter().position(Option::is_none) {
        return Err(ShardBuildError::Export(format!(
            "row {row} is missing from the graph"
        )));
    }
    let levels: Vec<usize> = levels.into_iter().flatten().collect();

    let top = usize::from(hnsw.get_max_level_observed());
    let entry = indexation
        .get_layer_iterator(top)
        .next()
        .ok_or_else(|| ShardBuildError::Export(format!("top layer {top} is empty")))?
        .get_origin_id();
    let mut dropped = 0;
    let mut layers: Vec<LayerLists> = vec![Vec::new(); top + 1];
    for (row, neighbourhood) in neighbourhoods.into_iter().enumerate() {
        for (layer, list) in neighbourhood.into_iter().enumerate() {
            let Some(members) = layers.get_mut(layer) else {
                return Err(ShardBuildError::Export(format!(
                    "row {row} is on layer {layer}, above the top layer {top}"
                )));
            };
            let before = list.len();
            let list: Vec<u32> = list
                .into_iter()
                .filter(|&n| levels.get(n as usize).is_some_and(|&l| l >= layer))
                .collect();
            dropped += before - list.len();
            members.push((row as u32, list));
        }
    }
    let linked = connect_stranded(&mut layers[0], entry);
    Ok((
        ShardGraph {
            layers,
            entry_point: entry as u32,
        },
        Repairs { dropped, linked },
    ))
}

/// What [`export`] changed in hnsw_rs's graph.
struct Repairs {
    /// Upper-layer edges to points absent from the layer.
    dropped: usize,
    /// Layer-0 edges added by [`connect_stranded`].
    linked: usize,
}

/// Adds layer-0 edges until every point is reachable from `entry`, and returns how many.
///
/// hnsw_rs prunes a point's list when a closer point arrives, and can so remove the last
/// edge into a point (1 in 20,000 clustered embeddings): no search would ever return that
/// video. Each stranded point gets an edge from its nearest reachable out-neighbour
/// (lists are sorted nearest first), or, if none of its neighbours is reachable, from the
/// entry point.
fn connect_stranded(base: &mut LayerLists, entry: usize) -> usize {
    let mut linked = 0;
    loop {
        let reached = reachable(base, entry);
        let stranded: Vec<usize> = (0..base.len()).filter(|&p| !reached[p]).collect();
        let Some(&first) = stranded.first() else {
            return linked;
        };
        let before = linked;
        for &point in &stranded {
            if let Some(&from) = base[point].1.iter().find(|&&q| reached[q as usize]) {
                base[from as usize].1.push(point as u32);
                linked += 1;
            }
        }
        if linked == before {
            base[entry].1.push(first as u32);
            linked += 1;
        }
    }
}

/// Which points a walk along `base`'s lists reaches from `entry` (`base[p]` is point `p`'s).
fn reachable(base: &LayerLists, entry: usize) -> Vec<bool> {
    let mut reached = vec![false; base.len()];
    reached[entry] = true;
    let mut pending = vec![entry];
    while let Some(point) = pending.pop() {
        for &next in &base[point].1 {
            if !std::mem::replace(&mut reached[next as usize], true) {
                pending.push(next as usize);
            }
        }
    }
    reached
}

// ---------------------------------------------------------------------------------------
// Measurement.

/// `points` unit vectors of `dim` components from a Gaussian mixture, so that they look
/// like learned embeddings (topics of uneven size and spread) rather than uniform noise.
/// Rows are independent draws: split one call into an index and its queries.
pub fn clustered_embeddings(points: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // About one topic per 500 videos, at least 8.
    let clusters = (points / 500).max(8);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| unit(&mut rng, dim, |rng| StandardNormal.sample(rng)))
        .collect();
    // Uneven topic sizes (weights ~ 1 / rank^0.7) and spreads.
    let weights: Vec<f64> = (0..clusters)
        .map(|c| 1.0 / ((c + 1) as f64).powf(0.7))
        .collect();
    let total: f64 = weights.iter().sum();
    let cumulative: Vec<f64> = weights
        .iter()
        .scan(0.0, |sum, w| {
            *sum += w / total;
            Some(*sum)
        })
        .collect();
    let spreads: Vec<f32> = (0..clusters)
        .map(|_| rng.random_range(0.7..1.3) / (dim as f32).sqrt())
        .collect();
    let mut out = Vec::with_capacity(points * dim);
    for _ in 0..points {
        let u: f64 = rng.random();
        let cluster = cumulative.partition_point(|&c| c < u).min(clusters - 1);
        let (centre, spread) = (&centres[cluster], spreads[cluster]);
        let mut i = 0;
        out.extend(unit(&mut rng, dim, |rng| {
            let noise: f32 = StandardNormal.sample(rng);
            let value = centre[i] + spread * noise;
            i += 1;
            value
        }));
    }
    out
}

fn unit(
    rng: &mut ChaCha8Rng,
    dim: usize,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> f32,
) -> Vec<f32> {
    loop {
        let v: Vec<f32> = (0..dim).map(|_| draw(rng)).collect();
        let norm = dot(&v, &v).sqrt();
        if norm > 1e-6 {
            return v.into_iter().map(|x| x / norm).collect();
        }
    }
}

/// The rows of the `k` largest inner products with `query`, best first (ties by row), by
/// brute force in f32: the reference that recall is measured against.
pub fn exact_top_k(vectors: &[f32], dim: usize, query: &[f32], k: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = vectors
        .chunks_exact(dim)
        .map(|row| dot(row, query))
        .zip(0..)
        .collect();
    let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = k.min(scored.len());
    if k < scored.len() && k > 0 {
        scored.select_nth_unstable_by(k - 1, by_score);
    }
    scored.truncate(k);
    scored.sort_unstable_by(by_score);
    scored.into_iter().map(|(_, row)| row).collect()
}

/// The share of `exact` found in `found` (recall@k for `k = exact.len()`).
pub fn recall(found: &[u64], exact: &[u64]) -> f64 {
    if exact.is_empty() {
        return 1.0;
    }
    let found: BTreeSet<u64> = found.iter().copied().collect();
    exact.iter().filter(|id| found.contains(id)).count() as f64 / exact.len() as f64
}

/// One beam width's results in [`BenchReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct EfResult {
    /// The beam width.
    pub ef: usize,
    /// Graph search latency.
    pub latency: Latency,
    /// Mean recall@100 against exact f32 inner-product search.
    pub recall: f64,
}

/// What [`bench_shard`] measured; `Display` prints it as a small report.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Videos in the shard.
    pub points: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Queries per measurement.
    pub queries: usize,
    /// The seed of the embeddings.
    pub seed: u64,
    /// The build, or `None` when the shard was read back from a file.
    pub build: Option<BuildReport>,
    /// The shard's size in bytes.
    pub bytes: usize,
    /// The shard's default beam width.
    pub default_ef: usize,
    /// `Shard::open`: checksum, validation and decoding (the edge's cold start skips the
    /// checksum, which the bundle's section hash covers).
    pub open_time: Duration,
    /// Graph search at each beam width, narrowest first.
    pub graph: Vec<EfResult>,
    /// Brute force over the shard's int8 vectors (`Shard::exact_search`).
    pub exact: Latency,
    /// Recall@100 of that brute force against exact f32 search: the ceiling that int8
    /// quantization leaves to the graph.
    pub exact_recall: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "shard bench: {} videos x {} dims (clustered, seed {}), {} queries, top {BENCH_K}",
            self.points, self.dim, self.seed, self.queries
        )?;
        match &self.build {
            Some(build) => {
                writeln!(
                    f,
                    "build: {:.1} s (graph {:.1} s, export and write {:.2} s, calibration {:.1} s)",
                    build.total_time().as_secs_f64(),
                    build.graph_time.as_secs_f64(),
                    build.write_time.as_secs_f64(),
                    build.calibration.time.as_secs_f64()
                )?;
                writeln!(
                    f,
                    "layers {:?}; layer-0 degree mean {:.1}, max {}; {}",
                    build.layer_sizes, build.mean_degree, build.max_degree, build.calibration
                )?;
            }
            None => writeln!(f, "build: reused the shard file")?,
        }
        writeln!(
            f,
            "size: {} bytes, {:.1} bytes/video; opens in {:.1} ms",
            self.bytes,
            self.bytes as f64 / self.points as f64,
            self.open_time.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "exact search (brute force, int8): median {:.1} us, p99 {:.1} us, recall@{BENCH_K} {:.4}",
            self.exact.median_us, self.exact.p99_us, self.exact_recall
        )?;
        writeln!(
            f,
            "{:>9}  {:>10}  {:>10}  {:>10}  {:>16}",
            "ef", "median us", "p99 us", "recall@100", "speedup (median)"
        )?;
        for row in &self.graph {
            // A beam narrower than k searches at k (`Query::ef`): say so rather than
            // credit ef 64 with ef 100's recall.
            let mut ef = row.ef.to_string();
            if row.ef < BENCH_K {
                ef.push('*');
            }
            if row.ef == self.default_ef {
                ef.push_str(" dflt");
            }
            writeln!(
                f,
                "{:>9}  {:>10.1}  {:>10.1}  {:>10.4}  {:>15.1}x",
                ef,
                row.latency.median_us,
                row.latency.p99_us,
                row.recall,
                self.exact.median_us / row.latency.median_us
            )?;
        }
        if self.graph.iter().any(|row| row.ef < BENCH_K) {
            writeln!(f, "* below k = {BENCH_K}: searched with ef = {BENCH_K}")?;
        }
        writeln!(f, "dflt: the shard's calibrated default")
    }
}

const BENCH_K: usize = 100;
const BENCH_EFS: [usize; 4] = [64, 128, 256, 512];

/// Builds a shard of `points` clustered embeddings of `dim` (default [`ShardConfig`],
/// calibrated on its own draws) and measures `queries` fresh draws from the same mixture:
/// build time, bytes per video, graph-search latency and recall@100 at ef 64, 128, 256,
/// 512 and the shard's default, and exact search latency. With `shard_file`, a shard
/// already there is read back instead of built (it must hold the same videos), else the
/// new one is saved there: search changes can be measured at 1M videos without
/// rebuilding. Meant for release builds.
pub fn bench_shard(
    points: usize,
    dim: usize,
    queries: usize,
    seed: u64,
    shard_file: Option<&Path>,
) -> Result<BenchReport, ShardBuildError> {
    let all = clustered_embeddings(points + CALIBRATION_QUERIES + queries, dim, seed);
    let (vectors, rest) = all.split_at(points * dim);
    let (calibration_queries, query_vectors) = rest.split_at(CALIBRATION_QUERIES * dim);
    // Ids unrelated to positions, as real video ids are.
    let ids: Vec<u64> = (0..points as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16)
        .collect();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShardBuildError::Io { path, source }
    };
    let (bytes, build) = match shard_file {
        Some(path) if path.exists() => (std::fs::read(path).map_err(io(path))?, None),
        _ => {
            let (bytes, build) = build_shard(
                &ids,
                vectors,
                dim,
                &ShardConfig::default(),
                calibration_queries,
            )?;
            if let Some(path) = shard_file {
                std::fs::write(path, &bytes).map_err(io(path))?;
            }
            (bytes, Some(build))
        }
    };
    let started = Instant::now();
    let shard = Shard::open(bytes)?;
    let open_time = started.elapsed();
    // Same dim, same count, and a few videos found at their own vectors: a shard of other
    // parameters (another seed gives the same ids but other vectors) fails one of these.
    let same = shard.dim() == dim
        && shard.len() == points
        && [0, points / 2, points - 1].into_iter().all(|row| {
            let vector = &vectors[row * dim..(row + 1) * dim];
            shard
                .exact_search(vector, 1)
                .is_ok_and(|hits| hits.first().is_some_and(|hit| hit.0 == ids[row]))
        });
    if !same {
        return Err(ShardBuildError::Config {
            key: "shard_file",
            message: format!(
                "holds {} videos of dim {}, not this bench's {points} of dim {dim} (seed {seed}); remove it to rebuild",
                shard.len(),
                shard.dim()
            ),
        });
    }

    let exact: Vec<Vec<u64>> = query_vectors
        .chunks_exact(dim)
        .map(|q| {
            exact_top_k(vectors, dim, q, BENCH_K)
                .into_iter()
                .map(|row| ids[row])
                .collect()
        })
        .collect();
    let ids_of = |hits: Vec<(u64, f32)>| hits.into_iter().map(|(id, _)| id).collect::<Vec<_>>();

    let mut samples = Vec::with_capacity(queries);
    let mut recall_sum = 0.0;
    for (query, truth) in query_vectors.chunks_exact(dim).zip(&exact) {
        let started = Instant::now();
        let hits = shard.exact_search(query, BENCH_K)?;
        samples.push(started.elapsed());
        recall_sum += recall(&ids_of(hits), truth);
    }
    let exact_latency = Latency::of(samples);
    let exact_recall = recall_sum / queries.max(1) as f64;

    let default_ef = shard.search_ef();
    let mut efs: Vec<usize> = BENCH_EFS.to_vec();
    efs.push(default_ef);
    efs.sort_unstable();
    efs.dedup();
    let mut scratch = SearchScratch::default();
    let mut graph = Vec::with_capacity(efs.len());
    for ef in efs {
        let search = shard.nns(BENCH_K).ef(ef);
        let mut samples = Vec::with_capacity(queries);
        let mut recall_sum = 0.0;
        for (query, truth) in query_vectors.chunks_exact(dim).zip(&exact) {
            let started = Instant::now();
            let hits = search.search_with(query, &mut scratch)?;
            samples.push(started.elapsed());
            recall_sum += recall(&ids_of(hits), truth);
        }
        graph.push(EfResult {
            ef,
            latency: Latency::of(samples),
            recall: recall_sum / queries.max(1) as f64,
        });
    }

    Ok(BenchReport {
        points,
        dim,
        queries,
        seed,
        bytes: shard.byte_len(),
        default_ef,
        build,
        open_time,
        graph,
        exact: exact_latency,
        exact_recall,
    })
}
