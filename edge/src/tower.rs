//! The user tower's inputs: how a viewer (known or anonymous) and their watch history
//! become the tensors of the user tower. Training builds its examples with
//! [`encode_user`] and serving calls the same function, so the tower never sees features
//! computed two ways.
//!
//! The tensor signature (batch `B`, history length `H` from [`UserTowerSpec`]), which a
//! tower trained elsewhere must accept to be served:
//!
//! | input | type | shape | meaning |
//! | --- | --- | --- | --- |
//! | `history_videos` | i64 | [B, H] | video-id vocabulary rows of the last H positives, newest first, 0-padded |
//! | `history_categories` | i64 | [B, H] | category vocabulary rows of the same videos |
//! | `history_weights` | f32 | [B, H] | recency weights, summing to 1 (all 0 without history) |
//! | `country` | i64 | [B] | country vocabulary row |
//! | `language` | i64 | [B] | language vocabulary row (shared with videos) |
//! | `age_bucket` | i64 | [B] | age bucket, or the extra last bucket when unknown |
//! | `user` | i64 | [B] | user-id vocabulary row; 0 (an OOV bucket) for anonymous viewers |
//! | `dense` | f32 | [B, 1] | age z-score (0 when unknown) |
//!
//! Output `embedding`: f32 [B, D], L2-normalised.
//!
//! A bundle may carry the tower with its large embedding tables cut out of the graph
//! ([`TowerTables`], the `tower_tables` section): each `Gather` of such a table by one of
//! the inputs above became a graph input of its own, which [`UserTower::embed`] fills
//! with the rows it reads from the section where it lies. The graph then computes the
//! same values with the same ops, but a cold start no longer has tract read, copy and
//! keep megabytes of table that a request reads a few dozen rows of.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::preprocess::Preprocessor;

/// What the exported user tower was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserTowerSpec {
    /// History length H.
    pub history_length: usize,
    /// Weight of the n-th most recent video is `recency_decay^n`, before normalising.
    pub recency_decay: f32,
    /// Output dimension D.
    pub output_dim: usize,
}

impl UserTowerSpec {
    /// The bundle section's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a tower spec always serializes")
    }

    /// Decodes the bundle section; refuses a spec no tower can have.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::Error> {
        let invalid = |reason: String| crate::Error::InvalidBundle {
            section: Some("tower_spec"),
            reason: format!("is invalid: {reason}"),
        };
        let spec: Self = rmp_serde::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if spec.history_length == 0 || spec.output_dim == 0 || !spec.recency_decay.is_finite() {
            return Err(invalid(format!("{spec:?}")));
        }
        Ok(spec)
    }
}

/// A viewer as serving knows them: everything may be missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Viewer {
    /// Known id, if any.
    pub user_id: Option<u64>,
    /// Country code.
    pub country: Option<String>,
    /// Language code.
    pub language: Option<String>,
    /// Age in years.
    pub age: Option<u8>,
}

/// One viewer's user-tower inputs (one row of each tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct UserTowerInput {
    /// See the module table.
    pub history_videos: Vec<i64>,
    /// See the module table.
    pub history_categories: Vec<i64>,
    /// See the module table.
    pub history_weights: Vec<f32>,
    /// See the module table.
    pub country: i64,
    /// See the module table.
    pub language: i64,
    /// See the module table.
    pub age_bucket: i64,
    /// See the module table.
    pub user: i64,
    /// See the module table.
    pub dense: [f32; 1],
}

/// Rows of the age-bucket table: the buckets plus one for "unknown".
pub fn age_bucket_rows(preprocessor: &Preprocessor) -> usize {
    preprocessor.age.buckets.len() + 1
}

