//! Claim checks through NATS: bodies too large for one broker message travel through a
//! JetStream Object Store bucket (the staging bucket), which chunks them over the same
//! connection, and commands and replies name them (`StagedBody`: bucket, name, SHA-256, size)
//! instead of carrying them.
//!
//! * In: a publisher puts the body into the bucket and sends `outputs.gcode_ref` (G-code as
//!   published), `outputs.opplan_ref` or an advisory's `body_ref` (JSON as its RFC 8785
//!   canonical bytes). The worker streams the object into the run store as a blob
//!   ([`RunStore::put_blob_stream`]: hashed, checked and uploaded as it arrives, never whole
//!   in memory), which rejects a hash or size that differs from the claim, or JSON that is not
//!   canonical ([`crate::domain::canonical`]); once the run is stored it removes the staged
//!   object. Objects nothing claims expire with the bucket's `max_age`.
//! * Out: `get` with `output` (or `include_outputs` on a body over the broker's
//!   `max_payload`) stages the blob under `out/<sha256>` and replies with where it is.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::object_store::{self as nats_os, ObjectMetadata};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

use std::sync::{Arc, Mutex};

use crate::domain::artifact::Sha256Hex;
use crate::domain::canonical::{CanonicalCheck, NotCanonical};
use crate::domain::command::create::StagedBody;
use crate::domain::command::{CommandKind, StagedClaim, StagedFormat};
use crate::domain::error::Rejection;
use crate::domain::hashing::canonical_json;
use crate::domain::ids::RunId;
use crate::store::{RunStore, StoreError};

/// Default staging bucket name.
pub const DEFAULT_BUCKET: &str = "rmos-runs-staging";
/// Default age after which the broker drops a staged object nobody claimed.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Size of the pipe between a blob read from the store and a staged object being written.
const READ_CHUNK: usize = 256 * 1024;

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The bucket could not be created or opened.
    #[error("staging bucket {bucket}: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// Why.
        reason: String,
    },
    /// An object could not be written, read or removed.
    #[error("staged object {bucket}/{name}: {reason}")]
    Object {
        /// The bucket.
        bucket: String,
        /// The object.
        name: String,
        /// Why.
        reason: String,
    },
}

/// The staging bucket.
#[derive(Clone)]
pub struct Staging {
    bucket: String,
    store: nats_os::ObjectStore,
    js: jetstream::Context,
    /// How the worker created it (to create it again when the broker lost it); `None` for a
    /// publisher's or reader's handle, which never creates it.
    config: Option<nats_os::Config>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging({})", self.bucket)
    }
}

