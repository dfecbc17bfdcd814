//! The compact HNSW shard: video embeddings and their navigation graph, read-only.
//!
//! The control plane builds the graph (hnsw_rs does not build for wasm) and writes it with
//! [`ShardWriter`]; the serving path opens the bytes with [`Shard::open`] (or, for a
//! bundle's section whose hash the bundle just checked, [`Shard::open_verified`]), which
//! checks everything once, and then searches with a hot loop that cannot fail:
//!
//! ```
//! # use edge::shard::{Shard, ShardGraph, ShardWriter};
//! # let ids = [7_u64, 8];
//! # let vectors = [1.0_f32, 0.0, 0.0, 1.0];
//! # let graph = ShardGraph {
//! #     layers: vec![vec![(0, vec![1]), (1, vec![0])]],
//! #     entry_point: 0,
//! # };
//! let bytes = ShardWriter::new(2).write(&ids, &vectors, &graph)?;
//! let shard = Shard::open(bytes)?;
//! let hits = shard.nns(1).ef(16).search(&[0.9, 0.1])?;
//! assert_eq!(hits[0].0, 7);
//! # Ok::<(), edge::Error>(())
//! ```
//!
//! # Format (version 2, little-endian)
//!
//! | bytes | content |
//! | --- | --- |
//! | 0..8 | magic `EDGESHRD` |
//! | 8..12 | format version, u32 |
//! | 12..16 | `dim`, u32 |
//! | 16..20 | `n`, the point count, u32 (at most 2^31 - 1) |
//! | 20..24 | `L`, the layer count, u32 (at least 1) |
//! | 24..28 | entry point, u32 (a point of layer `L - 1`) |
//! | 28..32 | default `ef` for searches, u32 (0: [`DEFAULT_EF`]) |
//! | 32..40, 40..48, 48..56, 56..64 | offsets of the id, scale, vector and layer-table sections, u64 |
//! | 64..72, 72..80 | offsets of the id-order and list-offset sections, u64 |
//! | ids | `n` video ids, u64 |
//! | scales | `n` quantization scales, f32 (finite, >= 0) |
//! | vectors | `n * dim` components, i8: a vector is `scale * v` |
//! | id order | `n` positions, u32, in ascending order of their video ids |
//! | list offsets | `n + 1` u32: point `i`'s layer-0 list is bytes `o[i]..o[i + 1]` of the layer-0 blob |
//! | layer table | `L` entries of 20 bytes: member count u32, blob offset u64, blob length u64 |
//! | layer blobs | one per layer, see below |
//! | last 8 bytes | xxh3-64 of everything before them |
//!
//! Sections follow each other in this order and lie between the header and the checksum.
//! Version 1 is the same without the id-order and list-offset sections (a 64-byte header);
//! it is still read, by working both out at load.
//!
//! The two derived sections are what a cold start would otherwise spend most of its time
//! on: sorting 100,000 ids and walking every layer-0 list to find where each starts (in
//! wasm, 19% and 24% of a 100,000-video bundle's load). Reading them instead costs one
//! linear pass each.
//!
//! A neighbour list is the degree, then the neighbours in ascending order: the first as the
//! zigzag-encoded difference from the list's own point, each next one as the gap from the
//! previous minus one, all as LEB128 varints. The writer orders points so that near vectors
//! get near positions ([`ShardWriter::locality_order`]), which makes most of these numbers
//! fit in one byte. Layer 0 is the `n` lists in point order. An upper layer lists its members
//! in ascending order, each as a varint gap from the previous member (minus one; the first
//! as its position) followed by its list; members of layer `l + 1` are members of layer `l`,
//! and upper-layer neighbours are members of their layer.
//!
//! A query of f32 scores `scale_i * sum_j q_j * v_ij` (inner product): larger is closer.
//!
//! Size at dim 64 and M 16 (hnsw_rs graphs of clustered embeddings, measured with
//! `control-plane`'s `shard_build`): 119 bytes per video at 20,000 videos, 130 at 100,000,
//! everything included: 8 id, 4 scale, 64 vector, 8 of id order and list offset, and
//! 35-46 of graph for a mean layer-0 degree of 24-26 (a plain u32 CSR would take about
//! 110).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::ops::Range;

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64;

use crate::Error;

mod writer;

pub use writer::{LayerLists, ShardGraph, ShardWriter};

/// The first eight bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"EDGESHRD";
/// The format version this build writes and reads.
pub const SHARD_FORMAT_VERSION: u32 = 2;
/// The beam width used when neither the shard nor the query names one.
pub const DEFAULT_EF: usize = 128;
/// Offset of the default beam width in the header.
const SEARCH_EF_AT: usize = 28;
/// The largest point count: list heads are stored as an i32 difference between two points.
pub const MAX_POINTS: usize = i32::MAX as usize;

const HEADER_LEN: usize = 80;
const V1_HEADER_LEN: usize = 64;
const LAYER_ENTRY_LEN: usize = 20;
const TRAILER_LEN: usize = 8;
/// Far more than any real graph (hnsw_rs stops at 16); bounds the layer table before it is read.
const MAX_LAYERS: usize = 64;

/// An open shard: validated, immutable, searchable from many threads at once.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Shared, not owned: `Recommender::from_shared_bundle` opens the shard inside the
    /// bundle's buffer instead of copying its megabytes at every cold start.
    bytes: Bytes,
    dim: usize,
    ids: Vec<u64>,
    /// `(video id, position)`, sorted by id: what the duplicate check sorts anyway, kept
    /// for [`Shard::positions_by_id`].
    by_id: Vec<(u64, u32)>,
    scales: Vec<f32>,
    vectors: Range<usize>,
    /// Layer 0 stays varint-encoded in `bytes`; `base_offsets[i]..base_offsets[i + 1]` is
    /// point `i`'s list, relative to `base`.
    base: Range<usize>,
    base_offsets: Vec<u32>,
    /// Layers 1.. decoded (they hold a few percent of the points).
    upper: Vec<UpperLayer>,
    entry_point: u32,
    search_ef: usize,
}

#[derive(Debug, Clone)]
struct UpperLayer {
    /// Sorted ascending, so a point's list is found by binary search.
    members: Vec<u32>,
    offsets: Vec<u32>,
    neighbours: Vec<u32>,
}

