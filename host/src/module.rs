//! The edge module in wasmtime: compiled once (and cached precompiled on disk), run in
//! instances that each hold a loaded bundle, through the raw ABI (`edge::abi`).
//!
//! Every instance runs under a memory limit and, when the module was loaded with
//! deadlines, every call under an epoch deadline: a trap or a deadline becomes a
//! [`CallError::Trap`], and the instance that trapped must be dropped (its memory may be
//! half-written); the process goes on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{
    Config, Engine, Instance, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, TypedFunc,
};

/// How often the deadline clock ticks.
const TICK: Duration = Duration::from_millis(5);

/// What went wrong in a call into the module.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The module refused the call with `{code, message}` (bad request, bad bundle, ...).
    #[error("{code}: {message}")]
    Refused {
        /// The module's error code, e.g. `invalid_request`.
        code: String,
        /// Its message.
        message: String,
    },
    /// The module trapped, ran out of memory or time: the instance is unusable.
    #[error("the module trapped: {0}")]
    Trap(String),
}

impl CallError {
    /// Whether the instance must be replaced.
    pub fn is_trap(&self) -> bool {
        matches!(self, CallError::Trap(_))
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

/// What the module says about a bundle it loaded (`edge::recommend::BundleSummary`; the
/// host reads the module's answer, never edge's types).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct BundleSummary {
    /// The model version responses carry.
    pub model_version: String,
    /// Videos in the catalogue.
    pub videos: u64,
    /// Videos in the retrieval shard.
    pub indexed_videos: u64,
    /// Trees in the ranker.
    pub trees: u64,
    /// The experiments it runs, by name.
    pub experiments: Vec<String>,
}

/// Limits of one instance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear memory, bytes (an edge isolate has 128 MB in all).
    pub memory_bytes: usize,
    /// Deadline of a `load_bundle` call.
    pub load_deadline: Duration,
    /// Deadline of a recommendation (all its calls).
    pub recommend_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            load_deadline: Duration::from_secs(10),
            recommend_deadline: Duration::from_secs(1),
        }
    }
}

/// The compiled module and the engine that runs it.
pub struct EdgeModule {
    engine: Engine,
    module: Module,
    deadlines: bool,
    stop_ticker: Arc<AtomicBool>,
    /// Where the precompiled module came from or went, if a cache folder was given.
    pub cached_at: Option<PathBuf>,
    /// How long compiling (or deserializing the cached compilation) took.
    pub compile_time: Duration,
}

impl Drop for EdgeModule {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for EdgeModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeModule")
            .field("cached_at", &self.cached_at)
            .field("compile_time", &self.compile_time)
            .finish()
    }
}

/// Loads a module that this process (or an earlier one, with the same engine settings)
/// precompiled into `path`.
///
/// Safety of the one unsafe call: wasmtime runs deserialized code without checking it, so
/// the bytes must be its own output. They are: the file is written only by
/// [`EdgeModule::load`] from `Engine::precompile_module`, into the host's own cache
/// folder, under a name that hashes the wasm bytes and the engine's compatibility hash,
/// and it is written to a temporary name and renamed, so it is never seen half-written.
#[allow(unsafe_code)]
fn deserialize_own(engine: &Engine, path: &Path) -> anyhow::Result<Module> {
    // SAFETY: see the function's documentation.
    Ok(unsafe { Module::deserialize_file(engine, path) }?)
}

impl EdgeModule {
    /// Compiles `wasm`, or reuses the compilation cached in `cache_dir`. With `deadlines`,
    /// calls are stopped at [`Limits`]' deadlines (epoch interruption); measured here
    /// (`cargo xtask bench`), the checks this compiles into every loop made numeric
    /// stages several times slower, so a host chooses.
    pub fn load(wasm: &[u8], cache_dir: Option<&Path>, deadlines: bool) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(deadlines);
        // `perf` cannot name JIT code by itself; wasmtime's perf map lets it.
        if std::env::var_os("EDGEREC_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let started = Instant::now();
        let deadlines_enabled = deadlines;
        let (module, cached_at) = match cache_dir {
            None => (Module::new(&engine, wasm)?, None),
            Some(dir) => {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                engine.precompile_compatibility_hash().hash(&mut hasher);
                let key = format!(
                    "edge-{}-{:016x}.cwasm",
                    &crate::store::sha256_hex(wasm)[..32],
                    hasher.finish()
                );
                let path = dir.join(key);
                let module = if path.is_file() {
                    deserialize_own(&engine, &path)?
                } else {
                    let compiled = engine.precompile_module(wasm)?;
                    std::fs::create_dir_all(dir)?;
                    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
                    std::fs::write(&temporary, &compiled)?;
                    std::fs::rename(&temporary, &path)?;
                    deserialize_own(&engine, &path)?
                };
                (module, Some(path))
            }
        };
        let compile_time = started.elapsed();
        let stop_ticker = Arc::new(AtomicBool::new(false));
        if deadlines_enabled {
            let ticker_engine = engine.clone();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("edge-deadline-ticker".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        ticker_engine.increment_epoch();
                    }
                })?;
        }
        Ok(Self {
            engine,
            module,
            deadlines,
            stop_ticker,
            cached_at,
            compile_time,
        })
    }

    /// A fresh instance (no bundle yet), its constructors run.
    pub fn instantiate(&self, limits: Limits) -> anyhow::Result<EdgeInstance> {
        let mut store = Store::new(
            &self.engine,
            StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .build(),
        );
        store.limiter(|limits| limits);
        if self.deadlines {
            store.set_epoch_deadline(ticks(limits.load_deadline));
        }
        let instance = Instance::new(&mut store, &self.module, &[])?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| anyhow::anyhow!("the module exports no memory"))?;
        let ctors: TypedFunc<(), ()> = instance.get_typed_func(&mut store, "__wasm_call_ctors")?;
        ctors.call(&mut store, ())?;
        Ok(EdgeInstance {
            deadlines: self.deadlines,
            alloc: instance.get_typed_func(&mut store, "alloc")?,
            load_bundle: instance.get_typed_func(&mut store, "load_bundle")?,
            recommend_start: instance.get_typed_func(&mut store, "recommend_start")?,
            recommend_step: instance.get_typed_func(&mut store, "recommend_step")?,
            recommend_finish: instance.get_typed_func(&mut store, "recommend_finish")?,
            output_ptr: instance.get_typed_func(&mut store, "output_ptr")?,
            output_len: instance.get_typed_func(&mut store, "output_len")?,
            store,
            memory,
            limits,
        })
    }
}

