//! The bundle's `videos` section: the per-video metadata that filters, ranker features and
//! ordering read, stored by column.
//!
//! A `Vec<Video>` would hold three strings and two vectors per video (about 200 bytes of
//! heap at 1M videos, too much for a 128 MB edge isolate); here each video is a row of
//! numbers, with every category, child-category list, language and region spelled once
//! in a shared dictionary. [`VideoRef`] is the borrowed view of one row that serving and
//! training rows both read, so a feature sees the same facts in both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Channel, ContentRating, Error, Video};

mod columns;

/// The catalogue format version this build writes and reads (it also reads version 2,
/// which lacks `popularity_order`, by sorting at load).
pub const CATALOG_FORMAT_VERSION: u32 = 3;
/// The oldest catalogue format this build still reads.
const OLDEST_READ_VERSION: u32 = 2;

/// A video's upload time when unknown (a sentinel keeps the column a plain `i64`).
const UNKNOWN_TIME: i64 = i64::MIN;

/// The videos of a bundle, by column, sorted by id. In the section (MessagePack, a map by
/// field name, `format_version` first) every per-video column is a `bin` of little-endian
/// fixed-width values (ratings and flags one byte each), and the titles are one string
/// cut at `title_ends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    format_version: u32,
    /// Every spelled value: categories, child-category lists (joined by `|`), languages,
    /// regions.
    strings: Vec<String>,
    #[serde(with = "columns")]
    ids: Vec<u64>,
    /// Every title, one after the other; video `i`'s ends at `title_ends[i]`.
    title_text: String,
    #[serde(with = "columns")]
    title_ends: Vec<u32>,
    #[serde(with = "columns")]
    category: Vec<u32>,
    #[serde(with = "columns")]
    child_categories: Vec<u32>,
    #[serde(with = "columns")]
    channel: Vec<u64>,
    #[serde(with = "columns")]
    language: Vec<u32>,
    #[serde(with = "columns")]
    duration_seconds: Vec<u32>,
    #[serde(with = "columns")]
    view_count: Vec<u64>,
    #[serde(with = "columns")]
    like_count: Vec<u64>,
    #[serde(with = "columns")]
    comment_count: Vec<u64>,
    #[serde(with = "columns")]
    upload_time: Vec<i64>,
    #[serde(with = "columns")]
    content_rating: Vec<ContentRating>,
    /// Video `i`'s regions are `region_values[region_offsets[i]..region_offsets[i + 1]]`.
    #[serde(with = "columns")]
    region_offsets: Vec<u32>,
    #[serde(with = "columns")]
    region_values: Vec<u32>,
    #[serde(with = "columns")]
    promoted: Vec<bool>,
    /// `(channel id, subscribers)`, sorted by id.
    channels: Vec<(u64, u64)>,
    /// Every row, most viewed first, ties by id: stored so that a cold start reads it
    /// instead of sorting the catalogue (absent from version 2, worked out at load).
    #[serde(with = "columns", default)]
    popularity_order: Vec<u32>,
}

/// One video of a [`Catalog`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoRef<'a> {
    catalog: &'a Catalog,
    row: usize,
}