impl UpperLayer {
    fn neighbours_of(&self, point: u32) -> &[u32] {
        // Validation guarantees `point` is a member during a descent; an empty list is the
        // harmless answer if it ever were not.
        let Ok(position) = self.members.binary_search(&point) else {
            return &[];
        };
        let start = self.offsets[position] as usize;
        let end = self.offsets[position + 1] as usize;
        &self.neighbours[start..end]
    }
}

impl Shard {
    /// Checks `bytes` completely (magic, version, checksum, every size, offset, neighbour
    /// id, the id order and the entry point) and keeps them for searching.
    pub fn open(bytes: impl Into<Bytes>) -> Result<Self, Error> {
        Self::open_with(bytes.into(), Checks::Full)
    }

    /// [`Shard::open`] for bytes whose integrity the caller has just checked (a bundle's
    /// section, under the bundle's own hash, and `bundle build` opened it with
    /// [`Shard::open`] before hashing it). It skips what only damage to checked bytes could
    /// fail: the checksum and, in version 2, the walk of every layer-0 list against its
    /// stored offset (the cold start's largest cost). The header, every section's bounds,
    /// the id order, the list offsets and the upper layers are still checked, so
    /// malformed bytes are still refused, and the search skips any neighbour past the end,
    /// so even bytes built to pass these checks cannot make it panic. The trailer is not
    /// read, so [`Shard::into_bytes`] returns it as given.
    pub fn open_verified(bytes: Bytes) -> Result<Self, Error> {
        Self::open_with(bytes, Checks::IntegrityTrusted)
    }

    fn open_with(bytes: Bytes, checks: Checks) -> Result<Self, Error> {
        let parsed = Parsed::new(&bytes, checks)?;
        Ok(Self {
            bytes,
            dim: parsed.dim,
            ids: parsed.ids,
            by_id: parsed.by_id,
            scales: parsed.scales,
            vectors: parsed.vectors,
            base: parsed.base,
            base_offsets: parsed.base_offsets,
            upper: parsed.upper,
            entry_point: parsed.entry_point,
            search_ef: parsed.search_ef,
        })
    }

    /// The number of videos.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the shard holds no video (never true for an opened shard).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The dimension of the vectors and of queries.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of graph layers, at least 1.
    pub fn layer_count(&self) -> usize {
        self.upper.len() + 1
    }

    /// The video ids, in storage order.
    pub fn video_ids(&self) -> &[u64] {
        &self.ids
    }

    /// `(video id, storage position)` of every video, in ascending id order.
    pub fn positions_by_id(&self) -> &[(u64, u32)] {
        &self.by_id
    }

    /// The size of the shard's bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The beam width searches use unless the query sets one: the writer's choice, else
    /// [`DEFAULT_EF`].
    pub fn search_ef(&self) -> usize {
        self.search_ef
    }

    /// The same shard with another default beam width, written into its header (and the
    /// checksum resealed), so that a width chosen by measuring the shard costs no rewrite.
    /// Fails only for a width of 0 or above `u32::MAX`.
    pub fn with_search_ef(mut self, ef: usize) -> Result<Self, Error> {
        let stored = u32::try_from(ef).ok().filter(|&ef| ef > 0).ok_or_else(|| {
            Error::InvalidShardInput {
                reason: format!("search ef must be in 1..=u32::MAX, got {ef}"),
            }
        })?;
        let mut bytes = Vec::from(std::mem::take(&mut self.bytes));
        bytes[SEARCH_EF_AT..SEARCH_EF_AT + 4].copy_from_slice(&stored.to_le_bytes());
        let body = bytes.len() - 8;
        let checksum = xxh3_64(&bytes[..body]);
        bytes[body..].copy_from_slice(&checksum.to_le_bytes());
        self.bytes = bytes.into();
        self.search_ef = ef;
        Ok(self)
    }

