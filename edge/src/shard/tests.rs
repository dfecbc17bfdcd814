use super::writer::{Parts, encode, encode_version, seal};
use super::*;

/// xorshift64*: tests need reproducible data, and `edge` takes no RNG dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Roughly normal: the sum of four uniforms, centred.
    fn normal(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1 << 24) as f32)
            .sum::<f32>()
            - 2.0
    }
}

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Unit vectors around `clusters` random centres.
fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed | 1);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| rng.normal()).collect())
        .collect();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let centre = &centres[rng.below(clusters)];
        let mut v: Vec<f32> = centre.iter().map(|c| c + 0.5 * rng.normal()).collect();
        normalize(&mut v);
        out.extend(v);
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The `degree` best neighbours of each member among the members, by brute force, plus
/// the reverse edges (as HNSW adds them: without them, points that are nobody's nearest
/// neighbour are unreachable) and a ring through the members (the long links HNSW gets
/// from its insertion order: without them, each cluster is an island).
fn knn_lists(vectors: &[f32], dim: usize, members: &[u32], degree: usize) -> LayerLists {
    let row = |p: u32| &vectors[p as usize * dim..][..dim];
    let mut lists: LayerLists = members
        .iter()
        .map(|&p| {
            let mut others: Vec<(f32, u32)> = members
                .iter()
                .filter(|&&q| q != p)
                .map(|&q| (dot(row(p), row(q)), q))
                .collect();
            others.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            (p, others.iter().take(degree).map(|o| o.1).collect())
        })
        .collect();
    let position = |p: u32| members.binary_search(&p).unwrap();
    for i in 0..lists.len() {
        let (p, forward) = lists[i].clone();
        for q in forward {
            lists[position(q)].1.push(p);
        }
        let next = members[(i + 1) % members.len()];
        if next != p {
            lists[i].1.push(next);
            lists[(i + 1) % members.len()].1.push(p);
        }
    }
    for (_, list) in &mut lists {
        list.sort_unstable();
        list.dedup();
    }
    lists
}

/// A three-layer graph: layer 0 the 12-NN graph, then every 8th and every 64th point.
fn brute_force_graph(vectors: &[f32], dim: usize, n: usize) -> ShardGraph {
    let mut layers = Vec::new();
    for (step, degree) in [(1, 12), (8, 6), (64, 4)] {
        let members: Vec<u32> = (0..n as u32).step_by(step).collect();
        if members.len() > 1 || layers.is_empty() {
            layers.push(knn_lists(vectors, dim, &members, degree));
        }
    }
    ShardGraph {
        layers,
        entry_point: 0,
    }
}

fn ids_for(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 1_000_000 + i * 7).collect()
}

struct Fixture {
    ids: Vec<u64>,
    vectors: Vec<f32>,
    dim: usize,
    graph: ShardGraph,
}

fn fixture(n: usize, dim: usize, seed: u64) -> Fixture {
    let vectors = clustered(n, dim, 8, seed);
    let graph = brute_force_graph(&vectors, dim, n);
    Fixture {
        ids: ids_for(n),
        vectors,
        dim,
        graph,
    }
}

fn write(f: &Fixture) -> Vec<u8> {
    ShardWriter::new(f.dim)
        .write(&f.ids, &f.vectors, &f.graph)
        .expect("fixture is valid")
}

fn reseal(bytes: &mut Vec<u8>) {
    bytes.truncate(bytes.len() - TRAILER_LEN);
    seal(bytes);
}

fn invalid_reason(result: Result<Shard, Error>) -> String {
    match result {
        Err(Error::InvalidShard { reason }) => reason,
        other => panic!("expected InvalidShard, got {other:?}"),
    }
}

/// Whatever `open` accepts must also search without panicking.
fn open_and_exercise(bytes: Vec<u8>) -> Result<(), Error> {
    let shard = Shard::open(bytes)?;
    let query = vec![0.5; shard.dim()];
    let hits = shard.nns(5).ef(20).search(&query)?;
    assert!(hits.len() <= 5);
    shard.exact_search(&query, 5)?;
    Ok(())
}

#[test]
fn round_trip_keeps_ids_vectors_and_settings() {
    let f = fixture(300, 12, 1);
    for locality in [false, true] {
        let bytes = ShardWriter::new(f.dim)
            .search_ef(77)
            .locality_order(locality)
            .write(&f.ids, &f.vectors, &f.graph)
            .unwrap();
        let len = bytes.len();
        let shard = Shard::open(bytes).unwrap();
        assert_eq!(
            (shard.len(), shard.dim(), shard.layer_count()),
            (300, 12, 3)
        );
        assert_eq!(shard.byte_len(), len);
        assert_eq!(shard.search_ef(), 77);
        for (position, id) in shard.video_ids().iter().enumerate() {
            let original = ((id - 1_000_000) / 7) as usize;
            let expected = &f.vectors[original * f.dim..][..f.dim];
            let stored = shard.vector(position).unwrap();
            let largest = expected.iter().fold(0.0_f32, |m, v| m.max(v.abs()));
            for (a, b) in stored.iter().zip(expected) {
                assert!((a - b).abs() <= largest / 254.0 + 1e-6, "{a} vs {b}");
            }
            if !locality {
                assert_eq!(
                    original, position,
                    "without locality order, input order is kept"
                );
            }
        }
        assert!(shard.vector(300).is_none());
    }
}

