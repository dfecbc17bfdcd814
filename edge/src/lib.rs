//! edgerec's inference core.
//!
//! Everything that must behave identically wherever a recommendation is computed lives
//! here: the entities of the data model, the engagement rules that turn interactions into
//! training labels, and the fitted preprocessing artifacts that both training and serving
//! apply. The crate is sans-I/O (see `clippy.toml`): it never reads a file, a clock or a
//! random source, so the same code runs natively, in wasmtime, in workerd and in a browser.
#![warn(missing_docs)]

pub mod abi;
pub mod bundle;
pub mod catalog;
pub mod engagement;
pub mod entities;
mod error;
pub mod preprocess;
pub mod ranker;
pub mod recommend;
pub mod rules;
pub mod shard;
pub mod tower;
#[cfg(feature = "browser")]
pub mod web;

pub use engagement::{EngagementRules, engagement_weight};
pub use entities::{Channel, ContentRating, Interaction, InteractionType, User, Video};
pub use error::{ConfigError, Error};
