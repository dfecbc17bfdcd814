//! The seed's data model: users, videos, channels and interactions.
//!
//! Ids are unsigned 64-bit integers everywhere (data sets, bundles, requests): they are
//! compact in the module's memory and hash cheaply. Times are Unix seconds (UTC).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A viewer's id.
pub type UserId = u64;
/// A video's id.
pub type VideoId = u64;
/// A channel's id.
pub type ChannelId = u64;

/// A viewer and the demographics that the towers and the ranker see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Unique id.
    pub user_id: UserId,
    /// ISO 3166-1 alpha-2 country code, e.g. `US`.
    pub country: String,
    /// ISO 639-1 language code, e.g. `en`; shares its vocabulary with [`Video::language`].
    pub language: String,
    /// Age in years.
    pub age: u8,
    /// Gender as the source recorded it, when it did.
    pub gender: Option<String>,
    /// Occupation as the source recorded it, when it did.
    pub occupation: Option<String>,
}

/// A video of the catalogue with the metadata that filters, features and ordering read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Video {
    /// Unique id.
    pub video_id: VideoId,
    /// Display title.
    pub title: String,
    /// Primary category, e.g. `Comedy`.
    pub category: String,
    /// Secondary categories, most specific last.
    pub child_categories: Vec<String>,
    /// The channel that published it.
    pub channel_id: ChannelId,
    /// Length in seconds; 0 when the source does not know it.
    pub duration_seconds: u32,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// ISO 639-1 language code of the audio.
    pub language: String,
    /// Publication time in Unix seconds, when known.
    pub upload_time: Option<i64>,
    /// Lifetime views.
    pub view_count: u64,
    /// Lifetime likes.
    pub like_count: u64,
    /// Lifetime comments.
    pub comment_count: u64,
    /// Audience rating, checked against the viewer's age.
    pub content_rating: ContentRating,
    /// ISO 3166-1 alpha-2 codes where the video may be shown; empty means everywhere.
    pub regions: Vec<String>,
}

/// A channel (the publisher of videos).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// Unique id.
    pub channel_id: ChannelId,
    /// Current subscribers.
    pub subscriber_count: u64,
}

/// One thing a viewer did with a video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// Who.
    pub user_id: UserId,
    /// Which video.
    pub video_id: VideoId,
    /// When, in Unix seconds.
    pub timestamp: i64,
    /// What.
    pub interaction_type: InteractionType,
    /// Seconds watched, for interactions that include watching.
    pub watch_seconds: Option<u32>,
    /// Device class, e.g. `mobile`, `desktop`, `tv`, `tablet`.
    pub device: String,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical spelling used in files and APIs.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(text: &str) -> Result<Self, UnknownValue> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        what: $what,
                        found: text.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }
    };
}

string_enum! {
    /// The kinds of interaction of the seed's schema.
    InteractionType, "interaction type" {
        /// The video was shown.
        Impression = "impression",
        /// The viewer opened it.
        Click = "click",
        /// The viewer watched it (see [`Interaction::watch_seconds`]).
        Watch = "watch",
        /// The viewer liked it.
        Like = "like",
        /// The viewer commented on it.
        Comment = "comment",
        /// The viewer shared it.
        Share = "share",
    }
}

string_enum! {
    /// Audience rating (MPAA-style scale).
    ContentRating, "content rating" {
        /// All ages.
        General = "G",
        /// Parental guidance suggested.
        ParentalGuidance = "PG",
        /// 13 and over.
        Teen = "PG-13",
        /// 17 and over.
        Restricted = "R",
        /// Adults only.
        Adult = "NC-17",
    }
}

impl ContentRating {
    /// The youngest age that may be shown a video of this rating.
    pub fn minimum_age(self) -> u8 {
        match self {
            ContentRating::General | ContentRating::ParentalGuidance => 0,
            ContentRating::Teen => 13,
            ContentRating::Restricted => 17,
            ContentRating::Adult => 18,
        }
    }
}

/// A string that is not one of an enumeration's spellings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// What was being parsed.
    pub what: &'static str,
    /// The text found.
    pub found: String,
    /// The accepted spellings.
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} {:?}, expected one of {}",
            self.what,
            self.found,
            self.expected.join(", ")
        )
    }
}

impl std::error::Error for UnknownValue {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_spelling() {
        for kind in InteractionType::ALL {
            assert_eq!(kind.as_str().parse::<InteractionType>().unwrap(), *kind);
            let json = serde_json::to_string(kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        for rating in ContentRating::ALL {
            assert_eq!(rating.as_str().parse::<ContentRating>().unwrap(), *rating);
        }
    }

    #[test]
    fn unknown_spelling_lists_the_accepted_ones() {
        let err = "watched".parse::<InteractionType>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown interaction type \"watched\", expected one of impression, click, watch, like, comment, share"
        );
    }

    #[test]
    fn ratings_gate_by_age() {
        assert_eq!(ContentRating::General.minimum_age(), 0);
        assert_eq!(ContentRating::Teen.minimum_age(), 13);
        assert_eq!(ContentRating::Adult.minimum_age(), 18);
    }
}
