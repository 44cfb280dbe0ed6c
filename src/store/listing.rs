//! Listing runs from the index, keeping the index in step with the records, and repairing it.
//!
//! The key layout is in [`super::index`]. Here: how a page walks a tree (one key-ordered
//! listing on S3 for ascending walks; directory by directory otherwise, so newest-first and
//! oldest-first cost the same), how a change moves a run's entries, and `reindex`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Serialize;

use super::index::{self, Bound, Cursor, Order, RunSummary, Tree};
use super::journal::Pending;
use super::{DEFAULT_PAGE, MAX_PAGE, SCAN_BUDGET, local};
use super::{ListPage, ListQuery, RunStore, StoreError, Versioned};
use crate::domain::artifact::{StoredRecord, Timestamp};
use crate::domain::error::Rejection;
use crate::domain::ids::RunId;

/// Entries newer than their run's record are left alone this long by repairs: they may belong
/// to a change whose record write is still on its way.
const IN_FLIGHT_GRACE: chrono::Duration = chrono::Duration::minutes(10);

/// The index keys (relative to the store prefix) a stored record should have: three for a
/// live run, none for a tombstone.
pub(super) fn entries_of(record: &StoredRecord) -> Vec<String> {
    match record {
        StoredRecord::Live(a) => index::entry_keys(&RunSummary::from(a.as_ref())),
        StoredRecord::Deleted(_) => Vec::new(),
    }
}

/// What `reindex_run` changed for one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunIndexRepair {
    /// Entries that were missing and were written.
    pub added: usize,
    /// Entries that no record backs and were removed.
    pub removed: usize,
}

/// What a whole-store `reindex` found (and, unless checking only, repaired).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReindexReport {
    /// Records read.
    pub records: usize,
    /// Live runs among them.
    pub live: usize,
    /// Entries missing (written, unless checking only).
    pub missing: usize,
    /// Entries of an older revision, a deleted run or no run (removed, unless checking only).
    pub stale: usize,
    /// Entries newer than their run's record, within the in-flight grace: left alone.
    pub in_flight: usize,
    /// Entries of an earlier index layout (removed, unless checking only).
    pub legacy: usize,
    /// Changes the index journals held, not yet folded into the trees, when the check began
    /// (listings already show them; a repair folds a dead writer's first).
    pub journaled: usize,
    /// Records that could not be read (see `verify`).
    pub corrupt: Vec<String>,
    /// True when nothing was written (`--check`).
    pub check_only: bool,
}

impl ReindexReport {
    /// Whether the index matched the records (nothing missing or stale, no earlier layout).
    pub fn consistent(&self) -> bool {
        self.missing == 0 && self.stale == 0 && self.legacy == 0
    }
}

impl std::fmt::Display for ReindexReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.check_only { "found" } else { "repaired" };
        writeln!(
            f,
            "reindex: {} records, {} live runs; {verb} {} missing and {} stale entries; {} in flight",
            self.records, self.live, self.missing, self.stale, self.in_flight
        )?;
        if self.legacy > 0 {
            let verb = if self.check_only {
                "to remove"
            } else {
                "removed"
            };
            writeln!(
                f,
                "  {} entries of an earlier index layout {verb}",
                self.legacy
            )?;
        }
        if self.journaled > 0 {
            writeln!(
                f,
                "  {} changes in the index journal, not yet folded into the trees",
                self.journaled
            )?;
        }
        for c in &self.corrupt {
            writeln!(f, "  corrupt: {c}")?;
        }
        if self.check_only {
            let verdict = if self.consistent() {
                "index consistent"
            } else {
                "index drift: run `rmos-runs reindex` to repair"
            };
            writeln!(f, "{verdict}")?;
        }
        Ok(())
    }
}

/// Where a walk is in one directory.
struct Frame {
    /// Path of the directory relative to the tree root (empty for the root).
    rel: String,
    /// Its names, in walk order.
    names: Vec<String>,
    next: usize,
    /// Whether this directory lies on the start bound's path (its children are cut by it).
    on_bound: bool,
}

