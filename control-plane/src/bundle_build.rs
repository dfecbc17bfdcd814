//! `control-plane bundle build`: the serving artifacts in one bundle (`edge::bundle`),
//! checked by reading every section back the way the edge will before it is written.

use std::path::{Path, PathBuf};

use edge::bundle::{BundleBuilder, BundleView, SectionKind, sha256_hex};
use edge::catalog::Catalog;
use edge::preprocess::Preprocessor;
use edge::ranker::RankerModel;
use edge::ranker::features::COLUMNS;
use edge::rules::Experiments;
use edge::shard::Shard;
use edge::tower::{UserTower, UserTowerSpec};

use crate::config::Config;
use crate::data::Dataset;

/// Where the parts of a bundle come from.
pub struct BundleInputs<'a> {
    /// The data set (its videos and channels become the catalogue).
    pub dataset: &'a Dataset,
    /// A folder written by `train two-tower`: `user_tower.onnx`, `shard.bin`,
    /// `preprocessor.msgpack`.
    pub two_tower: &'a Path,
    /// A ranker in CatBoost's JSON format (`train ranker` writes `ranker.json`).
    pub ranker: &'a Path,
    /// Rules and experiments.
    pub config: &'a Config,
    /// Videos the business promotes.
    pub promoted: &'a [u64],
    /// Unix seconds of the build.
    pub created_at: i64,
    /// Lineage facts recorded in the header.
    pub lineage: Vec<(String, String)>,
    /// The model version; derived from the time and the sections' hashes when `None`.
    pub model_version: Option<String>,
    /// A default beam width for the shard instead of the one it records (its
    /// calibration); recorded in the lineage when set.
    pub shard_ef: Option<usize>,
}

/// What was built.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuiltBundle {
    /// The bundle's sha256 (its content address).
    pub sha256: String,
    /// Its model version.
    pub model_version: String,
    /// Total bytes.
    pub bytes: usize,
    /// Bytes per section.
    pub sections: Vec<(String, u64)>,
}

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleBuildError {
    /// An input file is missing or unreadable.
    #[error("{path}: {cause} ({hint})")]
    Input {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
        /// What produces it.
        hint: &'static str,
    },
    /// A part does not load as the edge would load it.
    #[error("{part}: {cause}")]
    Part {
        /// Which part.
        part: &'static str,
        /// Why.
        cause: edge::Error,
    },
    /// The parts do not fit together.
    #[error("{0}")]
    Mismatch(String),
}

fn read(path: &Path, hint: &'static str) -> Result<Vec<u8>, BundleBuildError> {
    std::fs::read(path).map_err(|cause| BundleBuildError::Input {
        path: path.to_owned(),
        cause,
        hint,
    })
}

fn part(part: &'static str) -> impl Fn(edge::Error) -> BundleBuildError {
    move |cause| BundleBuildError::Part { part, cause }
}

