//! Blob lifecycle: bodies over the blob threshold stored once under `blobs/<sha256>`, shared by
//! every run whose body has those bytes, and removed when the last run referencing them goes.
//!
//! # References
//!
//! A run references a blob through an empty marker `blobrefs/<sha256>/<run_id>`, written
//! **before** the blob and before the run's record, and removed when the run stops
//! referencing the blob (delete, retention). A marker without a record (a create that lost a
//! race or died) only keeps a blob alive longer: markers err on the side of keeping.
//!
//! # Why no interleaving loses a referenced blob
//!
//! A creator C of a run referencing blob X does, in order:
//!
//! 1. write its marker `M_C`;
//! 2. put X create-if-absent (an existing X already has these bytes: content-addressed);
//! 3. write its record;
//! 4. check X exists, and put it again when it does not.
//!
//! A releaser R (a run that stopped referencing X) does, in order:
//!
//! a. remove its own marker;
//! b. list X's markers: if there is any, stop (someone references X);
//! c. park X: copy it to `parked/<sha256>/<nonce>`, then remove `blobs/<sha256>`;
//! d. list X's markers again;
//! e. if one appeared, copy the parked copy back to `blobs/<sha256>`; then remove the parked
//!    copy.
//!
//! The store is linearizable per key and its listings see every completed write (AWS S3, the
//! local filesystem), so C's step 1 and R's step d are ordered:
//!
//! * if 1 comes before d, R sees `M_C` in d and puts X back in e, after its own removal in c.
//!   Any other releaser that removes X later has its own step d after 1 too, so it also puts
//!   X back (a releaser that finds no X to copy in c removed nothing and owes nothing);
//! * if d comes before 1, R's removal in c is before C's step 2, which then finds no X and
//!   writes it (or finds it put back by another releaser). A releaser removing X after that
//!   has its step d after 1: the first case.
//!
//! So X exists once C has finished, and stays while `M_C` does: no referenced blob is lost,
//! whatever the interleaving. Step 4 also covers a store whose listings lag its writes
//! (a creator that finishes after a lagging release repairs X itself). A releaser that dies
//! between c and e leaves the parked copy: [`RunStore::get_blob`] and
//! [`RunStore::blob_stream`] put a missing blob back from it before reporting it missing.
//!
//! # Stores written without markers
//!
//! Markers exist since the first version of the store, but a record may still reference a blob
//! without one (copied in by hand, restored from a partial copy). Releases therefore remove a
//! blob only on a store marked `blobrefs/_complete`, and keep it otherwise. The flag is written
//! by a full `reindex` (which writes the marker of every live run's reference first; the worker
//! starts one on a store without the flag) and by the first blob put into a store that has no
//! blob at all (nothing can then reference a blob without a marker).

use std::sync::atomic::Ordering as AtomicOrdering;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use super::{RunStore, StoreError};
use crate::domain::artifact::{RunArtifact, Sha256Hex};
use crate::domain::command::NewBlob;
use crate::domain::error::Rejection;
use crate::domain::ids::RunId;
use crate::domain::verify::{BlobContent, BlobContents, CheckStatus, VerifyReport, verify};

/// Part size of streamed uploads: S3's minimum, 5 MiB (at most three parts are held at once).
pub const UPLOAD_PART: usize = 5 * 1024 * 1024;
/// Blobs up to this size are held whole by `verify`; larger ones are hashed as they stream.
/// A body published inline is at most one broker message (`max_payload_bytes`, 8 MiB by
/// default), so with the defaults only claim-checked bodies stream.
pub const VERIFY_HOLD_MAX: u64 = 16 * 1024 * 1024;

/// The flag of a store whose every blob reference has its marker (see the module docs).
const COMPLETE_FLAG: &str = "blobrefs/_complete";

/// A blob's bytes as a stream, with its size.
pub struct BlobStream {
    /// Size in bytes.
    pub size: u64,
    /// The bytes, in order, in chunks of the backend's choosing.
    pub bytes: BoxStream<'static, Result<Bytes, StoreError>>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStream({} bytes)", self.size)
    }
}

