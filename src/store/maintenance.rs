//! Operator maintenance on a [`RunStore`], without the broker: retention ([`gc`] and the
//! worker's [`retention_loop`]), backup / restore between any two stores ([`transfer`]), and
//! the import of a data directory written by the original FastAPI service's JSON store ([`import_dir`]).
//!
//! * **Retention** deletes each expired run through [`RunStore::execute`] with a `delete`
//!   command (reason `retention`), exactly like the `delete` subject: the run becomes a
//!   tombstone and the blobs only it referenced are released. On a store whose index is
//!   complete, a pass finds its candidates in the index (the runs created before the cutoff,
//!   oldest first) and reads only their records, so its cost follows what expires, not the
//!   store's size; a full scan (`--full-scan`, or an index still being built) reads every
//!   record and also counts tombstones and reports corrupt records, which are never deleted.
//! * **Transfer** copies blobs, then blob-reference markers, then run records (live and
//!   tombstones), then dead letters, so that an interrupted copy never leaves a record whose
//!   blob is missing at the destination. Every object is read and checked at the source
//!   (blobs hash to their name; records decode, name their own run and pass `verify` against
//!   the source's blobs). An object already present at the destination with the same size and
//!   SHA-256 is skipped, which makes a rerun incremental and resumable. New objects are written
//!   create-if-absent; a different object at the destination is a conflict, except that a
//!   run record whose destination revision is lower is moved forward (conditional update), and
//!   `overwrite` replaces anything (conditional on the version that was compared).
//! * **Import** writes each `<run_id>.json` of a JSON data directory of the original FastAPI service verbatim (it is the historical
//!   record), create-if-absent, and reports each file's outcome and `verify` status; anything
//!   that cannot be imported is reported with its reason.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::Serialize;
use tokio::sync::watch;

use super::{ListQuery, MAX_PAGE, Order, RunStore, StoreError, Versioned, index};
use crate::domain::artifact::{Sha256Hex, StoredRecord, Timestamp};
use crate::domain::command::{Command, Context, DeleteRun};
use crate::domain::hashing::sha256_bytes;
use crate::domain::ids::RunId;
use crate::domain::verify::{CheckStatus, VerifyReport};

/// Objects read or written at once by the maintenance operations.
const CONCURRENCY: usize = 8;

/// The shortest age retention accepts: a smaller value is almost certainly a typo (a bare
/// `90` is 90 seconds) and would delete nearly every run.
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);

/// Checks a retention age (`--older-than`, config `retention`).
pub fn check_retention(age: Duration) -> Result<(), String> {
    if age < MIN_RETENTION {
        Err(format!(
            "{}s is shorter than the 1h minimum; use e.g. 90d",
            age.as_secs()
        ))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

/// What a retention pass does.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Live runs created strictly before this instant are deleted.
    pub cutoff: Timestamp,
    /// Report what would be deleted; change nothing.
    pub dry_run: bool,
    /// The tombstones' `reason`.
    pub reason: String,
    /// Read every record instead of asking the index for the runs created before the cutoff.
    pub full_scan: bool,
}

impl GcOptions {
    /// Runs older than `age` (cutoff = now - age), reason `retention`.
    pub fn older_than(age: Duration, dry_run: bool) -> Self {
        let now = Timestamp::now();
        let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let cutoff = now
            .0
            .checked_sub_signed(age)
            .unwrap_or(chrono::DateTime::UNIX_EPOCH);
        Self {
            cutoff: Timestamp(cutoff),
            dry_run,
            reason: "retention".to_owned(),
            full_scan: false,
        }
    }
}

/// An object a maintenance operation could not handle, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyError {
    /// The object's key, relative to the store's prefix (or the file name, for import).
    pub key: String,
    /// Why.
    pub reason: String,
}

/// The outcome of one retention pass.
#[derive(Clone, Debug, Serialize)]
pub struct GcReport {
    /// The cutoff applied.
    pub cutoff: Timestamp,
    /// True when nothing was changed.
    pub dry_run: bool,
    /// True when the candidates came from the index (only the records of runs created before
    /// the cutoff were read); false when every record was read (a full scan).
    pub from_index: bool,
    /// Run records read.
    pub examined: usize,
    /// Records that were already tombstones (a full scan counts them all; the index lists
    /// only live runs, so a pass from the index counts those deleted meanwhile).
    pub tombstones: usize,
    /// Runs deleted by this pass.
    pub deleted: Vec<RunId>,
    /// Revisions removed with the deleted runs (retention removes a run's history; its
    /// tombstone keeps the hash of the last revision).
    pub history_removed: usize,
    /// Runs a dry run would delete.
    pub would_delete: Vec<RunId>,
    /// Records that could not be read or deleted (corrupt, store errors).
    pub errors: Vec<KeyError>,
    /// True when a stop request ended the pass early.
    pub interrupted: bool,
}

