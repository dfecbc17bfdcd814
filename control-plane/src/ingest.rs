//! The feedback loop's input: batches of served responses (inferences) and viewers'
//! interactions that hosts ship to `POST /ingest/inferences` and `POST /ingest/interactions`.
//!
//! A batch is NDJSON (`application/x-ndjson`, one event per line), a JSON array
//! (`application/json`) or a MessagePack array (`application/msgpack`). Every event is
//! checked against its schema before any is stored, and a batch is stored whole or not at
//! all; each event carries a sender-chosen `event_id`, so a batch retried after a lost
//! acknowledgement is stored once.

use serde::{Deserialize, Serialize};

use crate::registry::{EventKind, NewEvent};

/// Events in one batch at most.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// One recommended item as it was shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServedItem {
    /// The video.
    pub video_id: u64,
    /// Position in the response, from 0.
    pub position: u32,
    /// The ranker's score.
    pub score: f64,
    /// Where it came from (personalized, category:<name>, promoted, popular).
    pub source: String,
}

/// A served response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InferenceEvent {
    /// Unique per event (hosts use the request id).
    pub event_id: String,
    /// The response's request id, which interactions refer to.
    pub request_id: String,
    /// The viewer; `None` for an anonymous request.
    #[serde(default)]
    pub user_id: Option<u64>,
    /// Unix milliseconds when it was served.
    pub served_at_ms: i64,
    /// The model version that answered.
    pub model_version: String,
    /// The experiment the viewer is in, if any.
    #[serde(default)]
    pub experiment: Option<String>,
    /// The experiment arm.
    #[serde(default)]
    pub variant: Option<String>,
    /// What was shown, in order.
    pub items: Vec<ServedItem>,
    /// The viewer features the request was served with (for the drift monitor).
    #[serde(default)]
    pub features: Option<ServingFeatures>,
}

/// The viewer features a request carried (its own or the stored profile's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServingFeatures {
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
}

/// A viewer's interaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InteractionEvent {
    /// Unique per event.
    pub event_id: String,
    /// The response the video was shown in, when it came from one.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The viewer.
    pub user_id: u64,
    /// The video.
    pub video_id: u64,
    /// The seed's interaction types: impression, click, watch, like, share, ...
    pub interaction_type: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// Seconds watched, for watches.
    #[serde(default)]
    pub watch_time_seconds: Option<f64>,
    /// The viewer's device.
    #[serde(default)]
    pub device: Option<String>,
    /// The video's position in that response, from 0.
    #[serde(default)]
    pub position: Option<u32>,
}

/// How a batch is encoded, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEncoding {
    /// One JSON event per line.
    Ndjson,
    /// A JSON array of events (or one event).
    Json,
    /// A MessagePack array of events.
    MessagePack,
}

impl BatchEncoding {
    /// The encoding a `Content-Type` names; `None` for anything else.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(Self::Ndjson)
            }
            "application/json" => Some(Self::Json),
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Some(Self::MessagePack)
            }
            _ => None,
        }
    }
}

fn values(encoding: BatchEncoding, body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    match encoding {
        BatchEncoding::Ndjson => {
            let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(index, line)| {
                    serde_json::from_str(line).map_err(|e| format!("line {}: {e}", index + 1))
                })
                .collect()
        }
        BatchEncoding::Json => match serde_json::from_slice(body) {
            Ok(serde_json::Value::Array(values)) => Ok(values),
            Ok(value) => Ok(vec![value]),
            Err(e) => Err(format!("not JSON: {e}")),
        },
        BatchEncoding::MessagePack => {
            rmp_serde::from_slice(body).map_err(|e| format!("not a MessagePack array: {e}"))
        }
    }
}

fn checked<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    index: usize,
) -> Result<T, String> {
    serde_json::from_value(value.clone()).map_err(|e| format!("event {}: {e}", index + 1))
}

fn check_id(what: &str, id: &str, index: usize) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        Err(format!(
            "event {}: {what} must be 1-128 characters",
            index + 1
        ))
    } else {
        Ok(())
    }
}

