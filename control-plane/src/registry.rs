//! The registry: what the control plane knows, in one embedded SQLite file that survives
//! restarts: registered bundles and profiles, every channel's publish and rollback history
//! (the manifest each one wrote), and the events that hosts ship to the ingest endpoints.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`, so a transaction is on disk before
//! its commit returns: an ingest batch acknowledged with a 200 survives a kill.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::experiments::ArmOutcome;
use crate::pipeline::{DataVersion, RunRecord};
use crate::publish::{Artifact, Manifest};

/// A registry failure.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// SQLite failed.
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored JSON column did not parse (the file was edited by hand or is corrupt).
    #[error("registry database holds malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Its folder could not be created.
    #[error("registry folder: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, RegistryError>;

/// A registered bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleRecord {
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Its key in the object store.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// The model version in its header.
    pub model_version: String,
    /// The bundle container's format version.
    pub format_version: u32,
    /// Unix seconds when it was built.
    pub created_at: i64,
    /// Its lineage (data version, config, code version, parent run).
    pub lineage: BTreeMap<String, String>,
    /// Its sections: kind, length, sha256.
    #[schema(value_type = Vec<Object>)]
    pub sections: Vec<edge::bundle::SectionEntry>,
    /// Unix seconds when it was registered.
    pub registered_at: i64,
}

/// A registered profiles artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProfilesRecord {
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Its key in the object store.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Viewers in it.
    pub users: u64,
    /// Unix seconds when it was registered.
    pub registered_at: i64,
}

/// What happened to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChannelAction {
    /// A bundle was published.
    Publish,
    /// The channel went back to the bundle before the current one.
    Rollback,
    /// An experiment started: its arms' bundles serve their shares.
    StartExperiment,
    /// An experiment ended: one bundle serves everyone again.
    StopExperiment,
}

impl ChannelAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Rollback => "rollback",
            Self::StartExperiment => "start_experiment",
            Self::StopExperiment => "stop_experiment",
        }
    }
}

/// One entry of a channel's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChannelEvent {
    /// Order of events across all channels.
    pub id: i64,
    /// Publish or rollback.
    pub action: ChannelAction,
    /// The manifest it wrote.
    pub manifest: Manifest,
}

/// A channel: what it serves and how it got there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Channel {
    /// Its name.
    pub name: String,
    /// The manifest it serves now.
    pub current: Manifest,
    /// Newest first.
    pub history: Vec<ChannelEvent>,
}

/// An experiment whose arms are bundles, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExperimentRecord {
    /// Its name.
    pub name: String,
    /// The channel it runs on.
    pub channel: String,
    /// Its assignment salt.
    pub salt: String,
    /// The arms; the first is the control.
    pub variants: Vec<crate::publish::ManifestVariant>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, once stopped.
    pub stopped_at: Option<i64>,
    /// The arm that serves everyone after the stop.
    pub winner: Option<String>,
}

/// Where an ingested event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A served response.
    Inference,
    /// A viewer's interaction.
    Interaction,
}

impl EventKind {
    /// Its name in the database and in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::Interaction => "interaction",
        }
    }
}

/// An event ready to store: its id (for deduplication of retried batches), the indexed
/// columns and the whole event as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The sender's unique id of the event.
    pub event_id: String,
    /// The response it belongs to, when known.
    pub request_id: Option<String>,
    /// The viewer (`None` for an anonymous response).
    pub user_id: Option<u64>,
    /// The event as JSON.
    pub body: String,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Its sequence number (ascending in arrival order; page with `after`).
    pub sequence: i64,
    /// Unix milliseconds when it was stored.
    pub received_at_ms: i64,
    /// The event as sent.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