#[test]
fn default_ef_applies_when_the_writer_sets_none() {
    let f = fixture(20, 4, 2);
    let shard = Shard::open(write(&f)).unwrap();
    assert_eq!(shard.search_ef(), DEFAULT_EF);
}

#[test]
fn a_new_default_ef_is_written_in_place_and_reopens() {
    let f = fixture(20, 4, 2);
    let bytes = write(&f);
    let shard = Shard::open(bytes.clone())
        .unwrap()
        .with_search_ef(321)
        .unwrap();
    assert_eq!(shard.search_ef(), 321);
    let changed = shard.into_bytes();
    assert_eq!(changed.len(), bytes.len());
    let reopened = Shard::open(changed).unwrap();
    assert_eq!(reopened.search_ef(), 321);
    assert!(matches!(
        reopened.with_search_ef(0),
        Err(Error::InvalidShardInput { .. })
    ));
}

#[test]
fn own_vector_finds_itself_first() {
    let f = fixture(400, 16, 3);
    let shard = Shard::open(write(&f)).unwrap();
    let mut scratch = SearchScratch::default();
    for (row, id) in f.ids.iter().enumerate() {
        let query = &f.vectors[row * f.dim..][..f.dim];
        let hits = shard
            .nns(3)
            .ef(32)
            .search_with(query, &mut scratch)
            .unwrap();
        assert_eq!(hits[0].0, *id);
        assert_eq!(shard.exact_search(query, 1).unwrap()[0].0, *id);
    }
}

#[test]
fn graph_search_finds_the_exact_neighbours() {
    let (n, dim) = (600, 16);
    let f = fixture(n, dim, 4);
    let shard = Shard::open(write(&f)).unwrap();
    let queries = clustered(50, dim, 8, 99);
    let mut scratch = SearchScratch::default();
    let mut found = 0;
    for query in queries.chunks_exact(dim) {
        let exact = shard.exact_search(query, 10).unwrap();
        assert_eq!(exact.len(), 10);
        assert!(exact.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
        // A beam as wide as the shard visits every reachable point: exact.
        let full = shard
            .nns(10)
            .ef(n)
            .search_with(query, &mut scratch)
            .unwrap();
        assert_eq!(full, exact);
        let narrow = shard
            .nns(10)
            .ef(40)
            .search_with(query, &mut scratch)
            .unwrap();
        found += narrow.iter().filter(|hit| exact.contains(hit)).count();
    }
    let recall = found as f64 / 500.0;
    assert!(recall >= 0.95, "recall@10 at ef 40: {recall}");
}

#[test]
fn scratch_is_reusable_across_searches_and_shards() {
    let small = Shard::open(write(&fixture(50, 8, 5))).unwrap();
    let large = Shard::open(write(&fixture(500, 8, 6))).unwrap();
    let mut scratch = SearchScratch::default();
    let query = clustered(1, 8, 1, 7);
    for shard in [&small, &large, &small, &large] {
        let fresh = shard.nns(7).search(&query).unwrap();
        let reused = shard.nns(7).search_with(&query, &mut scratch).unwrap();
        assert_eq!(fresh, reused);
    }
    // The epoch wraps after 2^32 searches; force it to check the reset.
    scratch.epoch = u32::MAX;
    let after_wrap = large.nns(7).search_with(&query, &mut scratch).unwrap();
    assert_eq!(after_wrap, large.nns(7).search(&query).unwrap());
}

#[test]
fn searches_by_position_name_the_same_hits_as_by_id() {
    let f = fixture(400, 20, 11);
    let shard = Shard::open(write(&f)).unwrap();
    let mut scratch = SearchScratch::default();
    for query in f.vectors.chunks_exact(f.dim).step_by(37) {
        let by_id = shard.nns(10).search(query).unwrap();
        let by_position = shard
            .nns(10)
            .search_positions_with(query, &mut scratch)
            .unwrap();
        let id_at = |position: u32| {
            shard
                .positions_by_id()
                .iter()
                .find(|&&(_, p)| p == position)
                .map(|&(id, _)| id)
                .unwrap()
        };
        let named: Vec<(u64, f32)> = by_position
            .iter()
            .map(|&(position, score)| (id_at(position), score))
            .collect();
        assert_eq!(named, by_id);
    }
}

#[test]
fn a_run_of_approximate_scores_matches_them_one_by_one() {
    // 40 components: two whole 16s and a tail of 8.
    let f = fixture(200, 40, 12);
    let shard = Shard::open(write(&f)).unwrap();
    let query = clustered(1, 40, 1, 13);
    let scorer = shard.approximate_scorer(&query).unwrap();
    for run in [0..200, 17..18, 50..150, 200..200] {
        let one_by_one: Vec<f32> = run.clone().map(|p| scorer.score(p).unwrap()).collect();
        let in_a_run: Vec<f32> = scorer.scores_in(run.clone()).unwrap().collect();
        assert_eq!(in_a_run, one_by_one, "{run:?}");
    }
    assert!(scorer.scores_in(150..201).is_none());
    assert!(scorer.score(200).is_none());
}

#[test]
fn k_zero_and_k_beyond_the_shard() {
    let shard = Shard::open(write(&fixture(30, 4, 8))).unwrap();
    let query = [0.5, 0.5, 0.5, 0.5];
    assert!(shard.nns(0).search(&query).unwrap().is_empty());
    assert!(shard.exact_search(&query, 0).unwrap().is_empty());
    assert_eq!(shard.nns(100).ef(1).search(&query).unwrap().len(), 30);
    assert_eq!(shard.exact_search(&query, 100).unwrap().len(), 30);
    assert_eq!(
        shard
            .nns(usize::MAX)
            .ef(usize::MAX)
            .search(&query)
            .unwrap()
            .len(),
        30
    );
    assert_eq!(shard.exact_search(&query, usize::MAX).unwrap().len(), 30);
}

#[test]
fn a_single_point_shard_works() {
    let graph = ShardGraph {
        layers: vec![vec![(0, vec![])]],
        entry_point: 0,
    };
    let bytes = ShardWriter::new(3)
        .write(&[42], &[0.0, 0.6, 0.8], &graph)
        .unwrap();
    let shard = Shard::open(bytes).unwrap();
    let hits = shard.nns(5).search(&[0.0, 1.0, 0.0]).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].0, 42);
    assert!((hits[0].1 - 0.6).abs() < 0.01);
}

