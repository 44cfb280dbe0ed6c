//! The index journal of the local store: how `serve` keeps the listing index without paying a
//! file per entry on a create's durable path.
//!
//! An index entry is an empty file ([`super::index`]), and on the local store each new file is
//! an inode and a directory entry that the create's group-commit `syncfs` must write: with
//! three trees, that cost a durable create a third or more of its throughput. So a worker
//! appends each change's entries, as lines, to its own journal file instead (one `write`, in
//! the same page-cache pages for hundreds of changes), and the create's barrier makes the
//! lines durable with its record, as it made the entry files before. In the background, every
//! [`FOLD_EVERY`], the worker starts a new journal file and *folds* the previous one into the
//! trees: applies its lines in key order, makes them durable with one barrier, and only then
//! removes the file. Readers (a listing, `reindex`, a repair) merge the journals' lines into
//! what they read from the trees (see [`Pending`]), so a run is listed the moment its record
//! is written, exactly as with entry files.
//!
//! ```text
//! index/journal/<writer>-<seq>.log    lines "#<ms>" (first: when the file was started),
//!                                     "+<entry key>" (added), "-<entry key>" (removed),
//!                                     "!<ms> <entry key>" (a removal a fold carries forward)
//! ```
//!
//! Files of different writers are folded and read in no meaningful order, so **a removal
//! wins** ([`Pending`]); a fold that removes an entry not yet in the trees carries the removal
//! forward, in case its add is still in a live writer's file, folded later. It carries it for
//! [`CARRY_FOR_MS`]; a file started longer ago than [`CHECK_AFTER_MS`] (its writer was frozen,
//! or died and was found late) may hold adds whose removal has expired, so its adds are checked
//! against their runs' records before they are folded (one record read each, only for such a
//! file): an add the record has moved past (a later revision, a tombstone) is dropped.
//!
//! A writer holds an exclusive `flock` on each of its files until that file is folded and
//! removed. A file nobody holds belongs to a process that died: any worker (or `reindex`) folds
//! it. Folding is idempotent (create-if-absent, remove-if-present), so a crash in the middle of
//! one only repeats it. A line cut short by a crash has no newline and is ignored; its change's
//! record was never reported written.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path;

use super::index;
use super::local::LocalStore;
use crate::domain::artifact::StoredRecord;

/// Directory of the journal files, relative to the store prefix.
pub const JOURNAL_DIR: &str = "index/journal";

/// How often `serve` folds its journal into the trees. Readers merge at most about this much
/// of the store's changes from the journal.
pub const FOLD_EVERY: Duration = Duration::from_secs(1);

/// The journal's pending changes, as readers merge them over the trees: for each entry key
/// (relative to the store prefix), whether it is there (`true`, added) or not (`false`,
/// removed). A removal wins over an add, whatever the order of the lines and files.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    ops: BTreeMap<String, bool>,
    /// Removals carried forward by a fold (`!<ms> <key>` lines), with when they were first
    /// journaled (milliseconds since the Unix epoch).
    carried: BTreeMap<String, u64>,
}

impl Pending {
    /// Whether the journal has nothing to add or remove.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// How many entry keys the journal changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// What the journal says of one entry key: `Some(true)` added, `Some(false)` removed.
    pub fn state(&self, key: &str) -> Option<bool> {
        self.ops.get(key).copied()
    }

    /// The first key added under `dir` (relative to the store prefix, no trailing `/`) past
    /// `after` (a path relative to `dir`, exclusive) in ascending or descending order, as a
    /// path relative to `dir`. One range lookup: a scan merging the journal copies nothing.
    pub fn next_added(&self, dir: &str, after: Option<&str>, descending: bool) -> Option<String> {
        use std::ops::Bound::{Excluded, Included};
        let start = format!("{dir}/");
        // '0' is the byte after '/': the end of everything starting with `dir/`.
        let end = format!("{dir}0");
        let at = after.map(|a| format!("{start}{a}"));
        let found = if descending {
            let hi = at.map_or(Excluded(end), Excluded);
            self.ops
                .range((Included(start.clone()), hi))
                .rev()
                .find(|(_, present)| **present)
        } else {
            let lo = at.map_or(Included(start.clone()), Excluded);
            self.ops
                .range((lo, Excluded(end)))
                .find(|(_, present)| **present)
        };
        found.map(|(k, _)| k[start.len()..].to_owned())
    }

