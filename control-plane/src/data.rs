//! A data set on disk: one folder with a Parquet file per entity and a `dataset.json`
//! manifest, written last so a folder with a manifest is a complete data set.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use edge::{Channel, Interaction, InteractionType, User, Video};
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::parquet_io::{Table, read_table, temporary_path, write_table};

/// File name of the manifest inside a data set folder.
pub const MANIFEST_FILE: &str = "dataset.json";

/// The four tables of the seed's schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// Viewers.
    pub users: Vec<User>,
    /// The catalogue.
    pub videos: Vec<Video>,
    /// Publishers.
    pub channels: Vec<Channel>,
    /// What viewers did.
    pub interactions: Vec<Interaction>,
}

/// Row counts of a data set's tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Users.
    pub users: u64,
    /// Videos.
    pub videos: u64,
    /// Channels.
    pub channels: u64,
    /// Interactions.
    pub interactions: u64,
}

/// What `dataset.json` records about a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    /// Layout version of the folder.
    pub version: u32,
    /// Where the data came from, e.g. `synthetic`, `movielens-100k`, `csv`.
    pub source: String,
    /// How it was made (generator settings, original files), for lineage.
    pub lineage: serde_json::Value,
    /// Row counts.
    pub counts: Counts,
    /// Earliest and latest interaction, in Unix seconds.
    pub time_range: Option<(i64, i64)>,
}

/// The files a data set was read from, so validation errors point at the file the user
/// has (a CSV, a MovieLens file) rather than at an intermediate form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFiles {
    /// Where users came from.
    pub users: PathBuf,
    /// Where videos came from.
    pub videos: PathBuf,
    /// Where channels came from.
    pub channels: PathBuf,
    /// Where interactions came from.
    pub interactions: PathBuf,
}

impl SourceFiles {
    /// The Parquet files of a data set folder.
    pub fn parquet(dir: &Path) -> Self {
        Self {
            users: dir.join(User::FILE),
            videos: dir.join(Video::FILE),
            channels: dir.join(Channel::FILE),
            interactions: dir.join(Interaction::FILE),
        }
    }
}

/// The layout version written by this build.
pub const DATASET_VERSION: u32 = 1;

impl Dataset {
    /// Row counts.
    pub fn counts(&self) -> Counts {
        Counts {
            users: self.users.len() as u64,
            videos: self.videos.len() as u64,
            channels: self.channels.len() as u64,
            interactions: self.interactions.len() as u64,
        }
    }

    /// Earliest and latest interaction time.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        let times = self.interactions.iter().map(|i| i.timestamp);
        Some((times.clone().min()?, times.max()?))
    }

    /// Fills the catalogue's view, like and comment counts from `log` (the training part: what the
    /// platform has seen before the parts that measure it) when the catalogue carries no
    /// counts at all, as MovieLens does. Without them the ranker has no popularity signal;
    /// counting the whole data set instead would leak the held-out parts. A catalogue with
    /// any count is kept as given. Returns whether it filled.
    pub fn count_engagement_where_missing(&mut self, log: &[Interaction]) -> bool {
        if self
            .videos
            .iter()
            .any(|v| v.view_count != 0 || v.like_count != 0 || v.comment_count != 0)
        {
            return false;
        }
        let mut counts: HashMap<u64, (u64, u64, u64)> = HashMap::new();
        for interaction in log {
            let entry = counts.entry(interaction.video_id).or_default();
            entry.0 += 1;
            match interaction.interaction_type {
                InteractionType::Like => entry.1 += 1,
                InteractionType::Comment => entry.2 += 1,
                _ => {}
            }
        }
        for video in &mut self.videos {
            let (views, likes, comments) = counts.get(&video.video_id).copied().unwrap_or_default();
            video.view_count = views;
            video.like_count = likes;
            video.comment_count = comments;
        }
        true
    }

    /// Reads and validates a data set folder.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a data set folder (expected users, videos, channels and interactions .parquet files)",
                ),
            ));
        }
        let dataset = Self {
            users: read_table(&dir.join(User::FILE))?,
            videos: read_table(&dir.join(Video::FILE))?,
            channels: read_table(&dir.join(Channel::FILE))?,
            interactions: read_table(&dir.join(Interaction::FILE))?,
        };
        dataset.validate(&SourceFiles::parquet(dir))?;
        Ok(dataset)
    }

    /// Checks keys and references; errors name the source file, the row and the column.
    pub fn validate(&self, files: &SourceFiles) -> Result<(), DataError> {
        let users = unique_ids(
            &files.users,
            "user_id",
            self.users.iter().map(|u| u.user_id),
        )?;
        let channels = unique_ids(
            &files.channels,
            "channel_id",
            self.channels.iter().map(|c| c.channel_id),
        )?;
        let videos = unique_ids(
            &files.videos,
            "video_id",
            self.videos.iter().map(|v| v.video_id),
        )?;

        let users_path = &files.users;
        for (row, user) in (1..).zip(&self.users) {
            if user.age > 120 {
                return Err(DataError::bad_value(
                    users_path,
                    row,
                    "age",
                    format!("{} is not an age in years (0-120)", user.age),
                ));
            }
            for (column, value) in [("country", &user.country), ("language", &user.language)] {
                if value.trim().is_empty() {
                    return Err(DataError::bad_value(users_path, row, column, "empty"));
                }
            }
        }

        let videos_path = &files.videos;
        for (row, video) in (1..).zip(&self.videos) {
            if !channels.contains(&video.channel_id) {
                return Err(dangling(
                    videos_path,
                    row,
                    "channel_id",
                    video.channel_id,
                    &files.channels,
                ));
            }
            for (column, value) in [("category", &video.category), ("language", &video.language)] {
                if value.trim().is_empty() {
                    return Err(DataError::bad_value(videos_path, row, column, "empty"));
                }
            }
        }

        let interactions_path = &files.interactions;
        for (row, interaction) in (1..).zip(&self.interactions) {
            if !users.contains(&interaction.user_id) {
                return Err(dangling(
                    interactions_path,
                    row,
                    "user_id",
                    interaction.user_id,
                    &files.users,
                ));
            }
            if !videos.contains(&interaction.video_id) {
                return Err(dangling(
                    interactions_path,
                    row,
                    "video_id",
                    interaction.video_id,
                    &files.videos,
                ));
            }
        }
        Ok(())
    }

    /// Writes the four tables, then the manifest (each file atomically).
    pub fn save(
        &self,
        dir: &Path,
        source: &str,
        lineage: serde_json::Value,
    ) -> Result<DatasetManifest, DataError> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        // A stale manifest would vouch for the half-replaced tables below.
        remove_if_present(&dir.join(MANIFEST_FILE))?;
        write_table(&dir.join(User::FILE), &self.users)?;
        write_table(&dir.join(Video::FILE), &self.videos)?;
        write_table(&dir.join(Channel::FILE), &self.channels)?;
        write_table(&dir.join(Interaction::FILE), &self.interactions)?;
        let manifest = DatasetManifest {
            version: DATASET_VERSION,
            source: source.to_owned(),
            lineage,
            counts: self.counts(),
            time_range: self.time_range(),
        };
        write_manifest(dir, &manifest)?;
        Ok(manifest)
    }
}