#[test]
fn queries_of_the_wrong_dimension_or_not_finite_are_refused() {
    let shard = Shard::open(write(&fixture(30, 4, 9))).unwrap();
    for query in [&[0.1_f32; 3][..], &[0.1; 5], &[]] {
        for result in [shard.nns(3).search(query), shard.exact_search(query, 3)] {
            match result {
                Err(Error::DimensionMismatch { expected, found }) => {
                    assert_eq!((expected, found), (4, query.len()));
                }
                other => panic!("expected DimensionMismatch, got {other:?}"),
            }
        }
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let query = [0.1, 0.2, bad, 0.3];
        assert!(matches!(
            shard.nns(3).search(&query),
            Err(Error::NonFiniteQuery { index: 2 })
        ));
        assert!(matches!(
            shard.exact_search(&query, 3),
            Err(Error::NonFiniteQuery { index: 2 })
        ));
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = write(&fixture(40, 4, 10));
    for len in 0..bytes.len() {
        let result = Shard::open(bytes[..len].to_vec());
        assert!(
            result.is_err(),
            "truncated to {len} of {} bytes",
            bytes.len()
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Shard::open(longer).is_err());
}

#[test]
fn every_flipped_byte_is_an_error() {
    let bytes = write(&fixture(40, 4, 11));
    for at in 0..bytes.len() {
        for mask in [0x01, 0x80, 0xff] {
            let mut corrupted = bytes.clone();
            corrupted[at] ^= mask;
            assert!(Shard::open(corrupted).is_err(), "byte {at} ^ {mask:#x}");
        }
    }
}

/// `open_verified` trusts the checksum to its caller and nothing else.
#[test]
fn open_verified_skips_the_checksum_only() {
    let bytes = write(&fixture(40, 4, 15));
    let mut stale_trailer = bytes.clone();
    let last = stale_trailer.len() - 1;
    stale_trailer[last] ^= 0xff;
    assert!(invalid_reason(Shard::open(stale_trailer.clone())).contains("checksum"));
    let trusted = Shard::open_verified(stale_trailer.into()).unwrap();
    let checked = Shard::open(bytes.clone()).unwrap();
    let query = [0.5, -0.25, 0.1, 0.8];
    assert_eq!(
        trusted.nns(5).search(&query).unwrap(),
        checked.nns(5).search(&query).unwrap()
    );

    let mut no_dimension = bytes;
    no_dimension[12..16].copy_from_slice(&0_u32.to_le_bytes());
    assert!(invalid_reason(Shard::open_verified(no_dimension.into())).contains("dimension"));
}

#[test]
fn wrong_magic_and_version_are_named() {
    let bytes = write(&fixture(10, 4, 12));
    let mut wrong_magic = bytes.clone();
    wrong_magic[0] = b'X';
    assert!(invalid_reason(Shard::open(wrong_magic)).contains("magic"));
    let mut wrong_version = bytes;
    wrong_version[8..12].copy_from_slice(&3_u32.to_le_bytes());
    reseal(&mut wrong_version);
    assert!(matches!(
        Shard::open(wrong_version),
        Err(Error::FormatVersion {
            artifact: "shard",
            found: 3,
            expected: 2
        })
    ));
}

/// Header corruptions with a valid checksum: only the structural checks stand between
/// them and a panic or a huge allocation.
#[test]
fn resealed_header_corruptions_are_errors() {
    let bytes = write(&fixture(40, 4, 13));
    let patch = |at: usize, value: &[u8]| {
        let mut patched = bytes.clone();
        patched[at..at + value.len()].copy_from_slice(value);
        reseal(&mut patched);
        Shard::open(patched)
    };
    let cases: Vec<(&str, usize, Vec<u8>, &str)> = vec![
        ("dim 0", 12, 0_u32.to_le_bytes().to_vec(), "dimension"),
        (
            "dim huge",
            12,
            u32::MAX.to_le_bytes().to_vec(),
            "vector section",
        ),
        ("dim off by one", 12, 5_u32.to_le_bytes().to_vec(), ""),
        ("count 0", 16, 0_u32.to_le_bytes().to_vec(), "point count"),
        (
            "count huge",
            16,
            u32::MAX.to_le_bytes().to_vec(),
            "point count",
        ),
        (
            "count 2^31 - 1",
            16,
            (i32::MAX as u32).to_le_bytes().to_vec(),
            "section",
        ),
        ("count + 1", 16, 41_u32.to_le_bytes().to_vec(), ""),
        ("count - 1", 16, 39_u32.to_le_bytes().to_vec(), ""),
        ("no layers", 20, 0_u32.to_le_bytes().to_vec(), "layer count"),
        (
            "many layers",
            20,
            1000_u32.to_le_bytes().to_vec(),
            "layer count",
        ),
        ("one more layer", 20, 3_u32.to_le_bytes().to_vec(), ""),
        (
            "entry past the end",
            24,
            40_u32.to_le_bytes().to_vec(),
            "entry point",
        ),
        (
            "entry u32::MAX",
            24,
            u32::MAX.to_le_bytes().to_vec(),
            "entry point",
        ),
        (
            "ids offset huge",
            32,
            u64::MAX.to_le_bytes().to_vec(),
            "id section",
        ),
        (
            "ids offset in header",
            32,
            8_u64.to_le_bytes().to_vec(),
            "overlaps",
        ),
        (
            "scales offset huge",
            40,
            (u64::MAX - 3).to_le_bytes().to_vec(),
            "scale section",
        ),
        (
            "vectors offset 0",
            48,
            0_u64.to_le_bytes().to_vec(),
            "overlaps",
        ),
        (
            "table offset past end",
            56,
            1_000_000_u64.to_le_bytes().to_vec(),
            "layer table",
        ),
        (
            "id order offset huge",
            64,
            u64::MAX.to_le_bytes().to_vec(),
            "id-order section",
        ),
        (
            "list offsets offset in the vectors",
            72,
            300_u64.to_le_bytes().to_vec(),
            "overlaps",
        ),
    ];
    for (name, at, value, needle) in cases {
        let reason = invalid_reason(patch(at, &value));
        assert!(reason.contains(needle), "{name}: {reason}");
    }
}

/// Layer-table corruptions with a valid checksum.
#[test]
fn resealed_layer_table_corruptions_are_errors() {
    let f = fixture(200, 4, 14);
    let bytes = write(&f);
    let table = u64_at(&bytes, 56).unwrap() as usize;
    let layers = u32_at(&bytes, 20).unwrap() as usize;
    assert_eq!(layers, 3);
    for layer in 0..layers {
        let entry = table + layer * LAYER_ENTRY_LEN;
        let members = u32_at(&bytes, entry).unwrap();
        let offset = u64_at(&bytes, entry + 4).unwrap();
        let len = u64_at(&bytes, entry + 12).unwrap();
        let patches: Vec<(usize, Vec<u8>)> = vec![
            (entry, (members + 1).to_le_bytes().to_vec()),
            (entry, (members - 1).to_le_bytes().to_vec()),
            (entry, u32::MAX.to_le_bytes().to_vec()),
            (entry, 0_u32.to_le_bytes().to_vec()),
            (entry + 4, (offset + 1).to_le_bytes().to_vec()),
            (entry + 4, (offset - 1).to_le_bytes().to_vec()),
            (entry + 4, u64::MAX.to_le_bytes().to_vec()),
            (entry + 12, (len + 1).to_le_bytes().to_vec()),
            (entry + 12, (len - 1).to_le_bytes().to_vec()),
            (entry + 12, u64::MAX.to_le_bytes().to_vec()),
        ];
        for (at, value) in patches {
            let mut patched = bytes.clone();
            patched[at..at + value.len()].copy_from_slice(&value);
            reseal(&mut patched);
            assert!(Shard::open(patched).is_err(), "layer {layer}, byte {at}");
        }
    }
}

/// Random damage anywhere, resealed: `open` may accept it (a changed vector byte is still
/// a shard) but must never panic, and what it accepts must search without panicking.
#[test]
fn resealed_random_damage_never_panics() {
    let bytes = write(&fixture(120, 8, 15));
    let mut rng = Rng(0x5eed);
    let body = bytes.len() - TRAILER_LEN;
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(2) == 0 {
                rng.below(HEADER_LEN)
            } else {
                rng.below(body)
            };
            damaged[at] = rng.next_u64() as u8;
        }
        reseal(&mut damaged);
        if open_and_exercise(damaged).is_ok() {
            accepted += 1;
        }
    }
    assert!(accepted < 3000, "some damage must be detected");
}

