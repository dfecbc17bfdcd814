//! Writing shards: validation of the caller's graph, point ordering, quantization, encoding.

use xxhash_rust::xxh3::xxh3_64;

use super::{
    HEADER_LEN, LAYER_ENTRY_LEN, MAX_LAYERS, MAX_POINTS, SHARD_FORMAT_VERSION, SHARD_MAGIC,
    V1_HEADER_LEN, put_list, put_varint,
};
use crate::Error;

/// One layer of a [`ShardGraph`]: `(point, neighbours)` for each member.
pub type LayerLists = Vec<(u32, Vec<u32>)>;

/// An HNSW graph over points `0..n` (positions in the writer's `ids`), in any builder's
/// terms: hnsw_rs's export, or a brute-force graph in tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardGraph {
    /// `layers[l]` holds `(point, neighbours)` for every member of layer `l`, in any order.
    /// Layer 0 lists every point; members of a layer are members of the layer below; the
    /// neighbours of an upper-layer point are members of that layer. Duplicate neighbours
    /// and self-loops are dropped.
    pub layers: Vec<LayerLists>,
    /// Where searches start: a member of the top layer.
    pub entry_point: u32,
}

/// Writes the shard format (see [`crate::shard`]) from ids, f32 vectors and a graph.
#[derive(Debug, Clone)]
pub struct ShardWriter {
    dim: usize,
    search_ef: usize,
    locality_order: bool,
    groups: Option<Vec<u32>>,
}

impl ShardWriter {
    /// A writer for vectors of `dim` components, with locality ordering on and no default
    /// beam width recorded.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            search_ef: 0,
            locality_order: true,
            groups: None,
        }
    }

    /// The beam width that searches use unless a query sets its own (0: the reader's
    /// [`DEFAULT_EF`](super::DEFAULT_EF)).
    pub fn search_ef(mut self, ef: usize) -> Self {
        self.search_ef = ef;
        self
    }

    /// Whether to store points in an order where near vectors sit near each other
    /// (recursive bisection along each part's principal direction). On by default: neighbour
    /// ids then differ little, so their varints shrink (by a quarter of the graph's bytes
    /// on 20,000 clustered embeddings of dim 64 with M 16: 124 -> 111 bytes per video), and
    /// a search touches fewer memory pages. Off keeps the input order.
    pub fn locality_order(mut self, on: bool) -> Self {
        self.locality_order = on;
        self
    }

    /// Stores each group's points in one run of positions, the runs in ascending label
    /// order; `groups[i]` labels the writer's point `i`. Locality order, when on, applies
    /// within each run. Serving scans a whole category's videos (the category queries):
    /// with the points grouped by category, such a scan reads one stretch of memory instead
    /// of every n-th row. On the 100,000-video bench bundle at ef 128, in wasmtime, that
    /// took retrieval from 1.24 to 1.18 ms (median) and its p99 from 1.6-1.7 to 1.4 ms.
    pub fn groups(mut self, groups: Vec<u32>) -> Self {
        self.groups = Some(groups);
        self
    }

    /// The shard's bytes. `vectors` is row-major, `dim` per row, one row per id.
    pub fn write(
        &self,
        ids: &[u64],
        vectors: &[f32],
        graph: &ShardGraph,
    ) -> Result<Vec<u8>, Error> {
        let dim = self.dim;
        let n = ids.len();
        if dim == 0 || u32::try_from(dim).is_err() {
            return Err(refuse(format!("dimension {dim} is not in 1..=u32::MAX")));
        }
        if n == 0 || n > MAX_POINTS {
            return Err(refuse(format!(
                "{n} points; a shard holds 1..={MAX_POINTS}"
            )));
        }
        if u32::try_from(self.search_ef).is_err() {
            return Err(refuse(format!(
                "search ef {} does not fit u32",
                self.search_ef
            )));
        }
        if n.checked_mul(dim) != Some(vectors.len()) {
            return Err(refuse(format!(
                "{} vector values for {n} ids of dimension {dim}",
                vectors.len()
            )));
        }
        if let Some(at) = vectors.iter().position(|v| !v.is_finite()) {
            return Err(refuse(format!(
                "point {}, component {} is not finite",
                at / dim,
                at % dim
            )));
        }
        let mut sorted_ids = ids.to_vec();
        sorted_ids.sort_unstable();
        if let Some(pair) = sorted_ids.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(refuse(format!("video id {} appears twice", pair[0])));
        }
        let layers = normalized_layers(graph, n)?;

        let mut order: Vec<u32> = (0..n as u32).collect();
        let label = |point: u32| self.groups.as_ref().map_or(0, |g| g[point as usize]);
        if let Some(groups) = &self.groups {
            if groups.len() != n {
                return Err(refuse(format!(
                    "{} group labels for {n} points",
                    groups.len()
                )));
            }
            // Stable: a group keeps its points' input order until locality reorders it.
            order.sort_by_key(|&point| label(point));
        }
        if self.locality_order {
            let mut projection = vec![0.0_f32; n];
            for run in order.chunk_by_mut(|&a, &b| label(a) == label(b)) {
                locality_order(vectors, dim, run, &mut projection);
            }
        }
        let mut rank = vec![0_u32; n];
        for (new, &old) in order.iter().enumerate() {
            rank[old as usize] = new as u32;
        }

        let mut scales = Vec::with_capacity(n);
        let mut quantized = Vec::with_capacity(n * dim);
        for &old in &order {
            let row = &vectors[old as usize * dim..][..dim];
            scales.push(quantize(row, &mut quantized));
        }
        let layers = layers
            .iter()
            .map(|layer| {
                let mut renamed: LayerLists = layer
                    .iter()
                    .map(|(point, neighbours)| {
                        let mut neighbours: Vec<u32> =
                            neighbours.iter().map(|&p| rank[p as usize]).collect();
                        neighbours.sort_unstable();
                        (rank[*point as usize], neighbours)
                    })
                    .collect();
                renamed.sort_unstable_by_key(|(point, _)| *point);
                renamed
            })
            .collect();
        Ok(encode(&Parts {
            dim,
            ids: order.iter().map(|&old| ids[old as usize]).collect(),
            scales,
            quantized,
            layers,
            entry_point: rank[graph.entry_point as usize],
            search_ef: self.search_ef as u32,
        }))
    }
}

