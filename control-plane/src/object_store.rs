//! Where published artifacts live: a local folder (the default) or an S3 bucket (AWS or
//! any S3-compatible server), under one key layout that a CDN can front.
//!
//! Keys are relative (`bundles/<sha256>.bundle`, `manifests/<channel>.json`); callers
//! build them from validated names only. Content-addressed artifacts are written with a
//! year-long immutable cache policy, manifests with a short one, so a CDN serves bundles
//! from its edge and sees a new manifest within a minute.
//!
//! S3 takes its credentials, region and endpoint from the standard AWS environment and
//! config files (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! ...); S3-compatible servers usually also need path-style addressing.

use std::io::Write;
use std::path::{Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use sha2::{Digest, Sha256};

/// How long caches may keep an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Content-addressed: the key changes whenever the bytes do.
    Immutable,
    /// A pointer that moves (manifests): caches revalidate after a minute.
    Short,
}

impl CachePolicy {
    /// The `Cache-Control` header value.
    pub fn header(self) -> &'static str {
        match self {
            Self::Immutable => "public, max-age=31536000, immutable",
            Self::Short => "public, max-age=60",
        }
    }
}

/// The `Content-Type` for a key, by extension.
pub fn content_type(key: &str) -> &'static str {
    if key.ends_with(".json") {
        "application/json"
    } else if key.ends_with(".msgpack") {
        "application/msgpack"
    } else {
        "application/octet-stream"
    }
}

/// An object-store failure, with the key and the store's own words.
#[derive(Debug, thiserror::Error)]
#[error("{store}: {key}: {message}")]
pub struct StoreError {
    /// The store, as [`ObjectStore::describe`] names it.
    pub store: String,
    /// The key.
    pub key: String,
    /// What went wrong.
    pub message: String,
}

/// Options for S3.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint URL (an S3-compatible server); default: the AWS environment's.
    pub endpoint: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`), which most S3-compatible servers
    /// need.
    pub path_style: bool,
}

/// Objects bigger than this are uploaded in parts (S3's single PUT tops out at 5 GB, and a
/// failed part is retried alone).
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// The size of each part of a multipart upload (S3's minimum is 5 MiB).
pub const MULTIPART_PART_SIZE: usize = 8 << 20;

/// A bucket and a key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

/// A store of published artifacts.
#[derive(Debug, Clone)]
pub enum ObjectStore {
    /// A folder on this machine.
    Local(PathBuf),
    /// An S3 bucket.
    S3(S3Store),
}

fn base64_sha256(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes))
}

impl ObjectStore {
    /// Opens `location`: `s3://bucket[/prefix]`, `file:///path` or a path.
    pub async fn open(location: &str, s3: &S3Options) -> anyhow::Result<Self> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "{location}: no bucket name");
            let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .load()
                .await;
            let mut config = aws_sdk_s3::config::Builder::from(&shared);
            if shared.region().is_none() {
                // S3-compatible servers ignore the region but the signer needs one.
                config = config.region(aws_sdk_s3::config::Region::new("us-east-1"));
            }
            if let Some(endpoint) = &s3.endpoint {
                config = config.endpoint_url(endpoint);
            }
            let config = config.force_path_style(s3.path_style).build();
            Ok(Self::S3(S3Store {
                client: aws_sdk_s3::Client::from_conf(config),
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            }))
        } else {
            let path = location.strip_prefix("file://").unwrap_or(location);
            anyhow::ensure!(
                !location.contains("://") || location.starts_with("file://"),
                "{location}: use a folder, file:///folder or s3://bucket/prefix"
            );
            Ok(Self::Local(PathBuf::from(path)))
        }
    }

    /// Names the store for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(root) => root.display().to_string(),
            Self::S3(s3) if s3.prefix.is_empty() => format!("s3://{}", s3.bucket),
            Self::S3(s3) => format!("s3://{}/{}", s3.bucket, s3.prefix),
        }
    }

    fn error(&self, key: &str, message: impl std::fmt::Display) -> StoreError {
        StoreError {
            store: self.describe(),
            key: key.to_owned(),
            message: message.to_string(),
        }
    }

    /// Writes an object. Local files are written durably (temporary file, fsync, rename,
    /// folder fsync); S3 uploads carry a sha256 checksum that the server verifies before
    /// it stores anything.
    pub async fn put(&self, key: &str, bytes: &[u8], cache: CachePolicy) -> Result<(), StoreError> {
        match self {
            Self::Local(root) => {
                let path = root.join(key);
                let bytes = bytes.to_vec();
                tokio::task::spawn_blocking(move || write_durably(&path, &bytes))
                    .await
                    .map_err(|e| self.error(key, e))?
                    .map_err(|e| self.error(key, e))
            }
            Self::S3(s3) if bytes.len() > MULTIPART_THRESHOLD => s3
                .put_multipart(key, bytes, cache)
                .await
                .map_err(|e| self.error(key, e)),
            Self::S3(s3) => s3
                .client
                .put_object()
                .bucket(&s3.bucket)
                .key(s3.full_key(key))
                .cache_control(cache.header())
                .content_type(content_type(key))
                .checksum_sha256(base64_sha256(bytes))
                .body(ByteStream::from(bytes.to_vec()))
                .send()
                .await
                .map(drop)
                .map_err(|e| self.error(key, DisplayErrorContext(e))),
        }
    }

    /// Reads an object; `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Self::Local(root) => match tokio::fs::read(root.join(key)).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.error(key, e)),
            },
            Self::S3(s3) => {
                let answer = s3
                    .client
                    .get_object()
                    .bucket(&s3.bucket)
                    .key(s3.full_key(key))
                    .send()
                    .await;
                match answer {
                    Ok(output) => {
                        let body = output
                            .body
                            .collect()
                            .await
                            .map_err(|e| self.error(key, e))?;
                        Ok(Some(body.into_bytes().to_vec()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
                    Err(e) => Err(self.error(key, DisplayErrorContext(e))),
                }
            }
        }
    }

    /// The size of an object; `None` when there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Local(root) => match tokio::fs::metadata(root.join(key)).await {
                Ok(metadata) => Ok(Some(metadata.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.error(key, e)),
            },
            Self::S3(s3) => {
                let answer = s3
                    .client
                    .head_object()
                    .bucket(&s3.bucket)
                    .key(s3.full_key(key))
                    .send()
                    .await;
                match answer {
                    Ok(output) => Ok(Some(output.content_length().unwrap_or(0).max(0) as u64)),
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
                    Err(e) => Err(self.error(key, DisplayErrorContext(e))),
                }
            }
        }
    }
}