/// Encodes `viewer` with `history` (video ids, oldest first; only the last
/// `spec.history_length` count). `category_of` gives a video's category, when known.
pub fn encode_user<'c>(
    preprocessor: &Preprocessor,
    spec: &UserTowerSpec,
    viewer: &Viewer,
    history: &[u64],
    category_of: impl Fn(u64) -> Option<&'c str>,
) -> UserTowerInput {
    let length = spec.history_length;
    let mut input = UserTowerInput {
        history_videos: vec![0; length],
        history_categories: vec![0; length],
        history_weights: vec![0.0; length],
        country: viewer
            .country
            .as_deref()
            .map_or(0, |c| preprocessor.countries.index(c)) as i64,
        language: viewer
            .language
            .as_deref()
            .map_or(0, |l| preprocessor.languages.index(l)) as i64,
        age_bucket: viewer
            .age
            .map_or(preprocessor.age.buckets.len() as u32, |age| {
                preprocessor.age.bucket(f64::from(age))
            }) as i64,
        user: viewer
            .user_id
            .and_then(|id| preprocessor.user_ids.known_index(&id))
            .unwrap_or(0) as i64,
        dense: [viewer
            .age
            .map_or(0.0, |age| preprocessor.age.scaled(f64::from(age)))],
    };
    let mut total = 0.0;
    let mut weight = 1.0f32;
    for (slot, &video) in history.iter().rev().take(length).enumerate() {
        input.history_videos[slot] = i64::from(preprocessor.video_ids.index(&video));
        input.history_categories[slot] =
            category_of(video).map_or(0, |c| preprocessor.categories.index(c)) as i64;
        input.history_weights[slot] = weight;
        total += weight;
        weight *= spec.recency_decay;
    }
    if total > 0.0 {
        input.history_weights.iter_mut().for_each(|w| *w /= total);
    }
    input
}

/// Version of the `tower_tables` section this build reads and writes.
pub const TOWER_TABLES_FORMAT_VERSION: u32 = 1;

/// The inputs of the signature above that pick table rows, i.e. that a cut-out table may
/// be indexed by.
pub const INDEX_INPUTS: [&str; 6] = [
    "history_videos",
    "history_categories",
    "country",
    "language",
    "age_bucket",
    "user",
];

/// How a cut-out table's values are stored (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableElement {
    /// Signed bytes.
    I8,
    /// 32-bit floats.
    F32,
}

impl TableElement {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::F32 => 4,
        }
    }
}

/// An embedding table cut out of the tower's graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableLayout {
    /// The tower input whose values pick the rows (one of [`INDEX_INPUTS`]).
    pub indices: String,
    /// The graph input that takes the gathered rows: the indices' shape followed by
    /// `row_shape`.
    pub gathered: String,
    /// How the values are stored.
    pub element: TableElement,
    /// Number of rows.
    pub rows: u64,
    /// The shape of one row.
    pub row_shape: Vec<u64>,
    /// Where the table starts in the section's payload, in bytes.
    pub offset: u64,
}

impl TableLayout {
    /// Values per row.
    fn row_values(&self) -> Option<usize> {
        self.row_shape.iter().try_fold(1usize, |product, &d| {
            product.checked_mul(usize::try_from(d).ok()?)
        })
    }

    /// The table's bytes in the payload, if they fit.
    fn byte_range(&self, payload_len: usize) -> Option<std::ops::Range<usize>> {
        let row_bytes = self.row_values()?.checked_mul(self.element.size())?;
        let length = row_bytes.checked_mul(usize::try_from(self.rows).ok()?)?;
        let start = usize::try_from(self.offset).ok()?;
        let end = start.checked_add(length)?;
        (end <= payload_len).then_some(start..end)
    }
}

/// The section's encoding: the tables' bytes are one MessagePack `bin`, which decoding
/// borrows, so that serving reads them where they lie in the bundle.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredTables<'a> {
    format_version: u32,
    tables: Vec<TableLayout>,
    #[serde(borrow, serialize_with = "as_bin")]
    payload: &'a [u8],
}

fn as_bin<S: serde::Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// The tower's cut-out tables: their layouts and all their bytes, which serving reads in
/// place.
#[derive(Debug, Clone)]
pub struct TowerTables {
    layouts: Vec<TableLayout>,
    payload: Bytes,
}

fn tables_error(reason: impl std::fmt::Display) -> crate::Error {
    crate::Error::InvalidBundle {
        section: Some("tower_tables"),
        reason: reason.to_string(),
    }
}

