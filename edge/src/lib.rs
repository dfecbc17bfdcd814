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

/// The value of a MessagePack map's first entry when its key is `format_version`: the
/// version of a section read without decoding the section (a struct that ignores the
/// other fields still walks every byte of them).
pub(crate) fn leading_format_version(bytes: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"format_version";
    let mut rest = bytes;
    rmp::decode::read_map_len(&mut rest).ok()?;
    let length = rmp::decode::read_str_len(&mut rest).ok()? as usize;
    if rest.get(..length)? != KEY {
        return None;
    }
    rest = &rest[length..];
    rmp::decode::read_int(&mut rest).ok()
}

/// Decodes a MessagePack section that starts with `format_version`, which must be
/// `expected` (`version` reads it from the decoded value, for a writer that put it
/// elsewhere). Another version is named as such rather than as undecodable, and the
/// section is decoded once.
pub(crate) fn decode_versioned<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    artifact: &'static str,
    expected: u32,
    version: impl Fn(&T) -> u32,
) -> Result<T, Error> {
    let wrong_version = |found| Error::FormatVersion {
        artifact,
        found,
        expected,
    };
    if let Some(found) = leading_format_version(bytes)
        && found != expected
    {
        return Err(wrong_version(found));
    }
    let decoded: T = rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        artifact,
        message: e.to_string(),
    })?;
    match version(&decoded) {
        found if found == expected => Ok(decoded),
        found => Err(wrong_version(found)),
    }
}
