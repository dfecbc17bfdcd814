//! Latency summaries for the `bench` commands.

use std::time::Duration;

/// Median and 99th percentile of timed calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median, microseconds.
    pub median_us: f64,
    /// 99th percentile (nearest rank), microseconds.
    pub p99_us: f64,
}

impl Latency {
    /// The median and p99 of `samples`.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len().max(1));
            samples.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            median_us: at(0.5),
            p99_us: at(0.99),
        }
    }
}