impl Staging {
    /// Creates the bucket (the worker, at start-up) or opens it when it exists. Staged objects
    /// expire after `max_age`.
    pub async fn ensure(
        js: &jetstream::Context,
        bucket: &str,
        max_age: Duration,
        replicas: usize,
    ) -> Result<Self, StagingError> {
        let config = nats_os::Config {
            bucket: bucket.to_owned(),
            description: Some(
                "rmos-runs: large bodies on their way in and out (claim checks)".into(),
            ),
            max_age,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let (store, _) = Self::get_or_create(js, &config).await?;
        Ok(Self {
            bucket: bucket.to_owned(),
            store,
            js: js.clone(),
            config: Some(config),
        })
    }

    /// Opens the bucket, creating it when the broker says its stream does not exist (and only
    /// then: a bucket that could not be looked up is not taken for a lost one); `true` when it
    /// was created.
    async fn get_or_create(
        js: &jetstream::Context,
        config: &nats_os::Config,
    ) -> Result<(nats_os::ObjectStore, bool), StagingError> {
        let err = |reason: String| StagingError::Bucket {
            bucket: config.bucket.clone(),
            reason,
        };
        let missing = match js.get_stream(format!("OBJ_{}", config.bucket)).await {
            Ok(_) => false,
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    true
                }
                _ => return Err(err(e.to_string())),
            },
        };
        if missing {
            js.create_object_store(config.clone())
                .await
                .map(|s| (s, true))
                .map_err(|e| err(e.to_string()))
        } else {
            js.get_object_store(&config.bucket)
                .await
                .map(|s| (s, false))
                .map_err(|e| err(e.to_string()))
        }
    }

    /// Creates the bucket again if the broker lost it (its store wiped, `nats obj rm`), as at
    /// start-up; `true` when it did. A handle that did not create the bucket never does.
    pub async fn recreate_if_missing(&self) -> Result<bool, StagingError> {
        match &self.config {
            Some(config) => Self::get_or_create(&self.js, config)
                .await
                .map(|(_, created)| created),
            None => Ok(false),
        }
    }

    /// Opens an existing bucket (publishers and readers: they do not create it).
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<Self, StagingError> {
        let store = js
            .get_object_store(bucket)
            .await
            .map_err(|e| StagingError::Bucket {
                bucket: bucket.to_owned(),
                reason: format!("{e} (the worker creates it at start-up)"),
            })?;
        Ok(Self {
            bucket: bucket.to_owned(),
            store,
            js: js.clone(),
            config: None,
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn obj_err(&self, name: &str, reason: impl std::fmt::Display) -> StagingError {
        StagingError::Object {
            bucket: self.bucket.clone(),
            name: name.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// Puts `body` under `name` and returns its claim check.
    pub async fn put(
        &self,
        name: &str,
        body: &mut (impl AsyncRead + Unpin),
        sha256: Sha256Hex,
        size_bytes: u64,
    ) -> Result<StagedBody, StagingError> {
        let put = self
            .store
            .put(
                ObjectMetadata {
                    name: name.to_owned(),
                    ..Default::default()
                },
                body,
            )
            .await;
        match put {
            Ok(_) => {}
            // The new object is stored; only removing the chunks of an earlier object under
            // the name failed (publishers may not purge: the worker removes claimed bodies,
            // and an earlier one's leftovers expire with the bucket's max_age).
            Err(e) if e.kind() == nats_os::PutErrorKind::PurgeOldChunks => {
                tracing::debug!(name, error = %e, "earlier chunks left to expire");
            }
            Err(e) => return Err(self.obj_err(name, e)),
        }
        Ok(StagedBody {
            bucket: self.bucket.clone(),
            name: name.to_owned(),
            sha256,
            size_bytes,
        })
    }

    /// Stages bytes held in memory (the CLI's bodies), named by their SHA-256 so that a retry
    /// names the same object and publishes the same command.
    pub async fn put_bytes(&self, prefix: &str, body: &[u8]) -> Result<StagedBody, StagingError> {
        let sha = Sha256Hex::parse(&hex::encode(Sha256::digest(body)))
            .map_err(|r| self.obj_err(prefix, r.message))?;
        let name = format!("{prefix}{sha}");
        // Already staged by an earlier attempt (the worker checks the bytes either way).
        if let Ok(info) = self.store.info(&name).await
            && !info.deleted
            && info.size as u64 == body.len() as u64
        {
            return Ok(StagedBody {
                bucket: self.bucket.clone(),
                name,
                sha256: sha,
                size_bytes: body.len() as u64,
            });
        }
        let mut reader = body;
        self.put(&name, &mut reader, sha, body.len() as u64).await
    }

    /// The staged object's bytes as a stream of chunks, fetched one at a time by direct get
    /// (an ordered push consumer would let the broker run ahead of a slow writer by its whole
    /// flow-control window: memory bounded by one chunk instead).
    pub async fn read(
        &self,
        name: &str,
    ) -> Result<impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin, StagingError>
    {
        let info = self
            .store
            .info(name)
            .await
            .map_err(|e| self.obj_err(name, e))?;
        if info.deleted {
            return Err(self.obj_err(name, "deleted"));
        }
        let stream = self
            .js
            .get_stream_no_info(format!("OBJ_{}", self.bucket))
            .await
            .map_err(|e| self.obj_err(name, e))?;
        let subject = format!("$O.{}.C.{}", self.bucket, info.nuid);
        let chunks = info.chunks;
        Ok(Box::pin(futures::stream::unfold(
            (0usize, 1u64),
            move |(got, seq)| {
                let stream = stream.clone();
                let subject = subject.clone();
                async move {
                    if got >= chunks {
                        return None;
                    }
                    match stream.direct_get_next_for_subject(subject, Some(seq)).await {
                        Ok(m) => Some((Ok(m.payload), (got + 1, m.sequence + 1))),
                        Err(e) => Some((Err(std::io::Error::other(e)), (chunks, seq))),
                    }
                }
            },
        )))
    }

    /// Streams the staged body of `claim` into `store` as a blob of `run`, checked: a hash or
    /// size other than claimed, or (for a JSON body) bytes that are not RFC 8785 canonical
    /// JSON nested at most `max_depth` levels, are `Rejected`, naming the field and why, and
    /// nothing is stored. A body already in the store whose staged object is gone (a
    /// redelivery after the first delivery stored it and removed the object) is accepted as it
    /// is. Returns the bytes read from the bucket.
    pub async fn claim(
        &self,
        store: &RunStore,
        run: &RunId,
        claim: &StagedClaim<'_>,
        max_depth: usize,
    ) -> Result<u64, StoreError> {
        let (staged, field) = (claim.body, claim.field);
        if staged.bucket != self.bucket {
            return Err(Rejection::invalid(format!(
                "{field}: bucket {:?} is not the staging bucket {:?}",
                staged.bucket, self.bucket
            ))
            .into());
        }
        let gone = match self.store.info(&staged.name).await {
            Ok(info) => info.deleted,
            Err(e) if e.kind() == nats_os::InfoErrorKind::NotFound => true,
            // The bucket itself may be gone (the broker lost its state): made again, it holds
            // no object, which is what the command is then told.
            Err(e) => match self.recreate_if_missing().await {
                Ok(true) => {
                    tracing::warn!(bucket = %self.bucket, "the staging bucket was missing on the broker; re-created it");
                    true
                }
                _ => {
                    return Err(StoreError::Unavailable(format!(
                        "staging bucket {}: {e}",
                        self.bucket
                    )));
                }
            },
        };
        if gone {
            if store.blob_exists(&staged.sha256).await? {
                return Ok(0);
            }
            return Err(Rejection::invalid(format!(
                "{field}: no object {:?} in bucket {:?} (never put, or expired)",
                staged.name, staged.bucket
            ))
            .into());
        }
        let bytes = self
            .read(&staged.name)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let checker = match claim.format {
            StagedFormat::Bytes => None,
            StagedFormat::CanonicalJson => Some(CanonicalCheck::new(max_depth, false)),
            StagedFormat::CanonicalJsonObject => Some(CanonicalCheck::new(max_depth, true)),
        };
        let fault: Arc<Mutex<Option<NotCanonical>>> = Arc::default();
        let bytes = checked(bytes, checker, fault.clone());
        let put = store
            .put_blob_stream(
                run,
                &staged.sha256,
                staged.size_bytes,
                bytes,
                &format!("{field} {}/{}", staged.bucket, staged.name),
            )
            .await;
        let fault = fault.lock().ok().and_then(|mut f| f.take());
        match (put, fault) {
            (Ok(()), _) => Ok(staged.size_bytes),
            (Err(_), Some(e)) => Err(Rejection::invalid(format!(
                "{field} {}/{}: {e} (a staged JSON body must be its RFC 8785 canonical form)",
                staged.bucket, staged.name
            ))
            .into()),
            (Err(e), None) => Err(e),
        }
    }

    /// Removes a staged object (after its run is stored). A missing one is fine.
    pub async fn remove(&self, name: &str) -> Result<(), StagingError> {
        match self.store.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == nats_os::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.obj_err(name, e)),
        }
    }

    /// Stages blob `sha` of `store` under `out/<sha256>` for a reader, streaming it (a body
    /// already staged with that size is not written again). `None` when the blob is missing.
    pub async fn stage_blob(
        &self,
        store: &RunStore,
        sha: &Sha256Hex,
    ) -> Result<Option<StagedBody>, StoreError> {
        let name = format!("out/{sha}");
        let unavailable = |e: StagingError| StoreError::Unavailable(e.to_string());
        let Some(blob) = store.blob_stream(sha).await? else {
            return Ok(None);
        };
        if let Ok(info) = self.store.info(&name).await
            && info.size as u64 == blob.size
            && !info.deleted
        {
            return Ok(Some(StagedBody {
                bucket: self.bucket.clone(),
                name,
                sha256: sha.clone(),
                size_bytes: blob.size,
            }));
        }
        // A pipe between the store's stream and the object store's reader: bounded memory.
        let (mut tx, rx) = tokio::io::duplex(READ_CHUNK);
        let size = blob.size;
        let mut chunks = blob.bytes;
        let feed = async move {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                tx.write_all(&chunk)
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("staging pipe: {e}")))?;
            }
            tx.shutdown()
                .await
                .map_err(|e| StoreError::Unavailable(format!("staging pipe: {e}")))?;
            Ok::<(), StoreError>(())
        };
        // The reader moves into the put, so a put that fails drops it and ends the feed.
        let put = async move {
            let mut rx = rx;
            self.put(&name, &mut rx, sha.clone(), size).await
        };
        let (fed, put) = tokio::join!(feed, put);
        fed?;
        put.map(Some).map_err(unavailable)
    }
}

