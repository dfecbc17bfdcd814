//! `control-plane bench peers`: each serving stage against the native library a user would
//! otherwise pick, on the same inputs in the same run, one thread each:
//!
//! - tree evaluation against official CatBoost's applier (the same model, as CatBoost JSON,
//!   and the same 200 rows);
//! - the user tower (tract) against onnxruntime (the same ONNX file and input tensors);
//! - shard search against hnswlib (the same vectors, queries and graph parameters; each
//!   beam width's latency set beside hnswlib's at the same or better recall@100).
//!
//! Our side runs natively here; the edge bench (`cargo xtask bench`) gives each stage's
//! wasm/native ratio. The peers run in a Python interpreter with `catboost`,
//! `onnxruntime` and `hnswlib` (`cargo xtask bench --peers` installs them); the product
//! never needs them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use edge::preprocess::Preprocessor;
use edge::ranker::RankerScratch;
use edge::shard::{SearchScratch, Shard};
use edge::tower::{UserTower, UserTowerInput, UserTowerSpec, Viewer, encode_user};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;

use crate::latency::Latency;
use crate::ranker_bench::{categorical_columns, random_model, random_rows_with_text};
use crate::shard_build::{
    CALIBRATION_QUERIES, ShardConfig, build_shard, clustered_embeddings, exact_top_k,
};

const SCRIPT: &str = include_str!("referee/peers.py");

/// The k of the shard comparison's recall@k.
const K: usize = 100;
/// Beam widths timed on both sides.
const EFS: [usize; 9] = [100, 128, 160, 200, 256, 320, 400, 512, 768];

/// What to compare.
#[derive(Debug, Clone)]
pub struct PeersConfig {
    /// An interpreter with `catboost`, `onnxruntime`, `hnswlib` and `numpy`.
    pub python: PathBuf,
    /// A trained two-tower folder (`user_tower.onnx`, `preprocessor.msgpack`,
    /// `report.json`); without it the tower is not compared.
    pub tower_dir: Option<PathBuf>,
    /// Videos in the shard comparison.
    pub videos: usize,
    /// Embedding dimension of the shard comparison.
    pub dim: usize,
    /// Queries, tower requests and evaluator calls timed per setting.
    pub queries: usize,
    /// Keep our shard in this file (built when missing), as `bench shard --shard-file`.
    pub shard_file: Option<PathBuf>,
    /// Seed of every input.
    pub seed: u64,
    /// Rounds of ours-then-peers timings.
    pub rounds: usize,
}

/// One side's figure and the peer's, for one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// What was timed.
    pub what: String,
    /// Ours, natively.
    pub ours: Latency,
    /// The peer's, or `None` when no setting of it reached our recall.
    pub peer: Option<Latency>,
    /// Ours / the peer's median in each round (empty when the peer never matched).
    pub ratios: Vec<f64>,
    /// How far the two sides' outputs (or recalls) are apart.
    pub agreement: String,
}

/// What [`bench_peers`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PeersReport {
    /// Stage by stage.
    pub pairs: Vec<Pair>,
    /// Graph builds, seconds: ours (graph, write and calibration; `None` when the shard
    /// file was reused) and hnswlib's.
    pub build_seconds: (Option<f64>, f64),
    /// Versions of the peer packages.
    pub versions: String,
}

impl fmt::Display for PeersReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "peers bench, one thread each, {} rounds ({}); the figures are the round with the median ratio",
            self.pairs.first().map_or(0, |pair| pair.ratios.len()),
            self.versions
        )?;
        writeln!(
            f,
            "{:<46} {:>9} {:>9} {:>9} {:>9}  {:<18}  agreement",
            "stage", "ours med", "ours p99", "peer med", "peer p99", "ratio, per round"
        )?;
        for pair in &self.pairs {
            let ratios = pair
                .ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ");
            let (median, p99) = pair.peer.map_or(("-".into(), "-".into()), |peer| {
                (
                    format!("{:.1}", peer.median_us),
                    format!("{:.1}", peer.p99_us),
                )
            });
            writeln!(
                f,
                "{:<46} {:>9.1} {:>9.1} {:>9} {:>9}  {:<18}  {}",
                pair.what,
                pair.ours.median_us,
                pair.ours.p99_us,
                median,
                p99,
                if ratios.is_empty() {
                    "-".into()
                } else {
                    ratios
                },
                pair.agreement
            )?;
        }
        let ours = self
            .build_seconds
            .0
            .map_or("reused from --shard-file".into(), |s| format!("{s:.1} s"));
        writeln!(
            f,
            "(microseconds; ratio = ours / peer, below 1 is faster) graph build (2 threads each): ours {ours}, hnswlib {:.1} s",
            self.build_seconds.1
        )
    }
}