fn refuse(reason: String) -> Error {
    Error::InvalidShardInput { reason }
}

/// Checks the graph and returns its lists sorted, without duplicates or self-loops.
fn normalized_layers(graph: &ShardGraph, n: usize) -> Result<Vec<LayerLists>, Error> {
    if graph.layers.is_empty() || graph.layers.len() > MAX_LAYERS {
        return Err(refuse(format!(
            "{} layers; a shard has 1..={MAX_LAYERS}",
            graph.layers.len()
        )));
    }
    // `level[p]` = number of layers `p` belongs to, filled layer by layer.
    let mut level = vec![0_usize; n];
    let mut layers = Vec::with_capacity(graph.layers.len());
    for (index, layer) in graph.layers.iter().enumerate() {
        if layer.is_empty() {
            return Err(refuse(format!("layer {index} is empty")));
        }
        for (point, _) in layer {
            let point = *point as usize;
            if point >= n {
                return Err(refuse(format!(
                    "layer {index}: point {point} is not below the point count {n}"
                )));
            }
            if level[point] != index {
                return Err(refuse(if level[point] > index {
                    format!("layer {index}: point {point} is listed twice")
                } else {
                    format!(
                        "layer {index}: point {point} is missing from layer {}",
                        index - 1
                    )
                }));
            }
            level[point] = index + 1;
        }
        if index == 0 && layer.len() != n {
            return Err(refuse(format!(
                "layer 0 lists {} of the {n} points; it must list all",
                layer.len()
            )));
        }
        let mut lists = Vec::with_capacity(layer.len());
        for (point, neighbours) in layer {
            let mut clean = Vec::with_capacity(neighbours.len());
            for &neighbour in neighbours {
                if neighbour as usize >= n {
                    return Err(refuse(format!(
                        "layer {index}, point {point}: neighbour {neighbour} is not below the point count {n}"
                    )));
                }
                if level[neighbour as usize] <= index {
                    return Err(refuse(format!(
                        "layer {index}, point {point}: neighbour {neighbour} is not a member of the layer"
                    )));
                }
                if neighbour != *point {
                    clean.push(neighbour);
                }
            }
            clean.sort_unstable();
            clean.dedup();
            lists.push((*point, clean));
        }
        layers.push(lists);
    }
    let top = graph.layers.len();
    let entry = graph.entry_point as usize;
    if entry >= n || level[entry] != top {
        return Err(refuse(format!(
            "entry point {entry} is not a member of the top layer {}",
            top - 1
        )));
    }
    Ok(layers)
}

