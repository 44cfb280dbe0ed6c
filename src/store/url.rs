//! Opening a store from a URL: `file:///abs/dir`, `s3://bucket[/prefix]`, or `memory://` (tests).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::memory::InMemory;
use object_store::path::Path;

use super::StoreError;
use super::local::LocalStore;

/// Where runs are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory.
    Local(PathBuf),
    /// An S3-compatible bucket and key prefix.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix ("" for the bucket root).
        prefix: String,
    },
    /// A process-local in-memory store (tests only; lost on exit).
    Memory,
}

impl StoreUrl {
    /// Parses `file:///abs/dir`, `s3://bucket[/prefix]` or `memory://`.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| {
            StoreError::Unusable(format!(
                "store URL {s:?} {why}; expected file:///abs/dir or s3://bucket[/prefix]"
            ))
        };
        if s == "memory://" {
            return Ok(StoreUrl::Memory);
        }
        let url = url::Url::parse(s).map_err(|e| bad(&format!("does not parse ({e})")))?;
        match url.scheme() {
            "file" => url
                .to_file_path()
                .map(StoreUrl::Local)
                .map_err(|_| bad("is not an absolute local path")),
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("has no bucket"))?;
                Ok(StoreUrl::S3 {
                    bucket: bucket.to_owned(),
                    prefix: url.path().trim_matches('/').to_owned(),
                })
            }
            other => Err(bad(&format!("has unsupported scheme {other:?}"))),
        }
    }

    /// A local directory given as a path (the `RMOS_RUNS_DIR` fallback); relative paths are
    /// taken from the current directory.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        let abs = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()
                .map_err(|e| {
                    StoreError::Unusable(format!("cannot resolve {}: {e}", dir.display()))
                })?
                .join(dir)
        };
        Ok(StoreUrl::Local(abs))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Local(p) => write!(f, "file://{}", p.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Memory => f.write_str("memory://"),
        }
    }
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// fsync local writes (file and directory) before reporting them. Keep on in production.
    pub fsync: bool,
    /// S3 settings applied over the `AWS_*` environment (keys as `object_store` names them,
    /// e.g. `aws_endpoint`, `aws_allow_http`).
    pub s3: BTreeMap<String, String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            s3: BTreeMap::new(),
        }
    }
}

/// The backend behind a URL and the key prefix runs live under.
pub struct Backend {
    /// The object store.
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix.
    pub prefix: Path,
    /// Whether listings come back in key order (S3, memory) or not (local directories).
    pub sorted_listing: bool,
    /// The local backend itself, for what `ObjectStore` does not offer (names-only directory
    /// reads for the index).
    pub local: Option<LocalStore>,
}

/// Opens the backend for `url`.
pub fn open_backend(url: &StoreUrl, options: &OpenOptions) -> Result<Backend, StoreError> {
    match url {
        StoreUrl::Local(dir) => {
            let store = LocalStore::new(dir, options.fsync)
                .map_err(|e| StoreError::Unusable(format!("cannot open {}: {e}", dir.display())))?;
            Ok(Backend {
                store: Arc::new(store.clone()),
                prefix: Path::default(),
                sorted_listing: false,
                local: Some(store),
            })
        }
        StoreUrl::S3 { bucket, prefix } => {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            for (k, v) in &options.s3 {
                let key: AmazonS3ConfigKey = k
                    .parse()
                    .map_err(|e| StoreError::Unusable(format!("S3 setting {k:?}: {e}")))?;
                builder = builder.with_config(key, v);
            }
            let store = builder
                .build()
                .map_err(|e| StoreError::Unusable(format!("S3 store {url}: {e}")))?;
            Ok(Backend {
                store: Arc::new(store),
                prefix: Path::from(prefix.as_str()),
                sorted_listing: true,
                local: None,
            })
        }
        StoreUrl::Memory => Ok(Backend {
            store: Arc::new(InMemory::new()),
            prefix: Path::default(),
            sorted_listing: true,
            local: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            StoreUrl::parse("file:///var/lib/rmos").unwrap(),
            StoreUrl::Local("/var/lib/rmos".into())
        );
        assert_eq!(
            StoreUrl::parse("s3://runs/a/b/").unwrap(),
            StoreUrl::S3 {
                bucket: "runs".into(),
                prefix: "a/b".into()
            }
        );
        assert!(StoreUrl::parse("s3:///x").is_err());
        assert!(
            StoreUrl::parse("ftp://x")
                .unwrap_err()
                .to_string()
                .contains("ftp")
        );
        assert!(StoreUrl::parse("data/runs").is_err());
    }
}