/// A source of a tree's entry keys (relative to the tree root) in walk order.
enum Scan {
    /// A key-ordered flat listing (S3, memory) for ascending walks: one LIST per 1,000 keys.
    Flat {
        stream: BoxStream<'static, object_store::Result<ObjectMeta>>,
        root_parts: usize,
        depth: usize,
    },
    /// Directory by directory (local, and every descending walk).
    Walk {
        root: String,
        depth: usize,
        descending: bool,
        bound: Option<Vec<String>>,
        stack: Vec<Frame>,
        started: bool,
    },
}

/// A tree's entries as a reader sees them: the tree's own ([`Scan`]) merged with the changes
/// the index journal holds for it and the trees do not have yet (see [`super::journal`]).
struct TreeScan {
    inner: Scan,
    /// The journals' pending changes (empty on object stores).
    pending: Arc<Pending>,
    /// The tree's root, relative to the store prefix.
    root: String,
    /// The journal's next addition in this tree, past the last one taken (or the bound), in
    /// walk order: `None` until looked up, `Some(None)` when there is none.
    added: Option<Option<String>>,
    /// Where the journal's additions have been taken up to (exclusive), or the bound.
    added_pos: Option<String>,
    descending: bool,
    /// The tree's next key, once read (`Some(None)`: the tree is done).
    peeked: Option<Option<String>>,
}

impl RunStore {
    /// Names directly under `rel` (relative to the store prefix) with whether each is a
    /// directory, sorted ascending. One directory read, or one delimited LIST.
    async fn children(&self, rel: &str) -> Result<Vec<(String, bool)>, StoreError> {
        let dir = index::under(&self.prefix, rel);
        let mut out = if let Some(local) = &self.local {
            local
                .read_dir_names(&dir)
                .map_err(|e| self.os_err(e, &format!("list {dir}")))?
        } else {
            let listed = self
                .store
                .list_with_delimiter(Some(&dir))
                .await
                .map_err(|e| self.os_err(e, &format!("list {dir}")))?;
            let name = |p: &Path| p.parts().next_back().map(|p| p.as_ref().to_owned());
            listed
                .common_prefixes
                .iter()
                .filter_map(|p| Some((name(p)?, true)))
                .chain(
                    listed
                        .objects
                        .iter()
                        .filter_map(|m| Some((name(&m.location)?, false))),
                )
                .collect()
        };
        out.sort();
        Ok(out)
    }

    /// A walk of `tree` from `bound` (exclusive), with the journal's pending changes merged in.
    fn scan(
        &self,
        tree: &Tree,
        descending: bool,
        bound: Option<Bound>,
    ) -> Result<TreeScan, StoreError> {
        Ok(TreeScan {
            inner: self.tree_scan(tree, descending, bound.clone()),
            pending: self.pending_index()?,
            root: tree.root(),
            added: None,
            added_pos: bound.map(|b| b.0.join("/")),
            descending,
            peeked: None,
        })
    }

