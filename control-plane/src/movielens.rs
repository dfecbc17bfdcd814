//! MovieLens-100k import, from RecBole's atomic files (`ml-100k.inter/.item/.user`, as the
//! `recbole` wheel ships them) or from GroupLens's original layout (`u.data/u.item/u.user`).
//!
//! Mapping onto the seed's entities:
//! - a movie becomes a video: its first genre is the category, the other genres the child
//!   categories; the release year becomes the upload time (1 January, UTC); the title loses
//!   the trailing "(year)" of the original layout so both layouts agree. Length, counts and
//!   audience rating are unknown: duration 0, counts 0, rating `G` (unrestricted).
//! - every movie's channel is its primary genre (MovieLens has no publishers), with 0
//!   subscribers.
//! - every rating is a watch of unknown length (so it counts as a positive watch); a rating
//!   of 4 or 5 is recorded as a like instead. One interaction per rating.
//! - users keep age, gender and occupation; the zip code gives the country (US, or CA for
//!   Canadian postal codes, which start with a letter); the language is `en`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edge::{Channel, ContentRating, Interaction, InteractionType, User, Video};

use crate::DataError;
use crate::data::{Dataset, SourceFiles};

/// GroupLens's genre columns of `u.item`, in order.
pub const GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// Which file layout a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// RecBole's `ml-100k.inter`, `ml-100k.item`, `ml-100k.user`.
    Atomic,
    /// GroupLens's `u.data`, `u.item`, `u.user`.
    Original,
}

/// Finds the layout of `dir`, or says which files were expected.
pub fn detect_layout(dir: &Path) -> Result<Layout, DataError> {
    let has_all = |names: [&str; 3]| names.iter().all(|n| dir.join(n).is_file());
    if has_all(["ml-100k.inter", "ml-100k.item", "ml-100k.user"]) {
        Ok(Layout::Atomic)
    } else if has_all(["u.data", "u.item", "u.user"]) {
        Ok(Layout::Original)
    } else {
        Err(DataError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no MovieLens-100k files: expected ml-100k.inter, ml-100k.item and ml-100k.user \
                 (RecBole) or u.data, u.item and u.user (GroupLens)",
            ),
        ))
    }
}

/// Reads MovieLens-100k from `dir` in either layout.
pub fn import(dir: &Path) -> Result<Dataset, DataError> {
    let (raw, [users, items, ratings]) = match detect_layout(dir)? {
        Layout::Atomic => (
            read_atomic(dir)?,
            ["ml-100k.user", "ml-100k.item", "ml-100k.inter"],
        ),
        Layout::Original => (read_original(dir)?, ["u.user", "u.item", "u.data"]),
    };
    let dataset = raw.into_dataset();
    // Channels are derived from the items file, so their errors point there too.
    dataset.validate(&SourceFiles {
        users: dir.join(users),
        videos: dir.join(items),
        channels: dir.join(items),
        interactions: dir.join(ratings),
    })?;
    Ok(dataset)
}

struct RawMovie {
    id: u64,
    title: String,
    year: Option<i32>,
    genres: Vec<String>,
}

struct RawUser {
    id: u64,
    age: u8,
    gender: String,
    occupation: String,
    zip: String,
}

struct RawRating {
    user: u64,
    item: u64,
    rating: f32,
    timestamp: i64,
}

struct Raw {
    users: Vec<RawUser>,
    movies: Vec<RawMovie>,
    ratings: Vec<RawRating>,
}