impl<'a> VideoRef<'a> {
    fn text(&self, index: u32) -> &'a str {
        &self.catalog.strings[index as usize]
    }

    /// Its id.
    pub fn video_id(&self) -> u64 {
        self.catalog.ids[self.row]
    }
    /// Its row in the catalogue (0-based, in id order).
    pub fn row(&self) -> usize {
        self.row
    }
    /// Display title.
    pub fn title(&self) -> &'a str {
        let ends = &self.catalog.title_ends;
        let start = if self.row == 0 { 0 } else { ends[self.row - 1] };
        &self.catalog.title_text[start as usize..ends[self.row] as usize]
    }
    /// Primary category.
    pub fn category(&self) -> &'a str {
        self.text(self.catalog.category[self.row])
    }
    /// Secondary categories joined by `|` (empty if none).
    pub fn child_categories(&self) -> &'a str {
        self.text(self.catalog.child_categories[self.row])
    }
    /// The publishing channel.
    pub fn channel_id(&self) -> u64 {
        self.catalog.channel[self.row]
    }
    /// The channel's subscribers (0 if unknown).
    pub fn channel_subscribers(&self) -> u64 {
        let channels = &self.catalog.channels;
        channels
            .binary_search_by_key(&self.channel_id(), |c| c.0)
            .map_or(0, |at| channels[at].1)
    }
    /// Audio language.
    pub fn language(&self) -> &'a str {
        self.text(self.catalog.language[self.row])
    }
    /// Length in seconds (0 = unknown).
    pub fn duration_seconds(&self) -> u32 {
        self.catalog.duration_seconds[self.row]
    }
    /// Lifetime views.
    pub fn view_count(&self) -> u64 {
        self.catalog.view_count[self.row]
    }
    /// Lifetime likes.
    pub fn like_count(&self) -> u64 {
        self.catalog.like_count[self.row]
    }
    /// Lifetime comments.
    pub fn comment_count(&self) -> u64 {
        self.catalog.comment_count[self.row]
    }
    /// Publication time, Unix seconds, if known.
    pub fn upload_time(&self) -> Option<i64> {
        let time = self.catalog.upload_time[self.row];
        (time != UNKNOWN_TIME).then_some(time)
    }
    /// Audience rating.
    pub fn content_rating(&self) -> ContentRating {
        self.catalog.content_rating[self.row]
    }
    /// Whether the video may be shown in `region` (an empty list means everywhere).
    pub fn available_in(&self, region: &str) -> bool {
        let regions = self.regions();
        regions.is_empty() || regions.iter().any(|&r| self.text(r) == region)
    }
    fn regions(&self) -> &'a [u32] {
        let offsets = &self.catalog.region_offsets;
        let (start, end) = (offsets[self.row] as usize, offsets[self.row + 1] as usize);
        &self.catalog.region_values[start..end]
    }
    /// Whether the business promotes it.
    pub fn promoted(&self) -> bool {
        self.catalog.promoted[self.row]
    }
}

/// Interns strings into the catalogue's dictionary.
struct Interner {
    strings: Vec<String>,
    index: BTreeMap<String, u32>,
}

impl Interner {
    fn intern(&mut self, text: &str) -> u32 {
        if let Some(&at) = self.index.get(text) {
            return at;
        }
        let at = self.strings.len() as u32;
        self.strings.push(text.to_owned());
        self.index.insert(text.to_owned(), at);
        at
    }
}

fn invalid(reason: impl std::fmt::Display) -> Error {
    Error::InvalidBundle {
        section: Some("videos"),
        reason: format!("is invalid: {reason}"),
    }
}

impl Catalog {
    /// The catalogue of `videos`, with `channels` for subscriber counts and the ids in
    /// `promoted` flagged. Duplicate video ids are refused.
    pub fn build(videos: &[Video], channels: &[Channel], promoted: &[u64]) -> Result<Self, Error> {
        let mut order: Vec<&Video> = videos.iter().collect();
        order.sort_by_key(|v| v.video_id);
        if let Some(pair) = order.windows(2).find(|w| w[0].video_id == w[1].video_id) {
            return Err(invalid(format!(
                "video id {} appears twice",
                pair[0].video_id
            )));
        }
        let mut interner = Interner {
            strings: Vec::new(),
            index: Default::default(),
        };
        let mut promoted_ids = promoted.to_vec();
        promoted_ids.sort_unstable();
        let mut catalog = Self {
            format_version: CATALOG_FORMAT_VERSION,
            strings: Vec::new(),
            ids: Vec::with_capacity(order.len()),
            title_text: String::new(),
            title_ends: Vec::with_capacity(order.len()),
            category: Vec::with_capacity(order.len()),
            child_categories: Vec::with_capacity(order.len()),
            channel: Vec::with_capacity(order.len()),
            language: Vec::with_capacity(order.len()),
            duration_seconds: Vec::with_capacity(order.len()),
            view_count: Vec::with_capacity(order.len()),
            like_count: Vec::with_capacity(order.len()),
            comment_count: Vec::with_capacity(order.len()),
            upload_time: Vec::with_capacity(order.len()),
            content_rating: Vec::with_capacity(order.len()),
            region_offsets: vec![0],
            region_values: Vec::new(),
            promoted: Vec::with_capacity(order.len()),
            channels: Vec::new(),
            popularity_order: Vec::new(),
        };
        for video in order {
            catalog.ids.push(video.video_id);
            catalog.title_text.push_str(&video.title);
            let title_end = u32::try_from(catalog.title_text.len())
                .map_err(|_| invalid("the titles exceed 4 GiB"))?;
            catalog.title_ends.push(title_end);
            catalog.category.push(interner.intern(&video.category));
            catalog
                .child_categories
                .push(interner.intern(&video.child_categories.join("|")));
            catalog.channel.push(video.channel_id);
            catalog.language.push(interner.intern(&video.language));
            catalog.duration_seconds.push(video.duration_seconds);
            catalog.view_count.push(video.view_count);
            catalog.like_count.push(video.like_count);
            catalog.comment_count.push(video.comment_count);
            catalog
                .upload_time
                .push(video.upload_time.unwrap_or(UNKNOWN_TIME));
            catalog.content_rating.push(video.content_rating);
            for region in &video.regions {
                let at = interner.intern(region);
                catalog.region_values.push(at);
            }
            catalog
                .region_offsets
                .push(catalog.region_values.len() as u32);
            catalog
                .promoted
                .push(promoted_ids.binary_search(&video.video_id).is_ok());
        }
        catalog.strings = interner.strings;
        catalog.channels = channels
            .iter()
            .map(|c| (c.channel_id, c.subscriber_count))
            .collect();
        catalog.channels.sort_unstable();
        catalog.channels.dedup_by_key(|c| c.0);
        catalog.popularity_order = catalog.sorted_by_popularity();
        Ok(catalog)
    }

