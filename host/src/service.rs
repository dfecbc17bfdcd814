//! The seed's REST API, answered by the edge module: JSON over HTTP outside, MessagePack
//! through the raw ABI inside. The host adds what edge cannot have: the time, the
//! viewer's stored profile, the cache, the request id and the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cache::{Cache, CacheKey};
use crate::capture::Capture;
use crate::metrics::Metrics;
use crate::module::CallError;
use crate::pool::Pool;
use crate::profiles::{Profile, Profiles};

/// The most interactions one `POST /interactions` may carry.
pub const MAX_INTERACTIONS_PER_POST: usize = 1000;

/// Service settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
        }
    }
}

/// Everything a request can reach.
pub struct Host {
    /// The module's instances and the bundle they hold.
    pub pool: Arc<Pool>,
    /// Online features.
    pub profiles: RwLock<Profiles>,
    /// Answers to GET requests.
    pub cache: Cache,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Captured responses and interactions for the control plane, when configured.
    pub capture: Option<Arc<Capture>>,
    settings: Settings,
    started: Instant,
    request_prefix: String,
    request_count: AtomicU64,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Host {
    /// A host serving from `pool`.
    pub fn new(pool: Arc<Pool>, profiles: Profiles, cache: Cache, settings: Settings) -> Self {
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            pool,
            profiles: RwLock::new(profiles),
            cache,
            metrics: Metrics::new(),
            capture: None,
            settings,
            started: Instant::now(),
            // Unique across restarts: a request id joins interactions to the response
            // that showed the video, so two processes must never reuse one.
            request_prefix: format!("{:x}-{:x}", boot, std::process::id()),
            request_count: AtomicU64::new(0),
        }
    }

    /// Sends every served response and interaction to `capture`.
    pub fn with_capture(mut self, capture: Arc<Capture>) -> Self {
        self.capture = Some(capture);
        self
    }

    /// What this process's request ids start with (unique across restarts).
    pub fn request_prefix(&self) -> &str {
        &self.request_prefix
    }

    /// A cache failure is a miss, logged and counted: the cache never fails a request.
    fn cache_failed(&self, what: &str, error: &redis::RedisError) {
        self.metrics.cache_errors.inc();
        tracing::warn!("response cache {what} failed: {error}");
    }

    fn next_request_id(&self) -> String {
        let n = self.request_count.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.request_prefix)
    }
}

/// A JSON error: `{code, message}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn no_bundle() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_bundle",
            "no bundle is loaded yet",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        Self::new(rejection.status(), code, rejection.body_text())
    }
}

impl From<CallError> for ApiError {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Refused { code, message } => {
                let status = match code.as_str() {
                    "invalid_request" => StatusCode::BAD_REQUEST,
                    "no_bundle" | "out_of_memory" => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Self::new(status, &code, message)
            }
            CallError::Trap(message) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the module failed on this request and was replaced: {message}"),
            ),
        }
    }
}

/// The router with every route.
pub fn router(host: Arc<Host>) -> Router {
    let max_body = host.settings.max_body_bytes;
    Router::new()
        .route("/recommendations", post(post_recommendations))
        .route("/recommendations/{user_id}", get(get_recommendations))
        .route("/interactions", post(post_interactions))
        .route("/cached/{user_id}", get(get_cached))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(host.clone(), count_request))
        // Browser pages on other origins (the demo, when its viewer turns sharing on) call
        // the API; it carries no cookies or credentials, so any origin may.
        .layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::CONTENT_TYPE]),
        )
        .with_state(host)
}

async fn count_request(State(host): State<Arc<Host>>, request: Request, next: Next) -> Response {
    let route = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/recommendations") => "post_recommendations",
        Some("/recommendations/{user_id}") => "get_recommendations",
        Some("/interactions") => "interactions",
        Some("/cached/{user_id}") => "cached",
        Some("/health") => "health",
        Some("/metrics") => "metrics",
        _ => "unmatched",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    host.metrics
        .request(route, response.status().as_u16(), started.elapsed());
    response
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn parse_user_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "user_id {text:?} is not an unsigned 64-bit integer"
        ))
    })
}

fn profile_features(profile: &Profile) -> Value {
    json!({
        "country": profile.country,
        "language": profile.language,
        "age": profile.age,
        "device": profile.device,
    })
}

