//! Prometheus metrics (`GET /metrics`): request latency, the module's per-stage times,
//! the cache, the bundle being served and its swaps, and the seed's online metrics
//! (impressions, clicks, CTR, watch rate) over sliding windows.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The stages the module reports, in its order.
pub const STAGES: [&str; 5] = ["tower", "retrieval", "filtering", "ranking", "ordering"];

/// Online-metric windows, in minutes.
const WINDOWS: [(u64, &str); 3] = [(5, "5m"), (60, "1h"), (1440, "24h")];

fn latency_histogram() -> Histogram {
    // 0.1 ms to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric the host exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<Labels, Counter>,
    /// Request latency by route (seconds).
    pub request_seconds: HistogramFamily,
    /// Module stage latency by stage (seconds, host clock).
    pub stage_seconds: HistogramFamily,
    /// Cache lookups by result (`hit`, `miss`).
    pub cache: Family<Labels, Counter>,
    /// Cache operations that failed (Redis unreachable, ...), each served as a miss.
    pub cache_errors: Counter,
    /// 1 for the bundle being served, labelled with its sha256 and model version.
    pub bundle_info: Family<Labels, Gauge>,
    /// Bundles swapped in.
    pub swaps: Counter,
    /// Bundles that failed to download, verify or load (the last good one kept serving).
    pub failed_swaps: Counter,
    /// Instances replaced after a trap or deadline.
    pub traps: Counter,
    /// Interactions received by kind.
    pub interactions: Family<Labels, Counter>,
    /// Captured events by stream and outcome (spooled, shipped, dropped, rejected).
    pub capture_events: Family<Labels, Counter>,
    /// Shipping attempts that failed (the control plane down or refusing).
    pub capture_ship_failures: Counter,
    online_ctr: Family<Labels, FloatGauge>,
    online_watch_rate: Family<Labels, FloatGauge>,
    online_impressions: Family<Labels, Gauge>,
    online_clicks: Family<Labels, Gauge>,
    window: Mutex<OnlineWindow>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `edgerec_host` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edgerec_host");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let request_seconds = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "HTTP request latency by route",
            request_seconds.clone(),
        );
        let stage_seconds = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "stage_duration_seconds",
            "Time of each recommend stage in the module, host clock",
            stage_seconds.clone(),
        );
        let cache = Family::<Labels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Response cache lookups by result",
            cache.clone(),
        );
        let cache_errors = Counter::default();
        registry.register(
            "cache_errors",
            "Response cache operations that failed (served as misses)",
            cache_errors.clone(),
        );
        let bundle_info = Family::<Labels, Gauge>::default();
        registry.register(
            "bundle_info",
            "The bundle being served (1), by sha256 and model version",
            bundle_info.clone(),
        );
        let swaps = Counter::default();
        registry.register("bundle_swaps", "Bundles swapped in", swaps.clone());
        let failed_swaps = Counter::default();
        registry.register(
            "bundle_swap_failures",
            "Bundles that failed to download, verify or load; the last good one kept serving",
            failed_swaps.clone(),
        );
        let traps = Counter::default();
        registry.register(
            "instance_traps",
            "Module instances replaced after a trap, deadline or memory limit",
            traps.clone(),
        );
        let interactions = Family::<Labels, Counter>::default();
        registry.register(
            "interactions",
            "Interactions received, by kind",
            interactions.clone(),
        );
        let capture_events = Family::<Labels, Counter>::default();
        registry.register(
            "capture_events",
            "Captured events by stream (inferences, interactions) and outcome (spooled, shipped, dropped: spool over its limit, rejected: refused by the control plane)",
            capture_events.clone(),
        );
        let capture_ship_failures = Counter::default();
        registry.register(
            "capture_ship_failures",
            "Attempts to ship captured events that failed (retried with backoff)",
            capture_ship_failures.clone(),
        );
        let online_impressions = Family::<Labels, Gauge>::default();
        registry.register(
            "online_impressions",
            "Recommended items served in the window",
            online_impressions.clone(),
        );
        let online_clicks = Family::<Labels, Gauge>::default();
        registry.register(
            "online_clicks",
            "Clicks received in the window",
            online_clicks.clone(),
        );
        let online_ctr = Family::<Labels, FloatGauge>::default();
        registry.register(
            "online_ctr",
            "Clicks per recommended item served, in the window",
            online_ctr.clone(),
        );
        let online_watch_rate = Family::<Labels, FloatGauge>::default();
        registry.register(
            "online_watch_rate",
            "Watches per recommended item served, in the window",
            online_watch_rate.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            stage_seconds,
            cache,
            cache_errors,
            bundle_info,
            swaps,
            failed_swaps,
            traps,
            interactions,
            capture_events,
            capture_ship_failures,
            online_ctr,
            online_watch_rate,
            online_impressions,
            online_clicks,
            window: Mutex::new(OnlineWindow::new()),
        }
    }

    /// Counts a finished request.
    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&vec![("route", route.to_owned())])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts captured events.
    pub fn capture(&self, stream: &str, outcome: &str, events: u64) {
        self.capture_events
            .get_or_create(&vec![
                ("stream", stream.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc_by(events);
    }

    /// Records the module's stage times.
    pub fn stages(&self, stage_ms: &[f64; 5]) {
        for (stage, ms) in STAGES.iter().zip(stage_ms) {
            self.stage_seconds
                .get_or_create(&vec![("stage", (*stage).to_owned())])
                .observe(ms / 1e3);
        }
    }

    /// Counts a cache lookup.
    pub fn cache_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    /// Names the bundle being served.
    pub fn serving(&self, sha256: &str, model_version: &str) {
        self.bundle_info.clear();
        self.bundle_info
            .get_or_create(&vec![
                ("sha256", sha256.to_owned()),
                ("model_version", model_version.to_owned()),
            ])
            .set(1);
    }

    /// Counts recommended items served.
    pub fn impressions(&self, items: u64) {
        self.window.lock().expect("window lock").add(items, 0, 0);
    }

    /// Counts an interaction.
    pub fn interaction(&self, kind: &str) {
        self.interactions
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
        let mut window = self.window.lock().expect("window lock");
        match kind {
            "click" => window.add(0, 1, 0),
            "watch" => window.add(0, 0, 1),
            _ => {}
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        {
            let window = self.window.lock().expect("window lock");
            for (minutes, name) in WINDOWS {
                let (impressions, clicks, watches) = window.sum(minutes);
                let labels = vec![("window", name.to_owned())];
                self.online_impressions
                    .get_or_create(&labels)
                    .set(impressions as i64);
                self.online_clicks.get_or_create(&labels).set(clicks as i64);
                let rate = |count: u64| {
                    if impressions == 0 {
                        0.0
                    } else {
                        count as f64 / impressions as f64
                    }
                };
                self.online_ctr.get_or_create(&labels).set(rate(clicks));
                self.online_watch_rate
                    .get_or_create(&labels)
                    .set(rate(watches));
            }
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String does not fail");
        text
    }
}

/// Per-minute counts for the last day: (impressions, clicks, watches).
struct OnlineWindow {
    started: Instant,
    minutes: Vec<(u64, u64, u64, u64)>,
}

impl OnlineWindow {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            minutes: vec![(u64::MAX, 0, 0, 0); 1440],
        }
    }

    fn minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    fn add(&mut self, impressions: u64, clicks: u64, watches: u64) {
        let minute = self.minute();
        let slot = &mut self.minutes[(minute % 1440) as usize];
        if slot.0 != minute {
            *slot = (minute, 0, 0, 0);
        }
        slot.1 += impressions;
        slot.2 += clicks;
        slot.3 += watches;
    }

    fn sum(&self, last_minutes: u64) -> (u64, u64, u64) {
        let now = self.minute();
        self.minutes
            .iter()
            .filter(|slot| slot.0 <= now && now - slot.0 < last_minutes)
            .fold((0, 0, 0), |acc, slot| {
                (acc.0 + slot.1, acc.1 + slot.2, acc.2 + slot.3)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_online_rates() {
        let metrics = Metrics::new();
        metrics.impressions(20);
        metrics.interaction("click");
        metrics.interaction("watch");
        metrics.interaction("watch");
        metrics.serving("abc", "v1");
        metrics.request("recommendations", 200, Duration::from_millis(3));
        let text = metrics.encode();
        assert!(
            text.contains(r#"edgerec_host_online_ctr{window="5m"} 0.05"#),
            "{text}"
        );
        assert!(
            text.contains(r#"edgerec_host_online_watch_rate{window="1h"} 0.1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"edgerec_host_bundle_info{sha256="abc",model_version="v1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                "edgerec_host_requests_total{route=\"recommendations\",status=\"200\"} 1"
            ),
            "{text}"
        );
    }
}