impl RunStore {
    /// The key of a run's reference marker: `<prefix>/blobrefs/<sha256>/<run_id>`.
    pub(super) fn blob_ref_key(&self, sha: &Sha256Hex, run: &RunId) -> Path {
        self.key(&format!("blobrefs/{sha}/{run}"))
    }

    /// Writes `run`'s reference marker to a blob (step 1 of the module docs). Idempotent.
    pub(super) async fn put_blob_marker(
        &self,
        sha: &Sha256Hex,
        run: &RunId,
    ) -> Result<(), StoreError> {
        let marker = self.blob_ref_key(sha, run);
        self.store
            .put(&marker, PutPayload::new())
            .await
            .map_err(|e| self.os_err(e, &format!("write {marker}")))?;
        Ok(())
    }

    /// Stores a blob for `run`: its marker first, so that a concurrent release sees the
    /// reference (steps 1 and 2 of the module docs).
    pub(super) async fn put_blob(&self, run: &RunId, blob: &NewBlob) -> Result<(), StoreError> {
        self.put_blob_marker(&blob.sha256, run).await?;
        self.flag_first_blob().await?;
        self.put_blob_bytes(blob).await
    }

    async fn put_blob_bytes(&self, blob: &NewBlob) -> Result<(), StoreError> {
        let key = self.blob_key(&blob.sha256);
        let payload = PutPayload::from(Bytes::from(blob.bytes.clone()));
        match self
            .store
            .put_opts(&key, payload, PutOptions::from(PutMode::Create))
            .await
        {
            // Content-addressed: an existing object with this name has these bytes.
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(object_store::Error::Precondition { .. }) => Ok(()),
            Err(e) => Err(self.os_err(e, &format!("write {key}"))),
        }
    }

    /// Step 4: re-stores a blob that a release removed between our write and our record.
    pub(super) async fn ensure_blob(&self, blob: &NewBlob) -> Result<(), StoreError> {
        if self.blob_present(&blob.sha256).await? {
            Ok(())
        } else {
            self.put_blob_bytes(blob).await
        }
    }

