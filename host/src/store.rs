//! Where bundles come from: a manifest (`manifests/<channel>.json`) naming a
//! content-addressed bundle (`bundles/<sha256>.bundle`) in a store that is either a local
//! folder or an HTTP(S) URL (S3, a CDN in front of it, the control plane's store).
//!
//! The manifest is written last by the publisher, so the bundle it names is complete; the
//! host still checks the size and the sha256 of every byte it downloads before anything
//! sees them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this host reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// A manifest: what a channel serves now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The channel, e.g. `production`.
    pub channel: String,
    /// The model version inside the bundle.
    pub model_version: String,
    /// The bundle.
    pub bundle: Artifact,
    /// The viewers' profiles (demographics and recent history) for the host's online
    /// features, when the publisher built them.
    #[serde(default)]
    pub profiles: Option<Artifact>,
    /// Unix seconds of publication.
    pub published_at: i64,
    /// An experiment whose arms serve different bundles (`bundle` is the control's).
    #[serde(default)]
    pub experiment: Option<ManifestExperiment>,
}

/// An experiment in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestExperiment {
    /// Its name in responses.
    pub name: String,
    /// Mixed into the assignment hash.
    pub salt: String,
    /// The arms; the first is the control.
    pub variants: Vec<ManifestVariant>,
}

/// One arm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVariant {
    /// Its name.
    pub name: String,
    /// Its share of the traffic, relative to the others' weights.
    pub weight: u32,
    /// The model version of its bundle.
    pub model_version: String,
    /// Its bundle.
    pub bundle: Artifact,
}

/// A content-addressed file in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Its key under the store's root, `<folder>/<sha256>.<extension>`.
    pub key: String,
    /// Lowercase hex sha256 of its bytes.
    pub sha256: String,
    /// Its length in bytes.
    pub size: u64,
}

impl Manifest {
    /// Parses and checks a manifest; keys that could leave the store are refused.
    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).context("the manifest is not valid JSON of format 1")?;
        ensure!(
            manifest.format == MANIFEST_FORMAT,
            "manifest format {} (this host reads {MANIFEST_FORMAT})",
            manifest.format
        );
        manifest.bundle.check("bundle")?;
        if let Some(profiles) = &manifest.profiles {
            profiles.check("profiles")?;
        }
        if let Some(experiment) = &manifest.experiment {
            ensure!(
                !experiment.variants.is_empty() && experiment.variants.iter().any(|v| v.weight > 0),
                "experiment {}: no variant with a positive weight",
                experiment.name
            );
            for variant in &experiment.variants {
                variant.bundle.check(&format!(
                    "experiment {} variant {}",
                    experiment.name, variant.name
                ))?;
            }
        }
        Ok(manifest)
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Artifact {
    /// Checks that the key is `<folder>/<sha256>.<ext>` with this artifact's hash, so a
    /// manifest cannot point outside the store or at a file other than the one it hashes.
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        ensure!(
            is_sha256_hex(&self.sha256),
            "{what}: sha256 {:?} is not 64 lowercase hex digits",
            self.sha256
        );
        let valid = self.key.split_once('/').is_some_and(|(folder, file)| {
            !folder.is_empty()
                && folder.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                && file.split_once('.').is_some_and(|(stem, ext)| {
                    stem == self.sha256
                        && !ext.is_empty()
                        && ext.bytes().all(|b| b.is_ascii_lowercase())
                })
        });
        ensure!(
            valid,
            "{what}: key {:?} is not <folder>/<sha256>.<extension> with its own sha256",
            self.key
        );
        Ok(())
    }
}

/// Where the manifest is.
#[derive(Debug, Clone)]
enum Location {
    Folder(PathBuf),
    Url(reqwest::Url),
}

/// A manifest and the store it lives in, read by polling.
#[derive(Debug)]
pub struct Store {
    manifest: Location,
    /// The store's root: the manifest's location minus `manifests/<name>.json`.
    root: Location,
    client: reqwest::Client,
    /// The last manifest's validator (HTTP ETag, or the sha256 of a local file's bytes).
    last_seen: Option<String>,
    /// The largest artifact this host downloads.
    max_bytes: u64,
}