    /// The next entry key of a merged scan, relative to the tree root. Directory components
    /// of a level all have the same width, so comparing whole relative keys orders them as
    /// the walk does.
    async fn scan_next(&self, s: &mut TreeScan) -> Result<Option<String>, StoreError> {
        loop {
            if s.peeked.is_none() {
                s.peeked = Some(self.tree_next(&mut s.inner).await?);
            }
            if s.added.is_none() {
                s.added = Some(
                    s.pending
                        .next_added(&s.root, s.added_pos.as_deref(), s.descending),
                );
            }
            let tree_next = s.peeked.as_ref().and_then(Option::as_ref);
            let added_next = s.added.as_ref().and_then(Option::as_ref);
            let take_added = match (tree_next, added_next) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(t), Some(a)) => {
                    if s.descending {
                        a >= t
                    } else {
                        a <= t
                    }
                }
            };
            if take_added {
                let Some(a) = s.added.take().flatten() else {
                    continue;
                };
                if tree_next == Some(&a) {
                    // In the tree and in the journal (folded meanwhile): once.
                    s.peeked = None;
                }
                s.added_pos = Some(a.clone());
                return Ok(Some(a));
            }
            match tree_next.cloned() {
                None => return Ok(None),
                Some(t) => {
                    s.peeked = None;
                    let removed = !s.pending.is_empty()
                        && s.pending.state(&format!("{}/{t}", s.root)) == Some(false);
                    if !removed {
                        return Ok(Some(t));
                    }
                }
            }
        }
    }

    fn tree_scan(&self, tree: &Tree, descending: bool, bound: Option<Bound>) -> Scan {
        let root = tree.root();
        if self.sorted_listing && !descending {
            let root_path = index::under(&self.prefix, &root);
            let root_parts = root_path.parts().count();
            let stream = match bound {
                Some(b) => {
                    let offset = index::under(&root_path, &b.0.join("/"));
                    self.store.list_with_offset(Some(&root_path), &offset)
                }
                None => self.store.list(Some(&root_path)),
            };
            return Scan::Flat {
                stream,
                root_parts,
                depth: tree.depth(),
            };
        }
        Scan::Walk {
            root,
            depth: tree.depth(),
            descending,
            bound: bound.map(|b| b.0),
            stack: Vec::new(),
            started: false,
        }
    }

    /// The next entry key of a tree's own scan, relative to the tree root.
    async fn tree_next(&self, scan: &mut Scan) -> Result<Option<String>, StoreError> {
        match scan {
            Scan::Flat {
                stream,
                root_parts,
                depth,
            } => {
                while let Some(meta) = stream
                    .try_next()
                    .await
                    .map_err(|e| self.os_err(e, "list index"))?
                {
                    let parts: Vec<String> = meta
                        .location
                        .parts()
                        .skip(*root_parts)
                        .map(|p| p.as_ref().to_owned())
                        .collect();
                    if parts.len() == *depth + 1 {
                        return Ok(Some(parts.join("/")));
                    }
                }
                Ok(None)
            }
            Scan::Walk {
                root,
                depth,
                descending,
                bound,
                stack,
                started,
            } => {
                if !*started {
                    *started = true;
                    let frame = self
                        .frame(
                            root,
                            String::new(),
                            0,
                            *depth,
                            *descending,
                            bound.as_deref(),
                        )
                        .await?;
                    stack.push(frame);
                }
                while let Some(top) = stack.last_mut() {
                    let Some(name) = top.names.get(top.next).cloned() else {
                        stack.pop();
                        continue;
                    };
                    top.next += 1;
                    let level = if top.rel.is_empty() {
                        0
                    } else {
                        top.rel.split('/').count()
                    };
                    let rel = if top.rel.is_empty() {
                        name.clone()
                    } else {
                        format!("{}/{name}", top.rel)
                    };
                    if level == *depth {
                        return Ok(Some(rel));
                    }
                    let on_bound =
                        top.on_bound && bound.as_ref().is_some_and(|b| b.get(level) == Some(&name));
                    let child_bound = if on_bound { bound.as_deref() } else { None };
                    let frame = self
                        .frame(root, rel, level + 1, *depth, *descending, child_bound)
                        .await?;
                    stack.push(frame);
                }
                Ok(None)
            }
        }
    }

    /// Reads one directory of a walk: subdirectories above the leaf level, entries at it,
    /// ordered for the walk and cut at the bound when the directory lies on its path.
    async fn frame(
        &self,
        root: &str,
        rel: String,
        level: usize,
        depth: usize,
        descending: bool,
        bound: Option<&[String]>,
    ) -> Result<Frame, StoreError> {
        let dir = if rel.is_empty() {
            root.to_owned()
        } else {
            format!("{root}/{rel}")
        };
        let want_dirs = level < depth;
        let cut = bound.and_then(|b| b.get(level));
        let mut names: Vec<String> = self
            .children(&dir)
            .await?
            .into_iter()
            .filter(|(_, is_dir)| *is_dir == want_dirs)
            .map(|(n, _)| n)
            .filter(|n| match cut {
                None => true,
                // A directory equal to the bound's component is walked (cut further down);
                // an entry equal to the bound is past it (bounds are exclusive).
                Some(c) if want_dirs => {
                    if descending {
                        n <= c
                    } else {
                        n >= c
                    }
                }
                Some(c) => {
                    if descending {
                        n < c
                    } else {
                        n > c
                    }
                }
            })
            .collect();
        if descending {
            names.reverse();
        }
        Ok(Frame {
            rel,
            names,
            next: 0,
            on_bound: bound.is_some(),
        })
    }

    /// One page of runs matching `q`, from the index: no record is read (except for a run
    /// whose mode or tool was too long to be kept in its entry). A page examines at most
    /// [`SCAN_BUDGET`] entries; a selective filter may thus return a short page with a cursor.
    pub async fn list(&self, q: &ListQuery) -> Result<ListPage, StoreError> {
        let invalid = |m: String| StoreError::Rejected(Rejection::invalid(m));
        let limit = q.limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 {
            return Err(invalid("limit must be at least 1".into()));
        }
        if limit > MAX_PAGE {
            return Err(StoreError::Rejected(Rejection::too_large(format!(
                "limit {limit} is over the largest page, {MAX_PAGE}"
            ))));
        }
        if let (Some(s), Some(u)) = (q.since, q.until)
            && s >= u
        {
            return Err(invalid(format!("since {s} is not before until {u}")));
        }
        // Version 1 cursors were run ids (in run id order).
        let legacy = q.cursor.as_deref().and_then(|c| RunId::parse(c).ok());
        let order = q.order.unwrap_or(if legacy.is_some() {
            Order::Id
        } else {
            Order::Newest
        });
        let tree = match (&order, &q.tool_id) {
            (Order::Id, _) => Tree::Id,
            (_, Some(tool)) => Tree::Tool(tool.clone()),
            _ => Tree::Time,
        };
        let descending = order == Order::Oldest;
        let query = query_digest(q, order);
        let start = match (&q.cursor, legacy) {
            (Some(_), Some(run)) if order == Order::Id => {
                let (dirs, lead) = index::id_position(&run);
                let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
                Some(Bound::after_run(&dirs, &lead, &run, false))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "a run id cursor continues a listing in run id order, not {order}"
                )));
            }
            (Some(c), None) => {
                let cursor = Cursor::decode(c, &tree).map_err(invalid)?;
                if cursor.order != order || cursor.query != query {
                    return Err(invalid(
                        "cursor belongs to a listing with other filters or another order".into(),
                    ));
                }
                Some(cursor.bound)
            }
            (None, _) => match (order, q.since, q.until) {
                (Order::Newest, _, Some(u)) => Some(Bound::time_start(&tree, &u, false)),
                (Order::Oldest, Some(s), _) => Some(Bound::time_start(&tree, &s, true)),
                _ => None,
            },
        };

        let mut scan = self.scan(&tree, descending, start)?;
        let mut page = ListPage {
            runs: Vec::new(),
            next_cursor: None,
            skipped_corrupt: 0,
            index_complete: self.index_complete().await?,
        };
        // The run whose entries are being read: its key, and the highest revision seen.
        let mut group: Option<(String, index::Entry)> = None;
        let mut examined = 0usize;
        let mut resume: Option<String> = None;
        loop {
            let next = self.scan_next(&mut scan).await?;
            let entry = next.as_deref().and_then(|rel| {
                let name = rel.rsplit('/').next().unwrap_or(rel);
                index::parse_entry(name).map(|e| (rel.to_owned(), e))
            });
            if next.is_some() {
                examined += 1;
            }
            match (&mut group, &entry) {
                (Some((_, g)), Some((_, e))) if g.run_id == e.run_id => {
                    if e.revision > g.revision {
                        group = entry;
                    }
                    continue;
                }
                _ => {}
            }
            if next.is_some() && entry.is_none() {
                // Not an entry (a stray file): skip it, within the budget.
                if examined < SCAN_BUDGET {
                    continue;
                }
            }
            if let Some((rel, g)) = group.take() {
                if let Some(summary) = self.summary_if_matching(&g, q, &mut page).await? {
                    page.runs.push(summary);
                }
                let past_range = entry.as_ref().is_some_and(|(_, e)| match order {
                    Order::Newest => q.since.is_some_and(|s| e.created_at_utc < s),
                    Order::Oldest => q.until.is_some_and(|u| e.created_at_utc >= u),
                    Order::Id => false,
                });
                if next.is_none() || past_range {
                    break;
                }
                if page.runs.len() >= limit || examined >= SCAN_BUDGET {
                    resume = Some(rel);
                    break;
                }
                group = entry;
            } else {
                match entry {
                    None if next.is_none() => break,
                    None => continue,
                    Some((_, ref e)) => {
                        let past_range = match order {
                            Order::Newest => q.since.is_some_and(|s| e.created_at_utc < s),
                            Order::Oldest => q.until.is_some_and(|u| e.created_at_utc >= u),
                            Order::Id => false,
                        };
                        if past_range {
                            break;
                        }
                        group = entry;
                    }
                }
            }
        }
        if let Some(rel) = resume {
            let run = index::parse_entry(rel.rsplit('/').next().unwrap_or(&rel))
                .map(|e| e.run_id)
                .ok_or_else(|| StoreError::Corrupt {
                    key: rel.clone(),
                    reason: "not an index entry".into(),
                })?;
            let bound = Bound::past_entry(&tree, &rel, &run, descending).ok_or_else(|| {
                StoreError::Corrupt {
                    key: rel.clone(),
                    reason: "index entry at the wrong depth".into(),
                }
            })?;
            page.next_cursor = Some(
                Cursor {
                    order,
                    query,
                    bound,
                }
                .encode(&tree),
            );
        }
        Ok(page)
    }

    /// The summary of a run's newest entry when it matches the filters.
    async fn summary_if_matching(
        &self,
        e: &index::Entry,
        q: &ListQuery,
        page: &mut ListPage,
    ) -> Result<Option<RunSummary>, StoreError> {
        let summary = match e.summary() {
            Some(s) => s,
            // Mode or tool too long for the entry's name: the record has them.
            None => match self.get(&e.run_id).await {
                Ok(a) => RunSummary::from(&a),
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(StoreError::Corrupt { key, reason }) => {
                    tracing::warn!(%key, %reason, "corrupt record left out of a listing");
                    page.skipped_corrupt += 1;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            },
        };
        Ok(matches(&summary, q).then_some(summary))
    }

    /// Whether a full build of the index, in the current layout, has completed on this store
    /// (`index/_built` names [`index::LAYOUT_VERSION`]). An index built with an earlier layout
    /// is not complete: `serve` rebuilds it in the background, as `reindex` does.
    pub async fn index_complete(&self) -> Result<bool, StoreError> {
        if self.index_built.load(AtomicOrdering::Relaxed) {
            return Ok(true);
        }
        let key = index::under(&self.prefix, index::BUILT_MARKER);
        let Some((_, bytes)) = self.read_raw(&key, super::read_only()).await? else {
            return Ok(false);
        };
        // Layout 1 wrote `1`; anything unreadable is an index to rebuild, not an error.
        let built = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        let complete = built == Some(index::LAYOUT_VERSION);
        if complete {
            self.index_built.store(true, AtomicOrdering::Relaxed);
        }
        Ok(complete)
    }

    /// Marks the index complete in the current layout (after a full build, or on a new store
    /// that has no runs).
    pub async fn mark_index_complete(&self) -> Result<(), StoreError> {
        let key = index::under(&self.prefix, index::BUILT_MARKER);
        let body = format!("{}\n", index::LAYOUT_VERSION);
        self.store
            .put(&key, PutPayload::from(body.into_bytes()))
            .await
            .map_err(|e| self.os_err(e, &format!("write {key}")))?;
        self.index_built.store(true, AtomicOrdering::Relaxed);
        Ok(())
    }

    /// Counts (and unless `check_only`, removes) the objects under the trees of earlier index
    /// layouts ([`index::LEGACY_ROOTS`]). Nothing writes there any more.
    async fn legacy_entries(&self, check_only: bool) -> Result<usize, StoreError> {
        let mut found = 0;
        for root in index::LEGACY_ROOTS {
            let prefix = index::under(&self.prefix, root);
            let mut listed = self.store.list(Some(&prefix));
            let mut batch: Vec<Path> = Vec::new();
            while let Some(meta) = listed
                .try_next()
                .await
                .map_err(|e| self.os_err(e, &format!("list {prefix}")))?
            {
                found += 1;
                if !check_only {
                    batch.push(meta.location);
                    if batch.len() >= 1000 {
                        self.delete_all(std::mem::take(&mut batch)).await?;
                    }
                }
            }
            if !check_only {
                self.delete_all(batch).await?;
                if let Some(local) = &self.local {
                    local.remove_empty_tree(&prefix);
                }
            }
        }
        Ok(found)
    }

    async fn delete_all(&self, keys: Vec<Path>) -> Result<(), StoreError> {
        let mut deleted = self
            .store
            .delete_stream(futures::stream::iter(keys.into_iter().map(Ok)).boxed());
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.os_err(e, "delete a legacy index entry")),
            }
        }
        Ok(())
    }

    /// Writes index entries (create-if-absent; an existing one is the same entry). The id
    /// tree's entry goes first and is removed last, so any entry of a run can be found from
    /// the id tree, which is what repairs read.
    pub(super) async fn put_entries(&self, keys: &[String]) -> Result<(), StoreError> {
        if let Some(journal) = &self.journal {
            return journal
                .append(true, keys)
                .map_err(|e| self.io_err(e, "append to the index journal"));
        }
        let (id_keys, others): (Vec<&String>, Vec<&String>) =
            keys.iter().partition(|k| is_id_key(k));
        for k in id_keys {
            self.put_entry(k).await?;
        }
        futures::future::try_join_all(others.into_iter().map(|k| self.put_entry(k))).await?;
        Ok(())
    }

    async fn put_entry(&self, rel: &str) -> Result<(), StoreError> {
        let key = index::under(&self.prefix, rel);
        let mut opts = PutOptions::from(PutMode::Create);
        opts.extensions.insert(local::DeferredSync);
        match self.store.put_opts(&key, PutPayload::new(), opts).await {
            Ok(_)
            | Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(()),
            Err(e) => Err(self.os_err(e, &format!("write {key}"))),
        }
    }

    /// Removes index entries (a missing one is fine), the id tree's last.
    pub(super) async fn remove_entries(&self, keys: &[String]) -> Result<(), StoreError> {
        if let Some(journal) = &self.journal {
            return journal
                .append(false, keys)
                .map_err(|e| self.io_err(e, "append to the index journal"));
        }
        let (id_keys, others): (Vec<&String>, Vec<&String>) =
            keys.iter().partition(|k| is_id_key(k));
        futures::future::try_join_all(others.into_iter().map(|k| self.remove_entry(k))).await?;
        for k in id_keys {
            self.remove_entry(k).await?;
        }
        Ok(())
    }

    async fn remove_entry(&self, rel: &str) -> Result<(), StoreError> {
        let key = index::under(&self.prefix, rel);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.os_err(e, &format!("delete {key}"))),
        }
        if let Some(local) = &self.local {
            local.prune_empty_dirs(&key, &index::under(&self.prefix, index::INDEX_DIR));
        }
        Ok(())
    }

    /// Makes one run's index entries match its record: writes the missing ones, removes those
    /// of older revisions, of a deleted run or of no run. Entries newer than the record are
    /// left for [`IN_FLIGHT_GRACE`] (a change may be between its entries and its record).
    /// Idempotent; safe while commands run.
    pub async fn reindex_run(&self, id: &RunId) -> Result<RunIndexRepair, StoreError> {
        let record = self.load(id).await?;
        self.reconcile(
            id,
            record.as_ref().map(|v| &v.value),
            Timestamp::now(),
            true,
        )
        .await
    }

    /// `reindex_run` for a record already read; `apply` false only counts.
    pub(super) async fn reconcile(
        &self,
        id: &RunId,
        record: Option<&StoredRecord>,
        now: Timestamp,
        apply: bool,
    ) -> Result<RunIndexRepair, StoreError> {
        let expected = record.map(entries_of).unwrap_or_default();
        let revision = record.map_or(0, StoredRecord::revision);
        let (dir, lead) = index::id_leaf(id);
        // Read before the tree: a fold in between moves changes into the tree, not past it.
        let pending = self.pending_index()?;
        let mut found: BTreeSet<String> = self
            .children(&dir)
            .await?
            .into_iter()
            .filter(|(n, is_dir)| !is_dir && n.starts_with(&lead))
            .map(|(n, _)| n)
            .collect();
        let (added, removed) = pending.under(&dir);
        for name in removed {
            found.remove(&name);
        }
        found.extend(added.into_iter().filter(|n| n.starts_with(&lead)));
        let mut stale: Vec<String> = Vec::new();
        let mut present: HashSet<String> = HashSet::new();
        for name in &found {
            let Some(keys) = index::keys_of_id_entry(name) else {
                continue;
            };
            let Some(e) = index::parse_entry(name) else {
                continue;
            };
            let id_key = format!("{dir}/{name}");
            if expected.contains(&id_key) {
                present.insert(id_key);
                continue;
            }
            let written = e.updated_at_utc.unwrap_or(e.created_at_utc);
            let in_flight = e.revision > revision && now.0 - written.0 < IN_FLIGHT_GRACE;
            if !in_flight {
                stale.extend(keys.into_iter().filter(|k| !expected.contains(k)));
            }
        }
        // The id entry being present says nothing of the others after a crash: check them.
        let mut missing: Vec<String> = Vec::new();
        for k in &expected {
            let exists = match pending.state(k) {
                Some(journaled) => journaled,
                None => self.entry_exists(k).await?,
            };
            if !present.contains(k) && !exists {
                missing.push(k.clone());
            }
        }
        if apply {
            self.put_entries(&missing).await?;
            self.remove_entries(&stale).await?;
        }
        Ok(RunIndexRepair {
            added: missing.len(),
            removed: stale.len(),
        })
    }

    async fn entry_exists(&self, rel: &str) -> Result<bool, StoreError> {
        let key = index::under(&self.prefix, rel);
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.os_err(e, &format!("check {key}"))),
        }
    }

    /// Rebuilds (or with `check_only`, only checks) the whole index from the records: every
    /// run's entries are made to match its record, and entries of runs that have no live
    /// record are removed. Online and idempotent: commands may run meanwhile, and a second
    /// pass finds nothing to do. Marks the index complete when done.
    pub async fn reindex(&self, check_only: bool) -> Result<ReindexReport, StoreError> {
        let mut report = ReindexReport {
            check_only,
            ..ReindexReport::default()
        };
        if !check_only {
            // Journals a dead process left: their changes into the trees first.
            self.fold_index_journal().await?;
        }
        report.journaled = self.pending_index()?.len();
        let ids = super::maintenance::run_ids(self).await?;
        let now = Timestamp::now();
        let mut live: HashMap<RunId, u64> = HashMap::with_capacity(ids.len());
        let mut results = futures::stream::iter(ids)
            .map(|id| async move {
                let loaded = self.load(&id).await;
                if !check_only
                    && let Ok(Some(Versioned {
                        value: StoredRecord::Live(a),
                        ..
                    })) = &loaded
                    && let Err(e) = self.mark_references(a).await
                {
                    return (id, Err(e), None);
                }
                let repair = match &loaded {
                    Ok(record) => Some(
                        self.reconcile(
                            &id,
                            record.as_ref().map(|v: &Versioned<StoredRecord>| &v.value),
                            now,
                            !check_only,
                        )
                        .await,
                    ),
                    Err(_) => None,
                };
                (id, loaded, repair)
            })
            .buffer_unordered(16);
        while let Some((id, loaded, repair)) = results.next().await {
            report.records += 1;
            match loaded {
                Ok(Some(Versioned {
                    value: StoredRecord::Live(a),
                    ..
                })) => {
                    report.live += 1;
                    live.insert(id, a.revision);
                }
                Ok(_) => {}
                Err(StoreError::Corrupt { key, reason }) => {
                    report.corrupt.push(format!("{key}: {reason}"));
                    continue;
                }
                Err(e) => return Err(e),
            }
            if let Some(r) = repair {
                let r = r?;
                report.missing += r.added;
                report.stale += r.removed;
            }
        }
        drop(results);
        // Entries whose run has no live record, or an older revision than its record, in any
        // tree (a crash may have left a time or tool entry without its id entry).
        let mut trees = vec![Tree::Time, Tree::Id];
        // Each directory name is a tool's escaped id; walk it as a tree root. A tool whose
        // entries are all still in a journal has no directory yet: its name is in their keys.
        let mut tool_dirs: BTreeSet<String> = self
            .children(index::TOOLS_ROOT)
            .await?
            .into_iter()
            .filter_map(|(name, is_dir)| is_dir.then_some(name))
            .collect();
        let (journaled, _) = self.pending_index()?.under(index::TOOLS_ROOT);
        tool_dirs.extend(
            journaled
                .iter()
                .filter_map(|rel| rel.split_once('/').map(|(dir, _)| dir.to_owned())),
        );
        trees.extend(tool_dirs.into_iter().map(Tree::ToolDir));
        for tree in trees {
            let root = tree.root();
            let mut scan = self.scan(&tree, false, None)?;
            let mut stale: Vec<String> = Vec::new();
            while let Some(rel) = self.scan_next(&mut scan).await? {
                let name = rel.rsplit('/').next().unwrap_or(&rel);
                let Some(e) = index::parse_entry(name) else {
                    continue;
                };
                let orphan = match live.get(&e.run_id) {
                    Some(rev) => e.revision < *rev,
                    None => {
                        let written = e.updated_at_utc.unwrap_or(e.created_at_utc);
                        now.0 - written.0 >= IN_FLIGHT_GRACE
                    }
                };
                let newer = live.get(&e.run_id).is_some_and(|rev| e.revision > *rev)
                    || !live.contains_key(&e.run_id);
                if orphan {
                    stale.push(format!("{root}/{rel}"));
                } else if newer {
                    report.in_flight += 1;
                }
                if stale.len() >= 256 {
                    report.stale += stale.len();
                    if !check_only {
                        self.remove_entries(&stale).await?;
                    }
                    stale.clear();
                }
            }
            report.stale += stale.len();
            if !check_only {
                self.remove_entries(&stale).await?;
            }
        }
        report.legacy = self.legacy_entries(check_only).await?;
        if !check_only {
            self.mark_index_complete().await?;
            // Every live run's blob references were marked above.
            self.mark_blob_refs_complete().await?;
        }
        Ok(report)
    }
}

/// Whether an index key (relative to the store prefix) is in the id tree.
fn is_id_key(k: &str) -> bool {
    k.strip_prefix(index::ID_ROOT)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether a summary passes every filter of the query.
fn matches(s: &RunSummary, q: &ListQuery) -> bool {
    q.mode.as_ref().is_none_or(|m| *m == s.mode)
        && q.tool_id.as_ref().is_none_or(|t| *t == s.tool_id)
        && q.status.is_none_or(|v| v == s.status)
        && q.risk_level.is_none_or(|v| Some(v) == s.risk_level)
        && q.explanation_status
            .is_none_or(|v| v == s.explanation_status)
        && q.since.is_none_or(|v| s.created_at_utc >= v)
        && q.until.is_none_or(|v| s.created_at_utc < v)
}

/// Digest of everything but the page size and the cursor: a cursor only continues the
/// listing it came from.
fn query_digest(q: &ListQuery, order: Order) -> u64 {
    let text = serde_json::to_string(&ListQuery {
        limit: None,
        cursor: None,
        order: Some(order),
        ..q.clone()
    })
    .unwrap_or_default();
    index::digest(&text)
}