    /// Whether `blobs/<sha256>` exists (a parked copy is put back first).
    pub(super) async fn blob_present(&self, sha: &Sha256Hex) -> Result<bool, StoreError> {
        let key = self.blob_key(sha);
        match self.head_blob(&key).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => self.unpark(sha).await,
            Err(e) => Err(self.os_err(e, &format!("check {key}"))),
        }
    }

    /// Checks a blob exists without reading it (nor, on the local store, hashing it).
    async fn head_blob(&self, key: &Path) -> object_store::Result<()> {
        let mut options = super::read_only();
        options.head = true;
        self.store.get_opts(key, options).await.map(|_| ())
    }

    /// Whether any run's marker for the blob remains.
    async fn referenced(&self, sha: &Sha256Hex) -> Result<bool, StoreError> {
        let refs_prefix = self.key(&format!("blobrefs/{sha}"));
        Ok(self.first_under(&refs_prefix).await?.is_some())
    }

    /// The first object under `prefix`, if any (a LIST that stops after one entry).
    async fn first_under(
        &self,
        prefix: &Path,
    ) -> Result<Option<object_store::ObjectMeta>, StoreError> {
        let found = self
            .store
            .list(Some(prefix))
            .take(1)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.os_err(e, &format!("list {prefix}")))?;
        Ok(found.into_iter().next())
    }

    /// Drops `run`'s reference to a blob and removes the blob when no run references it
    /// (steps a to e of the module docs).
    pub(super) async fn release_blob(
        &self,
        sha: &Sha256Hex,
        run: &RunId,
    ) -> Result<(), StoreError> {
        let marker = self.blob_ref_key(sha, run);
        self.delete_if_present(&marker).await?;
        if self.referenced(sha).await? {
            return Ok(());
        }
        if !self.blob_refs_complete().await? {
            tracing::debug!(%sha, "blob kept: the store's references are not all marked yet");
            return Ok(());
        }
        let key = self.blob_key(sha);
        let nonce: u64 = rand::random();
        let parked = self.key(&format!("parked/{sha}/{nonce:016x}"));
        match self.store.copy(&key, &parked).await {
            Ok(()) => {}
            // Removed by another release, which owes the re-check; nothing removed here.
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(self.os_err(e, &format!("park {key}"))),
        }
        if let Err(e) = self.delete_if_present(&key).await {
            self.drop_parked(&parked).await?;
            return Err(e);
        }
        if self.referenced(sha).await? {
            // A run took a reference while we were removing it: put it back. On failure the
            // parked copy stays, and the next read of the blob puts it back.
            self.store
                .copy(&parked, &key)
                .await
                .map_err(|e| self.os_err(e, &format!("restore {key}")))?;
            tracing::info!(%sha, "blob referenced again while it was being released: kept");
        }
        self.drop_parked(&parked).await
    }

    async fn delete_if_present(&self, key: &Path) -> Result<(), StoreError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.os_err(e, &format!("delete {key}"))),
        }
    }

    async fn drop_parked(&self, parked: &Path) -> Result<(), StoreError> {
        self.delete_if_present(parked).await?;
        if let Some(local) = &self.local {
            local.prune_empty_dirs(parked, &self.key("parked"));
        }
        Ok(())
    }

    /// Puts a missing blob back from a copy a release left parked (a release that died
    /// between removing and re-checking). True when the blob exists afterwards.
    async fn unpark(&self, sha: &Sha256Hex) -> Result<bool, StoreError> {
        let dir = self.key(&format!("parked/{sha}"));
        let Some(copy) = self.first_under(&dir).await? else {
            return Ok(false);
        };
        let key = self.blob_key(sha);
        match self.store.copy(&copy.location, &key).await {
            Ok(()) => {
                tracing::warn!(%sha, "blob put back from a copy an interrupted release left");
                Ok(true)
            }
            // The release finished meanwhile (and put it back, or nobody needed it).
            Err(object_store::Error::NotFound { .. }) => Ok(self.head_blob(&key).await.is_ok()),
            Err(e) => Err(self.os_err(e, &format!("restore {key}"))),
        }
    }

    /// Whether every blob reference of the store has its marker (`blobrefs/_complete`).
    pub async fn blob_refs_complete(&self) -> Result<bool, StoreError> {
        if self.blob_refs_complete.load(AtomicOrdering::Relaxed) {
            return Ok(true);
        }
        let key = self.key(COMPLETE_FLAG);
        match self.store.head(&key).await {
            Ok(_) => {
                self.blob_refs_complete.store(true, AtomicOrdering::Relaxed);
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.os_err(e, &format!("check {key}"))),
        }
    }

    /// Marks every blob reference as having its marker (after a full pass that wrote them).
    pub(super) async fn mark_blob_refs_complete(&self) -> Result<(), StoreError> {
        let key = self.key(COMPLETE_FLAG);
        self.store
            .put(&key, PutPayload::from_static(b"1\n"))
            .await
            .map_err(|e| self.os_err(e, &format!("write {key}")))?;
        self.blob_refs_complete.store(true, AtomicOrdering::Relaxed);
        Ok(())
    }

    /// A store without any blob cannot hold a reference without a marker: the first blob
    /// put into it marks it complete.
    async fn flag_first_blob(&self) -> Result<(), StoreError> {
        if self.blob_refs_complete().await? {
            return Ok(());
        }
        if self.first_under(&self.key("blobs")).await?.is_none() {
            self.mark_blob_refs_complete().await?;
        }
        Ok(())
    }

    /// Writes the marker of every blob a live run references (the `reindex` pass, for stores
    /// whose references predate their markers). Returns how many it wrote or found.
    pub(super) async fn mark_references(
        &self,
        artifact: &RunArtifact,
    ) -> Result<usize, StoreError> {
        let refs = artifact.blob_refs();
        for r in &refs {
            self.put_blob_marker(&r.sha256, &artifact.run_id).await?;
        }
        Ok(refs.len())
    }

    /// The contents of every blob `artifact` references, for [`verify`]: the bytes of those up
    /// to `hold_up_to` bytes, the streamed SHA-256 of larger ones (never held whole).
    pub(super) async fn blob_contents(
        &self,
        artifact: &RunArtifact,
        hold_up_to: u64,
    ) -> Result<BlobContents, StoreError> {
        let mut blobs = BlobContents::new();
        for r in artifact.blob_refs() {
            let content = if r.size_bytes <= hold_up_to {
                match self.get_blob(&r.sha256).await? {
                    Some(b) => BlobContent::Bytes(b.to_vec()),
                    None => BlobContent::Missing,
                }
            } else {
                match self.blob_stream(&r.sha256).await? {
                    Some(s) => {
                        let mut hasher = Sha256::new();
                        let mut bytes = s.bytes;
                        while let Some(chunk) = bytes.next().await {
                            hasher.update(&chunk?);
                        }
                        BlobContent::Digest(hex::encode(hasher.finalize()))
                    }
                    None => BlobContent::Missing,
                }
            };
            blobs.insert(r.sha256.clone(), content);
        }
        Ok(blobs)
    }

    /// Recomputes every hash of `artifact` against the store's blobs, in bounded memory: blobs
    /// over [`VERIFY_HOLD_MAX`] are hashed as they stream. Only a run whose toolpaths hash
    /// covers a body that large published inline (possible only with a `max_payload_bytes`
    /// above it) is checked again with its blobs held whole.
    pub async fn verify_artifact(
        &self,
        artifact: &RunArtifact,
    ) -> Result<VerifyReport, StoreError> {
        let blobs = self.blob_contents(artifact, VERIFY_HOLD_MAX).await?;
        let report = verify(artifact, &blobs);
        let streamed = blobs.values().any(|b| matches!(b, BlobContent::Digest(_)));
        let toolpaths_ok = report
            .checks
            .iter()
            .all(|c| c.name != "hashes.toolpaths_sha256" || c.status == CheckStatus::Ok);
        if !streamed || toolpaths_ok {
            return Ok(report);
        }
        let blobs = self.blob_contents(artifact, u64::MAX).await?;
        Ok(verify(artifact, &blobs))
    }

    /// Reads a blob whole; `None` when it does not exist. For large bodies prefer
    /// [`RunStore::blob_stream`].
    pub async fn get_blob(&self, sha: &Sha256Hex) -> Result<Option<Bytes>, StoreError> {
        match self.blob_stream(sha).await? {
            None => Ok(None),
            Some(s) => {
                let mut buf = Vec::with_capacity(usize::try_from(s.size).unwrap_or(0));
                let mut bytes = s.bytes;
                while let Some(chunk) = bytes.next().await {
                    buf.extend_from_slice(&chunk?);
                }
                Ok(Some(Bytes::from(buf)))
            }
        }
    }

    /// Streams a blob's bytes (`None` when it does not exist, after trying to put it back
    /// from a copy an interrupted release left parked). Memory stays bounded by the backend's
    /// chunk size whatever the blob's size: this is how large programs are served (NATS
    /// `get --output`, HTTP downloads).
    pub async fn blob_stream(&self, sha: &Sha256Hex) -> Result<Option<BlobStream>, StoreError> {
        let key = self.blob_key(sha);
        for attempt in 0..2 {
            match self.store.get_opts(&key, super::read_only()).await {
                Ok(g) => {
                    let size = g.meta.size;
                    let what = format!("read {key}");
                    let bytes = g
                        .into_stream()
                        .map_err(move |e| StoreError::from_object_store(e, &what))
                        .boxed();
                    return Ok(Some(BlobStream { size, bytes }));
                }
                Err(object_store::Error::NotFound { .. }) => {
                    if attempt > 0 || !self.unpark(sha).await? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(self.os_err(e, &format!("read {key}"))),
            }
        }
        Ok(None)
    }

    /// Stores a body that arrives as a stream (a staged claim check) as blob `sha` for `run`,
    /// checking that the bytes hash to `sha` and number `size`. Memory stays bounded: the
    /// bytes are hashed as they pass and written by multipart upload in [`UPLOAD_PART`]
    /// parts, never held whole. When the blob already exists the bytes are only checked.
    /// A mismatch is `Rejected` (`invalid_request`) naming what differs, and nothing is
    /// written; the marker (written first, as for every blob) then only keeps the blob longer.
    pub async fn put_blob_stream<E: std::fmt::Display>(
        &self,
        run: &RunId,
        sha: &Sha256Hex,
        size: u64,
        mut bytes: impl futures::Stream<Item = Result<Bytes, E>> + Unpin,
        what: &str,
    ) -> Result<(), StoreError> {
        self.put_blob_marker(sha, run).await?;
        self.flag_first_blob().await?;
        let key = self.blob_key(sha);
        let mut upload = if self.blob_present(sha).await? {
            None
        } else {
            let u = self
                .store
                .put_multipart(&key)
                .await
                .map_err(|e| self.os_err(e, &format!("write {key}")))?;
            Some(WriteMultipart::new_with_chunk_size(u, UPLOAD_PART))
        };
        let mut hasher = Sha256::new();
        let mut seen = 0u64;
        let fail = |e: String| StoreError::Unavailable(format!("{what}: {e}"));
        let mut outcome: Result<(), StoreError> = Ok(());
        while let Some(chunk) = bytes.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    outcome = Err(fail(format!("read: {e}")));
                    break;
                }
            };
            seen += chunk.len() as u64;
            if seen > size {
                outcome = Err(Rejection::invalid(format!(
                    "{what}: more than the claimed {size} bytes"
                ))
                .into());
                break;
            }
            hasher.update(&chunk);
            if let Some(w) = upload.as_mut() {
                // At most two parts in flight besides the one filling: bounded memory.
                if let Err(e) = w.wait_for_capacity(2).await {
                    outcome = Err(self.os_err(e, &format!("write {key}")));
                    break;
                }
                // Copied into the part buffer: the chunk may share a larger allocation (a
                // connection's read buffer) that keeping it would keep alive.
                w.write(&chunk);
            }
        }
        if outcome.is_ok() {
            let actual = hex::encode(hasher.finalize());
            if seen != size {
                outcome = Err(Rejection::invalid(format!(
                    "{what}: {seen} bytes, not the claimed {size}"
                ))
                .into());
            } else if actual != sha.as_str() {
                outcome = Err(Rejection::invalid(format!(
                    "{what}: the bytes hash to {actual}, not the claimed {sha}"
                ))
                .into());
            }
        }
        match (outcome, upload) {
            (Ok(()), Some(w)) => {
                w.finish()
                    .await
                    .map_err(|e| self.os_err(e, &format!("write {key}")))?;
                Ok(())
            }
            (Ok(()), None) => Ok(()),
            (Err(e), Some(w)) => {
                if let Err(abort) = w.abort().await {
                    tracing::warn!(%key, error = %abort, "aborting a rejected upload failed");
                }
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Before a record that references blobs it did not bring (staged bodies claimed by the
    /// transport) is written: each must have this run's marker and exist.
    pub(super) async fn require_blob(
        &self,
        run: &RunId,
        sha: &Sha256Hex,
    ) -> Result<(), StoreError> {
        self.put_blob_marker(sha, run).await?;
        if self.blob_present(sha).await? {
            Ok(())
        } else {
            Err(Rejection::invalid(format!(
                "run {run}: body {sha} was never stored (a staged body must be claimed first)"
            ))
            .into())
        }
    }

    /// Whether a blob exists (for tests and operators).
    pub async fn blob_exists(&self, sha: &Sha256Hex) -> Result<bool, StoreError> {
        self.blob_present(sha).await
    }
}