/// What `open_verified` does not check (the layer-0 lists, the checksum) can hold any
/// bytes: searches on what it accepts must still not panic.
#[test]
fn damaged_lists_under_open_verified_never_panic() {
    let bytes = write(&fixture(120, 8, 16));
    let list_offsets = u64_at(&bytes, 72).unwrap() as usize;
    let table = u64_at(&bytes, 56).unwrap() as usize;
    let base_start = u64_at(&bytes, table + 4).unwrap() as usize;
    let base_len = u64_at(&bytes, table + 12).unwrap() as usize;
    let mut rng = Rng(0xda7a);
    let mut refused_by_open = 0;
    for _ in 0..2000 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + rng.below(8) {
            damaged[base_start + rng.below(base_len)] = rng.next_u64() as u8;
        }
        reseal(&mut damaged);
        if Shard::open(damaged.clone()).is_err() {
            refused_by_open += 1;
        }
        let shard = Shard::open_verified(damaged.into()).expect("offsets and header intact");
        for query in [vec![0.5; 8], vec![-1.0; 8]] {
            let hits = shard.nns(10).ef(40).search(&query).unwrap();
            assert!(hits.len() <= 10);
        }
    }
    assert!(
        refused_by_open > 1000,
        "open walks the lists: {refused_by_open}"
    );

    let point = 7;
    let offsets_of = |bytes: &[u8], at: usize| u32_at(bytes, list_offsets + 4 * at).unwrap();
    let mut unordered = bytes.clone();
    let next = offsets_of(&bytes, point + 1);
    unordered[list_offsets + 4 * point..][..4].copy_from_slice(&(next + 1).to_le_bytes());
    assert!(invalid_reason(Shard::open_verified(unordered.into())).contains("ascend"));
    let mut short = bytes.clone();
    let end = list_offsets + 4 * 120;
    short[end..end + 4].copy_from_slice(&(offsets_of(&bytes, 120) - 1).to_le_bytes());
    assert!(invalid_reason(Shard::open_verified(short.into())).contains("layer-0 length"));
}