impl TowerTables {
    /// Tables laid out in `payload` as `layouts` say; refuses layouts that overrun the
    /// payload, name an input that picks no rows, or repeat a graph input.
    pub fn new(layouts: Vec<TableLayout>, payload: impl Into<Bytes>) -> Result<Self, crate::Error> {
        let payload = payload.into();
        let mut gathered = std::collections::BTreeSet::new();
        for layout in &layouts {
            if !INDEX_INPUTS.contains(&layout.indices.as_str()) {
                return Err(tables_error(format!(
                    "indexes table {:?} by {:?}, which is not a tower input that picks rows",
                    layout.gathered, layout.indices
                )));
            }
            if layout.byte_range(payload.len()).is_none() {
                return Err(tables_error(format!(
                    "places table {:?} ({} rows of {:?} {:?} from byte {}) beyond its {} bytes of tables",
                    layout.gathered,
                    layout.rows,
                    layout.row_shape,
                    layout.element,
                    layout.offset,
                    payload.len()
                )));
            }
            if !gathered.insert(layout.gathered.as_str()) {
                return Err(tables_error(format!(
                    "feeds the graph input {:?} from two tables",
                    layout.gathered
                )));
            }
        }
        Ok(Self { layouts, payload })
    }

    /// The tables, in the order of the graph inputs they feed.
    pub fn layouts(&self) -> &[TableLayout] {
        &self.layouts
    }