    /// The shard's bytes, as `Shard::open` accepts them.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into()
    }

    /// The format version of the bytes this shard was opened from.
    pub fn format_version(&self) -> u32 {
        u32_at(&self.bytes, 8).unwrap_or_default()
    }

    /// The shard's bytes in the current format: as opened if they are, else re-encoded
    /// (same points, vectors, graph and settings), so that a shard written by an older
    /// release is upgraded once, when a bundle is built, rather than at every cold start.
    pub fn into_current_bytes(self) -> Vec<u8> {
        if self.format_version() == SHARD_FORMAT_VERSION {
            return self.into_bytes();
        }
        let base: LayerLists = (0..self.len() as u32)
            .map(|point| (point, self.base_neighbours(point).collect()))
            .collect();
        let mut layers = vec![base];
        for layer in &self.upper {
            layers.push(
                layer
                    .members
                    .iter()
                    .map(|&member| (member, layer.neighbours_of(member).to_vec()))
                    .collect(),
            );
        }
        let search_ef = u32_at(&self.bytes, SEARCH_EF_AT).unwrap_or_default();
        writer::encode(&writer::Parts {
            dim: self.dim,
            ids: self.ids.clone(),
            scales: self.scales.clone(),
            quantized: self.bytes[self.vectors.clone()].to_vec(),
            layers,
            entry_point: self.entry_point,
            search_ef,
        })
    }

    /// The dequantized vector of the video at storage position `position`, or `None` past
    /// the end.
    pub fn vector(&self, position: usize) -> Option<Vec<f32>> {
        let scale = *self.scales.get(position)?;
        Some(
            self.quantized(position)
                .iter()
                .map(|&b| scale * f32::from(b as i8))
                .collect(),
        )
    }

    /// The score a search gives the video at storage position `position` for `query`, or
    /// `None` past the end or for a query of the wrong dimension (so that a candidate found
    /// another way can be scored on the same scale as search hits).
    pub fn score_at(&self, query: &[f32], position: usize) -> Option<f32> {
        (position < self.len() && query.len() == self.dim)
            .then(|| self.score(query, position as u32))
    }

    /// Scores for `query` on the graph search's int8 scale: about three times cheaper than
    /// [`Shard::score_at`] and close to it, for narrowing many points down before scoring
    /// the few kept exactly. `None` for a query of the wrong dimension.
    pub fn approximate_scorer(&self, query: &[f32]) -> Option<ApproximateScorer<'_>> {
        (query.len() == self.dim).then(|| ApproximateScorer {
            shard: self,
            query: QuantizedQuery::new(query),
        })
    }

    /// A query for the `k` best videos, with the shard's beam width until
    /// [`Query::ef`] changes it.
    pub fn nns(&self, k: usize) -> Query<'_> {
        Query {
            shard: self,
            k,
            ef: self.search_ef,
        }
    }

    /// The exact `k` best videos by brute force over the quantized vectors, best first (for
    /// measuring the graph search against).
    pub fn exact_search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, Error> {
        self.check_query(query)?;
        let k = k.min(self.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut best: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
        for point in 0..self.len() as u32 {
            let candidate = Scored {
                score: self.score(query, point),
                point,
            };
            if best.len() < k {
                best.push(Reverse(candidate));
            } else if best.peek().is_some_and(|worst| candidate > worst.0) {
                best.pop();
                best.push(Reverse(candidate));
            }
        }
        Ok(self.hits(best.into_iter().map(|r| r.0), k))
    }

    fn check_query(&self, query: &[f32]) -> Result<(), Error> {
        if query.len() != self.dim {
            return Err(Error::DimensionMismatch {
                expected: self.dim,
                found: query.len(),
            });
        }
        if let Some(index) = query.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteQuery { index });
        }
        Ok(())
    }

    fn quantized(&self, point: usize) -> &[u8] {
        let start = self.vectors.start + point * self.dim;
        &self.bytes[start..start + self.dim]
    }

    fn score(&self, query: &[f32], point: u32) -> f32 {
        let point = point as usize;
        self.scales[point] * dot_i8(query, self.quantized(point))
    }

    fn base_neighbours(&self, point: u32) -> ListIter<'_> {
        let start = self.base.start + self.base_offsets[point as usize] as usize;
        let end = self.base.start + self.base_offsets[point as usize + 1] as usize;
        ListIter::new(&self.bytes[start..end], point)
    }

    /// The graph search: greedy descent through the upper layers, then a beam of width `ef`
    /// at layer 0, both steered by the int8 query ([`QuantizedQuery`]); the beam's
    /// survivors are then scored exactly (f32 query) and the best `k` of those returned, so
    /// hits carry the same scores as [`Shard::score_at`].
    fn search_graph(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        scratch: &mut SearchScratch,
    ) -> Vec<(u32, f32)> {
        let steer = QuantizedQuery::new(query);
        let approx = |point: u32| steer.score(self, point);
        let mut current = self.entry_point;
        let mut current_score = approx(current);
        for layer in self.upper.iter().rev() {
            loop {
                let mut moved = false;
                for &neighbour in layer.neighbours_of(current) {
                    let score = approx(neighbour);
                    if score > current_score {
                        current = neighbour;
                        current_score = score;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        let k = k.min(self.len());
        let ef = ef.max(k).max(1);
        let count = self.len() as u32;
        scratch.begin(self.len());
        let SearchScratch {
            visited,
            epoch,
            candidates,
            results,
            fresh,
        } = scratch;
        let epoch = *epoch;
        let start = Scored {
            score: current_score,
            point: current,
        };
        visited[current as usize] = epoch;
        candidates.push(start);
        results.push(Reverse(start));
        while let Some(candidate) = candidates.pop() {
            let worst = results.peek().map_or(f32::NEG_INFINITY, |r| r.0.score);
            if results.len() >= ef && candidate.score < worst {
                break;
            }
            // Three passes over the candidate's list, in the order one pass would take:
            // with the heap updates (and their mispredicted branches) out of the way, the
            // neighbours' vector loads, most of them cache misses, overlap instead of
            // waiting for each other.
            fresh.clear();
            for neighbour in self.base_neighbours(candidate.point) {
                // Never true for checked lists (`Shard::open_verified` does not walk them);
                // one predictable compare keeps any bytes from indexing past the end.
                if neighbour >= count {
                    continue;
                }
                let seen = &mut visited[neighbour as usize];
                if *seen != epoch {
                    *seen = epoch;
                    fresh.push(Scored {
                        score: f32::NAN,
                        point: neighbour,
                    });
                }
            }
            for scored in fresh.iter_mut() {
                scored.score = approx(scored.point);
            }
            for &scored in fresh.iter() {
                if results.len() < ef || results.peek().is_some_and(|worst| scored > worst.0) {
                    candidates.push(scored);
                    results.push(Reverse(scored));
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
        candidates.clear();
        self.best_positions(
            results.drain().map(|r| Scored {
                score: self.score(query, r.0.point),
                point: r.0.point,
            }),
            k,
        )
    }

    /// The best `k` as `(position, score)`, best first, ties by video id so equal scores
    /// come out in a reproducible order.
    fn best_positions(&self, scored: impl Iterator<Item = Scored>, k: usize) -> Vec<(u32, f32)> {
        let mut best: Vec<(u32, f32)> = scored.map(|s| (s.point, s.score)).collect();
        best.sort_unstable_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| self.ids[a.0 as usize].cmp(&self.ids[b.0 as usize]))
        });
        best.truncate(k);
        best
    }

    /// As [`Shard::best_positions`], with video ids for positions.
    fn hits(&self, scored: impl Iterator<Item = Scored>, k: usize) -> Vec<(u64, f32)> {
        self.with_ids(self.best_positions(scored, k))
    }

    fn with_ids(&self, positions: Vec<(u32, f32)>) -> Vec<(u64, f32)> {
        positions
            .into_iter()
            .map(|(position, score)| (self.ids[position as usize], score))
            .collect()
    }
}

/// A search for the `k` best videos, built by [`Shard::nns`] (in the style of arroy's
/// `reader.nns(k).ef_search(ef)`).
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    shard: &'a Shard,
    k: usize,
    ef: usize,
}

impl Query<'_> {
    /// The beam width at layer 0: larger finds more of the true best at more cost. Values
    /// below `k` are raised to `k`.
    pub fn ef(mut self, ef: usize) -> Self {
        self.ef = ef;
        self
    }

    /// Searches with fresh scratch space; see [`Query::search_with`] to reuse it.
    pub fn search(&self, query: &[f32]) -> Result<Vec<(u64, f32)>, Error> {
        self.search_with(query, &mut SearchScratch::default())
    }

    /// The `k` best videos as `(video_id, score)`, best first, reusing `scratch` so that a
    /// search allocates only its answer. Fails only on a query of the wrong dimension or
    /// with a non-finite value.
    pub fn search_with(
        &self,
        query: &[f32],
        scratch: &mut SearchScratch,
    ) -> Result<Vec<(u64, f32)>, Error> {
        let positions = self.search_positions_with(query, scratch)?;
        Ok(self.shard.with_ids(positions))
    }

    /// As [`Query::search_with`], naming each hit by its storage position rather than its
    /// video id: a caller keeping a table by position then needs no id lookup.
    pub fn search_positions_with(
        &self,
        query: &[f32],
        scratch: &mut SearchScratch,
    ) -> Result<Vec<(u32, f32)>, Error> {
        self.shard.check_query(query)?;
        if self.k == 0 {
            return Ok(Vec::new());
        }
        Ok(self.shard.search_graph(query, self.k, self.ef, scratch))
    }
}

/// Reusable working memory for searches: a visited mark per point and the two heaps. One
/// per thread; it fits any shard and grows to the largest it has searched.
#[derive(Debug, Default, Clone)]
pub struct SearchScratch {
    /// `visited[p] == epoch` marks `p` as seen in the current search, so clearing is a
    /// counter increment rather than a pass over every point.
    visited: Vec<u32>,
    epoch: u32,
    candidates: BinaryHeap<Scored>,
    results: BinaryHeap<Reverse<Scored>>,
    /// One candidate's neighbours not seen before, scored in a pass of their own.
    fresh: Vec<Scored>,
}

impl SearchScratch {
    fn begin(&mut self, points: usize) {
        if self.visited.len() < points {
            self.visited.resize(points, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.fill(0);
            self.epoch = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }
}

/// A point and its score, ordered by score, then by lower position (so ties resolve the
/// same way every time).
#[derive(Debug, Clone, Copy)]
struct Scored {
    score: f32,
    point: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.point.cmp(&self.point))
    }
}

/// A query rounded to int8 (`q ~ scale * steer`, scale dropped: it is one positive factor
/// for every point), so that the graph search compares points with integer dot products:
/// i8 x i8 sums in i32 vectorize into multiply-add instructions natively and in wasm
/// (SIMD128's `i32x4.dot_i16x8_s`), where the f32 product first converts every component.
/// The rounding moves a score by at most half a step per component, which only decides
/// near-ties of the beam; returned scores are exact.
struct QuantizedQuery {
    /// The int8 components, stored like the shard's vectors and widened once for the
    /// many products.
    steer: WidenedI8,
}

impl QuantizedQuery {
    fn new(query: &[f32]) -> Self {
        let largest = query.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let steer = query
            .iter()
            .map(|&v| {
                if largest > 0.0 {
                    (v * 127.0 / largest).round() as i8 as u8
                } else {
                    0
                }
            })
            .collect();
        Self {
            steer: WidenedI8::new(steer),
        }
    }

    fn score(&self, shard: &Shard, point: u32) -> f32 {
        let point = point as usize;
        shard.scales[point] * self.steer.dot(shard.quantized(point)) as f32
    }
}

/// See [`Shard::approximate_scorer`].
pub struct ApproximateScorer<'a> {
    shard: &'a Shard,
    query: QuantizedQuery,
}