/// The stored id order is checked in full by both openings.
#[test]
fn a_wrong_id_order_is_an_error() {
    let bytes = write(&fixture(50, 4, 17));
    let order = u64_at(&bytes, 64).unwrap() as usize;
    let entry = |bytes: &[u8], rank: usize| u32_at(bytes, order + 4 * rank).unwrap();
    let mut swapped = bytes.clone();
    let (first, second) = (entry(&bytes, 3), entry(&bytes, 4));
    swapped[order + 12..order + 16].copy_from_slice(&second.to_le_bytes());
    swapped[order + 16..order + 20].copy_from_slice(&first.to_le_bytes());
    assert!(invalid_reason(Shard::open_verified(swapped.into())).contains("below the one before"));
    let mut repeated = bytes.clone();
    repeated[order + 16..order + 20].copy_from_slice(&first.to_le_bytes());
    assert!(invalid_reason(Shard::open_verified(repeated.into())).contains("appears twice"));
    let mut past_end = bytes;
    past_end[order..order + 4].copy_from_slice(&50_u32.to_le_bytes());
    reseal(&mut past_end);
    assert!(invalid_reason(Shard::open(past_end)).contains("past the 50 points"));
}

/// Version 1 (no stored id order or list offsets) still opens, searches the same, and is
/// upgraded to the current bytes by `into_current_bytes`.
#[test]
fn version_1_shards_open_and_upgrade() {
    let parts = parts();
    let old = encode_version(&parts, 1);
    let current = encode(&parts);
    assert!(old.len() < current.len());
    let old_shard = Shard::open(old.clone()).unwrap();
    assert_eq!(old_shard.format_version(), 1);
    let verified = Shard::open_verified(old.into()).unwrap();
    let new_shard = Shard::open(current.clone()).unwrap();
    assert_eq!(old_shard.positions_by_id(), new_shard.positions_by_id());
    for query in [[1.0, 0.0], [-0.3, 0.7]] {
        let expected = new_shard.nns(6).ef(12).search(&query).unwrap();
        assert_eq!(old_shard.nns(6).ef(12).search(&query).unwrap(), expected);
        assert_eq!(verified.nns(6).ef(12).search(&query).unwrap(), expected);
    }
    assert_eq!(old_shard.into_current_bytes(), current);
    assert_eq!(
        new_shard.into_current_bytes(),
        current,
        "already current: unchanged"
    );

    let f = fixture(200, 6, 18);
    let shard = Shard::open(write(&f)).unwrap();
    assert_eq!(shard.format_version(), SHARD_FORMAT_VERSION);
}

