//! Official CatBoost trained on the same rows with the same parameters as our trainer,
//! so a report can put the two side by side (quality and training time). It runs a Python
//! interpreter with the `catboost` package (`cargo xtask test` installs one); the product
//! never needs it.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use edge::ranker::FeatureValue;
use edge::ranker::features::ColumnKind;

use crate::config::RankerConfig;
use crate::ranker_data::{RankerSet, column_kinds};

const SCRIPT: &str = include_str!("referee/catboost_rank.py");

/// What official CatBoost did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CatBoostRun {
    /// Wall time of `fit` alone (no data loading).
    pub seconds: f64,
    /// Trees kept (the best validation iteration).
    pub trees: usize,
    /// Raw scores of the candidate rows.
    pub predictions: Vec<f64>,
}

/// Why the side-by-side run failed.
#[derive(Debug, thiserror::Error)]
pub enum SideBySideError {
    /// Writing the rows or reading the answer failed.
    #[error("catboost side-by-side: {0}")]
    Io(#[from] std::io::Error),
    /// The interpreter failed (e.g. no `catboost` package).
    #[error("catboost side-by-side: {python} failed ({status}): {stderr}")]
    Python {
        /// The interpreter.
        python: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The answer was not what the script writes.
    #[error("catboost side-by-side: unreadable answer: {0}")]
    Answer(#[from] serde_json::Error),
}

fn write_rows(path: &Path, set: &RankerSet) -> std::io::Result<()> {
    let width = column_kinds().len();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (row, values) in set.values.chunks_exact(width).enumerate() {
        write!(out, "{}\t{}", set.labels[row], set.groups[row])?;
        for value in values {
            match value {
                // CatBoost hashes the string again: any injective spelling of ours will do.
                FeatureValue::Cat(cat) => write!(out, "\t{}", cat.0)?,
                FeatureValue::Float(x) => write!(out, "\t{x}")?,
            }
        }
        writeln!(out)?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Trains official CatBoost with `config`'s parameters on `train` (early stopping on
/// `validation`) and predicts `candidates`; one thread, as our trainer.
pub fn train_official_catboost(
    python: &Path,
    train: &RankerSet,
    validation: &RankerSet,
    candidates: &RankerSet,
    config: &RankerConfig,
) -> Result<CatBoostRun, SideBySideError> {
    let dir = tempfile::tempdir()?;
    let cat_columns: Vec<usize> = column_kinds()
        .iter()
        .enumerate()
        .filter(|(_, kind)| **kind == ColumnKind::Categorical)
        .map(|(column, _)| column)
        .collect();
    let params = serde_json::json!({
        "loss_function": config.loss,
        "iterations": config.iterations,
        "learning_rate": config.learning_rate,
        "depth": config.depth,
        "l2_leaf_reg": config.l2_leaf_reg,
        "border_count": config.border_count,
        "one_hot_max_size": config.one_hot_max_size,
        "random_seed": config.seed,
        "od_type": "Iter",
        "od_wait": config.early_stopping_rounds,
        "use_best_model": config.use_best_model && !validation.is_empty(),
        "thread_count": 1,
        "verbose": false,
        "allow_writing_files": false,
        "cat_columns": cat_columns,
    });
    let file = |name: &str| dir.path().join(name);
    std::fs::write(file("params.json"), params.to_string())?;
    std::fs::write(file("catboost_rank.py"), SCRIPT)?;
    write_rows(&file("train.tsv"), train)?;
    write_rows(&file("validation.tsv"), validation)?;
    write_rows(&file("candidates.tsv"), candidates)?;
    let output = Command::new(python)
        .arg(file("catboost_rank.py"))
        .args(
            [
                "params.json",
                "train.tsv",
                "validation.tsv",
                "candidates.tsv",
                "out.json",
            ]
            .map(file),
        )
        .output()?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(SideBySideError::Python {
            python: python.display().to_string(),
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    Ok(serde_json::from_slice(&std::fs::read(file("out.json"))?)?)
}
