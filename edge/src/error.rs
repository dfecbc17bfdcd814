use std::fmt;

/// Errors of the `edge` crate. Each variant names what failed so that a host can turn it
/// into a `{code, message}` answer without parsing text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An artifact's bytes could not be decoded.
    #[error("cannot decode {artifact}: {message}")]
    Decode {
        /// Which artifact, e.g. `preprocessor`.
        artifact: &'static str,
        /// What the decoder reported.
        message: String,
    },
    /// An artifact was written by a format version that this build cannot read.
    #[error("{artifact} has format version {found}, this build reads version {expected}")]
    FormatVersion {
        /// Which artifact.
        artifact: &'static str,
        /// The version found in the bytes.
        found: u32,
        /// The version this build writes and reads.
        expected: u32,
    },
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Fitting was asked to learn from nothing.
    #[error("cannot fit {what}: {reason}")]
    EmptyInput {
        /// What was being fitted.
        what: &'static str,
        /// Why the input is unusable.
        reason: String,
    },
    /// Bytes given to `Shard::open` are not a shard this build can search: truncated,
    /// corrupted, or structurally inconsistent.
    #[error("invalid shard: {reason}")]
    InvalidShard {
        /// What is wrong, e.g. `layer 0, point 17: neighbour 900 is not below the point count 500`.
        reason: String,
    },
    /// `ShardWriter` was given ids, vectors or a graph it cannot turn into a shard.
    #[error("cannot write shard: {reason}")]
    InvalidShardInput {
        /// What is wrong with the input.
        reason: String,
    },
    /// A query vector does not have the shard's number of dimensions.
    #[error("query has {found} dimensions, the shard has {expected}")]
    DimensionMismatch {
        /// The shard's dimension.
        expected: usize,
        /// The query's length.
        found: usize,
    },
    /// A ranker model is inconsistent or uses a part this evaluator cannot apply exactly.
    #[error("invalid ranker model: {reason}")]
    InvalidRanker {
        /// What is wrong, naming the part, e.g. `oblivious_trees[3]: split_index 99 is out of range`.
        reason: String,
    },
    /// Rows given to the ranker do not fit its columns.
    #[error("ranker input does not fit the model: {reason}")]
    InvalidRankerInput {
        /// What is wrong, e.g. `row 0, column 1 (categorical feature 0) holds a number`.
        reason: String,
    },
    /// Bytes given as a bundle are not one this build can serve from.
    #[error("invalid bundle: {}", match section {
        Some(section) => format!("section `{section}` {reason}"),
        None => reason.clone(),
    })]
    InvalidBundle {
        /// The section at fault, if one is.
        section: Option<&'static str>,
        /// What is wrong, e.g. `is truncated: 100 of its 4096 bytes are present`.
        reason: String,
    },
    /// A recommendation request that cannot be served as asked.
    #[error("invalid request: `{field}` {reason}")]
    InvalidRequest {
        /// The field at fault, as spelled in the request, e.g. `user_features.age`.
        field: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// `recommend` was called before any bundle was loaded.
    #[error("no bundle is loaded: call load_bundle first")]
    NoBundle,
    /// A query vector holds NaN or an infinity, which would make every score meaningless.
    #[error("query value at index {index} is not finite")]
    NonFiniteQuery {
        /// The position of the first non-finite value.
        index: usize,
    },
}

impl Error {
    /// A stable machine-readable name of the error's kind, the `code` of `{code, message}`
    /// answers: `invalid_request`, `invalid_bundle`, `no_bundle` or `internal` (a fault
    /// of the bundle's models found while serving, e.g. a tower that returns the wrong
    /// shape).
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } => "invalid_request",
            Error::NoBundle => "no_bundle",
            Error::InvalidBundle { .. }
            | Error::Decode { .. }
            | Error::FormatVersion { .. }
            | Error::InvalidShard { .. }
            | Error::InvalidRanker { .. } => "invalid_bundle",
            _ => "internal",
        }
    }
}

/// A configuration value that is out of range, named by its dotted key
/// (`preprocess.age_boundaries`) so the user can find it in the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The dotted path of the offending key.
    pub key: String,
    /// Why the value is refused.
    pub message: String,
}

impl ConfigError {
    /// A refusal of `key` for the reason `message`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The same error, with `prefix.` put before the key (for nested sections).
    pub fn within(mut self, prefix: &str) -> Self {
        self.key = format!("{prefix}.{}", self.key);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid value for `{}`: {}", self.key, self.message)
    }
}
