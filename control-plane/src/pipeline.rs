//! The seed's ML pipeline as one resumable run: preprocess and validate, feature
//! engineering, two-tower training, video embeddings, shard build, ranker training,
//! evaluation, registration, and (optionally) publishing to a channel.
//!
//! Each training stage runs this binary's own subcommand (`split`, `preprocess`,
//! `train two-tower`, ...) as a child process in the run's folder
//! (`STATE/runs/<id>/`), so the pipeline is exactly the command line a person would
//! type, a crash in one stage cannot corrupt the runner, and the log of every stage is
//! kept (`logs/<stage>.log`). Registration and publishing run in process against the
//! registry and the store. After every stage the run record in the registry is updated,
//! so `pipeline run --resume <id>` (or a look at `GET /runs/<id>`) knows what is done; a
//! failed stage marks the run failed with the stage's last output as the reason, and
//! publishing happens only after every other stage succeeded, so a failure leaves the
//! channel serving what it served.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::object_store::{ObjectStore, S3Options};
use crate::publish::now_seconds;
use crate::registry::{BundleRecord, Registry};

/// The stages, in order.
pub const STAGES: [&str; 9] = [
    "preprocess",
    "features",
    "two_tower",
    "embeddings",
    "shard",
    "ranker",
    "evaluation",
    "registration",
    "publish",
];

/// A run's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Created, not started.
    Queued,
    /// A stage is running.
    Running,
    /// Every stage succeeded.
    Succeeded,
    /// A stage failed (see `error`).
    Failed,
}

impl RunStatus {
    /// Its name in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// A stage's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Not reached yet.
    Pending,
    /// Running now.
    Running,
    /// Finished.
    Done,
    /// Failed.
    Failed,
    /// Not asked for (publishing without a channel).
    Skipped,
}

/// One stage of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageRecord {
    /// One of [`STAGES`].
    pub name: String,
    /// Its state.
    pub status: StageStatus,
    /// Wall time, seconds.
    pub seconds: Option<f64>,
    /// Files it wrote, relative to the run folder.
    pub outputs: Vec<String>,
    /// What it did, in a line.
    pub note: Option<String>,
}

/// A pipeline run, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    /// `run-<unix seconds>-<random>`.
    pub id: String,
    /// Its state.
    pub status: RunStatus,
    /// The data set folder.
    pub data: String,
    /// The configuration (TOML, every key resolved).
    pub config: String,
    /// The title model folder, if any.
    pub title_model: Option<String>,
    /// The channel to publish to when every stage succeeded.
    pub publish: Option<String>,
    /// The data version (content hash) trained on.
    pub data_version: Option<String>,
    /// The control plane's version that ran it.
    pub code_version: String,
    /// The run whose bundle the publish channel served when this one started.
    pub parent_run: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub finished_at: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The stages, in order.
    pub stages: Vec<StageRecord>,
    /// The bundle it registered.
    pub bundle: Option<String>,
    /// Evaluation reports (`retrieval`, `ranking`).
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    /// Wall time of the whole run so far, seconds.
    pub seconds: f64,
}

/// A data version: a data set's content hash with its counts and time range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DataVersion {
    /// sha256 over `dataset.json`, every table file and the feedback labels, in name
    /// order.
    pub sha256: String,
    /// The folder it was read from.
    pub path: String,
    /// Where the data came from (synthetic, movielens-100k, csv, ...).
    pub source: String,
    /// Users.
    pub users: u64,
    /// Videos.
    pub videos: u64,
    /// Interactions.
    pub interactions: u64,
    /// Earliest and latest interaction, Unix seconds.
    #[schema(value_type = Option<Vec<i64>>)]
    pub time_range: Option<(i64, i64)>,
    /// Unix seconds.
    pub registered_at: i64,
}

/// A new run id.
pub fn new_run_id() -> String {
    use rand::TryRngCore;
    let mut random = [0u8; 3];
    let _ = rand::rngs::OsRng.try_fill_bytes(&mut random);
    format!(
        "run-{}-{:02x}{:02x}{:02x}",
        now_seconds(),
        random[0],
        random[1],
        random[2]
    )
}

