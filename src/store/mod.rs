//! The store layer: [`RunStore`] over any `object_store` backend.
//!
//! Layout under the store's prefix (a JSON data directory of the original FastAPI service is readable as it is):
//!
//! ```text
//! <run_id>.json                 the run (or its tombstone)
//! blobs/<sha256>                bodies over the blob threshold, content-addressed
//! blobrefs/<sha256>/<run_id>    one empty marker per run referencing a blob (see [`blobs`])
//! blobrefs/_complete            every run's references have markers: releases may remove blobs
//! parked/<sha256>/<nonce>       a blob being released, kept until its release is settled
//! index/{time,by-tool,by-id}/...  the listing index: one empty object per run and tree,
//!                               whose name is the run's summary (see [`index`])
//! index/journal/<writer>-<seq>.log  local store: index changes `serve` has not yet folded
//!                               into the trees (see [`journal`])
//! history/<run_id>/<revision>.json  every revision, immutable: the audit trail and its hash
//!                               chain (see [`history`])
//! _probe/<random>               short-lived objects of the start-up probe
//! dead_letters/<date>/<id>.json  rejected commands, kept as received with the reason
//! ```
//!
//! Every change is a conditional put: create-if-absent for a new run, update-if-unchanged
//! (ETag) for an existing one. A lost race reloads, re-decides and retries with jittered
//! exponential backoff, a bounded number of times.

mod blobs;
pub mod error;
pub mod history;
pub mod index;
pub mod journal;
mod listing;
pub mod local;
pub mod maintenance;
pub mod scrub;
pub mod url;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use serde::{Deserialize, Serialize};

use crate::domain::artifact::{
    ExplanationStatus, RecordHead, RiskLevel, RunArtifact, RunStatus, SCHEMA_VERSION, Sha256Hex,
    StoredRecord, Timestamp,
};
use crate::domain::command::{Command, Context, Decision, EventKind};
use crate::domain::hashing::sha256_json;
use crate::domain::ids::{Mode, RunId, ToolId};
use crate::domain::verify::VerifyReport;

pub use error::StoreError;
pub use index::{Order, RunSummary};
pub use listing::{ReindexReport, RunIndexRepair};
pub use url::{OpenOptions, StoreUrl};

/// A record together with the version it was read at (for the conditional update).
#[derive(Clone, Debug)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// ETag / version of the object it came from.
    pub version: UpdateVersion,
}

/// How hard a change fights for a contended run before reporting `conflict`.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all (the first included).
    pub max_attempts: u32,
    /// First backoff delay.
    pub min_delay: Duration,
    /// Cap on a single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 100,
            min_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(200),
        }
    }
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The run.
    pub run_id: RunId,
    /// Its revision after the command.
    pub revision: u64,
    /// The event to announce.
    pub event: EventKind,
    /// False when the command had already been applied (redelivery).
    pub changed: bool,
    /// RFC 8785 SHA-256 of the stored record after the command.
    pub artifact_sha256: String,
    /// How many races were lost (and retried) on the way.
    pub conflicts: u32,
}

/// Filters, order and position of a listing (PROTOCOL.md, `rmos.runs.list`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size (1 to [`MAX_PAGE`], default [`DEFAULT_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The previous page's `next_cursor` (opaque). A run id is accepted too, as version 1
    /// cursors were, and continues in run id order after that run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Order: newest first (default), oldest first, or by run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// Only this mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Only this tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_id: Option<ToolId>,
    /// Only this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RunStatus>,
    /// Only this risk level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_level: Option<RiskLevel>,
    /// Only this explanation status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation_status: Option<ExplanationStatus>,
    /// Only runs created at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Only runs created before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

impl ListQuery {
    /// Parses a list request's JSON body; a rejection names the field at fault.
    pub fn parse(body: &str) -> Result<Self, crate::domain::error::Rejection> {
        use crate::domain::error::Rejection;
        let value: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| Rejection::invalid(format!("list request is not JSON: {e}")))?;
        let serde_json::Value::Object(fields) = &value else {
            return Err(Rejection::invalid("list request must be a JSON object"));
        };
        for (name, v) in fields {
            let one = serde_json::Value::Object([(name.clone(), v.clone())].into_iter().collect());
            if let Err(e) = serde_json::from_value::<ListQuery>(one) {
                return Err(Rejection::invalid(format!("list request: {name}: {e}")));
            }
        }
        serde_json::from_value(value).map_err(|e| Rejection::invalid(format!("list request: {e}")))
    }
}