/// Runs a request (a JSON object in the module's request shape) through the module.
async fn serve(host: &Host, request: &Value) -> Result<(Value, String), ApiError> {
    let bytes = rmp_serde::to_vec_named(request)
        .map_err(|e| ApiError::bad_request(format!("the request cannot be encoded: {e}")))?;
    let routed = host
        .pool
        .generation_for(request["user_id"].as_u64())
        .ok_or_else(ApiError::no_bundle)?;
    let served = host.pool.recommend_on(routed.generation, bytes).await;
    if served.replaced_instance {
        host.metrics.traps.inc();
        tracing::error!(
            bundle = %served.generation.sha256,
            "an instance trapped and is replaced: {:?}",
            served.result.as_ref().err()
        );
    }
    let answer = served.result?;
    host.metrics.stages(&answer.stage_ms);
    let mut response: Value = rmp_serde::from_slice(&answer.response).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the module's response is unreadable: {e}"),
        )
    })?;
    if let Some(arm) = routed.arm
        && let Some(metadata) = response.get_mut("metadata").and_then(Value::as_object_mut)
    {
        // The manifest's experiment names the arm; an experiment inside the bundle (its
        // rules) keeps its own names beside it.
        for (field, moved) in [
            ("experiment", "rules_experiment"),
            ("variant", "rules_variant"),
        ] {
            if let Some(value) = metadata.remove(field).filter(|v| !v.is_null()) {
                metadata.insert(moved.into(), value);
            }
        }
        metadata.insert("experiment".into(), Value::String(arm.experiment));
        metadata.insert("variant".into(), Value::String(arm.variant));
    }
    let items = response["recommendations"]
        .as_array()
        .map_or(0, |items| items.len());
    host.metrics.impressions(items as u64);
    host.stamp_and_capture(
        request["user_id"].as_u64(),
        request.get("user_features"),
        &mut response,
    );
    Ok((response, served.generation.sha256.clone()))
}

impl Host {
    /// Gives a response to be shown its own request id (which interactions will name) and
    /// captures it.
    fn stamp_and_capture(&self, user: Option<u64>, features: Option<&Value>, response: &mut Value) {
        let request_id = self.next_request_id();
        if let Some(metadata) = response.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("request_id".into(), Value::String(request_id));
        }
        if let Some(capture) = &self.capture {
            capture.served(user, features, response, now_millis());
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    n: Option<u32>,
    exclude_watched: Option<bool>,
}

async fn get_recommendations(
    State(host): State<Arc<Host>>,
    user_id: Result<Path<String>, PathRejection>,
    params: Result<Query<GetParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(user_id) = user_id.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let user = parse_user_id(&user_id)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let n = params.n.unwrap_or(20);
    let bundle = host
        .pool
        .generation_for(Some(user))
        .ok_or_else(ApiError::no_bundle)?
        .generation;
    let key = CacheKey {
        n,
        exclude_watched: params.exclude_watched,
        bundle: bundle.sha256.clone(),
    };
    let cached = host.cache.get(user, &key).await.unwrap_or_else(|e| {
        host.cache_failed("read", &e);
        None
    });
    host.metrics.cache_lookup(cached.is_some());
    if let Some(mut response) = cached {
        // Shown again: a new impression with its own request id.
        let features = host
            .profiles
            .read()
            .expect("profiles lock")
            .get(user)
            .map(profile_features);
        host.stamp_and_capture(Some(user), features.as_ref(), &mut response);
        host.metrics.impressions(
            response["recommendations"]
                .as_array()
                .map_or(0, |items| items.len() as u64),
        );
        let mut response = Json(response).into_response();
        response
            .headers_mut()
            .insert("x-cache", HeaderValue::from_static("hit"));
        return Ok(response);
    }
    let mut request = json!({"user_id": user, "n": n, "timestamp": now_seconds()});
    if let Some(exclude) = params.exclude_watched {
        request["exclude_watched"] = Value::Bool(exclude);
    }
    if let Some(profile) = host.profiles.read().expect("profiles lock").get(user) {
        request["user_features"] = profile_features(profile);
        request["watch_history"] = json!(profile.history);
    }
    let (response, sha256) = serve(&host, &request).await?;
    let key = CacheKey {
        bundle: sha256,
        ..key
    };
    if let Err(e) = host.cache.put(user, key, response.clone()).await {
        host.cache_failed("write", &e);
    }
    let mut response = Json(response).into_response();
    response
        .headers_mut()
        .insert("x-cache", HeaderValue::from_static("miss"));
    Ok(response)
}

async fn post_recommendations(
    State(host): State<Arc<Host>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body?;
    let mut request: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let Some(fields) = request.as_object_mut() else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    fields
        .entry("timestamp")
        .or_insert_with(|| json!(now_seconds()));
    // The stored profile fills in what the caller did not send.
    let user = fields.get("user_id").and_then(Value::as_u64);
    if let Some(user) = user
        && let Some(profile) = host.profiles.read().expect("profiles lock").get(user)
    {
        fields
            .entry("user_features")
            .or_insert_with(|| profile_features(profile));
        fields
            .entry("watch_history")
            .or_insert_with(|| json!(profile.history));
    }
    let (response, _) = serve(&host, &request).await?;
    Ok(Json(response))
}

/// The seed's interaction kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InteractionKind {
    /// Shown.
    Impression,
    /// Clicked.
    Click,
    /// Watched (with `watch_seconds`).
    Watch,
    /// Liked.
    Like,
    /// Commented.
    Comment,
    /// Shared.
    Share,
}