impl ApproximateScorer<'_> {
    /// The approximate score of the video at storage position `position`, `None` past the
    /// end.
    pub fn score(&self, position: usize) -> Option<f32> {
        (position < self.shard.len()).then(|| self.query.score(self.shard, position as u32))
    }

    /// The approximate scores of the videos at `positions`, in order, `None` if the range
    /// passes the end. A run of positions (a category in a grouped shard, see
    /// `ShardWriter::groups`) is one pass over contiguous vectors and scales, with no
    /// lookup per video.
    pub fn scores_in(&self, positions: Range<usize>) -> Option<impl Iterator<Item = f32> + '_> {
        let shard = self.shard;
        let scales = shard.scales.get(positions.clone())?;
        let start = shard.vectors.start + positions.start * shard.dim;
        let vectors = shard
            .bytes
            .get(start..start + positions.len() * shard.dim)?;
        Some(
            vectors
                .chunks_exact(shard.dim.max(1))
                .zip(scales)
                .map(|(vector, &scale)| scale * self.query.steer.dot(vector) as f32),
        )
    }
}

/// One side of int8 dot products taken many times (a query against every point it
/// visits), sign-extended to i16 once rather than at every product: the SIMD twins then
/// widen only the point's bytes, two of the four extensions per 16 components.
struct WidenedI8 {
    /// As stored (two's complement); the tail past the last whole 16 is read from here.
    bytes: Vec<u8>,
    /// Per whole 16 components, two i16 vectors: the low eight, then the high eight.
    #[cfg(any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        all(target_arch = "x86_64", target_feature = "sse2")
    ))]
    lanes: Vec<[simd::Lanes; 2]>,
}

impl WidenedI8 {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            #[cfg(any(
                all(target_arch = "wasm32", target_feature = "simd128"),
                all(target_arch = "x86_64", target_feature = "sse2")
            ))]
            lanes: simd::widen(&bytes),
            bytes,
        }
    }

    /// `sum_j a_j * b_j` with `b`'s bytes as i8, exact in i32 for any dimension below
    /// 2^17; `b` has as many components as `self`.
    #[cfg(any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        all(target_arch = "x86_64", target_feature = "sse2")
    ))]
    fn dot(&self, b: &[u8]) -> i32 {
        let (b_chunks, b_tail) = b.as_chunks::<16>();
        let a_tail = &self.bytes[self.bytes.len().saturating_sub(b_tail.len())..];
        let lanes = self.lanes.as_slice();
        // 64 components, the default: a fixed count of steps unrolls, so the scans pay no
        // loop per point (nor, in wasmtime with deadlines, an epoch check per step).
        let whole = match (
            <&[[simd::Lanes; 2]; 4]>::try_from(lanes),
            <&[[u8; 16]; 4]>::try_from(b_chunks),
        ) {
            (Ok(lanes), Ok(chunks)) => simd::dot(lanes, chunks),
            _ => simd::dot(lanes, b_chunks),
        };
        whole + dot_scalar(a_tail, b_tail)
    }

    /// The portable form, for targets without one of the SIMD twins below.
    #[cfg(not(any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        all(target_arch = "x86_64", target_feature = "sse2")
    )))]
    fn dot(&self, b: &[u8]) -> i32 {
        dot_scalar(&self.bytes, b)
    }
}

