//! The local filesystem backend: `object_store`'s `LocalFileSystem` for reads, listing and
//! deletes, plus what it lacks for a run record that must never lose an update:
//!
//! * `PutMode::Update` (upstream returns `NotImplemented`): an update-if-unchanged that holds
//!   across **processes** on one host. The writer takes an exclusive advisory lock (`flock`) on
//!   a lock file for the key, re-reads the current object, compares its ETag and only then
//!   renames the new file into place. Every writer of the key (update, overwrite) takes the
//!   same lock, so check-then-rename is atomic for all of them.
//! * Content-based ETags. `LocalFileSystem` derives ETags from inode, mtime and size; inodes
//!   are reused and mtimes are coarse, so an old ETag can match a newer file (ABA). Here the
//!   ETag is a digest of the bytes, and a run record's revision makes every version distinct.
//! * Durability: writes fsync the file and its directory before they are reported (on by
//!   default; `fsync = false` exists for benchmarks only).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use sha2::{Digest, Sha256};

/// Number of lock files keys are spread over (a bounded set, whatever the number of runs).
const LOCK_STRIPES: u32 = 1024;

/// The local filesystem store with cross-process conditional updates. See the module docs.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    inner: Arc<LocalFileSystem>,
}

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore({})", self.root.display())
    }
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalStore",
        source: Box::new(e),
    }
}

/// The ETag of a byte string: a quoted, shortened SHA-256.
pub fn content_etag(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    format!("\"{}\"", hex::encode(&d[..16]))
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`. `fsync` must stay on except in
    /// benchmarks that measure its cost.
    pub fn new(root: impl AsRef<FsPath>, fsync: bool) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(root.join(".locks")).map_err(generic)?;
        let inner = LocalFileSystem::new_with_prefix(&root)?
            .with_fsync(fsync)
            .with_automatic_cleanup(false);
        Ok(Self {
            root,
            inner: Arc::new(inner),
        })
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &FsPath {
        &self.root
    }

    fn lock_file(&self, location: &Path) -> PathBuf {
        let d = Sha256::digest(location.as_ref().as_bytes());
        let stripe = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % LOCK_STRIPES;
        self.root.join(".locks").join(format!("{stripe:03x}.lock"))
    }

    /// Takes the key's exclusive lock (blocking in a worker thread); released on drop.
    async fn lock(&self, location: &Path) -> Result<File> {
        let path = self.lock_file(location);
        tokio::task::spawn_blocking(move || -> std::io::Result<File> {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)?;
            file.lock()?;
            Ok(file)
        })
        .await
        .map_err(generic)?
        .map_err(generic)
    }

    async fn read_current(&self, location: &Path) -> Result<Option<Vec<u8>>> {
        let path = self.inner.path_to_filesystem(location)?;
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(generic(e)),
        })
        .await
        .map_err(generic)?
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let bytes: Bytes = payload.clone().into();
        let etag = content_etag(&bytes);
        match &opts.mode {
            // Hard-link publish: atomic create-if-absent, no lock needed.
            PutMode::Create => {
                self.inner.put_opts(location, payload, opts.clone()).await?;
            }
            PutMode::Overwrite => {
                let _guard = self.lock(location).await?;
                self.inner.put_opts(location, payload, opts.clone()).await?;
            }
            PutMode::Update(version) => {
                let _guard = self.lock(location).await?;
                let current = self.read_current(location).await?;
                let Some(current) = current else {
                    return Err(object_store::Error::Precondition {
                        path: location.to_string(),
                        source: "object does not exist".into(),
                    });
                };
                let current_etag = content_etag(&current);
                if version.e_tag.as_deref() != Some(current_etag.as_str()) {
                    return Err(object_store::Error::Precondition {
                        path: location.to_string(),
                        source: format!("etag {current_etag} does not match {:?}", version.e_tag)
                            .into(),
                    });
                }
                let overwrite = PutOptions {
                    mode: PutMode::Overwrite,
                    ..opts.clone()
                };
                self.inner.put_opts(location, payload, overwrite).await?;
            }
        }
        Ok(PutResult {
            e_tag: Some(etag),
            version: None,
            extensions: Default::default(),
        })
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let path = self.inner.path_to_filesystem(location)?;
        let loc = location.clone();
        let (bytes, modified) = tokio::task::spawn_blocking(move || {
            let read = std::fs::read(&path).and_then(|b| {
                let m = std::fs::metadata(&path)?.modified()?;
                Ok((b, m))
            });
            match read {
                Ok(v) => Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(object_store::Error::NotFound {
                        path: loc.to_string(),
                        source: Box::new(e),
                    })
                }
                Err(e) => Err(generic(e)),
            }
        })
        .await
        .map_err(generic)??;
        let len = bytes.len() as u64;
        let meta = ObjectMeta {
            location: location.clone(),
            last_modified: modified.into(),
            size: len,
            e_tag: Some(content_etag(&bytes)),
            version: None,
        };
        options.check_preconditions(&meta)?;
        let range = match &options.range {
            Some(r) => r.as_range(len).map_err(generic)?,
            None => 0..len,
        };
        let body = if options.head {
            Bytes::new()
        } else {
            Bytes::from(bytes).slice(range.start as usize..range.end as usize)
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(
                futures::stream::once(async move { Ok(body) }).boxed(),
            ),
            meta,
            range,
            attributes: Default::default(),
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        // Listing ETags are inode-based; drop them so nobody mistakes them for ours.
        self.inner
            .list(prefix)
            .map(|r| r.map(|m| ObjectMeta { e_tag: None, ..m }))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .list_with_offset(prefix, offset)
            .map(|r| r.map(|m| ObjectMeta { e_tag: None, ..m }))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut r = self.inner.list_with_delimiter(prefix).await?;
        for m in &mut r.objects {
            m.e_tag = None;
        }
        Ok(r)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
