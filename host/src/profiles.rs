//! Online features (the seed's feature store): what the host knows about each viewer
//! (demographics and recent history), so `GET /recommendations/{user_id}` personalizes
//! without the caller sending them. Loaded from the profiles artifact that the control
//! plane publishes beside the bundle; `POST /interactions` appends to a viewer's history
//! at once, so the next recommendation reflects it.

use std::collections::HashMap;

use anyhow::{Context, ensure};
use serde::{Deserialize, Serialize};

/// The profiles artifact format this host reads.
pub const PROFILES_FORMAT: u32 = 1;

/// One viewer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Country code.
    #[serde(default)]
    pub country: Option<String>,
    /// Language code.
    #[serde(default)]
    pub language: Option<String>,
    /// Age in years.
    #[serde(default)]
    pub age: Option<f64>,
    /// Device class.
    #[serde(default)]
    pub device: Option<String>,
    /// Videos engaged with, oldest first (the most recent [`Profiles::history_limit`]).
    #[serde(default)]
    pub history: Vec<u64>,
}

/// The artifact: MessagePack `{format, users: {user_id: profile}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesFile {
    /// [`PROFILES_FORMAT`].
    pub format: u32,
    /// Profiles by user id.
    pub users: HashMap<u64, Profile>,
}

/// Every known viewer.
#[derive(Debug, Clone)]
pub struct Profiles {
    users: HashMap<u64, Profile>,
    history_limit: usize,
}

impl Profiles {
    /// No viewers known; histories keep their last `history_limit` videos.
    pub fn empty(history_limit: usize) -> Self {
        Self {
            users: HashMap::new(),
            history_limit: history_limit.max(1),
        }
    }

    /// Reads the artifact.
    pub fn from_msgpack(bytes: &[u8], history_limit: usize) -> anyhow::Result<Self> {
        let file: ProfilesFile =
            rmp_serde::from_slice(bytes).context("the profiles artifact is not format 1")?;
        ensure!(
            file.format == PROFILES_FORMAT,
            "profiles format {} (this host reads {PROFILES_FORMAT})",
            file.format
        );
        let mut profiles = Self::empty(history_limit);
        for (user, mut profile) in file.users {
            profiles.trim(&mut profile);
            profiles.users.insert(user, profile);
        }
        Ok(profiles)
    }

    fn trim(&self, profile: &mut Profile) {
        let excess = profile.history.len().saturating_sub(self.history_limit);
        profile.history.drain(..excess);
    }

    /// How many videos a history keeps.
    pub fn history_limit(&self) -> usize {
        self.history_limit
    }

    /// The viewer's profile, if known.
    pub fn get(&self, user: u64) -> Option<&Profile> {
        self.users.get(&user)
    }

    /// How many viewers are known.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no viewer is known.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Records that `user` engaged with `video` (a new viewer gets a profile).
    pub fn record_engagement(&mut self, user: u64, video: u64) {
        let limit = self.history_limit;
        let profile = self.users.entry(user).or_default();
        // A re-watch moves the video to the recent end instead of repeating it.
        profile.history.retain(|&seen| seen != video);
        profile.history.push(video);
        let excess = profile.history.len().saturating_sub(limit);
        profile.history.drain(..excess);
    }

    /// Takes over the histories recorded here since `older` was loaded for viewers that a
    /// newly published artifact does not know yet or knows with an older history. The
    /// new artifact is the truth for demographics.
    pub fn merge_live_histories(&mut self, older: &Profiles) {
        for (user, live) in &older.users {
            let entry = self.users.entry(*user).or_insert_with(|| live.clone());
            for &video in &live.history {
                if !entry.history.contains(&video) {
                    entry.history.push(video);
                }
            }
            let excess = entry.history.len().saturating_sub(self.history_limit);
            entry.history.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engagement_appends_and_trims() {
        let mut profiles = Profiles::empty(3);
        for video in [1, 2, 3, 2, 4] {
            profiles.record_engagement(7, video);
        }
        assert_eq!(profiles.get(7).unwrap().history, vec![3, 2, 4]);
    }

    #[test]
    fn the_artifact_round_trips_and_is_checked() {
        let mut users = HashMap::new();
        users.insert(
            5,
            Profile {
                country: Some("US".into()),
                age: Some(30.0),
                history: (0..10).collect(),
                ..Profile::default()
            },
        );
        let bytes = rmp_serde::to_vec_named(&ProfilesFile { format: 1, users }).unwrap();
        let profiles = Profiles::from_msgpack(&bytes, 4).unwrap();
        assert_eq!(profiles.get(5).unwrap().history, vec![6, 7, 8, 9]);
        assert_eq!(profiles.get(5).unwrap().country.as_deref(), Some("US"));
        assert!(Profiles::from_msgpack(&bytes[..bytes.len() - 3], 4).is_err());
        let future = rmp_serde::to_vec_named(&ProfilesFile {
            format: 2,
            users: HashMap::new(),
        })
        .unwrap();
        assert!(Profiles::from_msgpack(&future, 4).is_err());
    }
}