#[derive(Deserialize)]
struct PeerLatency {
    median_us: f64,
    p99_us: f64,
}

impl From<&PeerLatency> for Latency {
    fn from(peer: &PeerLatency) -> Self {
        Latency {
            median_us: peer.median_us,
            p99_us: peer.p99_us,
        }
    }
}

#[derive(Deserialize)]
struct PeerApplier {
    latency: PeerLatency,
    /// The peer's cost of one call from Python that does (almost) no work.
    call_floor_us: f64,
    max_abs_difference: f64,
}

#[derive(Deserialize)]
struct PeerSearch {
    ef: usize,
    latency: PeerLatency,
    recall: f64,
}

#[derive(Deserialize)]
struct PeerShard {
    build_seconds: f64,
    searches: Vec<PeerSearch>,
    call_floor_us: f64,
}

#[derive(Deserialize)]
struct PeerAnswer {
    ranker: PeerApplier,
    tower: Option<PeerApplier>,
    shard: PeerShard,
    versions: serde_json::Map<String, serde_json::Value>,
}

/// Numbers' little-endian bytes, one after another (what numpy's `fromfile` reads).
fn le_bytes<const N: usize>(values: impl IntoIterator<Item = [u8; N]>) -> Vec<u8> {
    values.into_iter().flatten().collect()
}

fn timed(calls: usize, mut call: impl FnMut() -> Result<()>) -> Result<Latency> {
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call()?;
        samples.push(started.elapsed());
    }
    Ok(Latency::of(samples))
}

/// The ranker side: our evaluator on the bench model (1,000 trees of depth 6) and 200 rows.
fn ranker_side(
    dir: &Path,
    config: &PeersConfig,
) -> Result<(serde_json::Value, impl FnMut() -> Result<Latency>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let model = random_model(1_000, 6, &mut rng);
    let (rows, lines) = random_rows_with_text(200, &mut rng);
    std::fs::write(dir.join("ranker.json"), model.to_catboost_json())?;
    std::fs::write(dir.join("ranker_rows.tsv"), lines.join("\n") + "\n")?;
    let mut scratch = RankerScratch::default();
    let mut out = Vec::new();
    model.predict_with(&rows, &mut scratch, &mut out)?;
    let predictions = out.clone();
    let calls = config.queries;
    let ours = move || {
        timed(calls, || {
            model.predict_with(&rows, &mut scratch, &mut out)?;
            Ok(())
        })
    };
    let spec = json!({
        "model": "ranker.json",
        "rows": "ranker_rows.tsv",
        "cat_columns": categorical_columns().collect::<Vec<_>>(),
        "our_predictions": predictions,
        "calls": config.queries,
    });
    Ok((spec, ours))
}