/// Appends `row` as i8 with one symmetric scale (largest magnitude -> 127) and returns the
/// scale.
fn quantize(row: &[f32], out: &mut Vec<u8>) -> f32 {
    let largest = row.iter().fold(0.0_f32, |m, v| m.max(v.abs()));
    let scale = largest / 127.0;
    out.extend(row.iter().map(|&v| {
        let q = if scale > 0.0 {
            (v / scale).round().clamp(-127.0, 127.0)
        } else {
            0.0
        };
        (q as i8) as u8
    }));
    scale
}

/// Parts below this size are left in input order: the bytes saved no longer pay for the
/// passes.
const LEAF: usize = 16;
const POWER_ITERATIONS: usize = 3;

/// Reorders `order` (old positions; new position -> old position) so that points near in
/// space are near in position: split in halves at the median of the projection on the
/// principal direction, recursively. Deterministic: no randomness, ties broken by position.
/// `projection` is scratch, one value per point of the whole shard.
fn locality_order(vectors: &[f32], dim: usize, order: &mut [u32], projection: &mut [f32]) {
    let row = |p: u32| &vectors[p as usize * dim..][..dim];
    let mut pending = vec![(0, order.len())];
    while let Some((start, end)) = pending.pop() {
        if end - start <= LEAF {
            continue;
        }
        let part = &mut order[start..end];
        let direction = principal_direction(part, dim, row);
        for &p in part.iter() {
            projection[p as usize] = dot(row(p), &direction);
        }
        let middle = part.len() / 2;
        part.select_nth_unstable_by(middle, |&a, &b| {
            projection[a as usize]
                .total_cmp(&projection[b as usize])
                .then(a.cmp(&b))
        });
        pending.push((start + middle, end));
        pending.push((start, start + middle));
    }
}