/// Parses and checks a batch; the error names the first bad event (1-based).
pub fn parse_batch(
    kind: EventKind,
    encoding: BatchEncoding,
    body: &[u8],
) -> Result<Vec<NewEvent>, String> {
    let values = values(encoding, body)?;
    if values.is_empty() {
        return Err("the batch holds no events".to_owned());
    }
    if values.len() > MAX_BATCH_EVENTS {
        return Err(format!(
            "{} events in one batch; send at most {MAX_BATCH_EVENTS}",
            values.len()
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            let (event_id, request_id, user_id) = match kind {
                EventKind::Inference => {
                    let event: InferenceEvent = checked(value, index)?;
                    check_id("request_id", &event.request_id, index)?;
                    (event.event_id, Some(event.request_id), event.user_id)
                }
                EventKind::Interaction => {
                    let event: InteractionEvent = checked(value, index)?;
                    (event.event_id, event.request_id, Some(event.user_id))
                }
            };
            check_id("event_id", &event_id, index)?;
            Ok(NewEvent {
                event_id,
                request_id,
                user_id,
                body: value.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERACTION: &str = r#"{"event_id":"i1","user_id":3,"video_id":9,"interaction_type":"watch","timestamp":100,"watch_time_seconds":30.5}"#;

    #[test]
    fn the_three_encodings_give_the_same_events() {
        let value: serde_json::Value = serde_json::from_str(INTERACTION).unwrap();
        let ndjson = format!("{INTERACTION}\n\n{INTERACTION}\n");
        let json = format!("[{INTERACTION},{INTERACTION}]");
        let msgpack = rmp_serde::to_vec_named(&vec![value.clone(), value]).unwrap();
        let from_ndjson = parse_batch(
            EventKind::Interaction,
            BatchEncoding::Ndjson,
            ndjson.as_bytes(),
        )
        .unwrap();
        let from_json =
            parse_batch(EventKind::Interaction, BatchEncoding::Json, json.as_bytes()).unwrap();
        let from_msgpack =
            parse_batch(EventKind::Interaction, BatchEncoding::MessagePack, &msgpack).unwrap();
        assert_eq!(from_ndjson.len(), 2);
        assert_eq!(from_ndjson[0].event_id, "i1");
        assert_eq!(from_ndjson[0].user_id, Some(3));
        let parsed = |events: &[NewEvent]| -> Vec<serde_json::Value> {
            events
                .iter()
                .map(|e| serde_json::from_str(&e.body).unwrap())
                .collect()
        };
        assert_eq!(parsed(&from_ndjson), parsed(&from_json));
        assert_eq!(parsed(&from_ndjson), parsed(&from_msgpack));
    }

    #[test]
    fn bad_batches_name_the_bad_event() {
        let missing_video =
            r#"{"event_id":"i2","user_id":3,"interaction_type":"watch","timestamp":1}"#;
        let body = format!("{INTERACTION}\n{missing_video}\n");
        let error = parse_batch(
            EventKind::Interaction,
            BatchEncoding::Ndjson,
            body.as_bytes(),
        )
        .unwrap_err();
        assert!(
            error.contains("event 2") && error.contains("video_id"),
            "{error}"
        );
        let error = parse_batch(
            EventKind::Interaction,
            BatchEncoding::Ndjson,
            b"{not json\n",
        )
        .unwrap_err();
        assert!(error.starts_with("line 1"), "{error}");
        assert!(parse_batch(EventKind::Interaction, BatchEncoding::Json, b"[]").is_err());
        let no_id = INTERACTION.replace(r#""event_id":"i1""#, r#""event_id":"""#);
        assert!(
            parse_batch(
                EventKind::Interaction,
                BatchEncoding::Json,
                no_id.as_bytes()
            )
            .is_err()
        );
        // An interaction is not an inference.
        assert!(
            parse_batch(
                EventKind::Inference,
                BatchEncoding::Json,
                INTERACTION.as_bytes()
            )
            .is_err()
        );
    }

    #[test]
    fn content_types_are_recognised() {
        assert_eq!(
            BatchEncoding::from_content_type("application/x-ndjson; charset=utf-8"),
            Some(BatchEncoding::Ndjson)
        );
        assert_eq!(
            BatchEncoding::from_content_type("Application/MsgPack"),
            Some(BatchEncoding::MessagePack)
        );
        assert_eq!(BatchEncoding::from_content_type("text/plain"), None);
    }
}