/// What a poll found.
#[derive(Debug)]
pub enum Poll {
    /// The manifest did not change since the last poll.
    Unchanged,
    /// A manifest (new, or the first one).
    Manifest(Box<Manifest>),
}

impl Store {
    /// A store whose manifest is at `manifest` (a path, `file://` path or `http(s)://` URL)
    /// under `.../manifests/<channel>.json`.
    pub fn new(manifest: &str, max_bytes: u64) -> anyhow::Result<Self> {
        let (manifest, root) =
            if manifest.starts_with("http://") || manifest.starts_with("https://") {
                let url = reqwest::Url::parse(manifest)
                    .with_context(|| format!("manifest URL {manifest:?}"))?;
                let root = url
                    .join("..")
                    .with_context(|| format!("the store root of {url}"))?;
                ensure!(
                    url.path().contains("/manifests/"),
                    "manifest URL {url} is not under a manifests/ folder"
                );
                (Location::Url(url), Location::Url(root))
            } else {
                let path = PathBuf::from(manifest.strip_prefix("file://").unwrap_or(manifest));
                let folder = path.parent().filter(|p| p.ends_with("manifests"));
                let Some(root) = folder.and_then(|f| f.parent()) else {
                    bail!(
                        "manifest path {} is not <store>/manifests/<channel>.json",
                        path.display()
                    );
                };
                (
                    Location::Folder(path.clone()),
                    Location::Folder(root.into()),
                )
            };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            manifest,
            root,
            client,
            last_seen: None,
            max_bytes,
        })
    }

    /// Where the manifest is, for logs.
    pub fn describe(&self) -> String {
        match &self.manifest {
            Location::Folder(path) => path.display().to_string(),
            Location::Url(url) => url.to_string(),
        }
    }

    /// Makes the next poll read the manifest even if it did not change (after a failure
    /// to apply it).
    pub fn forget(&mut self) {
        self.last_seen = None;
    }

    /// Reads the manifest if it changed since the last poll.
    pub async fn poll(&mut self) -> anyhow::Result<Poll> {
        let (bytes, validator) = match &self.manifest {
            Location::Folder(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?;
                let validator = sha256_hex(&bytes);
                if self.last_seen.as_deref() == Some(validator.as_str()) {
                    return Ok(Poll::Unchanged);
                }
                (bytes, Some(validator))
            }
            Location::Url(url) => {
                let mut request = self.client.get(url.clone());
                if let Some(etag) = &self.last_seen {
                    request = request.header(reqwest::header::IF_NONE_MATCH, etag);
                }
                let response = request.send().await.with_context(|| format!("GET {url}"))?;
                if response.status() == reqwest::StatusCode::NOT_MODIFIED {
                    return Ok(Poll::Unchanged);
                }
                ensure!(
                    response.status().is_success(),
                    "GET {url}: {}",
                    response.status()
                );
                let etag = response
                    .headers()
                    .get(reqwest::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let bytes = read_limited(response, 1 << 20)
                    .await
                    .with_context(|| format!("GET {url}"))?;
                (bytes, etag)
            }
        };
        let manifest =
            Manifest::from_json(&bytes).with_context(|| format!("manifest {}", self.describe()))?;
        self.last_seen = validator;
        Ok(Poll::Manifest(Box::new(manifest)))
    }

    /// Downloads an artifact and checks its size and sha256.
    pub async fn fetch(&self, artifact: &Artifact) -> anyhow::Result<Vec<u8>> {
        ensure!(
            artifact.size <= self.max_bytes,
            "{} is {} bytes, above this host's limit of {}",
            artifact.key,
            artifact.size,
            self.max_bytes
        );
        let bytes = match &self.root {
            Location::Folder(root) => {
                let path = root.join(&artifact.key);
                tokio::fs::read(&path)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?
            }
            Location::Url(root) => {
                let url = root.join(&artifact.key)?;
                let response = self
                    .client
                    .get(url.clone())
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                ensure!(
                    response.status().is_success(),
                    "GET {url}: {}",
                    response.status()
                );
                read_limited(response, artifact.size)
                    .await
                    .with_context(|| format!("GET {url}"))?
            }
        };
        verify(artifact, &bytes)?;
        Ok(bytes)
    }
}