impl S3Store {
    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        bytes: &[u8],
        cache: CachePolicy,
    ) -> Result<(), String> {
        let full_key = self.full_key(key);
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .cache_control(cache.header())
            .content_type(content_type(key))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| DisplayErrorContext(e).to_string())?;
        let upload_id = upload
            .upload_id()
            .ok_or("the server returned no upload id")?
            .to_owned();
        let result = self.upload_parts(&full_key, &upload_id, bytes).await;
        if result.is_err() {
            // Parts of an abandoned upload are billed until aborted.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full_key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(
        &self,
        full_key: &str,
        upload_id: &str,
        bytes: &[u8],
    ) -> Result<(), String> {
        let mut parts = Vec::new();
        for (index, chunk) in bytes.chunks(MULTIPART_PART_SIZE).enumerate() {
            let number = i32::try_from(index + 1).map_err(|_| "too many parts")?;
            let checksum = base64_sha256(chunk);
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full_key)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| format!("part {number}: {}", DisplayErrorContext(e)))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .checksum_sha256(checksum)
                    .build(),
            );
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full_key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(drop)
            .map_err(|e| DisplayErrorContext(e).to_string())
    }
}

/// Writes `bytes` to `path` durably: a temporary file in the same folder, synced, then
/// renamed over the target, then the folder synced, so a crash leaves either the old file
/// or the new one, never a torn one.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = path.parent().expect("store paths have a folder");
    std::fs::create_dir_all(folder)?;
    let temporary = folder.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .expect("store paths name a file")
            .to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(folder).and_then(|dir| dir.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_objects_round_trip_and_missing_ones_are_none() {
        let root = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(&root.path().display().to_string(), &S3Options::default())
            .await
            .unwrap();
        assert_eq!(store.get("manifests/x.json").await.unwrap(), None);
        assert_eq!(store.size("manifests/x.json").await.unwrap(), None);
        store
            .put("manifests/x.json", b"{}", CachePolicy::Short)
            .await
            .unwrap();
        assert_eq!(store.get("manifests/x.json").await.unwrap().unwrap(), b"{}");
        assert_eq!(store.size("manifests/x.json").await.unwrap(), Some(2));
    }

    #[tokio::test]
    async fn locations_are_parsed_strictly() {
        let options = S3Options::default();
        assert!(
            ObjectStore::open("http://example.com/x", &options)
                .await
                .is_err()
        );
        assert!(ObjectStore::open("s3://", &options).await.is_err());
        match ObjectStore::open("s3://bucket/some/prefix/", &options)
            .await
            .unwrap()
        {
            ObjectStore::S3(s3) => {
                assert_eq!(s3.bucket, "bucket");
                assert_eq!(
                    s3.full_key("bundles/a.bundle"),
                    "some/prefix/bundles/a.bundle"
                );
            }
            ObjectStore::Local(_) => panic!("an s3:// location opened a folder"),
        }
        assert!(matches!(
            ObjectStore::open("file:///tmp/store", &options).await.unwrap(),
            ObjectStore::Local(path) if path == Path::new("/tmp/store")
        ));
    }
}