fn dot_scalar(a: &[u8], b: &[u8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| i32::from(a as i8) * i32::from(b as i8))
        .sum()
}

/// 16 components at a time: the point's bytes widened to i16 in two halves and
/// `i32x4.dot_i16x8_s` (a `pmaddwd` in the engines) multiplies and adds pairs into four
/// i32 lanes.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::{
        i16x8_extend_high_i8x16, i16x8_extend_low_i8x16, i32x4_add, i32x4_dot_i16x8,
        i32x4_extract_lane, i32x4_splat, u64x2, v128,
    };

    pub(super) type Lanes = v128;

    // Two 8-byte loads: built from single bytes, LLVM emitted sixteen `v128.load8_lane`s
    // per vector, which made this slower than the f32 product it replaces. (A `v128.load`
    // would need `unsafe`, which the crate keeps to the ABI's exports.)
    fn load(x: &[u8; 16]) -> v128 {
        let (low, high) = x.split_at(8);
        let word = |half: &[u8]| u64::from_le_bytes(half.try_into().expect("8 bytes"));
        u64x2(word(low), word(high))
    }

    pub(super) fn widen(bytes: &[u8]) -> Vec<[v128; 2]> {
        let (chunks, _) = bytes.as_chunks::<16>();
        chunks
            .iter()
            .map(|chunk| {
                let v = load(chunk);
                [i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v)]
            })
            .collect()
    }

    /// Inlined always, so that a caller's fixed lengths unroll the loop.
    #[inline(always)]
    pub(super) fn dot(lanes: &[[v128; 2]], chunks: &[[u8; 16]]) -> i32 {
        let mut sums = i32x4_splat(0);
        for (a, b) in lanes.iter().zip(chunks) {
            let b = load(b);
            let low = i32x4_dot_i16x8(a[0], i16x8_extend_low_i8x16(b));
            let high = i32x4_dot_i16x8(a[1], i16x8_extend_high_i8x16(b));
            sums = i32x4_add(sums, i32x4_add(low, high));
        }
        i32x4_extract_lane::<0>(sums)
            + i32x4_extract_lane::<1>(sums)
            + i32x4_extract_lane::<2>(sums)
            + i32x4_extract_lane::<3>(sums)
    }
}

/// The x86-64 twin of the wasm one above, in SSE2: LLVM vectorised the portable form with
/// 16-bit multiplies and widening shuffles, eight components a step, not with `pmaddwd`
/// (nor when the pairwise sums were spelled out). Scanning 15,000 videos took 413 us
/// that way and 283 us this way; native retrieval on the bench bundle went from 1.42 to
/// 1.13 ms. SSE2 has no `pmovsxbw`: bytes are sign-extended by unpacking each with itself
/// and shifting right.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[allow(unsafe_code)]
mod simd {
    use core::arch::x86_64::{
        __m128i, _mm_add_epi32, _mm_cvtsi128_si32, _mm_madd_epi16, _mm_set_epi64x,
        _mm_setzero_si128, _mm_shuffle_epi32, _mm_srai_epi16, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };

    pub(super) type Lanes = __m128i;

    // As in the wasm twin: two 8-byte words rather than a pointer load.
    #[target_feature(enable = "sse2")]
    fn load(x: &[u8; 16]) -> __m128i {
        let (low, high) = x.split_at(8);
        let word = |half: &[u8]| i64::from_le_bytes(half.try_into().expect("8 bytes"));
        _mm_set_epi64x(word(high), word(low))
    }

    #[target_feature(enable = "sse2")]
    fn widen_low(v: __m128i) -> __m128i {
        _mm_srai_epi16::<8>(_mm_unpacklo_epi8(v, v))
    }

    #[target_feature(enable = "sse2")]
    fn widen_high(v: __m128i) -> __m128i {
        _mm_srai_epi16::<8>(_mm_unpackhi_epi8(v, v))
    }

    pub(super) fn widen(bytes: &[u8]) -> Vec<[__m128i; 2]> {
        #[target_feature(enable = "sse2")]
        fn widen(bytes: &[u8]) -> Vec<[__m128i; 2]> {
            let (chunks, _) = bytes.as_chunks::<16>();
            let mut lanes = Vec::with_capacity(chunks.len());
            for chunk in chunks {
                let v = load(chunk);
                lanes.push([widen_low(v), widen_high(v)]);
            }
            lanes
        }
        // SAFETY: as for `dot` below.
        unsafe { widen(bytes) }
    }

    #[inline(always)]
    pub(super) fn dot(lanes: &[[__m128i; 2]], chunks: &[[u8; 16]]) -> i32 {
        #[target_feature(enable = "sse2")]
        #[inline]
        fn dot(lanes: &[[__m128i; 2]], chunks: &[[u8; 16]]) -> i32 {
            let mut sums = _mm_setzero_si128();
            for (a, b) in lanes.iter().zip(chunks) {
                let b = load(b);
                let low = _mm_madd_epi16(a[0], widen_low(b));
                let high = _mm_madd_epi16(a[1], widen_high(b));
                sums = _mm_add_epi32(sums, _mm_add_epi32(low, high));
            }
            let sums = _mm_add_epi32(sums, _mm_shuffle_epi32::<0b01_00_11_10>(sums));
            let sums = _mm_add_epi32(sums, _mm_shuffle_epi32::<0b10_11_00_01>(sums));
            _mm_cvtsi128_si32(sums)
        }
        // SAFETY: `dot` needs only SSE2, which this build enables (the cfg above; every
        // x86-64 CPU has it). It touches memory through slices alone.
        unsafe { dot(lanes, chunks) }
    }
}

