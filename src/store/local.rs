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
//! * Durability with group commit: a write is reported only once its bytes and its directory
//!   entry are on stable storage (on by default; `fsync = false` exists for benchmarks only).
//!   Concurrent writers share the cost: each stages its bytes in a hidden file
//!   (`<name>#<digits>`, which listings skip), then joins a batch; one writer leads the batch
//!   through one `syncfs` barrier (every staged byte durable), the renames / links that publish
//!   the files, and one `fsync` per directory touched, then releases them all. Data is durable
//!   before any name points at it, so a crash never exposes a torn file, and nothing is reported
//!   written before its name is durable.

use std::ffi::CString;
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

/// Objects up to this size are read and staged on the calling thread (see `read_whole`, `write`).
const INLINE_IO_MAX: u64 = 256 * 1024;

/// Number of lock files keys are spread over (a bounded set, whatever the number of runs).
const LOCK_STRIPES: u32 = 1024;

/// The local filesystem store with cross-process conditional updates. See the module docs.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    inner: Arc<LocalFileSystem>,
    fsync: bool,
    group: Arc<GroupCommit>,
    links: Arc<EmptyLinks>,
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

/// Marks a read (in `GetOptions::extensions`) whose caller will not write back based on it:
/// the store may then leave out the ETag, which here costs a SHA-256 of the whole object.
/// Reads with `if_match` / `if_none_match` still get one, since they compare against it.
#[derive(Clone, Copy, Debug)]
pub struct ReadOnlyGet;

