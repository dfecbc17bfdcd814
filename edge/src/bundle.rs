//! The bundle: everything the edge serves from, in one immutable file.
//!
//! The file is one MessagePack array, so any MessagePack reader can take it apart:
//!
//! ```text
//! [ "edgerec-bundle", header, section_0, section_1, ... ]
//! ```
//!
//! `header` is a map ([`BundleHeader`]: format version, model version, creation time,
//! lineage, and for each section in file order its kind, length, sha256 and xxh3); each
//! section is a MessagePack `bin` holding that section's own format (the user tower's
//! ONNX, the shard, the ranker's CatBoost JSON, ...). The header comes first and lists
//! every length, so a reader knows what to expect before it reads a section: a truncated
//! or corrupted bundle is refused with an error that names the section, and a reader
//! that only needs the header (a registry listing bundles) stops after it.
//!
//! [`BundleView::parse`] borrows the sections from the caller's buffer: a 100 MB shard is
//! not copied to be verified.
//!
//! Two hashes per section, for two jobs. Loading checks every section's xxh3-64: it
//! catches truncation and corruption as surely as sha256 does, at memory speed where
//! sha256 is the largest cost of a cold start in wasm (no SHA instructions there: about
//! 200 MB/s, so 100 ms for a 20 MB bundle against an edge worker's 50 ms budget). The
//! sha256s are for what must resist forgery, which a hash in the same file cannot give:
//! a store or registry addressing sections, and [`BundleView::verify_sha256`]. Whole
//! bundles are addressed by the sha256 of their bytes, which the host checks on fetch.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64;

use crate::Error;

/// The first element of every bundle.
pub const BUNDLE_MAGIC: &str = "edgerec-bundle";

/// The container version this build writes and reads.
pub const BUNDLE_FORMAT_VERSION: u32 = 2;

/// What a section holds. Names are the snake_case of the variants, in headers and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    /// The user tower as ONNX.
    UserTower,
    /// The embedding tables cut out of the user tower's graph (`tower::TowerTables`);
    /// optional, and without it the tower's graph holds all its tables.
    TowerTables,
    /// What the user tower was trained with (`tower::UserTowerSpec`, MessagePack):
    /// history length, recency decay, output dimension.
    TowerSpec,
    /// The HNSW shard of video embeddings (`crate::shard`'s format).
    Shard,
    /// The ranker in CatBoost's JSON format.
    Ranker,
    /// The fitted preprocessing artifacts (`Preprocessor::to_bytes`).
    Preprocessor,
    /// The per-video metadata that filters, features and ordering read.
    Videos,
    /// The business rules: filters, diversity, freshness, promotions.
    Rules,
    /// The experiments and their traffic splits.
    Experiments,
}

impl SectionKind {
    /// Every kind, in the order the builder writes them.
    pub const ALL: [Self; 9] = [
        Self::UserTower,
        Self::TowerTables,
        Self::TowerSpec,
        Self::Shard,
        Self::Ranker,
        Self::Preprocessor,
        Self::Videos,
        Self::Rules,
        Self::Experiments,
    ];

    /// The name used in headers and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::UserTower => "user_tower",
            Self::TowerTables => "tower_tables",
            Self::TowerSpec => "tower_spec",
            Self::Shard => "shard",
            Self::Ranker => "ranker",
            Self::Preprocessor => "preprocessor",
            Self::Videos => "videos",
            Self::Rules => "rules",
            Self::Experiments => "experiments",
        }
    }
}

/// One section as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionEntry {
    /// What it holds.
    pub kind: SectionKind,
    /// Its length in bytes.
    pub length: u64,
    /// The sha256 of its bytes, lowercase hex.
    pub sha256: String,
    /// The xxh3-64 of its bytes (what loading checks).
    pub xxh3: u64,
}