impl GcReport {
    /// True when nothing failed.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, ids) = if self.dry_run {
            ("would delete", &self.would_delete)
        } else {
            ("deleted", &self.deleted)
        };
        writeln!(
            f,
            "gc{} cutoff {}: examined {} runs {}({} already tombstones), {verb} {} (and {} \
             history revisions), {} errors{}",
            if self.dry_run { " (dry run)" } else { "" },
            self.cutoff,
            self.examined,
            if self.from_index {
                "created before it, from the index "
            } else {
                "(every record) "
            },
            self.tombstones,
            ids.len(),
            self.history_removed,
            self.errors.len(),
            if self.interrupted {
                ", interrupted"
            } else {
                ""
            },
        )?;
        for id in ids {
            writeln!(f, "  {verb} {id}")?;
        }
        for e in &self.errors {
            writeln!(f, "  error {}: {}", e.key, e.reason)?;
        }
        Ok(())
    }
}

enum GcItem {
    Kept,
    Tombstone,
    Expired(RunId),
    /// Deleted, with this many history revisions.
    Deleted(RunId, usize),
    Error(KeyError),
}

/// The name of a run's record (`<run_id>.json`), if `name` is one.
fn record_name(name: &str) -> Option<RunId> {
    RunId::parse(name.strip_suffix(".json")?).ok()
}

