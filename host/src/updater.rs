//! Bundle updates: poll the manifest, download and verify what it names, load it into
//! fresh instances, then swap. Any failure keeps the last good bundle serving; it is
//! logged, counted (`edgerec_host_bundle_swap_failures_total`) and retried at the next
//! poll.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::profiles::Profiles;
use crate::service::Host;
use crate::store::{Manifest, Poll, Store};

/// Loads a bundle whose sha256 is `sha256` and makes it the one served.
pub async fn install_bundle(host: &Host, bundle: Vec<u8>, sha256: String) -> anyhow::Result<()> {
    let generation = host.pool.prepare(bundle, sha256).await?;
    let (sha256, model_version, load_ms) = (
        generation.sha256.clone(),
        generation.summary.model_version.clone(),
        generation.load_ms,
    );
    let previous = host.pool.swap(generation);
    host.metrics.serving(&sha256, &model_version);
    if previous.is_some() {
        host.metrics.swaps.inc();
    }
    tracing::info!(
        bundle = %sha256,
        model_version = %model_version,
        load_ms = format!("{load_ms:.1}"),
        "serving bundle"
    );
    Ok(())
}

/// What the updater has applied.
#[derive(Debug, Default)]
pub struct Updater {
    profiles_sha256: Option<String>,
}

impl Updater {
    /// Applies a manifest: the bundle if it is not the one served, the profiles if new.
    pub async fn apply(
        &mut self,
        host: &Host,
        store: &Store,
        manifest: &Manifest,
    ) -> anyhow::Result<()> {
        let served = host.pool.current().map(|g| g.sha256.clone());
        if served.as_deref() != Some(manifest.bundle.sha256.as_str()) {
            let bytes = store.fetch(&manifest.bundle).await?;
            install_bundle(host, bytes, manifest.bundle.sha256.clone())
                .await
                .with_context(|| format!("loading bundle {}", manifest.bundle.key))?;
        }
        if let Some(artifact) = &manifest.profiles
            && self.profiles_sha256.as_deref() != Some(artifact.sha256.as_str())
        {
            let bytes = store.fetch(artifact).await?;
            let limit = host.profiles.read().expect("profiles lock").history_limit();
            let mut fresh = Profiles::from_msgpack(&bytes, limit)
                .with_context(|| format!("profiles {}", artifact.key))?;
            let mut profiles = host.profiles.write().expect("profiles lock");
            fresh.merge_live_histories(&profiles);
            tracing::info!(viewers = fresh.len(), "profiles loaded");
            *profiles = fresh;
            self.profiles_sha256 = Some(artifact.sha256.clone());
        }
        Ok(())
    }

    /// One poll: reads the manifest and applies it if it changed. On failure the manifest
    /// is read again at the next poll.
    pub async fn poll_once(&mut self, host: &Host, store: &mut Store) -> anyhow::Result<bool> {
        let manifest = match store.poll().await? {
            Poll::Unchanged => return Ok(false),
            Poll::Manifest(manifest) => manifest,
        };
        if let Err(e) = self.apply(host, store, &manifest).await {
            store.forget();
            return Err(e);
        }
        Ok(true)
    }

    /// Polls forever.
    pub async fn run(mut self, host: Arc<Host>, mut store: Store, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.poll_once(&host, &mut store).await {
                host.metrics.failed_swaps.inc();
                tracing::error!(
                    manifest = %store.describe(),
                    "bundle update failed; the last good bundle keeps serving: {e:#}"
                );
            }
        }
    }
}