    /// The changes under `dir` (relative to the store prefix, no trailing `/`), as paths
    /// relative to it, ascending: `(added, removed)`.
    pub fn under(&self, dir: &str) -> (Vec<String>, Vec<String>) {
        let start = format!("{dir}/");
        // '0' is the byte after '/': the end of everything starting with `dir/`.
        let end = format!("{dir}0");
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for (k, present) in self.ops.range(start.clone()..end) {
            let rel = k[start.len()..].to_owned();
            if *present {
                added.push(rel);
            } else {
                removed.push(rel);
            }
        }
        (added, removed)
    }

    /// Applies whole lines. **A removal wins**: an entry key names one revision of one run,
    /// and once a later change has removed it nothing adds it again, so `-key` in any file
    /// (of any writer, in whatever order the files are read) settles it. Two workers that
    /// change one run one after the other journal into different files; only this rule,
    /// not the files' order, makes the outcome right.
    fn apply(&mut self, text: &str) {
        for line in whole_lines(text) {
            match line.as_bytes().first() {
                Some(b'+') if is_entry_key(&line[1..]) => {
                    self.ops.entry(line[1..].to_owned()).or_insert(true);
                }
                Some(b'-') if is_entry_key(&line[1..]) => {
                    self.ops.insert(line[1..].to_owned(), false);
                }
                Some(b'!') => {
                    let Some((ms, key)) = line[1..].split_once(' ') else {
                        continue;
                    };
                    let (Ok(ms), true) = (ms.parse::<u64>(), is_entry_key(key)) else {
                        continue;
                    };
                    self.ops.insert(key.to_owned(), false);
                    let first = self.carried.entry(key.to_owned()).or_insert(ms);
                    *first = (*first).min(ms);
                }
                _ => {}
            }
        }
    }
}

/// Whether a journal line's key has the shape of an index entry key (anything else is
/// ignored). Cheap on purpose: readers parse every line of a busy journal; a listing parses
/// the names it uses.
fn is_entry_key(key: &str) -> bool {
    key.starts_with("index/")
        && !key.starts_with("index/journal/")
        && key.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        // An entry name has ten fields.
        && key.rsplit('/').next().is_some_and(|n| n.bytes().filter(|b| *b == b'.').count() == 9)
}

/// One writer's journal: the file it appends to, locked while the process lives.
#[derive(Debug)]
pub struct IndexJournal {
    dir: PathBuf,
    writer: String,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    file: File,
    path: PathBuf,
    seq: u64,
    lines: u64,
    /// A write failed part way (or the file was closed): the next append starts a new file,
    /// so no line follows a fragment.
    broken: bool,
}

/// A journal file handed to [`fold`], still locked by whoever folds it.
#[derive(Debug)]
pub struct Sealed {
    file: File,
    path: PathBuf,
}

/// What one fold did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Journal files folded and removed.
    pub files: usize,
    /// Entries written into the trees.
    pub added: usize,
    /// Entries removed from the trees.
    pub removed: usize,
    /// Adds from old files (see [`CHECK_AFTER_MS`]) dropped because their run's record had
    /// moved past them.
    pub superseded: usize,
    /// CPU time the fold's thread spent applying them (the barrier not included).
    pub cpu: Duration,
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