    /// The section's bytes: MessagePack of the format version, the layouts and the
    /// tables' bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(&StoredTables {
            format_version: TOWER_TABLES_FORMAT_VERSION,
            tables: self.layouts.clone(),
            payload: &self.payload,
        })
        .expect("tables always serialize")
    }

    /// Reads the section `section`, keeping the tables where they lie in it.
    pub fn from_section(section: Bytes) -> Result<Self, crate::Error> {
        let stored: StoredTables<'_> = crate::decode_versioned(
            &section,
            "tower_tables",
            TOWER_TABLES_FORMAT_VERSION,
            |stored: &StoredTables<'_>| stored.format_version,
        )?;
        Self::new(stored.tables, section.slice_ref(stored.payload))
    }

    /// The rows of `layout` picked by `indices`, as a tensor of `shape` + the row shape.
    fn gather(
        &self,
        layout: &TableLayout,
        shape: &[usize],
        indices: &[i64],
    ) -> Result<tract_onnx::prelude::Tensor, crate::Error> {
        use tract_onnx::prelude::Tensor;
        let range = layout
            .byte_range(self.payload.len())
            .expect("checked when the tables were read");
        let table = &self.payload[range];
        let row_values = layout
            .row_values()
            .expect("checked when the tables were read");
        let row_bytes = row_values * layout.element.size();
        let mut full_shape = shape.to_vec();
        full_shape.extend(layout.row_shape.iter().map(|&d| d as usize));
        let rows = indices
            .iter()
            .map(|&index| {
                usize::try_from(index)
                    .ok()
                    .filter(|&row| (row as u64) < layout.rows)
                    .map(|row| &table[row * row_bytes..(row + 1) * row_bytes])
                    .ok_or_else(|| {
                        tower_error(
                            "input",
                            format!(
                                "{} row {index} is outside table {:?} of {} rows",
                                layout.indices, layout.gathered, layout.rows
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<&[u8]>, _>>()?;
        let tensor = match layout.element {
            TableElement::I8 => {
                let values: Vec<i8> = rows
                    .iter()
                    .flat_map(|row| row.iter().map(|&b| b as i8))
                    .collect();
                Tensor::from_shape(&full_shape, &values)
            }
            TableElement::F32 => {
                let values: Vec<f32> = rows
                    .iter()
                    .flat_map(|row| row.chunks_exact(4))
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Tensor::from_shape(&full_shape, &values)
            }
        };
        tensor.map_err(|e| tower_error("input", e))
    }
}

/// The user tower, parsed and optimised once (at bundle load) and then only run.
pub struct UserTower {
    model: std::sync::Arc<tract_onnx::prelude::TypedRunnableModel>,
    spec: UserTowerSpec,
    tables: Option<TowerTables>,
}

impl std::fmt::Debug for UserTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTower")
            .field("spec", &self.spec)
            .finish()
    }
}

/// Inputs of the tensor signature in the module table.
const SIGNATURE_INPUTS: usize = 8;

fn tower_error(stage: &str, error: impl std::fmt::Display) -> crate::Error {
    crate::Error::Decode {
        artifact: "user tower",
        message: format!("{stage}: {error}"),
    }
}

impl UserTower {
    /// Parses the ONNX bytes and optimises the graph for one viewer per run ([`UserTower::embed`]
    /// runs a batch row by row).
    pub fn load(bytes: &[u8], spec: UserTowerSpec) -> Result<Self, crate::Error> {
        Self::load_with_tables(bytes, None, spec)
    }

    /// [`UserTower::load`] for a graph whose tables `tables` holds: its inputs must be
    /// the signature's eight followed by one per table, in the tables' order.
    pub fn load_with_tables(
        bytes: &[u8],
        tables: Option<TowerTables>,
        spec: UserTowerSpec,
    ) -> Result<Self, crate::Error> {
        use tract_onnx::prelude::*;
        let typed = onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| tower_error("not an ONNX model tract can read", e))?
            .into_typed()
            .map_err(|e| tower_error("cannot type", e))?;
        // Serving embeds one viewer per call. A batch fixed at 1 spares the optimiser
        // its symbolic shape arithmetic (1.2 of 10 ms of the bench tower's load);
        // larger batches run row by row.
        // tract's `set_symbols` takes a HashMap; nothing here is serialized.
        #[allow(clippy::disallowed_types)]
        let mut batch = std::collections::HashMap::new();
        for outlet in typed
            .input_outlets()
            .map_err(|e| tower_error("inputs", e))?
        {
            let fact = typed
                .outlet_fact(*outlet)
                .map_err(|e| tower_error("inputs", e))?;
            if let Some(first) = fact.shape.iter().next() {
                for symbol in first.symbols() {
                    batch.insert(symbol, TDim::Val(1));
                }
            }
        }
        let mut typed = typed
            .set_symbols(&batch)
            .map_err(|e| tower_error("cannot fix the batch at 1", e))?;
        // Code generation alone, without tract's whole-graph declutter passes first
        // (`into_optimized` runs both): on the bench's tower (64 nodes) declutter took
        // 4.3 of a 7.5 ms optimisation, and the plan it led to ran slower (54 against
        // 40 us a call). Every pass keeps the graph's meaning; code generation still
        // declutters op by op.
        typed
            .optimize()
            .map_err(|e| tower_error("cannot optimise", e))?;
        let model = typed
            .into_runnable()
            .map_err(|e| tower_error("cannot plan", e))?;
        let graph = model.model();
        let input_names: Vec<&str> = graph
            .input_outlets()
            .map_err(|e| tower_error("inputs", e))?
            .iter()
            .map(|outlet| graph.node(outlet.node).name.as_str())
            .collect();
        let table_inputs: Vec<&str> = tables
            .iter()
            .flat_map(|t| t.layouts.iter().map(|l| l.gathered.as_str()))
            .collect();
        if input_names.len() != SIGNATURE_INPUTS + table_inputs.len()
            || input_names[SIGNATURE_INPUTS.min(input_names.len())..] != table_inputs[..]
        {
            return Err(tower_error(
                "inputs",
                format!(
                    "the graph takes {input_names:?}; expected the {SIGNATURE_INPUTS} of the \
                     signature followed by the tables' {table_inputs:?}"
                ),
            ));
        }
        Ok(Self {
            model,
            spec,
            tables,
        })
    }

    /// What the tower was trained with.
    pub fn spec(&self) -> &UserTowerSpec {
        &self.spec
    }

    /// The embeddings of `inputs`, row-major (`inputs.len() * spec.output_dim` values).
    pub fn embed(&self, inputs: &[UserTowerInput]) -> Result<Vec<f32>, crate::Error> {
        let h = self.spec.history_length;
        if let Some(bad) = inputs.iter().position(|i| {
            i.history_videos.len() != h
                || i.history_categories.len() != h
                || i.history_weights.len() != h
        }) {
            return Err(tower_error(
                "input",
                format!("row {bad} does not have a history of {h}"),
            ));
        }
        let mut embeddings = Vec::with_capacity(inputs.len() * self.spec.output_dim);
        for input in inputs {
            embeddings.extend(self.embed_one(input)?);
        }
        Ok(embeddings)
    }

    /// One viewer's embedding: the graph's batch is fixed at 1 (see `load_with_tables`).
    fn embed_one(&self, input: &UserTowerInput) -> Result<Vec<f32>, crate::Error> {
        use tract_onnx::prelude::*;
        let n = 1;
        let history = [n, self.spec.history_length];
        let scalar = [n];
        // An index input's values and shape: [B, H] for the histories, [B] otherwise.
        let index_input = |name: &str| -> (&[i64], &[usize]) {
            match name {
                "history_videos" => (&input.history_videos, &history),
                "history_categories" => (&input.history_categories, &history),
                "country" => (std::slice::from_ref(&input.country), &scalar),
                "language" => (std::slice::from_ref(&input.language), &scalar),
                "age_bucket" => (std::slice::from_ref(&input.age_bucket), &scalar),
                "user" => (std::slice::from_ref(&input.user), &scalar),
                other => unreachable!("not an index input: {other:?}"),
            }
        };
        let index_tensor = |name: &str| -> Result<TValue, crate::Error> {
            let (values, shape) = index_input(name);
            Ok(Tensor::from_shape(shape, values)
                .map_err(|e| tower_error("input", e))?
                .into())
        };
        let mut tensors: TVec<TValue> = tvec![
            index_tensor("history_videos")?,
            index_tensor("history_categories")?,
            Tensor::from_shape(&history, &input.history_weights)
                .map_err(|e| tower_error("input", e))?
                .into(),
            index_tensor("country")?,
            index_tensor("language")?,
            index_tensor("age_bucket")?,
            index_tensor("user")?,
            Tensor::from_shape(&[n, 1], &input.dense)
                .map_err(|e| tower_error("input", e))?
                .into(),
        ];
        if let Some(tables) = &self.tables {
            for layout in &tables.layouts {
                // `TowerTables::new` admits only `INDEX_INPUTS`.
                let (indices, shape) = index_input(&layout.indices);
                tensors.push(tables.gather(layout, shape, indices)?.into());
            }
        }
        let outputs = self.model.run(tensors).map_err(|e| tower_error("run", e))?;
        let view = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| tower_error("output", e))?;
        if view.shape() != [n, self.spec.output_dim] {
            return Err(tower_error(
                "output",
                format!(
                    "shape {:?}, expected [{n}, {}]",
                    view.shape(),
                    self.spec.output_dim
                ),
            ));
        }
        Ok(view.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{FitInput, PreprocessConfig};
    use crate::{
        Channel, ContentRating, EngagementRules, Interaction, InteractionType, User, Video,
    };

    fn preprocessor() -> Preprocessor {
        let users = vec![User {
            user_id: 7,
            country: "US".into(),
            language: "en".into(),
            age: 30,
            gender: None,
            occupation: None,
        }];
        let videos: Vec<Video> = (1..=3)
            .map(|video_id| Video {
                video_id,
                title: String::new(),
                category: format!("c{video_id}"),
                child_categories: vec![],
                channel_id: 0,
                duration_seconds: 60,
                tags: vec![],
                language: "en".into(),
                upload_time: None,
                view_count: 0,
                like_count: 0,
                comment_count: 0,
                content_rating: ContentRating::General,
                regions: vec![],
            })
            .collect();
        let train: Vec<Interaction> = (1..=3)
            .map(|video_id| Interaction {
                user_id: 7,
                video_id,
                timestamp: video_id as i64,
                interaction_type: InteractionType::Like,
                watch_seconds: None,
                device: "tv".into(),
            })
            .collect();
        let channels = vec![Channel {
            channel_id: 0,
            subscriber_count: 1,
        }];
        Preprocessor::fit(
            FitInput {
                users: &users,
                videos: &videos,
                channels: &channels,
                train: &train,
            },
            &PreprocessConfig::default(),
            &EngagementRules::default(),
        )
        .unwrap()
    }

    const SPEC: UserTowerSpec = UserTowerSpec {
        history_length: 2,
        recency_decay: 0.5,
        output_dim: 4,
    };

    fn layout(indices: &str, gathered: &str, rows: u64, offset: u64) -> TableLayout {
        TableLayout {
            indices: indices.into(),
            gathered: gathered.into(),
            element: TableElement::F32,
            rows,
            row_shape: vec![2],
            offset,
        }
    }

    #[test]
    fn tables_that_do_not_fit_their_bytes_or_the_signature_are_refused() {
        // Two tables of 3 rows of two f32: 24 bytes each.
        let payload = vec![0u8; 48];
        let good = vec![
            layout("user", "u", 3, 0),
            layout("history_videos", "h", 3, 24),
        ];
        let tables = TowerTables::new(good.clone(), payload.clone()).unwrap();
        let read = TowerTables::from_section(tables.to_bytes().into()).unwrap();
        assert_eq!(read.layouts(), &good[..]);
        let refused = |layouts: Vec<TableLayout>| {
            TowerTables::new(layouts, payload.clone())
                .unwrap_err()
                .to_string()
        };
        let overrun = refused(vec![layout("user", "u", 3, 25)]);
        assert!(overrun.contains("beyond its 48 bytes"), "{overrun}");
        let huge = refused(vec![layout("user", "u", u64::MAX, 0)]);
        assert!(huge.contains("beyond"), "{huge}");
        let not_an_index = refused(vec![layout("dense", "d", 1, 0)]);
        assert!(not_an_index.contains("not a tower input"), "{not_an_index}");
        let twice = refused(vec![
            layout("user", "u", 1, 0),
            layout("country", "u", 1, 0),
        ]);
        assert!(twice.contains("from two tables"), "{twice}");
        assert!(
            twice.starts_with("invalid bundle: section `tower_tables`"),
            "{twice}"
        );
    }

    #[test]
    fn newest_first_with_normalised_recency_weights() {
        let pre = preprocessor();
        let viewer = Viewer {
            user_id: Some(7),
            country: Some("US".into()),
            language: Some("en".into()),
            age: Some(30),
        };
        let category = |v: u64| Some(["c1", "c2", "c3"][v as usize - 1]);
        let input = encode_user(&pre, &SPEC, &viewer, &[1, 2, 3], category);
        assert_eq!(
            input.history_videos,
            vec![
                i64::from(pre.video_ids.index(&3)),
                i64::from(pre.video_ids.index(&2))
            ]
        );
        assert_eq!(
            input.history_categories[0],
            i64::from(pre.categories.index("c3"))
        );
        assert_eq!(input.history_weights, vec![2.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(input.user, i64::from(pre.user_ids.index(&7)));
        assert!(input.user > 0);
        assert_eq!(input.dense, [0.0], "the only training age is the mean");
    }

    #[test]
    fn anonymous_viewer_without_history() {
        let pre = preprocessor();
        let input = encode_user(&pre, &SPEC, &Viewer::default(), &[], |_| None);
        assert_eq!(input.history_weights, vec![0.0, 0.0]);
        assert_eq!(input.user, 0);
        assert_eq!(input.age_bucket as usize, age_bucket_rows(&pre) - 1);
        let unknown = encode_user(
            &pre,
            &SPEC,
            &Viewer {
                user_id: Some(999),
                ..Viewer::default()
            },
            &[42],
            |_| None,
        );
        assert_eq!(unknown.user, 0, "unknown ids get no personal term");
        assert_eq!(unknown.history_videos[0], 0, "unknown video: the OOV row");
    }
}