/// Assembles, verifies and returns the bundle's bytes with a summary.
pub fn build_bundle(inputs: &BundleInputs<'_>) -> Result<(Vec<u8>, BuiltBundle), BundleBuildError> {
    const TRAIN_TOWER: &str = "written by `control-plane train two-tower`";
    let tower = read(&inputs.two_tower.join("user_tower.onnx"), TRAIN_TOWER)?;
    let shard_bytes = read(&inputs.two_tower.join("shard.bin"), TRAIN_TOWER)?;
    let preprocessor_bytes = read(&inputs.two_tower.join("preprocessor.msgpack"), TRAIN_TOWER)?;
    let report = read(&inputs.two_tower.join("report.json"), TRAIN_TOWER)?;
    let spec: UserTowerSpec = serde_json::from_slice::<serde_json::Value>(&report)
        .ok()
        .and_then(|report| serde_json::from_value(report["spec"].clone()).ok())
        .ok_or_else(|| {
            BundleBuildError::Mismatch(format!(
                "{}: no valid \"spec\" (retrain with `control-plane train two-tower`)",
                inputs.two_tower.join("report.json").display()
            ))
        })?;
    // The bundle's tower reads its large tables from a section of their own, in place.
    let (tower, tower_tables) =
        crate::onnx_export::cut_tower_tables(&tower, crate::onnx_export::INT8_MIN_ROWS)
            .map_err(|e| BundleBuildError::Mismatch(format!("user_tower.onnx: {e}")))?;
    UserTower::load_with_tables(&tower, Some(tower_tables.clone()), spec.clone())
        .map_err(part("user_tower.onnx"))?;
    let ranker_bytes = read(inputs.ranker, "written by `control-plane train ranker`")?;

    // Every part loads as the edge will load it, and the parts agree with each other.
    let mut shard = Shard::open(shard_bytes).map_err(part("shard.bin"))?;
    if let Some(ef) = inputs.shard_ef {
        shard = shard.with_search_ef(ef).map_err(part("shard.bin"))?;
    }
    if shard.dim() != spec.output_dim {
        return Err(BundleBuildError::Mismatch(format!(
            "the shard holds {}-d vectors, the user tower outputs {}-d ones",
            shard.dim(),
            spec.output_dim
        )));
    }
    Preprocessor::from_bytes(&preprocessor_bytes).map_err(part("preprocessor.msgpack"))?;
    let ranker_text = std::str::from_utf8(&ranker_bytes).map_err(|e| {
        BundleBuildError::Mismatch(format!("{}: not UTF-8 JSON: {e}", inputs.ranker.display()))
    })?;
    let ranker = RankerModel::from_catboost_json(ranker_text).map_err(part("ranker"))?;
    if ranker.row_width() > COLUMNS.len() {
        return Err(BundleBuildError::Mismatch(format!(
            "{}: the model reads {} columns, the edge's ranker row has {}",
            inputs.ranker.display(),
            ranker.row_width(),
            COLUMNS.len()
        )));
    }
    let catalog = Catalog::build(
        &inputs.dataset.videos,
        &inputs.dataset.channels,
        inputs.promoted,
    )
    .map_err(part("videos"))?;
    if let Some(&id) = shard
        .video_ids()
        .iter()
        .find(|&&id| catalog.get(id).is_none())
    {
        return Err(BundleBuildError::Mismatch(format!(
            "the shard holds video {id}, which the data set's catalogue lacks (was the two-tower model trained on another data set?)"
        )));
    }
    if let Some(&id) = inputs
        .promoted
        .iter()
        .find(|&&id| catalog.get(id).is_none())
    {
        return Err(BundleBuildError::Mismatch(format!(
            "promoted video {id} is not in the catalogue"
        )));
    }
    let experiments = Experiments {
        experiments: inputs.config.experiments.clone(),
    };
    experiments
        .validate()
        .map_err(|e| BundleBuildError::Mismatch(format!("experiments: {e}")))?;
    inputs
        .config
        .rules
        .validate()
        .map_err(|e| BundleBuildError::Mismatch(format!("rules: {e}")))?;

    let sections = [
        (SectionKind::UserTower, tower),
        (SectionKind::TowerTables, tower_tables.to_bytes()),
        (SectionKind::TowerSpec, spec.to_bytes()),
        // Opening validated the shard without changing its bytes.
        (SectionKind::Shard, shard.into_current_bytes()),
        // The trained JSON is the artifact other tools read; the bundle carries the form
        // that loads fastest.
        (SectionKind::Ranker, ranker.to_bytes()),
        (SectionKind::Preprocessor, preprocessor_bytes),
        (SectionKind::Videos, catalog.to_bytes()),
        (SectionKind::Rules, inputs.config.rules.to_bytes()),
        (SectionKind::Experiments, experiments.to_bytes()),
    ];
    let model_version = inputs.model_version.clone().unwrap_or_else(|| {
        let hashes: String = sections.iter().map(|(_, b)| sha256_hex(b)).collect();
        format!(
            "{}-{}",
            inputs.created_at,
            &sha256_hex(hashes.as_bytes())[..12]
        )
    });
    let mut builder = BundleBuilder::new(model_version.clone(), inputs.created_at);
    for (key, value) in &inputs.lineage {
        builder = builder.lineage(key.clone(), value.clone());
    }
    if let Some(ef) = inputs.shard_ef {
        builder = builder.lineage("shard_ef".to_owned(), ef.to_string());
    }
    for (kind, bytes) in sections {
        builder = builder.section(kind, bytes);
    }
    let bytes = builder.to_bytes().map_err(part("bundle"))?;
    let view = BundleView::parse(&bytes).map_err(part("bundle"))?;
    // The edge's own loader has the last word: what it refuses is never written.
    edge::recommend::Recommender::from_bundle(&bytes).map_err(part("bundle"))?;
    let built = BuiltBundle {
        sha256: sha256_hex(&bytes),
        model_version,
        bytes: bytes.len(),
        sections: view
            .header
            .sections
            .iter()
            .map(|s| (s.kind.name().to_owned(), s.length))
            .collect(),
    };
    Ok((bytes, built))
}