    /// Rows by views, descending, ties by id (rows are in id order, so by row).
    fn sorted_by_popularity(&self) -> Vec<u32> {
        let mut order: Vec<(std::cmp::Reverse<u64>, u32)> = self
            .view_count
            .iter()
            .enumerate()
            .map(|(row, &views)| (std::cmp::Reverse(views), row as u32))
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, row)| row).collect()
    }

    /// Every row, most viewed first, ties by id.
    pub fn popularity_order(&self) -> &[u32] {
        &self.popularity_order
    }

    /// Videos in the catalogue.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the catalogue is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Every video id, ascending (row order).
    pub fn video_ids(&self) -> &[u64] {
        &self.ids
    }

    /// `(key, row)` pairs grouped by their row's category, each group in the given order.
    /// One pass over dictionary codes: a cold start groups every shard video this way.
    pub(crate) fn group_by_category(
        &self,
        pairs: impl IntoIterator<Item = (u32, u32)>,
    ) -> BTreeMap<String, Vec<(u32, u32)>> {
        let mut by_code: Vec<Vec<(u32, u32)>> = vec![Vec::new(); self.strings.len()];
        for (key, row) in pairs {
            if let Some(&code) = self.category.get(row as usize) {
                by_code[code as usize].push((key, row));
            }
        }
        by_code
            .into_iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(code, group)| (self.strings[code].clone(), group))
            .collect()
    }

    /// The video with this id, if the catalogue has it.
    pub fn get(&self, video_id: u64) -> Option<VideoRef<'_>> {
        let row = self.ids.binary_search(&video_id).ok()?;
        Some(VideoRef { catalog: self, row })
    }

    /// The video in row `row` (id order).
    pub fn at(&self, row: usize) -> Option<VideoRef<'_>> {
        (row < self.ids.len()).then_some(VideoRef { catalog: self, row })
    }

    /// Every video, in id order.
    pub fn iter(&self) -> impl Iterator<Item = VideoRef<'_>> {
        (0..self.ids.len()).map(|row| VideoRef { catalog: self, row })
    }

    /// The section's bytes (MessagePack).
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a catalogue always serializes")
    }

    /// Decodes and checks a catalogue: the version, equal column lengths, sorted unique
    /// ids, dictionary indices, title ends and region offsets in range. Errors name the
    /// column.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        // The version is the map's first entry: read alone, so that a catalogue of another
        // version is named as such rather than as undecodable, without decoding it twice.
        if let Some(found) = crate::leading_format_version(bytes)
            && !(OLDEST_READ_VERSION..=CATALOG_FORMAT_VERSION).contains(&found)
        {
            return Err(Error::FormatVersion {
                artifact: "videos section",
                found,
                expected: CATALOG_FORMAT_VERSION,
            });
        }
        let mut catalog: Self =
            rmp_serde::from_slice(bytes).map_err(|e| invalid(format!("cannot decode: {e}")))?;
        if catalog.format_version < CATALOG_FORMAT_VERSION {
            if !catalog.popularity_order.is_empty() {
                return Err(invalid(format!(
                    "version {} has no column `popularity_order`",
                    catalog.format_version
                )));
            }
            catalog.check()?;
            catalog.popularity_order = catalog.sorted_by_popularity();
            catalog.format_version = CATALOG_FORMAT_VERSION;
            return Ok(catalog);
        }
        catalog.check()?;
        catalog.check_popularity_order()?;
        Ok(catalog)
    }

    fn check(&self) -> Result<(), Error> {
        let n = self.ids.len();
        let lengths = [
            ("title_ends", self.title_ends.len()),
            ("category", self.category.len()),
            ("child_categories", self.child_categories.len()),
            ("channel", self.channel.len()),
            ("language", self.language.len()),
            ("duration_seconds", self.duration_seconds.len()),
            ("view_count", self.view_count.len()),
            ("like_count", self.like_count.len()),
            ("comment_count", self.comment_count.len()),
            ("upload_time", self.upload_time.len()),
            ("content_rating", self.content_rating.len()),
            ("promoted", self.promoted.len()),
            (
                "region_offsets",
                self.region_offsets.len().saturating_sub(1),
            ),
        ];
        for (column, length) in lengths {
            if length != n {
                return Err(invalid(format!(
                    "column `{column}` has {length} rows, `ids` has {n}"
                )));
            }
        }
        if self.region_offsets.is_empty() {
            return Err(invalid("column `region_offsets` is empty"));
        }
        if let Some(at) = self.ids.windows(2).position(|w| w[0] >= w[1]) {
            return Err(invalid(format!(
                "column `ids` is not strictly ascending at row {}",
                at + 1
            )));
        }
        // Each spelling once: lookups by name (categories, languages) must not depend on
        // which of two codes a row happens to use.
        let mut spellings: Vec<&str> = self.strings.iter().map(String::as_str).collect();
        spellings.sort_unstable();
        if let Some(pair) = spellings.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(invalid(format!(
                "column `strings` spells {:?} twice",
                pair[0]
            )));
        }
        let strings = self.strings.len() as u32;
        for (column, values) in [
            ("category", &self.category),
            ("child_categories", &self.child_categories),
            ("language", &self.language),
            ("region_values", &self.region_values),
        ] {
            if let Some(row) = values.iter().position(|&i| i >= strings) {
                return Err(invalid(format!(
                    "column `{column}`, row {row}: string {} is not below the dictionary's {strings}",
                    values[row]
                )));
            }
        }
        let regions = self.region_values.len() as u32;
        if self.region_offsets[0] != 0
            || self.region_offsets.windows(2).any(|w| w[0] > w[1])
            || self.region_offsets.last() != Some(&regions)
        {
            return Err(invalid(
                "column `region_offsets` does not ascend from 0 to the number of region values",
            ));
        }
        let mut title_start = 0;
        for (row, &end) in self.title_ends.iter().enumerate() {
            if end < title_start
                || end as usize > self.title_text.len()
                || !self.title_text.is_char_boundary(end as usize)
            {
                return Err(invalid(format!(
                    "column `title_ends`, row {row}: {end} does not end a title"
                )));
            }
            title_start = end;
        }
        if self.channels.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(invalid("column `channels` is not strictly ascending by id"));
        }
        Ok(())
    }

    /// One pass: every entry a row, and (views descending, row ascending) strictly
    /// increasing along the column, which also makes it a permutation of the rows.
    fn check_popularity_order(&self) -> Result<(), Error> {
        let order = &self.popularity_order;
        if order.len() != self.ids.len() {
            return Err(invalid(format!(
                "column `popularity_order` has {} rows, `ids` has {}",
                order.len(),
                self.ids.len()
            )));
        }
        let mut previous: Option<(std::cmp::Reverse<u64>, u32)> = None;
        for (rank, &row) in order.iter().enumerate() {
            let Some(&views) = self.view_count.get(row as usize) else {
                return Err(invalid(format!(
                    "column `popularity_order`, entry {rank}: row {row} is past the end"
                )));
            };
            let key = (std::cmp::Reverse(views), row);
            if previous.is_some_and(|previous| previous >= key) {
                return Err(invalid(format!(
                    "column `popularity_order`, entry {rank}: row {row} is out of order (views descending, then id)"
                )));
            }
            previous = Some(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