/// Writes `dataset.json` atomically.
pub fn write_manifest(dir: &Path, manifest: &DatasetManifest) -> Result<(), DataError> {
    write_json_atomically(&dir.join(MANIFEST_FILE), manifest)
}

/// Reads `dataset.json`.
pub fn read_manifest(dir: &Path) -> Result<DatasetManifest, DataError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::unreadable(&path, e))
}

/// Serializes `value` as pretty JSON to a temporary file, then renames it into place.
pub fn write_json_atomically(path: &Path, value: &impl Serialize) -> Result<(), DataError> {
    let mut text = serde_json::to_string_pretty(value).expect("manifests serialize");
    text.push('\n');
    let temporary = temporary_path(path);
    std::fs::write(&temporary, text).map_err(|e| DataError::io(&temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| DataError::io(path, e))
}

/// Removes a file, treating "already gone" as success.
pub fn remove_if_present(path: &Path) -> Result<(), DataError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataError::io(path, e)),
        _ => Ok(()),
    }
}

fn unique_ids(
    path: &Path,
    column: &str,
    ids: impl Iterator<Item = u64>,
) -> Result<HashSet<u64>, DataError> {
    let mut seen = HashSet::new();
    for (row, id) in (1..).zip(ids) {
        if !seen.insert(id) {
            return Err(DataError::bad_value(
                path,
                row,
                column,
                format!("duplicate id {id}"),
            ));
        }
    }
    Ok(seen)
}

fn dangling(path: &Path, row: u64, column: &str, id: u64, target: &Path) -> DataError {
    let target = target
        .file_name()
        .unwrap_or(target.as_os_str())
        .to_string_lossy();
    DataError::bad_value(path, row, column, format!("id {id} is not in {target}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge::ContentRating;

    fn video(video_id: u64, view_count: u64) -> Video {
        Video {
            video_id,
            title: format!("video {video_id}"),
            category: "Drama".to_owned(),
            child_categories: Vec::new(),
            channel_id: 1,
            duration_seconds: 0,
            tags: Vec::new(),
            language: "en".to_owned(),
            upload_time: None,
            view_count,
            like_count: 0,
            comment_count: 0,
            content_rating: ContentRating::General,
            regions: Vec::new(),
        }
    }

    fn interaction(video_id: u64, interaction_type: InteractionType) -> Interaction {
        Interaction {
            user_id: 1,
            video_id,
            timestamp: 0,
            interaction_type,
            watch_seconds: None,
            device: "tv".to_owned(),
        }
    }

    fn log() -> Vec<Interaction> {
        vec![
            interaction(1, InteractionType::Watch),
            interaction(1, InteractionType::Like),
            interaction(1, InteractionType::Comment),
            interaction(2, InteractionType::Like),
        ]
    }

    #[test]
    fn a_catalogue_without_counts_gets_them_from_the_log() {
        let mut dataset = Dataset {
            videos: vec![video(1, 0), video(2, 0), video(3, 0)],
            ..Dataset::default()
        };
        assert!(dataset.count_engagement_where_missing(&log()));
        let counts: Vec<(u64, u64, u64)> = dataset
            .videos
            .iter()
            .map(|v| (v.view_count, v.like_count, v.comment_count))
            .collect();
        assert_eq!(counts, [(3, 1, 1), (1, 1, 0), (0, 0, 0)]);
    }

    #[test]
    fn a_catalogue_with_any_count_is_kept_as_given() {
        let mut dataset = Dataset {
            videos: vec![video(1, 0), video(2, 5)],
            ..Dataset::default()
        };
        let before = dataset.clone();
        assert!(!dataset.count_engagement_where_missing(&log()));
        assert_eq!(dataset, before);
    }
}