/// The registry.
pub struct Registry {
    connection: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    format_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    lineage TEXT NOT NULL,
    sections TEXT NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS profiles (
    sha256 TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    users INTEGER NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    action TEXT NOT NULL,
    bundle TEXT NOT NULL REFERENCES bundles(sha256),
    manifest TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS channel_events_by_channel ON channel_events(channel, id);
CREATE TABLE IF NOT EXISTS events (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    request_id TEXT,
    user_id INTEGER,
    received_at_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (kind, event_id)
);
CREATE INDEX IF NOT EXISTS events_by_request ON events(request_id);
CREATE TABLE IF NOT EXISTS data_versions (
    sha256 TEXT PRIMARY KEY,
    registered_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
";

impl Registry {
    /// Where the registry of a state folder lives.
    pub fn path_in(state: &Path) -> std::path::PathBuf {
        state.join("registry.sqlite")
    }

    /// Opens (creating if needed) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)?;
        }
        Self::from_connection(Connection::open(path)?)
    }

    /// A registry that lives in memory only (tests).
    pub fn in_memory() -> Result<Self> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(connection: Connection) -> Result<Self> {
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (its own
        // transactions roll back), so the connection stays usable.
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a bundle; `false` when it was registered already (nothing changes).
    pub fn add_bundle(&self, bundle: &BundleRecord) -> Result<bool> {
        let inserted = self.lock().execute(
            "INSERT OR IGNORE INTO bundles
             (sha256, key, size, model_version, format_version, created_at, lineage, sections,
              registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                bundle.sha256,
                bundle.key,
                bundle.size as i64,
                bundle.model_version,
                bundle.format_version,
                bundle.created_at,
                serde_json::to_string(&bundle.lineage)?,
                serde_json::to_string(&bundle.sections)?,
                bundle.registered_at,
            ],
        )?;
        Ok(inserted == 1)
    }

    fn bundle_from_row(
        row: &rusqlite::Row<'_>,
    ) -> rusqlite::Result<(BundleRecord, String, String)> {
        Ok((
            BundleRecord {
                sha256: row.get(0)?,
                key: row.get(1)?,
                size: row.get::<_, i64>(2)? as u64,
                model_version: row.get(3)?,
                format_version: row.get(4)?,
                created_at: row.get(5)?,
                lineage: BTreeMap::new(),
                sections: Vec::new(),
                registered_at: row.get(8)?,
            },
            row.get(6)?,
            row.get(7)?,
        ))
    }

    fn finish_bundle(
        (mut bundle, lineage, sections): (BundleRecord, String, String),
    ) -> Result<BundleRecord> {
        bundle.lineage = serde_json::from_str(&lineage)?;
        bundle.sections = serde_json::from_str(&sections)?;
        Ok(bundle)
    }

    const BUNDLE_COLUMNS: &str = "sha256, key, size, model_version, format_version, created_at, \
                                  lineage, sections, registered_at";

    /// A registered bundle.
    pub fn bundle(&self, sha256: &str) -> Result<Option<BundleRecord>> {
        let row = self
            .lock()
            .query_row(
                &format!(
                    "SELECT {} FROM bundles WHERE sha256 = ?1",
                    Self::BUNDLE_COLUMNS
                ),
                [sha256],
                Self::bundle_from_row,
            )
            .optional()?;
        row.map(Self::finish_bundle).transpose()
    }

    /// Every registered bundle, newest registration first.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>> {
        let connection = self.lock();
        let mut statement = connection.prepare(&format!(
            "SELECT {} FROM bundles ORDER BY registered_at DESC, sha256",
            Self::BUNDLE_COLUMNS
        ))?;
        let rows = statement
            .query_map([], Self::bundle_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(Self::finish_bundle).collect()
    }

    /// Registers a profiles artifact; `false` when it was registered already.
    pub fn add_profiles(&self, profiles: &ProfilesRecord) -> Result<bool> {
        let inserted = self.lock().execute(
            "INSERT OR IGNORE INTO profiles (sha256, key, size, users, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                profiles.sha256,
                profiles.key,
                profiles.size as i64,
                profiles.users as i64,
                profiles.registered_at,
            ],
        )?;
        Ok(inserted == 1)
    }

    /// A registered profiles artifact.
    pub fn profiles(&self, sha256: &str) -> Result<Option<ProfilesRecord>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT sha256, key, size, users, registered_at FROM profiles WHERE sha256 = ?1",
                [sha256],
                |row| {
                    Ok(ProfilesRecord {
                        sha256: row.get(0)?,
                        key: row.get(1)?,
                        size: row.get::<_, i64>(2)? as u64,
                        users: row.get::<_, i64>(3)? as u64,
                        registered_at: row.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records that `manifest` was written for its channel.
    pub fn record_channel_event(
        &self,
        action: ChannelAction,
        manifest: &Manifest,
    ) -> Result<ChannelEvent> {
        let connection = self.lock();
        connection.execute(
            "INSERT INTO channel_events (channel, action, bundle, manifest, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                manifest.channel,
                action.as_str(),
                manifest.bundle.sha256,
                serde_json::to_string(manifest)?,
                manifest.published_at,
            ],
        )?;
        Ok(ChannelEvent {
            id: connection.last_insert_rowid(),
            action,
            manifest: manifest.clone(),
        })
    }

    fn channel_events(&self, channel: &str) -> Result<Vec<ChannelEvent>> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT id, action, manifest FROM channel_events WHERE channel = ?1 ORDER BY id",
        )?;
        let rows = statement
            .query_map([channel], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, action, manifest)| {
                Ok(ChannelEvent {
                    id,
                    action: match action.as_str() {
                        "rollback" => ChannelAction::Rollback,
                        "start_experiment" => ChannelAction::StartExperiment,
                        "stop_experiment" => ChannelAction::StopExperiment,
                        _ => ChannelAction::Publish,
                    },
                    manifest: serde_json::from_str(&manifest)?,
                })
            })
            .collect()
    }

    /// A channel with its history; `None` when nothing was ever published to it.
    pub fn channel(&self, name: &str) -> Result<Option<Channel>> {
        let mut history = self.channel_events(name)?;
        history.reverse();
        Ok(history
            .first()
            .map(|latest| latest.manifest.clone())
            .map(|current| Channel {
                name: name.to_owned(),
                current,
                history,
            }))
    }

    /// Every channel's current manifest, by name.
    pub fn channels(&self) -> Result<Vec<Manifest>> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT manifest FROM channel_events WHERE id IN
             (SELECT MAX(id) FROM channel_events GROUP BY channel) ORDER BY channel",
        )?;
        let rows = statement
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.iter()
            .map(|text| Ok(serde_json::from_str(text)?))
            .collect()
    }

    /// What a rollback of `channel` restores: every manifest written (publishes,
    /// experiments started or stopped) pushes onto the channel's stack, rollbacks pop it,
    /// and the target is the entry below the top. `None` when the channel has fewer than
    /// two entries.
    pub fn rollback_target(&self, channel: &str) -> Result<Option<Manifest>> {
        let mut stack: Vec<Manifest> = Vec::new();
        for event in self.channel_events(channel)? {
            match event.action {
                ChannelAction::Rollback => {
                    stack.pop();
                }
                _ => stack.push(event.manifest),
            }
        }
        Ok(stack
            .len()
            .checked_sub(2)
            .map(|below| stack.swap_remove(below)))
    }

    /// Stores a batch in one transaction (all or nothing, on disk when this returns);
    /// events whose id is stored already are skipped, so a retried batch is harmless.
    /// Returns (stored, duplicates).
    pub fn ingest(
        &self,
        kind: EventKind,
        events: &[NewEvent],
        received_at_ms: i64,
    ) -> Result<(usize, usize)> {
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let mut stored = 0;
        {
            let mut insert = transaction.prepare(
                "INSERT OR IGNORE INTO events
                 (kind, event_id, request_id, user_id, received_at_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for event in events {
                stored += insert.execute(params![
                    kind.as_str(),
                    event.event_id,
                    event.request_id,
                    event.user_id.map(|user| user as i64),
                    received_at_ms,
                    event.body,
                ])?;
            }
        }
        transaction.commit()?;
        Ok((stored, events.len() - stored))
    }

    /// Stored events of a kind with a sequence number above `after`, oldest first.
    pub fn events(&self, kind: EventKind, after: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT sequence, received_at_ms, body FROM events
             WHERE kind = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3",
        )?;
        let rows = statement
            .query_map(params![kind.as_str(), after, limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(sequence, received_at_ms, body)| {
                Ok(StoredEvent {
                    sequence,
                    received_at_ms,
                    event: serde_json::from_str(&body)?,
                })
            })
            .collect()
    }

    /// How many events of a kind are stored.
    pub fn event_count(&self, kind: EventKind) -> Result<u64> {
        Ok(self.lock().query_row(
            "SELECT COUNT(*) FROM events WHERE kind = ?1",
            [kind.as_str()],
            |row| row.get::<_, i64>(0),
        )? as u64)
    }
}

impl Registry {
    /// Records a data version (kept as first seen when it is known already).
    pub fn add_data_version(&self, version: &DataVersion) -> Result<bool> {
        let inserted = self.lock().execute(
            "INSERT OR IGNORE INTO data_versions (sha256, registered_at, record) VALUES (?1, ?2, ?3)",
            params![version.sha256, version.registered_at, serde_json::to_string(version)?],
        )?;
        Ok(inserted == 1)
    }

    /// Every data version, newest first.
    pub fn data_versions(&self) -> Result<Vec<DataVersion>> {
        self.json_rows(
            "SELECT record FROM data_versions ORDER BY registered_at DESC, sha256",
            [],
        )
    }

    /// Creates or replaces a run's record.
    pub fn save_run(&self, run: &RunRecord) -> Result<()> {
        self.lock().execute(
            "INSERT INTO runs (id, status, created_at, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record",
            params![
                run.id,
                run.status.as_str(),
                run.created_at,
                serde_json::to_string(run)?
            ],
        )?;
        Ok(())
    }

    /// Records a new experiment; `false` when the name is taken.
    pub fn add_experiment(&self, experiment: &ExperimentRecord) -> Result<bool> {
        let inserted = self.lock().execute(
            "INSERT OR IGNORE INTO experiments (name, created_at, record) VALUES (?1, ?2, ?3)",
            params![
                experiment.name,
                experiment.created_at,
                serde_json::to_string(experiment)?
            ],
        )?;
        Ok(inserted == 1)
    }

    /// Replaces an experiment's record (when it stops).
    pub fn save_experiment(&self, experiment: &ExperimentRecord) -> Result<()> {
        self.lock().execute(
            "UPDATE experiments SET record = ?2 WHERE name = ?1",
            params![experiment.name, serde_json::to_string(experiment)?],
        )?;
        Ok(())
    }

    /// An experiment.
    pub fn experiment(&self, name: &str) -> Result<Option<ExperimentRecord>> {
        Ok(self
            .json_rows("SELECT record FROM experiments WHERE name = ?1", [name])?
            .pop())
    }

    /// Every experiment, newest first.
    pub fn experiments(&self) -> Result<Vec<ExperimentRecord>> {
        self.json_rows(
            "SELECT record FROM experiments ORDER BY created_at DESC, name",
            [],
        )
    }

    /// A run.
    pub fn run(&self, id: &str) -> Result<Option<RunRecord>> {
        Ok(self
            .json_rows("SELECT record FROM runs WHERE id = ?1", [id])?
            .pop())
    }

    /// Every run, newest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        self.json_rows(
            "SELECT record FROM runs ORDER BY created_at DESC, id DESC",
            [],
        )
    }

    /// Outcomes per arm of `experiment` (`Some`) or per model version (`None`), from the
    /// ingested responses and the interactions joined to them by request id.
    pub fn arm_outcomes(&self, experiment: Option<&str>) -> Result<Vec<ArmOutcome>> {
        let (arm, filter) = match experiment {
            Some(_) => (
                "COALESCE(json_extract(body, '$.variant'), '(none)')",
                "json_extract(body, '$.experiment') = ?1",
            ),
            None => ("json_extract(body, '$.model_version')", "?1 IS NULL"),
        };
        let connection = self.lock();
        let mut served = connection.prepare(&format!(
            "SELECT {arm}, COUNT(*), COALESCE(SUM(json_array_length(body, '$.items')), 0)
             FROM events WHERE kind = 'inference' AND {filter} GROUP BY 1"
        ))?;
        let mut outcomes: BTreeMap<String, ArmOutcome> = BTreeMap::new();
        let rows = served.query_map([experiment], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (name, responses, impressions) = row?;
            outcomes.insert(
                name.clone(),
                ArmOutcome {
                    arm: name,
                    responses: responses as u64,
                    impressions: impressions as u64,
                    clicks: 0,
                    watches: 0,
                },
            );
        }
        let joined_arm = arm.replace("body", "shown.body");
        let joined_filter = filter.replace("body", "shown.body");
        let mut engaged = connection.prepare(&format!(
            "SELECT {joined_arm}, json_extract(done.body, '$.interaction_type'),
                    COUNT(DISTINCT done.request_id || ':' || json_extract(done.body, '$.video_id'))
             FROM events done JOIN events shown
               ON shown.kind = 'inference' AND shown.request_id = done.request_id
             WHERE done.kind = 'interaction' AND {joined_filter}
               AND json_extract(done.body, '$.interaction_type') IN ('click', 'watch')
             GROUP BY 1, 2"
        ))?;
        let rows = engaged.query_map([experiment], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (name, kind, count) = row?;
            if let Some(outcome) = outcomes.get_mut(&name) {
                match kind.as_str() {
                    "click" => outcome.clicks = count as u64,
                    _ => outcome.watches = count as u64,
                }
            }
        }
        Ok(outcomes.into_values().collect())
    }

    fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        parameters: impl rusqlite::Params,
    ) -> Result<Vec<T>> {
        let connection = self.lock();
        let mut statement = connection.prepare(sql)?;
        let texts = statement
            .query_map(parameters, |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        texts
            .iter()
            .map(|text| Ok(serde_json::from_str(text)?))
            .collect()
    }
}