impl IndexJournal {
    /// Starts a journal for this process in `dir` (created if missing).
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let writer = format!("{:016x}", rand::random::<u64>());
        let current = Mutex::new(Current::start(&dir, &writer, 0)?);
        Ok(Self {
            dir,
            writer,
            current,
        })
    }

    /// Appends one line per key, `+` for added entries, `-` for removed ones, in one write.
    /// Durable with the caller's next barrier (a record's group commit), like an entry file.
    pub fn append(&self, present: bool, keys: &[String]) -> std::io::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let sign = if present { '+' } else { '-' };
        let mut buf = String::with_capacity(keys.iter().map(|k| k.len() + 2).sum());
        for k in keys {
            buf.push(sign);
            buf.push_str(k);
            buf.push('\n');
        }
        self.write_lines(&buf, keys.len())
    }

    /// Writes whole lines to the current file in one `write`. After a write that failed part
    /// way, the next one starts a new file, so no line follows a fragment (the fragment's
    /// file is left to the next fold; its last line has no newline).
    fn write_lines(&self, buf: &str, lines: usize) -> std::io::Result<()> {
        let mut cur = self.current.lock().map_err(|_| poisoned())?;
        if cur.broken {
            *cur = Current::start(&self.dir, &self.writer, cur.seq + 1)?;
        }
        if let Err(e) = cur.file.write_all(buf.as_bytes()) {
            cur.broken = true;
            return Err(e);
        }
        cur.lines += lines as u64;
        Ok(())
    }

    /// Appends removals a fold carries forward (`!<first ms> <key>`), see [`fold`].
    fn carry(&self, removals: &[(String, u64)]) -> std::io::Result<()> {
        if removals.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for (key, ms) in removals {
            buf.push_str(&format!("!{ms} {key}\n"));
        }
        self.write_lines(&buf, removals.len())
    }

    /// Starts a new file and returns the previous one (still locked) to fold, if it has lines.
    pub fn rotate(&self) -> std::io::Result<Option<Sealed>> {
        let mut cur = self.current.lock().map_err(|_| poisoned())?;
        if cur.lines == 0 && !cur.broken {
            return Ok(None);
        }
        let next = Current::start(&self.dir, &self.writer, cur.seq + 1)?;
        let old = std::mem::replace(&mut *cur, next);
        Ok(Some(Sealed {
            file: old.file,
            path: old.path,
        }))
    }

    /// Removes the current file if it holds nothing (what a process leaves after its last
    /// fold; the next fold anywhere would remove it otherwise). A later append starts a new
    /// file. For a process about to exit (`rmos-runs reindex`).
    pub fn close(&self) -> std::io::Result<()> {
        let mut cur = self.current.lock().map_err(|_| poisoned())?;
        if cur.lines == 0 && !cur.broken {
            match std::fs::remove_file(&cur.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            cur.broken = true;
        }
        Ok(())
    }
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("index journal lock poisoned")
}

impl Current {
    /// Creates and locks file `seq` of `writer` in `dir`, headed by the time it was started.
    fn start(dir: &FsPath, writer: &str, seq: u64) -> std::io::Result<Self> {
        let path = dir.join(format!("{writer}-{seq:08x}.log"));
        let mut file = OpenOptions::new()
            .append(true)
            .read(true)
            .create_new(true)
            .open(&path)?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::Error(e) => e,
            std::fs::TryLockError::WouldBlock => {
                std::io::Error::other(format!("{} is locked by another writer", path.display()))
            }
        })?;
        // Durable with the first line's barrier; a file torn before it is empty, and a
        // file without it counts as started at its last change.
        file.write_all(format!("#{}\n", now_ms()).as_bytes())?;
        Ok(Self {
            file,
            path,
            seq,
            lines: 0,
            broken: false,
        })
    }
}

