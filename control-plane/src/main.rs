//! `control-plane`: the command line over the control plane's library.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use control_plane::config::Config;
use control_plane::data::Dataset;
use control_plane::eval::{
    Comparison, EvalSet, ItemKnn, MostPopular, Part, evaluate, training_histories,
};
use control_plane::split::{Split, Strategy, split};
use control_plane::synthetic::{GeneratorConfig, generate};
use control_plane::{csv_import, movielens};
use edge::preprocess::{FitInput, Preprocessor};

#[derive(Parser)]
#[command(
    name = "control-plane",
    version,
    about = "edgerec's control plane: data, training, bundles, publishing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a synthetic data set with learnable structure.
    Generate(GenerateArgs),
    /// Import a data set into edgerec's Parquet layout.
    #[command(subcommand)]
    Import(Import),
    /// Split a data set's interactions into train, validation and test.
    Split(SplitArgs),
    /// Fit the preprocessing artifacts (vocabularies, normalizers) on a training split.
    Preprocess(PreprocessArgs),
    /// Train a model.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Evaluate offline.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Benchmarks that print medians and p99 beside a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build serving bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Publish a bundle (and the viewers' profiles) to a channel of a store (a folder or
    /// s3://bucket/prefix): bundles/<sha256>.bundle, then manifests/<channel>.json; with
    /// --state, also registered as `serve` shows it.
    Publish(PublishArgs),
    /// Run the REST API: registry, channels (publish, rollback), public store reads,
    /// ingest of hosts' inferences and interactions, pipeline runs.
    Serve(ServeArgs),
    /// The whole ML pipeline as one resumable, registered run.
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// A/B readouts from the ingested outcomes.
    #[command(subcommand)]
    Experiments(ExperimentsCommand),
    /// The feedback loop: ingested events into training data.
    #[command(subcommand)]
    Feedback(FeedbackCommand),
    /// Serving feature distributions (logged requests) against a training data set's:
    /// PSI per feature, alerts above the threshold (what GET /drift answers).
    Drift {
        /// The training data set.
        #[arg(long)]
        data: PathBuf,
        /// Only requests served by this model version.
        #[arg(long)]
        model_version: Option<String>,
        /// PSI above which a feature alerts.
        #[arg(long, default_value_t = control_plane::drift::DEFAULT_THRESHOLD)]
        threshold: f64,
        /// Registry folder.
        #[arg(long, env = "EDGEREC_STATE", default_value = ".edgerec/control-plane")]
        state: PathBuf,
    },
    /// Show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// Where artifacts are published.
#[derive(Args)]
struct StoreArgs {
    /// The store: a folder, file:///folder or s3://bucket/prefix (credentials, region and
    /// endpoint from the standard AWS environment and config files) [default for `serve`
    /// and `pipeline run`: STATE/store].
    #[arg(long, env = "EDGEREC_STORE")]
    store: Option<String>,
    /// S3 endpoint URL, for S3-compatible servers [default: AWS_ENDPOINT_URL or AWS].
    #[arg(long, env = "EDGEREC_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Path-style S3 addressing (http://host/bucket/key), which most S3-compatible servers
    /// need.
    #[arg(long, env = "EDGEREC_S3_PATH_STYLE")]
    s3_path_style: bool,
}

impl StoreArgs {
    /// The store, or `STATE/store` when none is given.
    fn location_or_state(&self, state: &Path) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| state.join("store").display().to_string())
    }

    fn s3(&self) -> control_plane::object_store::S3Options {
        control_plane::object_store::S3Options {
            endpoint: self.s3_endpoint.clone(),
            path_style: self.s3_path_style,
        }
    }
}

#[derive(Subcommand)]
enum FeedbackCommand {
    /// Join the ingested interactions to the logged responses (labels: engaged or shown
    /// and ignored, with position and model version) and merge them into a copy of a
    /// data set: OUT gets the tables plus feedback_labels.csv, registered as a new data
    /// version that `pipeline run --data OUT` retrains on.
    Merge {
        /// The data set the events are about.
        #[arg(long)]
        base: PathBuf,
        /// The new data set's folder (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Registry folder.
        #[arg(long, env = "EDGEREC_STATE", default_value = ".edgerec/control-plane")]
        state: PathBuf,
    },
}