/// Checks that `bytes` are the artifact's.
pub fn verify(artifact: &Artifact, bytes: &[u8]) -> anyhow::Result<()> {
    ensure!(
        bytes.len() as u64 == artifact.size,
        "{}: {} bytes, the manifest says {}",
        artifact.key,
        bytes.len(),
        artifact.size
    );
    let actual = sha256_hex(bytes);
    ensure!(
        actual == artifact.sha256,
        "{}: sha256 {actual}, the manifest says {}",
        artifact.key,
        artifact.sha256
    );
    Ok(())
}

/// Reads a body of at most `limit` bytes, refusing longer ones as they arrive.
async fn read_limited(mut response: reqwest::Response, limit: u64) -> anyhow::Result<Vec<u8>> {
    if let Some(length) = response.content_length() {
        ensure!(
            length <= limit,
            "{length} bytes, more than the {limit} expected"
        );
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        ensure!(
            (bytes.len() + chunk.len()) as u64 <= limit,
            "more than the {limit} bytes expected"
        );
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Lowercase hex of the sha256 of `bytes`: how the store addresses artifacts.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(key: &str, sha: &str) -> Artifact {
        Artifact {
            key: key.into(),
            sha256: sha.into(),
            size: 1,
        }
    }

    #[test]
    fn keys_stay_inside_the_store() {
        let sha = "a".repeat(64);
        assert!(
            artifact(&format!("bundles/{sha}.bundle"), &sha)
                .check("b")
                .is_ok()
        );
        for key in [
            format!("../{sha}.bundle"),
            format!("bundles/../../etc/{sha}.bundle"),
            format!("/bundles/{sha}.bundle"),
            format!("bundles/{}.bundle", "b".repeat(64)),
            format!("bundles/{sha}"),
            format!("bundles/{sha}.bundle/x"),
        ] {
            assert!(artifact(&key, &sha).check("b").is_err(), "{key}");
        }
        assert!(
            artifact("bundles/X.bundle", "X").check("b").is_err(),
            "not a hash"
        );
    }

    #[test]
    fn manifests_are_checked() {
        let sha = "0".repeat(64);
        let good = format!(
            r#"{{"format":1,"channel":"production","model_version":"v1","bundle":{{"key":"bundles/{sha}.bundle","sha256":"{sha}","size":3}},"published_at":1}}"#
        );
        assert_eq!(
            Manifest::from_json(good.as_bytes()).unwrap().channel,
            "production"
        );
        let future = good.replace(r#""format":1"#, r#""format":2"#);
        assert!(Manifest::from_json(future.as_bytes()).is_err());
        assert!(Manifest::from_json(b"{").is_err());
        let escaping = good.replace("bundles/", "../");
        assert!(Manifest::from_json(escaping.as_bytes()).is_err());
    }

    #[test]
    fn store_roots_come_from_the_manifest_location() {
        let store = Store::new("/srv/store/manifests/production.json", 10).unwrap();
        assert!(
            matches!(&store.root, Location::Folder(p) if p == std::path::Path::new("/srv/store"))
        );
        let store = Store::new("http://127.0.0.1:9000/bucket/manifests/canary.json", 10).unwrap();
        assert!(
            matches!(&store.root, Location::Url(u) if u.as_str() == "http://127.0.0.1:9000/bucket/")
        );
        assert!(Store::new("/srv/store/production.json", 10).is_err());
        assert!(Store::new("http://127.0.0.1:9000/production.json", 10).is_err());
    }

    #[test]
    fn downloads_are_verified() {
        let bytes = b"abc";
        let good = Artifact {
            key: "k".into(),
            sha256: sha256_hex(bytes),
            size: 3,
        };
        assert!(verify(&good, bytes).is_ok());
        assert!(verify(&good, b"abd").is_err());
        assert!(verify(&good, b"ab").is_err());
    }
}