impl Raw {
    fn into_dataset(self) -> Dataset {
        let mut channel_of_genre: BTreeMap<String, u64> = BTreeMap::new();
        let videos: Vec<Video> = self
            .movies
            .into_iter()
            .map(|movie| {
                let mut genres = movie.genres.into_iter();
                let category = genres.next().unwrap_or_else(|| "unknown".to_owned());
                let next_id = channel_of_genre.len() as u64;
                let channel_id = *channel_of_genre.entry(category.clone()).or_insert(next_id);
                Video {
                    video_id: movie.id,
                    title: movie.title,
                    category,
                    child_categories: genres.collect(),
                    channel_id,
                    duration_seconds: 0,
                    tags: Vec::new(),
                    language: "en".to_owned(),
                    upload_time: movie.year.map(|year| days_from_civil(year, 1, 1) * 86_400),
                    view_count: 0,
                    like_count: 0,
                    comment_count: 0,
                    content_rating: ContentRating::General,
                    regions: Vec::new(),
                }
            })
            .collect();
        let mut channels: Vec<Channel> = channel_of_genre
            .into_values()
            .map(|channel_id| Channel {
                channel_id,
                subscriber_count: 0,
            })
            .collect();
        channels.sort_by_key(|c| c.channel_id);
        let users = self
            .users
            .into_iter()
            .map(|user| User {
                user_id: user.id,
                country: if user.zip.starts_with(|c: char| c.is_ascii_alphabetic()) {
                    "CA".to_owned()
                } else {
                    "US".to_owned()
                },
                language: "en".to_owned(),
                age: user.age,
                gender: Some(user.gender),
                occupation: Some(user.occupation),
            })
            .collect();
        let interactions = self
            .ratings
            .into_iter()
            .map(|rating| Interaction {
                user_id: rating.user,
                video_id: rating.item,
                timestamp: rating.timestamp,
                interaction_type: if rating.rating >= 4.0 {
                    InteractionType::Like
                } else {
                    InteractionType::Watch
                },
                watch_seconds: None,
                device: "unknown".to_owned(),
            })
            .collect();
        Dataset {
            users,
            videos,
            channels,
            interactions,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// One delimited text file, read whole, with errors that name file, row and column.
struct TextTable {
    path: PathBuf,
    rows: Vec<Vec<String>>,
}

impl TextTable {
    /// `latin1`: GroupLens's files are ISO-8859-1, which maps byte for byte onto `char`.
    fn read(
        path: &Path,
        delimiter: char,
        header: bool,
        latin1: bool,
    ) -> Result<(Self, Vec<String>), DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let text = if latin1 {
            bytes.iter().map(|&b| b as char).collect()
        } else {
            String::from_utf8(bytes)
                .map_err(|e| DataError::unreadable(path, format!("not UTF-8: {e}")))?
        };
        let mut lines = text.lines().filter(|line| !line.trim().is_empty());
        let header_fields = if header {
            lines
                .next()
                .ok_or_else(|| DataError::unreadable(path, "empty file"))?
                .split(delimiter)
                .map(|field| field.split(':').next().unwrap_or(field).trim().to_owned())
                .collect()
        } else {
            Vec::new()
        };
        let rows = lines
            .map(|line| line.split(delimiter).map(str::to_owned).collect())
            .collect();
        Ok((
            Self {
                path: path.to_owned(),
                rows,
            },
            header_fields,
        ))
    }

    /// Builds one value per data row; `r` is the 0-based row index.
    fn map_rows<T>(
        &self,
        build: impl Fn(usize, &[String]) -> Result<T, DataError>,
    ) -> Result<Vec<T>, DataError> {
        self.rows
            .iter()
            .enumerate()
            .map(|(r, row)| build(r, row))
            .collect()
    }

    fn cell<'a>(
        &self,
        row: &'a [String],
        index: usize,
        row_number: usize,
        column: &str,
    ) -> Result<&'a str, DataError> {
        row.get(index).map(String::as_str).ok_or_else(|| {
            DataError::bad_value(
                &self.path,
                row_number as u64 + 1,
                column,
                "missing value (row too short)",
            )
        })
    }

    fn parse<T: std::str::FromStr>(
        &self,
        row: &[String],
        index: usize,
        row_number: usize,
        column: &str,
    ) -> Result<T, DataError>
    where
        T::Err: std::fmt::Display,
    {
        let text = self.cell(row, index, row_number, column)?.trim();
        text.parse().map_err(|e: T::Err| {
            DataError::bad_value(
                &self.path,
                row_number as u64 + 1,
                column,
                format!("{text:?}: {e}"),
            )
        })
    }
}

/// Positions of the `wanted` columns in a RecBole header.
fn columns(table: &TextTable, header: &[String], wanted: &[&str]) -> Result<Vec<usize>, DataError> {
    wanted
        .iter()
        .map(|name| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| DataError::MissingColumn {
                    path: table.path.clone(),
                    column: (*name).to_owned(),
                })
        })
        .collect()
}

