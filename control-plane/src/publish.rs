//! Publishing to a store that a CDN can front: content-addressed, immutable artifacts
//! (`bundles/<sha256>.bundle`, `profiles/<sha256>.msgpack`) and one small manifest per
//! channel (`manifests/<channel>.json`), written last so that a reader never sees a
//! manifest naming a missing or partial file. Stores are folders or S3 buckets
//! ([`crate::object_store`]); hosts read them as a folder or over HTTP.
//!
//! The manifest (format 1, JSON):
//! `{format, channel, model_version, bundle: {key, sha256, size}, profiles?: {key, sha256,
//! size}, published_at}`; `host::store::Manifest` reads it.

use std::collections::HashMap;

use edge::engagement::EngagementRules;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::eval::positives_by_user;
use crate::object_store::{CachePolicy, ObjectStore, StoreError};
use crate::registry::{BundleRecord, ChannelAction, ProfilesRecord, Registry};

/// The manifest format written here.
pub const MANIFEST_FORMAT: u32 = 1;
/// The profiles artifact format written here.
pub const PROFILES_FORMAT: u32 = 1;

/// A channel's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// An experiment whose arms serve different bundles (`bundle` is the control's, what a
    /// host that ignores experiments serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<ManifestExperiment>,
}

/// An experiment in a manifest: every host assigns a viewer to an arm with the same hash
/// of (salt, user id) that the module uses for the bundle's own experiments, so every edge
/// puts a viewer in the same arm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestExperiment {
    /// Its name in responses and analyses.
    pub name: String,
    /// Mixed into the assignment hash.
    pub salt: String,
    /// The arms; the first is the control.
    pub variants: Vec<ManifestVariant>,
}

/// One arm of a manifest experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestVariant {
    /// Its name.
    pub name: String,
    /// Its share of the traffic, relative to the others' weights.
    pub weight: u32,
    /// The model version of its bundle.
    pub model_version: String,
    /// Its bundle.
    pub bundle: Artifact,
}

/// A content-addressed file in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store does not hold the whole artifact after the upload.
    #[error("{key}: the store holds {stored:?} bytes after uploading {size}")]
    Unverified {
        /// The key.
        key: String,
        /// Bytes uploaded.
        size: u64,
        /// Bytes the store reports.
        stored: Option<u64>,
    },
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

#[derive(Deserialize)]
struct ProfilesHeader {
    format: u32,
    users: HashMap<u64, serde::de::IgnoredAny>,
}

/// Checks that `bytes` are a profiles artifact of [`PROFILES_FORMAT`] and counts its
/// viewers.
pub fn count_profiles(bytes: &[u8]) -> Result<usize, String> {
    let header: ProfilesHeader = rmp_serde::from_slice(bytes)
        .map_err(|e| format!("not a profiles artifact (MessagePack {{format, users}}): {e}"))?;
    if header.format == PROFILES_FORMAT {
        Ok(header.users.len())
    } else {
        Err(format!(
            "profiles format {} (this control plane publishes {PROFILES_FORMAT})",
            header.format
        ))
    }
}

/// Unix seconds now (publication and registration times).
pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// [`publish`] now, and when a registry is given, registers the bundle, the profiles and
/// the channel event there too (as `POST /bundles`, `POST /profiles` and
/// `POST /channels/{name}/publish` would).
pub async fn publish_registered(
    store: &ObjectStore,
    registry: Option<&Registry>,
    channel: &str,
    bundle: &[u8],
    profiles: Option<&[u8]>,
) -> anyhow::Result<(Manifest, String)> {
    let users = profiles
        .map(count_profiles)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let now = now_seconds();
    check_channel(channel)?;
    let header = edge::bundle::BundleView::parse(bundle)?.header;
    let (manifest, key) =
        publish_checked(store, channel, &header.model_version, bundle, profiles, now).await?;
    if let Some(registry) = registry {
        registry.add_bundle(&BundleRecord::new(&header, &manifest.bundle, now))?;
        if let (Some(artifact), Some(users)) = (&manifest.profiles, users) {
            registry.add_profiles(&ProfilesRecord {
                sha256: artifact.sha256.clone(),
                key: artifact.key.clone(),
                size: artifact.size,
                users: users as u64,
                registered_at: now,
            })?;
        }
        registry.record_channel_event(ChannelAction::Publish, &manifest)?;
    }
    Ok((manifest, key))
}

/// Stores a content-addressed artifact (kept as is if already there whole) and checks that
/// the store holds all of it before anything may point at it.
pub async fn put_artifact(
    store: &ObjectStore,
    folder: &str,
    extension: &str,
    bytes: &[u8],
) -> Result<Artifact, PublishError> {
    let sha256 = edge::bundle::sha256_hex(bytes);
    let key = format!("{folder}/{sha256}.{extension}");
    let size = bytes.len() as u64;
    if store.size(&key).await? != Some(size) {
        store.put(&key, bytes, CachePolicy::Immutable).await?;
        let stored = store.size(&key).await?;
        if stored != Some(size) {
            return Err(PublishError::Unverified { key, size, stored });
        }
    }
    Ok(Artifact { key, sha256, size })
}

/// The key of a channel's manifest.
pub fn manifest_key(channel: &str) -> String {
    format!("manifests/{channel}.json")
}

/// Writes a channel's manifest (the last step of a publish: everything it names is in the
/// store already) and returns its key.
pub async fn write_manifest(
    store: &ObjectStore,
    manifest: &Manifest,
) -> Result<String, PublishError> {
    check_channel(&manifest.channel)?;
    let key = manifest_key(&manifest.channel);
    let mut text = serde_json::to_vec_pretty(manifest).expect("a manifest serializes");
    text.push(b'\n');
    store.put(&key, &text, CachePolicy::Short).await?;
    Ok(key)
}

/// Publishes a bundle (and optionally profiles) to `channel`: artifacts first, the
/// manifest last. The bundle is parsed (every section hash checked) before anything is
/// written.
pub async fn publish(
    store: &ObjectStore,
    channel: &str,
    bundle: &[u8],
    profiles: Option<&[u8]>,
    published_at: i64,
) -> Result<(Manifest, String), PublishError> {
    check_channel(channel)?;
    let view = edge::bundle::BundleView::parse(bundle)?;
    publish_checked(
        store,
        channel,
        &view.header.model_version,
        bundle,
        profiles,
        published_at,
    )
    .await
}

/// [`publish`] once the channel and the bundle have been checked.
async fn publish_checked(
    store: &ObjectStore,
    channel: &str,
    model_version: &str,
    bundle: &[u8],
    profiles: Option<&[u8]>,
    published_at: i64,
) -> Result<(Manifest, String), PublishError> {
    let bundle = put_artifact(store, "bundles", "bundle", bundle).await?;
    let profiles = match profiles {
        Some(bytes) => Some(put_artifact(store, "profiles", "msgpack", bytes).await?),
        None => None,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        channel: channel.to_owned(),
        model_version: model_version.to_owned(),
        bundle,
        profiles,
        published_at,
        experiment: None,
    };
    let key = write_manifest(store, &manifest).await?;
    Ok((manifest, key))
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

    #[tokio::test]
    async fn refuses_what_is_not_a_bundle_and_writes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = ObjectStore::Local(root.path().to_owned());
        let result = publish(&store, "production", b"not a bundle", None, 1).await;
        assert!(matches!(result, Err(PublishError::BadBundle(_))));
        assert!(!root.path().join("manifests").exists());
    }
}
