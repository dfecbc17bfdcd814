//! `bench ranker` runs end to end and reports both paths.

use control_plane::ranker_bench::bench_ranker;

#[test]
fn the_ranker_bench_reports_both_paths() {
    let report = bench_ranker(20, 4, 30, 5, 1).unwrap();
    let text = report.to_string();
    for needle in [
        "20 trees of depth 4",
        "batched (edge)",
        "one call per candidate",
        "p99",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    for latency in [report.batched, report.per_candidate] {
        assert!(latency.median_us > 0.0 && latency.median_us <= latency.p99_us);
    }
}
