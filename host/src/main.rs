//! `host`: serves the seed's REST API from the edge module in wasmtime.
//!
//! ```text
//! host --module target/dist/edge.wasm --bundle model.bundle
//! host --module edge.wasm --manifest http://127.0.0.1:9000/edgerec/manifests/production.json
//! ```
//! Prints `edgerec host listening on http://ADDR` once it accepts requests.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use host::cache::{Cache, RedisCache, ResponseCache};
use host::capture::{Capture, CaptureSettings};
use host::module::{EdgeModule, Limits};
use host::pool::Pool;
use host::profiles::Profiles;
use host::service::{Host, Settings, router};
use host::store::{Store, sha256_hex};
use host::updater::{Updater, install_bundle};

/// Serves recommendations from the edge module.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, env = "HOST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The edge module (`cargo xtask dist` writes target/dist/edge.wasm).
    #[arg(long, env = "EDGE_MODULE")]
    module: PathBuf,
    /// A bundle file to serve (fixed: no updates).
    #[arg(long, env = "MODEL_PATH", conflicts_with = "manifest")]
    bundle: Option<PathBuf>,
    /// A manifest to follow: a path or http(s) URL ending in manifests/<channel>.json.
    #[arg(long, env = "MANIFEST_URL")]
    manifest: Option<String>,
    /// Seconds between manifest polls.
    #[arg(long, env = "POLL_INTERVAL_SECS", default_value_t = 30)]
    poll_interval: u64,
    /// A profiles artifact to load at start (manifests may name newer ones).
    #[arg(long, env = "PROFILES_PATH")]
    profiles: Option<PathBuf>,
    /// The host's own folder: the precompiled module is cached there.
    #[arg(long, env = "ARTIFACTS_PATH")]
    artifacts: Option<PathBuf>,
    /// Warm instances (requests beyond them wait); default: the number of cores.
    #[arg(long, env = "HOST_INSTANCES")]
    instances: Option<usize>,
    /// Deadline of one recommendation, ms (a runaway call is stopped and answers 500).
    #[arg(long, default_value_t = 1000)]
    deadline_ms: u64,
    /// Run calls without deadlines: faster (deadline checks slow numeric code several
    /// times, see `cargo xtask bench`), but a runaway call holds its instance.
    #[arg(long)]
    no_deadlines: bool,
    /// Linear memory limit per instance, MiB.
    #[arg(long, default_value_t = 512)]
    memory_mb: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// How long a cached answer is served, seconds.
    #[arg(long, default_value_t = 300)]
    cache_ttl: u64,
    /// Viewers whose answers the in-process cache keeps.
    #[arg(long, default_value_t = 100_000)]
    cache_entries: usize,
    /// Videos kept per viewer history.
    #[arg(long, default_value_t = 200)]
    history_limit: usize,
    /// Log filter (`info`, `debug`, `host=debug`, ...).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Keep the response cache in Redis (shared by hosts, survives restarts) instead of
    /// in process.
    #[arg(long, env = "USE_REDIS")]
    use_redis: bool,
    /// Redis host.
    #[arg(long, env = "REDIS_HOST", default_value = "127.0.0.1")]
    redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    redis_port: u16,
    /// The control plane's base URL: every served response and interaction is captured
    /// and shipped to its /ingest endpoints (off when not given).
    #[arg(long, env = "EDGEREC_INGEST_URL")]
    ingest_url: Option<String>,
    /// The control plane's API token for ingest.
    #[arg(long, env = "EDGEREC_API_TOKEN", hide_env_values = true)]
    ingest_token: Option<String>,
    /// Where captured events wait until the control plane takes them
    /// [default: ARTIFACTS/spool].
    #[arg(long, env = "EDGEREC_SPOOL")]
    spool: Option<PathBuf>,
    /// The spool's limit, MiB: past it the oldest events are dropped (and counted).
    #[arg(long, default_value_t = 256)]
    max_spool_mb: u64,
    /// How long captured events wait in memory before they are written to the spool, ms.
    #[arg(long, default_value_t = 1000)]
    capture_interval_ms: u64,
}