impl RunStore {
    /// Whether the store holds at least one run's record (live, tombstone or corrupt). Cheap
    /// at any size: on the local store one directory read that stops at the first record;
    /// elsewhere one LIST from the first key a record can have (records are the last keys at
    /// the top level).
    pub async fn holds_runs(&self) -> Result<bool, StoreError> {
        if let Some(local) = &self.local {
            let dir = if self.prefix.as_ref().is_empty() {
                local.root().to_path_buf()
            } else {
                local
                    .fs_path(&self.prefix)
                    .map_err(|e| self.os_err(e, "locate the store"))?
            };
            let entries = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(self.io_err(e, "list runs")),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io_err(e, "list runs"))?;
                if entry.file_name().to_str().and_then(record_name).is_some() {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let depth = self.prefix.parts().count() + 1;
        // Every key before `run_` at the top level is a directory (blobs/, index/, ...).
        let offset = index::under(&self.prefix, "run_");
        let mut listed = self.store.list_with_offset(prefix, &offset);
        while let Some(meta) = listed
            .try_next()
            .await
            .map_err(|e| self.os_err(e, "list runs"))?
        {
            if meta.location.parts().count() == depth
                && meta.location.filename().and_then(record_name).is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Every run id with a record at the top level of the store (live, tombstone or corrupt).
pub(super) async fn run_ids(store: &RunStore) -> Result<Vec<RunId>, StoreError> {
    let prefix = (!store.prefix.as_ref().is_empty()).then_some(&store.prefix);
    let depth = store.prefix.parts().count() + 1;
    let listed = store
        .store
        .list_with_delimiter(prefix)
        .await
        .map_err(|e| store.os_err(e, "list runs"))?;
    let mut ids: Vec<RunId> = listed
        .objects
        .iter()
        .filter(|m| m.location.parts().count() == depth)
        .filter_map(|m| record_name(m.location.filename()?))
        .collect();
    ids.sort();
    Ok(ids)
}

/// One retention pass: deletes (or, dry, lists) every live run created before the cutoff.
/// `stop`, when given and set, ends the pass after the deletions in flight.
pub async fn gc(
    store: &RunStore,
    opts: &GcOptions,
    stop: Option<watch::Receiver<bool>>,
) -> Result<GcReport, StoreError> {
    let from_index = !opts.full_scan && store.index_complete().await?;
    let ids = if from_index {
        created_before(store, opts.cutoff).await?
    } else {
        run_ids(store).await?
    };
    let stopped = move || stop.as_ref().is_some_and(|s| *s.borrow());
    let stopped_in_stream = stopped.clone();
    let items: Vec<GcItem> = futures::stream::iter(ids)
        .take_while(move |_| futures::future::ready(!stopped_in_stream()))
        .map(|id| gc_one(store, opts, id))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut report = GcReport {
        cutoff: opts.cutoff,
        dry_run: opts.dry_run,
        from_index,
        examined: 0,
        tombstones: 0,
        deleted: Vec::new(),
        history_removed: 0,
        would_delete: Vec::new(),
        errors: Vec::new(),
        interrupted: stopped(),
    };
    for item in items {
        report.examined += 1;
        match item {
            GcItem::Kept => {}
            GcItem::Tombstone => report.tombstones += 1,
            GcItem::Expired(id) => report.would_delete.push(id),
            GcItem::Deleted(id, revisions) => {
                report.deleted.push(id);
                report.history_removed += revisions;
            }
            GcItem::Error(e) => report.errors.push(e),
        }
    }
    report.deleted.sort();
    report.would_delete.sort();
    report.errors.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

/// The runs the index lists as created before `cutoff`, sorted by id: a listing's pages of
/// 1,000, oldest first, each costing what a page costs (README), whatever the store's size.
async fn created_before(store: &RunStore, cutoff: Timestamp) -> Result<Vec<RunId>, StoreError> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListQuery {
                limit: Some(MAX_PAGE),
                order: Some(Order::Oldest),
                until: Some(cutoff),
                cursor,
                ..Default::default()
            })
            .await?;
        ids.extend(page.runs.into_iter().map(|r| r.run_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    // In id order, as a full scan takes them.
    ids.sort();
    Ok(ids)
}

async fn gc_one(store: &RunStore, opts: &GcOptions, id: RunId) -> GcItem {
    let key = format!("{id}.json");
    let err = |reason: String| {
        GcItem::Error(KeyError {
            key: key.clone(),
            reason,
        })
    };
    let created = match store.load(&id).await {
        Ok(Some(Versioned {
            value: StoredRecord::Live(a),
            ..
        })) => a.created_at_utc,
        Ok(Some(_)) => return GcItem::Tombstone,
        Ok(None) => return GcItem::Kept, // deleted by someone else since the listing
        Err(e) => return err(e.to_string()),
    };
    if created >= opts.cutoff {
        return GcItem::Kept;
    }
    if opts.dry_run {
        return GcItem::Expired(id);
    }
    let cmd = Command::Delete(DeleteRun {
        run_id: id.clone(),
        reason: opts.reason.clone(),
    });
    match store.execute(&cmd, &Context::now()).await {
        Ok(out) if out.changed => match store.remove_history(&id).await {
            Ok(revisions) => {
                tracing::info!(run_id = %id, created_at_utc = %created, revisions,
                    "retention: run deleted with its history");
                GcItem::Deleted(id, revisions)
            }
            Err(e) => err(format!("deleted, but its history was not removed: {e}")),
        },
        Ok(_) => GcItem::Tombstone,
        Err(e) => err(format!("delete: {e}")),
    }
}

/// When the worker's retention runs.
#[derive(Clone, Debug)]
pub struct RetentionSchedule {
    /// Runs older than this are deleted.
    pub max_age: Duration,
    /// Delay before the first pass after start.
    pub first_after: Duration,
    /// Delay between passes.
    pub every: Duration,
}

impl RetentionSchedule {
    /// The worker's schedule: first pass a minute after start, then hourly.
    pub fn hourly(max_age: Duration) -> Self {
        Self {
            max_age,
            first_after: Duration::from_secs(60),
            every: Duration::from_secs(3600),
        }
    }
}

/// Runs [`gc`] on `schedule` until `stop` turns true (or its sender is dropped). A pass in
/// progress finishes the deletions it has in flight, then the loop returns.
pub async fn retention_loop(
    store: RunStore,
    schedule: RetentionSchedule,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = schedule.first_after;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let opts = GcOptions::older_than(schedule.max_age, false);
        match gc(&store, &opts, Some(stop.clone())).await {
            Ok(r) if r.ok() => tracing::info!(
                cutoff = %r.cutoff, examined = r.examined, deleted = r.deleted.len(),
                "retention pass done"
            ),
            Ok(r) => tracing::warn!(
                cutoff = %r.cutoff, examined = r.examined, deleted = r.deleted.len(),
                errors = ?r.errors, "retention pass done with errors"
            ),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
        if *stop.borrow() {
            return;
        }
        delay = schedule.every;
    }
}

// ---------------------------------------------------------------------------------------------
// Backup / restore
// ---------------------------------------------------------------------------------------------

/// The kinds of object a transfer copies, in the order it copies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// `blobs/<sha256>`
    Blob,
    /// `blobrefs/<sha256>/<run_id>`
    BlobRef,
    /// `history/<run_id>/<revision>.json`: before the records, so a copied record's chain is
    /// there.
    History,
    /// `<run_id>.json`, live or tombstone.
    Record,
    /// `dead_letters/<date>/<name>.json`
    DeadLetter,
}

/// How a transfer treats objects already present at the destination.
#[derive(Clone, Debug, Default)]
pub struct TransferOptions {
    /// Replace destination objects that differ (after comparing them), instead of reporting a
    /// conflict.
    pub overwrite: bool,
}

/// Counts for one kind of object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCounts {
    /// Written where absent.
    pub copied: usize,
    /// Destination record moved forward to the source's newer revision.
    pub updated: usize,
    /// Different destination object replaced (`overwrite`).
    pub overwritten: usize,
    /// Already present with identical bytes.
    pub skipped: usize,
    /// Failed a check at the source, or could not be read or written.
    pub failed: usize,
    /// Present at the destination with different bytes; left alone.
    pub conflicts: usize,
    /// Listed at the source but gone when read (a concurrent delete).
    pub vanished: usize,
}

/// What kind of problem an object had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Not copied: failed a check, or a read or write failed.
    Failed,
    /// Not copied: the destination holds a different object.
    Conflict,
    /// Copied, but a legacy record without some hashes (nothing to check them against).
    Unverified,
}

/// One object that did not simply copy or skip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Key relative to the store's prefix.
    pub key: String,
    /// What happened.
    pub kind: ProblemKind,
    /// Why.
    pub reason: String,
}

/// The outcome of a backup or restore.
#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    /// Source store URL.
    pub source: String,
    /// Destination store URL.
    pub destination: String,
    /// Totals over every kind.
    pub total: KindCounts,
    /// Counts per kind.
    pub by_kind: BTreeMap<ObjectKind, KindCounts>,
    /// Failures, conflicts and unverified legacy records.
    pub problems: Vec<Problem>,
    /// Source objects outside the store layout, not copied.
    pub ignored: Vec<String>,
}