/// `sum_j q_j * v_j` with `v` as i8. Independent sums over fixed-size chunks let the
/// compiler vectorize without bounds checks (f32 addition is not associative, so it will
/// not split one running sum by itself). Eight measured fastest on x86-64's baseline
/// (16 ns for 64 dimensions; 16 and 32 were slower).
fn dot_i8(query: &[f32], vector: &[u8]) -> f32 {
    const LANES: usize = 8;
    let (query_chunks, query_tail) = query.as_chunks::<LANES>();
    let (vector_chunks, vector_tail) = vector.as_chunks::<LANES>();
    let mut sums = [0.0_f32; LANES];
    for (q, v) in query_chunks.iter().zip(vector_chunks) {
        for ((sum, &q), &v) in sums.iter_mut().zip(q).zip(v) {
            *sum += q * f32::from(v as i8);
        }
    }
    let tail: f32 = query_tail
        .iter()
        .zip(vector_tail)
        .map(|(&q, &v)| q * f32::from(v as i8))
        .sum();
    sums.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------------------
// Encoding helpers shared with the writer.

fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A LEB128 u32 at `*pos`, or `None` if the bytes end first or it does not fit 32 bits.
///
/// Most numbers of a locality-ordered shard fit one byte: that case is inlined into the
/// search loop and the cold-start validation (which spent half its time in calls here).
#[inline(always)]
fn read_varint(bytes: &[u8], pos: &mut usize) -> Option<u32> {
    let first = *bytes.get(*pos)?;
    if first < 0x80 {
        *pos += 1;
        return Some(u32::from(first));
    }
    read_long_varint(bytes, pos)
}

#[inline(never)]
fn read_long_varint(bytes: &[u8], pos: &mut usize) -> Option<u32> {
    let mut value = 0_u32;
    for shift in [0_u32, 7, 14, 21, 28] {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        let low = u32::from(byte & 0x7f);
        if shift == 28 && low > 0x0f {
            return None;
        }
        value |= low << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn zigzag(value: i32) -> u32 {
    ((value << 1) ^ (value >> 31)) as u32
}

fn unzigzag(value: u32) -> i32 {
    ((value >> 1) as i32) ^ -((value & 1) as i32)
}

/// Writes one neighbour list; `neighbours` must be sorted ascending and distinct.
fn put_list(out: &mut Vec<u8>, own: u32, neighbours: &[u32]) {
    put_varint(out, neighbours.len() as u32);
    let mut previous: Option<u32> = None;
    for &neighbour in neighbours {
        let code = match previous {
            None => zigzag((neighbour as i32).wrapping_sub(own as i32)),
            Some(previous) => neighbour.wrapping_sub(previous).wrapping_sub(1),
        };
        put_varint(out, code);
        previous = Some(neighbour);
    }
}

/// Decodes a list that [`Parsed`] has validated. Wrapping arithmetic and `Option` instead
/// of indexing: on validated bytes they change nothing, and they keep the hot loop free of
/// panics even if that invariant were ever broken.
struct ListIter<'a> {
    bytes: &'a [u8],
    pos: usize,
    remaining: u32,
    previous: Option<u32>,
    own: u32,
}

impl<'a> ListIter<'a> {
    fn new(bytes: &'a [u8], own: u32) -> Self {
        let mut pos = 0;
        let remaining = read_varint(bytes, &mut pos).unwrap_or(0);
        Self {
            bytes,
            pos,
            remaining,
            previous: None,
            own,
        }
    }
}

impl Iterator for ListIter<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let code = read_varint(self.bytes, &mut self.pos)?;
        let neighbour = match self.previous {
            None => self.own.wrapping_add_signed(unzigzag(code)),
            Some(previous) => previous.wrapping_add(code).wrapping_add(1),
        };
        self.previous = Some(neighbour);
        Some(neighbour)
    }
}

// ---------------------------------------------------------------------------------------
// Validation.

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidShard {
        reason: reason.into(),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_le_bytes(bytes.get(at..end)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    Some(u64::from_le_bytes(bytes.get(at..end)?.try_into().ok()?))
}

/// What [`Parsed::new`] checks: everything, or (for bytes whose integrity the caller
/// vouches for) neither the checksum nor the layer-0 lists against their stored offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    Full,
    IntegrityTrusted,
}

/// Everything `Shard` keeps, decoded and checked, borrowing nothing so the bytes can move in.
struct Parsed {
    dim: usize,
    ids: Vec<u64>,
    by_id: Vec<(u64, u32)>,
    scales: Vec<f32>,
    vectors: Range<usize>,
    base: Range<usize>,
    base_offsets: Vec<u32>,
    upper: Vec<UpperLayer>,
    entry_point: u32,
    search_ef: usize,
}

/// Hands out consecutive sections and checks each lies within the body, after the previous.
struct Sections {
    body_len: usize,
    next_start: usize,
}

impl Sections {
    fn take(&mut self, name: &str, offset: u64, len: usize) -> Result<Range<usize>, Error> {
        let offset = usize::try_from(offset)
            .map_err(|_| invalid(format!("{name} offset {offset} is past the end")))?;
        if offset < self.next_start {
            return Err(invalid(format!(
                "{name} offset {offset} overlaps what precedes it (ends at {})",
                self.next_start
            )));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.body_len)
            .ok_or_else(|| {
                invalid(format!(
                    "{name} ({len} bytes at offset {offset}) runs past the end of the data ({} bytes): truncated?",
                    self.body_len
                ))
            })?;
        self.next_start = end;
        Ok(offset..end)
    }
}