/// Passes `bytes` through `checker` (when there is one): bytes that are not canonical JSON
/// end the stream with an error, and `fault` says why. The check of the end of the body runs
/// before the stream ends, so the store never completes an upload of a body that fails it.
fn checked<S>(
    bytes: S,
    checker: Option<CanonicalCheck>,
    fault: Arc<Mutex<Option<NotCanonical>>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin
where
    S: futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    let failed = move |e: NotCanonical| {
        let reason = e.to_string();
        if let Ok(mut f) = fault.lock() {
            *f = Some(e);
        }
        std::io::Error::other(reason)
    };
    Box::pin(futures::stream::unfold(
        (bytes, checker, false, failed),
        |(mut bytes, mut checker, ended, failed)| async move {
            if ended {
                return None;
            }
            match bytes.next().await {
                Some(Ok(chunk)) => match checker.as_mut().map(|c| c.feed(&chunk)) {
                    Some(Err(e)) => Some((Err(failed(e)), (bytes, checker, true, failed))),
                    _ => Some((Ok(chunk), (bytes, checker, false, failed))),
                },
                Some(Err(e)) => Some((Err(e), (bytes, checker, true, failed))),
                None => match checker.as_mut().map(CanonicalCheck::finish) {
                    Some(Err(e)) => Some((Err(failed(e)), (bytes, checker, true, failed))),
                    _ => None,
                },
            }
        },
    ))
}

