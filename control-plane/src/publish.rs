//! Publishing to a store that a CDN can front: content-addressed, immutable artifacts
//! (`bundles/<sha256>.bundle`, `profiles/<sha256>.msgpack`) and one small manifest per
//! channel (`manifests/<channel>.json`), written last so that a reader never sees a
//! manifest naming a missing or partial file. This module writes the local-filesystem
//! store; hosts read it as a folder or over HTTP.
//!
//! The manifest (format 1, JSON):
//! `{format, channel, model_version, bundle: {key, sha256, size}, profiles?: {key, sha256,
//! size}, published_at}`; `host::store::Manifest` reads it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use edge::engagement::EngagementRules;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::eval::positives_by_user;

/// The manifest format written here.
pub const MANIFEST_FORMAT: u32 = 1;
/// The profiles artifact format written here.
pub const PROFILES_FORMAT: u32 = 1;

/// A channel's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The channel.
    pub channel: String,
    /// The model version inside the bundle.
    pub model_version: String,
    /// The bundle.
    pub bundle: Artifact,
    /// The viewers' profiles, when published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiles: Option<Artifact>,
    /// Unix seconds.
    pub published_at: i64,
}

/// A content-addressed file in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Key under the store root.
    pub key: String,
    /// Lowercase hex sha256.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A channel name that is not `[a-z0-9][a-z0-9-]{0,63}`.
    #[error("channel {0:?}: use 1-64 of a-z, 0-9 and '-', starting with a letter or digit")]
    BadChannel(String),
    /// The bytes are not a bundle that edge can read.
    #[error("not a bundle: {0}")]
    BadBundle(#[from] edge::Error),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks a channel name (it becomes a file name in the store).
pub fn check_channel(channel: &str) -> Result<(), PublishError> {
    let valid = !channel.is_empty()
        && channel.len() <= 64
        && channel
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !channel.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(PublishError::BadChannel(channel.to_owned()))
    }
}

/// One viewer's profile in the artifact.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Country code.
    pub country: Option<String>,
    /// Language code.
    pub language: Option<String>,
    /// Age in years.
    pub age: Option<f64>,
    /// The device of the viewer's latest interaction.
    pub device: Option<String>,
    /// Engaged videos (the seed's positive rules), oldest first, at most the last
    /// `history_limit`.
    pub history: Vec<u64>,
}

#[derive(Serialize)]
struct ProfilesFile<'a> {
    format: u32,
    users: &'a HashMap<u64, Profile>,
}

/// The viewers' profiles from a data set: demographics, latest device, and engaged
/// videos as training counts them. MessagePack, what the host's online features read.
pub fn build_profiles(
    dataset: &Dataset,
    rules: &EngagementRules,
    history_limit: usize,
) -> (Vec<u8>, usize) {
    let durations: HashMap<u64, u32> = dataset
        .videos
        .iter()
        .map(|v| (v.video_id, v.duration_seconds))
        .collect();
    let mut users: HashMap<u64, Profile> = dataset
        .users
        .iter()
        .map(|u| {
            (
                u.user_id,
                Profile {
                    country: Some(u.country.clone()),
                    language: Some(u.language.clone()),
                    age: Some(f64::from(u.age)),
                    ..Profile::default()
                },
            )
        })
        .collect();
    let mut latest: HashMap<u64, (i64, &str)> = HashMap::new();
    for interaction in &dataset.interactions {
        let entry = latest.entry(interaction.user_id).or_insert((i64::MIN, ""));
        if interaction.timestamp >= entry.0 {
            *entry = (interaction.timestamp, &interaction.device);
        }
    }
    for (user, (_, device)) in latest {
        if let Some(profile) = users.get_mut(&user) {
            profile.device = Some(device.to_owned());
        }
    }
    for (user, mut history) in positives_by_user(&dataset.interactions, &durations, rules) {
        let excess = history.len().saturating_sub(history_limit);
        history.drain(..excess);
        if let Some(profile) = users.get_mut(&user) {
            profile.history = history;
        }
    }
    let count = users.len();
    let bytes = rmp_serde::to_vec_named(&ProfilesFile {
        format: PROFILES_FORMAT,
        users: &users,
    })
    .expect("profiles serialize");
    (bytes, count)
}

/// Writes `bytes` to `path` durably: a temporary file in the same folder, synced, then
/// renamed over the target, then the folder synced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    let folder = path.parent().expect("store paths have a folder");
    std::fs::create_dir_all(folder).map_err(io(folder))?;
    let temporary = folder.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .expect("store paths name a file")
            .to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
    file.write_all(bytes).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io(path))?;
    std::fs::File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(io(folder))
}

/// Stores a content-addressed artifact (kept as is if already there and intact).
fn put_artifact(
    store: &Path,
    folder: &str,
    extension: &str,
    bytes: &[u8],
) -> Result<Artifact, PublishError> {
    let sha256 = edge::bundle::sha256_hex(bytes);
    let key = format!("{folder}/{sha256}.{extension}");
    let path = store.join(&key);
    let intact = std::fs::read(&path)
        .map(|existing| edge::bundle::sha256_hex(&existing) == sha256)
        .unwrap_or(false);
    if !intact {
        write_durably(&path, bytes)?;
    }
    Ok(Artifact {
        key,
        sha256,
        size: bytes.len() as u64,
    })
}

/// Publishes a bundle (and optionally profiles) to `channel` of the store at `store`:
/// artifacts first, the manifest last. The bundle is parsed (every section hash checked)
/// before anything is written.
pub fn publish_local(
    store: &Path,
    channel: &str,
    bundle: &[u8],
    profiles: Option<&[u8]>,
    published_at: i64,
) -> Result<(Manifest, PathBuf), PublishError> {
    check_channel(channel)?;
    let view = edge::bundle::BundleView::parse(bundle)?;
    let model_version = view.header.model_version.clone();
    let bundle = put_artifact(store, "bundles", "bundle", bundle)?;
    let profiles = profiles
        .map(|bytes| put_artifact(store, "profiles", "msgpack", bytes))
        .transpose()?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        channel: channel.to_owned(),
        model_version,
        bundle,
        profiles,
        published_at,
    };
    let path = store.join("manifests").join(format!("{channel}.json"));
    let mut text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    text.push(b'\n');
    write_durably(&path, &text)?;
    Ok((manifest, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_file_safe() {
        for good in ["production", "canary", "exp-1-arm-b", "0"] {
            assert!(check_channel(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "Prod", "a/b", "-x", "a.json", &"a".repeat(65)] {
            assert!(check_channel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_bundle_and_writes_nothing() {
        let store = tempfile::tempdir().unwrap();
        let result = publish_local(store.path(), "production", b"not a bundle", None, 1);
        assert!(matches!(result, Err(PublishError::BadBundle(_))));
        assert!(!store.path().join("manifests").exists());
    }
}
