//! The HNSW shard built with hnsw_rs: recall against exact f32 search, size, bad input,
//! and that the bytes open and search in `edge`.

use std::sync::OnceLock;

use control_plane::shard_build::{
    BuildReport, EF_LADDER, ShardBuildError, ShardConfig, bench_shard, build_shard,
    clustered_embeddings, exact_top_k, recall,
};
use edge::shard::{SearchScratch, Shard};

const POINTS: usize = 20_000;
const DIM: usize = 64;
const QUERIES: usize = 200;

struct Built {
    ids: Vec<u64>,
    vectors: Vec<f32>,
    queries: Vec<f32>,
    shard: Shard,
    report: BuildReport,
}

/// One build shared by the tests of this binary (it is the slow part).
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut vectors = clustered_embeddings(POINTS + QUERIES, DIM, 7);
        let queries = vectors.split_off(POINTS * DIM);
        let ids: Vec<u64> = (0..POINTS as u64).map(|i| 5_000_000_000 + i * 13).collect();
        // Calibrated on the catalogue's own vectors by default; these tests give draws
        // that are neither index nor test queries, as a caller with user embeddings would.
        let calibration = clustered_embeddings(100, DIM, 8);
        let (bytes, report) =
            build_shard(&ids, &vectors, DIM, &ShardConfig::default(), &calibration).unwrap();
        let shard = Shard::open(bytes).unwrap();
        Built {
            ids,
            vectors,
            queries,
            shard,
            report,
        }
    })
}

#[test]
fn recall_at_100_reaches_0_95_at_the_default_ef() {
    let b = built();
    assert_eq!(b.shard.search_ef(), b.report.calibration.ef);
    assert!(b.report.calibration.met(), "{}", b.report);
    assert!(!b.report.calibration.from_catalogue);
    let mut scratch = SearchScratch::default();
    let mut total = 0.0;
    for query in b.queries.chunks_exact(DIM) {
        let exact: Vec<u64> = exact_top_k(&b.vectors, DIM, query, 100)
            .into_iter()
            .map(|row| b.ids[row])
            .collect();
        let found: Vec<u64> = b
            .shard
            .nns(100)
            .search_with(query, &mut scratch)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(found.len(), 100);
        total += recall(&found, &exact);
    }
    let mean = total / QUERIES as f64;
    eprintln!(
        "recall@100 at ef {}: {mean:.4}; {}",
        b.shard.search_ef(),
        b.report
    );
    assert!(mean >= 0.95, "recall@100 {mean:.4}; {}", b.report);
}

#[test]
fn a_video_at_dim_64_takes_at_most_150_bytes() {
    let b = built();
    assert_eq!(b.report.points, POINTS);
    assert_eq!(b.report.bytes, b.shard.byte_len());
    // hnsw_rs leaves a few upper-layer edges to points below that layer; they are dropped.
    assert!(b.report.dropped_edges < POINTS / 100, "{}", b.report);
    assert_eq!(b.report.layer_sizes[0], POINTS);
    // 2 * M, plus the edges that make stranded points reachable.
    assert!(
        b.report.max_degree <= 32 + b.report.linked_edges,
        "{}",
        b.report
    );
    assert!(b.report.linked_edges < POINTS / 1000, "{}", b.report);
    assert!(b.report.bytes_per_video() <= 150.0, "{}", b.report);
}