/// The tower side: random valid inputs (histories of 1 to H videos) run one request at a
/// time, as serving does.
fn tower_side(
    dir: &Path,
    tower_dir: &Path,
    config: &PeersConfig,
) -> Result<(serde_json::Value, impl FnMut() -> Result<Latency>)> {
    let read = |name: &str| {
        let path = tower_dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let onnx = read("user_tower.onnx")?;
    let report: serde_json::Value = serde_json::from_slice(&read("report.json")?)?;
    let spec: UserTowerSpec = serde_json::from_value(report["spec"].clone())
        .context("report.json has no valid \"spec\"")?;
    let preprocessor = Preprocessor::from_bytes(&read("preprocessor.msgpack")?)?;
    let tower = UserTower::load(&onnx, spec.clone())?;
    std::fs::write(dir.join("user_tower.onnx"), &onnx)?;

    // Random viewers and histories of known videos, encoded as serving encodes them.
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x70_77_65_72);
    let pick = |rng: &mut ChaCha8Rng, rows: usize| rng.random_range(0..rows.max(1)) as u32;
    let categories = preprocessor.categories.len() as u64;
    let category_of = |video: u64| {
        preprocessor
            .categories
            .value((video % categories) as u32)
            .map(String::as_str)
    };
    let h = spec.history_length;
    let inputs: Vec<UserTowerInput> = (0..config.queries)
        .map(|_| {
            let viewer = Viewer {
                user_id: (preprocessor.user_ids)
                    .value(pick(&mut rng, preprocessor.user_ids.len()))
                    .copied(),
                country: (preprocessor.countries)
                    .value(pick(&mut rng, preprocessor.countries.len()))
                    .cloned(),
                language: (preprocessor.languages)
                    .value(pick(&mut rng, preprocessor.languages.len()))
                    .cloned(),
                age: Some(rng.random_range(13..80)),
            };
            let length = rng.random_range(1..=h);
            let history: Vec<u64> = (0..length)
                .filter_map(|_| {
                    (preprocessor.video_ids)
                        .value(pick(&mut rng, preprocessor.video_ids.len()))
                        .copied()
                })
                .collect();
            encode_user(&preprocessor, &spec, &viewer, &history, category_of)
        })
        .collect();

    let mut embeddings = Vec::with_capacity(inputs.len() * spec.output_dim);
    for input in &inputs {
        embeddings.extend(tower.embed(std::slice::from_ref(input))?);
    }
    std::fs::write(
        dir.join("tower_ours.f32"),
        le_bytes(embeddings.iter().map(|v| v.to_le_bytes())),
    )?;
    let n = inputs.len();
    let mut tensors = serde_json::Map::new();
    let mut tensor = |name: &str, dtype: &str, shape: &[usize], bytes: Vec<u8>| -> Result<()> {
        let file = format!("tower_{name}.bin");
        std::fs::write(dir.join(&file), bytes)?;
        tensors.insert(
            name.into(),
            json!({"file": file, "dtype": dtype, "shape": shape}),
        );
        Ok(())
    };
    let history = |f: fn(&UserTowerInput) -> &[i64]| {
        le_bytes(inputs.iter().flat_map(f).map(|v| v.to_le_bytes()))
    };
    let scalar =
        |f: fn(&UserTowerInput) -> i64| le_bytes(inputs.iter().map(|i| f(i).to_le_bytes()));
    tensor(
        "history_videos",
        "<i8",
        &[n, h],
        history(|i| &i.history_videos),
    )?;
    tensor(
        "history_categories",
        "<i8",
        &[n, h],
        history(|i| &i.history_categories),
    )?;
    tensor(
        "history_weights",
        "<f4",
        &[n, h],
        le_bytes(
            inputs
                .iter()
                .flat_map(|i| &i.history_weights)
                .map(|w| w.to_le_bytes()),
        ),
    )?;
    tensor("country", "<i8", &[n], scalar(|i| i.country))?;
    tensor("language", "<i8", &[n], scalar(|i| i.language))?;
    tensor("age_bucket", "<i8", &[n], scalar(|i| i.age_bucket))?;
    tensor("user", "<i8", &[n], scalar(|i| i.user))?;
    tensor(
        "dense",
        "<f4",
        &[n, 1],
        le_bytes(inputs.iter().map(|i| i.dense[0].to_le_bytes())),
    )?;
    let spec = json!({
        "model": "user_tower.onnx",
        "inputs": tensors,
        "requests": n,
        "our_embeddings": "tower_ours.f32",
    });
    let ours = move || {
        let mut next = inputs.iter().cycle();
        timed(n, || {
            let input = next.next().expect("a cycle never ends");
            tower.embed(std::slice::from_ref(input))?;
            Ok(())
        })
    };
    Ok((spec, ours))
}

/// Our shard at each of [`EFS`] and its calibrated default: (ef, latency, recall@100).
type ShardRows = Vec<(usize, Latency, f64)>;

/// What the shard side prepared.
struct ShardSide {
    /// The peers' part of the manifest.
    spec: serde_json::Value,
    /// The shard's calibrated beam width.
    default_ef: usize,
    /// Our build (graph, write and calibration), unless the shard file was reused.
    build_seconds: Option<f64>,
}