/// Marks a create-if-absent put (in `PutOptions::extensions`) that needs no barrier of its
/// own: the caller makes a durable write right after it (a run record after its history
/// revision and index entries), whose `syncfs` barrier makes this one durable too, before the
/// record's name is published. An empty object is created in place (it cannot be torn); a
/// small one is staged and linked at once: only a power cut before that barrier can leave it
/// torn, and then no record refers to it. Other modes and large payloads ignore the mark.
#[derive(Clone, Copy, Debug)]
pub struct DeferredSync;

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
        let links = Arc::new(EmptyLinks::new(root.join(".links")));
        let inner = LocalFileSystem::new_with_prefix(&root)?
            .with_fsync(fsync)
            .with_automatic_cleanup(false);
        Ok(Self {
            group: Arc::new(GroupCommit::new(root.clone())),
            links,
            root,
            inner: Arc::new(inner),
            fsync,
        })
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &FsPath {
        &self.root
    }

    /// Names directly under `location`, each with whether it is a directory, in no order;
    /// staged files (`#`) and hidden names are left out. A missing directory has none. Reads
    /// the directory only (no `stat` per entry), unlike `list_with_delimiter`.
    pub fn read_dir_names(&self, location: &Path) -> Result<Vec<(String, bool)>> {
        let dir = self.inner.path_to_filesystem(location)?;
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(generic(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(generic)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || name.contains('#') {
                continue;
            }
            let is_dir = entry.file_type().map_err(generic)?.is_dir();
            out.push((name, is_dir));
        }
        Ok(out)
    }

    /// Creates an empty object in place, without a barrier of its own (an index entry folded
    /// from the journal: the fold's [`LocalStore::barrier`] makes it durable). One that exists
    /// is left as it is. `dest` is the object's filesystem path ([`LocalStore::fs_path`]; a fold maps many keys
    /// under one directory it mapped once).
    pub fn create_empty_object(&self, dest: &FsPath) -> Result<()> {
        match self.create_empty(dest) {
            Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes the object at filesystem path `dest` without a barrier of its own; a missing
    /// one is fine (`false`). Then removes the directories it leaves empty, up to (not
    /// including) `stop`.
    pub fn remove_object(&self, dest: &FsPath, stop: &FsPath) -> Result<bool> {
        match std::fs::remove_file(dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(generic(e)),
        }
        prune_parents(dest, stop);
        Ok(true)
    }

    /// A maker of many empty objects in a row (a fold's additions, in key order).
    pub fn empty_objects(&self) -> EmptyObjects<'_> {
        EmptyObjects {
            store: self,
            dir: None,
            source: None,
        }
    }

    /// Where `location` is on the filesystem.
    pub fn fs_path(&self, location: &Path) -> Result<PathBuf> {
        self.inner.path_to_filesystem(location)
    }

    /// Whether writes are made durable (off only in benchmarks).
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    /// Makes every write so far durable (`syncfs`), when fsync is on. Blocking: call it off
    /// the runtime's workers (from `spawn_blocking`). Inside a runtime it rides the group
    /// commit's next batch, whose `syncfs` it shares with the records written meanwhile: one
    /// barrier fewer per journal fold under load.
    pub fn barrier(&self) -> std::io::Result<()> {
        if !self.fsync {
            return Ok(());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return syncfs(&self.root);
        }
        self.group
            .join(None)?
            .blocking_recv()
            .map_err(|_| std::io::Error::other("group commit dropped the barrier"))?
    }

    /// Removes the empty directories from `location`'s parent up to (not including) `stop`,
    /// so deleted index entries leave no empty directories for later walks to read. A
    /// directory that is not empty (or was just refilled) stays; errors are ignored.
    pub fn prune_empty_dirs(&self, location: &Path, stop: &Path) {
        let (Ok(file), Ok(stop)) = (
            self.inner.path_to_filesystem(location),
            self.inner.path_to_filesystem(stop),
        ) else {
            return;
        };
        prune_parents(&file, &stop);
    }

    /// Removes the directories under `location` (and it) that hold no file, deepest first:
    /// what deleting every object of a tree leaves behind. Errors are ignored.
    pub fn remove_empty_tree(&self, location: &Path) {
        fn prune(dir: &FsPath) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for entry in rd.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        prune(&entry.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        if let Ok(dir) = self.inner.path_to_filesystem(location) {
            prune(&dir);
        }
    }

    /// Creates an empty object in place (see [`DeferredSync`]) as a hard link to an empty
    /// file this store keeps under `.links/`: an index entry or a marker is only a name, and a
    /// link is a directory entry without an inode of its own, which costs half the CPU and
    /// less of the barrier that makes it durable. The link is tried first and its directory
    /// made only when missing (most entries go to an existing directory); a directory removed
    /// by a concurrent prune between its creation and the link is made again. A full link
    /// count starts a new empty file; a filesystem without hard links gets a file.
    fn create_empty(&self, dest: &FsPath) -> Result<()> {
        let exists = |e: std::io::Error| object_store::Error::AlreadyExists {
            path: dest.display().to_string(),
            source: Box::new(e),
        };
        for _ in 0..16 {
            let source = self.links.current().map_err(generic)?;
            let err = match std::fs::hard_link(&source, dest) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            match err.kind() {
                std::io::ErrorKind::AlreadyExists => return Err(exists(err)),
                std::io::ErrorKind::NotFound if !source.exists() => {
                    self.links.replace(&source).map_err(generic)?;
                }
                std::io::ErrorKind::NotFound => {
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent).map_err(generic)?;
                    }
                }
                _ if err.raw_os_error() == Some(libc::EMLINK) => {
                    self.links.replace(&source).map_err(generic)?;
                }
                _ => {
                    // No hard links here (EPERM, ENOTSUP, EXDEV): a file of its own.
                    return match OpenOptions::new().write(true).create_new(true).open(dest) {
                        Ok(_) => Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists(e)),
                        Err(e) => Err(generic(e)),
                    };
                }
            }
        }
        Err(generic(std::io::Error::other(format!(
            "{}: its directory kept disappearing",
            dest.display()
        ))))
    }

    fn lock_file(&self, location: &Path) -> PathBuf {
        let d = Sha256::digest(location.as_ref().as_bytes());
        let stripe = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % LOCK_STRIPES;
        self.root.join(".locks").join(format!("{stripe:03x}.lock"))
    }

    /// Takes the key's exclusive lock; released on drop. An uncontended lock is taken on the
    /// calling thread; only a wait for another holder goes to the blocking pool.
    async fn lock(&self, location: &Path) -> Result<File> {
        let path = self.lock_file(location);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(generic)?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                    .await
                    .map_err(generic)?
                    .map_err(generic)
            }
            Err(std::fs::TryLockError::Error(e)) => Err(generic(e)),
        }
    }

    async fn read_current(&self, location: &Path) -> Result<Option<Vec<u8>>> {
        let path = self.inner.path_to_filesystem(location)?;
        match File::open(&path) {
            Ok(file) => read_whole(file)
                .await
                .map(|(b, _)| Some(b))
                .map_err(generic),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(generic(e)),
        }
    }

    /// Stages `bytes` next to `dest`, then publishes them: through the group commit when fsync
    /// is on, directly otherwise.
    async fn write(
        &self,
        location: &Path,
        dest: PathBuf,
        bytes: Bytes,
        how: Publish,
    ) -> Result<()> {
        // A small file is staged on the calling thread: the write only fills the page cache
        // (the fsync barrier comes later, on the blocking pool), cheaper than a thread hop.
        let (staged, new_dirs) = if bytes.len() as u64 <= INLINE_IO_MAX {
            stage(&dest, &bytes).map_err(generic)?
        } else {
            tokio::task::spawn_blocking({
                let dest = dest.clone();
                move || stage(&dest, &bytes)
            })
            .await
            .map_err(generic)?
            .map_err(generic)?
        };
        let item = Staged {
            staged,
            dest,
            how,
            new_dirs,
        };
        let result = if self.fsync {
            self.group.commit(item).await
        } else {
            tokio::task::spawn_blocking(move || publish(&item))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r)
        };
        result.map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: Box::new(e),
            },
            _ => generic(e),
        })
    }
}