/// Bytes a command's headers may take beside its payload in one message.
const HEADROOM: usize = 1024;

/// Whether a payload of `len` bytes fits one message under `max_payload`, with its headers.
pub fn fits(len: usize, max_payload: usize) -> bool {
    len.saturating_add(HEADROOM) <= max_payload
}

/// The bytes `v` serializes to (counted, not kept).
pub fn json_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

impl Staging {
    /// Moves the bodies of a `kind` command (JSON object `v`) into the bucket, one at a time
    /// until the command fits one message under `max_payload`: a create's `gcode_text` (as
    /// its UTF-8 bytes, to `outputs.gcode_ref`), then its `opplan_json` (as its RFC 8785
    /// canonical bytes, to `outputs.opplan_ref`); an advisory's `body` (canonical bytes, to
    /// `body_ref`). Objects are named `in/<sha256>`, so a retry sends the same command.
    /// Returns whether anything was staged. A body of the wrong type is left in place for the
    /// worker to name.
    pub async fn stage_bodies(
        &self,
        kind: CommandKind,
        v: &mut serde_json::Value,
        max_payload: usize,
    ) -> Result<bool, StagingError> {
        use serde_json::Value;
        let moves: &[(&str, &str, &str)] = match kind {
            CommandKind::Create => &[
                ("outputs", "gcode_text", "gcode_ref"),
                ("outputs", "opplan_json", "opplan_ref"),
            ],
            CommandKind::Advisory => &[("", "body", "body_ref")],
            CommandKind::PatchMeta | CommandKind::Delete => &[],
        };
        let mut staged = false;
        for (parent, from, to) in moves {
            if fits(json_len(v), max_payload) {
                break;
            }
            let holder = if parent.is_empty() {
                v.as_object_mut()
            } else {
                v.get_mut(*parent).and_then(Value::as_object_mut)
            };
            let Some(holder) = holder else { continue };
            let body = match holder.remove(*from) {
                // G-code is stored exactly as published; JSON as its canonical form.
                Some(Value::String(text)) if *from == "gcode_text" => text.into_bytes(),
                Some(plan @ Value::Object(_)) if *from == "opplan_json" => canonical_json(&plan),
                Some(body) if *from == "body" => canonical_json(&body),
                Some(other) => {
                    holder.insert((*from).to_owned(), other);
                    continue;
                }
                None => continue,
            };
            let r = self.put_bytes("in/", &body).await?;
            drop(body);
            let r = serde_json::to_value(&r).map_err(|e| self.obj_err(&r.name, e))?;
            holder.insert((*to).to_owned(), r);
            staged = true;
        }
        Ok(staged)
    }
}