/// Sound parts for one small graph, to break one thing at a time.
fn parts() -> Parts {
    let n = 12_u32;
    let ring = |p: u32| vec![(p + 1) % n, (p + n - 1) % n];
    let mut base: LayerLists = (0..n).map(|p| (p, ring(p))).collect();
    base.iter_mut().for_each(|(_, list)| list.sort_unstable());
    Parts {
        dim: 2,
        ids: (0..u64::from(n)).map(|i| i + 100).collect(),
        scales: vec![0.01; n as usize],
        quantized: (0..n * 2).map(|i| i as u8).collect(),
        layers: vec![
            base,
            vec![(0, vec![4, 8]), (4, vec![0, 8]), (8, vec![0, 4])],
            vec![(0, vec![8]), (8, vec![0])],
        ],
        entry_point: 8,
        search_ef: 0,
    }
}

#[test]
fn sound_parts_open() {
    let shard = Shard::open(encode(&parts())).unwrap();
    assert_eq!(shard.layer_count(), 3);
    let hits = shard.nns(12).ef(12).search(&[1.0, 0.0]).unwrap();
    assert_eq!(hits.len(), 12, "the ring reaches every point");
}

#[test]
fn structural_faults_are_errors() {
    type Fault = (&'static str, fn(&mut Parts), &'static str);
    let faults: Vec<Fault> = vec![
        (
            "layer-0 neighbour out of range",
            |p| p.layers[0][3].1 = vec![2, 12],
            "not below the point count",
        ),
        (
            "layer-0 neighbour far out of range",
            |p| p.layers[0][3].1 = vec![2, u32::MAX / 2],
            "not below the point count",
        ),
        (
            "layer-0 negative first neighbour",
            |p| p.layers[0][3].1 = vec![u32::MAX - 5],
            "not below the point count",
        ),
        ("self-loop", |p| p.layers[0][3].1 = vec![3, 4], "itself"),
        (
            "upper neighbour out of range",
            |p| p.layers[1][1].1 = vec![0, 20],
            "not below the point count",
        ),
        (
            "upper neighbour not a member",
            |p| p.layers[1][1].1 = vec![0, 5],
            "not a member of the layer",
        ),
        (
            "upper member out of range",
            |p| p.layers[1][2].0 = 30,
            "member 30",
        ),
        (
            "layers not nested",
            |p| {
                p.layers[2] = vec![(0, vec![5]), (5, vec![0])];
                p.entry_point = 0;
            },
            "member 5 is missing from layer 1",
        ),
        (
            "entry point out of range",
            |p| p.entry_point = 12,
            "entry point",
        ),
        ("entry point not on top", |p| p.entry_point = 4, "top layer"),
        ("duplicate video ids", |p| p.ids[5] = p.ids[6], "twice"),
        ("NaN scale", |p| p.scales[2] = f32::NAN, "scale"),
        ("negative scale", |p| p.scales[2] = -1.0, "scale"),
        (
            "layer 0 missing a point",
            |p| {
                p.layers[0].pop();
            },
            "layer 0",
        ),
        ("empty upper layer", |p| p.layers[2].clear(), "layer 2"),
        (
            "degree larger than the points",
            |p| p.layers[0][0].1 = (1..12).chain([11]).collect(),
            "",
        ),
    ];
    for (name, fault, needle) in faults {
        let mut broken = parts();
        fault(&mut broken);
        let reason = invalid_reason(Shard::open(encode(&broken)));
        assert!(reason.contains(needle), "{name}: {reason}");
    }
}

#[test]
fn trailing_bytes_in_a_layer_are_errors() {
    let mut bytes = encode(&parts());
    bytes.truncate(bytes.len() - TRAILER_LEN);
    // Lengthen the last layer by one byte that no list explains.
    let table = u64_at(&bytes, 56).unwrap() as usize;
    let last = table + 2 * LAYER_ENTRY_LEN + 12;
    let len = u64_at(&bytes, last).unwrap();
    bytes[last..last + 8].copy_from_slice(&(len + 1).to_le_bytes());
    bytes.push(0);
    seal(&mut bytes);
    assert!(invalid_reason(Shard::open(bytes)).contains("after its last list"));
}