/// An approximation of the top eigenvector of the part's covariance by power iteration,
/// started from the point farthest from the mean (a cheap guess at the long axis).
fn principal_direction<'a>(part: &[u32], dim: usize, row: impl Fn(u32) -> &'a [f32]) -> Vec<f32> {
    let mut mean = vec![0.0_f32; dim];
    for &p in part {
        for (m, v) in mean.iter_mut().zip(row(p)) {
            *m += v;
        }
    }
    let inverse = 1.0 / part.len() as f32;
    mean.iter_mut().for_each(|m| *m *= inverse);
    let centred_norm = |p: u32| {
        row(p)
            .iter()
            .zip(&mean)
            .map(|(v, m)| (v - m) * (v - m))
            .sum::<f32>()
    };
    let farthest = part
        .iter()
        .copied()
        .max_by(|&a, &b| centred_norm(a).total_cmp(&centred_norm(b)))
        .unwrap_or(0);
    let mut direction: Vec<f32> = row(farthest)
        .iter()
        .zip(&mean)
        .map(|(v, m)| v - m)
        .collect();
    let mut next = vec![0.0_f32; dim];
    for _ in 0..POWER_ITERATIONS {
        next.fill(0.0);
        for &p in part {
            let weight: f32 = row(p)
                .iter()
                .zip(&mean)
                .zip(&direction)
                .map(|((v, m), d)| (v - m) * d)
                .sum();
            for ((x, v), m) in next.iter_mut().zip(row(p)).zip(&mean) {
                *x += weight * (v - m);
            }
        }
        let norm = dot(&next, &next).sqrt();
        if norm == 0.0 || !norm.is_finite() {
            // All points coincide: any split is as good as another.
            break;
        }
        direction
            .iter_mut()
            .zip(&next)
            .for_each(|(d, x)| *d = x / norm);
    }
    direction
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The shard's content in final positions, ready to encode.
pub(super) struct Parts {
    pub(super) dim: usize,
    pub(super) ids: Vec<u64>,
    pub(super) scales: Vec<f32>,
    pub(super) quantized: Vec<u8>,
    /// Members sorted ascending, lists sorted ascending.
    pub(super) layers: Vec<LayerLists>,
    pub(super) entry_point: u32,
    pub(super) search_ef: u32,
}

/// Lays out `parts` in the current format without checking them, so that tests can make
/// shards whose only flaw is the one under test.
pub(super) fn encode(parts: &Parts) -> Vec<u8> {
    encode_version(parts, SHARD_FORMAT_VERSION)
}

/// [`encode`] in format `version` (1 or 2), so that tests can check older shards still
/// open.
pub(super) fn encode_version(parts: &Parts, version: u32) -> Vec<u8> {
    let mut list_offsets = Vec::new();
    let blobs: Vec<Vec<u8>> = parts
        .layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let mut blob = Vec::new();
            let mut previous: Option<u32> = None;
            for (point, neighbours) in layer {
                if index > 0 {
                    let gap = match previous {
                        None => *point,
                        Some(previous) => point.wrapping_sub(previous).wrapping_sub(1),
                    };
                    put_varint(&mut blob, gap);
                } else {
                    list_offsets.push(blob.len() as u32);
                }
                put_list(&mut blob, *point, neighbours);
                previous = Some(*point);
            }
            if index == 0 {
                list_offsets.push(blob.len() as u32);
            }
            blob
        })
        .collect();
    // One offset per point and the end, whatever layer 0 holds, so that a test's flawed
    // layer 0 meets the check meant for it rather than a misplaced section.
    let end = list_offsets.last().copied().unwrap_or_default();
    list_offsets.resize(parts.ids.len() + 1, end);
    let mut id_order: Vec<u32> = (0..parts.ids.len() as u32).collect();
    id_order.sort_unstable_by_key(|&position| parts.ids[position as usize]);
    let derived_sections = version >= 2;

    let header_len = if derived_sections {
        HEADER_LEN
    } else {
        V1_HEADER_LEN
    };
    let ids_offset = header_len;
    let scales_offset = ids_offset + parts.ids.len() * 8;
    let vectors_offset = scales_offset + parts.scales.len() * 4;
    let order_offset = vectors_offset + parts.quantized.len();
    let list_offsets_offset = order_offset + id_order.len() * 4;
    let table_offset = if derived_sections {
        list_offsets_offset + list_offsets.len() * 4
    } else {
        vectors_offset + parts.quantized.len()
    };
    let mut blob_offset = table_offset + parts.layers.len() * LAYER_ENTRY_LEN;

    let mut out = Vec::with_capacity(blob_offset + blobs.iter().map(Vec::len).sum::<usize>() + 8);
    out.extend_from_slice(&SHARD_MAGIC);
    for value in [
        version,
        parts.dim as u32,
        parts.ids.len() as u32,
        parts.layers.len() as u32,
        parts.entry_point,
        parts.search_ef,
    ] {
        out.extend_from_slice(&value.to_le_bytes());
    }
    for offset in [ids_offset, scales_offset, vectors_offset, table_offset] {
        out.extend_from_slice(&(offset as u64).to_le_bytes());
    }
    if derived_sections {
        for offset in [order_offset, list_offsets_offset] {
            out.extend_from_slice(&(offset as u64).to_le_bytes());
        }
    }
    debug_assert_eq!(out.len(), header_len);
    for id in &parts.ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for scale in &parts.scales {
        out.extend_from_slice(&scale.to_le_bytes());
    }
    out.extend_from_slice(&parts.quantized);
    if derived_sections {
        for value in id_order.iter().chain(&list_offsets) {
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
    for (layer, blob) in parts.layers.iter().zip(&blobs) {
        out.extend_from_slice(&(layer.len() as u32).to_le_bytes());
        out.extend_from_slice(&(blob_offset as u64).to_le_bytes());
        out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
        blob_offset += blob.len();
    }
    for blob in &blobs {
        out.extend_from_slice(blob);
    }
    seal(&mut out);
    out
}

/// Appends the checksum of everything so far.
pub(super) fn seal(out: &mut Vec<u8>) {
    let checksum = xxh3_64(out);
    out.extend_from_slice(&checksum.to_le_bytes());
}