fn ticks(deadline: Duration) -> u64 {
    (deadline.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

/// One instance of the module, with its own memory and bundle. Not shared between
/// threads: a pool hands instances out.
pub struct EdgeInstance {
    deadlines: bool,
    store: Store<StoreLimits>,
    memory: Memory,
    limits: Limits,
    alloc: TypedFunc<u32, u32>,
    load_bundle: TypedFunc<(u32, u32), i32>,
    recommend_start: TypedFunc<(u32, u32), i32>,
    recommend_step: TypedFunc<(), i32>,
    recommend_finish: TypedFunc<(u32, u32), i32>,
    output_ptr: TypedFunc<(), u32>,
    output_len: TypedFunc<(), u32>,
}

/// A response from the module and the host-clock time of each stage.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The response, MessagePack (`edge::recommend::Response`).
    pub response: Vec<u8>,
    /// Milliseconds per stage, in `edge::recommend::Stage::ALL`'s order.
    pub stage_ms: [f64; 5],
}

fn trap(error: impl std::fmt::Display) -> CallError {
    CallError::Trap(error.to_string())
}

impl EdgeInstance {
    /// Copies `bytes` into a buffer that the module allocated.
    fn pass(&mut self, bytes: &[u8]) -> Result<(u32, u32), CallError> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| trap(format!("{} bytes do not fit a 32-bit memory", bytes.len())))?;
        let ptr = self.alloc.call(&mut self.store, len).map_err(trap)?;
        if ptr == 0 {
            return Err(CallError::Refused {
                code: "out_of_memory".into(),
                message: format!("the module cannot allocate {len} bytes"),
            });
        }
        self.memory
            .write(&mut self.store, ptr as usize, bytes)
            .map_err(trap)?;
        Ok((ptr, len))
    }

    fn output(&mut self) -> Result<Vec<u8>, CallError> {
        let ptr = self.output_ptr.call(&mut self.store, ()).map_err(trap)? as usize;
        let len = self.output_len.call(&mut self.store, ()).map_err(trap)? as usize;
        self.memory
            .data(&self.store)
            .get(ptr..ptr + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| trap("the output lies outside memory"))
    }

    fn refused(&mut self) -> CallError {
        match self.output() {
            Ok(bytes) => match rmp_serde::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => CallError::Refused {
                    code: body.code,
                    message: body.message,
                },
                Err(e) => trap(format!("unreadable error body: {e}")),
            },
            Err(e) => e,
        }
    }

    /// Starts a call's deadline, when the module was loaded with deadlines.
    fn arm_deadline(&mut self, deadline: Duration) {
        if self.deadlines {
            self.store.set_epoch_deadline(ticks(deadline));
        }
    }

    /// Passes `bytes` to `export` (which takes the buffer) and reads its status.
    fn call_with(
        &mut self,
        export: &TypedFunc<(u32, u32), i32>,
        bytes: &[u8],
    ) -> Result<(), CallError> {
        let (ptr, len) = self.pass(bytes)?;
        match export.call(&mut self.store, (ptr, len)).map_err(trap)? {
            0 => Ok(()),
            _ => Err(self.refused()),
        }
    }

    /// Loads a bundle and says what it holds; on failure the instance keeps the bundle it
    /// had.
    pub fn load_bundle(&mut self, bundle: &[u8]) -> Result<BundleSummary, CallError> {
        self.arm_deadline(self.limits.load_deadline);
        let export = self.load_bundle.clone();
        self.call_with(&export, bundle)?;
        let output = self.output()?;
        rmp_serde::from_slice(&output).map_err(|e| trap(format!("unreadable bundle summary: {e}")))
    }

    /// Answers a MessagePack request, timing each stage with the host's clock.
    pub fn recommend(&mut self, request: &[u8]) -> Result<Answer, CallError> {
        self.arm_deadline(self.limits.recommend_deadline);
        let start = self.recommend_start.clone();
        self.call_with(&start, request)?;
        let mut stage_ms = [0.0; 5];
        for slot in &mut stage_ms {
            let started = Instant::now();
            let status = self
                .recommend_step
                .call(&mut self.store, ())
                .map_err(trap)?;
            *slot = started.elapsed().as_secs_f64() * 1e3;
            match status {
                1 => continue,
                0 => break,
                _ => return Err(self.refused()),
            }
        }
        let times = rmp_serde::to_vec(&stage_ms).expect("numbers serialize");
        let finish = self.recommend_finish.clone();
        self.call_with(&finish, &times)?;
        Ok(Answer {
            response: self.output()?,
            stage_ms,
        })
    }
}
