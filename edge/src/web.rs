//! The browser door (cargo feature `browser`): the same core as the raw ABI, behind a
//! wasm-bindgen class that takes and returns plain JavaScript objects. `cargo xtask dist`
//! builds it into `dist/web/` (`edgerec.js`, `edgerec_bg.wasm`, `edgerec.d.ts`).
//!
//! ```js
//! import init, { Recommender } from "./edgerec.js";
//! await init();
//! const recommender = new Recommender(new Uint8Array(await (await fetch(bundleUrl)).arrayBuffer()));
//! const response = recommender.recommend({ n: 10, timestamp: Date.now() / 1000 | 0,
//!   watch_history: [1, 2] }, () => performance.now());
//! ```
//!
//! Errors are thrown as `Error` objects with a `code` property: the raw ABI's codes
//! (`invalid_request`, `invalid_bundle`).

// `#[wasm_bindgen]` expands to unsafe glue (pointers into linear memory); the one
// `unsafe` block written here calls the linker's constructor function (see `start`).
#![allow(unsafe_code)]

use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::Error;
use crate::catalog::VideoRef;
use crate::recommend::{self, Request};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** What is known about the viewer, all optional. */
export interface UserFeatures {
  country?: string | null;
  language?: string | null;
  /** Years, 0 to 150. */
  age?: number | null;
  device?: string | null;
}

/** The seed's `POST /recommendations` body plus the time (Unix seconds), which the module cannot read. */
export interface RecommendRequest {
  user_id?: number | null;
  /** 1 to 200; 20 when absent. */
  n?: number;
  timestamp: number;
  user_features?: UserFeatures;
  /** Videos the viewer engaged with, oldest first. */
  watch_history?: number[];
  exclude_watched?: boolean | null;
  excluded_video_ids?: number[];
  user_preferences?: { categories?: string[]; languages?: string[] };
}

export interface RecommendedItem {
  video_id: number;
  score: number;
  category: string;
  /** `personalized`, `category:<name>`, `promoted` or `popular`. */
  source: string;
  title: string;
  channel_id: number;
}

export interface StageMs {
  tower: number;
  retrieval: number;
  filtering: number;
  ranking: number;
  ordering: number;
}

export interface RecommendResponse {
  user_id: number | null;
  recommendations: RecommendedItem[];
  metadata: {
    latency_ms: number;
    stage_ms: StageMs;
    candidates_retrieved: number;
    candidates_after_filtering: number;
    model_version: string;
    experiment?: string;
    variant?: string;
    cold_start: boolean;
  };
}

export interface BundleSummary {
  model_version: string;
  videos: number;
  indexed_videos: number;
  trees: number;
  experiments: string[];
}

export interface VideoInfo {
  video_id: number;
  title: string;
  category: string;
  channel_id: number;
  language: string;
  duration_seconds: number;
  view_count: number;
  upload_time: number | null;
  promoted: boolean;
}

/** Thrown by every method: `code` is the raw ABI's error code. */
export interface RecommenderError extends Error {
  code: "invalid_request" | "invalid_bundle" | "internal";
}
"#;

#[cfg(target_arch = "wasm32")]
unsafe extern "C" {
    /// Synthesised by wasm-ld: runs the constructors that register tract's operators.
    fn __wasm_call_ctors();
}

/// Runs once when the module is instantiated (wasm-bindgen's start function). The build
/// exports `__wasm_call_ctors` (`.cargo/config.toml`) so that the raw ABI's host calls it
/// once; exported, the linker no longer calls it itself, so this door does.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen(start)]
fn start() {
    // SAFETY: called once, at instantiation, before any other export; the constructors
    // only fill tract's operator registry.
    unsafe { __wasm_call_ctors() }
}

/// A loaded bundle.
#[wasm_bindgen]
pub struct Recommender {
    inner: recommend::Recommender,
}

#[derive(Serialize)]
struct VideoInfo<'a> {
    video_id: u64,
    title: &'a str,
    category: &'a str,
    channel_id: u64,
    language: &'a str,
    duration_seconds: u32,
    view_count: u64,
    upload_time: Option<i64>,
    promoted: bool,
}

impl<'a> VideoInfo<'a> {
    fn of(video: VideoRef<'a>) -> Self {
        Self {
            video_id: video.video_id(),
            title: video.title(),
            category: video.category(),
            channel_id: video.channel_id(),
            language: video.language(),
            duration_seconds: video.duration_seconds(),
            view_count: video.view_count(),
            upload_time: video.upload_time(),
            promoted: video.promoted(),
        }
    }
}

fn thrown(code: &str, message: &str) -> JsValue {
    let error = js_sys::Error::new(message);
    // Setting a property on a fresh Error object cannot fail.
    let _ = js_sys::Reflect::set(&error, &"code".into(), &code.into());
    error.into()
}