impl InteractionKind {
    fn name(self) -> &'static str {
        match self {
            Self::Impression => "impression",
            Self::Click => "click",
            Self::Watch => "watch",
            Self::Like => "like",
            Self::Comment => "comment",
            Self::Share => "share",
        }
    }
}

/// One interaction as clients post it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interaction {
    /// The viewer.
    pub user_id: u64,
    /// The video.
    pub video_id: u64,
    /// What happened.
    #[serde(rename = "type", alias = "interaction_type")]
    pub kind: InteractionKind,
    /// Unix seconds (the host's clock when absent).
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// Seconds watched, for `watch`.
    #[serde(default)]
    pub watch_seconds: Option<f64>,
    /// The response that showed the video (`metadata.request_id`).
    #[serde(default)]
    pub request_id: Option<String>,
    /// The video's position in that response, from 0.
    #[serde(default)]
    pub position: Option<u32>,
}

impl Interaction {
    fn check(&self) -> Result<(), String> {
        if let Some(seconds) = self.watch_seconds
            && !(seconds.is_finite() && seconds >= 0.0)
        {
            return Err(format!("watch_seconds {seconds} is not a duration"));
        }
        if let Some(id) = &self.request_id
            && id.len() > 128
        {
            return Err("request_id is longer than 128 bytes".into());
        }
        Ok(())
    }
}

async fn post_interactions(
    State(host): State<Arc<Host>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    // One object or an array of them; serde names the field that is wrong.
    let interactions = if body.is_array() {
        serde_json::from_value::<Vec<Interaction>>(body)
    } else {
        serde_json::from_value::<Interaction>(body).map(|one| vec![one])
    }
    .map_err(|e| ApiError::bad_request(format!("invalid interaction: {e}")))?;
    if interactions.len() > MAX_INTERACTIONS_PER_POST {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "{} interactions in one post; at most {MAX_INTERACTIONS_PER_POST}",
                interactions.len()
            ),
        ));
    }
    for (index, interaction) in interactions.iter().enumerate() {
        interaction
            .check()
            .map_err(|reason| ApiError::bad_request(format!("interaction {index}: {reason}")))?;
    }
    let mut engaged = Vec::new();
    {
        let mut profiles = host.profiles.write().expect("profiles lock");
        for interaction in &interactions {
            host.metrics.interaction(interaction.kind.name());
            if let Some(capture) = &host.capture {
                capture.interaction(
                    interaction.user_id,
                    interaction.video_id,
                    interaction.kind.name(),
                    interaction.timestamp.unwrap_or_else(now_seconds),
                    interaction.watch_seconds,
                    interaction.request_id.as_deref(),
                    interaction.position,
                );
            }
            if interaction.kind != InteractionKind::Impression {
                profiles.record_engagement(interaction.user_id, interaction.video_id);
                engaged.push(interaction.user_id);
            }
        }
    }
    engaged.sort_unstable();
    engaged.dedup();
    // A failure leaves answers that ignore this interaction until their TTL ends.
    if let Err(e) = host.cache.invalidate(&engaged).await {
        host.cache_failed("invalidation", &e);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": interactions.len()})),
    ))
}

async fn get_cached(
    State(host): State<Arc<Host>>,
    user_id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(user_id) = user_id.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let user = parse_user_id(&user_id)?;
    let cached = host.cache.latest(user).await.map_err(|e| {
        host.cache_failed("read", &e);
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cache_unavailable",
            format!("the response cache did not answer: {e}"),
        )
    })?;
    cached.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_cached",
            format!("nothing is cached for user {user}"),
        )
    })
}

async fn health(State(host): State<Arc<Host>>) -> (StatusCode, Json<Value>) {
    let uptime = host.started.elapsed().as_secs();
    let profiles = host.profiles.read().expect("profiles lock").len();
    match host.pool.current() {
        Some(generation) => (
            StatusCode::OK,
            Json(json!({
                "status": "ok",
                "model_version": generation.summary.model_version,
                "bundle_sha256": generation.sha256,
                "bundle_bytes": generation.size,
                "loaded_at": generation.loaded_at,
                "load_ms": generation.load_ms,
                "instances": generation.instances,
                "videos": generation.summary.videos,
                "experiments": generation.summary.experiments,
                "manifest_experiment": host.pool.arms().map(|arms| json!({
                    "name": arms.name,
                    "arms": arms.arms.iter().map(|(name, weight, generation)| json!({
                        "name": name,
                        "weight": weight,
                        "model_version": generation.summary.model_version,
                        "bundle_sha256": generation.sha256,
                    })).collect::<Vec<_>>(),
                })),
                "profiles": profiles,
                "uptime_s": uptime,
            })),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "uptime_s": uptime})),
        ),
    }
}

async fn metrics(State(host): State<Arc<Host>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        host.metrics.encode(),
    )
        .into_response()
}
