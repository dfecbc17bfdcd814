//! Data capture for the feedback loop (the seed's inference tracker and ground-truth
//! collector): every served response and every interaction becomes an event, spooled on
//! disk and shipped in batches to the control plane's `POST /ingest/inferences` and
//! `POST /ingest/interactions`.
//!
//! Events wait in memory for at most one seal interval (1 s by default), then a sealed
//! segment (`SPOOL/<kind>/<sequence>.ndjson`) is written durably; the shipper sends sealed
//! segments oldest first and deletes each one only after the control plane's 200, backing
//! off exponentially while it is down. The spool is bounded: past its limit the oldest
//! segments are dropped, logged and counted, so a long outage costs the oldest events and
//! never the disk. Events carry ids (the request id for a response), so a segment resent
//! after a lost acknowledgement is stored once.
//!
//! Interactions are joined to the response that showed the video: when a client sends no
//! `request_id`, the host takes the viewer's most recent response that contained the
//! video, and its position there.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::metrics::Metrics;

/// The two event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Served responses.
    Inferences,
    /// Viewers' interactions.
    Interactions,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Inferences, Kind::Interactions];

    /// The folder under the spool and the ingest path segment.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inferences => "inferences",
            Self::Interactions => "interactions",
        }
    }
}

/// Where events go.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// The spool folder.
    pub spool: PathBuf,
    /// The control plane's base URL (`http://host:port`).
    pub ingest_url: String,
    /// Its API token.
    pub token: Option<String>,
    /// The spool's size limit in bytes.
    pub max_spool_bytes: u64,
    /// How long events wait in memory before their segment is sealed.
    pub seal_interval: Duration,
}

/// A response the viewer may still interact with.
#[derive(Debug, Clone)]
struct Shown {
    request_id: String,
    videos: Vec<u64>,
}

/// Viewers remembered for joining; past this the map is cleared (joins then need the
/// client's `request_id` until viewers come back).
const MAX_REMEMBERED_VIEWERS: usize = 200_000;

/// The capture: buffers, spool and join state.
pub struct Capture {
    settings: CaptureSettings,
    pending: Mutex<HashMap<Kind, Vec<String>>>,
    shown: Mutex<HashMap<u64, Shown>>,
    next_segment: AtomicU64,
    next_event: AtomicU64,
    event_prefix: String,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("settings", &self.settings)
            .finish()
    }
}

fn segments(folder: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let sequence = path
                .file_name()?
                .to_str()?
                .strip_suffix(".ndjson")?
                .parse()
                .ok()?;
            Some((sequence, path))
        })
        .collect();
    found.sort();
    found
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = path.parent().expect("segments live in a folder");
    let temporary = folder.join(format!(
        ".{}.tmp",
        path.file_name().expect("a segment name").to_string_lossy()
    ));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(folder).and_then(|dir| dir.sync_all())
}