/// Removes the empty directories from `file`'s parent up to (not including) `stop`; one that
/// is not empty (or was just refilled) stays.
fn prune_parents(file: &FsPath, stop: &FsPath) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == stop || !d.starts_with(stop) || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// The empty files empty objects are hard links to (see `LocalStore::create_empty`): one at
/// a time per process, a new one when a file's link count is full (65,000 on ext4).
#[derive(Debug)]
struct EmptyLinks {
    dir: PathBuf,
    current: std::sync::Mutex<Option<PathBuf>>,
}

impl EmptyLinks {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            current: std::sync::Mutex::new(None),
        }
    }

    /// The empty file to link to, made on first use.
    fn current(&self) -> std::io::Result<PathBuf> {
        let mut cur = self.current.lock().map_err(|_| poisoned())?;
        if let Some(p) = cur.as_ref() {
            return Ok(p.clone());
        }
        let p = self.make()?;
        *cur = Some(p.clone());
        Ok(p)
    }

    /// Starts a new empty file in place of `used` (full, or removed behind our back), unless
    /// another thread already did.
    fn replace(&self, used: &FsPath) -> std::io::Result<()> {
        let mut cur = self.current.lock().map_err(|_| poisoned())?;
        if cur.as_deref().is_none_or(|c| c == used) {
            *cur = Some(self.make()?);
        }
        Ok(())
    }

    /// An empty file with room for more links: one an earlier process made, or a new one
    /// (so processes do not leave one each behind).
    fn make(&self) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(&self.dir)?;
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            if let Ok(m) = entry.metadata()
                && m.is_file()
                && m.len() == 0
                && m.nlink() < 60_000
            {
                return Ok(entry.path());
            }
        }
        let p = self.dir.join(format!("{:016x}", rand::random::<u64>()));
        OpenOptions::new().write(true).create_new(true).open(&p)?;
        Ok(p)
    }
}

/// Makes empty objects one after another as [`LocalStore::create_empty_object`] does, each
/// link made relative to open directories: the `.links` file's, and the previous object's
/// when the next one goes into the same directory. A fold's additions come in key order, so
/// most of a second's entries share a few leaves, and their links then walk no path (the path
/// walks of source and destination were a third of a link's CPU). Anything but a plain link
/// into an open, existing directory goes the general way.
pub struct EmptyObjects<'a> {
    store: &'a LocalStore,
    /// The directory of the previous object, open.
    dir: Option<(PathBuf, File)>,
    /// The empty file linked to: its path, its directory (open) and its name.
    source: Option<(PathBuf, File, CString)>,
}

impl EmptyObjects<'_> {
    /// Creates an empty object at filesystem path `dest`; one that exists is left as it is.
    pub fn create(&mut self, dest: &FsPath) -> Result<()> {
        match self.link(dest) {
            Ok(true) => Ok(()),
            // Missing directory, full or removed source, no hard links, ...: the general way,
            // which handles each (and re-opens the directory next time: it may be new).
            Ok(false) | Err(_) => {
                self.dir = None;
                self.source = None;
                self.store.create_empty_object(dest)
            }
        }
    }

    /// Links `dest` relative to the open directories; `Ok(false)` when that failed in a way
    /// the general path handles.
    fn link(&mut self, dest: &FsPath) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
            return Ok(false);
        };
        let current = self.store.links.current()?;
        if self.source.as_ref().is_none_or(|(p, _, _)| *p != current) {
            let (Some(dir), Some(file)) = (current.parent(), current.file_name()) else {
                return Ok(false);
            };
            let name = CString::new(file.as_bytes()).map_err(std::io::Error::other)?;
            self.source = Some((current.clone(), open_dir(dir)?, name));
        }
        if self.dir.as_ref().is_none_or(|(p, _)| p != parent) {
            self.dir = None;
            self.dir = Some((parent.to_path_buf(), open_dir(parent)?));
        }
        let (Some((_, src_dir, src_name)), Some((_, dir))) = (&self.source, &self.dir) else {
            return Ok(false);
        };
        let name = CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: both directory descriptors are open for the call, and both names are
        // NUL-terminated strings that outlive it.
        let rc = unsafe {
            libc::linkat(
                src_dir.as_raw_fd(),
                src_name.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                0,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        Ok(err.kind() == std::io::ErrorKind::AlreadyExists)
    }
}

