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

/// An experiment whose arms are generations.
#[derive(Debug)]
pub struct Arms {
    /// Its name.
    pub name: String,
    /// Its assignment salt.
    pub salt: String,
    /// (arm name, weight, generation); the first is the control.
    pub arms: Vec<(String, u32, Arc<Generation>)>,
}

/// An experiment arm a request was routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmName {
    /// The manifest's experiment.
    pub experiment: String,
    /// The arm.
    pub variant: String,
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The generation that answers.
    pub generation: Arc<Generation>,
    /// The arm, when a manifest experiment runs and the viewer is known.
    pub arm: Option<ArmName>,
}

/// Buckets of the assignment hash; the module's experiments use the same.
const BUCKETS: u64 = 10_000;

impl Arms {
    /// The arm of `user_id`: the hash of (salt, 0, decimal id) into 10,000 buckets
    /// split by weight, exactly as the module assigns its own experiments (edge's
    /// `Experiment::assign`), so every runtime puts a viewer in the same arm.
    pub fn assign(&self, user_id: u64) -> &(String, u32, Arc<Generation>) {
        let user = user_id.to_string();
        let mut key = Vec::with_capacity(self.salt.len() + 1 + user.len());
        key.extend_from_slice(self.salt.as_bytes());
        key.push(0);
        key.extend_from_slice(user.as_bytes());
        let bucket = xxhash_rust::xxh3::xxh3_64(&key) % BUCKETS;
        let total: u64 = self.arms.iter().map(|(_, w, _)| u64::from(*w)).sum();
        let mut upper = 0u64;
        for arm in &self.arms {
            upper += u64::from(arm.1);
            if bucket * total < upper * BUCKETS {
                return arm;
            }
        }
        self.arms
            .iter()
            .rev()
            .find(|(_, w, _)| *w > 0)
            .unwrap_or(&self.arms[0])
    }
}

/// What serves: one generation, or an experiment's arms (with the control as the
/// generation anonymous viewers get).
#[derive(Debug, Default)]
struct Serving {
    current: Option<Arc<Generation>>,
    arms: Option<Arc<Arms>>,
}

/// The current generation and the module that makes instances.
pub struct Pool {
    module: Arc<EdgeModule>,
    limits: Limits,
    instances: usize,
    serving: RwLock<Serving>,
}

impl Pool {
    /// An empty pool: nothing is served until a bundle is swapped in.
    pub fn new(module: Arc<EdgeModule>, limits: Limits, instances: usize) -> Self {
        Self {
            module,
            limits,
            instances: instances.max(1),
            serving: RwLock::new(Serving::default()),
        }
    }

    /// The generation serving now (an experiment's control).
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.serving.read().expect("pool lock").current.clone()
    }

    /// The experiment whose arms serve now, if any.
    pub fn arms(&self) -> Option<Arc<Arms>> {
        self.serving.read().expect("pool lock").arms.clone()
    }

    /// The generation that serves `user`: its arm's when an experiment runs.
    pub fn generation_for(&self, user: Option<u64>) -> Option<Routed> {
        let serving = self.serving.read().expect("pool lock");
        match (&serving.arms, user) {
            (Some(arms), Some(user)) => {
                let (arm, _, generation) = arms.assign(user);
                Some(Routed {
                    generation: generation.clone(),
                    arm: Some(ArmName {
                        experiment: arms.name.clone(),
                        variant: arm.clone(),
                    }),
                })
            }
            _ => serving.current.clone().map(|generation| Routed {
                generation,
                arm: None,
            }),
        }
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

    /// Makes `generation` the one that serves everyone (ending any experiment); returns
    /// the one it replaced.
    pub fn swap(&self, generation: Generation) -> Option<Arc<Generation>> {
        let mut serving = self.serving.write().expect("pool lock");
        serving.arms = None;
        serving.current.replace(Arc::new(generation))
    }

    /// Makes an experiment's arms serve (the first arm's generation is the control);
    /// returns the generation that served before.
    pub fn swap_arms(&self, arms: Arms) -> Option<Arc<Generation>> {
        let mut serving = self.serving.write().expect("pool lock");
        let control = arms.arms[0].2.clone();
        serving.arms = Some(Arc::new(arms));
        serving.current.replace(control)
    }

    /// Makes a generation that already serves (an experiment's arm) serve everyone.
    pub fn swap_shared(&self, generation: Arc<Generation>) -> Option<Arc<Generation>> {
        let mut serving = self.serving.write().expect("pool lock");
        serving.arms = None;
        serving.current.replace(generation)
    }

    /// Every generation serving now (to reuse one whose bundle a new manifest names).
    pub fn generations(&self) -> Vec<Arc<Generation>> {
        let serving = self.serving.read().expect("pool lock");
        let mut all: Vec<Arc<Generation>> = serving.current.iter().cloned().collect();
        if let Some(arms) = &serving.arms {
            all.extend(arms.arms.iter().map(|(_, _, g)| g.clone()));
        }
        all
    }

    /// Runs one request on a free instance of `generation`, waiting for one if all are
    /// busy.
    pub async fn recommend_on(
        self: &Arc<Self>,
        generation: Arc<Generation>,
        request: Vec<u8>,
    ) -> Served {
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
        served.unwrap_or_else(|e| Served {
            result: Err(CallError::Trap(format!("the serving thread failed: {e}"))),
            generation: serving,
            replaced_instance: true,
        })
    }

    /// Runs one request on the current generation. `None` when no bundle has been
    /// loaded yet.
    pub async fn recommend(self: &Arc<Self>, request: Vec<u8>) -> Option<Served> {
        let generation = self.current()?;
        Some(self.recommend_on(generation, request).await)
    }

    fn fresh_instance(&self, generation: &Generation) -> anyhow::Result<EdgeInstance> {
        let mut instance = self.module.instantiate(self.limits)?;
        instance
            .load_bundle(&generation.bundle)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(instance)
    }
}