#[derive(Subcommand)]
enum ExperimentsCommand {
    /// Per arm: impressions, clicks, CTR, watch rate; against the control: lift, 95%
    /// interval and the p-value of a two-proportion z-test (what GET
    /// /experiments/{name}/analysis answers).
    Analyze {
        /// The experiment's name (as the bundle defines it).
        name: String,
        /// Registry folder.
        #[arg(long, env = "EDGEREC_STATE", default_value = ".edgerec/control-plane")]
        state: PathBuf,
        /// The control arm [default: "control", else the first by name].
        #[arg(long)]
        control: Option<String>,
        /// Impressions an arm needs before its comparison is conclusive.
        #[arg(long, default_value_t = 1000)]
        min_sample: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// preprocess -> features -> two_tower -> embeddings -> shard -> ranker -> evaluation
    /// -> registration -> publish (with --publish), each stage recorded in the registry;
    /// the run's files go to STATE/runs/<id>/.
    Run(PipelineRunArgs),
}

#[derive(Args)]
struct PipelineRunArgs {
    /// Data set folder (required unless --resume).
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Config file [default: the defaults].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Registry folder (what `serve --state` reads).
    #[arg(long, env = "EDGEREC_STATE", default_value = ".edgerec/control-plane")]
    state: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Publish the bundle to this channel when every other stage succeeded.
    #[arg(long)]
    publish: Option<String>,
    /// Folder of the title sentence encoder for the two-tower model.
    #[arg(long)]
    title_model: Option<PathBuf>,
    /// Resume the run with this id (or start a queued one): stages already done are
    /// skipped.
    #[arg(long, conflicts_with_all = ["data", "config", "publish", "title_model"])]
    resume: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "EDGEREC_CONTROL_LISTEN", default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
    /// Folder of the registry database (registry.sqlite) and the generated API token.
    #[arg(long, env = "EDGEREC_STATE", default_value = ".edgerec/control-plane")]
    state: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// The bearer token for writes [default: STATE/api-token, created with a random
    /// token when missing].
    #[arg(long, env = "EDGEREC_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Largest bundle or profiles upload, MiB.
    #[arg(long, default_value_t = 1024)]
    max_artifact_mb: usize,
    /// Largest JSON or ingest request body, MiB.
    #[arg(long, default_value_t = 16)]
    max_body_mb: usize,
    /// Serve the browser demo from this folder at /demo/ (www/ with the browser build of
    /// the edge module in its pkg/ folder; `cargo xtask demo` assembles one).
    #[arg(long)]
    www: Option<PathBuf>,
    /// Log filter (tracing's syntax: info, debug, control_plane=debug, ...).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Args)]
struct PublishArgs {
    /// The bundle file.
    #[arg(long)]
    bundle: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Also register the bundle, profiles and channel event in the registry in this
    /// folder (what `serve --state` reads).
    #[arg(long)]
    state: Option<PathBuf>,
    /// The channel.
    #[arg(long, default_value = "production")]
    channel: String,
    /// Publish the viewers' profiles (demographics, engaged videos) from this data set
    /// for hosts' online features.
    #[arg(long)]
    profiles_from: Option<PathBuf>,
    /// Config file (its [engagement] rules decide which videos enter histories).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Videos kept per viewer history.
    #[arg(long, default_value_t = 200)]
    history_limit: usize,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// One file with the user tower, the shard, the ranker, the preprocessing, the
    /// catalogue, the rules and the experiments, each section checked by loading it as
    /// the edge will; written as BUNDLES/<sha256>.bundle.
    Build(BundleBuildArgs),
}

#[derive(Args)]
struct BundleBuildArgs {
    /// Data set folder (its videos and channels become the catalogue).
    #[arg(long)]
    data: PathBuf,
    /// Split folder [default: DATA/split].
    #[arg(long)]
    split: Option<PathBuf>,
    /// Config file (its [rules] and [[experiments]] go into the bundle).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Two-tower model folder [default: SPLIT/two-tower].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Ranker in CatBoost's JSON format [default: SPLIT/ranker/ranker.json].
    #[arg(long)]
    ranker: Option<PathBuf>,
    /// Promoted video ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    promoted: Vec<u64>,
    /// Model version written into the header [default: build time and a hash of the
    /// sections].
    #[arg(long)]
    model_version: Option<String>,
    /// Extra lineage entries (KEY=VALUE, repeatable): the run, the data version, the
    /// parent run.
    #[arg(long, value_parser = parse_lineage)]
    lineage: Vec<(String, String)>,
    /// The shard's default beam width, instead of the one `train two-tower` calibrated:
    /// trades retrieval recall for latency without retraining.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    shard_ef: Option<u32>,
    /// Output folder [default: SPLIT/bundles].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TrainCommand {
    /// The two-tower retrieval model; prints test metrics beside the baselines.
    TwoTower(TrainTwoTowerArgs),
    /// The ranker (CatBoost-compatible oblivious trees) on rows from the validation part
    /// and a trained two-tower model; prints the test ranking of the two-tower candidates
    /// in two-tower order and in ranker order.
    Ranker(TrainRankerArgs),
}

/// Where a trained two-tower model is and how to rebuild its inputs.
#[derive(Args)]
struct TwoTowerSource {
    /// Data set folder.
    #[arg(long)]
    data: PathBuf,
    /// Split folder [default: DATA/split].
    #[arg(long)]
    split: Option<PathBuf>,
    /// Config file (its [ranker] and [engagement] sections apply).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Two-tower model folder written by `train two-tower` [default: SPLIT/two-tower].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The title model the two-tower model was trained with [default: the one its
    /// report.json names].
    #[arg(long)]
    title_model: Option<PathBuf>,
    /// Two-tower candidates per request that the ranker orders.
    #[arg(long, default_value_t = 100)]
    candidates: usize,
}

#[derive(Args)]
struct TrainRankerArgs {
    #[command(flatten)]
    source: TwoTowerSource,
    /// Share of the viewers whose requests are held out for early stopping.
    #[arg(long, default_value_t = 0.2)]
    validation_share: f64,
    /// A Python interpreter with the `catboost` package: also train official CatBoost on
    /// the same rows with the same parameters and report it beside ours.
    #[arg(long)]
    catboost_python: Option<PathBuf>,
    /// Output folder for ranker.json (CatBoost's JSON format) and report.json
    /// [default: SPLIT/ranker].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TrainTwoTowerArgs {
    /// Data set folder.
    #[arg(long)]
    data: PathBuf,
    /// Split folder [default: DATA/split].
    #[arg(long)]
    split: Option<PathBuf>,
    /// Config file (its [two_tower], [preprocess] and [engagement] sections apply).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output folder for the weights and the report [default: SPLIT/two-tower].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder of the title sentence encoder (overrides `two_tower.title_model`).
    #[arg(long)]
    title_model: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the edge's tree evaluator on a random model: all candidates in one call
    /// against one call per candidate.
    Ranker {
        /// Trees in the model.
        #[arg(long, default_value_t = 1_000)]
        trees: usize,
        /// Depth of each tree.
        #[arg(long, default_value_t = 6)]
        depth: usize,
        /// Candidates scored per call.
        #[arg(long, default_value_t = 200)]
        candidates: usize,
        /// Timed calls.
        #[arg(long, default_value_t = 1_000)]
        calls: usize,
        /// Seed of the model and rows.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Build an HNSW shard of clustered unit vectors, then time searches at ef 64, 128,
    /// 256, 512 and the shard's calibrated default against exact search, with recall@100.
    Shard {
        /// Videos in the shard.
        #[arg(long, default_value_t = 100_000)]
        videos: usize,
        /// Embedding dimension.
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// Queries timed per setting.
        #[arg(long, default_value_t = 1_000)]
        queries: usize,
        /// Seed of the vectors and queries.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep the shard in this file: read it back if it is there (same videos, dim
        /// and seed), else build it and save it. Lets search changes be measured without
        /// rebuilding (a 1M-video build takes about 20 minutes on 2 cores).
        #[arg(long)]
        shard_file: Option<PathBuf>,
    },
    /// Each serving stage against its native peer on the same inputs, one thread each:
    /// the tree evaluator against CatBoost's applier, the user tower against onnxruntime,
    /// shard search against hnswlib (`cargo xtask bench --peers` sets this up).
    Peers {
        /// A Python interpreter with catboost, onnxruntime, hnswlib and numpy.
        #[arg(long)]
        python: PathBuf,
        /// A trained two-tower folder (`train two-tower`'s output) whose user tower is
        /// compared; without it the tower is left out.
        #[arg(long)]
        tower: Option<PathBuf>,
        /// Videos in the shard comparison.
        #[arg(long, default_value_t = 100_000)]
        videos: usize,
        /// Embedding dimension of the shard comparison.
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// Queries, tower requests and evaluator calls timed per setting.
        #[arg(long, default_value_t = 1_000)]
        queries: usize,
        /// Keep our shard in this file, as `bench shard --shard-file`.
        #[arg(long)]
        shard_file: Option<PathBuf>,
        /// Seed of every input.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Rounds of ours-then-peers timings (the machine's speed drifts between them).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Full-catalogue retrieval metrics (Recall, NDCG, HitRate at 10/20/50/100) of the
    /// baselines, most-popular and ItemKNN, and of a trained two-tower model (`--model`).
    Retrieval(EvalRetrievalArgs),
    /// The test ranking (NDCG, Recall at 10/20/50/100) of the two-tower candidates in
    /// two-tower order and in the order of a ranker (CatBoost JSON, ours or official).
    Ranking(EvalRankingArgs),
}

#[derive(Args)]
struct EvalRankingArgs {
    #[command(flatten)]
    source: TwoTowerSource,
    /// The ranker model: CatBoost's JSON format [default: SPLIT/ranker/ranker.json].
    #[arg(long)]
    ranker: Option<PathBuf>,
    /// Also write the reports as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct EvalRetrievalArgs {
    /// Data set folder.
    #[arg(long)]
    data: PathBuf,
    /// Split folder [default: DATA/split].
    #[arg(long)]
    split: Option<PathBuf>,
    /// Config file (its [engagement] section defines positives).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Held-out part: test (history = train + validation) or validation (history = train).
    #[arg(long, default_value = "test", value_parser = parse_part)]
    part: Part,
    /// A two-tower model folder written by `train two-tower`, evaluated beside the baselines.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The title model that `--model` was trained with [default: the one its report.json
    /// names].
    #[arg(long)]
    title_model: Option<PathBuf>,
    /// Neighbours kept per video by ItemKNN.
    #[arg(long, default_value_t = 100)]
    neighbors: usize,
    /// Also write the reports as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    /// Users.
    #[arg(long, default_value_t = 5_000)]
    users: u64,
    /// Videos.
    #[arg(long, default_value_t = 2_000)]
    videos: u64,
    /// Interaction rows, exactly.
    #[arg(long, default_value_t = 50_000)]
    interactions: u64,
    /// Impressions without engagement per engaged view.
    #[arg(long, default_value_t = 3)]
    negative_ratio: u32,
    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Import {
    /// MovieLens-100k, in RecBole's atomic layout or GroupLens's original one.
    Movielens {
        /// Folder with ml-100k.inter/.item/.user or u.data/u.item/u.user.
        dir: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Your own data: users.csv, videos.csv, channels.csv, interactions.csv.
    Csv {
        /// Folder with the four CSV files.
        dir: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct SplitArgs {
    /// Data set folder.
    #[arg(long)]
    data: PathBuf,
    /// Config file (its [split] and [engagement] sections apply).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides `split.strategy`: leave-last-n or time-cut.
    #[arg(long, value_parser = parse_strategy)]
    strategy: Option<Strategy>,
    /// Output folder [default: DATA/split].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct PreprocessArgs {
    /// Data set folder.
    #[arg(long)]
    data: PathBuf,
    /// Split folder [default: DATA/split].
    #[arg(long)]
    split: Option<PathBuf>,
    /// Config file (its [preprocess] and [engagement] sections apply).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output file [default: SPLIT/preprocessor.msgpack].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the defaults as TOML, or the given file after validation.
    Show {
        /// Config file to validate and print.
        file: Option<PathBuf>,
    },
}

fn parse_strategy(text: &str) -> Result<Strategy, String> {
    match text {
        "leave-last-n" => Ok(Strategy::LeaveLastN),
        "time-cut" => Ok(Strategy::TimeCut),
        other => Err(format!(
            "unknown strategy {other:?}, expected leave-last-n or time-cut"
        )),
    }
}

fn parse_part(text: &str) -> Result<Part, String> {
    match text {
        "test" => Ok(Part::Test),
        "validation" => Ok(Part::Validation),
        other => Err(format!(
            "unknown part {other:?}, expected test or validation"
        )),
    }
}

/// The data set and its split (`DATA/split` unless given), loaded and validated; a
/// catalogue without counts gets them from the training part.
fn load_split(data: &Path, split: Option<PathBuf>) -> Result<(Dataset, PathBuf, Split)> {
    let mut dataset = Dataset::load(data)?;
    let split_dir = split.unwrap_or_else(|| data.join("split"));
    let parts = Split::load(&split_dir)?;
    if dataset.count_engagement_where_missing(&parts.train) {
        eprintln!(
            "the catalogue carries no view, like or comment counts: counted them in the training part"
        );
    }
    Ok((dataset, split_dir, parts))
}

/// The preprocessing fitted on the training part.
fn fit_preprocessor(dataset: &Dataset, parts: &Split, config: &Config) -> Result<Preprocessor> {
    Ok(Preprocessor::fit(
        FitInput {
            users: &dataset.users,
            videos: &dataset.videos,
            channels: &dataset.channels,
            train: &parts.train,
        },
        &config.preprocess,
        &config.engagement,
    )?)
}

/// The catalogue's title sentence vectors (row-major, in `videos` order) from the model in
/// `folder`, or `None` (hashed title words) when no model is set or there are more than
/// `max_distinct` distinct titles. Says which on stderr.
fn encode_titles(
    folder: Option<&Path>,
    videos: &[edge::Video],
    max_distinct: usize,
) -> Result<Option<Vec<f32>>> {
    let Some(folder) = folder else {
        eprintln!(
            "titles: hashed words (no title model: set two_tower.title_model or --title-model)"
        );
        return Ok(None);
    };
    let titles: Vec<&str> = videos.iter().map(|v| v.title.as_str()).collect();
    let distinct = control_plane::title_encoder::TitleEncoder::distinct(&titles);
    if distinct > max_distinct {
        eprintln!(
            "titles: hashed words ({distinct} distinct titles exceed two_tower.max_title_sentences = {max_distinct})"
        );
        return Ok(None);
    }
    let encoder = control_plane::title_encoder::TitleEncoder::load(folder)?;
    let bar = control_plane::progress::bar(distinct as u64, "titles", "titles");
    let started = Instant::now();
    let vectors = encoder.encode(&titles, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "titles: {distinct} distinct titles encoded by {} in {seconds:.1} s ({:.0} titles/s)",
        folder.display(),
        distinct as f64 / seconds.max(1e-9)
    );
    Ok(Some(vectors))
}

/// A model folder written by `train two-tower`, read back with the title vectors it
/// was trained on.
struct SavedTwoTower {
    preprocessor: Preprocessor,
    spec: edge::tower::UserTowerSpec,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    title_vectors: Option<Vec<f32>>,
}

impl SavedTwoTower {
    /// `title_model` overrides the one the folder's report.json names.
    fn load(dir: &Path, title_model: Option<PathBuf>, videos: &[edge::Video]) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).with_context(|| {
                format!(
                    "{} (train the two-tower model first: control-plane train two-tower)",
                    path.display()
                )
            })
        };
        let preprocessor = Preprocessor::from_bytes(&read("preprocessor.msgpack")?)?;
        let report: serde_json::Value = serde_json::from_slice(&read("report.json")?)?;
        let spec = serde_json::from_value(report["spec"].clone())
            .context("report.json has no valid \"spec\"")?;
        let weights = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
            .with_context(|| weights.display().to_string())?;
        let title_model = title_model.or_else(|| report["title_model"].as_str().map(PathBuf::from));
        let title_vectors = match title_model {
            // Whatever the size: the saved model needs the vectors it was trained on.
            Some(folder) => encode_titles(Some(&folder), videos, usize::MAX)?,
            None => None,
        };
        Ok(Self {
            preprocessor,
            spec,
            tensors,
            title_vectors,
        })
    }
}

/// Loads the data set, its split and the two-tower model of `source`, then calls `body`
/// with what ranker rows are built from, the evaluation set of the test part and the
/// split folder.
fn with_two_tower(
    source: &TwoTowerSource,
    config: &Config,
    body: impl FnOnce(&control_plane::ranker_data::RankerSources<'_>, &EvalSet, &Path) -> Result<()>,
) -> Result<()> {
    anyhow::ensure!(source.candidates > 0, "--candidates must be at least 1");
    let (dataset, split_dir, parts) = load_split(&source.data, source.split.clone())?;
    let dir = source
        .model
        .clone()
        .unwrap_or_else(|| split_dir.join("two-tower"));
    let saved = SavedTwoTower::load(&dir, source.title_model.clone(), &dataset.videos)?;
    let data = control_plane::two_tower::TrainingData {
        preprocessor: &saved.preprocessor,
        videos: &dataset.videos,
        users: &dataset.users,
        split: &parts,
        rules: &config.engagement,
        title_vectors: saved.title_vectors.as_deref(),
    };
    let retriever =
        control_plane::two_tower::TrainedRetriever::load(saved.tensors, saved.spec, &data)?;
    let set = sampled(
        EvalSet::new(&parts, &dataset.videos, &config.engagement, Part::Test),
        config,
    );
    anyhow::ensure!(
        !set.users.is_empty(),
        "no user of {} has a positive interaction in the test part: nothing to evaluate",
        split_dir.display()
    );
    let sources = control_plane::ranker_data::RankerSources {
        data: &data,
        channels: &dataset.channels,
        retriever: &retriever,
    };
    body(&sources, &set, &split_dir)
}

/// Prints the ranking table of the test candidates and a summary line.
fn print_ranking(comparison: &Comparison) {
    println!("{comparison}");
    if let Some(base) = comparison.reports.first() {
        for report in &comparison.reports[1..] {
            let (ours, theirs) = (report.metric("ndcg@10"), base.metric("ndcg@10"));
            println!(
                "{}: ndcg@10 {ours:.4} vs two-tower order {theirs:.4} ({:+.1}%)",
                report.model,
                100.0 * (ours / theirs - 1.0)
            );
        }
    }
}

/// The registry in `state`, created if missing.
fn open_registry(state: &Path) -> Result<control_plane::registry::Registry> {
    let path = control_plane::registry::Registry::path_in(state);
    control_plane::registry::Registry::open(&path)
        .with_context(|| format!("opening the registry {}", path.display()))
}

/// The registry in `state`, for commands that only read what is there.
fn existing_registry(state: &Path) -> Result<control_plane::registry::Registry> {
    let path = control_plane::registry::Registry::path_in(state);
    anyhow::ensure!(
        path.is_file(),
        "no registry at {} (give --state)",
        path.display()
    );
    open_registry(state)
}

fn parse_lineage(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?}: use KEY=VALUE")),
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    match path {
        Some(path) => Ok(Config::load(path)?),
        None => Ok(Config::default()),
    }
}

/// `set` cut to `eval.max_users` (seeded), saying so when it samples.
fn sampled(set: EvalSet, config: &Config) -> EvalSet {
    let all = set.users.len();
    let set = set.at_most(config.eval.max_users, config.two_tower.seed);
    if set.users.len() < all {
        eprintln!(
            "evaluating a seeded sample of {} of {all} users (eval.max_users)",
            set.users.len()
        );
    }
    set
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let config = GeneratorConfig {
                users: args.users,
                videos: args.videos,
                interactions: args.interactions,
                negative_ratio: args.negative_ratio,
                seed: args.seed,
            };
            let started = Instant::now();
            let generated = generate(&config, &args.out, true)?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "generated {} users, {} videos, {} channels, {} interactions ({} engaged views) into {} in {:.2} s ({:.0} interaction rows/s)",
                generated.users,
                generated.videos,
                generated.channels,
                generated.interactions,
                generated.engaged_views,
                args.out.display(),
                seconds,
                generated.interactions as f64 / seconds.max(1e-9),
            );
        }
        Command::Import(import) => {
            let started = Instant::now();
            let (dataset, source, from, out) = match import {
                Import::Movielens { dir, out } => {
                    (movielens::import(&dir)?, "movielens-100k", dir, out)
                }
                Import::Csv { dir, out } => (csv_import::import(&dir)?, "csv", dir, out),
            };
            let manifest = dataset.save(
                &out,
                source,
                serde_json::json!({ "imported_from": from.display().to_string() }),
            )?;
            let c = manifest.counts;
            println!(
                "imported {} users, {} videos, {} channels, {} interactions from {} into {} in {:.2} s",
                c.users,
                c.videos,
                c.channels,
                c.interactions,
                from.display(),
                out.display(),
                started.elapsed().as_secs_f64()
            );
        }
        Command::Split(args) => {
            let mut config = load_config(args.config.as_deref())?;
            if let Some(strategy) = args.strategy {
                config.split.strategy = strategy;
            }
            let dataset = Dataset::load(&args.data)?;
            let parts = split(
                &dataset.interactions,
                &dataset.videos,
                &config.engagement,
                &config.split,
            )?;
            let out = args.out.unwrap_or_else(|| args.data.join("split"));
            let manifest = parts.save(&out, &config.split, &args.data)?;
            println!(
                "split {} interactions into train {} / validation {} / test {} (users: {} / {} / {}) in {}",
                dataset.interactions.len(),
                manifest.train.interactions,
                manifest.validation.interactions,
                manifest.test.interactions,
                manifest.train.users,
                manifest.validation.users,
                manifest.test.users,
                out.display()
            );
        }
        Command::Preprocess(args) => {
            let config = load_config(args.config.as_deref())?;
            let (dataset, split_dir, parts) = load_split(&args.data, args.split)?;
            let fitted = fit_preprocessor(&dataset, &parts, &config)?;
            let out = args
                .out
                .unwrap_or_else(|| split_dir.join("preprocessor.msgpack"));
            let bytes = fitted.to_bytes();
            let temporary = control_plane::parquet_io::temporary_path(&out);
            std::fs::write(&temporary, &bytes).with_context(|| temporary.display().to_string())?;
            std::fs::rename(&temporary, &out).with_context(|| out.display().to_string())?;
            println!(
                "fitted preprocessing on {} training interactions: {} users, {} videos, {} channels, {} categories, {} tags, {} languages, {} countries known; popularity thresholds {:?}; {} bytes -> {}",
                parts.train.len(),
                fitted.user_ids.known_len(),
                fitted.video_ids.known_len(),
                fitted.channel_ids.known_len(),
                fitted.categories.known_len(),
                fitted.tags.known_len(),
                fitted.languages.known_len(),
                fitted.countries.known_len(),
                fitted.popularity.thresholds,
                bytes.len(),
                out.display()
            );
        }
        Command::Train(TrainCommand::TwoTower(args)) => {
            let config = load_config(args.config.as_deref())?;
            let (dataset, split_dir, parts) = load_split(&args.data, args.split)?;
            let preprocessor = fit_preprocessor(&dataset, &parts, &config)?;
            let title_model = args.title_model.or(config.two_tower.title_model.clone());
            let title_vectors = encode_titles(
                title_model.as_deref(),
                &dataset.videos,
                config.two_tower.max_title_sentences,
            )?;
            let data = control_plane::two_tower::TrainingData {
                preprocessor: &preprocessor,
                videos: &dataset.videos,
                users: &dataset.users,
                split: &parts,
                rules: &config.engagement,
                title_vectors: title_vectors.as_deref(),
            };
            let (trained, report) =
                control_plane::two_tower::train(&data, &config.two_tower, true, |line| {
                    eprintln!("{line}")
                })?;
            let set = sampled(
                EvalSet::new(&parts, &dataset.videos, &config.engagement, Part::Test),
                &config,
            );
            let histories =
                training_histories(&parts, &dataset.videos, &config.engagement, Part::Test);
            let comparison = Comparison {
                reports: vec![
                    evaluate(&MostPopular::fit(&histories, &set.catalogue), &set),
                    evaluate(&ItemKnn::fit(&histories, &set.catalogue, 100), &set),
                    evaluate(&trained, &set),
                ],
            };
            println!("{comparison}");
            println!(
                "trained on {} examples: {} epochs (kept epoch {}, validation recall@50 {:.4}), {:.0} examples/s, {:.1} s/epoch",
                report.examples,
                report.epochs,
                report.best_epoch,
                report.best_validation_recall_at_50,
                report.examples_per_second,
                report.seconds_per_epoch
            );
            let out = args.out.unwrap_or_else(|| split_dir.join("two-tower"));
            std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
            candle_core::safetensors::save(
                &trained.model.tensors(),
                out.join("model.safetensors"),
            )?;
            std::fs::write(out.join("preprocessor.msgpack"), preprocessor.to_bytes())?;
            let onnx = control_plane::onnx_export::export_user_tower(
                &trained.model,
                config.two_tower.table_precision,
            )?;
            std::fs::write(out.join("user_tower.onnx"), &onnx)?;
            let (ids, vectors) = trained.video_embeddings();
            // The shard serves user embeddings: calibrate its default beam width on those
            // of validation users rather than on the videos' own vectors.
            let validation = EvalSet::new(
                &parts,
                &dataset.videos,
                &config.engagement,
                Part::Validation,
            );
            let mut calibration_queries = Vec::new();
            for user in validation
                .users
                .iter()
                .take(control_plane::shard_build::CALIBRATION_QUERIES)
            {
                calibration_queries.extend(trained.user_embedding(user)?);
            }
            let (shard, built) = control_plane::shard_build::build_grouped_shard(
                ids,
                vectors,
                trained.model.spec.output_dim,
                Some(&control_plane::shard_build::category_groups(
                    ids,
                    &dataset.videos,
                )),
                &control_plane::shard_build::ShardConfig::default(),
                &calibration_queries,
            )?;
            std::fs::write(out.join("shard.bin"), &shard)?;
            println!(
                "shard of {} videos: {} bytes ({:.1} bytes/video), built in {:.2} s; {}",
                built.points,
                built.bytes,
                built.bytes as f64 / built.points as f64,
                built.total_time().as_secs_f64(),
                built.calibration
            );
            std::fs::write(
                out.join("report.json"),
                serde_json::to_string_pretty(&serde_json::json!({
                    "train": report,
                    "spec": trained.model.spec,
                    "title_model": title_vectors.as_ref().and(title_model.as_ref()),
                    "test": comparison,
                }))?,
            )?;
            println!("model written to {}", out.display());
        }
        Command::Eval(EvalCommand::Retrieval(args)) => {
            let config = load_config(args.config.as_deref())?;
            let (dataset, split_dir, parts) = load_split(&args.data, args.split)?;
            let rules = &config.engagement;
            let set = sampled(
                EvalSet::new(&parts, &dataset.videos, rules, args.part),
                &config,
            );
            anyhow::ensure!(
                !set.users.is_empty(),
                "no user of {} has a positive interaction in the {:?} part: nothing to evaluate",
                split_dir.display(),
                args.part
            );
            let histories = training_histories(&parts, &dataset.videos, rules, args.part);
            let popular = MostPopular::fit(&histories, &set.catalogue);
            let knn = ItemKnn::fit(&histories, &set.catalogue, args.neighbors);
            let mut reports = vec![evaluate(&popular, &set), evaluate(&knn, &set)];
            if let Some(dir) = &args.model {
                let saved = SavedTwoTower::load(dir, args.title_model.clone(), &dataset.videos)?;
                let data = control_plane::two_tower::TrainingData {
                    preprocessor: &saved.preprocessor,
                    videos: &dataset.videos,
                    users: &dataset.users,
                    split: &parts,
                    rules,
                    title_vectors: saved.title_vectors.as_deref(),
                };
                let trained = control_plane::two_tower::TrainedRetriever::load(
                    saved.tensors,
                    saved.spec,
                    &data,
                )?;
                reports.push(evaluate(&trained, &set));
            }
            let comparison = Comparison { reports };
            println!("{comparison}");
            if let Some(out) = args.out {
                let json = serde_json::to_string_pretty(&comparison)?;
                std::fs::write(&out, json).with_context(|| out.display().to_string())?;
            }
        }
        Command::Train(TrainCommand::Ranker(args)) => {
            let config = load_config(args.source.config.as_deref())?;
            anyhow::ensure!(
                (0.0..1.0).contains(&args.validation_share),
                "--validation-share must be in [0, 1)"
            );
            with_two_tower(&args.source, &config, |sources, set, split_dir| {
                use control_plane::ranker_data::{
                    candidate_lists, column_kinds, column_names, ranking_comparison, training_rows,
                };
                let started = Instant::now();
                let (train, validation) = training_rows(
                    sources,
                    &config.ranker,
                    args.source.candidates,
                    args.validation_share,
                )?;
                anyhow::ensure!(
                    train.positives() > 0,
                    "no positive interaction in the validation part: no rows to train the ranker on"
                );
                eprintln!(
                    "ranker rows from the validation part in {:.1} s: train {} rows ({} positive) in {} requests, early stopping {} rows ({} positive) in {} requests",
                    started.elapsed().as_secs_f64(),
                    train.len(),
                    train.positives(),
                    train.requests(),
                    validation.len(),
                    validation.positives(),
                    validation.requests(),
                );
                let (kinds, names) = (column_kinds(), column_names());
                let bar = control_plane::progress::bar(
                    config.ranker.iterations as u64,
                    "ranker",
                    "trees",
                );
                let validation_rows = validation.rows(&kinds, &names);
                let (model, report) = control_plane::ranker_train::train_ranker(
                    &train.rows(&kinds, &names),
                    (!validation.is_empty()).then_some(&validation_rows),
                    &config.ranker,
                    |iteration, loss| {
                        bar.set_position(iteration as u64);
                        if let Some(loss) = loss {
                            bar.set_message(format!("validation loss {loss:.5}"));
                        }
                    },
                )?;
                bar.finish_and_clear();
                eprintln!(
                    "ranker: {} trees grown, {} kept (validation loss {}), {} binary features, {:.1} s",
                    report.iterations,
                    report.kept,
                    report
                        .best_validation_loss
                        .map_or("-".to_owned(), |l| format!("{l:.5}")),
                    report.binary_features,
                    report.seconds
                );
                let lists = candidate_lists(sources, set, Part::Test, args.source.candidates)?;
                let ours = model.predict(&lists.set.values)?;
                let official = match &args.catboost_python {
                    Some(python) => {
                        let run = control_plane::catboost_side_by_side::train_official_catboost(
                            python,
                            &train,
                            &validation,
                            &lists.set,
                            &config.ranker,
                        )?;
                        eprintln!(
                            "official catboost: {} trees kept, {:.1} s; our trainer took {:.2}x its time",
                            run.trees,
                            run.seconds,
                            report.seconds / run.seconds.max(1e-9)
                        );
                        Some(run)
                    }
                    None => None,
                };
                let mut scorers: Vec<(&str, &[f64])> = vec![("+ranker", &ours)];
                if let Some(run) = &official {
                    scorers.push(("+catboost", &run.predictions));
                }
                let comparison = ranking_comparison(&lists, set, &scorers);
                print_ranking(&comparison);
                let out = args.out.clone().unwrap_or_else(|| split_dir.join("ranker"));
                std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
                std::fs::write(out.join("ranker.json"), model.to_catboost_json())?;
                std::fs::write(
                    out.join("report.json"),
                    serde_json::to_string_pretty(&serde_json::json!({
                        "train": report,
                        "config": config.ranker,
                        "rows": {
                            "train": train.len(),
                            "train_positives": train.positives(),
                            "validation": validation.len(),
                            "validation_positives": validation.positives(),
                        },
                        "candidates": args.source.candidates,
                        "official_catboost": official.as_ref().map(|run| serde_json::json!({
                            "seconds": run.seconds,
                            "trees": run.trees,
                            "time_ratio_ours_to_catboost": report.seconds / run.seconds.max(1e-9),
                        })),
                        "test": comparison,
                    }))?,
                )?;
                println!("ranker written to {}", out.join("ranker.json").display());
                Ok(())
            })?;
        }
        Command::Eval(EvalCommand::Ranking(args)) => {
            let config = load_config(args.source.config.as_deref())?;
            with_two_tower(&args.source, &config, |sources, set, split_dir| {
                let path = args
                    .ranker
                    .clone()
                    .unwrap_or_else(|| split_dir.join("ranker").join("ranker.json"));
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!("{} (train one: control-plane train ranker)", path.display())
                })?;
                let model = edge::ranker::RankerModel::from_catboost_json(&text)
                    .with_context(|| path.display().to_string())?;
                let lists = control_plane::ranker_data::candidate_lists(
                    sources,
                    set,
                    Part::Test,
                    args.source.candidates,
                )?;
                let scores = model.predict(&lists.set.values).with_context(|| {
                    format!(
                        "{} does not take the ranker's {} columns",
                        path.display(),
                        edge::ranker::features::COLUMNS.len()
                    )
                })?;
                let comparison = control_plane::ranker_data::ranking_comparison(
                    &lists,
                    set,
                    &[("+ranker", &scores)],
                );
                print_ranking(&comparison);
                if let Some(out) = &args.out {
                    let json = serde_json::to_string_pretty(&comparison)?;
                    std::fs::write(out, json).with_context(|| out.display().to_string())?;
                }
                Ok(())
            })?;
        }
        Command::Bench(BenchCommand::Ranker {
            trees,
            depth,
            candidates,
            calls,
            seed,
        }) => {
            anyhow::ensure!(
                trees > 0 && candidates > 0 && calls > 0 && (1..=16).contains(&depth),
                "--trees, --candidates and --calls must be at least 1, --depth in 1..=16"
            );
            println!(
                "{}",
                control_plane::ranker_bench::bench_ranker(trees, depth, candidates, calls, seed)?
            );
        }
        Command::Bench(BenchCommand::Shard {
            videos,
            dim,
            queries,
            seed,
            shard_file,
        }) => {
            anyhow::ensure!(
                videos > 0 && dim > 0 && queries > 0,
                "--videos, --dim and --queries must be at least 1"
            );
            println!(
                "{}",
                control_plane::shard_build::bench_shard(
                    videos,
                    dim,
                    queries,
                    seed,
                    shard_file.as_deref()
                )?
            );
        }
        Command::Bench(BenchCommand::Peers {
            python,
            tower,
            videos,
            dim,
            queries,
            shard_file,
            seed,
            rounds,
        }) => {
            let report = control_plane::peers_bench::bench_peers(
                &control_plane::peers_bench::PeersConfig {
                    python,
                    tower_dir: tower,
                    videos,
                    dim,
                    queries,
                    shard_file,
                    seed,
                    rounds,
                },
            )?;
            println!("{report}");
        }
        Command::Publish(args) => {
            let config = load_config(args.config.as_deref())?;
            let bundle = std::fs::read(&args.bundle)
                .with_context(|| format!("reading {}", args.bundle.display()))?;
            let profiles = match &args.profiles_from {
                Some(data) => {
                    let dataset = Dataset::load(data)?;
                    let (bytes, viewers) = control_plane::publish::build_profiles(
                        &dataset,
                        &config.engagement,
                        args.history_limit,
                    );
                    eprintln!("profiles: {viewers} viewers, {} bytes", bytes.len());
                    Some(bytes)
                }
                None => None,
            };
            let registry = args
                .state
                .as_ref()
                .map(|state| open_registry(state))
                .transpose()?;
            let store_location = args
                .store
                .store
                .clone()
                .context("publish needs --store (a folder or s3://bucket/prefix)")?;
            let runtime = tokio::runtime::Runtime::new()?;
            let (manifest, key) = runtime.block_on(async {
                let store = control_plane::object_store::ObjectStore::open(
                    &store_location,
                    &args.store.s3(),
                )
                .await?;
                anyhow::Ok(
                    control_plane::publish::publish_registered(
                        &store,
                        registry.as_ref(),
                        &args.channel,
                        &bundle,
                        profiles.as_deref(),
                    )
                    .await?,
                )
            })?;
            println!(
                "published {} ({}, {} bytes) to {}: {}/{key}",
                manifest.bundle.key,
                manifest.model_version,
                manifest.bundle.size,
                manifest.channel,
                store_location.trim_end_matches('/'),
            );
        }
        Command::Bundle(BundleCommand::Build(args)) => {
            let config = load_config(args.config.as_deref())?;
            let (dataset, split_dir, _) = load_split(&args.data, args.split.clone())?;
            let model = args.model.unwrap_or_else(|| split_dir.join("two-tower"));
            let ranker = args
                .ranker
                .unwrap_or_else(|| split_dir.join("ranker").join("ranker.json"));
            let hash_of = |path: &Path| {
                std::fs::read(path)
                    .map(|bytes| edge::bundle::sha256_hex(&bytes))
                    .unwrap_or_else(|_| "unknown".to_owned())
            };
            let mut lineage = vec![
                (
                    "code_version".to_owned(),
                    env!("CARGO_PKG_VERSION").to_owned(),
                ),
                ("data".to_owned(), args.data.display().to_string()),
                (
                    "data_manifest_sha256".to_owned(),
                    hash_of(&args.data.join("dataset.json")),
                ),
                (
                    "split_manifest_sha256".to_owned(),
                    hash_of(&split_dir.join("split.json")),
                ),
                (
                    "two_tower_report_sha256".to_owned(),
                    hash_of(&model.join("report.json")),
                ),
                (
                    "config_sha256".to_owned(),
                    edge::bundle::sha256_hex(config.to_toml().as_bytes()),
                ),
            ];
            lineage.extend(args.lineage.iter().cloned());
            let created_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let (bytes, built) = control_plane::bundle_build::build_bundle(
                &control_plane::bundle_build::BundleInputs {
                    dataset: &dataset,
                    two_tower: &model,
                    ranker: &ranker,
                    config: &config,
                    promoted: &args.promoted,
                    created_at,
                    lineage,
                    model_version: args.model_version.clone(),
                    shard_ef: args.shard_ef.map(|ef| ef as usize),
                },
            )?;
            let out = args.out.unwrap_or_else(|| split_dir.join("bundles"));
            std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
            let path = out.join(format!("{}.bundle", built.sha256));
            let temporary = control_plane::parquet_io::temporary_path(&path);
            std::fs::write(&temporary, &bytes).with_context(|| temporary.display().to_string())?;
            std::fs::rename(&temporary, &path).with_context(|| path.display().to_string())?;
            for (section, length) in &built.sections {
                println!("  {section:<14} {length:>12} bytes");
            }
            println!(
                "bundle {} ({} bytes, model version {}) -> {}",
                built.sha256,
                built.bytes,
                built.model_version,
                path.display()
            );
        }
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_new(&args.log_level)
                        .with_context(|| format!("log level {:?}", args.log_level))?,
                )
                .with_writer(std::io::stderr)
                .init();
            let s3 = args.store.s3();
            let options = control_plane::serve::ServeOptions {
                listen: args.listen,
                store: args.store.location_or_state(&args.state),
                state: args.state,
                s3,
                token: args.token,
                max_artifact_bytes: args.max_artifact_mb << 20,
                max_body_bytes: args.max_body_mb << 20,
                www: args.www,
            };
            tokio::runtime::Runtime::new()?.block_on(control_plane::serve::serve(options))?;
        }
        Command::Drift {
            data,
            model_version,
            threshold,
            state,
        } => {
            let registry = existing_registry(&state)?;
            let dataset = Dataset::load(&data)?;
            let mut skipped = 0;
            let served: Vec<control_plane::ingest::InferenceEvent> =
                control_plane::feedback::all_events(
                    &registry,
                    control_plane::registry::EventKind::Inference,
                    &mut skipped,
                )?;
            let report = control_plane::drift::drift_report(
                &dataset,
                &data.display().to_string(),
                &served,
                model_version.as_deref(),
                threshold,
            );
            println!(
                "{} served requests against {} training rows of {}",
                report.serving_requests, report.training_rows, report.data
            );
            for feature in &report.features {
                println!(
                    "  {:<10} PSI {:>7.4}{}",
                    feature.feature,
                    feature.psi,
                    if feature.alert { "  ALERT" } else { "" }
                );
            }
            for alert in &report.alerts {
                println!("alert: {alert}");
            }
        }
        Command::Feedback(FeedbackCommand::Merge { base, out, state }) => {
            let registry = existing_registry(&state)?;
            let report = control_plane::feedback::merge(&registry, &base, &out)?;
            println!(
                "merged {} responses and {} interactions into {}: {} labeled rows ({} engaged), {} interaction rows added, {} events skipped; data version {}",
                report.inferences,
                report.interactions,
                report.out,
                report.labeled,
                report.engaged,
                report.rows_added,
                report.skipped,
                report.data_version.sha256
            );
        }
        Command::Experiments(ExperimentsCommand::Analyze {
            name,
            state,
            control,
            min_sample,
            json,
        }) => {
            let registry = existing_registry(&state)?;
            let outcomes = registry.arm_outcomes(Some(&name))?;
            let analysis = control_plane::experiments::analyze(
                &name,
                outcomes,
                control.as_deref(),
                min_sample,
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&analysis)?);
            } else {
                println!(
                    "{:<20} {:>9} {:>11} {:>7} {:>7} {:>9} {:>10} {:>9}  95% CI of the CTR difference",
                    "arm", "responses", "impressions", "clicks", "CTR", "watch", "CTR lift", "p"
                );
                for arm in &analysis.arms {
                    let versus = arm.versus_control.first();
                    println!(
                        "{:<20} {:>9} {:>11} {:>7} {:>7.4} {:>9.4} {:>10} {:>9}  {}",
                        arm.outcome.arm,
                        arm.outcome.responses,
                        arm.outcome.impressions,
                        arm.outcome.clicks,
                        arm.ctr,
                        arm.watch_rate,
                        versus
                            .and_then(|c| c.lift)
                            .map_or("-".to_owned(), |lift| format!("{:+.1}%", lift * 100.0)),
                        versus.map_or("(control)".to_owned(), |c| format!("{:.4}", c.p_value)),
                        versus.map_or(String::new(), |c| format!(
                            "[{:+.4}, {:+.4}]",
                            c.ci95.0, c.ci95.1
                        )),
                    );
                }
                for warning in &analysis.warnings {
                    println!("warning: {warning}");
                }
            }
        }
        Command::Pipeline(PipelineCommand::Run(args)) => {
            use control_plane::pipeline::{self, PipelineContext, RunRecord, RunStatus};
            let registry = open_registry(&args.state)?;
            let context = PipelineContext {
                exe: std::env::current_exe().context("finding this program")?,
                store: args.store.location_or_state(&args.state),
                s3: args.store.s3(),
                state: args.state.clone(),
                echo: true,
            };
            let record = match &args.resume {
                Some(id) => {
                    let record = registry
                        .run(id)?
                        .with_context(|| format!("no run {id} in {}", args.state.display()))?;
                    anyhow::ensure!(
                        record.status != RunStatus::Succeeded,
                        "run {id} succeeded already"
                    );
                    record
                }
                None => {
                    let data = args.data.clone().expect("clap requires --data");
                    control_plane::data::read_manifest(&data)?;
                    if let Some(channel) = &args.publish {
                        control_plane::publish::check_channel(channel)?;
                    }
                    pipeline::check_idle(&registry)?;
                    let config = load_config(args.config.as_deref())?;
                    RunRecord::new(
                        pipeline::new_run_id(),
                        &data,
                        &config,
                        args.title_model.as_deref(),
                        args.publish.clone(),
                    )
                }
            };
            println!(
                "run {} on {} -> {}",
                record.id,
                record.data,
                context.run_dir(&record.id).display()
            );
            let record = pipeline::run(&context, &registry, record)?;
            println!(
                "run {} {} in {:.1} s{}",
                record.id,
                record.status.as_str(),
                record.seconds,
                record
                    .bundle
                    .as_ref()
                    .map(|sha| format!("; bundle {sha}"))
                    .unwrap_or_default()
            );
            if let Some(error) = record.error {
                anyhow::bail!("{error}");
            }
        }
        Command::Config(ConfigCommand::Show { file }) => {
            print!("{}", load_config(file.as_deref())?.to_toml());
        }
    }
    Ok(())
}
