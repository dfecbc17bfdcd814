//! edgerec's control plane: everything heavy and slow that happens before serving.
//!
//! So far: the data sets (Parquet storage, CSV and MovieLens import, the synthetic
//! generator), splits, the typed configuration and the preprocessing fit. Training,
//! bundles, the registry and the REST API build on these.

#![warn(missing_docs)]

pub mod bundle_build;
pub mod catboost_side_by_side;
pub mod config;
pub mod csv_import;
pub mod data;
pub mod drift;
mod error;
pub mod eval;
pub mod experiments;
pub mod feedback;
pub mod ingest;
pub mod latency;
pub mod lazy_adam;
pub mod movielens;
pub mod object_store;
pub mod onnx_export;
pub mod parquet_io;
pub mod peers_bench;
pub mod pipeline;
pub mod progress;
pub mod publish;
pub mod ranker_bench;
pub mod ranker_data;
pub mod ranker_train;
pub mod registry;
pub mod serve;
pub mod server;
pub mod shard_build;
pub mod split;
pub mod synthetic;
pub mod title_encoder;
pub mod two_tower;

pub use error::DataError;
