//! The feedback loop's merge job: what hosts served and what viewers did, from the
//! registry's ingested events, joined by request id into labeled training data and
//! merged into a new data set (a new data version) that the same pipeline retrains on.
//!
//! For every item of every logged response the job writes one labeled row
//! (`feedback_labels.csv`: request, viewer, video, position, model version, experiment
//! arm, label 1 when the viewer engaged with it from that response, 0 when it was shown
//! and ignored) and one impression interaction; every interaction becomes an
//! interaction row. Events about viewers or videos the base data set does not know are
//! counted and left out (they have no features to train on).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, bail};
use edge::entities::{Interaction, InteractionType};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::ingest::{InferenceEvent, InteractionEvent};
use crate::pipeline::{DataVersion, data_version};
use crate::registry::{EventKind, Registry};

/// The labeled rows' file in the merged data set.
pub const LABELS_FILE: &str = "feedback_labels.csv";

/// What a merge did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MergeReport {
    /// The base data set.
    pub base: String,
    /// The merged data set.
    pub out: String,
    /// Logged responses read.
    pub inferences: u64,
    /// Logged interactions read.
    pub interactions: u64,
    /// Labeled rows written (one per shown item).
    pub labeled: u64,
    /// Of which engaged (label 1).
    pub engaged: u64,
    /// Interaction rows added (impressions and engagements).
    pub rows_added: u64,
    /// Events left out: unknown viewer or video, or an unreadable event.
    pub skipped: u64,
    /// The merged data set's version, registered.
    pub data_version: DataVersion,
}

#[derive(Serialize)]
struct LabeledRow<'a> {
    request_id: &'a str,
    user_id: u64,
    video_id: u64,
    position: u32,
    score: f64,
    source: &'a str,
    model_version: &'a str,
    experiment: &'a str,
    variant: &'a str,
    served_at: i64,
    label: u8,
    engagements: String,
}

/// Every stored event of a kind that reads as `T`; `skipped` counts those that do not.
pub fn all_events<T: serde::de::DeserializeOwned>(
    registry: &Registry,
    kind: EventKind,
    skipped: &mut u64,
) -> anyhow::Result<Vec<T>> {
    let mut after = 0;
    let mut events = Vec::new();
    loop {
        let page = registry.events(kind, after, 10_000)?;
        let Some(last) = page.last() else {
            return Ok(events);
        };
        after = last.sequence;
        for stored in page {
            match serde_json::from_value(stored.event) {
                Ok(event) => events.push(event),
                Err(_) => *skipped += 1,
            }
        }
    }
}

/// Merges the registry's events into `base`, writing the new data set to `out` (which
/// must not exist yet) and registering its data version.
pub fn merge(registry: &Registry, base: &Path, out: &Path) -> anyhow::Result<MergeReport> {
    if out.exists() {
        bail!(
            "{} exists already: the merged data set goes to a new folder",
            out.display()
        );
    }
    let base_version = data_version(base)?;
    let mut dataset = Dataset::load(base)?;
    let users: HashSet<u64> = dataset.users.iter().map(|u| u.user_id).collect();
    let videos: HashSet<u64> = dataset.videos.iter().map(|v| v.video_id).collect();
    let mut skipped = 0;
    let inferences: Vec<InferenceEvent> = all_events(registry, EventKind::Inference, &mut skipped)?;
    let interactions: Vec<InteractionEvent> =
        all_events(registry, EventKind::Interaction, &mut skipped)?;

    // Engagements by (request, video): what makes a shown item a positive.
    let mut engaged: HashMap<(&str, u64), Vec<&str>> = HashMap::new();
    for interaction in &interactions {
        if let Some(request) = &interaction.request_id
            && interaction.interaction_type != "impression"
        {
            engaged
                .entry((request.as_str(), interaction.video_id))
                .or_default()
                .push(interaction.interaction_type.as_str());
        }
    }

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let labels_path = out.join(LABELS_FILE);
    let mut labels = csv::Writer::from_path(&labels_path)
        .with_context(|| format!("writing {}", labels_path.display()))?;
    let (mut labeled, mut positives, mut rows_added) = (0u64, 0u64, 0u64);
    for inference in &inferences {
        let Some(user) = inference.user_id.filter(|user| users.contains(user)) else {
            skipped += 1;
            continue;
        };
        let served_at = inference.served_at_ms.div_euclid(1000);
        for item in &inference.items {
            if !videos.contains(&item.video_id) {
                skipped += 1;
                continue;
            }
            let kinds = engaged
                .get(&(inference.request_id.as_str(), item.video_id))
                .map(|kinds| kinds.join("+"))
                .unwrap_or_default();
            let label = u8::from(!kinds.is_empty());
            labels.serialize(LabeledRow {
                request_id: &inference.request_id,
                user_id: user,
                video_id: item.video_id,
                position: item.position,
                score: item.score,
                source: &item.source,
                model_version: &inference.model_version,
                experiment: inference.experiment.as_deref().unwrap_or(""),
                variant: inference.variant.as_deref().unwrap_or(""),
                served_at,
                label,
                engagements: kinds,
            })?;
            labeled += 1;
            positives += u64::from(label);
            dataset.interactions.push(Interaction {
                user_id: user,
                video_id: item.video_id,
                timestamp: served_at,
                interaction_type: InteractionType::Impression,
                watch_seconds: None,
                device: "unknown".to_owned(),
            });
            rows_added += 1;
        }
    }
    labels.flush()?;
    for interaction in &interactions {
        let kind = interaction.interaction_type.parse::<InteractionType>();
        let known = users.contains(&interaction.user_id) && videos.contains(&interaction.video_id);
        let (Ok(kind), true) = (kind, known) else {
            skipped += 1;
            continue;
        };
        if kind == InteractionType::Impression {
            // The logged response already stands for it.
            continue;
        }
        dataset.interactions.push(Interaction {
            user_id: interaction.user_id,
            video_id: interaction.video_id,
            timestamp: interaction.timestamp,
            interaction_type: kind,
            watch_seconds: interaction
                .watch_time_seconds
                .map(|seconds| seconds.round().clamp(0.0, f64::from(u32::MAX)) as u32),
            device: interaction
                .device
                .clone()
                .unwrap_or_else(|| "unknown".to_owned()),
        });
        rows_added += 1;
    }
    dataset
        .interactions
        .sort_by_key(|i| (i.timestamp, i.user_id, i.video_id));
    dataset.save(
        out,
        "feedback",
        serde_json::json!({
            "base": base.display().to_string(),
            "base_data_version": base_version.sha256,
            "inferences": inferences.len(),
            "interactions": interactions.len(),
            "labeled_rows": labeled,
            "labels_file": LABELS_FILE,
        }),
    )?;
    let version = data_version(out)?;
    registry.add_data_version(&version)?;
    Ok(MergeReport {
        base: base.display().to_string(),
        out: out.display().to_string(),
        inferences: inferences.len() as u64,
        interactions: interactions.len() as u64,
        labeled,
        engaged: positives,
        rows_added,
        skipped,
        data_version: version,
    })
}