impl Capture {
    /// Opens the spool (creating it; segments left by an earlier run are shipped too).
    pub fn open(settings: CaptureSettings, event_prefix: &str) -> anyhow::Result<Self> {
        let mut highest = 0;
        for kind in Kind::ALL {
            let folder = settings.spool.join(kind.name());
            std::fs::create_dir_all(&folder).map_err(|e| {
                anyhow::anyhow!("creating the capture spool {}: {e}", folder.display())
            })?;
            if let Some((sequence, _)) = segments(&folder).last() {
                highest = highest.max(*sequence);
            }
        }
        Ok(Self {
            settings,
            pending: Mutex::new(HashMap::new()),
            shown: Mutex::new(HashMap::new()),
            next_segment: AtomicU64::new(highest + 1),
            next_event: AtomicU64::new(0),
            event_prefix: event_prefix.to_owned(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &CaptureSettings {
        &self.settings
    }

    fn push(&self, kind: Kind, event: &Value) {
        self.pending
            .lock()
            .expect("capture buffer lock")
            .entry(kind)
            .or_default()
            .push(event.to_string());
    }

    /// Records a served response (with `metadata.request_id` set) for `user`, served with
    /// the viewer features `features` (the request's `user_features`).
    pub fn served(
        &self,
        user: Option<u64>,
        features: Option<&Value>,
        response: &Value,
        served_at_ms: i64,
    ) {
        let metadata = &response["metadata"];
        let Some(request_id) = metadata["request_id"].as_str() else {
            return;
        };
        let items: Vec<Value> = response["recommendations"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .enumerate()
                    .map(|(position, item)| {
                        json!({
                            "video_id": item["video_id"],
                            "position": position,
                            "score": item["score"],
                            "source": item["source"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(user) = user {
            let videos = items
                .iter()
                .filter_map(|item| item["video_id"].as_u64())
                .collect();
            let mut shown = self.shown.lock().expect("capture join lock");
            if shown.len() >= MAX_REMEMBERED_VIEWERS && !shown.contains_key(&user) {
                shown.clear();
            }
            shown.insert(
                user,
                Shown {
                    request_id: request_id.to_owned(),
                    videos,
                },
            );
        }
        self.push(
            Kind::Inferences,
            &json!({
                "event_id": request_id,
                "request_id": request_id,
                "user_id": user,
                "served_at_ms": served_at_ms,
                "model_version": metadata["model_version"],
                "experiment": metadata["experiment"],
                "variant": metadata["variant"],
                "items": items,
                "features": features.filter(|f| f.is_object()),
            }),
        );
    }

    /// Records an interaction, joined to the response that showed the video when the
    /// client did not name one.
    #[allow(clippy::too_many_arguments)]
    pub fn interaction(
        &self,
        user: u64,
        video: u64,
        kind: &str,
        timestamp: i64,
        watch_seconds: Option<f64>,
        request_id: Option<&str>,
        position: Option<u32>,
    ) {
        let (request_id, position) = match request_id {
            Some(id) => (Some(id.to_owned()), position),
            None => {
                let shown = self.shown.lock().expect("capture join lock");
                match shown.get(&user) {
                    Some(response) => match response.videos.iter().position(|v| *v == video) {
                        Some(index) => (Some(response.request_id.clone()), Some(index as u32)),
                        None => (None, position),
                    },
                    None => (None, position),
                }
            }
        };
        let number = self.next_event.fetch_add(1, Ordering::Relaxed);
        self.push(
            Kind::Interactions,
            &json!({
                "event_id": format!("{}-i{number:x}", self.event_prefix),
                "request_id": request_id,
                "user_id": user,
                "video_id": video,
                "interaction_type": kind,
                "timestamp": timestamp,
                "watch_time_seconds": watch_seconds,
                "position": position,
            }),
        );
    }

    /// Writes what is buffered into new sealed segments, then trims the spool to its
    /// limit (oldest first).
    pub fn seal(&self, metrics: &Metrics) -> std::io::Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("capture buffer lock"));
        if pending.values().all(Vec::is_empty) {
            // Nothing new on disk, so the spool's size has not grown.
            return Ok(());
        }
        for (kind, lines) in pending {
            if lines.is_empty() {
                continue;
            }
            let sequence = self.next_segment.fetch_add(1, Ordering::Relaxed);
            let path = self
                .settings
                .spool
                .join(kind.name())
                .join(format!("{sequence:020}.ndjson"));
            let mut text = lines.join("\n");
            text.push('\n');
            write_durably(&path, text.as_bytes())?;
            metrics.capture(kind.name(), "spooled", lines.len() as u64);
        }
        self.trim(metrics);
        Ok(())
    }

    fn trim(&self, metrics: &Metrics) {
        let mut all: Vec<(u64, PathBuf, u64, Kind)> = Kind::ALL
            .iter()
            .flat_map(|&kind| {
                segments(&self.settings.spool.join(kind.name()))
                    .into_iter()
                    .map(move |(sequence, path)| (sequence, path, kind))
            })
            .map(|(sequence, path, kind)| {
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                (sequence, path, size, kind)
            })
            .collect();
        all.sort_by_key(|(sequence, ..)| *sequence);
        let mut total: u64 = all.iter().map(|(_, _, size, _)| size).sum();
        for (_, path, size, kind) in all {
            if total <= self.settings.max_spool_bytes {
                break;
            }
            let events = std::fs::read(&path)
                .map_or(0, |bytes| bytes.iter().filter(|&&b| b == b'\n').count());
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                metrics.capture(kind.name(), "dropped", events as u64);
                tracing::warn!(
                    segment = %path.display(),
                    events,
                    "capture spool over its limit: dropped the oldest segment"
                );
            }
        }
    }

    /// Ships the oldest sealed segment of each kind; `Ok(true)` when something was sent.
    async fn ship_once(&self, client: &reqwest::Client, metrics: &Metrics) -> Result<bool, String> {
        let mut sent = false;
        for kind in Kind::ALL {
            let folder = self.settings.spool.join(kind.name());
            for (_, path) in segments(&folder) {
                let Ok(body) = std::fs::read(&path) else {
                    continue;
                };
                let events = body.iter().filter(|&&b| b == b'\n').count() as u64;
                let url = format!(
                    "{}/ingest/{}",
                    self.settings.ingest_url.trim_end_matches('/'),
                    kind.name()
                );
                let mut request = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body);
                if let Some(token) = &self.settings.token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
                let status = response.status();
                if status.is_success() {
                    let _ = std::fs::remove_file(&path);
                    metrics.capture(kind.name(), "shipped", events);
                    sent = true;
                } else if status == reqwest::StatusCode::BAD_REQUEST {
                    // The control plane will never take these events; keep them aside
                    // for a person instead of blocking the stream behind them.
                    let message = response.text().await.unwrap_or_default();
                    let rejected = self.settings.spool.join("rejected");
                    let _ = std::fs::create_dir_all(&rejected);
                    let target = rejected.join(format!(
                        "{}-{}",
                        kind.name(),
                        path.file_name().expect("a segment name").to_string_lossy()
                    ));
                    let _ = std::fs::rename(&path, &target);
                    metrics.capture(kind.name(), "rejected", events);
                    tracing::error!(segment = %target.display(), "the control plane refused a capture segment: {message}");
                } else {
                    let message = response.text().await.unwrap_or_default();
                    return Err(format!("{url}: {status}: {message}"));
                }
            }
        }
        Ok(sent)
    }

    /// Seals every interval and ships what is sealed, backing off from 1 s up to a minute
    /// while the control plane does not take it. Runs until the process ends.
    pub async fn run(self: std::sync::Arc<Self>, host: std::sync::Arc<crate::service::Host>) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client");
        let mut backoff = Duration::ZERO;
        loop {
            tokio::time::sleep(self.settings.seal_interval.max(backoff)).await;
            let sealing = self.clone();
            let sealing_host = host.clone();
            let sealed =
                tokio::task::spawn_blocking(move || sealing.seal(&sealing_host.metrics)).await;
            if let Ok(Err(e)) = sealed {
                tracing::error!("capture spool write failed: {e}");
            }
            match self.ship_once(&client, &host.metrics).await {
                Ok(_) => backoff = Duration::ZERO,
                Err(e) => {
                    host.metrics.capture_ship_failures.inc();
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                    tracing::warn!(
                        "shipping captured events failed (retrying in {backoff:?}): {e}"
                    );
                }
            }
        }
    }

    /// Seals what is buffered (at shutdown).
    pub fn flush(&self, metrics: &Metrics) {
        if let Err(e) = self.seal(metrics) {
            tracing::error!("capture spool write failed at shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(spool: &Path, max_spool_bytes: u64) -> Capture {
        Capture::open(
            CaptureSettings {
                spool: spool.to_owned(),
                ingest_url: "http://127.0.0.1:9".into(),
                token: None,
                max_spool_bytes,
                seal_interval: Duration::from_secs(1),
            },
            "test",
        )
        .unwrap()
    }

    fn response(request_id: &str, videos: &[u64]) -> Value {
        json!({
            "recommendations": videos.iter().map(|v| json!({"video_id": v, "score": 0.5, "source": "personalized"})).collect::<Vec<_>>(),
            "metadata": {"request_id": request_id, "model_version": "v1", "experiment": null, "variant": null},
        })
    }

    fn lines(spool: &Path, kind: Kind) -> Vec<Value> {
        segments(&spool.join(kind.name()))
            .into_iter()
            .flat_map(|(_, path)| {
                std::fs::read_to_string(path)
                    .unwrap()
                    .lines()
                    .map(|line| serde_json::from_str(line).unwrap())
                    .collect::<Vec<Value>>()
            })
            .collect()
    }

    #[test]
    fn interactions_are_joined_to_the_response_that_showed_the_video() {
        let folder = tempfile::tempdir().unwrap();
        let capture = capture(folder.path(), 1 << 20);
        let metrics = Metrics::new();
        let features = json!({"country": "US", "age": 30});
        capture.served(
            Some(7),
            Some(&features),
            &response("r1", &[10, 11, 12]),
            1000,
        );
        capture.served(Some(7), None, &response("r2", &[20, 21]), 2000);
        capture.interaction(7, 21, "click", 3, None, None, None);
        capture.interaction(7, 10, "click", 4, None, None, None);
        capture.interaction(7, 99, "watch", 5, Some(3.0), Some("client-said"), Some(4));
        capture.seal(&metrics).unwrap();
        let inferences = lines(folder.path(), Kind::Inferences);
        assert_eq!(inferences.len(), 2);
        assert_eq!(inferences[0]["event_id"], "r1");
        assert_eq!(inferences[0]["items"][2]["position"], 2);
        assert_eq!(inferences[0]["features"]["country"], "US");
        assert_eq!(inferences[1]["features"], Value::Null);
        let interactions = lines(folder.path(), Kind::Interactions);
        assert_eq!(
            (&interactions[0]["request_id"], &interactions[0]["position"]),
            (&json!("r2"), &json!(1)),
            "the latest response that showed the video"
        );
        assert_eq!(
            interactions[1]["request_id"],
            Value::Null,
            "r2 replaced r1 as the viewer's latest response"
        );
        assert_eq!(interactions[2]["request_id"], "client-said");
        assert_ne!(interactions[0]["event_id"], interactions[1]["event_id"]);
    }

    #[test]
    fn the_spool_keeps_its_bound_by_dropping_the_oldest() {
        let folder = tempfile::tempdir().unwrap();
        let capture = capture(folder.path(), 2_000);
        let metrics = Metrics::new();
        for round in 0..20 {
            capture.served(
                Some(round),
                None,
                &response(&format!("r{round}"), &[1, 2, 3]),
                0,
            );
            capture.seal(&metrics).unwrap();
        }
        let kept = lines(folder.path(), Kind::Inferences);
        assert!(kept.len() < 20 && !kept.is_empty());
        assert_eq!(
            kept.last().unwrap()["event_id"],
            "r19",
            "the newest survive"
        );
        let total: u64 = segments(&folder.path().join("inferences"))
            .iter()
            .map(|(_, path)| std::fs::metadata(path).unwrap().len())
            .sum();
        assert!(total <= 2_000);
        // A restart continues the sequence after the segments it finds.
        let reopened = self::capture(folder.path(), 2_000);
        reopened.served(Some(1), None, &response("after-restart", &[1]), 0);
        reopened.seal(&metrics).unwrap();
        assert_eq!(
            lines(folder.path(), Kind::Inferences).last().unwrap()["event_id"],
            "after-restart"
        );
    }
}
