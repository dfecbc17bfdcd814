//! The control plane's REST API (axum): the registry, publishing to channels, the public
//! store reads a CDN would serve, and the ingest endpoints of the feedback loop.
//!
//! Everything except `/health` and the store reads (`/store/...`, public as on a CDN)
//! requires `Authorization: Bearer <token>`, compared in constant time. Errors are
//! `{code, message}` with the status, the same shape as the host's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ingest::{BatchEncoding, parse_batch};
use crate::object_store::{CachePolicy, ObjectStore, content_type};
use crate::pipeline::{PipelineContext, RunRecord, RunStatus};
use crate::publish::{
    Artifact, MANIFEST_FORMAT, Manifest, PublishError, check_channel, count_profiles, manifest_key,
    now_seconds, put_artifact, write_manifest,
};
use crate::registry::{
    BundleRecord, ChannelAction, EventKind, ProfilesRecord, Registry, RegistryError,
};

/// Limits and secrets of a running control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The bearer token for every non-public endpoint.
    pub token: String,
    /// Largest bundle or profiles upload.
    pub max_artifact_bytes: usize,
    /// Largest JSON or ingest body.
    pub max_body_bytes: usize,
    /// A folder of static files (the browser demo) to serve at `/demo/`.
    pub www: Option<std::path::PathBuf>,
}

/// The shared state of the handlers.
pub struct ControlPlane {
    registry: Arc<Registry>,
    store: ObjectStore,
    pipeline: PipelineContext,
    token_digest: [u8; 32],
    settings: Settings,
    // Publishes and rollbacks of all channels one at a time, so the registry's order of
    // events is the order the manifests were written in.
    channel_writes: tokio::sync::Mutex<()>,
}

impl ControlPlane {
    /// The state for a registry and a store.
    pub fn new(
        registry: Registry,
        store: ObjectStore,
        pipeline: PipelineContext,
        settings: Settings,
    ) -> Self {
        Self {
            registry: Arc::new(registry),
            store,
            pipeline,
            token_digest: Sha256::digest(settings.token.as_bytes()).into(),
            settings,
            channel_writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs a registry call off the async workers (SQLite waits for the disk).
    async fn registry<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || call(&registry))
            .await
            .map_err(|e| ApiError::internal(format!("registry task: {e}")))?
            .map_err(|e| ApiError::internal(e.to_string()))
    }
}

/// A JSON error: `{code, message}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// Every error's body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable: invalid_request, unauthorized, payload_too_large, ...
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        (
            self.status,
            Json(ErrorBody {
                code: self.code.to_owned(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        Self::rejection(rejection.status(), rejection.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::rejection(rejection.status(), rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::rejection(rejection.status(), rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::rejection(rejection.status(), rejection.body_text())
    }
}

impl ApiError {
    fn rejection(status: StatusCode, text: String) -> Self {
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_request",
        };
        Self::new(status, code, text)
    }
}

impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::BadChannel(_) => Self::bad_request(error.to_string()),
            PublishError::BadBundle(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_bundle", error.to_string())
            }
            PublishError::Store(_) | PublishError::Unverified { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "store_failed", error.to_string())
            }
        }
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_sha256(what: &str, text: &str) -> Result<(), ApiError> {
    if is_sha256_hex(text) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} {text:?} is not a sha256 (64 lowercase hex digits)"
        )))
    }
}

/// The router with every route.
pub fn router(control_plane: Arc<ControlPlane>) -> Router {
    let settings = &control_plane.settings;
    let artifact_limit = DefaultBodyLimit::max(settings.max_artifact_bytes);
    let protected = Router::new()
        .route(
            "/bundles",
            get(list_bundles).post(upload_bundle).layer(artifact_limit),
        )
        .route("/bundles/{sha256}", get(show_bundle))
        .route("/profiles", post(upload_profiles).layer(artifact_limit))
        .route("/channels", get(list_channels))
        .route("/channels/{name}", get(show_channel))
        .route("/channels/{name}/publish", post(publish_channel))
        .route("/channels/{name}/rollback", post(rollback_channel))
        .route("/runs", get(list_runs).post(start_run))
        .route("/runs/{id}", get(show_run))
        .route("/runs/{id}/log", get(run_log))
        .route("/data-versions", get(list_data_versions))
        .route("/experiments", get(list_experiments).post(start_experiment))
        .route("/experiments/{name}/stop", post(stop_experiment))
        .route("/experiments/{name}/analysis", get(analyze_experiment))
        .route("/online-metrics", get(online_metrics))
        .route("/feedback/merge", post(merge_feedback))
        .route("/drift", get(drift))
        .route(
            "/ingest/inferences",
            post(ingest_inferences).get(list_inferences),
        )
        .route(
            "/ingest/interactions",
            post(ingest_interactions).get(list_interactions),
        )
        .route_layer(middleware::from_fn_with_state(
            control_plane.clone(),
            require_token,
        ));
    let mut public = Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_document))
        .route("/store/{*key}", get(read_store));
    if settings.www.is_some() {
        // Beside the store, so the page reads manifests and bundles from its own origin.
        public = public
            .route(
                "/demo",
                get(|| async { axum::response::Redirect::permanent("/demo/") }),
            )
            .route("/demo/", get(demo_file))
            .route("/demo/{*path}", get(demo_file));
    }
    public
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            control_plane.clone(),
            refuse_declared_oversize,
        ))
        .with_state(control_plane)
}