#[test]
fn the_shard_opens_in_edge_and_finds_each_video_by_its_own_vector() {
    let b = built();
    assert_eq!((b.shard.len(), b.shard.dim()), (POINTS, DIM));
    let mut stored: Vec<u64> = b.shard.video_ids().to_vec();
    stored.sort_unstable();
    assert_eq!(stored, b.ids, "every id once (ids are ascending here)");
    let mut scratch = SearchScratch::default();
    let mut missed = Vec::new();
    for row in (0..POINTS).step_by(POINTS / 200) {
        let vector = &b.vectors[row * DIM..][..DIM];
        // Brute force pins the id mapping and the quantization: no near miss allowed.
        let exact = b.shard.exact_search(vector, 2).unwrap();
        assert_eq!(exact[0].0, b.ids[row], "row {row}: {exact:?}");
        assert!((exact[0].1 - 1.0).abs() < 0.02, "own score {}", exact[0].1);
        let hits = b.shard.nns(10).search_with(vector, &mut scratch).unwrap();
        if hits[0].0 != b.ids[row] {
            missed.push(row);
        }
    }
    // The graph search is approximate: about 1 video in 1,000 (outliers, far from their
    // topic) is missed at the default ef, and found with a wider beam.
    assert!(missed.len() <= 4, "missed rows {missed:?}");
    for &row in &missed {
        let vector = &b.vectors[row * DIM..][..DIM];
        let hits = b.shard.nns(10).ef(2000).search(vector).unwrap();
        assert_eq!(hits[0].0, b.ids[row], "row {row} at ef 2000");
    }
}

#[test]
fn identical_embeddings_of_different_videos_build() {
    // Equal unit vectors can have a dot product just above 1; hnsw_rs's DistDot asserts on
    // that inside its worker threads.
    let mut vectors = clustered_embeddings(300, 16, 3);
    let copy = vectors[..16 * 100].to_vec();
    vectors[16 * 200..].copy_from_slice(&copy);
    let ids: Vec<u64> = (0..300).collect();
    let (bytes, report) = build_shard(&ids, &vectors, 16, &ShardConfig::default(), &[]).unwrap();
    assert_eq!(report.points, 300);
    let shard = Shard::open(bytes).unwrap();
    let hits = shard.nns(2).search(&vectors[..16]).unwrap();
    let mut top: Vec<u64> = hits.iter().map(|h| h.0).collect();
    top.sort_unstable();
    assert_eq!(top, [0, 200]);
}

#[test]
fn bad_input_is_refused() {
    let vectors = clustered_embeddings(10, 4, 1);
    let ids: Vec<u64> = (0..10).collect();
    let config = ShardConfig::default();
    let build =
        |ids: &[u64], vectors: &[f32], dim: usize| build_shard(ids, vectors, dim, &config, &[]);

    assert!(matches!(build(&[], &[], 4), Err(ShardBuildError::NoPoints)));
    assert!(matches!(
        build(&ids, &[], 0),
        Err(ShardBuildError::ZeroDimension)
    ));
    assert!(matches!(
        build(&ids, &vectors[..39], 4),
        Err(ShardBuildError::LengthMismatch {
            ids: 10,
            dim: 4,
            values: 39,
            expected: 40
        })
    ));
    let mut nan = vectors.clone();
    nan[4 * 3 + 2] = f32::NAN;
    assert!(matches!(
        build(&ids, &nan, 4),
        Err(ShardBuildError::NonFinite {
            id: 3,
            row: 3,
            column: 2,
            ..
        })
    ));
    let mut infinite = vectors.clone();
    infinite[0] = f32::INFINITY;
    assert!(matches!(
        build(&ids, &infinite, 4),
        Err(ShardBuildError::NonFinite {
            row: 0,
            column: 0,
            ..
        })
    ));
    let mut long = vectors.clone();
    long[4 * 5..4 * 6].iter_mut().for_each(|v| *v *= 2.0);
    assert!(matches!(
        build(&ids, &long, 4),
        Err(ShardBuildError::NotNormalised { row: 5, .. })
    ));
    let zero = vec![0.0; 40];
    assert!(matches!(
        build(&ids, &zero, 4),
        Err(ShardBuildError::NotNormalised { row: 0, .. })
    ));
    let mut duplicate = ids.clone();
    duplicate[7] = 2;
    assert!(matches!(
        build(&duplicate, &vectors, 4),
        Err(ShardBuildError::DuplicateId { id: 2 })
    ));
    for (bad, key) in [
        (
            ShardConfig {
                m: 1,
                ..ShardConfig::default()
            },
            "m",
        ),
        (
            ShardConfig {
                m: 257,
                ..ShardConfig::default()
            },
            "m",
        ),
        (
            ShardConfig {
                ef_construction: 0,
                ..ShardConfig::default()
            },
            "ef_construction",
        ),
        (
            ShardConfig {
                ef_search: Some(0),
                ..ShardConfig::default()
            },
            "ef_search",
        ),
        (
            ShardConfig {
                target_recall: 0.0,
                ..ShardConfig::default()
            },
            "target_recall",
        ),
        (
            ShardConfig {
                target_recall: 1.5,
                ..ShardConfig::default()
            },
            "target_recall",
        ),
    ] {
        let result = build_shard(&ids, &vectors, 4, &bad, &[]);
        assert!(
            matches!(&result, Err(ShardBuildError::Config { key: k, .. }) if *k == key),
            "{bad:?}: {result:?}"
        );
    }
    for queries in [&vectors[..6], &nan[..]] {
        let result = build_shard(&ids, &vectors, 4, &config, queries);
        assert!(
            matches!(result, Err(ShardBuildError::CalibrationQueries(_))),
            "{result:?}"
        );
    }
    let message = build(&ids, &nan, 4).unwrap_err().to_string();
    assert!(
        message.contains("video 3") && message.contains("NaN"),
        "{message}"
    );
}