fn thrown_by(error: &Error) -> JsValue {
    thrown(error.code(), &error.to_string())
}

/// The request as the raw ABI would decode it: through MessagePack, so unknown fields are
/// refused and NaN reaches the validation that refuses it.
fn request_from_js(request: JsValue) -> Result<Request, JsValue> {
    let refused = |reason: String| {
        thrown(
            "invalid_request",
            &format!("invalid request: `request` is not a valid request object: {reason}"),
        )
    };
    let mut bytes = Vec::new();
    serde_transcode::transcode(
        serde_wasm_bindgen::Deserializer::from(request),
        &mut rmp_serde::Serializer::new(&mut bytes).with_struct_map(),
    )
    .map_err(|e| refused(e.to_string()))?;
    rmp_serde::from_slice(&bytes).map_err(|e| refused(e.to_string()))
}

/// JSON-compatible output: maps become objects and 64-bit ids plain numbers (ids above
/// 2^53 are refused with an error instead of being rounded).
fn to_js(value: &impl Serialize) -> Result<JsValue, JsValue> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| thrown("internal", &format!("cannot convert the answer: {e}")))
}

#[wasm_bindgen]
impl Recommender {
    /// Loads a bundle, checking its format and every section's hash.
    #[wasm_bindgen(constructor)]
    pub fn new(bundle: Vec<u8>) -> Result<Recommender, JsValue> {
        // Owned (wasm-bindgen copies the array into linear memory either way), so the
        // shard is searched in that copy rather than copied once more.
        recommend::Recommender::from_shared_bundle(bundle.into())
            .map(|inner| Recommender { inner })
            .map_err(|e| thrown_by(&e))
    }

    /// What the bundle holds.
    #[wasm_bindgen(unchecked_return_type = "BundleSummary")]
    pub fn summary(&self) -> Result<JsValue, JsValue> {
        to_js(&self.inner.summary())
    }

    /// The bundle's model version.
    #[wasm_bindgen(getter, js_name = modelVersion)]
    pub fn model_version(&self) -> String {
        self.inner.model_version().to_owned()
    }

    /// Answers a request. `clock` (milliseconds, e.g. `() => performance.now()`) times
    /// each stage; without it the stage times are 0.
    #[wasm_bindgen(unchecked_return_type = "RecommendResponse")]
    pub fn recommend(
        &self,
        #[wasm_bindgen(unchecked_param_type = "RecommendRequest")] request: JsValue,
        clock: Option<js_sys::Function>,
    ) -> Result<JsValue, JsValue> {
        let request = request_from_js(request)?;
        let mut read_clock = || {
            clock
                .as_ref()
                .and_then(|f| f.call0(&JsValue::NULL).ok())
                .and_then(|t| t.as_f64())
                .unwrap_or(0.0)
        };
        let response = self
            .inner
            .recommend(request, &mut read_clock)
            .map_err(|e| thrown_by(&e))?;
        to_js(&response)
    }

    /// A catalogue video's display fields, or `undefined` for an id not in the bundle.
    #[wasm_bindgen(unchecked_return_type = "VideoInfo | undefined")]
    pub fn video(&self, video_id: f64) -> Result<JsValue, JsValue> {
        if !(video_id >= 0.0 && video_id.fract() == 0.0 && video_id <= 2f64.powi(53)) {
            return Ok(JsValue::UNDEFINED);
        }
        match self.inner.catalog().get(video_id as u64) {
            Some(video) => to_js(&VideoInfo::of(video)),
            None => Ok(JsValue::UNDEFINED),
        }
    }

    /// Up to `n` videos of `category`, most viewed first: what a page offers for browsing
    /// outside the recommendations.
    #[wasm_bindgen(unchecked_return_type = "VideoInfo[]")]
    pub fn browse(&self, category: &str, n: usize) -> Result<JsValue, JsValue> {
        let mut videos: Vec<VideoRef<'_>> = self
            .inner
            .catalog()
            .iter()
            .filter(|v| v.category() == category)
            .collect();
        videos.sort_by_key(|v| (std::cmp::Reverse(v.view_count()), v.video_id()));
        let infos: Vec<VideoInfo<'_>> = videos.into_iter().take(n).map(VideoInfo::of).collect();
        to_js(&infos)
    }

    /// The catalogue's categories, most videos first: for a page's category filter.
    pub fn categories(&self) -> Vec<String> {
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for video in self.inner.catalog().iter() {
            *counts.entry(video.category()).or_default() += 1;
        }
        let mut categories: Vec<(&str, usize)> = counts.into_iter().collect();
        categories.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        categories.into_iter().map(|(c, _)| c.to_owned()).collect()
    }
}
