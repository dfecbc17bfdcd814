//! CSV import for users' own data: `users.csv`, `videos.csv`, `channels.csv` and
//! `interactions.csv` in one folder, with headers named like the Parquet columns (see the
//! README). List cells (`child_categories`, `tags`, `regions`) separate items with `|`;
//! optional cells (`gender`, `occupation`, `upload_time`, `watch_seconds`) may be empty.
//! Columns may come in any order and extra columns are ignored.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use edge::{Channel, Interaction, User, Video};

use crate::DataError;
use crate::data::{Dataset, SourceFiles};

/// Reads and validates the four CSV files of `dir`.
pub fn import(dir: &Path) -> Result<Dataset, DataError> {
    let dataset = Dataset {
        users: read(&dir.join("users.csv"), USER_COLUMNS, |r| {
            Ok(User {
                user_id: r.parse("user_id")?,
                country: r.text("country")?,
                language: r.text("language")?,
                age: r.parse("age")?,
                gender: r.optional_text("gender")?,
                occupation: r.optional_text("occupation")?,
            })
        })?,
        videos: read(&dir.join("videos.csv"), VIDEO_COLUMNS, |r| {
            Ok(Video {
                video_id: r.parse("video_id")?,
                title: r.text("title")?,
                category: r.text("category")?,
                child_categories: r.list("child_categories")?,
                channel_id: r.parse("channel_id")?,
                duration_seconds: r.parse("duration_seconds")?,
                tags: r.list("tags")?,
                language: r.text("language")?,
                upload_time: r.optional("upload_time")?,
                view_count: r.parse("view_count")?,
                like_count: r.parse("like_count")?,
                comment_count: r.parse("comment_count")?,
                content_rating: r.parse("content_rating")?,
                regions: r.list("regions")?,
            })
        })?,
        channels: read(&dir.join("channels.csv"), CHANNEL_COLUMNS, |r| {
            Ok(Channel {
                channel_id: r.parse("channel_id")?,
                subscriber_count: r.parse("subscriber_count")?,
            })
        })?,
        interactions: read(&dir.join("interactions.csv"), INTERACTION_COLUMNS, |r| {
            Ok(Interaction {
                user_id: r.parse("user_id")?,
                video_id: r.parse("video_id")?,
                timestamp: r.parse("timestamp")?,
                interaction_type: r.parse("interaction_type")?,
                watch_seconds: r.optional("watch_seconds")?,
                device: r.text("device")?,
            })
        })?,
    };
    dataset.validate(&SourceFiles {
        users: dir.join("users.csv"),
        videos: dir.join("videos.csv"),
        channels: dir.join("channels.csv"),
        interactions: dir.join("interactions.csv"),
    })?;
    Ok(dataset)
}

const USER_COLUMNS: &[&str] = &[
    "user_id",
    "country",
    "language",
    "age",
    "gender",
    "occupation",
];
const VIDEO_COLUMNS: &[&str] = &[
    "video_id",
    "title",
    "category",
    "child_categories",
    "channel_id",
    "duration_seconds",
    "tags",
    "language",
    "upload_time",
    "view_count",
    "like_count",
    "comment_count",
    "content_rating",
    "regions",
];
const CHANNEL_COLUMNS: &[&str] = &["channel_id", "subscriber_count"];
const INTERACTION_COLUMNS: &[&str] = &[
    "user_id",
    "video_id",
    "timestamp",
    "interaction_type",
    "watch_seconds",
    "device",
];

fn read<T>(
    path: &Path,
    required: &[&str],
    mut build: impl FnMut(&Row<'_>) -> Result<T, DataError>,
) -> Result<Vec<T>, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| csv_error(path, e))?;
    let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
    let index: HashMap<&str, usize> = headers.iter().enumerate().map(|(i, h)| (h, i)).collect();
    for column in required {
        if !index.contains_key(column) {
            return Err(DataError::MissingColumn {
                path: path.to_owned(),
                column: (*column).to_owned(),
            });
        }
    }
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    let mut number = 0u64;
    while reader
        .read_record(&mut record)
        .map_err(|e| csv_error(path, e))?
    {
        number += 1;
        rows.push(build(&Row {
            path,
            number,
            record: &record,
            index: &index,
        })?);
    }
    Ok(rows)
}

fn csv_error(path: &Path, error: csv::Error) -> DataError {
    match error.kind() {
        csv::ErrorKind::Io(_) => match error.into_kind() {
            csv::ErrorKind::Io(io) => DataError::io(path, io),
            _ => unreachable!("the kind was just matched"),
        },
        _ => DataError::unreadable(path, error),
    }
}

/// One data row (1-based, header excluded).
struct Row<'a> {
    path: &'a Path,
    number: u64,
    record: &'a csv::StringRecord,
    index: &'a HashMap<&'a str, usize>,
}

impl Row<'_> {
    fn cell(&self, column: &str) -> &str {
        // The header was checked, and the csv reader rejects rows of another length.
        self.record.get(self.index[column]).unwrap_or("")
    }

    fn error(&self, column: &str, message: impl Into<String>) -> DataError {
        DataError::bad_value(self.path, self.number, column, message)
    }

    fn text(&self, column: &str) -> Result<String, DataError> {
        match self.cell(column) {
            "" => Err(self.error(column, "missing value")),
            text => Ok(text.to_owned()),
        }
    }

    fn optional_text(&self, column: &str) -> Result<Option<String>, DataError> {
        Ok(Some(self.cell(column))
            .filter(|t| !t.is_empty())
            .map(str::to_owned))
    }

    fn parse<T: FromStr>(&self, column: &str) -> Result<T, DataError>
    where
        T::Err: std::fmt::Display,
    {
        match self.cell(column) {
            "" => Err(self.error(column, "missing value")),
            text => text
                .parse()
                .map_err(|e: T::Err| self.error(column, format!("{text:?}: {e}"))),
        }
    }

    fn optional<T: FromStr>(&self, column: &str) -> Result<Option<T>, DataError>
    where
        T::Err: std::fmt::Display,
    {
        match self.cell(column) {
            "" => Ok(None),
            _ => self.parse(column).map(Some),
        }
    }

    fn list(&self, column: &str) -> Result<Vec<String>, DataError> {
        Ok(self
            .cell(column)
            .split('|')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect())
    }
}