impl TransferReport {
    /// True when nothing failed and nothing conflicted.
    pub fn ok(&self) -> bool {
        self.total.failed == 0 && self.total.conflicts == 0
    }
}

impl fmt::Display for TransferReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.total;
        writeln!(
            f,
            "{} -> {}: copied {}, updated {}, overwritten {}, skipped {}, failed {}, conflicts {}, vanished {}",
            self.source,
            self.destination,
            t.copied,
            t.updated,
            t.overwritten,
            t.skipped,
            t.failed,
            t.conflicts,
            t.vanished
        )?;
        for p in &self.problems {
            let kind = match p.kind {
                ProblemKind::Failed => "failed",
                ProblemKind::Conflict => "conflict",
                ProblemKind::Unverified => "unverified",
            };
            writeln!(f, "  {kind} {}: {}", p.key, p.reason)?;
        }
        for k in &self.ignored {
            writeln!(f, "  ignored {k}: not part of the store layout")?;
        }
        Ok(())
    }
}

enum Written {
    Copied,
    Updated,
    Overwritten,
    Skipped,
    Vanished,
}

struct CopyResult {
    outcome: Result<Written, (ProblemKind, String)>,
    /// A legacy record copied without some hashes.
    unverified: Option<String>,
}

impl CopyResult {
    fn fail(reason: impl Into<String>) -> Self {
        CopyResult {
            outcome: Err((ProblemKind::Failed, reason.into())),
            unverified: None,
        }
    }
    fn conflict(reason: impl Into<String>) -> Self {
        CopyResult {
            outcome: Err((ProblemKind::Conflict, reason.into())),
            unverified: None,
        }
    }
    fn done(c: Written) -> Self {
        CopyResult {
            outcome: Ok(c),
            unverified: None,
        }
    }
}

/// A key below a store's prefix, as its parts.
type RelKey = Vec<PathPart<'static>>;

fn rel_text(rel: &RelKey) -> String {
    rel.iter().map(|p| p.as_ref()).collect::<Vec<_>>().join("/")
}

fn under(store: &RunStore, rel: &RelKey) -> Path {
    Path::from_iter(store.prefix.parts().chain(rel.iter().cloned()))
}

/// Where an object belongs in the layout; `None` for objects that are not copied at all
/// (the probe's and the local lock files), `Some(Err)` for unknown objects.
fn classify(rel: &RelKey) -> Option<Result<ObjectKind, ()>> {
    let parts: Vec<&str> = rel.iter().map(|p| p.as_ref()).collect();
    let first = *parts.first()?;
    // The index is derived from the records: the destination's is kept by its own writes.
    // Parked blobs are a release in progress; the reference flag is the destination's own
    // (its worker's first reindex writes it).
    if first == "_probe"
        || first == "parked"
        || first == super::index::INDEX_DIR
        || first.starts_with('.')
    {
        return None;
    }
    if parts.as_slice() == ["blobrefs", "_complete"] {
        return None;
    }
    let kind = match parts.as_slice() {
        [name]
            if name
                .strip_suffix(".json")
                .is_some_and(|s| RunId::parse(s).is_ok()) =>
        {
            ObjectKind::Record
        }
        ["blobs", _] => ObjectKind::Blob,
        ["blobrefs", _, _] => ObjectKind::BlobRef,
        ["history", _, _] => ObjectKind::History,
        ["dead_letters", _, ..] => ObjectKind::DeadLetter,
        _ => return Some(Err(())),
    };
    Some(Ok(kind))
}