/// The shard side: clustered unit vectors (as `bench shard`), ids equal to row numbers so
/// that both sides name videos alike.
fn shard_side(
    dir: &Path,
    config: &PeersConfig,
) -> Result<(ShardSide, impl FnMut() -> Result<ShardRows>)> {
    let (points, dim, queries) = (config.videos, config.dim, config.queries);
    let all = clustered_embeddings(points + CALIBRATION_QUERIES + queries, dim, config.seed);
    let (vectors, rest) = all.split_at(points * dim);
    let (calibration, query_vectors) = rest.split_at(CALIBRATION_QUERIES * dim);
    let ids: Vec<u64> = (0..points as u64).collect();
    let shard_config = ShardConfig::default();
    let cached = config
        .shard_file
        .as_ref()
        .filter(|path| path.exists())
        .map(std::fs::read)
        .transpose()?;
    let (bytes, build_seconds) = match cached {
        Some(bytes) => (bytes, None),
        None => {
            eprintln!("peers: building our shard of {points} videos");
            let (bytes, report) = build_shard(&ids, vectors, dim, &shard_config, calibration)?;
            if let Some(path) = &config.shard_file {
                std::fs::write(path, &bytes)?;
            }
            (bytes, Some(report.total_time().as_secs_f64()))
        }
    };
    let shard = Shard::open(bytes)?;
    ensure!(
        shard.len() == points
            && shard.dim() == dim
            && shard
                .exact_search(&vectors[..dim], 1)?
                .first()
                .is_some_and(|hit| hit.0 == 0),
        "the shard file holds other vectors than this bench's (another --videos, --dim or --seed): remove it"
    );
    let exact: Vec<Vec<u64>> = query_vectors
        .chunks_exact(dim)
        .map(|q| {
            exact_top_k(vectors, dim, q, K)
                .into_iter()
                .map(|row| row as u64)
                .collect()
        })
        .collect();
    let floats = |values: &[f32]| le_bytes(values.iter().map(|v| v.to_le_bytes()));
    std::fs::write(dir.join("shard_vectors.f32"), floats(vectors))?;
    std::fs::write(dir.join("shard_queries.f32"), floats(query_vectors))?;
    std::fs::write(
        dir.join("shard_exact.u32"),
        le_bytes(
            exact
                .iter()
                .flatten()
                .map(|&row| (row as u32).to_le_bytes()),
        ),
    )?;
    let spec = json!({
        "dim": dim,
        "vectors": "shard_vectors.f32",
        "queries": "shard_queries.f32",
        "exact": "shard_exact.u32",
        "k": K,
        "m": shard_config.m,
        "ef_construction": shard_config.ef_construction,
        "build_threads": 2,
        "efs": EFS,
    });
    let default_ef = shard.search_ef();
    let mut efs = EFS.to_vec();
    efs.push(default_ef);
    efs.sort_unstable();
    efs.dedup();
    let query_vectors = query_vectors.to_vec();
    let mut scratch = SearchScratch::default();
    let ours = move || {
        let mut rows = Vec::with_capacity(efs.len());
        for &ef in &efs {
            let search = shard.nns(K).ef(ef);
            let mut found = 0usize;
            let mut samples: Vec<Duration> = Vec::with_capacity(queries);
            for (query, truth) in query_vectors.chunks_exact(dim).zip(&exact) {
                let started = Instant::now();
                let hits = search.search_with(query, &mut scratch)?;
                samples.push(started.elapsed());
                found += hits.iter().filter(|hit| truth.contains(&hit.0)).count();
            }
            rows.push((
                ef,
                Latency::of(samples),
                found as f64 / (K * exact.len()) as f64,
            ));
        }
        Ok(rows)
    };
    Ok((
        ShardSide {
            spec,
            default_ef,
            build_seconds,
        },
        ours,
    ))
}