fn default_artifacts() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/edgerec/host"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.bundle.is_none() && args.manifest.is_none() {
        bail!("nothing to serve: give --bundle (MODEL_PATH) or --manifest (MANIFEST_URL)");
    }
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("reading the edge module {}", args.module.display()))?;
    let cache_dir = args
        .artifacts
        .clone()
        .or_else(default_artifacts)
        .map(|dir| dir.join("compiled"));
    let deadlines = !args.no_deadlines;
    let module = tokio::task::spawn_blocking(move || {
        EdgeModule::load(&wasm, cache_dir.as_deref(), deadlines)
    })
    .await??;
    tracing::info!(
        compile_ms = module.compile_time.as_millis() as u64,
        cached_at = ?module.cached_at,
        deadlines,
        "module ready"
    );
    let limits = Limits {
        memory_bytes: args.memory_mb << 20,
        recommend_deadline: Duration::from_millis(args.deadline_ms),
        ..Limits::default()
    };
    let instances = args
        .instances
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pool = Arc::new(Pool::new(Arc::new(module), limits, instances));
    let profiles = match &args.profiles {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Profiles::from_msgpack(&bytes, args.history_limit)
                .with_context(|| format!("profiles {}", path.display()))?
        }
        None => Profiles::empty(args.history_limit),
    };
    let settings = Settings {
        max_body_bytes: args.max_body_bytes,
    };
    let ttl = Duration::from_secs(args.cache_ttl);
    let cache = if args.use_redis {
        let redis = RedisCache::connect(&args.redis_host, args.redis_port, ttl).await?;
        tracing::info!(host = %args.redis_host, port = args.redis_port, "response cache in Redis");
        Cache::Redis(redis)
    } else {
        Cache::Local(Mutex::new(ResponseCache::new(ttl, args.cache_entries)))
    };
    let mut host = Host::new(pool, profiles, cache, settings);
    if let Some(ingest_url) = &args.ingest_url {
        let spool = args
            .spool
            .clone()
            .or_else(|| {
                args.artifacts
                    .clone()
                    .or_else(default_artifacts)
                    .map(|dir| dir.join("spool"))
            })
            .context("no spool folder: give --spool or ARTIFACTS_PATH")?;
        let capture = Capture::open(
            CaptureSettings {
                spool: spool.clone(),
                ingest_url: ingest_url.clone(),
                token: args.ingest_token.clone(),
                max_spool_bytes: args.max_spool_mb << 20,
                seal_interval: Duration::from_millis(args.capture_interval_ms.max(10)),
            },
            host.request_prefix(),
        )?;
        tracing::info!(ingest = %ingest_url, spool = %spool.display(), "capturing responses and interactions");
        host = host.with_capture(Arc::new(capture));
    } else {
        tracing::info!("data capture off (no --ingest-url)");
    }
    let host = Arc::new(host);
    if let Some(capture) = &host.capture {
        tokio::spawn(capture.clone().run(host.clone()));
    }

    if let Some(path) = &args.bundle {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let sha256 = sha256_hex(&bytes);
        install_bundle(&host, bytes, sha256)
            .await
            .with_context(|| format!("loading bundle {}", path.display()))?;
    }
    if let Some(manifest) = &args.manifest {
        let mut store = Store::new(manifest, 4 << 30)?;
        let mut updater = Updater::default();
        // A first failure is not fatal: the host answers 503 until a bundle arrives.
        if let Err(e) = updater.poll_once(&host, &mut store).await {
            host.metrics.failed_swaps.inc();
            tracing::error!(manifest = %store.describe(), "no bundle yet: {e:#}");
        }
        tokio::spawn(updater.run(
            host.clone(),
            store,
            Duration::from_secs(args.poll_interval.max(1)),
        ));
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr()?;
    println!("edgerec host listening on http://{address}");
    std::io::stdout().flush()?;
    axum::serve(listener, router(host.clone()))
        .with_graceful_shutdown(shutdown())
        .await?;
    // What is still in memory goes to the spool; the next start ships it.
    if let Some(capture) = &host.capture {
        capture.flush(&host.metrics);
    }
    Ok(())
}

async fn shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}