/// Whether `id` has the shape of a run id (it names a folder).
pub fn is_run_id(id: &str) -> bool {
    id.len() <= 64
        && id.starts_with("run-")
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Hashes a data set folder into a data version.
pub fn data_version(dir: &Path) -> anyhow::Result<DataVersion> {
    use sha2::{Digest, Sha256};
    let manifest = crate::data::read_manifest(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .is_some_and(|e| e == "parquet" || e == "json" || e == "csv")
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for path in &files {
        let name = path.file_name().expect("a file name").to_string_lossy();
        hasher.update(name.as_bytes());
        hasher.update([0]);
        let mut file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    let sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(DataVersion {
        sha256,
        path: dir.display().to_string(),
        source: manifest.source,
        users: manifest.counts.users,
        videos: manifest.counts.videos,
        interactions: manifest.counts.interactions,
        time_range: manifest.time_range,
        registered_at: now_seconds(),
    })
}

impl RunRecord {
    /// A queued run.
    pub fn new(
        id: String,
        data: &Path,
        config: &crate::config::Config,
        title_model: Option<&Path>,
        publish: Option<String>,
    ) -> Self {
        Self {
            id,
            status: RunStatus::Queued,
            data: data.display().to_string(),
            config: config.to_toml(),
            title_model: title_model.map(|p| p.display().to_string()),
            publish,
            data_version: None,
            code_version: env!("CARGO_PKG_VERSION").to_owned(),
            parent_run: None,
            created_at: now_seconds(),
            finished_at: None,
            error: None,
            stages: STAGES
                .iter()
                .map(|name| StageRecord {
                    name: (*name).to_owned(),
                    status: StageStatus::Pending,
                    seconds: None,
                    outputs: Vec::new(),
                    note: None,
                })
                .collect(),
            bundle: None,
            metrics: serde_json::Value::Null,
            seconds: 0.0,
        }
    }

    fn stage(&mut self, name: &str) -> &mut StageRecord {
        self.stages
            .iter_mut()
            .find(|stage| stage.name == name)
            .expect("a known stage")
    }
}

/// Where a run reads and writes.
#[derive(Debug, Clone)]
pub struct PipelineContext {
    /// This binary, whose subcommands are the stages.
    pub exe: PathBuf,
    /// The registry folder (`STATE`).
    pub state: PathBuf,
    /// The object store for registration and publishing.
    pub store: String,
    /// S3 options for it.
    pub s3: S3Options,
    /// Print stage output as it comes (a person at a terminal, or the server's log).
    pub echo: bool,
}

impl PipelineContext {
    /// The folder of run `id`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.state.join("runs").join(id)
    }
}

struct Paths {
    run: PathBuf,
    split: PathBuf,
    config: PathBuf,
}

impl Paths {
    fn of(context: &PipelineContext, id: &str) -> Self {
        let run = context.run_dir(id);
        Self {
            split: run.join("split"),
            config: run.join("config.toml"),
            run,
        }
    }
}

/// Runs a child command with its output teed into `log` (and echoed), returning the
/// last lines on failure.
fn run_child(
    exe: &Path,
    args: &[OsString],
    log: &Path,
    echo: bool,
) -> Result<Vec<String>, Vec<String>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| vec![format!("cannot open {}: {e}", log.display())])?;
    let shared = Arc::new(Mutex::new((file, VecDeque::<String>::new())));
    let mut child = match Command::new(exe)
        .args(args)
        .env(
            "CANDLE_NUM_THREADS",
            std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "1".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Err(vec![format!("cannot start {}: {e}", exe.display())]),
    };
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let shared = shared.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
            {
                let mut guard = shared.lock().expect("log lock");
                let (file, tail) = &mut *guard;
                let _ = writeln!(file, "{line}");
                if echo {
                    println!("    {line}");
                }
                tail.push_back(line);
                if tail.len() > 20 {
                    tail.pop_front();
                }
            }
        })
    })
    .collect();
    let status = child.wait();
    for reader in readers {
        let _ = reader.join();
    }
    let tail: Vec<String> = shared.lock().expect("log lock").1.iter().cloned().collect();
    match status {
        Ok(status) if status.success() => Ok(tail),
        Ok(status) => {
            let mut tail = tail;
            tail.push(format!("exit status {status}"));
            Err(tail)
        }
        Err(e) => Err(vec![format!("waiting for the stage: {e}")]),
    }
}