/// Runs our side of every stage, then the peers on the same inputs, and pairs them up.
pub fn bench_peers(config: &PeersConfig) -> Result<PeersReport> {
    ensure!(
        config.queries > 0 && config.videos > K && config.dim > 0 && config.rounds > 0,
        "--queries and --rounds must be at least 1, --videos above {K}, --dim at least 1"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path();
    let mut manifest = serde_json::Map::new();

    eprintln!("peers: preparing the inputs");
    let (ranker_spec, mut ranker_ours) = ranker_side(path, config)?;
    manifest.insert("ranker".into(), ranker_spec);
    let mut tower_ours = match &config.tower_dir {
        Some(tower_dir) => {
            let (spec, ours) = tower_side(path, tower_dir, config)?;
            manifest.insert("tower".into(), spec);
            Some(ours)
        }
        None => None,
    };
    let (shard_side, mut shard_ours) = shard_side(path, config)?;
    let default_ef = shard_side.default_ef;
    manifest.insert("shard".into(), shard_side.spec);
    std::fs::write(
        path.join("manifest.json"),
        serde_json::Value::Object(manifest).to_string(),
    )?;
    std::fs::write(path.join("peers.py"), SCRIPT)?;

    // The machine's speed drifts between minutes: each round times both sides back to
    // back, and the report keeps every round's ratio.
    let mut rounds: Vec<Vec<Pair>> = Vec::new();
    let mut answer = None;
    for round in 1..=config.rounds {
        eprintln!("peers: round {round} of {}: ours", config.rounds);
        let ranker = ranker_ours()?;
        let tower = tower_ours.as_mut().map(|ours| ours()).transpose()?;
        let shard = shard_ours()?;
        eprintln!(
            "peers: round {round} of {}: the peers ({})",
            config.rounds,
            config.python.display()
        );
        let status = Command::new(&config.python)
            .arg(path.join("peers.py"))
            .arg(path)
            .status()
            .with_context(|| format!("running {}", config.python.display()))?;
        if !status.success() {
            bail!(
                "{} peers.py failed ({status}); it needs catboost, onnxruntime, hnswlib and numpy (`cargo xtask bench --peers` installs them)",
                config.python.display()
            );
        }
        let peers: PeerAnswer = serde_json::from_slice(&std::fs::read(path.join("peers.json"))?)
            .context("reading the peers' answer")?;
        let pair = |what: String, ours, peer, agreement| Pair {
            what,
            ours,
            peer,
            ratios: Vec::new(),
            agreement,
        };
        let mut pairs = vec![pair(
            "trees: 1,000 x depth 6, 200 rows vs catboost".into(),
            ranker,
            Some(Latency::from(&peers.ranker.latency)),
            format!(
                "predictions within {:.1e}; timed 50 requests' rows per call / 50 (one call's floor: {:.0} us)",
                peers.ranker.max_abs_difference, peers.ranker.call_floor_us
            ),
        )];
        if let (Some(ours), Some(peer)) = (tower, &peers.tower) {
            pairs.push(pair(
                "user tower, batch 1: tract vs onnxruntime".into(),
                ours,
                Some((&peer.latency).into()),
                format!(
                    "embeddings within {:.1e}; includes the Python call's floor ({:.1} us)",
                    peer.max_abs_difference, peer.call_floor_us
                ),
            ));
        }
        for (ef, ours, recall) in shard {
            // hnswlib's cheapest beam that finds at least as much.
            let peer = peers
                .shard
                .searches
                .iter()
                .filter(|peer| peer.recall >= recall)
                .min_by(|a, b| a.latency.median_us.total_cmp(&b.latency.median_us));
            pairs.push(pair(
                format!(
                    "shard, {}k x {}, ef {ef}{}",
                    config.videos / 1000,
                    config.dim,
                    if ef == default_ef { " (default)" } else { "" }
                ),
                ours,
                peer.map(|peer| (&peer.latency).into()),
                match peer {
                    Some(peer) => format!(
                        "recall@{K} {recall:.4}; hnswlib ef {} {:.4} (call floor {:.1} us)",
                        peer.ef, peer.recall, peers.shard.call_floor_us
                    ),
                    None => format!("recall@{K} {recall:.4}; hnswlib never reached it"),
                },
            ));
        }
        rounds.push(pairs);
        answer = Some(peers);
    }
    let answer = answer.context("no rounds were run")?;
    let pairs = (0..rounds[0].len())
        .map(|stage| {
            let all: Vec<&Pair> = rounds.iter().map(|round| &round[stage]).collect();
            let ratio = |pair: &Pair| pair.peer.map(|peer| pair.ours.median_us / peer.median_us);
            // The round whose ratio is the median one speaks for the stage.
            let mut order: Vec<&Pair> = all.clone();
            order.sort_by(|a, b| {
                let key = |p: &Pair| ratio(p).unwrap_or(f64::INFINITY);
                key(a).total_cmp(&key(b))
            });
            Pair {
                ratios: all.iter().filter_map(|pair| ratio(pair)).collect(),
                ..order[order.len() / 2].clone()
            }
        })
        .collect();
    let versions = answer
        .versions
        .iter()
        .map(|(name, version)| format!("{name} {}", version.as_str().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(PeersReport {
        pairs,
        build_seconds: (shard_side.build_seconds, answer.shard.build_seconds),
        versions,
    })
}