impl BundleRecord {
    /// The record of a parsed bundle stored as `artifact`.
    pub fn new(
        header: &edge::bundle::BundleHeader,
        artifact: &Artifact,
        registered_at: i64,
    ) -> Self {
        Self {
            sha256: artifact.sha256.clone(),
            key: artifact.key.clone(),
            size: artifact.size,
            model_version: header.model_version.clone(),
            format_version: header.format_version,
            created_at: header.created_at,
            lineage: header.lineage.clone(),
            sections: header.sections.clone(),
            registered_at,
        }
    }

    /// Its artifact entry for a manifest.
    pub fn artifact(&self) -> Artifact {
        Artifact {
            key: self.key.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::MANIFEST_FORMAT;

    fn bundle(sha: char) -> BundleRecord {
        let sha256 = sha.to_string().repeat(64);
        BundleRecord {
            key: format!("bundles/{sha256}.bundle"),
            sha256,
            size: 10,
            model_version: format!("v-{sha}"),
            format_version: 1,
            created_at: 1,
            lineage: BTreeMap::from([("data".to_owned(), "d1".to_owned())]),
            sections: Vec::new(),
            registered_at: 2,
        }
    }

    fn manifest(record: &BundleRecord, at: i64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            channel: "production".to_owned(),
            model_version: record.model_version.clone(),
            bundle: record.artifact(),
            profiles: None,
            published_at: at,
            experiment: None,
        }
    }

    #[test]
    fn bundles_round_trip_and_register_once() {
        let registry = Registry::in_memory().unwrap();
        let record = bundle('a');
        assert!(registry.add_bundle(&record).unwrap());
        assert!(!registry.add_bundle(&record).unwrap());
        assert_eq!(
            registry.bundle(&record.sha256).unwrap(),
            Some(record.clone())
        );
        assert_eq!(registry.bundles().unwrap(), vec![record]);
        assert_eq!(registry.bundle(&"f".repeat(64)).unwrap(), None);
    }

    #[test]
    fn rollback_pops_the_channel_stack() {
        let registry = Registry::in_memory().unwrap();
        let (a, b, c) = (bundle('a'), bundle('b'), bundle('c'));
        for record in [&a, &b, &c] {
            registry.add_bundle(record).unwrap();
        }
        assert_eq!(registry.rollback_target("production").unwrap(), None);
        registry
            .record_channel_event(ChannelAction::Publish, &manifest(&a, 1))
            .unwrap();
        assert_eq!(registry.rollback_target("production").unwrap(), None);
        registry
            .record_channel_event(ChannelAction::Publish, &manifest(&b, 2))
            .unwrap();
        registry
            .record_channel_event(ChannelAction::Publish, &manifest(&c, 3))
            .unwrap();
        let target = registry.rollback_target("production").unwrap().unwrap();
        assert_eq!(target.bundle.sha256, b.sha256);
        registry
            .record_channel_event(ChannelAction::Rollback, &manifest(&b, 4))
            .unwrap();
        let target = registry.rollback_target("production").unwrap().unwrap();
        assert_eq!(
            target.bundle.sha256, a.sha256,
            "a second rollback goes further back"
        );
        registry
            .record_channel_event(ChannelAction::Rollback, &manifest(&a, 5))
            .unwrap();
        assert_eq!(registry.rollback_target("production").unwrap(), None);
        let channel = registry.channel("production").unwrap().unwrap();
        assert_eq!(channel.current.bundle.sha256, a.sha256);
        assert_eq!(channel.history.len(), 5);
        assert_eq!(channel.history[0].action, ChannelAction::Rollback);
        assert_eq!(registry.channels().unwrap().len(), 1);
        assert!(registry.channel("canary").unwrap().is_none());
    }

    #[test]
    fn outcomes_join_interactions_to_the_arm_that_served() {
        let registry = Registry::in_memory().unwrap();
        let served = |request: &str, variant: &str, items: usize| NewEvent {
            event_id: request.to_owned(),
            request_id: Some(request.to_owned()),
            user_id: Some(1),
            body: serde_json::json!({
                "event_id": request, "request_id": request, "model_version": "m1",
                "experiment": "e", "variant": variant,
                "items": (0..items).map(|v| serde_json::json!({"video_id": v})).collect::<Vec<_>>(),
            })
            .to_string(),
        };
        let did = |id: &str, request: &str, video: u64, kind: &str| {
            NewEvent {
            event_id: id.to_owned(),
            request_id: Some(request.to_owned()),
            user_id: Some(1),
            body: serde_json::json!({"event_id": id, "request_id": request, "video_id": video, "interaction_type": kind}).to_string(),
        }
        };
        registry
            .ingest(
                EventKind::Inference,
                &[
                    served("r1", "a", 5),
                    served("r2", "a", 5),
                    served("r3", "b", 4),
                ],
                1,
            )
            .unwrap();
        registry
            .ingest(
                EventKind::Interaction,
                &[
                    did("i1", "r1", 0, "click"),
                    did("i2", "r1", 0, "click"), // the same video clicked twice counts once
                    did("i3", "r1", 1, "watch"),
                    did("i4", "r3", 2, "click"),
                    did("i5", "r3", 2, "like"),
                    did("i6", "unknown", 2, "click"), // joins nothing
                ],
                2,
            )
            .unwrap();
        let outcomes = registry.arm_outcomes(Some("e")).unwrap();
        let summary: Vec<(&str, u64, u64, u64, u64)> = outcomes
            .iter()
            .map(|o| {
                (
                    o.arm.as_str(),
                    o.responses,
                    o.impressions,
                    o.clicks,
                    o.watches,
                )
            })
            .collect();
        assert_eq!(summary, [("a", 2, 10, 1, 1), ("b", 1, 4, 1, 0)]);
        assert!(registry.arm_outcomes(Some("other")).unwrap().is_empty());
        let by_model = registry.arm_outcomes(None).unwrap();
        assert_eq!(
            (
                by_model[0].arm.as_str(),
                by_model[0].impressions,
                by_model[0].clicks
            ),
            ("m1", 14, 2)
        );
    }

    #[test]
    fn retried_events_are_stored_once() {
        let registry = Registry::in_memory().unwrap();
        let event = |id: &str| NewEvent {
            event_id: id.to_owned(),
            request_id: Some("r1".to_owned()),
            user_id: Some(7),
            body: format!(r#"{{"event_id":"{id}"}}"#),
        };
        let batch = [event("e1"), event("e2")];
        assert_eq!(
            registry.ingest(EventKind::Inference, &batch, 10).unwrap(),
            (2, 0)
        );
        assert_eq!(
            registry
                .ingest(EventKind::Inference, &[event("e2"), event("e3")], 11)
                .unwrap(),
            (1, 1)
        );
        // The same id of another kind is another event.
        assert_eq!(
            registry.ingest(EventKind::Interaction, &batch, 12).unwrap(),
            (2, 0)
        );
        let stored = registry.events(EventKind::Inference, 0, 10).unwrap();
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[2].event["event_id"], "e3");
        let after = registry
            .events(EventKind::Inference, stored[0].sequence, 10)
            .unwrap();
        assert_eq!(after.len(), 2);
        assert_eq!(registry.event_count(EventKind::Interaction).unwrap(), 2);
    }
}
