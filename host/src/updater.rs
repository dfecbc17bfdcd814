//! Bundle updates: poll the manifest, download and verify what it names, load it into
//! fresh instances, then swap. Any failure keeps the last good bundle serving; it is
//! logged, counted (`edgerec_host_bundle_swap_failures_total`) and retried at the next
//! poll.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::pool::Arms;
use crate::profiles::Profiles;
use crate::service::Host;
use crate::store::{Manifest, ManifestExperiment, Poll, Store};

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
        if let Some(experiment) = &manifest.experiment {
            self.apply_experiment(host, store, experiment).await?;
        } else if host.pool.arms().is_some() {
            // The experiment ended: one bundle (usually one of its arms') serves
            // everyone again.
            let arm = host
                .pool
                .generations()
                .into_iter()
                .find(|g| g.sha256 == manifest.bundle.sha256);
            match arm {
                Some(generation) => {
                    host.metrics
                        .serving(&generation.sha256, &generation.summary.model_version);
                    host.pool.swap_shared(generation);
                    host.metrics.swaps.inc();
                    tracing::info!(bundle = %manifest.bundle.sha256, "experiment over: one arm serves everyone");
                }
                None => {
                    let bytes = store.fetch(&manifest.bundle).await?;
                    install_bundle(host, bytes, manifest.bundle.sha256.clone())
                        .await
                        .with_context(|| format!("loading bundle {}", manifest.bundle.key))?;
                }
            }
        }
        let served = host.pool.current().map(|g| g.sha256.clone());
        if served.as_deref() != Some(manifest.bundle.sha256.as_str())
            && manifest.experiment.is_none()
        {
            let bytes = store.fetch(&manifest.bundle).await?;
            install_bundle(host, bytes, manifest.bundle.sha256.clone())
                .await
                .with_context(|| format!("loading bundle {}", manifest.bundle.key))?;
        }
        self.apply_profiles(host, store, manifest).await
    }

    /// Loads the manifest's profiles if they are new.
    async fn apply_profiles(
        &mut self,
        host: &Host,
        store: &Store,
        manifest: &Manifest,
    ) -> anyhow::Result<()> {
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

    /// Loads every arm's bundle (reusing generations that already hold one) and swaps the
    /// arms in together.
    async fn apply_experiment(
        &mut self,
        host: &Host,
        store: &Store,
        experiment: &ManifestExperiment,
    ) -> anyhow::Result<()> {
        let live = host.pool.arms();
        let unchanged = live.as_ref().is_some_and(|arms| {
            arms.name == experiment.name
                && arms.salt == experiment.salt
                && arms.arms.len() == experiment.variants.len()
                && arms.arms.iter().zip(&experiment.variants).all(
                    |((name, weight, generation), v)| {
                        name == &v.name
                            && *weight == v.weight
                            && generation.sha256 == v.bundle.sha256
                    },
                )
        });
        if unchanged {
            return Ok(());
        }
        let existing = host.pool.generations();
        let mut arms = Vec::new();
        for variant in &experiment.variants {
            let reused = existing
                .iter()
                .chain(arms.iter().map(|(_, _, g)| g))
                .find(|g| g.sha256 == variant.bundle.sha256)
                .cloned();
            let generation = match reused {
                Some(generation) => generation,
                None => {
                    let bytes = store.fetch(&variant.bundle).await?;
                    Arc::new(
                        host.pool
                            .prepare(bytes, variant.bundle.sha256.clone())
                            .await
                            .with_context(|| {
                                format!(
                                    "loading bundle {} of arm {}",
                                    variant.bundle.key, variant.name
                                )
                            })?,
                    )
                }
            };
            arms.push((variant.name.clone(), variant.weight, generation));
        }
        let control = arms[0].2.clone();
        let previous = host.pool.swap_arms(Arms {
            name: experiment.name.clone(),
            salt: experiment.salt.clone(),
            arms,
        });
        host.metrics
            .serving(&control.sha256, &control.summary.model_version);
        if previous.is_some() {
            host.metrics.swaps.inc();
        }
        tracing::info!(
            experiment = %experiment.name,
            arms = experiment.variants.len(),
            "serving an experiment's arms"
        );
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