/// A file of the browser demo. ServeDir is called with the path below `/demo` rather
/// than nested, because nested it would redirect directories to paths without the prefix
/// (axum issue 1731).
async fn demo_file(State(control_plane): State<Arc<ControlPlane>>, request: Request) -> Response {
    let Some(www) = control_plane.settings.www.clone() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no demo is served")
            .into_response();
    };
    let (mut parts, body) = request.into_parts();
    let below = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .strip_prefix("/demo")
        .unwrap_or("/")
        .to_owned();
    parts.uri = match below.parse() {
        Ok(uri) => uri,
        Err(_) => return ApiError::bad_request("the path is not a valid URI").into_response(),
    };
    match tower_http::services::ServeDir::new(www)
        .try_call(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(axum::body::Body::new).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("reading the demo's files: {e}"),
        )
        .into_response(),
    }
}

/// Answers 413 before reading a byte when `Content-Length` already exceeds the route's
/// limit: a client that sent `Expect: 100-continue` (curl does above 1 MiB) then never
/// uploads the body, and the answer cannot be lost to a connection reset mid-upload.
async fn refuse_declared_oversize(
    State(control_plane): State<Arc<ControlPlane>>,
    request: Request,
    next: Next,
) -> Response {
    let limit = match request.uri().path() {
        "/bundles" | "/profiles" => control_plane.settings.max_artifact_bytes,
        _ => control_plane.settings.max_body_bytes,
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is {length} bytes; this endpoint takes at most {limit}"),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

async fn require_token(
    State(control_plane): State<Arc<ControlPlane>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <token>`",
        )
        .into_response();
    };
    // Hashing first makes the comparison constant-time in the token's length as well.
    let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    if bool::from(digest.ct_eq(&control_plane.token_digest)) {
        next.run(request).await
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong token").into_response()
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found("not_found", format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

#[utoipa::path(get, path = "/health", tag = "service",
    responses((status = 200, description = "Status, the store and each channel's model version", body = serde_json::Value)))]
async fn health(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let channels = control_plane
        .registry(|registry| registry.channels())
        .await?;
    let serving: HashMap<String, String> = channels
        .into_iter()
        .map(|manifest| (manifest.channel, manifest.model_version))
        .collect();
    Ok(Json(json!({
        "status": "ok",
        "store": control_plane.store.describe(),
        "channels": serving,
    })))
}

/// Which keys the store endpoint serves: the published layout and nothing else, so no
/// name can reach outside it.
fn public_key(key: &str) -> Option<CachePolicy> {
    let (folder, file) = key.split_once('/')?;
    let (stem, extension) = file.rsplit_once('.')?;
    match (folder, extension) {
        ("manifests", "json") if check_channel(stem).is_ok() => Some(CachePolicy::Short),
        ("bundles", "bundle") | ("profiles", "msgpack") if is_sha256_hex(stem) => {
            Some(CachePolicy::Immutable)
        }
        _ => None,
    }
}

#[utoipa::path(get, path = "/store/{key}", tag = "store",
    params(("key" = String, Path, description = "manifests/<channel>.json, bundles/<sha256>.bundle or profiles/<sha256>.msgpack")),
    responses(
        (status = 200, description = "The object, with Cache-Control and ETag", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 404, description = "Not a published key, or not in the store", body = ErrorBody)))]
async fn read_store(
    State(control_plane): State<Arc<ControlPlane>>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let policy = public_key(&key).ok_or_else(|| {
        ApiError::not_found(
            "not_found",
            format!("{key}: the store serves manifests/<channel>.json, bundles/<sha256>.bundle and profiles/<sha256>.msgpack"),
        )
    })?;
    let bytes = control_plane
        .store
        .get(&key)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "store_failed", e.to_string()))?
        .ok_or_else(|| ApiError::not_found("not_found", format!("{key} is not in the store")))?;
    let etag = format!("\"{}\"", edge::bundle::sha256_hex(&bytes));
    let mut response = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|value| value.as_bytes() == etag.as_bytes())
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        bytes.into_response()
    };
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(policy.header()),
    );
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&key)),
    );
    response_headers.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header"),
    );
    Ok(response)
}

#[utoipa::path(get, path = "/bundles", tag = "registry", security(("bearer" = [])),
    responses((status = 200, description = "Registered bundles, newest first", body = Vec<BundleRecord>), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_bundles(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<Vec<BundleRecord>>, ApiError> {
    Ok(Json(control_plane.registry(|r| r.bundles()).await?))
}

#[utoipa::path(get, path = "/bundles/{sha256}", tag = "registry", security(("bearer" = [])),
    params(("sha256" = String, Path, description = "The bundle's sha256")),
    responses((status = 200, description = "The bundle", body = BundleRecord), (status = 404, description = "Not registered", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn show_bundle(
    State(control_plane): State<Arc<ControlPlane>>,
    sha256: Result<Path<String>, PathRejection>,
) -> Result<Json<BundleRecord>, ApiError> {
    let Path(sha256) = sha256?;
    check_sha256("bundle", &sha256)?;
    let wanted = sha256.clone();
    control_plane
        .registry(move |r| r.bundle(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_bundle",
                format!("bundle {sha256} is not registered"),
            )
        })
}

#[utoipa::path(post, path = "/bundles", tag = "registry", security(("bearer" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The bundle file"),
    responses((status = 201, description = "Stored and registered", body = BundleRecord), (status = 200, description = "Registered already", body = BundleRecord),
        (status = 413, description = "Over --max-artifact-mb", body = ErrorBody), (status = 502, description = "The store failed", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn upload_bundle(
    State(control_plane): State<Arc<ControlPlane>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<BundleRecord>), ApiError> {
    let body = body?;
    let header = edge::bundle::BundleView::parse(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_bundle", e.to_string()))?
        .header;
    let artifact = put_artifact(&control_plane.store, "bundles", "bundle", &body).await?;
    let record = BundleRecord::new(&header, &artifact, now_seconds());
    let to_add = record.clone();
    let added = control_plane
        .registry(move |r| r.add_bundle(&to_add))
        .await?;
    if added {
        tracing::info!(sha256 = %record.sha256, model_version = %record.model_version, size = record.size, "bundle registered");
        Ok((StatusCode::CREATED, Json(record)))
    } else {
        let sha256 = record.sha256.clone();
        let existing = control_plane
            .registry(move |r| r.bundle(&sha256))
            .await?
            .unwrap_or(record);
        Ok((StatusCode::OK, Json(existing)))
    }
}

#[utoipa::path(post, path = "/profiles", tag = "registry", security(("bearer" = [])),
    request_body(content = Vec<u8>, content_type = "application/msgpack", description = "A profiles artifact: MessagePack {format: 1, users}"),
    responses((status = 201, description = "Stored and registered", body = ProfilesRecord), (status = 200, description = "Registered already", body = ProfilesRecord),
        (status = 413, description = "Over --max-artifact-mb", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn upload_profiles(
    State(control_plane): State<Arc<ControlPlane>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ProfilesRecord>), ApiError> {
    let body = body?;
    let users = count_profiles(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_profiles", e))?;
    let artifact = put_artifact(&control_plane.store, "profiles", "msgpack", &body).await?;
    let record = ProfilesRecord {
        sha256: artifact.sha256,
        key: artifact.key,
        size: artifact.size,
        users: users as u64,
        registered_at: now_seconds(),
    };
    let to_add = record.clone();
    let added = control_plane
        .registry(move |r| r.add_profiles(&to_add))
        .await?;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)))
}

#[utoipa::path(get, path = "/channels", tag = "channels", security(("bearer" = [])),
    responses((status = 200, description = "Each channel's current manifest", body = Vec<Manifest>), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_channels(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<Vec<Manifest>>, ApiError> {
    Ok(Json(control_plane.registry(|r| r.channels()).await?))
}

fn channel_name(name: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = name?;
    check_channel(&name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(name)
}

#[utoipa::path(get, path = "/channels/{name}", tag = "channels", security(("bearer" = [])),
    params(("name" = String, Path, description = "Channel name: 1-64 of a-z, 0-9, -")),
    responses((status = 200, description = "The channel and its history, newest first", body = crate::registry::Channel), (status = 404, description = "Nothing published", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn show_channel(
    State(control_plane): State<Arc<ControlPlane>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<crate::registry::Channel>, ApiError> {
    let name = channel_name(name)?;
    let wanted = name.clone();
    control_plane
        .registry(move |r| r.channel(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_channel",
                format!("nothing was ever published to {name}"),
            )
        })
}

/// `POST /channels/{name}/publish`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The sha256 of a registered bundle.
    pub bundle: String,
    /// The sha256 of registered profiles, if hosts should get them.
    #[serde(default)]
    pub profiles: Option<String>,
}

/// What a publish or rollback wrote.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChannelWrite {
    /// The registry's event id.
    pub event: i64,
    /// Publish or rollback.
    pub action: ChannelAction,
    /// The manifest now at `manifests/<channel>.json`.
    pub manifest: Manifest,
}

/// Checks that the store still holds every byte of an artifact a manifest will name.
async fn check_in_store(store: &ObjectStore, artifact: &Artifact) -> Result<(), ApiError> {
    let stored = store
        .size(&artifact.key)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "store_failed", e.to_string()))?;
    if stored == Some(artifact.size) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "artifact_missing",
            format!(
                "{} is registered with {} bytes but the store holds {stored:?}; upload it again",
                artifact.key, artifact.size
            ),
        ))
    }
}

async fn write_channel(
    control_plane: &ControlPlane,
    action: ChannelAction,
    manifest: Manifest,
) -> Result<Json<ChannelWrite>, ApiError> {
    check_in_store(&control_plane.store, &manifest.bundle).await?;
    if let Some(experiment) = &manifest.experiment {
        for variant in &experiment.variants {
            check_in_store(&control_plane.store, &variant.bundle).await?;
        }
    }
    if let Some(profiles) = &manifest.profiles {
        check_in_store(&control_plane.store, profiles).await?;
    }
    write_manifest(&control_plane.store, &manifest).await?;
    let recorded = manifest.clone();
    let event = control_plane
        .registry(move |r| r.record_channel_event(action, &recorded))
        .await?;
    tracing::info!(channel = %manifest.channel, ?action, bundle = %manifest.bundle.sha256, model_version = %manifest.model_version, "channel written");
    Ok(Json(ChannelWrite {
        event: event.id,
        action,
        manifest,
    }))
}

#[utoipa::path(post, path = "/channels/{name}/publish", tag = "channels", security(("bearer" = [])),
    params(("name" = String, Path, description = "Channel name")),
    request_body = PublishRequest,
    responses((status = 200, description = "The manifest written", body = ChannelWrite),
        (status = 404, description = "Bundle or profiles not registered", body = ErrorBody),
        (status = 409, description = "The store no longer holds the artifact", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn publish_channel(
    State(control_plane): State<Arc<ControlPlane>>,
    name: Result<Path<String>, PathRejection>,
    request: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Json<ChannelWrite>, ApiError> {
    let channel = channel_name(name)?;
    let Json(request) = request?;
    check_sha256("bundle", &request.bundle)?;
    if let Some(profiles) = &request.profiles {
        check_sha256("profiles", profiles)?;
    }
    let wanted = request.bundle.clone();
    let bundle = control_plane
        .registry(move |r| r.bundle(&wanted))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_bundle",
                format!(
                    "bundle {} is not registered; upload it with POST /bundles first",
                    request.bundle
                ),
            )
        })?;
    let profiles = match request.profiles.clone() {
        Some(sha256) => {
            let wanted = sha256.clone();
            let record = control_plane
                .registry(move |r| r.profiles(&wanted))
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(
                        "unknown_profiles",
                        format!("profiles {sha256} are not registered; upload them with POST /profiles first"),
                    )
                })?;
            Some(Artifact {
                key: record.key,
                sha256: record.sha256,
                size: record.size,
            })
        }
        None => None,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        channel,
        model_version: bundle.model_version.clone(),
        bundle: bundle.artifact(),
        profiles,
        published_at: now_seconds(),
        experiment: None,
    };
    let _one_at_a_time = control_plane.channel_writes.lock().await;
    write_channel(&control_plane, ChannelAction::Publish, manifest).await
}

#[utoipa::path(post, path = "/channels/{name}/rollback", tag = "channels", security(("bearer" = [])),
    params(("name" = String, Path, description = "Channel name")),
    responses((status = 200, description = "The manifest written (the bundle before the current one)", body = ChannelWrite),
        (status = 409, description = "Nothing to roll back to", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn rollback_channel(
    State(control_plane): State<Arc<ControlPlane>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<ChannelWrite>, ApiError> {
    let channel = channel_name(name)?;
    let _one_at_a_time = control_plane.channel_writes.lock().await;
    let wanted = channel.clone();
    let mut manifest = control_plane
        .registry(move |r| r.rollback_target(&wanted))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "nothing_to_roll_back",
                format!("{channel} has no earlier bundle to go back to"),
            )
        })?;
    manifest.published_at = now_seconds();
    write_channel(&control_plane, ChannelAction::Rollback, manifest).await
}

/// What an ingest batch did.
#[derive(Serialize, utoipa::ToSchema)]
struct IngestAnswer {
    accepted: usize,
    duplicates: usize,
}

async fn ingest(
    control_plane: &ControlPlane,
    kind: EventKind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestAnswer>, ApiError> {
    let body = body?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let encoding = BatchEncoding::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type {content_type:?}: send application/x-ndjson, application/json or application/msgpack"),
        )
    })?;
    let events = parse_batch(kind, encoding, &body).map_err(ApiError::bad_request)?;
    let received_at = now_millis();
    let (accepted, duplicates) = control_plane
        .registry(move |r| r.ingest(kind, &events, received_at))
        .await?;
    Ok(Json(IngestAnswer {
        accepted,
        duplicates,
    }))
}

#[utoipa::path(post, path = "/ingest/inferences", tag = "ingest", security(("bearer" = [])),
    request_body(content = Vec<crate::ingest::InferenceEvent>, description = "NDJSON (application/x-ndjson), a JSON array or a MessagePack array (application/msgpack), at most 10,000 events",
        content_type = "application/x-ndjson"),
    responses((status = 200, description = "On disk", body = IngestAnswer), (status = 413, description = "Over --max-body-mb", body = ErrorBody),
        (status = 415, description = "Unknown encoding", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn ingest_inferences(
    State(control_plane): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestAnswer>, ApiError> {
    ingest(&control_plane, EventKind::Inference, &headers, body).await
}

#[utoipa::path(post, path = "/ingest/interactions", tag = "ingest", security(("bearer" = [])),
    request_body(content = Vec<crate::ingest::InteractionEvent>, description = "NDJSON (application/x-ndjson), a JSON array or a MessagePack array (application/msgpack), at most 10,000 events",
        content_type = "application/x-ndjson"),
    responses((status = 200, description = "On disk", body = IngestAnswer), (status = 413, description = "Over --max-body-mb", body = ErrorBody),
        (status = 415, description = "Unknown encoding", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn ingest_interactions(
    State(control_plane): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestAnswer>, ApiError> {
    ingest(&control_plane, EventKind::Interaction, &headers, body).await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Page {
    /// Events after this sequence number.
    #[serde(default)]
    after: i64,
    /// Events per page, 1-10000 (1000).
    #[serde(default = "default_page")]
    limit: usize,
}

fn default_page() -> usize {
    1000
}

async fn list_events(
    control_plane: &ControlPlane,
    kind: EventKind,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(page) = page?;
    if page.limit == 0 || page.limit > 10_000 {
        return Err(ApiError::bad_request("limit must be 1-10000"));
    }
    let (events, total) = control_plane
        .registry(move |r| {
            Ok((
                r.events(kind, page.after, page.limit)?,
                r.event_count(kind)?,
            ))
        })
        .await?;
    let next_after = events.last().map_or(page.after, |e| e.sequence);
    Ok(Json(
        json!({"total": total, "next_after": next_after, "events": events}),
    ))
}

#[utoipa::path(get, path = "/ingest/inferences", tag = "ingest", security(("bearer" = [])), params(Page),
    responses((status = 200, description = "{total, next_after, events}", body = EventPage), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_inferences(
    State(control_plane): State<Arc<ControlPlane>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    list_events(&control_plane, EventKind::Inference, page).await
}

#[utoipa::path(get, path = "/ingest/interactions", tag = "ingest", security(("bearer" = [])), params(Page),
    responses((status = 200, description = "{total, next_after, events}", body = EventPage), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_interactions(
    State(control_plane): State<Arc<ControlPlane>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    list_events(&control_plane, EventKind::Interaction, page).await
}

/// `POST /runs`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The data set folder on the control plane's machine.
    pub data: String,
    /// The configuration as TOML text [default: the defaults].
    #[serde(default)]
    pub config: Option<String>,
    /// Publish to this channel when every other stage succeeded.
    #[serde(default)]
    pub publish: Option<String>,
    /// The title model folder for the two-tower model.
    #[serde(default)]
    pub title_model: Option<String>,
}

#[utoipa::path(post, path = "/runs", tag = "pipeline", security(("bearer" = [])),
    request_body = RunRequest,
    responses((status = 202, description = "Queued and started", body = RunRecord), (status = 409, description = "A run is queued or running", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn start_run(
    State(control_plane): State<Arc<ControlPlane>>,
    request: Result<Json<RunRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<RunRecord>), ApiError> {
    let Json(request) = request?;
    let data = std::path::PathBuf::from(&request.data);
    crate::data::read_manifest(&data).map_err(|e| {
        ApiError::bad_request(format!(
            "data {:?} is not a data set folder: {e}",
            request.data
        ))
    })?;
    let config = match &request.config {
        Some(text) => crate::config::Config::parse(text)
            .map_err(|e| ApiError::bad_request(format!("config: {e}")))?,
        None => crate::config::Config::default(),
    };
    if let Some(channel) = &request.publish {
        check_channel(channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let title_model = request.title_model.as_ref().map(std::path::PathBuf::from);
    if let Some(folder) = &title_model
        && !folder.is_dir()
    {
        return Err(ApiError::bad_request(format!(
            "title_model {} is not a folder",
            folder.display()
        )));
    }
    let record = RunRecord::new(
        crate::pipeline::new_run_id(),
        &data,
        &config,
        title_model.as_deref(),
        request.publish.clone(),
    );
    let queued = record.clone();
    // One start at a time, so two requests cannot both find the pipeline idle.
    let _one_at_a_time = control_plane.channel_writes.lock().await;
    control_plane
        .registry(move |r| {
            if let Err(e) = crate::pipeline::check_idle(r) {
                return Ok(Err(e.to_string()));
            }
            r.save_run(&queued).map(Ok)
        })
        .await?
        .map_err(|busy| ApiError::new(StatusCode::CONFLICT, "run_in_progress", busy))?;
    spawn_run(&control_plane, &record.id)?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Starts `control-plane pipeline run --resume ID` for a queued run, with its output in
/// the run's `pipeline.log`, and marks the run failed if the process dies without
/// saying so itself (killed, out of memory).
fn spawn_run(control_plane: &Arc<ControlPlane>, id: &str) -> Result<(), ApiError> {
    let context = &control_plane.pipeline;
    let folder = context.run_dir(id);
    std::fs::create_dir_all(&folder)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", folder.display())))?;
    let log = std::fs::File::create(folder.join("pipeline.log"))
        .map_err(|e| ApiError::internal(format!("creating the run's log: {e}")))?;
    let log_err = log
        .try_clone()
        .map_err(|e| ApiError::internal(format!("the run's log: {e}")))?;
    let mut command = std::process::Command::new(&context.exe);
    command
        .args(["pipeline", "run", "--resume", id, "--state"])
        .arg(&context.state)
        .args(["--store", &context.store])
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(endpoint) = &context.s3.endpoint {
        command.args(["--s3-endpoint", endpoint]);
    }
    if context.s3.path_style {
        command.arg("--s3-path-style");
    }
    let mut child = command
        .spawn()
        .map_err(|e| ApiError::internal(format!("starting the pipeline: {e}")))?;
    tracing::info!(run = id, pid = child.id(), "pipeline run started");
    let registry = control_plane.registry.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        let status = child.wait();
        let Ok(Some(mut record)) = registry.run(&id) else {
            return;
        };
        if matches!(record.status, RunStatus::Queued | RunStatus::Running) {
            record.status = RunStatus::Failed;
            record.error = Some(format!(
                "the pipeline process ended without finishing the run ({})",
                status.map_or_else(|e| e.to_string(), |s| s.to_string())
            ));
            if let Err(e) = registry.save_run(&record) {
                tracing::error!(run = %id, "could not record the run's end: {e}");
            }
        }
        tracing::info!(run = %id, status = record.status.as_str(), "pipeline run ended");
    });
    Ok(())
}

#[utoipa::path(get, path = "/runs", tag = "pipeline", security(("bearer" = [])),
    responses((status = 200, description = "Runs, newest first", body = Vec<RunRecord>), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_runs(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<Vec<RunRecord>>, ApiError> {
    Ok(Json(control_plane.registry(|r| r.runs()).await?))
}

fn run_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = id?;
    if crate::pipeline::is_run_id(&id) {
        Ok(id)
    } else {
        Err(ApiError::bad_request(format!("{id:?} is not a run id")))
    }
}

#[utoipa::path(get, path = "/runs/{id}", tag = "pipeline", security(("bearer" = [])),
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "The run", body = RunRecord), (status = 404, description = "No such run", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn show_run(
    State(control_plane): State<Arc<ControlPlane>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RunRecord>, ApiError> {
    let id = run_id(id)?;
    let wanted = id.clone();
    control_plane
        .registry(move |r| r.run(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("unknown_run", format!("no run {id}")))
}

/// The last 64 KiB of a run's output.
#[utoipa::path(get, path = "/runs/{id}/log", tag = "pipeline", security(("bearer" = [])),
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "The last 64 KiB of the run's output", content_type = "text/plain", body = String), (status = 404, description = "No such run", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn run_log(
    State(control_plane): State<Arc<ControlPlane>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = run_id(id)?;
    let path = control_plane.pipeline.run_dir(&id).join("pipeline.log");
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found("unknown_run", format!("no log for run {id}")))?;
    let start = bytes.len().saturating_sub(64 << 10);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes[start..]).into_owned(),
    )
        .into_response())
}

#[utoipa::path(get, path = "/data-versions", tag = "pipeline", security(("bearer" = [])),
    responses((status = 200, description = "Data versions, newest first", body = Vec<crate::pipeline::DataVersion>), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_data_versions(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<Vec<crate::pipeline::DataVersion>>, ApiError> {
    Ok(Json(control_plane.registry(|r| r.data_versions()).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AnalysisParams {
    /// The control arm ("control", else the first by name).
    control: Option<String>,
    /// Impressions an arm needs for a conclusive comparison (1000).
    #[serde(default = "default_min_sample")]
    min_sample: u64,
}

fn default_min_sample() -> u64 {
    1000
}

#[utoipa::path(get, path = "/experiments/{name}/analysis", tag = "experiments", security(("bearer" = [])),
    params(("name" = String, Path, description = "The experiment, as the bundle names it"), AnalysisParams),
    responses((status = 200, description = "Per arm outcomes and tests against the control", body = crate::experiments::Analysis), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn analyze_experiment(
    State(control_plane): State<Arc<ControlPlane>>,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<AnalysisParams>, QueryRejection>,
) -> Result<Json<crate::experiments::Analysis>, ApiError> {
    let Path(name) = name?;
    let Query(params) = params?;
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request(
            "experiment names are 1-128 characters",
        ));
    }
    let wanted = name.clone();
    let outcomes = control_plane
        .registry(move |r| r.arm_outcomes(Some(&wanted)))
        .await?;
    Ok(Json(crate::experiments::analyze(
        &name,
        outcomes,
        params.control.as_deref(),
        params.min_sample,
    )))
}

/// Impressions, clicks, CTR and watch rate per model version, from the ingested events.
#[utoipa::path(get, path = "/online-metrics", tag = "experiments", security(("bearer" = [])),
    responses((status = 200, description = "Impressions, clicks, CTR and watch rate per model version", body = Vec<serde_json::Value>), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn online_metrics(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let outcomes = control_plane.registry(|r| r.arm_outcomes(None)).await?;
    Ok(Json(
        outcomes
            .into_iter()
            .map(|o| {
                json!({
                    "model_version": o.arm, "responses": o.responses, "impressions": o.impressions,
                    "clicks": o.clicks, "watches": o.watches, "ctr": o.ctr(), "watch_rate": o.watch_rate(),
                })
            })
            .collect(),
    ))
}

/// `POST /feedback/merge`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MergeRequest {
    /// The data set the events are about.
    base: String,
    /// The new data set's folder (must not exist).
    out: String,
}

#[utoipa::path(post, path = "/feedback/merge", tag = "feedback", security(("bearer" = [])),
    request_body = MergeRequest,
    responses((status = 201, description = "The merged data set", body = crate::feedback::MergeReport), (status = 409, description = "The output folder exists", body = ErrorBody), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn merge_feedback(
    State(control_plane): State<Arc<ControlPlane>>,
    request: Result<Json<MergeRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::feedback::MergeReport>), ApiError> {
    let Json(request) = request?;
    let base = std::path::PathBuf::from(&request.base);
    let out = std::path::PathBuf::from(&request.out);
    crate::data::read_manifest(&base).map_err(|e| {
        ApiError::bad_request(format!(
            "base {:?} is not a data set folder: {e}",
            request.base
        ))
    })?;
    if out.exists() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("{} exists already; merge into a new folder", out.display()),
        ));
    }
    let registry = control_plane.registry.clone();
    let report =
        tokio::task::spawn_blocking(move || crate::feedback::merge(&registry, &base, &out))
            .await
            .map_err(|e| ApiError::internal(format!("merge task: {e}")))?
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok((StatusCode::CREATED, Json(report)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DriftParams {
    /// The training data set [default: the channel's bundle's, from its lineage].
    data: Option<String>,
    /// Only requests served by this model version [default: the channel's].
    model_version: Option<String>,
    /// The channel (production).
    channel: Option<String>,
    /// PSI above which a feature alerts (0.2).
    threshold: Option<f64>,
}

/// Serving features against training's: the data set is `data`, or the one the
/// channel's bundle was trained on (its lineage), and the requests are those served by
/// `model_version`, or by the channel's current model.
#[utoipa::path(get, path = "/drift", tag = "feedback", security(("bearer" = [])), params(DriftParams),
    responses((status = 200, description = "PSI per viewer feature", body = crate::drift::DriftReport), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn drift(
    State(control_plane): State<Arc<ControlPlane>>,
    params: Result<Query<DriftParams>, QueryRejection>,
) -> Result<Json<crate::drift::DriftReport>, ApiError> {
    let Query(params) = params?;
    let threshold = params.threshold.unwrap_or(crate::drift::DEFAULT_THRESHOLD);
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(ApiError::bad_request("threshold must be a positive number"));
    }
    let channel = params.channel.unwrap_or_else(|| "production".to_owned());
    check_channel(&channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let registry = control_plane.registry.clone();
    let report = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let internal = |e: RegistryError| ApiError::internal(e.to_string());
        let serving = registry.channel(&channel).map_err(internal)?;
        let (data, model_version) = match params.data {
            Some(data) => (data, params.model_version),
            None => {
                let current = serving.as_ref().ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "nothing is published to {channel}: give data=PATH"
                    ))
                })?;
                let bundle = registry
                    .bundle(&current.current.bundle.sha256)
                    .map_err(internal)?
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "the channel's bundle is not registered: give data=PATH",
                        )
                    })?;
                let from_version = match bundle.lineage.get("data_version") {
                    Some(sha) => registry
                        .data_versions()
                        .map_err(internal)?
                        .into_iter()
                        .find(|version| &version.sha256 == sha)
                        .map(|version| version.path),
                    None => None,
                };
                let data = from_version
                    .or_else(|| bundle.lineage.get("data").cloned())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "the bundle's lineage names no data set: give data=PATH",
                        )
                    })?;
                (
                    data,
                    params
                        .model_version
                        .or_else(|| Some(current.current.model_version.clone())),
                )
            }
        };
        let dataset = crate::data::Dataset::load(std::path::Path::new(&data))
            .map_err(|e| ApiError::bad_request(format!("data {data:?}: {e}")))?;
        let mut skipped = 0;
        let served: Vec<crate::ingest::InferenceEvent> =
            crate::feedback::all_events(&registry, EventKind::Inference, &mut skipped)
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        Ok(crate::drift::drift_report(
            &dataset,
            &data,
            &served,
            model_version.as_deref(),
            threshold,
        ))
    })
    .await
    .map_err(|e| ApiError::internal(format!("drift task: {e}")))??;
    Ok(Json(report))
}

/// `POST /experiments`: arms that are bundles, on a channel.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentRequest {
    /// 1-64 of a-z, 0-9, '-', '_'.
    pub name: String,
    /// The channel whose hosts run it.
    pub channel: String,
    /// The assignment salt [default: the name and the start time].
    #[serde(default)]
    pub salt: Option<String>,
    /// 2-10 arms; the first is the control.
    pub variants: Vec<VariantRequest>,
}

/// One arm of `POST /experiments`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VariantRequest {
    /// Same rules as the experiment's name.
    pub name: String,
    /// The sha256 of a registered bundle.
    pub bundle: String,
    /// Its traffic share relative to the others' (0-10000; at least one positive).
    pub weight: u32,
}

/// `POST /experiments/{name}/stop`.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// The arm whose bundle serves everyone afterwards [default: the control].
    #[serde(default)]
    pub winner: Option<String>,
}

/// An experiment with whether its channel runs it now.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExperimentState {
    /// The record.
    #[serde(flatten)]
    pub record: crate::registry::ExperimentRecord,
    /// Its channel's current manifest carries it.
    pub running: bool,
}

fn is_experiment_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[utoipa::path(get, path = "/experiments", tag = "experiments", security(("bearer" = [])),
    responses((status = 200, description = "Experiments whose arms are bundles, newest first", body = Vec<ExperimentState>),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn list_experiments(
    State(control_plane): State<Arc<ControlPlane>>,
) -> Result<Json<Vec<ExperimentState>>, ApiError> {
    let states = control_plane
        .registry(|r| {
            let channels = r.channels()?;
            Ok(r.experiments()?
                .into_iter()
                .map(|record| {
                    let running = channels.iter().any(|manifest| {
                        manifest.channel == record.channel
                            && manifest
                                .experiment
                                .as_ref()
                                .is_some_and(|e| e.name == record.name)
                    });
                    ExperimentState { record, running }
                })
                .collect())
        })
        .await?;
    Ok(Json(states))
}

#[utoipa::path(post, path = "/experiments", tag = "experiments", security(("bearer" = [])),
    request_body = ExperimentRequest,
    responses((status = 201, description = "Started: the channel's manifest names every arm's bundle", body = ChannelWrite),
        (status = 404, description = "A bundle is not registered", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn start_experiment(
    State(control_plane): State<Arc<ControlPlane>>,
    request: Result<Json<ExperimentRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ChannelWrite>), ApiError> {
    let Json(request) = request?;
    if !is_experiment_name(&request.name) {
        return Err(ApiError::bad_request(format!(
            "experiment name {:?}: use 1-64 of a-z, 0-9, '-' and '_'",
            request.name
        )));
    }
    check_channel(&request.channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !(2..=10).contains(&request.variants.len()) {
        return Err(ApiError::bad_request("an experiment has 2-10 variants"));
    }
    for (index, variant) in request.variants.iter().enumerate() {
        if !is_experiment_name(&variant.name) {
            return Err(ApiError::bad_request(format!(
                "variants[{index}].name {:?}: use 1-64 of a-z, 0-9, '-' and '_'",
                variant.name
            )));
        }
        if request.variants[..index]
            .iter()
            .any(|v| v.name == variant.name)
        {
            return Err(ApiError::bad_request(format!(
                "variants[{index}].name {:?} appears twice",
                variant.name
            )));
        }
        if variant.weight > 10_000 {
            return Err(ApiError::bad_request(format!(
                "variants[{index}].weight {} is above 10000",
                variant.weight
            )));
        }
        check_sha256(&format!("variants[{index}].bundle"), &variant.bundle)?;
    }
    if request.variants.iter().all(|v| v.weight == 0) {
        return Err(ApiError::bad_request(
            "at least one variant needs a positive weight",
        ));
    }
    let mut variants = Vec::new();
    for variant in &request.variants {
        let wanted = variant.bundle.clone();
        let bundle = control_plane
            .registry(move |r| r.bundle(&wanted))
            .await?
            .ok_or_else(|| {
                ApiError::not_found(
                    "unknown_bundle",
                    format!(
                        "bundle {} of variant {} is not registered; upload it with POST /bundles first",
                        variant.bundle, variant.name
                    ),
                )
            })?;
        check_in_store(&control_plane.store, &bundle.artifact()).await?;
        variants.push(crate::publish::ManifestVariant {
            name: variant.name.clone(),
            weight: variant.weight,
            model_version: bundle.model_version.clone(),
            bundle: bundle.artifact(),
        });
    }
    let now = now_seconds();
    let record = crate::registry::ExperimentRecord {
        name: request.name.clone(),
        channel: request.channel.clone(),
        salt: request
            .salt
            .clone()
            .unwrap_or_else(|| format!("{}-{now}", request.name)),
        variants,
        created_at: now,
        stopped_at: None,
        winner: None,
    };
    let _one_at_a_time = control_plane.channel_writes.lock().await;
    let wanted = request.name.clone();
    if control_plane
        .registry(move |r| r.experiment(&wanted))
        .await?
        .is_some()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "experiment_exists",
            format!(
                "an experiment named {} exists; pick a new name",
                request.name
            ),
        ));
    }
    let channel = request.channel.clone();
    let current = control_plane.registry(move |r| r.channel(&channel)).await?;
    let control = &record.variants[0];
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        channel: record.channel.clone(),
        model_version: control.model_version.clone(),
        bundle: control.bundle.clone(),
        profiles: current.and_then(|c| c.current.profiles),
        published_at: now,
        experiment: Some(crate::publish::ManifestExperiment {
            name: record.name.clone(),
            salt: record.salt.clone(),
            variants: record.variants.clone(),
        }),
    };
    let written = write_channel(&control_plane, ChannelAction::StartExperiment, manifest).await?;
    let to_add = record.clone();
    control_plane
        .registry(move |r| r.add_experiment(&to_add))
        .await?;
    Ok((StatusCode::CREATED, written))
}

#[utoipa::path(post, path = "/experiments/{name}/stop", tag = "experiments", security(("bearer" = [])),
    params(("name" = String, Path, description = "The experiment")),
    request_body = StopRequest,
    responses((status = 200, description = "Stopped: the winner's bundle serves everyone", body = ChannelWrite),
        (status = 404, description = "No such experiment", body = ErrorBody),
        (status = 409, description = "Its channel does not run it", body = ErrorBody),
        (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No or wrong bearer token", body = ErrorBody)))]
async fn stop_experiment(
    State(control_plane): State<Arc<ControlPlane>>,
    name: Result<Path<String>, PathRejection>,
    request: Result<Json<StopRequest>, JsonRejection>,
) -> Result<Json<ChannelWrite>, ApiError> {
    let Path(name) = name?;
    let Json(request) = request?;
    let _one_at_a_time = control_plane.channel_writes.lock().await;
    let wanted = name.clone();
    let mut record = control_plane
        .registry(move |r| r.experiment(&wanted))
        .await?
        .ok_or_else(|| {
            ApiError::not_found("unknown_experiment", format!("no experiment {name}"))
        })?;
    let channel = record.channel.clone();
    let current = control_plane
        .registry(move |r| r.channel(&channel))
        .await?
        .map(|c| c.current)
        .filter(|manifest| manifest.experiment.as_ref().is_some_and(|e| e.name == name))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_running",
                format!("{} does not run experiment {name} now", record.channel),
            )
        })?;
    let winner = match &request.winner {
        Some(arm) => record
            .variants
            .iter()
            .find(|v| &v.name == arm)
            .ok_or_else(|| {
                ApiError::bad_request(format!("experiment {name} has no arm {arm:?}"))
            })?,
        None => &record.variants[0],
    }
    .clone();
    let manifest = Manifest {
        model_version: winner.model_version.clone(),
        bundle: winner.bundle.clone(),
        published_at: now_seconds(),
        experiment: None,
        ..current
    };
    let written = write_channel(&control_plane, ChannelAction::StopExperiment, manifest).await?;
    record.stopped_at = Some(now_seconds());
    record.winner = Some(winner.name);
    let saved = record.clone();
    control_plane
        .registry(move |r| r.save_experiment(&saved))
        .await?;
    Ok(written)
}

/// A page of stored events (for the OpenAPI document; the handler builds it as JSON).
#[derive(Serialize, utoipa::ToSchema)]
struct EventPage {
    /// Events of the kind stored in all.
    total: u64,
    /// Pass as `after` for the next page.
    next_after: i64,
    /// Oldest first.
    events: Vec<crate::registry::StoredEvent>,
}

/// The REST API's OpenAPI document, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "edgerec control plane", description = "Registry, channels, store, ingest, pipeline runs, experiments, feedback and drift. Errors are {code, message}."),
    paths(
        health, read_store, list_bundles, show_bundle, upload_bundle, upload_profiles,
        list_channels, show_channel, publish_channel, rollback_channel,
        ingest_inferences, ingest_interactions, list_inferences, list_interactions,
        start_run, list_runs, show_run, run_log, list_data_versions,
        list_experiments, start_experiment, stop_experiment,
        analyze_experiment, online_metrics, merge_feedback, drift, openapi_document
    ),
    modifiers(&BearerToken),
)]
pub struct ApiDoc;

struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document", body = serde_json::Value)))]
async fn openapi_document() -> Response {
    use utoipa::OpenApi;
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes"),
    )
        .into_response()
}

/// The key a channel's manifest is served at, for printing.
pub fn manifest_path(channel: &str) -> String {
    format!("/store/{}", manifest_key(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_published_layout_is_public() {
        let sha = "a".repeat(64);
        assert_eq!(
            public_key("manifests/production.json"),
            Some(CachePolicy::Short)
        );
        assert_eq!(
            public_key(&format!("bundles/{sha}.bundle")),
            Some(CachePolicy::Immutable)
        );
        assert_eq!(
            public_key(&format!("profiles/{sha}.msgpack")),
            Some(CachePolicy::Immutable)
        );
        for bad in [
            "manifests/../registry.sqlite.json",
            "../etc/passwd",
            "manifests/Prod.json",
            "bundles/abc.bundle",
            &format!("bundles/{sha}.msgpack"),
            &format!("other/{sha}.bundle"),
            "registry.sqlite",
            "manifests/a/b.json",
        ] {
            assert_eq!(public_key(bad), None, "{bad}");
        }
    }
}