impl Parsed {
    fn new(bytes: &[u8], checks: Checks) -> Result<Self, Error> {
        let too_short = |header_len: usize| {
            invalid(format!(
                "{} bytes is too short for a shard (header and checksum alone take {})",
                bytes.len(),
                header_len + TRAILER_LEN
            ))
        };
        if bytes.len() < V1_HEADER_LEN + TRAILER_LEN {
            return Err(too_short(V1_HEADER_LEN));
        }
        if bytes[..8] != SHARD_MAGIC {
            return Err(invalid("wrong magic bytes: not an edgerec shard"));
        }
        let header = |at: usize| u32_at(bytes, at).unwrap_or_default();
        let header64 = |at: usize| u64_at(bytes, at).unwrap_or_default();
        let version = header(8);
        let header_len = match version {
            1 => V1_HEADER_LEN,
            SHARD_FORMAT_VERSION => HEADER_LEN,
            _ => {
                return Err(Error::FormatVersion {
                    artifact: "shard",
                    found: version,
                    expected: SHARD_FORMAT_VERSION,
                });
            }
        };
        if bytes.len() < header_len + TRAILER_LEN {
            return Err(too_short(header_len));
        }
        let body_len = bytes.len() - TRAILER_LEN;
        if checks == Checks::Full {
            let stored = u64_at(bytes, body_len).unwrap_or_default();
            let computed = xxh3_64(&bytes[..body_len]);
            if stored != computed {
                return Err(invalid(format!(
                    "checksum mismatch (stored {stored:016x}, computed {computed:016x}): corrupted or truncated"
                )));
            }
        }

        let dim = header(12) as usize;
        let count = header(16) as usize;
        let layer_count = header(20) as usize;
        let entry_point = header(24);
        let search_ef = match header(SEARCH_EF_AT) {
            0 => DEFAULT_EF,
            ef => ef as usize,
        };
        if dim == 0 {
            return Err(invalid("dimension is 0"));
        }
        if count == 0 || count > MAX_POINTS {
            return Err(invalid(format!(
                "point count {count} is not in 1..={MAX_POINTS}"
            )));
        }
        if layer_count == 0 || layer_count > MAX_LAYERS {
            return Err(invalid(format!(
                "layer count {layer_count} is not in 1..={MAX_LAYERS}"
            )));
        }
        if entry_point as usize >= count {
            return Err(invalid(format!(
                "entry point {entry_point} is not below the point count {count}"
            )));
        }

        // Every length is checked against the file before anything is allocated from it.
        let mut sections = Sections {
            body_len,
            next_start: header_len,
        };
        // `items` of `width` bytes at the offset the header stores at `offset_at`.
        let mut array = |name: &str, offset_at: usize, items: usize, width: usize| {
            let len = items
                .checked_mul(width)
                .ok_or_else(|| invalid(format!("{name} size {items} x {width} overflows")))?;
            sections.take(name, header64(offset_at), len)
        };
        let ids_range = array("id section", 32, count, 8)?;
        let scales_range = array("scale section", 40, count, 4)?;
        let vectors = array("vector section", 48, count, dim)?;
        let derived = if version == 1 {
            None
        } else {
            let order = array("id-order section", 64, count, 4)?;
            let offsets = array("list-offset section", 72, count + 1, 4)?;
            Some((order, offsets))
        };
        let table = array("layer table", 56, layer_count, LAYER_ENTRY_LEN)?;

        let ids: Vec<u64> = bytes[ids_range]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let by_id = match &derived {
            Some((order, _)) => read_id_order(&bytes[order.clone()], &ids)?,
            None => sort_by_id(&ids)?,
        };
        let scales: Vec<f32> = bytes[scales_range]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if let Some(position) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(invalid(format!(
                "point {position} has scale {}, which is not a finite number >= 0",
                scales[position]
            )));
        }

        let mut blobs = Vec::with_capacity(layer_count);
        for layer in 0..layer_count {
            let at = table.start + layer * LAYER_ENTRY_LEN;
            let members = u32_at(bytes, at).unwrap_or_default() as usize;
            let offset = u64_at(bytes, at + 4).unwrap_or_default();
            let len = u64_at(bytes, at + 12).unwrap_or_default();
            let len = usize::try_from(len)
                .map_err(|_| invalid(format!("layer {layer} length {len} is too large")))?;
            let range = sections.take(&format!("layer {layer}"), offset, len)?;
            blobs.push((members, range));
        }
        if sections.next_start != body_len {
            return Err(invalid(format!(
                "{} unexplained bytes before the checksum",
                body_len - sections.next_start
            )));
        }

        let (base_members, base) = blobs[0].clone();
        if base_members != count {
            return Err(invalid(format!(
                "layer 0 has {base_members} members, expected every one of the {count} points"
            )));
        }
        let blob = &bytes[base.clone()];
        let base_offsets = match &derived {
            None => parse_base(blob, count)?,
            Some((_, offsets)) => {
                let stored = read_list_offsets(&bytes[offsets.clone()], blob.len())?;
                if checks == Checks::Full && parse_base(blob, count)? != stored {
                    return Err(invalid(
                        "the list-offset section does not match the layer-0 lists",
                    ));
                }
                stored
            }
        };

        let mut upper: Vec<UpperLayer> = Vec::with_capacity(layer_count - 1);
        for (index, (members, range)) in blobs.iter().enumerate().skip(1) {
            let below = upper.last().map(|layer| layer.members.as_slice());
            let layer = parse_upper(&bytes[range.clone()], index, *members, count, below)?;
            upper.push(layer);
        }
        let top = upper.last().map(|layer| layer.members.as_slice());
        if top.is_some_and(|members| members.binary_search(&entry_point).is_err()) {
            return Err(invalid(format!(
                "entry point {entry_point} is not a member of the top layer {}",
                layer_count - 1
            )));
        }

        Ok(Self {
            dim,
            ids,
            by_id,
            scales,
            vectors,
            base,
            base_offsets,
            upper,
            entry_point,
            search_ef,
        })
    }
}

/// Reads one list at `*pos`, checking every id and handing each to `keep`, and leaves
/// `*pos` after it.
#[inline]
fn parse_list(
    blob: &[u8],
    pos: &mut usize,
    own: u32,
    count: usize,
    mut keep: impl FnMut(u32),
    context: &dyn Fn() -> String,
) -> Result<(), Error> {
    let truncated = || invalid(format!("{}: list is truncated or malformed", context()));
    let degree = read_varint(blob, pos).ok_or_else(truncated)? as usize;
    // Each neighbour takes at least one byte: a declared degree the bytes cannot hold is
    // refused before it drives any loop.
    if degree >= count || degree > blob.len() - *pos {
        return Err(invalid(format!(
            "{}: degree {degree} is impossible here",
            context()
        )));
    }
    let mut previous: Option<u32> = None;
    for _ in 0..degree {
        let code = read_varint(blob, pos).ok_or_else(truncated)?;
        let neighbour = match previous {
            None => i64::from(own) + i64::from(unzigzag(code)),
            Some(previous) => i64::from(previous) + i64::from(code) + 1,
        };
        if neighbour < 0 || neighbour >= count as i64 {
            return Err(invalid(format!(
                "{}: neighbour {neighbour} is not below the point count {count}",
                context()
            )));
        }
        let neighbour = neighbour as u32;
        if neighbour == own {
            return Err(invalid(format!(
                "{}: lists itself as a neighbour",
                context()
            )));
        }
        keep(neighbour);
        previous = Some(neighbour);
    }
    Ok(())
}