async fn read_object(
    store: &RunStore,
    key: &Path,
) -> Result<Option<(Bytes, UpdateVersion)>, String> {
    match store.store.get(key).await {
        Ok(g) => {
            let version = UpdateVersion {
                e_tag: g.meta.e_tag.clone(),
                version: g.meta.version.clone(),
            };
            g.bytes()
                .await
                .map(|b| Some((b, version)))
                .map_err(|e| format!("read {key}: {e}"))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(format!("read {key}: {e}")),
    }
}

/// Copies every object of `src` to `dst` (see the module docs for the rules).
pub async fn transfer(
    src: &RunStore,
    dst: &RunStore,
    opts: &TransferOptions,
) -> Result<TransferReport, StoreError> {
    let prefix = (!src.prefix.as_ref().is_empty()).then_some(&src.prefix);
    let depth = src.prefix.parts().count();
    let listed: Vec<object_store::ObjectMeta> = src
        .store
        .list(prefix)
        .try_collect()
        .await
        .map_err(|e| src.os_err(e, "list source"))?;
    let mut report = TransferReport {
        source: src.url().to_owned(),
        destination: dst.url().to_owned(),
        total: KindCounts::default(),
        by_kind: BTreeMap::new(),
        problems: Vec::new(),
        ignored: Vec::new(),
    };
    let mut work: BTreeMap<ObjectKind, Vec<RelKey>> = BTreeMap::new();
    for m in listed {
        let rel: RelKey = m
            .location
            .parts()
            .skip(depth)
            .map(|p| PathPart::from(p.as_ref().to_owned()))
            .collect();
        match classify(&rel) {
            None => {}
            Some(Err(())) => report.ignored.push(rel_text(&rel)),
            Some(Ok(kind)) => work.entry(kind).or_default().push(rel),
        }
    }
    report.ignored.sort();
    // BTreeMap order is the copy order: blobs, markers, history, records, dead letters.
    for (kind, keys) in work {
        let results: Vec<(String, CopyResult)> = futures::stream::iter(keys)
            .map(|rel| async move {
                let r = copy_one(src, dst, kind, &rel, opts).await;
                (rel_text(&rel), r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let counts = report.by_kind.entry(kind).or_default();
        for (key, r) in results {
            if let Some(reason) = r.unverified {
                report.problems.push(Problem {
                    key: key.clone(),
                    kind: ProblemKind::Unverified,
                    reason,
                });
            }
            match r.outcome {
                Ok(Written::Copied) => counts.copied += 1,
                Ok(Written::Updated) => counts.updated += 1,
                Ok(Written::Overwritten) => counts.overwritten += 1,
                Ok(Written::Skipped) => counts.skipped += 1,
                Ok(Written::Vanished) => counts.vanished += 1,
                Err((kind, reason)) => {
                    match kind {
                        ProblemKind::Conflict => counts.conflicts += 1,
                        _ => counts.failed += 1,
                    }
                    report.problems.push(Problem { key, kind, reason });
                }
            }
        }
    }
    for c in report.by_kind.values() {
        let t = &mut report.total;
        t.copied += c.copied;
        t.updated += c.updated;
        t.overwritten += c.overwritten;
        t.skipped += c.skipped;
        t.failed += c.failed;
        t.conflicts += c.conflicts;
        t.vanished += c.vanished;
    }
    report.problems.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

/// How a source object passed its checks.
struct Checked {
    /// For records: the decoded record (for the revision comparison at the destination).
    record: Option<StoredRecord>,
    /// Hash checks that could not run (legacy record without the hash).
    unverified: Option<String>,
}

/// Checks a source object before it is copied.
async fn check_source(
    src: &RunStore,
    kind: ObjectKind,
    rel: &RelKey,
    bytes: &[u8],
) -> Result<Checked, String> {
    let parts: Vec<&str> = rel.iter().map(|p| p.as_ref()).collect();
    let ok = Checked {
        record: None,
        unverified: None,
    };
    match kind {
        ObjectKind::Blob => {
            let name = Sha256Hex::parse(parts[1]).map_err(|r| r.message)?;
            let actual = sha256_bytes(bytes);
            if actual != name.as_str() {
                return Err(format!("blob content hashes to {actual}, not to its name"));
            }
            Ok(ok)
        }
        ObjectKind::BlobRef => {
            Sha256Hex::parse(parts[1]).map_err(|r| r.message)?;
            RunId::parse(parts[2]).map_err(|r| r.message)?;
            Ok(ok)
        }
        ObjectKind::DeadLetter => Ok(ok),
        ObjectKind::History => {
            let rev: super::history::Revision =
                serde_json::from_slice(bytes).map_err(|e| format!("not a revision: {e}"))?;
            let expected = format!("{:020}.json", rev.revision);
            if rev.run_id.as_str() != parts[1] || parts[2] != expected {
                return Err(format!(
                    "holds revision {} of {} instead",
                    rev.revision, rev.run_id
                ));
            }
            let actual = crate::domain::hashing::sha256_json(&rev.record);
            if actual != rev.artifact_sha256 {
                return Err(format!(
                    "its record hashes to {actual}, recorded {}",
                    rev.artifact_sha256
                ));
            }
            Ok(ok)
        }
        ObjectKind::Record => {
            let record = StoredRecord::decode(bytes)?;
            let expected = parts[0].trim_end_matches(".json");
            if record.run_id().as_str() != expected {
                return Err(format!(
                    "holds run {} instead of {expected}",
                    record.run_id()
                ));
            }
            let mut unverified = None;
            if let StoredRecord::Live(a) = &record {
                let report = src.verify_artifact(a).await.map_err(|e| e.to_string())?;
                let (bad, unhashed) = classify_checks(&report);
                if !bad.is_empty() {
                    return Err(format!("verify failed: {}", bad.join(", ")));
                }
                if !unhashed.is_empty() {
                    unverified = Some(format!("no recorded hash for {}", unhashed.join(", ")));
                }
            }
            Ok(Checked {
                record: Some(record),
                unverified,
            })
        }
    }
}

/// Splits a verify report into failed checks (mismatch, content missing) and checks that had
/// no recorded hash to compare (legacy records).
fn classify_checks(report: &VerifyReport) -> (Vec<String>, Vec<String>) {
    let mut bad = Vec::new();
    let mut unhashed = Vec::new();
    for c in &report.checks {
        match (c.status, &c.expected) {
            (CheckStatus::Ok, _) => {}
            (CheckStatus::Missing, None) => unhashed.push(c.name.clone()),
            (CheckStatus::Missing, Some(_)) => bad.push(format!("{} content missing", c.name)),
            (CheckStatus::Mismatch, _) => bad.push(format!("{} mismatch", c.name)),
        }
    }
    (bad, unhashed)
}

async fn copy_one(
    src: &RunStore,
    dst: &RunStore,
    kind: ObjectKind,
    rel: &RelKey,
    opts: &TransferOptions,
) -> CopyResult {
    let src_key = under(src, rel);
    let bytes = match read_object(src, &src_key).await {
        Ok(Some((b, _))) => b,
        Ok(None) => return CopyResult::done(Written::Vanished),
        Err(e) => return CopyResult::fail(e),
    };
    let checked = match check_source(src, kind, rel, &bytes).await {
        Ok(c) => c,
        Err(reason) => return CopyResult::fail(format!("not copied: {reason}")),
    };
    let mut result = write_one(dst, kind, &under(dst, rel), bytes, &checked, opts).await;
    if matches!(
        result.outcome,
        Ok(Written::Copied | Written::Updated | Written::Overwritten)
    ) {
        result.unverified = checked.unverified;
        if let Some(record) = &checked.record
            && let Err(e) = dst.reindex_run(record.run_id()).await
        {
            return CopyResult::fail(format!("copied, but its index entries were not: {e}"));
        }
    }
    result
}

async fn write_one(
    dst: &RunStore,
    kind: ObjectKind,
    key: &Path,
    bytes: Bytes,
    checked: &Checked,
    opts: &TransferOptions,
) -> CopyResult {
    // Two rounds: a create that loses a race to a concurrent writer compares again.
    for _ in 0..2 {
        let head = match dst.store.head(key).await {
            Ok(m) => Some(m),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return CopyResult::fail(format!("check destination {key}: {e}")),
        };
        let Some(head) = head else {
            match put(dst, key, &bytes, PutMode::Create).await {
                Ok(()) => return CopyResult::done(Written::Copied),
                Err(PutFailed::Race) => continue,
                Err(PutFailed::Other(e)) => return CopyResult::fail(e),
            }
        };
        let same_size = head.size == bytes.len() as u64;
        let (current, version) = if same_size || kind == ObjectKind::Record {
            match read_object(dst, key).await {
                Ok(Some((b, v))) => (Some(b), v),
                Ok(None) => continue,
                Err(e) => return CopyResult::fail(e),
            }
        } else {
            (
                None,
                UpdateVersion {
                    e_tag: head.e_tag.clone(),
                    version: head.version.clone(),
                },
            )
        };
        if let Some(cur) = &current
            && sha256_bytes(cur) == sha256_bytes(&bytes)
        {
            return CopyResult::done(Written::Skipped);
        }
        // Different bytes at the destination.
        let newer = match (&checked.record, &current) {
            (Some(s), Some(cur)) => match StoredRecord::decode(cur) {
                Ok(d) if d.run_id() == s.run_id() && s.revision() > d.revision() => {
                    Some(d.revision())
                }
                _ => None,
            },
            _ => None,
        };
        let (mode_outcome, why) = if newer.is_some() {
            (Written::Updated, "moved forward")
        } else if opts.overwrite {
            (Written::Overwritten, "overwritten")
        } else {
            let detail = match (
                &checked.record,
                current.as_deref().map(StoredRecord::decode),
            ) {
                (Some(s), Some(Ok(d))) => format!(
                    "destination holds revision {} (source revision {})",
                    d.revision(),
                    s.revision()
                ),
                _ => format!(
                    "destination holds a different object ({} bytes, source {} bytes)",
                    head.size,
                    bytes.len()
                ),
            };
            return CopyResult::conflict(format!("{detail}; not overwritten (use --overwrite)"));
        };
        return match put(dst, key, &bytes, PutMode::Update(version)).await {
            Ok(()) => CopyResult::done(mode_outcome),
            Err(PutFailed::Race) => CopyResult::conflict(format!(
                "destination changed while it was being {why}; rerun"
            )),
            Err(PutFailed::Other(e)) => CopyResult::fail(e),
        };
    }
    CopyResult::conflict("destination keeps changing under the copy; rerun")
}

enum PutFailed {
    Race,
    Other(String),
}

async fn put(dst: &RunStore, key: &Path, bytes: &Bytes, mode: PutMode) -> Result<(), PutFailed> {
    match dst
        .store
        .put_opts(key, PutPayload::from(bytes.clone()), PutOptions::from(mode))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if super::is_race(&e) => Err(PutFailed::Race),
        Err(e) => Err(PutFailed::Other(
            dst.os_err(e, &format!("write {key}")).to_string(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Import of a JSON data directory of the original FastAPI service
// ---------------------------------------------------------------------------------------------

/// What happened to one file of an imported directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportOutcome {
    /// Written to the store.
    Imported,
    /// The store already holds the identical record.
    Skipped,
    /// The store holds a different record for the run; left alone.
    Conflict,
    /// Not imported: bad name, corrupt JSON, not an artifact, or a different inner run id.
    Rejected,
    /// Not a `.json` file (or a directory): not looked at.
    Ignored,
}

/// One file of an imported directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportEntry {
    /// File name.
    pub file: String,
    /// What happened.
    pub outcome: ImportOutcome,
    /// Why (for anything but `imported` and `skipped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `ok`, `unverified` (hashes absent), `mismatch`, or `tombstone`; for decoded records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// The checks that were not `ok`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_notes: Vec<String>,
}

/// The outcome of an import.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// The directory read.
    pub source_dir: PathBuf,
    /// The store written.
    pub destination: String,
    /// Files written.
    pub imported: usize,
    /// Files already in the store, identical.
    pub skipped: usize,
    /// Files whose run the store holds with different content.
    pub conflicts: usize,
    /// Files that could not be imported.
    pub rejected: usize,
    /// Entries not looked at (not `.json`, directories).
    pub ignored: usize,
    /// Imported or skipped records whose hashes are absent or do not match.
    pub not_verified: usize,
    /// Every entry, by file name.
    pub files: Vec<ImportEntry>,
}

impl ImportReport {
    /// True when every `.json` file was imported or already present.
    pub fn ok(&self) -> bool {
        self.conflicts == 0 && self.rejected == 0
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "import {} -> {}: imported {}, skipped {}, conflicts {}, rejected {}, ignored {}, not verified {}",
            self.source_dir.display(),
            self.destination,
            self.imported,
            self.skipped,
            self.conflicts,
            self.rejected,
            self.ignored,
            self.not_verified
        )?;
        for e in &self.files {
            let outcome = serde_json::to_value(e.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            write!(f, "  {outcome} {}", e.file)?;
            if let Some(r) = &e.reason {
                write!(f, ": {r}")?;
            }
            if let Some(v) = &e.verify
                && v != "ok"
            {
                write!(f, " [verify: {v}")?;
                if !e.verify_notes.is_empty() {
                    write!(f, "; {}", e.verify_notes.join(", "))?;
                }
                write!(f, "]")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Imports every `<run_id>.json` of `dir` (not recursive) into `store`. Files are written as
/// they are, create-if-absent. Fails only when the directory cannot be listed.
pub async fn import_dir(store: &RunStore, dir: &FsPath) -> Result<ImportReport, StoreError> {
    let unusable = |e: std::io::Error| StoreError::Unusable(format!("{}: {e}", dir.display()));
    let mut entries = Vec::new();
    let mut rd = tokio::fs::read_dir(dir).await.map_err(unusable)?;
    while let Some(e) = rd.next_entry().await.map_err(unusable)? {
        entries.push(e);
    }
    entries.sort_by_key(|e| e.file_name());
    let mut report = ImportReport {
        source_dir: dir.to_path_buf(),
        destination: store.url().to_owned(),
        imported: 0,
        skipped: 0,
        conflicts: 0,
        rejected: 0,
        ignored: 0,
        not_verified: 0,
        files: Vec::new(),
    };
    for e in entries {
        let file = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
        let entry = if is_dir {
            ImportEntry::new(&file, ImportOutcome::Ignored, Some("a directory".into()))
        } else if !file.ends_with(".json") {
            ImportEntry::new(
                &file,
                ImportOutcome::Ignored,
                Some("not a .json file".into()),
            )
        } else {
            import_file(store, &e.path(), &file).await
        };
        match entry.outcome {
            ImportOutcome::Imported => report.imported += 1,
            ImportOutcome::Skipped => report.skipped += 1,
            ImportOutcome::Conflict => report.conflicts += 1,
            ImportOutcome::Rejected => report.rejected += 1,
            ImportOutcome::Ignored => report.ignored += 1,
        }
        if entry
            .verify
            .as_deref()
            .is_some_and(|v| v != "ok" && v != "tombstone")
        {
            report.not_verified += 1;
        }
        report.files.push(entry);
    }
    Ok(report)
}

impl ImportEntry {
    fn new(file: &str, outcome: ImportOutcome, reason: Option<String>) -> Self {
        Self {
            file: file.to_owned(),
            outcome,
            reason,
            verify: None,
            verify_notes: Vec::new(),
        }
    }
}

/// The imported record's revision in its history (event `imported`): its chain starts there.
async fn import_revision(
    store: &RunStore,
    record: &StoredRecord,
    outcome: ImportOutcome,
) -> Result<(), String> {
    if outcome != ImportOutcome::Imported {
        return Ok(());
    }
    let rev = super::history::Revision::new(record, "imported", Timestamp::now(), None, None, None);
    store.put_revision(&rev).await.map_err(|e| e.to_string())
}

async fn import_file(store: &RunStore, path: &FsPath, file: &str) -> ImportEntry {
    let rejected = |reason: String| ImportEntry::new(file, ImportOutcome::Rejected, Some(reason));
    let stem = file.trim_end_matches(".json");
    let id = match RunId::parse(stem) {
        Ok(id) => id,
        Err(r) => return rejected(format!("bad file name: {}", r.message)),
    };
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) => return rejected(format!("cannot read: {e}")),
    };
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        return rejected(format!("corrupt JSON: {e}"));
    }
    let record = match StoredRecord::decode(&bytes) {
        Ok(r) => r,
        Err(reason) => return rejected(format!("does not decode: {reason}")),
    };
    if *record.run_id() != id {
        return rejected(format!(
            "run_id mismatch: the file is named {id} but holds run {}",
            record.run_id()
        ));
    }
    let (verify_status, verify_notes) = match &record {
        StoredRecord::Deleted(_) => ("tombstone".to_owned(), Vec::new()),
        StoredRecord::Live(a) => match store.verify_artifact(a).await {
            Ok(report) => {
                let (bad, unhashed) = classify_checks(&report);
                let status = if !bad.is_empty() {
                    "mismatch"
                } else if !unhashed.is_empty() {
                    "unverified"
                } else {
                    "ok"
                };
                let mut notes = bad;
                notes.extend(unhashed.into_iter().map(|n| format!("{n} not recorded")));
                (status.to_owned(), notes)
            }
            Err(e) => ("unknown".to_owned(), vec![e.to_string()]),
        },
    };
    let key = store.artifact_key(&id);
    let bytes = Bytes::from(bytes);
    let written = match put(store, &key, &bytes, PutMode::Create).await {
        Ok(()) => Ok(ImportOutcome::Imported),
        Err(PutFailed::Race) => match read_object(store, &key).await {
            Ok(Some((cur, _))) if cur == bytes => Ok(ImportOutcome::Skipped),
            Ok(Some((cur, _))) => Err((
                ImportOutcome::Conflict,
                match StoredRecord::decode(&cur) {
                    Ok(r) => format!(
                        "the store holds a different record for {id} (revision {})",
                        r.revision()
                    ),
                    Err(e) => format!("the store holds a different, corrupt object for {id}: {e}"),
                },
            )),
            Ok(None) => Err((
                ImportOutcome::Rejected,
                "the store's record vanished during import; rerun".to_owned(),
            )),
            Err(e) => Err((ImportOutcome::Rejected, e)),
        },
        Err(PutFailed::Other(e)) => Err((ImportOutcome::Rejected, e)),
    };
    let mut entry = match written {
        Ok(outcome) => match import_revision(store, &record, outcome).await {
            Err(reason) => ImportEntry::new(file, ImportOutcome::Conflict, Some(reason)),
            Ok(()) => match store.reindex_run(&id).await {
                Ok(_) => ImportEntry::new(file, outcome, None),
                Err(e) => ImportEntry::new(
                    file,
                    ImportOutcome::Rejected,
                    Some(format!(
                        "imported, but its index entries were not: {e}; run `rmos-runs reindex`"
                    )),
                ),
            },
        },
        Err((outcome, reason)) => return ImportEntry::new(file, outcome, Some(reason)),
    };
    entry.verify = Some(verify_status);
    entry.verify_notes = verify_notes;
    entry
}