#[test]
fn a_single_video_builds() {
    let (bytes, report) = build_shard(&[9], &[0.6, 0.8], 2, &ShardConfig::default(), &[]).unwrap();
    assert_eq!(report.layer_sizes, [1]);
    let shard = Shard::open(bytes).unwrap();
    assert_eq!(shard.nns(3).search(&[1.0, 0.0]).unwrap()[0].0, 9);
}

#[test]
fn the_default_ef_is_calibrated_to_the_target_or_configured() {
    let mut vectors = clustered_embeddings(3_000, 16, 5);
    let queries = vectors.split_off(2_900 * 16);
    let ids: Vec<u64> = (0..2_900).collect();
    let with = |config: ShardConfig| build_shard(&ids, &vectors, 16, &config, &queries).unwrap();
    let loose = with(ShardConfig {
        target_recall: 0.5,
        ..ShardConfig::default()
    });
    let strict = with(ShardConfig {
        target_recall: 1.0,
        ..ShardConfig::default()
    });
    assert_eq!(loose.1.calibration.ef, EF_LADDER[0], "{}", loose.1);
    assert!(loose.1.calibration.met());
    assert_eq!(loose.1.calibration.queries, 100);
    // Exact recall needs a wider beam (or the whole ladder); never a narrower one.
    assert!(
        strict.1.calibration.ef > loose.1.calibration.ef,
        "{}",
        strict.1
    );
    assert_eq!(
        Shard::open(strict.0).unwrap().search_ef(),
        strict.1.calibration.ef
    );
    let fixed = with(ShardConfig {
        ef_search: Some(77),
        ..ShardConfig::default()
    });
    assert_eq!(Shard::open(fixed.0).unwrap().search_ef(), 77);
    assert_eq!(fixed.1.calibration.recall, None);
}

#[test]
fn the_bench_report_prints_every_ef() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bench.shard");
    let report = bench_shard(2_000, 16, 20, 1, Some(&file)).unwrap();
    let text = report.to_string();
    for needle in [
        "build:",
        "bytes/video",
        "exact search",
        "recall@100",
        "speedup",
        "dflt",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(report.build.is_some());
    assert!(report.graph.iter().any(|row| row.ef == report.default_ef));
    assert!(report.graph.len() >= 4);
    for row in &report.graph {
        assert!(row.recall > 0.5, "{text}");
        assert!(row.latency.median_us <= row.latency.p99_us);
    }
    // The saved shard is read back, not rebuilt, and measures the same.
    let again = bench_shard(2_000, 16, 20, 1, Some(&file)).unwrap();
    assert!(again.build.is_none());
    assert_eq!(again.bytes, report.bytes);
    assert_eq!(
        again.graph.iter().map(|r| r.recall).collect::<Vec<_>>(),
        report.graph.iter().map(|r| r.recall).collect::<Vec<_>>()
    );
    // A shard of other videos is refused, not measured.
    let other = bench_shard(2_000, 16, 20, 2, Some(&file)).unwrap_err();
    assert!(other.to_string().contains("remove it"), "{other}");
}
