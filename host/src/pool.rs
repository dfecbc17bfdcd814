//! Warm instances of the edge module, grouped by the bundle they hold.
//!
//! A [`Generation`] is one bundle loaded into a set of instances; the [`Pool`] serves from
//! the current generation and swaps in a new one atomically. A request holds an
//! `Arc<Generation>` from start to end, so requests in flight finish on the bundle they
//! started with while new requests already use the new one; the old generation's
//! instances are freed with its last request.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use crate::module::{Answer, BundleSummary, CallError, EdgeInstance, EdgeModule, Limits};

/// One bundle, loaded into warm instances.
pub struct Generation {
    /// sha256 of the bundle's bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: usize,
    /// What the module said about it.
    pub summary: BundleSummary,
    /// Unix seconds when it started serving here.
    pub loaded_at: u64,
    /// How long loading it into the first instance took (ms).
    pub load_ms: f64,
    /// How many instances serve it at once.
    pub instances: usize,
    bundle: Arc<[u8]>,
    idle: Mutex<Vec<EdgeInstance>>,
    /// One permit per instance: requests beyond it wait instead of piling up instances.
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("sha256", &self.sha256)
            .field("model_version", &self.summary.model_version)
            .finish()
    }
}

/// Why a bundle could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The module refused it (corrupt, wrong format, inconsistent sections).
    #[error("the module refused the bundle: {0}")]
    Refused(CallError),
    /// The module could not be instantiated.
    #[error("instantiating the module: {0}")]
    Instantiate(anyhow::Error),
}

impl Generation {
    /// Loads `bundle`, whose sha256 is `sha256`, into `instances` fresh instances
    /// (blocking: run it off the async threads). The first instance's refusal is the
    /// bundle's.
    pub fn load(
        module: &EdgeModule,
        limits: Limits,
        instances: usize,
        bundle: Arc<[u8]>,
        sha256: String,
    ) -> Result<Self, LoadError> {
        let started = Instant::now();
        let mut first = module.instantiate(limits).map_err(LoadError::Instantiate)?;
        let summary = first.load_bundle(&bundle).map_err(LoadError::Refused)?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut idle = vec![first];
        for _ in 1..instances.max(1) {
            let mut instance = module.instantiate(limits).map_err(LoadError::Instantiate)?;
            instance.load_bundle(&bundle).map_err(LoadError::Refused)?;
            idle.push(instance);
        }
        Ok(Self {
            sha256,
            size: bundle.len(),
            summary,
            loaded_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            load_ms,
            instances: idle.len(),
            slots: Arc::new(Semaphore::new(idle.len())),
            idle: Mutex::new(idle),
            bundle,
        })
    }
}

/// What one recommendation call produced.
#[derive(Debug)]
pub struct Served {
    /// The module's answer, or its refusal.
    pub result: Result<Answer, CallError>,
    /// The generation that served it.
    pub generation: Arc<Generation>,
    /// Whether the instance trapped and was replaced.
    pub replaced_instance: bool,
}

/// The current generation and the module that makes instances.
pub struct Pool {
    module: Arc<EdgeModule>,
    limits: Limits,
    instances: usize,
    current: RwLock<Option<Arc<Generation>>>,
}

impl Pool {
    /// An empty pool: nothing is served until a bundle is swapped in.
    pub fn new(module: Arc<EdgeModule>, limits: Limits, instances: usize) -> Self {
        Self {
            module,
            limits,
            instances: instances.max(1),
            current: RwLock::new(None),
        }
    }

    /// The generation serving now.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.read().expect("pool lock").clone()
    }

    /// Loads `bundle` (its sha256 already known: the store verified it, or the caller
    /// hashed it) into fresh instances on a blocking thread, without touching the
    /// generation that serves now.
    pub async fn prepare(
        self: &Arc<Self>,
        bundle: Vec<u8>,
        sha256: String,
    ) -> Result<Generation, LoadError> {
        let pool = self.clone();
        let bundle: Arc<[u8]> = bundle.into();
        tokio::task::spawn_blocking(move || {
            Generation::load(&pool.module, pool.limits, pool.instances, bundle, sha256)
        })
        .await
        .map_err(|e| LoadError::Instantiate(anyhow::anyhow!("the loading thread failed: {e}")))?
    }

    /// Makes `generation` the one that serves; returns the one it replaced.
    pub fn swap(&self, generation: Generation) -> Option<Arc<Generation>> {
        self.current
            .write()
            .expect("pool lock")
            .replace(Arc::new(generation))
    }

    /// Runs one request on a free instance of the current generation, waiting for one
    /// if all are busy. `None` when no bundle has been loaded yet.
    pub async fn recommend(self: &Arc<Self>, request: Vec<u8>) -> Option<Served> {
        let generation = self.current()?;
        let permit = generation
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let pool = self.clone();
        let serving = generation.clone();
        let served = tokio::task::spawn_blocking(move || {
            let borrowed = generation.idle.lock().expect("idle lock").pop();
            let mut instance = match borrowed {
                Some(instance) => instance,
                // A trapped instance was dropped: make its replacement now.
                None => match pool.fresh_instance(&generation) {
                    Ok(instance) => instance,
                    Err(e) => {
                        return Served {
                            result: Err(CallError::Trap(format!("replacing an instance: {e}"))),
                            generation,
                            replaced_instance: false,
                        };
                    }
                },
            };
            let result = instance.recommend(&request);
            let trapped = matches!(&result, Err(e) if e.is_trap());
            if !trapped {
                generation.idle.lock().expect("idle lock").push(instance);
            }
            Served {
                result,
                generation,
                replaced_instance: trapped,
            }
        })
        .await;
        drop(permit);
        Some(served.unwrap_or_else(|e| Served {
            result: Err(CallError::Trap(format!("the serving thread failed: {e}"))),
            generation: serving,
            replaced_instance: true,
        }))
    }

    fn fresh_instance(&self, generation: &Generation) -> anyhow::Result<EdgeInstance> {
        let mut instance = self.module.instantiate(self.limits)?;
        instance
            .load_bundle(&generation.bundle)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(instance)
    }
}