/// The bundle's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleHeader {
    /// The container version ([`BUNDLE_FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// The version of the models inside, as the registry names it; responses carry it.
    pub model_version: String,
    /// Unix seconds when it was built (given by the builder: edge has no clock).
    pub created_at: i64,
    /// Where it came from: data version, config hash, code version, parent run, ...
    pub lineage: BTreeMap<String, String>,
    /// The sections, in file order.
    pub sections: Vec<SectionEntry>,
}

/// A bundle to write: header facts and the sections' bytes.
#[derive(Debug, Clone, Default)]
pub struct BundleBuilder {
    model_version: String,
    created_at: i64,
    lineage: BTreeMap<String, String>,
    sections: BTreeMap<SectionKind, Vec<u8>>,
}

/// Lowercase hex of the sha256 of `bytes`: how bundles and sections are addressed.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        // Writing into a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn invalid(section: Option<SectionKind>, reason: impl Into<String>) -> Error {
    Error::InvalidBundle {
        section: section.map(SectionKind::name),
        reason: reason.into(),
    }
}

impl BundleBuilder {
    /// A bundle of models of `model_version`, built at `created_at` (Unix seconds).
    pub fn new(model_version: impl Into<String>, created_at: i64) -> Self {
        Self {
            model_version: model_version.into(),
            created_at,
            ..Self::default()
        }
    }

    /// Records a lineage fact, e.g. `data_version`.
    pub fn lineage(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.lineage.insert(key.into(), value.into());
        self
    }

    /// Sets a section's bytes (replacing any earlier ones of that kind).
    pub fn section(mut self, kind: SectionKind, bytes: Vec<u8>) -> Self {
        self.sections.insert(kind, bytes);
        self
    }

    /// The bundle's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        if self.model_version.is_empty() {
            return Err(invalid(None, "the model version is empty"));
        }
        let header = BundleHeader {
            format_version: BUNDLE_FORMAT_VERSION,
            model_version: self.model_version.clone(),
            created_at: self.created_at,
            lineage: self.lineage.clone(),
            sections: self
                .sections
                .iter()
                .map(|(&kind, bytes)| SectionEntry {
                    kind,
                    length: bytes.len() as u64,
                    sha256: sha256_hex(bytes),
                    xxh3: xxh3_64(bytes),
                })
                .collect(),
        };
        let total: usize = self.sections.values().map(Vec::len).sum();
        let mut out = Vec::with_capacity(total + 4096);
        let encode = |e: rmp::encode::ValueWriteError| invalid(None, e.to_string());
        rmp::encode::write_array_len(&mut out, 2 + header.sections.len() as u32).map_err(encode)?;
        rmp::encode::write_str(&mut out, BUNDLE_MAGIC).map_err(encode)?;
        rmp_serde::encode::write_named(&mut out, &header)
            .map_err(|e| invalid(None, format!("cannot encode the header: {e}")))?;
        for (&kind, bytes) in &self.sections {
            let length = u32::try_from(bytes.len()).map_err(|_| {
                invalid(
                    Some(kind),
                    format!("{} bytes exceed MessagePack's 4 GiB limit", bytes.len()),
                )
            })?;
            rmp::encode::write_bin_len(&mut out, length).map_err(encode)?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

/// A verified bundle whose sections borrow the bytes it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleView<'a> {
    /// The header.
    pub header: BundleHeader,
    sections: BTreeMap<SectionKind, &'a [u8]>,
}