/// Default page size.
pub const DEFAULT_PAGE: usize = 50;
/// Largest page size.
pub const MAX_PAGE: usize = 1000;
/// Index entries a single page may examine before it returns (possibly short, even empty)
/// with a cursor: what bounds the cost of a page whose filter matches few runs.
pub const SCAN_BUDGET: usize = 20_000;

/// A page of a listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListPage {
    /// Matching runs, in the listing's order.
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` to continue; `null` at the end.
    pub next_cursor: Option<String>,
    /// Runs left out because their record could not be read (see `verify`).
    #[serde(default)]
    pub skipped_corrupt: usize,
    /// False while the index of a store that had none is still being built (the listing may
    /// then miss runs); left out once it is complete.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub index_complete: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The run store.
#[derive(Clone)]
pub struct RunStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    sorted_listing: bool,
    /// The local backend, when it is one: the index reads its directories by name only.
    local: Option<local::LocalStore>,
    /// Set once `index/_built` has been seen (it is never removed).
    index_built: Arc<std::sync::atomic::AtomicBool>,
    /// Set once `blobrefs/_complete` has been seen (it is never removed): see [`blobs`].
    blob_refs_complete: Arc<std::sync::atomic::AtomicBool>,
    /// Whether commands maintain the index (off only in benchmarks measuring its cost).
    indexing: bool,
    /// On the local store in `serve`: index changes go to this journal (see [`journal`]).
    journal: Option<Arc<journal::IndexJournal>>,
    /// What this process has read of the index journals so far.
    pending_cache: Arc<std::sync::Mutex<journal::ReadState>>,
    /// One fold at a time in this process: a fold that returns has folded everything
    /// journaled before it began, even what a concurrent fold had sealed.
    fold_lock: Arc<tokio::sync::Mutex<()>>,
    /// Whether commands keep their revisions (off only in benchmarks measuring their cost).
    keeping_history: bool,
    /// Test-only: the process aborts right after claiming this revision of this run.
    crash_after_revision: Option<(RunId, u64)>,
    /// The key signing revisions, and the keys `verify` trusts.
    signing: Arc<history::Signing>,
    retry: RetryPolicy,
    url: String,
}

impl std::fmt::Debug for RunStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunStore({})", self.url)
    }
}

/// Options for a read nothing will be written back from (the store may skip the version).
pub(super) fn read_only() -> GetOptions {
    let mut options = GetOptions::default();
    options.extensions.insert(local::ReadOnlyGet);
    options
}

/// Maps the reason an object under `key` is not a valid record to the store's error.
fn corrupt(key: &Path) -> impl Fn(String) -> StoreError + '_ {
    move |reason| StoreError::Corrupt {
        key: key.to_string(),
        reason,
    }
}

/// A record stored under run `id`'s key must be that run's; anything else is corrupt.
fn owned_by(key: &Path, found: &RunId, id: &RunId) -> Result<(), StoreError> {
    if found == id {
        Ok(())
    } else {
        Err(corrupt(key)(format!("holds run {found} instead of {id}")))
    }
}

fn is_race(e: &object_store::Error) -> bool {
    // object_store 0.14 can surface a lost If-Match race as AlreadyExists (HTTP 409).
    matches!(
        e,
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }
    )
}

impl RunStore {
    /// Opens the store behind `url`. Call [`RunStore::probe`] before trusting it with writes.
    pub fn open(url: &StoreUrl, options: &OpenOptions) -> Result<Self, StoreError> {
        let backend = url::open_backend(url, options)?;
        Ok(Self {
            store: backend.store,
            prefix: backend.prefix,
            sorted_listing: backend.sorted_listing,
            local: backend.local,
            index_built: Arc::default(),
            blob_refs_complete: Arc::default(),
            indexing: true,
            journal: None,
            pending_cache: Arc::default(),
            fold_lock: Arc::default(),
            keeping_history: true,
            crash_after_revision: None,
            signing: Arc::default(),
            retry: RetryPolicy::default(),
            url: url.to_string(),
        })
    }

    /// A store over an existing backend (tests, tools).
    pub fn from_object_store(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        sorted_listing: bool,
    ) -> Self {
        Self {
            store,
            prefix,
            sorted_listing,
            local: None,
            index_built: Arc::default(),
            blob_refs_complete: Arc::default(),
            indexing: true,
            journal: None,
            pending_cache: Arc::default(),
            fold_lock: Arc::default(),
            keeping_history: true,
            crash_after_revision: None,
            signing: Arc::default(),
            retry: RetryPolicy::default(),
            url: "custom".to_owned(),
        }
    }

    /// A store whose commands leave the listing index alone. For benchmarks that measure what
    /// the index costs a write, never for a store anyone lists: its index would fall behind.
    pub fn without_index(mut self) -> Self {
        self.indexing = false;
        self
    }

    /// A store whose commands journal their index changes (local store only; elsewhere the
    /// store is returned as it is): one append per change instead of one file per entry,
    /// folded into the trees by [`RunStore::fold_index_journal`], which the owner must call
    /// every [`journal::FOLD_EVERY`] and once more before it exits. For `serve`.
    pub fn with_index_journal(mut self) -> Result<Self, StoreError> {
        if let Some(local) = &self.local {
            let dir = self.journal_dir(local)?;
            let journal = journal::IndexJournal::open(dir)
                .map_err(|e| self.io_err(e, "open the index journal"))?;
            self.journal = Some(Arc::new(journal));
        }
        Ok(self)
    }

    fn journal_dir(&self, local: &local::LocalStore) -> Result<std::path::PathBuf, StoreError> {
        local
            .fs_path(&index::under(&self.prefix, journal::JOURNAL_DIR))
            .map_err(|e| self.os_err(e, "locate the index journal"))
    }

    /// Folds this store's journal (if it keeps one) and any journal a dead process left into
    /// the index trees (see [`journal`]). Nothing to do on object stores.
    pub async fn fold_index_journal(&self) -> Result<journal::Folded, StoreError> {
        let Some(local) = self.local.clone() else {
            return Ok(journal::Folded::default());
        };
        let dir = self.journal_dir(&local)?;
        let journal = self.journal.clone();
        let prefix = self.prefix.clone();
        let _one_at_a_time = self.fold_lock.lock().await;
        tokio::task::spawn_blocking(move || {
            let sealed = match &journal {
                Some(j) => j.rotate()?,
                None => None,
            };
            journal::fold(&local, &prefix, &dir, journal.as_deref(), sealed)
        })
        .await
        .map_err(|e| self.io_err(std::io::Error::other(e), "fold the index journal"))?
        .map_err(|e| self.io_err(e, "fold the index journal"))
    }

    /// Folds this store's journal a last time and removes its file if nothing is left in it
    /// (a removal the fold carries forward stays, for the next fold anywhere). For a process
    /// that journaled and is about to exit.
    pub async fn close_index_journal(&self) -> Result<journal::Folded, StoreError> {
        let folded = self.fold_index_journal().await?;
        if let Some(j) = &self.journal {
            j.close()
                .map_err(|e| self.io_err(e, "close the index journal"))?;
        }
        Ok(folded)
    }

    /// The index changes journals hold and the trees do not yet (local store only).
    /// Only what was appended since the last call is read.
    pub(crate) fn pending_index(&self) -> Result<Arc<journal::Pending>, StoreError> {
        let Some(local) = &self.local else {
            return Ok(Arc::default());
        };
        let dir = self.journal_dir(local)?;
        let mut state = self
            .pending_cache
            .lock()
            .map_err(|_| StoreError::Unavailable("index journal reader lock poisoned".into()))?;
        journal::read_pending(&dir, &mut state)
            .map_err(|e| self.io_err(e, "read the index journal"))
    }

    /// A store whose commands keep no revision and link no hash chain. For benchmarks that
    /// measure what history costs a write, never for a store anyone audits.
    pub fn without_history(mut self) -> Self {
        self.keeping_history = false;
        self
    }

    /// Test-only: makes the process abort (as a kill -9 would end it: no unwinding, no
    /// cleanup) right after it has claimed `revision` of `run` and before it writes the record,
    /// so that a test can restart the worker on exactly that state. `serve` sets it only from
    /// `RMOS_TEST_CRASH_AFTER_REVISION=<run_id>:<revision>` with `RMOS_TEST_FAULTS=1`.
    pub fn crash_after_revision(mut self, run: RunId, revision: u64) -> Self {
        self.crash_after_revision = Some((run, revision));
        self
    }

    /// Signs every revision with `signing`'s key and checks signatures against its trusted keys.
    pub fn with_signing(mut self, signing: history::Signing) -> Self {
        self.signing = Arc::new(signing);
        self
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn key(&self, tail: &str) -> Path {
        let mut parts: Vec<object_store::path::PathPart<'_>> = self.prefix.parts().collect();
        for seg in tail.split('/') {
            parts.push(object_store::path::PathPart::from(seg));
        }
        Path::from_iter(parts)
    }

    /// The key of a run's record: `<prefix>/<run_id>.json`.
    pub fn artifact_key(&self, id: &RunId) -> Path {
        self.key(&format!("{id}.json"))
    }

    /// The key of a blob: `<prefix>/blobs/<sha256>`.
    pub fn blob_key(&self, sha: &Sha256Hex) -> Path {
        self.key(&format!("blobs/{sha}"))
    }

    fn os_err(&self, e: object_store::Error, what: &str) -> StoreError {
        StoreError::from_object_store(e, what)
    }

    /// A local filesystem error, classified as the backend's are.
    fn io_err(&self, e: std::io::Error, what: &str) -> StoreError {
        let e = object_store::Error::Generic {
            store: "LocalStore",
            source: Box::new(e),
        };
        StoreError::from_object_store(e, what)
    }

    /// Loads a run's record with its version; `None` when there is none.
    pub async fn load(&self, id: &RunId) -> Result<Option<Versioned<StoredRecord>>, StoreError> {
        self.read(id, GetOptions::default()).await
    }

    /// Reads a run's stored bytes with their version.
    async fn read_raw(
        &self,
        key: &Path,
        options: GetOptions,
    ) -> Result<Option<(UpdateVersion, Bytes)>, StoreError> {
        let got = match self.store.get_opts(key, options).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.os_err(e, &format!("read {key}"))),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.os_err(e, &format!("read {key}")))?;
        Ok(Some((version, bytes)))
    }

    /// Reads and decodes a run's record.
    async fn read(
        &self,
        id: &RunId,
        options: GetOptions,
    ) -> Result<Option<Versioned<StoredRecord>>, StoreError> {
        let key = self.artifact_key(id);
        let Some((version, bytes)) = self.read_raw(&key, options).await? else {
            return Ok(None);
        };
        let value = StoredRecord::decode(&bytes).map_err(corrupt(&key))?;
        owned_by(&key, value.run_id(), id)?;
        Ok(Some(Versioned { value, version }))
    }

    /// The live artifact of a run (`NotFound` when missing or deleted).
    pub async fn get(&self, id: &RunId) -> Result<RunArtifact, StoreError> {
        match self.read(id, read_only()).await? {
            Some(Versioned {
                value: StoredRecord::Live(a),
                ..
            }) => Ok(*a),
            _ => Err(StoreError::NotFound(id.clone())),
        }
    }

    /// The live artifact of a run as stored JSON (`NotFound` when missing or deleted).
    ///
    /// An object written at the current schema version is returned byte for byte, after
    /// checking only its head (this run, not a tombstone): it was encoded from a typed
    /// artifact, and `verify` is what checks its contents. Older objects (the original service's files)
    /// are decoded and encoded again, so readers see every field, with its default where the
    /// file had none (revision 1, for one).
    pub async fn get_bytes(&self, id: &RunId) -> Result<Bytes, StoreError> {
        let key = self.artifact_key(id);
        let Some((_, bytes)) = self.read_raw(&key, read_only()).await? else {
            return Err(StoreError::NotFound(id.clone()));
        };
        let head = RecordHead::peek(&bytes).map_err(corrupt(&key))?;
        owned_by(&key, &head.run_id, id)?;
        if head.tombstone {
            return Err(StoreError::NotFound(id.clone()));
        }
        if head.schema_version == SCHEMA_VERSION {
            return Ok(bytes);
        }
        match StoredRecord::decode(&bytes).map_err(corrupt(&key))? {
            live @ StoredRecord::Live(_) => Ok(Bytes::from(live.encode())),
            StoredRecord::Deleted(_) => Err(StoreError::NotFound(id.clone())),
        }
    }

    /// Applies a command: load, decide, write conditionally, retry lost races.
    pub async fn execute(&self, cmd: &Command, ctx: &Context) -> Result<Outcome, StoreError> {
        let id = cmd.run_id();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_jitter()
            .without_max_times()
            .build();
        let mut conflicts = 0u32;
        loop {
            let current = self.load(id).await?;
            let decision = cmd.decide(current.as_ref().map(|v| &v.value), ctx)?;
            let (mut record, blobs, event, released) = match decision {
                Decision::Unchanged { event } => {
                    let Some(cur) = current else {
                        return Err(StoreError::NotFound(id.clone()));
                    };
                    // A command seen before: its first delivery may have died before the
                    // index caught up with the record.
                    if self.indexing {
                        self.reconcile(id, Some(&cur.value), Timestamp::now(), true)
                            .await?;
                    }
                    return Ok(Outcome {
                        run_id: id.clone(),
                        revision: cur.value.revision(),
                        event,
                        changed: false,
                        artifact_sha256: record_sha256(&cur.value),
                        conflicts,
                    });
                }
                Decision::Write {
                    record,
                    blobs,
                    event,
                    released,
                } => (record, blobs, event, released),
            };
            for blob in &blobs {
                self.put_blob(id, blob).await?;
            }
            // References to blobs the command did not bring (claimed staged bodies).
            if let StoredRecord::Live(a) = &record {
                let had: Vec<&Sha256Hex> = match current.as_ref().map(|v| &v.value) {
                    Some(StoredRecord::Live(c)) => {
                        c.blob_refs().into_iter().map(|r| &r.sha256).collect()
                    }
                    _ => Vec::new(),
                };
                for r in a.blob_refs() {
                    if !had.contains(&&r.sha256) && !blobs.iter().any(|b| b.sha256 == r.sha256) {
                        self.require_blob(id, &r.sha256).await?;
                    }
                }
            }
            // The revision first (after its blobs, so a roll-forward finds them): it decides
            // which of two racing changes makes this revision (see `history`).
            // The outcome's hash (the stored event's): the revision's, computed once.
            let artifact_sha256 = if self.keeping_history {
                history::link(&mut record, current.as_ref().map(|v| &v.value));
                let mut rev = history::Revision::new(
                    &record,
                    event.as_str(),
                    ctx.now,
                    Some(ctx.request_id.to_string()),
                    ctx.command_id.as_ref().map(ToString::to_string),
                    ctx.stream.as_ref().map(|s| s.seq),
                )
                .with_actor(ctx.actor.as_ref().map(ToString::to_string));
                self.sign_revision(&mut rev)?;
                if !self.claim_revision(&rev, current.as_ref()).await? {
                    self.back_off(id, &mut conflicts, &mut delays, "revision taken")
                        .await?;
                    continue;
                }
                if self
                    .crash_after_revision
                    .as_ref()
                    .is_some_and(|(run, r)| run == id && *r == rev.revision)
                {
                    tracing::error!(run_id = %id, revision = rev.revision,
                        "test fault: aborting after the revision, before the record");
                    std::process::abort();
                }
                rev.artifact_sha256
            } else {
                record_sha256(&record)
            };
            // Index entries: the new ones go in before the record (a reader may briefly see a
            // run's next entry, never none), the old ones go after it. On the local store the
            // record's barrier makes the new entries durable with it.
            let old_entries = current
                .as_ref()
                .filter(|_| self.indexing)
                .map(|v| listing::entries_of(&v.value))
                .unwrap_or_default();
            let new_entries = if self.indexing {
                listing::entries_of(&record)
            } else {
                Vec::new()
            };
            let added: Vec<String> = new_entries
                .iter()
                .filter(|k| !old_entries.contains(k))
                .cloned()
                .collect();
            let gone: Vec<String> = old_entries
                .iter()
                .filter(|k| !new_entries.contains(k))
                .cloned()
                .collect();
            self.put_entries(&added).await?;
            // While the write waits (a group commit holds many at once), keep only the bytes
            // and what the outcome reports: decoded records are several times their size.
            let mode = match current {
                None => PutMode::Create,
                Some(v) => PutMode::Update(v.version),
            };
            let revision = record.revision();
            let key = self.artifact_key(id);
            let payload = PutPayload::from(record.encode());
            drop(record);
            match self
                .store
                .put_opts(&key, payload, PutOptions::from(mode))
                .await
            {
                Ok(_) => {
                    for blob in &blobs {
                        self.ensure_blob(blob).await?;
                    }
                    for sha in &released {
                        self.release_blob(sha, id).await?;
                    }
                    self.remove_entries(&gone).await?;
                    if ctx.redelivered && self.indexing {
                        // An earlier delivery may have died between its entries and its
                        // record, leaving entries no record backs.
                        self.reindex_run(id).await?;
                    }
                    return Ok(Outcome {
                        run_id: id.clone(),
                        revision,
                        event,
                        changed: true,
                        artifact_sha256,
                        conflicts,
                    });
                }
                Err(e) if is_race(&e) => {
                    // We hold the revision, so whoever changed the record rolled ours forward
                    // (then it is done, even if more changes followed) or wrote around the
                    // history (a restore, an edit by hand: then decide again).
                    let rolled = match self.load(id).await? {
                        Some(now) if now.value.revision() == revision => {
                            record_sha256(&now.value) == artifact_sha256
                        }
                        Some(now) if now.value.revision() > revision => self
                            .revision(id, revision)
                            .await?
                            .is_some_and(|r| r.artifact_sha256 == artifact_sha256),
                        _ => false,
                    };
                    if rolled {
                        for sha in &released {
                            self.release_blob(sha, id).await?;
                        }
                        self.remove_entries(&gone).await?;
                        return Ok(Outcome {
                            run_id: id.clone(),
                            revision,
                            event,
                            changed: true,
                            artifact_sha256,
                            conflicts,
                        });
                    }
                    // Another writer won: our entries describe a record that will never be.
                    self.remove_entries(&added).await?;
                    self.back_off(id, &mut conflicts, &mut delays, "lost a write race")
                        .await?;
                }
                // The outcome is unknown (a lost response may hide a write that landed): the
                // entries stay, and the redelivery's reconciliation settles them.
                Err(e) => return Err(self.os_err(e, &format!("write {key}"))),
            }
        }
    }

    /// Counts a lost race and waits its jittered delay; `Contention` once the policy's
    /// attempts are spent.
    async fn back_off(
        &self,
        id: &RunId,
        conflicts: &mut u32,
        delays: &mut impl Iterator<Item = Duration>,
        why: &str,
    ) -> Result<(), StoreError> {
        *conflicts += 1;
        if *conflicts >= self.retry.max_attempts {
            return Err(StoreError::Contention {
                run_id: id.clone(),
                attempts: *conflicts,
            });
        }
        let delay = delays.next().unwrap_or(self.retry.max_delay);
        tracing::debug!(run_id = %id, conflicts = *conflicts, ?delay, "{why}; retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Keeps a rejected command (dead letter) under `dead_letters/<date>/<name>.json`, so that
    /// nothing sent is lost. Returns the key.
    pub async fn put_dead_letter(
        &self,
        at: &Timestamp,
        name: &str,
        body: Vec<u8>,
    ) -> Result<String, StoreError> {
        let date = at.0.format("%Y-%m-%d");
        let key = self.key(&format!("dead_letters/{date}/{name}.json"));
        self.store
            .put(&key, PutPayload::from(body))
            .await
            .map_err(|e| self.os_err(e, &format!("write {key}")))?;
        Ok(key.to_string())
    }

    /// The artifact with its outputs' bodies put back inline (for `include_outputs`). A body
    /// whose blob is missing, or whose stored bytes are not what the artifact says (G-code that
    /// is not UTF-8, an op plan that is not JSON), is `Corrupt`: never silently left out.
    pub async fn inline_outputs(
        &self,
        mut artifact: RunArtifact,
    ) -> Result<RunArtifact, StoreError> {
        if let Some(r) = artifact.outputs.gcode_blob.clone() {
            let b = self
                .required_blob(&artifact.run_id, &r.sha256, "G-code")
                .await?;
            let text = String::from_utf8(b.to_vec()).map_err(|e| StoreError::Corrupt {
                key: self.blob_key(&r.sha256).to_string(),
                reason: format!("run {}: G-code blob is not UTF-8: {e}", artifact.run_id),
            })?;
            artifact.outputs.gcode_text = Some(text);
        }
        if let Some(r) = artifact.outputs.opplan_blob.clone() {
            let b = self
                .required_blob(&artifact.run_id, &r.sha256, "op plan")
                .await?;
            let plan = serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                key: self.blob_key(&r.sha256).to_string(),
                reason: format!("run {}: op plan blob is not JSON: {e}", artifact.run_id),
            })?;
            artifact.outputs.opplan_json = Some(plan);
        }
        Ok(artifact)
    }

    /// A blob a run references; its absence is a corrupt run, named as such.
    async fn required_blob(
        &self,
        run: &RunId,
        sha: &Sha256Hex,
        what: &str,
    ) -> Result<Bytes, StoreError> {
        self.get_blob(sha)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                key: self.blob_key(sha).to_string(),
                reason: format!("run {run}: its {what} blob is missing"),
            })
    }

    /// Recomputes every hash of a run, blobs included.
    pub async fn verify(&self, id: &RunId) -> Result<VerifyReport, StoreError> {
        let artifact = self.get(id).await?;
        self.verify_artifact(&artifact).await
    }

    /// Checks that the backend honours conditional writes: a second create-if-absent must fail
    /// and an update with a stale version must fail. A store that ignores them would turn every
    /// race into a lost update, so the worker refuses to start on it.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let n: u64 = rand::random();
        let key = self.key(&format!("_probe/{n:016x}"));
        let create = || PutOptions::from(PutMode::Create);
        let first = self
            .store
            .put_opts(&key, PutPayload::from_static(b"1"), create())
            .await
            .map_err(|e| match self.os_err(e, &format!("write probe {key}")) {
                StoreError::Unavailable(m) => StoreError::Unusable(format!("not writable: {m}")),
                other => other,
            })?;
        let cleanup = || async {
            let _ = self.store.delete(&key).await;
        };
        match self
            .store
            .put_opts(&key, PutPayload::from_static(b"2"), create())
            .await
        {
            Err(e) if is_race(&e) => {}
            Ok(_) => {
                cleanup().await;
                return Err(StoreError::Unusable(format!(
                    "{} ignores conditional writes (If-None-Match): a second create of {key} succeeded",
                    self.url
                )));
            }
            Err(e) => {
                cleanup().await;
                return Err(self.os_err(e, "probe create"));
            }
        }
        let v1 = UpdateVersion::from(first);
        let second = self
            .store
            .put_opts(
                &key,
                PutPayload::from_static(b"3"),
                PutOptions::from(PutMode::Update(v1.clone())),
            )
            .await
            .map_err(|e| {
                StoreError::Unusable(format!(
                    "{} cannot update conditionally (If-Match): {e}",
                    self.url
                ))
            });
        if let Err(e) = second {
            cleanup().await;
            return Err(e);
        }
        let stale = self
            .store
            .put_opts(
                &key,
                PutPayload::from_static(b"4"),
                PutOptions::from(PutMode::Update(v1)),
            )
            .await;
        cleanup().await;
        match stale {
            Err(e) if is_race(&e) => Ok(()),
            Ok(_) => Err(StoreError::Unusable(format!(
                "{} ignores conditional writes (If-Match): an update with a stale ETag succeeded",
                self.url
            ))),
            Err(e) => Err(self.os_err(e, "probe update")),
        }
    }
}

/// RFC 8785 SHA-256 of a stored record (the `artifact_sha256` of events).
pub fn record_sha256(record: &StoredRecord) -> String {
    let value = match record {
        StoredRecord::Live(a) => serde_json::to_value(a),
        StoredRecord::Deleted(t) => serde_json::to_value(t),
    }
    .unwrap_or(serde_json::Value::Null);
    sha256_json(&value)
}