fn read_atomic(dir: &Path) -> Result<Raw, DataError> {
    let (table, header) = TextTable::read(&dir.join("ml-100k.user"), '\t', true, false)?;
    let c = columns(
        &table,
        &header,
        &["user_id", "age", "gender", "occupation", "zip_code"],
    )?;
    let users = table.map_rows(|r, row| {
        Ok(RawUser {
            id: table.parse(row, c[0], r, "user_id")?,
            age: table.parse(row, c[1], r, "age")?,
            gender: table.cell(row, c[2], r, "gender")?.to_owned(),
            occupation: table.cell(row, c[3], r, "occupation")?.to_owned(),
            zip: table.cell(row, c[4], r, "zip_code")?.to_owned(),
        })
    })?;

    let (table, header) = TextTable::read(&dir.join("ml-100k.item"), '\t', true, false)?;
    let c = columns(
        &table,
        &header,
        &["item_id", "movie_title", "release_year", "class"],
    )?;
    let movies = table.map_rows(|r, row| {
        let year = table.cell(row, c[2], r, "release_year")?.trim();
        let (title, title_year) = split_title_year(table.cell(row, c[1], r, "movie_title")?);
        Ok(RawMovie {
            id: table.parse(row, c[0], r, "item_id")?,
            title: title.to_owned(),
            // RecBole writes "unkonwn" (sic) for the one movie without a date, and a
            // few titles whose "(year) (V)" it split keep the year in the title.
            year: year.parse().ok().or(title_year),
            genres: table
                .cell(row, c[3], r, "class")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        })
    })?;

    let (table, header) = TextTable::read(&dir.join("ml-100k.inter"), '\t', true, false)?;
    let c = columns(
        &table,
        &header,
        &["user_id", "item_id", "rating", "timestamp"],
    )?;
    let ratings = table.map_rows(|r, row| {
        Ok(RawRating {
            user: table.parse(row, c[0], r, "user_id")?,
            item: table.parse(row, c[1], r, "item_id")?,
            rating: table.parse(row, c[2], r, "rating")?,
            timestamp: table.parse::<f64>(row, c[3], r, "timestamp")? as i64,
        })
    })?;
    Ok(Raw {
        users,
        movies,
        ratings,
    })
}

fn read_original(dir: &Path) -> Result<Raw, DataError> {
    let (table, _) = TextTable::read(&dir.join("u.user"), '|', false, true)?;
    let users = table.map_rows(|r, row| {
        Ok(RawUser {
            id: table.parse(row, 0, r, "user id")?,
            age: table.parse(row, 1, r, "age")?,
            gender: table.cell(row, 2, r, "gender")?.to_owned(),
            occupation: table.cell(row, 3, r, "occupation")?.to_owned(),
            zip: table.cell(row, 4, r, "zip code")?.to_owned(),
        })
    })?;

    let (table, _) = TextTable::read(&dir.join("u.item"), '|', false, true)?;
    let movies = table.map_rows(|r, row| {
        let mut genres = Vec::new();
        for (offset, genre) in GENRES.iter().enumerate() {
            if table.parse::<u8>(row, 5 + offset, r, genre)? == 1 {
                genres.push((*genre).to_owned());
            }
        }
        let release = table.cell(row, 2, r, "release date")?;
        let (title, title_year) = split_title_year(table.cell(row, 1, r, "movie title")?);
        Ok(RawMovie {
            id: table.parse(row, 0, r, "movie id")?,
            title: title.to_owned(),
            // "01-Jan-1995"; empty for the one movie without a date.
            year: release
                .rsplit('-')
                .next()
                .and_then(|y| y.parse().ok())
                .or(title_year),
            genres,
        })
    })?;

    let (table, _) = TextTable::read(&dir.join("u.data"), '\t', false, false)?;
    let ratings = table.map_rows(|r, row| {
        Ok(RawRating {
            user: table.parse(row, 0, r, "user id")?,
            item: table.parse(row, 1, r, "item id")?,
            rating: table.parse(row, 2, r, "rating")?,
            timestamp: table.parse(row, 3, r, "timestamp")?,
        })
    })?;
    Ok(Raw {
        users,
        movies,
        ratings,
    })
}

/// "Toy Story (1995)" -> ("Toy Story", Some(1995)).
fn split_title_year(title: &str) -> (&str, Option<i32>) {
    let title = title.trim();
    match title.rsplit_once(" (") {
        Some((head, tail))
            if tail.len() == 5
                && tail.ends_with(')')
                && tail[..4].bytes().all(|b| b.is_ascii_digit()) =>
        {
            (head, tail[..4].parse().ok())
        }
        _ => (title, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1995, 1, 1) * 86_400, 788_918_400);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1922, 1, 1), -17_532);
    }

    #[test]
    fn titles_lose_their_year() {
        assert_eq!(
            split_title_year("Toy Story (1995)"),
            ("Toy Story", Some(1995))
        );
        assert_eq!(
            split_title_year("Seven (Se7en) (1995)"),
            ("Seven (Se7en)", Some(1995))
        );
        assert_eq!(split_title_year("unknown"), ("unknown", None));
    }
}