/// Opens a directory for `*at` calls.
fn open_dir(dir: &FsPath) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
}

/// How a staged file becomes the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publish {
    /// `link(2)`: fails if the object exists.
    Create,
    /// `rename(2)`: replaces the object atomically.
    Replace,
}

/// A staged write waiting to be published.
#[derive(Debug)]
struct Staged {
    staged: PathBuf,
    dest: PathBuf,
    how: Publish,
    /// Directories created for it, whose entries in their parents must be made durable too.
    new_dirs: Vec<PathBuf>,
}

/// Reads an open file whole, with its metadata.
///
/// Run records are a few KB and almost always in the page cache: they are read on the calling
/// thread (a hop to the blocking pool costs more than the read); larger objects (blobs) on the
/// blocking pool. Objects are replaced by rename, never written in place, so the size from
/// fstat is the size: exactly that much is read (no extra read to find the end).
async fn read_whole(file: File) -> std::io::Result<(Vec<u8>, std::fs::Metadata)> {
    let md = file.metadata()?;
    let size = md.len();
    let read_all = move |mut file: File| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; size as usize];
        std::io::Read::read_exact(&mut file, &mut buf)?;
        Ok(buf)
    };
    let bytes = if size <= INLINE_IO_MAX {
        read_all(file)?
    } else {
        tokio::task::spawn_blocking(move || read_all(file))
            .await
            .map_err(std::io::Error::other)??
    };
    Ok((bytes, md))
}