fn os(items: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    items.iter().map(|item| item.as_ref().to_owned()).collect()
}

/// The child commands of a stage (empty for stages that another stage's command
/// performs, or that run in process).
fn stage_commands(stage: &str, record: &RunRecord, paths: &Paths) -> Vec<Vec<OsString>> {
    let data = PathBuf::from(&record.data);
    let common = |mut args: Vec<OsString>, title: bool| {
        args.extend(os(&[&"--config", &paths.config]));
        if title && let Some(model) = &record.title_model {
            args.extend(os(&[&"--title-model", model]));
        }
        args
    };
    let model = paths.split.join("two-tower");
    match stage {
        "preprocess" => vec![common(
            os(&[&"split", &"--data", &data, &"--out", &paths.split]),
            false,
        )],
        "features" => vec![common(
            os(&[&"preprocess", &"--data", &data, &"--split", &paths.split]),
            false,
        )],
        "two_tower" => vec![common(
            os(&[
                &"train",
                &"two-tower",
                &"--data",
                &data,
                &"--split",
                &paths.split,
            ]),
            true,
        )],
        "ranker" => vec![common(
            os(&[
                &"train",
                &"ranker",
                &"--data",
                &data,
                &"--split",
                &paths.split,
            ]),
            true,
        )],
        "evaluation" => vec![
            common(
                os(&[
                    &"eval",
                    &"retrieval",
                    &"--data",
                    &data,
                    &"--split",
                    &paths.split,
                    &"--model",
                    &model,
                    &"--out",
                    &paths.run.join("eval-retrieval.json"),
                ]),
                true,
            ),
            common(
                os(&[
                    &"eval",
                    &"ranking",
                    &"--data",
                    &data,
                    &"--split",
                    &paths.split,
                    &"--out",
                    &paths.run.join("eval-ranking.json"),
                ]),
                true,
            ),
        ],
        "registration" => {
            let mut args = os(&[
                &"bundle",
                &"build",
                &"--data",
                &data,
                &"--split",
                &paths.split,
                &"--out",
                &paths.run.join("bundles"),
                &"--model-version",
                &record.id,
                &"--lineage",
                &format!("run={}", record.id),
            ]);
            if let Some(version) = &record.data_version {
                args.extend(os(&[&"--lineage", &format!("data_version={version}")]));
            }
            if let Some(parent) = &record.parent_run {
                args.extend(os(&[&"--lineage", &format!("parent_run={parent}")]));
            }
            vec![common(args, false)]
        }
        _ => Vec::new(),
    }
}

/// What a stage leaves behind, relative to the run folder.
fn stage_outputs(stage: &str) -> &'static [&'static str] {
    match stage {
        "preprocess" => &["split/split.json"],
        "features" => &["split/preprocessor.msgpack"],
        "two_tower" => &[
            "split/two-tower/report.json",
            "split/two-tower/user_tower.onnx",
        ],
        "embeddings" | "shard" => &["split/two-tower/shard.bin"],
        "ranker" => &["split/ranker/ranker.json"],
        "evaluation" => &["eval-retrieval.json", "eval-ranking.json"],
        _ => &[],
    }
}

fn save(registry: &Registry, record: &RunRecord) -> anyhow::Result<()> {
    registry
        .save_run(record)
        .with_context(|| format!("recording run {}", record.id))
}