/// What a publisher does before sending a command larger than the broker's `max_payload`:
/// moves its large bodies into the staging bucket ([`Staging::stage_bodies`]). Returns the
/// payload to send (unchanged when it fits, or when it is not a JSON object: the worker names
/// what is wrong with it).
pub async fn stage_large_payload(
    js: &jetstream::Context,
    bucket: &str,
    kind: CommandKind,
    payload: Vec<u8>,
    max_payload: usize,
) -> Result<Vec<u8>, StagingError> {
    if fits(payload.len(), max_payload) {
        return Ok(payload);
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&payload) else {
        return Ok(payload);
    };
    if !v.is_object() {
        return Ok(payload);
    }
    let staging = Staging::open(js, bucket).await?;
    if !staging.stage_bodies(kind, &mut v, max_payload).await? {
        return Ok(payload);
    }
    Ok(serde_json::to_vec(&v).unwrap_or(payload))
}

/// Copies a staged body to `out` (the CLI's stdout), checking its size and SHA-256 as it
/// passes: an `Err` after some bytes were written means what was written is not the body.
pub async fn fetch_staged(
    js: &jetstream::Context,
    staged: &StagedBody,
    out: &mut impl std::io::Write,
) -> Result<(), StagingError> {
    let staging = Staging::open(js, &staged.bucket).await?;
    let mut bytes = staging.read(&staged.name).await?;
    let mut hasher = Sha256::new();
    let mut seen = 0u64;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| staging.obj_err(&staged.name, e))?;
        hasher.update(&chunk);
        seen += chunk.len() as u64;
        out.write_all(&chunk)
            .map_err(|e| staging.obj_err(&staged.name, format!("writing out: {e}")))?;
    }
    out.flush()
        .map_err(|e| staging.obj_err(&staged.name, format!("writing out: {e}")))?;
    let actual = hex::encode(hasher.finalize());
    if seen != staged.size_bytes || actual != staged.sha256.as_str() {
        return Err(staging.obj_err(
            &staged.name,
            format!(
                "{seen} bytes hashing to {actual}, not the announced {} bytes hashing to {}",
                staged.size_bytes, staged.sha256
            ),
        ));
    }
    Ok(())
}