/// Writes `bytes` to a hidden sibling of `dest` (no fsync: the batch barrier does that).
fn stage(dest: &FsPath, bytes: &[u8]) -> std::io::Result<(PathBuf, Vec<PathBuf>)> {
    use std::io::Write;
    let mut new_dirs = Vec::new();
    if let Some(parent) = dest.parent() {
        let mut missing = Vec::new();
        let mut cur = Some(parent);
        while let Some(d) = cur {
            if d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        if !missing.is_empty() {
            std::fs::create_dir_all(parent)?;
            new_dirs = missing;
        }
    }
    loop {
        let n: u64 = rand::random::<u64>() % 1_000_000_000_000;
        let mut name = dest.as_os_str().to_owned();
        name.push(format!("#{n}"));
        let staged = PathBuf::from(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged)
        {
            Ok(mut f) => {
                // A failed write (ENOSPC) must not leave its partial file behind: every retry
                // would leak one more while the disk is full.
                if let Err(e) = f.write_all(bytes) {
                    drop(f);
                    let _ = std::fs::remove_file(&staged);
                    return Err(e);
                }
                return Ok((staged, new_dirs));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Makes a staged file the object (link or rename); removes the staged name.
fn publish(item: &Staged) -> std::io::Result<()> {
    let r = match item.how {
        Publish::Create => std::fs::hard_link(&item.staged, &item.dest),
        Publish::Replace => std::fs::rename(&item.staged, &item.dest),
    };
    if item.how == Publish::Create || r.is_err() {
        let _ = std::fs::remove_file(&item.staged);
    }
    r
}

fn fsync_dir(dir: &FsPath) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `syncfs(2)` on the filesystem holding `root`: every dirty page of it reaches the disk.
fn syncfs(root: &FsPath) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(root)?;
    // SAFETY: syncfs takes a valid open descriptor, which `f` holds for the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

type Waiter = tokio::sync::oneshot::Sender<std::io::Result<()>>;

/// Batches concurrent durable writes behind one barrier (see the module docs).
#[derive(Debug)]
struct GroupCommit {
    root: PathBuf,
    state: std::sync::Mutex<GroupState>,
}

/// One waiter of a batch: a write to publish, or `None` for a bare barrier.
type Queued = (Option<Staged>, Waiter);

#[derive(Debug, Default)]
struct GroupState {
    queue: Vec<Queued>,
    leading: bool,
}

impl GroupCommit {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            state: std::sync::Mutex::new(GroupState::default()),
        }
    }

    /// Publishes `item` durably, batched with whatever else is waiting. A leader task runs
    /// batches while writers queue; each writer waits only for the batch holding its write.
    async fn commit(self: &Arc<Self>, item: Staged) -> std::io::Result<()> {
        self.join(Some(item))?
            .await
            .map_err(|_| std::io::Error::other("group commit dropped the write"))?
    }

    /// Queues `item` (`None`: a bare barrier) for the next batch, starting a leader if none
    /// runs; the receiver gets the batch's outcome. Needs a runtime context.
    fn join(
        self: &Arc<Self>,
        item: Option<Staged>,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_leader = {
            let mut st = self.state.lock().map_err(|_| poisoned())?;
            st.queue.push((item, tx));
            !std::mem::replace(&mut st.leading, true)
        };
        if start_leader {
            let this = self.clone();
            let mut guard = LeaderGuard(Some(self.clone()));
            tokio::spawn(async move {
                this.lead().await;
                // Ended with the queue empty and `leading` cleared: nothing to fail.
                guard.disarm();
            });
        }
        Ok(rx)
    }

    async fn lead(&self) {
        loop {
            let batch = match self.state.lock() {
                Ok(mut st) => {
                    if st.queue.is_empty() {
                        st.leading = false;
                        return;
                    }
                    std::mem::take(&mut st.queue)
                }
                Err(_) => return,
            };
            let root = self.root.clone();
            match tokio::task::spawn_blocking(move || run_batch(&root, batch)).await {
                Ok(()) => {}
                // The runtime is shutting down (the process is exiting, a start-up error may
                // just have been printed as its last line): the waiters are told their write
                // was dropped; nothing for the log.
                Err(e) if e.is_cancelled() => {
                    tracing::debug!(error = %e, "group commit batch cancelled at shutdown");
                }
                Err(e) => tracing::error!(error = %e, "group commit batch failed"),
            }
        }
    }
}

/// Fails the writes still queued when a leader task is dropped before it ends (the runtime
/// shutting down, or refusing a new task): a bare barrier waits for its batch on a blocking
/// thread, which would otherwise wait forever, and the runtime's shutdown with it.
struct LeaderGuard(Option<Arc<GroupCommit>>);

impl LeaderGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0.take()
            && let Ok(mut st) = group.state.lock()
        {
            st.leading = false;
            // The senders dropped: their waiters learn the write was dropped.
            st.queue.clear();
        }
    }
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("group commit lock poisoned")
}

fn run_batch(root: &FsPath, batch: Vec<Queued>) {
    // 1. Every staged byte durable before any name points at it (and every write before a
    //    bare barrier's return).
    if let Err(e) = syncfs(root) {
        for (item, tx) in batch {
            if let Some(item) = item {
                let _ = std::fs::remove_file(&item.staged);
            }
            let _ = tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        return;
    }
    // 2. Publish each; 3. make the directory entries durable, once per directory.
    let results: Vec<std::io::Result<()>> = batch
        .iter()
        .map(|(item, _)| item.as_ref().map_or(Ok(()), publish))
        .collect();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for item in batch.iter().filter_map(|(item, _)| item.as_ref()) {
        if let Some(p) = item.dest.parent() {
            dirs.push(p.to_path_buf());
        }
        for d in &item.new_dirs {
            if let Some(p) = d.parent() {
                dirs.push(p.to_path_buf());
            }
        }
    }
    dirs.sort();
    dirs.dedup();
    let dir_sync = dirs.iter().try_for_each(|d| fsync_dir(d));
    for ((item, tx), r) in batch.into_iter().zip(results) {
        let r = match (&dir_sync, r) {
            (Err(e), Ok(())) if item.is_some() => Err(std::io::Error::new(e.kind(), e.to_string())),
            (_, r) => r,
        };
        let _ = tx.send(r);
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
        let dest = self.inner.path_to_filesystem(location)?;
        if opts.extensions.get::<DeferredSync>().is_some()
            && matches!(opts.mode, PutMode::Create)
            && bytes.len() as u64 <= INLINE_IO_MAX
        {
            if bytes.is_empty() {
                self.create_empty(&dest)?;
            } else {
                // Staged and linked (create-if-absent) at once; the caller's next durable
                // write's barrier makes both durable before anything refers to them.
                let (staged, new_dirs) = stage(&dest, &bytes).map_err(generic)?;
                let item = Staged {
                    staged,
                    dest,
                    how: Publish::Create,
                    new_dirs,
                };
                publish(&item).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: Box::new(e),
                    },
                    _ => generic(e),
                })?;
            }
            return Ok(PutResult {
                e_tag: Some(etag),
                version: None,
                extensions: Default::default(),
            });
        }
        match &opts.mode {
            // Hard-link publish: atomic create-if-absent, no lock needed.
            PutMode::Create => {
                self.write(location, dest, bytes, Publish::Create).await?;
            }
            PutMode::Overwrite => {
                let _guard = self.lock(location).await?;
                self.write(location, dest, bytes, Publish::Replace).await?;
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
                self.write(location, dest, bytes, Publish::Replace).await?;
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
        let not_found = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => object_store::Error::NotFound {
                path: location.to_string(),
                source: Box::new(e),
            },
            _ => generic(e),
        };
        let file = File::open(&path).map_err(not_found)?;
        let etag_needed = options.if_match.is_some()
            || options.if_none_match.is_some()
            || options.extensions.get::<ReadOnlyGet>().is_none();
        if !etag_needed {
            // No ETag to compute: answer a head from the metadata, and stream a large object
            // (a blob of hundreds of MB) in chunks instead of reading it whole.
            let md = file.metadata().map_err(generic)?;
            if options.head || md.len() > INLINE_IO_MAX {
                drop(file);
                let mut got = self.inner.get_opts(location, options).await?;
                // Inode-based: nobody must mistake it for ours.
                got.meta.e_tag = None;
                return Ok(got);
            }
        }
        let (bytes, md) = read_whole(file).await.map_err(generic)?;
        let modified = md.modified().map_err(generic)?;
        let len = bytes.len() as u64;
        let meta = ObjectMeta {
            location: location.clone(),
            last_modified: modified.into(),
            size: len,
            e_tag: etag_needed.then(|| content_etag(&bytes)),
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt;

    /// A barrier on a blocking thread rides the group commit; when the runtime shuts down
    /// before the batch's leader ever runs, the barrier fails instead of waiting forever (and
    /// the runtime's shutdown, which waits for blocking threads, with it).
    #[test]
    fn a_barrier_whose_leader_is_dropped_fails_instead_of_hanging() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path(), true).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let group = store.group.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                // Detached: the runtime's drop waits for it all the same.
                drop(tokio::task::spawn_blocking(move || store.barrier()));
                // Hold the runtime's only thread until the barrier has queued and a leader
                // was spawned, so the leader never runs before the shutdown.
                while !group.state.lock().unwrap().leading {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            drop(rt);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the runtime's shutdown hung on the barrier");
    }

    /// A fold's additions: new and existing directories, an existing object, and a cached
    /// directory removed (and made again) between two links into it.
    #[test]
    fn empty_objects_link_in_order_and_recover_from_a_removed_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path(), false).unwrap();
        let leaf = tmp.path().join("index/time/a/b");
        let mut objects = store.empty_objects();
        objects.create(&leaf.join("e1")).unwrap();
        objects.create(&leaf.join("e2")).unwrap();
        // Exists: left as it is.
        objects.create(&leaf.join("e2")).unwrap();
        // The open directory goes away (a concurrent prune) and comes back as a new one.
        std::fs::remove_file(leaf.join("e1")).unwrap();
        std::fs::remove_file(leaf.join("e2")).unwrap();
        std::fs::remove_dir(&leaf).unwrap();
        objects.create(&leaf.join("e3")).unwrap();
        objects.create(&leaf.join("e4")).unwrap();
        objects
            .create(&tmp.path().join("index/by-id/012/e5"))
            .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&leaf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["e3", "e4"]);
        // All are links to one empty file.
        let md = std::fs::metadata(leaf.join("e4")).unwrap();
        assert_eq!(md.len(), 0);
        assert_eq!(md.nlink(), 4, "the .links file and e3, e4, e5");
        assert_eq!(
            md.ino(),
            std::fs::metadata(tmp.path().join("index/by-id/012/e5"))
                .unwrap()
                .ino()
        );
    }
}