impl<'a> BundleView<'a> {
    /// Parses and verifies `bytes`: the magic, the format version, every section's length
    /// and xxh3, and that nothing follows the last section. Errors name the section.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut rest = bytes;
        let elements = rmp::decode::read_array_len(&mut rest)
            .map_err(|_| invalid(None, "not an edgerec bundle (not a MessagePack array)"))?;
        let mut magic = [0u8; BUNDLE_MAGIC.len()];
        let magic_ok = rmp::decode::read_str_len(&mut rest)
            .ok()
            .filter(|&len| len as usize == BUNDLE_MAGIC.len() && rest.len() >= magic.len())
            .map(|_| {
                magic.copy_from_slice(&rest[..BUNDLE_MAGIC.len()]);
                rest = &rest[BUNDLE_MAGIC.len()..];
                magic == BUNDLE_MAGIC.as_bytes()
            })
            .unwrap_or(false);
        if !magic_ok {
            return Err(invalid(
                None,
                format!("not an edgerec bundle (it does not start with {BUNDLE_MAGIC:?})"),
            ));
        }
        let header = Self::read_header(&mut rest)?;
        if elements as usize != 2 + header.sections.len() {
            return Err(invalid(
                None,
                format!(
                    "the header lists {} sections but the file has {} elements",
                    header.sections.len(),
                    elements
                ),
            ));
        }
        let mut sections = BTreeMap::new();
        for entry in &header.sections {
            let kind = Some(entry.kind);
            if sections.contains_key(&entry.kind) {
                return Err(invalid(kind, "appears twice"));
            }
            let length = rmp::decode::read_bin_len(&mut rest).map_err(|_| {
                invalid(
                    kind,
                    if rest.is_empty() {
                        "is missing: the bundle is truncated".to_owned()
                    } else {
                        "is not a MessagePack bin".to_owned()
                    },
                )
            })?;
            if u64::from(length) != entry.length {
                return Err(invalid(
                    kind,
                    format!("is {length} bytes, the header says {}", entry.length),
                ));
            }
            let length = length as usize;
            if rest.len() < length {
                return Err(invalid(
                    kind,
                    format!(
                        "is truncated: {} of its {length} bytes are present",
                        rest.len()
                    ),
                ));
            }
            let (body, after) = rest.split_at(length);
            if xxh3_64(body) != entry.xxh3 {
                return Err(invalid(
                    kind,
                    "is corrupted: its xxh3 does not match the header's",
                ));
            }
            sections.insert(entry.kind, body);
            rest = after;
        }
        if !rest.is_empty() {
            return Err(invalid(
                None,
                format!("{} unexpected bytes after the last section", rest.len()),
            ));
        }
        Ok(Self { header, sections })
    }

    fn read_header(rest: &mut &'a [u8]) -> Result<BundleHeader, Error> {
        // The format version is read on its own first: a newer header may have fields
        // this build does not know, and the version is what the error should say.
        let mut probe = *rest;
        let value: version_probe::Header = rmp_serde::decode::from_read(&mut probe)
            .map_err(|e| invalid(None, format!("unreadable header: {e}")))?;
        if value.format_version != BUNDLE_FORMAT_VERSION {
            return Err(Error::FormatVersion {
                artifact: "bundle",
                found: value.format_version,
                expected: BUNDLE_FORMAT_VERSION,
            });
        }
        let mut reader = *rest;
        let header: BundleHeader = rmp_serde::decode::from_read(&mut reader)
            .map_err(|e| invalid(None, format!("unreadable header: {e}")))?;
        *rest = reader;
        Ok(header)
    }

    /// Checks every section's sha256 against the header (for callers that hold the
    /// header's hashes from elsewhere, or must not trust xxh3 alone).
    pub fn verify_sha256(&self) -> Result<(), Error> {
        for entry in &self.header.sections {
            if self
                .sections
                .get(&entry.kind)
                .is_some_and(|body| sha256_hex(body) != entry.sha256)
            {
                return Err(invalid(
                    Some(entry.kind),
                    "is corrupted: its sha256 does not match the header's",
                ));
            }
        }
        Ok(())
    }

    /// A section's bytes, if the bundle has it.
    pub fn section(&self, kind: SectionKind) -> Option<&'a [u8]> {
        self.sections.get(&kind).copied()
    }

    /// A section's bytes, or an error naming the missing section.
    pub fn require(&self, kind: SectionKind) -> Result<&'a [u8], Error> {
        self.section(kind)
            .ok_or_else(|| invalid(Some(kind), "is missing from the bundle"))
    }
}

/// Reading only the version of a header, whatever else it holds.
mod version_probe {
    #[derive(serde::Deserialize)]
    pub(super) struct Header {
        pub(super) format_version: u32,
    }
}

#[cfg(test)]
mod tests;