/// The journal files in `dir`, in sequence order (missing directory: none).
fn journal_files(dir: &FsPath) -> std::io::Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".log") && !n.starts_with('.'))
        {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// What a reader has read of the journals: how far into each file (whole lines only), and
/// the changes so far. Files are append-only and their names never reused, so a later read
/// only has to read what was appended, unless a file was folded away meanwhile.
#[derive(Debug, Default)]
pub struct ReadState {
    files: Vec<(PathBuf, u64)>,
    pending: Arc<Pending>,
}

/// The journals' pending changes in `dir`, reading only what was appended since `state`
/// was last brought up to date (all of it again when a file was folded away meanwhile). A
/// file removed while being read was folded: its changes are in the trees, which the caller
/// reads after this.
pub fn read_pending(dir: &FsPath, state: &mut ReadState) -> std::io::Result<Arc<Pending>> {
    let files = journal_files(dir)?;
    if files.is_empty() {
        *state = ReadState::default();
        return Ok(state.pending.clone());
    }
    if !state.files.iter().all(|(p, _)| files.contains(p)) {
        *state = ReadState::default();
    }
    let mut grown = false;
    let mut offsets = Vec::with_capacity(files.len());
    let mut tails: Vec<Vec<u8>> = Vec::new();
    for path in files {
        let from = state
            .files
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(0, |(_, o)| *o);
        let mut tail = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.seek(SeekFrom::Start(from))?;
                f.read_to_end(&mut tail)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        // Whole lines only: the rest is read again next time, complete by then.
        let whole = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        tail.truncate(whole);
        grown |= whole > 0;
        offsets.push((path, from + whole as u64));
        tails.push(tail);
    }
    state.files = offsets;
    if grown {
        let pending = Arc::make_mut(&mut state.pending);
        for tail in &tails {
            pending.apply(whole_text(tail));
        }
    }
    Ok(state.pending.clone())
}

/// The whole lines of `text`: the last one may have been cut short by a crash.
fn whole_lines(text: &str) -> impl Iterator<Item = &str> {
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole.split('\n').filter(|l| !l.is_empty())
}

/// The UTF-8 text of a journal file up to anything a torn write left.
fn whole_text(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        // Valid up to there by construction.
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// Folds `sealed` (if given: this writer's previous file) and then every file in `dir` no live
/// process holds (left by one that died), into the trees. Blocking: inside a runtime, run it
/// from `spawn_blocking` (its barrier waits there for the records' group commit).
pub fn fold(
    local: &LocalStore,
    prefix: &Path,
    dir: &FsPath,
    journal: Option<&IndexJournal>,
    sealed: Option<Sealed>,
) -> std::io::Result<Folded> {
    // Every file to fold, locked; folded as one set, in which a removal wins, so their order
    // does not matter (name order keeps a fold's work the same from run to run).
    let mut files: Vec<Sealed> = sealed.into_iter().collect();
    for path in journal_files(dir)? {
        if files.iter().any(|s| s.path == path) {
            continue;
        }
        let file = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => {}
            // A live writer's file (ours included: a second open description conflicts).
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // Folded and removed by someone else between our listing and our lock?
        let same = match std::fs::metadata(&path) {
            Ok(m) => m.ino() == file.metadata()?.ino(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if same {
            files.push(Sealed { file, path });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    fold_files(local, prefix, journal, &files)
}

/// How long a fold carries forward a removal whose entry it did not find: the add may sit in
/// a live writer's journal that is folded later (a file folded that late, its writer frozen,
/// has its adds checked against the records instead: [`CHECK_AFTER_MS`]).
pub const CARRY_FOR_MS: u64 = 10 * 60 * 1000;

/// Age of a journal file past which a fold checks its adds against the records: half of
/// [`CARRY_FOR_MS`], so that a removal the file's adds may have outlived is never trusted to
/// still be carried.
pub const CHECK_AFTER_MS: u64 = CARRY_FOR_MS / 2;

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// When a journal file was started: its `#<ms>` first line, or (a file of an earlier version,
/// which has none) its last change.
fn started_ms(text: &str, file: &File) -> std::io::Result<u64> {
    if let Some(ms) = text
        .strip_prefix('#')
        .and_then(|t| t.split_once('\n'))
        .and_then(|(ms, _)| ms.parse().ok())
    {
        return Ok(ms);
    }
    let modified = file.metadata()?.modified()?;
    let since_epoch = modified
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(u64::try_from(since_epoch.as_millis()).unwrap_or(0))
}

/// Whether the record of the run that entry `key` describes has moved past it: a tombstone,
/// or a later revision. A missing record (its write may be in flight), one that does not
/// decode (for `verify`) or an older one keeps the entry.
fn superseded(local: &LocalStore, prefix: &Path, key: &str) -> std::io::Result<bool> {
    let Some(entry) = key.rsplit('/').next().and_then(index::parse_entry) else {
        return Ok(false);
    };
    let record = local
        .fs_path(&index::under(prefix, &format!("{}.json", entry.run_id)))
        .map_err(std::io::Error::other)?;
    let bytes = match std::fs::read(&record) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(match StoredRecord::decode(&bytes) {
        Ok(StoredRecord::Deleted(_)) => true,
        Ok(r) => r.revision() > entry.revision,
        Err(_) => false,
    })
}

/// Folds `files` as one set: their changes (a removal wins, see [`Pending::apply`]) into the
/// trees, the removals of entries not found carried forward into `journal`'s current file
/// (if this process journals), one barrier, then the files removed.
fn fold_files(
    local: &LocalStore,
    prefix: &Path,
    journal: Option<&IndexJournal>,
    files: &[Sealed],
) -> std::io::Result<Folded> {
    let mut done = Folded::default();
    if files.is_empty() {
        return Ok(done);
    }
    let mut pending = Pending::default();
    let mut added_here: HashSet<String> = HashSet::new();
    // Adds of files old enough that a removal of theirs may have expired: checked below.
    let mut to_check: HashSet<String> = HashSet::new();
    let now_ms = now_ms();
    for sealed in files {
        let mut bytes = Vec::new();
        // From the start: the writer's own handle is at its end.
        let mut file = &sealed.file;
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut bytes)?;
        let text = whole_text(&bytes);
        pending.apply(text);
        let adds = || whole_lines(text).filter_map(|l| l.strip_prefix('+'));
        if now_ms.saturating_sub(started_ms(text, file)?) > CHECK_AFTER_MS {
            to_check.extend(adds().map(str::to_owned));
        }
        added_here.extend(adds().map(str::to_owned));
    }
    // Keys are plain relative paths (entry names need no escaping): map the index directory
    // once, not every key through the object store's URL-based mapping.
    let index_dir = local
        .fs_path(&index::under(prefix, index::INDEX_DIR))
        .map_err(std::io::Error::other)?;
    let fs_path = |key: &str| index_dir.join(key.strip_prefix("index/").unwrap_or(key));
    let cpu = thread_cpu();
    // Additions first: a removal's prune then never takes a directory an addition needs.
    let mut objects = local.empty_objects();
    for (key, present) in &pending.ops {
        if *present {
            if to_check.contains(key) && superseded(local, prefix, key)? {
                done.superseded += 1;
                continue;
            }
            objects
                .create(&fs_path(key))
                .map_err(std::io::Error::other)?;
            done.added += 1;
        }
    }
    let mut carry: Vec<(String, u64)> = Vec::new();
    for (key, present) in &pending.ops {
        if *present {
            continue;
        }
        let found = local
            .remove_object(&fs_path(key), &index_dir)
            .map_err(std::io::Error::other)?;
        done.removed += 1;
        // Removed before its add was folded, and the add is not in this set: it may still be
        // in a live writer's journal, to be folded later. Keep the removal until then.
        if !found && !added_here.contains(key) {
            let first = pending.carried.get(key).copied().unwrap_or(now_ms);
            if now_ms.saturating_sub(first) < CARRY_FOR_MS {
                carry.push((key.clone(), first));
            }
        }
    }
    done.cpu += thread_cpu().saturating_sub(cpu);
    if let Some(j) = journal {
        j.carry(&carry)?;
    }
    // The trees (and the carried lines) durable before the lines that describe them go. The
    // barrier rides the records' group commit when one is running.
    local.barrier()?;
    for sealed in files {
        match std::fs::remove_file(&sealed.path) {
            Ok(()) => done.files += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // The removals need no fsync of their own: a crash must not bring these files back to be
    // folded after newer ones, and every later fold's barrier (a `syncfs`) makes them durable
    // before it removes a file of its own. Until then, a file that came back is folded again
    // with the later ones, as one set, to the same trees.
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::domain::artifact::{ExplanationStatus, RunStatus, Timestamp};
    use crate::domain::ids::{Mode, RunId, ToolId};

    fn id_key() -> String {
        let s = index::RunSummary {
            run_id: RunId::parse("run_0123456789ab").unwrap(),
            created_at_utc: Timestamp::parse("2026-11-25T02:04:55.123Z").unwrap(),
            updated_at_utc: None,
            revision: 3,
            mode: Mode::parse("cam").unwrap(),
            tool_id: ToolId::parse("T102").unwrap(),
            status: RunStatus::Ok,
            risk_level: None,
            explanation_status: ExplanationStatus::None,
        };
        index::entry_keys(&s).remove(2)
    }

    #[test]
    fn whole_lines_count_and_a_removal_wins() {
        let key = id_key();
        let key = key.as_str();
        assert!(key.starts_with("index/by-id/"), "{key}");
        let mut p = Pending::default();
        p.apply(&format!("junk\n+{key}"));
        assert_eq!(p.state(key), None, "the cut-short last line is ignored");
        p.apply(&format!("+{key}\n"));
        assert_eq!(p.state(key), Some(true));
        p.apply(&format!("-{key}\n+{key}\n"));
        assert_eq!(
            p.state(key),
            Some(false),
            "a removal wins, whatever comes after"
        );
        p.apply(&format!("!123 {key}\n!100 {key}\n"));
        assert_eq!(
            p.carried.get(key),
            Some(&100),
            "carried since the first time"
        );
        p.apply(&format!("-{key}\nnot a line\n+index/time/x\n+../{key}\n"));
        assert_eq!(p.state(key), Some(false));
        assert_eq!(p.ops.len(), 1, "only entry keys count: {:?}", p.ops);
        let (added, removed) = p.under("index/by-id");
        assert!(added.is_empty());
        assert_eq!(removed, vec![key["index/by-id/".len()..].to_owned()]);
        assert_eq!(p.under("index/by-i"), (vec![], vec![]));
    }
}