/// Runs (or resumes) the run `record.id`: every stage not done yet, in order. Returns
/// the final record; a failed stage is a failed run (`Ok` with status `Failed`), an
/// error is a failure of the runner itself (registry, disk).
pub fn run(
    context: &PipelineContext,
    registry: &Registry,
    mut record: RunRecord,
) -> anyhow::Result<RunRecord> {
    let paths = Paths::of(context, &record.id);
    std::fs::create_dir_all(paths.run.join("logs"))
        .with_context(|| format!("creating {}", paths.run.display()))?;
    crate::object_store::write_durably(&paths.config, record.config.as_bytes())
        .with_context(|| format!("writing {}", paths.config.display()))?;
    let started = Instant::now();
    let seconds_before = record.seconds;
    record.status = RunStatus::Running;
    record.error = None;
    record.finished_at = None;
    if record.parent_run.is_none()
        && let Some(channel) = &record.publish
        && let Some(current) = registry.channel(channel)?
        && let Some(bundle) = registry.bundle(&current.current.bundle.sha256)?
    {
        record.parent_run = bundle.lineage.get("run").cloned();
    }
    save(registry, &record)?;
    let total = STAGES.len();
    for (index, stage) in STAGES.iter().enumerate() {
        let done = record.stage(stage).status == StageStatus::Done
            && stage_outputs(stage)
                .iter()
                .all(|output| paths.run.join(output).exists());
        if done {
            println!("== {}/{total} {stage}: done earlier", index + 1);
            continue;
        }
        if *stage == "publish" && record.publish.is_none() {
            record.stage(stage).status = StageStatus::Skipped;
            save(registry, &record)?;
            continue;
        }
        println!("== {}/{total} {stage}", index + 1);
        record.stage(stage).status = StageStatus::Running;
        save(registry, &record)?;
        let stage_started = Instant::now();
        let outcome = run_stage(context, registry, &mut record, &paths, stage);
        let seconds = stage_started.elapsed().as_secs_f64();
        record.seconds = seconds_before + started.elapsed().as_secs_f64();
        let entry = record.stage(stage);
        entry.seconds = Some(seconds);
        match outcome {
            Ok(note) => {
                entry.status = StageStatus::Done;
                entry.outputs = stage_outputs(stage)
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                println!("   {stage} done in {seconds:.1} s: {note}");
                entry.note = Some(note);
                save(registry, &record)?;
            }
            Err(reason) => {
                entry.status = StageStatus::Failed;
                record.status = RunStatus::Failed;
                record.error = Some(format!("stage {stage}: {reason}"));
                record.finished_at = Some(now_seconds());
                println!("   {stage} FAILED after {seconds:.1} s: {reason}");
                save(registry, &record)?;
                return Ok(record);
            }
        }
    }
    record.status = RunStatus::Succeeded;
    record.finished_at = Some(now_seconds());
    record.seconds = seconds_before + started.elapsed().as_secs_f64();
    save(registry, &record)?;
    Ok(record)
}