#[test]
fn the_writer_refuses_bad_input() {
    let f = fixture(20, 4, 16);
    let ok = |ids: &[u64], vectors: &[f32], dim: usize, graph: &ShardGraph| {
        ShardWriter::new(dim).write(ids, vectors, graph)
    };
    let mut graphs: Vec<(&str, ShardGraph)> = Vec::new();
    let mut g = f.graph.clone();
    g.layers[0][3].1.push(20);
    graphs.push(("neighbour out of range", g));
    let mut g = f.graph.clone();
    g.layers[1][0].1.push(3);
    graphs.push(("upper neighbour not a member", g));
    let mut g = f.graph.clone();
    g.layers[0].pop();
    graphs.push(("layer 0 missing a point", g));
    let mut g = f.graph.clone();
    g.layers[0].push((0, vec![]));
    graphs.push(("point listed twice", g));
    let mut g = f.graph.clone();
    g.layers[1].push((3, vec![]));
    g.layers[0].retain(|(p, _)| *p != 3);
    graphs.push(("not nested", g));
    let mut g = f.graph.clone();
    g.entry_point = 3;
    graphs.push(("entry point not on top", g));
    let mut g = f.graph.clone();
    g.entry_point = 99;
    graphs.push(("entry point out of range", g));
    let mut g = f.graph.clone();
    g.layers.push(vec![]);
    graphs.push(("empty layer", g));
    graphs.push(("no layers", ShardGraph::default()));
    for (name, graph) in &graphs {
        let result = ok(&f.ids, &f.vectors, f.dim, graph);
        assert!(
            matches!(result, Err(Error::InvalidShardInput { .. })),
            "{name}: {result:?}"
        );
    }

    let mut duplicate = f.ids.clone();
    duplicate[4] = duplicate[9];
    let mut nan = f.vectors.clone();
    nan[17] = f32::NAN;
    let inputs: Vec<(&str, Result<Vec<u8>, Error>)> = vec![
        ("no points", ok(&[], &[], 4, &f.graph)),
        ("dim 0", ok(&f.ids, &[], 0, &f.graph)),
        ("short vectors", ok(&f.ids, &f.vectors[1..], 4, &f.graph)),
        ("duplicate ids", ok(&duplicate, &f.vectors, 4, &f.graph)),
        ("NaN", ok(&f.ids, &nan, 4, &f.graph)),
    ];
    for (name, result) in inputs {
        assert!(
            matches!(result, Err(Error::InvalidShardInput { .. })),
            "{name}: {result:?}"
        );
    }
}

#[test]
fn the_writer_drops_self_loops_and_duplicate_neighbours() {
    let mut f = fixture(30, 4, 17);
    let clean = Shard::open(write(&f)).unwrap();
    for (point, list) in &mut f.graph.layers[0] {
        let copy = list.clone();
        list.extend(copy);
        list.push(*point);
    }
    let messy = Shard::open(write(&f)).unwrap();
    assert_eq!(clean.byte_len(), messy.byte_len());
}

#[test]
fn locality_order_is_a_permutation_that_shrinks_the_graph() {
    // Points on a circle, each linked to its 16 nearest along it: a graph whose ideal
    // order is known and cheap to build at a size where input-order gaps need 2 bytes.
    let (n, dim) = (20_000, 4);
    let mut rng = Rng(18);
    let angles: Vec<f32> = (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1 << 24) as f32 * std::f32::consts::TAU)
        .collect();
    let vectors: Vec<f32> = angles
        .iter()
        .flat_map(|a| [a.cos(), a.sin(), 0.0, 0.0])
        .collect();
    let order = writer_locality_order(&vectors, dim, n);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());

    let mut by_angle: Vec<u32> = (0..n as u32).collect();
    by_angle.sort_by(|&a, &b| angles[a as usize].total_cmp(&angles[b as usize]));
    let mut lists = vec![Vec::new(); n];
    for (i, &p) in by_angle.iter().enumerate() {
        for step in 1..=8 {
            lists[p as usize].push(by_angle[(i + step) % n]);
            lists[p as usize].push(by_angle[(i + n - step) % n]);
        }
    }
    let graph = ShardGraph {
        layers: vec![
            lists
                .into_iter()
                .enumerate()
                .map(|(p, l)| (p as u32, l))
                .collect(),
        ],
        entry_point: 0,
    };
    let ids = ids_for(n);
    let graph_bytes = |bytes: &[u8]| {
        let table = u64_at(bytes, 56).unwrap() as usize;
        u64_at(bytes, table + 12).unwrap()
    };
    let plain = ShardWriter::new(dim)
        .locality_order(false)
        .write(&ids, &vectors, &graph)
        .unwrap();
    let local = ShardWriter::new(dim).write(&ids, &vectors, &graph).unwrap();
    let (plain, local) = (graph_bytes(&plain), graph_bytes(&local));
    assert!(
        local * 10 < plain * 7,
        "layer 0 takes {local} bytes in locality order, {plain} in input order"
    );
}