/// Version 1's id index: `(id, position)` sorted, and refused if an id repeats.
fn sort_by_id(ids: &[u64]) -> Result<Vec<(u64, u32)>, Error> {
    let mut by_id: Vec<(u64, u32)> = ids
        .iter()
        .enumerate()
        .map(|(position, &id)| (id, position as u32))
        .collect();
    by_id.sort_unstable();
    if let Some(pair) = by_id.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(invalid(format!("video id {} appears twice", pair[0].0)));
    }
    Ok(by_id)
}

/// The stored id order, checked in one pass: every position in range and the ids strictly
/// ascending along it, which also proves it a permutation with no id twice.
fn read_id_order(section: &[u8], ids: &[u64]) -> Result<Vec<(u64, u32)>, Error> {
    let mut by_id = Vec::with_capacity(ids.len());
    let mut previous: Option<u64> = None;
    for (rank, chunk) in section.chunks_exact(4).enumerate() {
        let position = u32::from_le_bytes(chunk.try_into().unwrap_or_default());
        let Some(&id) = ids.get(position as usize) else {
            return Err(invalid(format!(
                "id order entry {rank} names position {position}, past the {} points",
                ids.len()
            )));
        };
        if let Some(previous) = previous.filter(|&previous| previous >= id) {
            return Err(invalid(if previous == id {
                format!("video id {id} appears twice")
            } else {
                format!(
                    "id order entry {rank} (video id {id}) is below the one before it ({previous})"
                )
            }));
        }
        previous = Some(id);
        by_id.push((id, position));
    }
    Ok(by_id)
}

/// The stored layer-0 list offsets, checked to start at 0, never decrease, leave room for
/// each list's degree byte and end at the blob's end.
fn read_list_offsets(section: &[u8], blob_len: usize) -> Result<Vec<u32>, Error> {
    let offsets: Vec<u32> = section
        .chunks_exact(4)
        .map(|chunk| u32::from_le_bytes(chunk.try_into().unwrap_or_default()))
        .collect();
    if offsets.first() != Some(&0) || offsets.last().map(|&end| end as usize) != Some(blob_len) {
        return Err(invalid(format!(
            "list offsets must run from 0 to the layer-0 length {blob_len}"
        )));
    }
    if let Some(point) = offsets.windows(2).position(|pair| pair[1] <= pair[0]) {
        return Err(invalid(format!(
            "list offsets of points {point} and {} do not ascend",
            point + 1
        )));
    }
    Ok(offsets)
}

fn parse_base(blob: &[u8], count: usize) -> Result<Vec<u32>, Error> {
    if u32::try_from(blob.len()).is_err() {
        return Err(invalid(format!(
            "layer 0 takes {} bytes, more than 4 GiB",
            blob.len()
        )));
    }
    let mut offsets = Vec::with_capacity(count + 1);
    let mut pos = 0;
    for point in 0..count as u32 {
        offsets.push(pos as u32);
        parse_list(blob, &mut pos, point, count, |_| {}, &|| {
            format!("layer 0, point {point}")
        })?;
    }
    offsets.push(pos as u32);
    if pos != blob.len() {
        return Err(invalid(format!(
            "layer 0 has {} bytes after its last list",
            blob.len() - pos
        )));
    }
    Ok(offsets)
}

fn parse_upper(
    blob: &[u8],
    index: usize,
    member_count: usize,
    count: usize,
    below: Option<&[u32]>,
) -> Result<UpperLayer, Error> {
    // A member takes at least two bytes (its position and its degree).
    if member_count == 0 || member_count > count || member_count > blob.len() / 2 {
        return Err(invalid(format!(
            "layer {index} declares {member_count} members, impossible for {count} points in {} bytes",
            blob.len()
        )));
    }
    if below.is_some_and(|below| member_count > below.len()) {
        return Err(invalid(format!(
            "layer {index} has more members than the layer below it"
        )));
    }
    let mut members = Vec::with_capacity(member_count);
    let mut offsets = Vec::with_capacity(member_count + 1);
    let mut neighbours = Vec::new();
    let mut pos = 0;
    let mut previous: Option<u32> = None;
    for _ in 0..member_count {
        let gap = read_varint(blob, &mut pos).ok_or_else(|| {
            invalid(format!(
                "layer {index}: member list is truncated or malformed"
            ))
        })?;
        let member = match previous {
            None => i64::from(gap),
            Some(previous) => i64::from(previous) + i64::from(gap) + 1,
        };
        if member >= count as i64 {
            return Err(invalid(format!(
                "layer {index}: member {member} is not below the point count {count}"
            )));
        }
        let member = member as u32;
        if below.is_some_and(|below| below.binary_search(&member).is_err()) {
            return Err(invalid(format!(
                "layer {index}: member {member} is missing from layer {}",
                index - 1
            )));
        }
        members.push(member);
        offsets.push(
            u32::try_from(neighbours.len())
                .map_err(|_| invalid(format!("layer {index} has too many edges")))?,
        );
        parse_list(
            blob,
            &mut pos,
            member,
            count,
            |n| neighbours.push(n),
            &|| format!("layer {index}, point {member}"),
        )?;
        previous = Some(member);
    }
    offsets.push(
        u32::try_from(neighbours.len())
            .map_err(|_| invalid(format!("layer {index} has too many edges")))?,
    );
    if pos != blob.len() {
        return Err(invalid(format!(
            "layer {index} has {} bytes after its last list",
            blob.len() - pos
        )));
    }
    if let Some(stray) = neighbours
        .iter()
        .find(|n| members.binary_search(n).is_err())
    {
        return Err(invalid(format!(
            "layer {index}: neighbour {stray} is not a member of the layer"
        )));
    }
    Ok(UpperLayer {
        members,
        offsets,
        neighbours,
    })
}

#[cfg(test)]
mod tests;