fn run_stage(
    context: &PipelineContext,
    registry: &Registry,
    record: &mut RunRecord,
    paths: &Paths,
    stage: &str,
) -> Result<String, String> {
    match stage {
        "preprocess" => {
            // Validation is loading: keys, references and ranges are checked on read.
            let version = data_version(Path::new(&record.data)).map_err(|e| format!("{e:#}"))?;
            registry
                .add_data_version(&version)
                .map_err(|e| e.to_string())?;
            record.data_version = Some(version.sha256.clone());
            let tail = run_commands(context, record, paths, stage)?;
            Ok(format!(
                "data version {} ({} users, {} videos, {} interactions); {}",
                &version.sha256[..12],
                version.users,
                version.videos,
                version.interactions,
                tail
            ))
        }
        "embeddings" => Ok(
            "the video tower's embeddings of the catalogue, computed by two_tower into shard.bin"
                .to_owned(),
        ),
        "shard" => Ok(
            "the HNSW shard over them, built and calibrated by two_tower (shard.bin)".to_owned(),
        ),
        "evaluation" => {
            let tail = run_commands(context, record, paths, stage)?;
            let read = |name: &str| {
                std::fs::read(paths.run.join(name))
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                    .unwrap_or(serde_json::Value::Null)
            };
            record.metrics = serde_json::json!({
                "retrieval": read("eval-retrieval.json"),
                "ranking": read("eval-ranking.json"),
            });
            Ok(tail)
        }
        "registration" => {
            run_commands(context, record, paths, stage)?;
            let bundle = std::fs::read_dir(paths.run.join("bundles"))
                .map_err(|e| format!("no bundles folder: {e}"))?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .find(|path| path.extension().is_some_and(|e| e == "bundle"))
                .ok_or("bundle build wrote no bundle")?;
            let bytes = std::fs::read(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            let artifact = runtime.block_on(async {
                let store = ObjectStore::open(&context.store, &context.s3)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                crate::publish::put_artifact(&store, "bundles", "bundle", &bytes)
                    .await
                    .map_err(|e| e.to_string())
            })?;
            let header = edge::bundle::BundleView::parse(&bytes)
                .map_err(|e| e.to_string())?
                .header;
            registry
                .add_bundle(&BundleRecord::new(&header, &artifact, now_seconds()))
                .map_err(|e| e.to_string())?;
            record.bundle = Some(artifact.sha256.clone());
            Ok(format!(
                "bundle {} ({} bytes) registered and stored at {}",
                artifact.sha256, artifact.size, artifact.key
            ))
        }
        "publish" => {
            let channel = record.publish.clone().ok_or("no channel")?;
            let sha256 = record.bundle.clone().ok_or("no registered bundle")?;
            let path = paths.run.join("bundles").join(format!("{sha256}.bundle"));
            let bundle = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // Profiles from the run's data set, so hosts personalize known viewers.
            let config = crate::config::Config::parse(&record.config).map_err(|e| e.to_string())?;
            let dataset =
                crate::data::Dataset::load(Path::new(&record.data)).map_err(|e| e.to_string())?;
            let (profiles, viewers) =
                crate::publish::build_profiles(&dataset, &config.engagement, 200);
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            let (manifest, _) = runtime.block_on(async {
                let store = ObjectStore::open(&context.store, &context.s3)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                crate::publish::publish_registered(
                    &store,
                    Some(registry),
                    &channel,
                    &bundle,
                    Some(&profiles),
                )
                .await
                .map_err(|e| format!("{e:#}"))
            })?;
            Ok(format!(
                "{} now serves {} ({viewers} viewer profiles)",
                channel, manifest.model_version
            ))
        }
        _ => run_commands(context, record, paths, stage),
    }
}

fn run_commands(
    context: &PipelineContext,
    record: &RunRecord,
    paths: &Paths,
    stage: &str,
) -> Result<String, String> {
    let log = paths.run.join("logs").join(format!("{stage}.log"));
    let mut last = String::new();
    for args in stage_commands(stage, record, paths) {
        match run_child(&context.exe, &args, &log, context.echo) {
            Ok(tail) => last = tail.last().cloned().unwrap_or_default(),
            Err(tail) => {
                let start = tail.len().saturating_sub(5);
                return Err(format!(
                    "{} (log: {})",
                    tail[start..].join(" | "),
                    log.display()
                ));
            }
        }
    }
    Ok(last)
}

/// Refuses to start a run while another is running (two trainings on one machine slow
/// each other down and fight over the cores).
pub fn check_idle(registry: &Registry) -> anyhow::Result<()> {
    if let Some(running) = registry
        .runs()?
        .into_iter()
        .find(|run| matches!(run.status, RunStatus::Running | RunStatus::Queued))
    {
        bail!(
            "run {} is still queued or running; wait for it, or resume it if its process died",
            running.id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_name_folders_safely() {
        let id = new_run_id();
        assert!(is_run_id(&id), "{id}");
        for bad in [
            "",
            "run-../x",
            "RUN-1",
            "run-1/2",
            "x-1",
            &format!("run-{}", "1".repeat(70)),
        ] {
            assert!(!is_run_id(bad), "{bad}");
        }
    }

    #[test]
    fn every_stage_has_work_or_says_who_does_it() {
        let context = PipelineContext {
            exe: PathBuf::from("control-plane"),
            state: PathBuf::from("/state"),
            store: "/store".into(),
            s3: S3Options::default(),
            echo: false,
        };
        let record = RunRecord::new(
            "run-1-aaaaaa".into(),
            Path::new("/data"),
            &crate::config::Config::default(),
            None,
            None,
        );
        let paths = Paths::of(&context, &record.id);
        for stage in STAGES {
            let commands = stage_commands(stage, &record, &paths);
            let in_process = matches!(stage, "embeddings" | "shard" | "publish");
            assert_eq!(commands.is_empty(), in_process, "{stage}");
            for command in commands {
                assert!(command.iter().any(|arg| arg == "--config"), "{stage}");
            }
        }
    }
}