#[test]
fn grouped_points_sit_in_one_run_per_group_and_search_the_same() {
    let (n, dim) = (600, 16);
    let f = fixture(n, dim, 6);
    // Labels unrelated to the vectors, so locality alone would interleave the groups.
    let groups: Vec<u32> = (0..n as u32).map(|p| (p * 7919 + 3) % 5).collect();
    let bytes = ShardWriter::new(dim)
        .groups(groups.clone())
        .write(&f.ids, &f.vectors, &f.graph)
        .unwrap();
    let grouped = Shard::open(bytes).unwrap();
    let label_of = |id: u64| groups[((id - 1_000_000) / 7) as usize];
    let labels: Vec<u32> = grouped.video_ids().iter().map(|&id| label_of(id)).collect();
    assert!(
        labels.windows(2).all(|w| w[0] <= w[1]),
        "positions are grouped by ascending label"
    );
    let plain = Shard::open(write(&f)).unwrap();
    let mut scratch = SearchScratch::default();
    for query in clustered(20, dim, 8, 98).chunks_exact(dim) {
        assert_eq!(
            grouped
                .nns(10)
                .ef(n)
                .search_with(query, &mut scratch)
                .unwrap(),
            plain
                .nns(10)
                .ef(n)
                .search_with(query, &mut scratch)
                .unwrap()
        );
    }

    let short = ShardWriter::new(dim)
        .groups(vec![0; n - 1])
        .write(&f.ids, &f.vectors, &f.graph);
    assert!(
        matches!(&short, Err(Error::InvalidShardInput { reason }) if reason.contains("599 group labels for 600 points")),
        "{short:?}"
    );
}

fn writer_locality_order(vectors: &[f32], dim: usize, n: usize) -> Vec<u32> {
    // The ordering is private to the writer; recover it from a written shard's ids.
    let graph = ShardGraph {
        layers: vec![(0..n as u32).map(|p| (p, vec![])).collect()],
        entry_point: 0,
    };
    let bytes = ShardWriter::new(dim)
        .write(&ids_for(n), vectors, &graph)
        .unwrap();
    let shard = Shard::open(bytes).unwrap();
    shard
        .video_ids()
        .iter()
        .map(|id| ((id - 1_000_000) / 7) as u32)
        .collect()
}

#[test]
fn varints_round_trip_and_refuse_overlong_values() {
    for value in [0, 1, 127, 128, 300, 16_383, 16_384, u32::MAX / 2, u32::MAX] {
        let mut bytes = Vec::new();
        put_varint(&mut bytes, value);
        let mut pos = 0;
        assert_eq!(read_varint(&bytes, &mut pos), Some(value));
        assert_eq!(pos, bytes.len());
    }
    let mut pos = 0;
    assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0x1f], &mut pos), None);
    let mut pos = 0;
    assert_eq!(
        read_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00], &mut pos),
        None
    );
    let mut pos = 0;
    assert_eq!(read_varint(&[0x80], &mut pos), None);
    for value in [0, 1, -1, i32::MAX, i32::MIN, 12345, -12345] {
        assert_eq!(unzigzag(zigzag(value)), value);
    }
}

#[test]
fn dot_matches_a_plain_sum_at_every_length() {
    let mut rng = Rng(19);
    for len in 0..40 {
        let query: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
        let vector: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let plain: f32 = query
            .iter()
            .zip(&vector)
            .map(|(q, &v)| q * f32::from(v as i8))
            .sum();
        assert!((dot_i8(&query, &vector) - plain).abs() <= 1e-3 * (1.0 + plain.abs()));
    }
}

#[test]
fn the_int8_dot_product_is_exact_at_the_extremes_and_in_the_tail() {
    let mut rng = Rng(23);
    for len in [0, 1, 15, 16, 17, 64, 100] {
        let mut a: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let reference = |a: &[u8], b: &[u8]| -> i32 {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| i32::from(x as i8) * i32::from(y as i8))
                .sum()
        };
        assert_eq!(
            WidenedI8::new(a.clone()).dot(&b),
            reference(&a, &b),
            "length {len}"
        );
        // -128 * -128 in every lane: the largest pair sums `pmaddwd` adds.
        a.fill(0x80);
        assert_eq!(
            WidenedI8::new(a.clone()).dot(&a),
            16_384 * len,
            "length {len}"
        );
    }
}
