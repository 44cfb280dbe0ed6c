//! Listing benchmark: pages from the index against the listing it replaced, at scale.
//!
//! ```text
//! cargo bench --bench index                       # 1,000,000 runs local, 20,000 on S3
//! BENCH_RUNS=200000 BENCH_S3_RUNS=5000 cargo bench --bench index
//! BENCH_ONLY=local,s3,creates cargo bench --bench index
//! ```
//!
//! * **local** / **s3**: a store of `BENCH_RUNS` (S3: `BENCH_S3_RUNS`) runs of 2-5 KB, 100
//!   tools, 3 modes, 3 statuses, 4 risk levels, created 30 ms apart (filled untimed, fsync off,
//!   through `RunStore::execute`, the local store's index journaled and folded every second as
//!   `serve` keeps it). Then, timed: the first page newest first;
//!   the first 50 runs of one tool (1 %); of one tool with status ERROR (~0.3 %); of status
//!   ERROR, risk RED and mode `drill` (~0.1 %, no tool: the time tree with the filter); a full
//!   walk in pages of 1,000. Beside each, the **scan** it replaced, measured the same way in the
//!   same run: list every record name, sort, read records until the page is full (the walk
//!   by scan is timed over its first 20 pages and extrapolated, as it is quadratic).
//!   On S3 the object-store calls per page are counted (LIST requests: each delimited listing
//!   is one; a flat listing is one per 1,000 keys read). On the local store, the first page
//!   and the 0.1 % filter again while 16 creates are in flight on the same store (their
//!   entries still partly in the journal, which each page merges).
//! * **creates**: durable creates/s (fsync on) at 1, 16 and 256 in flight without the index
//!   (`RunStore::without_index`), with it as `serve` keeps it (the index journal, folded in the
//!   background and once more inside the cell's time), and with an entry file per tree on the
//!   create's path; in fresh directories and in a store in steady state (filled first with
//!   `BENCH_PREFILL` runs, 20,000 by default). A cell's runs are stamped with the clock, as
//!   `serve` stamps them (`BENCH_STAMP_MS=30`: 30 ms apart, as the fill, whatever the rate).
//!   Each round runs one cell per side, in turn (reversed every other round); a ratio is the
//!   median of the rounds' ratios, with the lowest and highest beside it: on a shared machine
//!   the spread says more than any one figure. Each cell also reports the process's CPU and
//!   the KB the disk took (`/proc/diskstats`) per create: costs that move less with the noise.
//!   Knobs: `BENCH_IN_FLIGHT=1,16,256`, `BENCH_KINDS=fresh,steady`, `BENCH_CELL_S=4`,
//!   `BENCH_REPS=3`, `BENCH_FOLD_MS` (the journal's fold period), `BENCH_SIDES=plain,journal,
//!   direct` (those sides alone, for a profiler or a shorter run).
//!
//! `BENCH_SCAN_REPS=0` measures the index alone, without the scans (which take over an hour at
//! 10^6 runs; their figures do not depend on the index).
//!
//! `BENCH_LOCAL_DIR=<dir> BENCH_SKIP_FILL=1 BENCH_ONLY=walk` re-measures, on a store a previous
//! run filled, only the index's first page and full walk (no scan, which evicts the page cache
//! with its million `stat`s).
//!
//! Store directories stay under `target/bench-tmp/index-<stamp>/` (see benches/store.rs on why
//! nothing is deleted); `cargo clean` removes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rmos_runs::domain::artifact::{StoredRecord, Timestamp};
use rmos_runs::domain::command::{Command, CommandKind, Context};
use rmos_runs::domain::ids::RunId;
use rmos_runs::store::{ListQuery, OpenOptions, Order, RunStore, StoreUrl};
use serde_json::{Value, json};

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

const COMMAND: &str = "cargo bench --bench index";
const TOOLS: u64 = 100;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn only(part: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p.trim() == part))
}

fn run_id(i: u64) -> RunId {
    // Spread ids over the whole space (a multiplicative hash), as derived ids are.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    RunId::parse(&format!("run_{h:012x}")).expect("valid id")
}

fn create_body(i: u64) -> Value {
    let h = i.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let status = ["OK", "BLOCKED", "ERROR"][(h >> 8) as usize % 3];
    let risk = ["GREEN", "YELLOW", "RED", "UNKNOWN"][(h >> 16) as usize % 4];
    let mode = ["cam", "saw", "drill"][(h >> 24) as usize % 3];
    let pad = "x".repeat(1500 + (h >> 32) as usize % 3000);
    json!({"mode": mode, "tool_id": format!("T{}", (h >> 40) % TOOLS), "status": status,
           "run_id": run_id(i).as_str(),
           "request": {"geometry": {"w": 120.5, "h": 80.0}, "notes": pad},
           "decision": {"risk_level": risk, "score": 50.0, "warnings": []},
           "outputs": {"gcode_text": "G21\nG90\nG0 X0 Y0\nG1 X10 F900\n"}})
}

fn create_at(i: u64, base_ms: i64) -> (Command, Context) {
    create_stamped(i, base_ms + i as i64 * 30)
}

/// Run `i`, created at `at_ms` (ms since the epoch).
fn create_stamped(i: u64, at_ms: i64) -> (Command, Context) {
    let body = create_body(i);
    let cmd =
        Command::decode(CommandKind::Create, body.to_string().as_bytes(), None).expect("decode");
    let at = chrono::DateTime::from_timestamp_millis(at_ms).expect("time");
    let ctx = Context {
        now: Timestamp(at),
        ..Context::now()
    };
    (cmd, ctx)
}

/// Creates runs `0..n` (concurrency 8), skipping those already there: a rerun on a kept
/// directory resumes.
async fn fill(store: &RunStore, n: u64, base_ms: i64) {
    let done = AtomicU64::new(0);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(8, |i| {
            let done = &done;
            async move {
                let (cmd, ctx) = create_at(i, base_ms);
                store.execute(&cmd, &ctx).await.expect("create");
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d.is_multiple_of(100_000) {
                    eprintln!("  filled {d}/{n} in {:.0} s", start.elapsed().as_secs_f64());
                }
            }
        })
        .await;
}

/// Median wall time of `f` over `reps` calls, in ms.
async fn median_ms<F, Fut, T>(reps: usize, mut f: F) -> (f64, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        last = Some(f().await);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], last.expect("reps > 0"))
}

/// The listing the index replaced: every record name listed and sorted, then records read in
/// run id order until `limit` match (at most 2,000 per page, as it did).
async fn scan_page(
    store: &RunStore,
    after: Option<&RunId>,
    limit: usize,
    filter: &(dyn Fn(&Value) -> bool + Sync),
) -> (usize, Option<RunId>) {
    let os = store.object_store();
    let listed = os.list_with_delimiter(None).await.expect("list");
    let mut ids: Vec<RunId> = listed
        .objects
        .iter()
        .filter_map(|m| RunId::parse(m.location.filename()?.strip_suffix(".json")?).ok())
        .filter(|id| after.is_none_or(|a| id > a))
        .collect();
    ids.sort();
    let mut found = 0;
    let mut last = None;
    let mut reads = futures::stream::iter(ids.iter().take(2000).cloned())
        .map(|id| async move {
            let bytes = os
                .get(&ObjPath::from(format!("{id}.json")))
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes");
            (id, bytes)
        })
        .buffered(16);
    while let Some((id, bytes)) = reads.next().await {
        last = Some(id);
        if let Ok(StoredRecord::Live(a)) = StoredRecord::decode(&bytes) {
            let v = serde_json::to_value(a.as_ref()).expect("json");
            if filter(&v) {
                found += 1;
                if found >= limit {
                    break;
                }
            }
        }
    }
    (found, last)
}

/// Follows `q`'s cursors until 50 runs are in hand (a selective filter may need more pages)
/// or the listing ends; returns (runs, pages).
async fn first_50(store: &RunStore, q: &ListQuery) -> (usize, usize) {
    let mut q = q.clone();
    let (mut got, mut pages) = (0, 0);
    loop {
        let page = store.list(&q).await.expect("list");
        got += page.runs.len();
        pages += 1;
        match page.next_cursor {
            Some(c) if got < 50 => q.cursor = Some(c),
            _ => return (got, pages),
        }
    }
}

/// Every page of `q`; returns (runs, pages).
async fn walk(store: &RunStore, mut q: ListQuery) -> (usize, usize) {
    let (mut runs, mut pages) = (0, 0);
    loop {
        let page = store.list(&q).await.expect("list");
        runs += page.runs.len();
        pages += 1;
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return (runs, pages),
        }
    }
}

/// Counts the LIST requests behind a flat listing stream: the first key read (or the end)
/// costs one, and every 1,000th key after it one more (S3 pages hold 1,000 keys).
fn count_pages(
    stream: BoxStream<'static, object_store::Result<ObjectMeta>>,
    pages: Arc<AtomicU64>,
) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
    pages.fetch_add(1, Ordering::Relaxed);
    let mut read = 0u64;
    stream
        .inspect(move |_| {
            read += 1;
            if read > 1 && (read - 1).is_multiple_of(1000) {
                pages.fetch_add(1, Ordering::Relaxed);
            }
        })
        .boxed()
}

/// Counts the listing calls that reach the backend (see the module docs).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ObjectStore>,
    lists: Arc<AtomicU64>,
    keys: Arc<AtomicU64>,
}

impl std::fmt::Display for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        l: &ObjPath,
        p: PutPayload,
        o: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &ObjPath,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        l: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(l)
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        count_pages(self.inner.list(p), self.keys.clone())
    }
    fn list_with_offset(
        &self,
        p: Option<&ObjPath>,
        o: &ObjPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        count_pages(self.inner.list_with_offset(p, o), self.keys.clone())
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(
        &self,
        f: &ObjPath,
        t: &ObjPath,
        o: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
}

/// What the replaced scan checks on each record it reads.
type Filter = Box<dyn Fn(&Value) -> bool + Sync>;

struct Row {
    what: &'static str,
    index_ms: f64,
    scan_ms: f64,
    lists: Option<f64>,
}

fn tool_of(v: &Value) -> &str {
    v["tool_id"].as_str().unwrap_or_default()
}

async fn listing_rows(store: &RunStore, n: usize, counter: Option<&Counting>) -> Vec<Row> {
    let reps = 9;
    // LIST requests since the last reset: each delimited listing is one, a flat listing one
    // per 1,000 keys read (each call's keys are counted apart, see `Counting`).
    let lists = || {
        counter
            .map(|c| c.lists.load(Ordering::Relaxed) as f64 + c.keys.load(Ordering::Relaxed) as f64)
    };
    let reset = || {
        if let Some(c) = counter {
            c.lists.store(0, Ordering::Relaxed);
            c.keys.store(0, Ordering::Relaxed);
        }
    };
    let q = |f: &dyn Fn(&mut ListQuery)| {
        let mut q = ListQuery {
            limit: Some(50),
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let cases: Vec<(&'static str, ListQuery, Filter)> = vec![
        ("first page, newest first", q(&|_| {}), Box::new(|_| true)),
        (
            "first 50 of one tool (1 %)",
            q(&|q| q.tool_id = Some("T7".parse().expect("tool"))),
            Box::new(|v| tool_of(v) == "T7"),
        ),
        (
            "first 50 of one tool, status ERROR (0.3 %)",
            q(&|q| {
                q.tool_id = Some("T7".parse().expect("tool"));
                q.status = Some("ERROR".parse().expect("status"));
            }),
            Box::new(|v| tool_of(v) == "T7" && v["status"] == "ERROR"),
        ),
        (
            "first 50 of ERROR, RED, drill (0.1 %, no tool)",
            q(&|q| {
                q.status = Some("ERROR".parse().expect("status"));
                q.risk_level = Some("RED".parse().expect("risk"));
                q.mode = Some("drill".parse().expect("mode"));
            }),
            Box::new(|v| {
                v["status"] == "ERROR"
                    && v["decision"]["risk_level"] == "RED"
                    && v["mode"] == "drill"
            }),
        ),
    ];
    let mut rows = Vec::new();
    // The replaced scan re-lists the whole store per page: fewer repetitions on S3.
    // `BENCH_SCAN_REPS=0` skips the scans (at 10^6 runs they take over an hour).
    let scan_reps = env_usize("BENCH_SCAN_REPS", if counter.is_some() { 1 } else { 3 });
    for (what, query, filter) in cases {
        let fetch = || async { first_50(store, &query).await.1 };
        reset();
        let pages = fetch().await;
        let calls = lists().map(|c| c / pages as f64);
        let (index_ms, _) = median_ms(reps, fetch).await;
        let (scan_ms, _) = if scan_reps == 0 {
            (f64::NAN, ())
        } else {
            median_ms(scan_reps, || async {
                let mut after = None;
                let mut got = 0;
                loop {
                    let (found, last) =
                        scan_page(store, after.as_ref(), 50 - got, filter.as_ref()).await;
                    got += found;
                    if got >= 50 || last.is_none() {
                        break;
                    }
                    after = last;
                }
            })
            .await
        };
        rows.push(Row {
            what,
            index_ms,
            scan_ms,
            lists: calls,
        });
    }
    // Full walk, pages of 1,000.
    reset();
    let t = Instant::now();
    let (runs, pages) = walk(
        store,
        ListQuery {
            limit: Some(1000),
            order: Some(Order::Newest),
            ..Default::default()
        },
    )
    .await;
    let index_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(runs, n, "the walk must list every run");
    let calls = lists().map(|c| c / pages as f64);
    let t = Instant::now();
    let mut after = None;
    let scan_pages = if scan_reps == 0 {
        0
    } else if counter.is_some() {
        3
    } else {
        20
    }
    .min(n.div_ceil(1000));
    for _ in 0..scan_pages {
        let (_, last) = scan_page(store, after.as_ref(), 1000, &|_| true).await;
        after = last;
    }
    let scan_ms = t.elapsed().as_secs_f64() * 1000.0 / scan_pages as f64 * n.div_ceil(1000) as f64;
    // (NaN when the scans were skipped: 0 / 0.)
    rows.push(Row {
        what: "walk every run, pages of 1,000",
        index_ms,
        scan_ms,
        lists: calls,
    });
    rows
}

fn print_rows(title: &str, n: usize, rows: &[Row]) {
    println!("\n## {title}: {n} runs");
    println!(
        "| {:<46} | {:>12} | {:>12} | {:>8} | {:>14} |",
        "listing", "index ms", "scan ms", "speed-up", "LIST per page"
    );
    println!(
        "|{:-<48}|{:->14}|{:->14}|{:->10}|{:->16}|",
        "", "", "", "", ""
    );
    for r in rows {
        let (scan, speedup) = if r.scan_ms.is_finite() {
            (
                format!("{:.1}", r.scan_ms),
                format!("{:.0}x", r.scan_ms / r.index_ms),
            )
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        println!(
            "| {:<46} | {:>12.1} | {:>12} | {:>8} | {:>14} |",
            r.what,
            r.index_ms,
            scan,
            speedup,
            r.lists.map_or("-".to_owned(), |c| format!("{c:.1}"))
        );
    }
    if let Some(w) = rows.last().filter(|w| w.what.starts_with("walk")) {
        println!(
            "walk: {:.2} us per run by the index ({:.1} s for {n}); by scan {:.0} s (extrapolated)",
            w.index_ms * 1000.0 / n as f64,
            w.index_ms / 1000.0,
            w.scan_ms / 1000.0
        );
    }
}

fn bench_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&root).expect("bench dir");
    root
}

fn local_store(dir: &Path, fsync: bool) -> RunStore {
    RunStore::open(
        &StoreUrl::Local(dir.to_path_buf()),
        &OpenOptions {
            fsync,
            ..OpenOptions::default()
        },
    )
    .expect("open")
}

/// How often the journal cells fold: `serve`'s pace unless `BENCH_FOLD_MS` says otherwise.
fn fold_every() -> Duration {
    std::env::var("BENCH_FOLD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(rmos_runs::store::journal::FOLD_EVERY, Duration::from_millis)
}

/// Folds `store`'s index journal every [`fold_every`], as `serve`'s `index-fold` task does,
/// until aborted.
async fn folding(store: RunStore) {
    loop {
        tokio::time::sleep(fold_every()).await;
        store.fold_index_journal().await.expect("fold");
    }
}

/// The first page, newest first, and the 0.1 % filter's first 50, while runs are created on
/// the same store (16 in flight, fsync off, stamped with the clock: they are the newest, so
/// the first page is made of them) and folded every second: each page merges the journaled
/// changes not yet folded (up to a second of creates) over the trees. Returns the rows and
/// the creates/s meanwhile.
async fn pages_under_writes(store: &RunStore, first: u64) -> (Vec<Row>, f64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let created = Arc::new(AtomicU64::new(0));
    let folder = tokio::spawn(folding(store.clone()));
    let writer = {
        let (store, stop, created) = (store.clone(), stop.clone(), created.clone());
        tokio::spawn(async move {
            let next = AtomicU64::new(first);
            futures::stream::iter(0..16)
                .for_each_concurrent(16, |_| async {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let now = chrono::Utc::now().timestamp_millis();
                        let (cmd, ctx) = create_stamped(i, now);
                        store.execute(&cmd, &ctx).await.expect("create");
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
        })
    };
    // Into the steady rhythm of appends and folds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (t, before) = (Instant::now(), created.load(Ordering::Relaxed));
    let newest = ListQuery {
        limit: Some(50),
        ..Default::default()
    };
    let selective = ListQuery {
        limit: Some(50),
        status: Some("ERROR".parse().expect("status")),
        risk_level: Some("RED".parse().expect("risk")),
        mode: Some("drill".parse().expect("mode")),
        ..Default::default()
    };
    let mut rows = Vec::new();
    for (what, query) in [
        ("first page, newest first", newest),
        ("first 50 of ERROR, RED, drill (0.1 %, no tool)", selective),
    ] {
        let (index_ms, (got, _)) = median_ms(9, || first_50(store, &query)).await;
        assert_eq!(got, 50, "{what}: a full page");
        rows.push(Row {
            what,
            index_ms,
            scan_ms: f64::NAN,
            lists: None,
        });
    }
    let rate = (created.load(Ordering::Relaxed) - before) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    folder.abort();
    store.fold_index_journal().await.expect("fold");
    (rows, rate)
}

/// How a creates cell keeps the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Indexing {
    /// Not at all (`RunStore::without_index`): the ceiling.
    Off,
    /// As `serve` does: the index journal, folded into the trees every `FOLD_EVERY` by a
    /// background task, and once more at the end of the cell, inside its time.
    Journal,
    /// An entry file per tree written on the create's path (what a tool such as `import` does).
    Direct,
}

/// When a creates cell's runs are created (their `created_at_utc`, which places them in the
/// time trees): as `serve` stamps them, at the moment of the create, counted from `origin`
/// (after every run a prefill made) on the clock since `clock`. `BENCH_STAMP_MS=30` stamps
/// run `i` at `i` * 30 ms instead, as the fill does: a time leaf (256 ms) then holds ~8 runs
/// whatever the rate, where at 2,000 creates/s a real one holds ~500.
#[derive(Clone, Copy)]
struct Stamps {
    origin_ms: i64,
    clock: Instant,
    /// `BENCH_STAMP_MS`, if set.
    step_ms: Option<i64>,
}

impl Stamps {
    fn at(&self, i: u64, base_ms: i64) -> i64 {
        match self.step_ms {
            Some(step) => base_ms + i as i64 * step,
            None => self.origin_ms + self.clock.elapsed().as_millis() as i64,
        }
    }
}

/// What one creates cell measured.
#[derive(Clone, Copy, Debug)]
struct Cell {
    /// Durable creates/s.
    rate: f64,
    /// The process's CPU (user + system) per create, µs.
    cpu_us: f64,
    /// Block-device write requests per create (NaN where the directory is on none).
    writes: f64,
    /// KB written to the block device per create.
    kb: f64,
}

/// Durable creates/s over a 4 s cell on the store in `dir`, creating runs `first..` (stamped
/// by `stamps`), what each create cost, and the first run number the cell did not create.
async fn creates_cell(
    dir: &Path,
    indexing: Indexing,
    in_flight: usize,
    first: u64,
    stamps: Stamps,
) -> (Cell, u64) {
    // Start from a clean page cache: the fill (fsync off) and anything else on the machine
    // leave dirty pages that the cell's first `syncfs` would otherwise pay for.
    let _ = std::process::Command::new("sync").status();
    std::fs::create_dir_all(dir).expect("cell dir");
    let disk = common::disk_writes(dir);
    let store = local_store(dir, true);
    let store = match indexing {
        Indexing::Off => store.without_index(),
        Indexing::Journal => store.with_index_journal().expect("journal"),
        Indexing::Direct => store,
    };
    let base = 1_800_000_000_000;
    let next = AtomicU64::new(first);
    let done = AtomicU64::new(0);
    let cell = Duration::from_secs(env_usize("BENCH_CELL_S", 4) as u64);
    let start = Instant::now();
    let cpu = common::cpu_secs();
    let folder = (indexing == Indexing::Journal).then(|| tokio::spawn(folding(store.clone())));
    futures::stream::iter(0..in_flight)
        .for_each_concurrent(in_flight, |_| {
            let (store, next, done) = (&store, &next, &done);
            async move {
                while start.elapsed() < cell {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (cmd, ctx) = create_stamped(i, stamps.at(i, base));
                    store.execute(&cmd, &ctx).await.expect("create");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    if let Some(folder) = folder {
        folder.abort();
        // What the cell journaled is all in the trees before its time stops.
        let t = Instant::now();
        let f = store.fold_index_journal().await.expect("final fold");
        eprintln!(
            "  {in_flight} in flight: final fold of {} entries in {:.0} ms ({:.1} µs of CPU each)",
            f.added,
            t.elapsed().as_secs_f64() * 1000.0,
            f.cpu.as_secs_f64() * 1e6 / f.added.max(1) as f64
        );
    }
    let done = done.load(Ordering::Relaxed) as f64;
    let rate = done / start.elapsed().as_secs_f64();
    let cpu_us = (common::cpu_secs() - cpu) * 1e6 / done.max(1.0);
    let (writes, kb) = match (disk, common::disk_writes(dir)) {
        (Some((w0, s0)), Some((w1, s1))) => (
            w1.saturating_sub(w0) as f64 / done.max(1.0),
            s1.saturating_sub(s0) as f64 * 0.5 / done.max(1.0),
        ),
        _ => (f64::NAN, f64::NAN),
    };
    let cell = Cell {
        rate,
        cpu_us,
        writes,
        kb,
    };
    (cell, next.load(Ordering::Relaxed))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    let root = bench_root().join(format!("index-{stamp}"));
    println!(
        "# {COMMAND}  (BENCH_RUNS, BENCH_S3_RUNS, BENCH_ONLY; dirs under {})",
        root.display()
    );
    for note in common::fs_notes(&bench_root()) {
        println!("{note}");
    }
    let mut json = serde_json::Map::new();
    let base_ms = 1_790_000_000_000;

    if only("local") {
        let n = env_usize("BENCH_RUNS", 1_000_000);
        let dir = std::env::var("BENCH_LOCAL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("local"));
        // Filled as `serve` fills a store: the index journaled, folded in the background.
        let store = local_store(&dir, false)
            .with_index_journal()
            .expect("journal");
        let t = Instant::now();
        let folder = rt.spawn(folding(store.clone()));
        rt.block_on(fill(&store, n as u64, base_ms));
        folder.abort();
        rt.block_on(store.fold_index_journal()).expect("fold");
        eprintln!(
            "  local store of {n} runs ready in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        let rows = rt.block_on(listing_rows(&store, n, None));
        print_rows("local filesystem", n, &rows);
        json.insert("local".into(), rows_json(n, &rows));
        let (rows, rate) = rt.block_on(pages_under_writes(&store, n as u64));
        print_rows(
            &format!("local filesystem while {rate:.0} creates/s are journaled (16 in flight)"),
            n,
            &rows,
        );
        json.insert("local_under_writes".into(), rows_json(n, &rows));
    }

    // Opt-in only (not part of a default run).
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v.split(',').any(|p| p.trim() == "walk")) {
        let n = env_usize("BENCH_RUNS", 1_000_000);
        let dir = std::env::var("BENCH_LOCAL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("local"));
        let store = local_store(&dir, false);
        if std::env::var_os("BENCH_SKIP_FILL").is_none() {
            rt.block_on(fill(&store, n as u64, base_ms));
        }
        let first = rt.block_on(median_ms(9, || async {
            store
                .list(&ListQuery::default())
                .await
                .expect("list")
                .runs
                .len()
        }));
        for pass in 1..=2 {
            let t = Instant::now();
            let (runs, pages) = rt.block_on(walk(
                &store,
                ListQuery {
                    limit: Some(1000),
                    ..Default::default()
                },
            ));
            let s = t.elapsed().as_secs_f64();
            println!(
                "walk pass {pass}: {runs} runs in {pages} pages, {s:.1} s ({:.2} us per run); first page {:.2} ms",
                s * 1e6 / runs.max(1) as f64,
                first.0
            );
            json.insert(
                format!("walk_{pass}"),
                json!({"runs": runs, "secs": s, "first_page_ms": first.0}),
            );
        }
    }

    if only("s3") {
        let n = env_usize("BENCH_S3_RUNS", 20_000);
        rt.block_on(async {
            let server = support::S3Server::start().await;
            let bucket = support::unique_bucket();
            server.create_bucket(&bucket).await;
            let opts = support::s3_options(&server.endpoint());
            let url = StoreUrl::S3 {
                bucket,
                prefix: String::new(),
            };
            let s3 = RunStore::open(&url, &opts).expect("open s3");
            let t = Instant::now();
            fill(&s3, n as u64, base_ms).await;
            eprintln!(
                "  S3 store of {n} runs ready in {:.0} s",
                t.elapsed().as_secs_f64()
            );
            let counting = Counting {
                inner: s3.object_store().clone(),
                lists: Arc::default(),
                keys: Arc::default(),
            };
            let counted = RunStore::from_object_store(
                Arc::new(Counting {
                    inner: counting.inner.clone(),
                    lists: counting.lists.clone(),
                    keys: counting.keys.clone(),
                }),
                ObjPath::default(),
                true,
            );
            let rows = listing_rows(&counted, n, Some(&counting)).await;
            print_rows("S3 test server (moto)", n, &rows);
            json.insert("s3".into(), rows_json(n, &rows));
        });
    }

    if only("creates") {
        // Two ways: in fresh directories (every directory a create needs is new: the worst
        // case), and in a store in steady state (filled first, untimed, with `BENCH_PREFILL`
        // runs, 20,000 by default: the directories a store of that size has exist).
        let prefill = env_usize("BENCH_PREFILL", 20_000) as u64;
        let steady = |name: &str, indexed: bool| {
            let dir = root.join(format!("steady-{name}"));
            let store = local_store(&dir, false);
            let store = if indexed {
                store
            } else {
                store.without_index()
            };
            let t = Instant::now();
            rt.block_on(fill(&store, prefill, 1_800_000_000_000));
            eprintln!(
                "  {} store of {prefill} runs ready in {:.0} s",
                if indexed { "indexed" } else { "unindexed" },
                t.elapsed().as_secs_f64()
            );
            dir
        };
        let sides = [
            (Indexing::Off, "plain"),
            (Indexing::Journal, "journal"),
            (Indexing::Direct, "direct"),
        ];
        // `BENCH_SIDES=journal` (say) runs one side alone, for a profiler.
        let wanted = |name: &str| {
            std::env::var("BENCH_SIDES").map_or(true, |v| v.split(',').any(|p| p.trim() == name))
        };
        let steady_dirs = sides
            .map(|(indexing, name)| wanted(name).then(|| steady(name, indexing != Indexing::Off)));
        println!("\n## durable creates/s (fsync on), with and without the index");
        println!(
            "(creates/s; per create: the process's CPU µs, user + system, folds included, and KB \
             written to the disk; ratio: the median of the paired cells' ratios, [lowest, highest])"
        );
        println!(
            "| {:<28} | {:>9} | {:>22} | {:>22} | {:>22} | {:>22} | {:>22} |",
            "store",
            "in flight",
            "without",
            "journal",
            "direct",
            "journal/without",
            "direct/without"
        );
        println!(
            "|{:-<30}|{:->11}|{:->24}|{:->24}|{:->24}|{:->24}|{:->24}|",
            "", "", "", "", "", "", ""
        );
        let mut cells = Vec::new();
        // Cells' runs come after the prefill's (created 30 ms apart from this base), a minute on.
        let stamps = Stamps {
            origin_ms: 1_800_000_000_000 + prefill as i64 * 30 + 60_000,
            clock: Instant::now(),
            step_ms: std::env::var("BENCH_STAMP_MS")
                .ok()
                .and_then(|v| v.parse().ok()),
        };
        // Runs created by the steady-state cells so far (each cell continues the ids).
        let mut next = [prefill; 3];
        let reps = env_usize("BENCH_REPS", 3).max(1);
        println!(
            "({reps} rounds of {} s cells, one per side, in turn; a journal cell's time includes \
             its final fold)",
            env_usize("BENCH_CELL_S", 4)
        );
        let in_flights: Vec<usize> = std::env::var("BENCH_IN_FLIGHT")
            .map_or(vec![1, 16, 256], |v| {
                v.split(',').filter_map(|n| n.trim().parse().ok()).collect()
            });
        for in_flight in in_flights {
            let kinds = [("fresh", "fresh directories"), ("steady", "")];
            for (kind, label) in kinds.into_iter().filter(|(k, _)| {
                std::env::var("BENCH_KINDS").map_or(true, |v| v.split(',').any(|p| p == *k))
            }) {
                let label = if label.is_empty() {
                    format!("steady state ({prefill} runs)")
                } else {
                    label.to_owned()
                };
                let mut samples: [Vec<Cell>; 3] = Default::default();
                for rep in 0..reps {
                    // Sides in turn, so that drift on a shared machine hits each alike, and in
                    // reverse every other round, so that none always follows another.
                    let mut order: Vec<usize> = (0..sides.len()).collect();
                    if rep % 2 == 1 {
                        order.reverse();
                    }
                    for side in order {
                        let (indexing, name) = sides[side];
                        if !wanted(name) {
                            continue;
                        }
                        let cell = if kind == "fresh" {
                            rt.block_on(creates_cell(
                                &root.join(format!("c{in_flight}-{name}-{rep}")),
                                indexing,
                                in_flight,
                                0,
                                stamps,
                            ))
                            .0
                        } else {
                            let dir = steady_dirs[side].as_ref().expect("steady dir");
                            let (cell, after) = rt.block_on(creates_cell(
                                dir, indexing, in_flight, next[side], stamps,
                            ));
                            // The cell's runs stay: the next cell starts after them.
                            next[side] = after;
                            cell
                        };
                        samples[side].push(cell);
                    }
                }
                let of = |side: usize, f: fn(&Cell) -> f64| {
                    common::median(samples[side].iter().map(f).collect())
                };
                let show = |side: usize| {
                    format!(
                        "{:.0} ({:.0} µs, {:.1} KB)",
                        of(side, |c| c.rate),
                        of(side, |c| c.cpu_us),
                        of(side, |c| c.kb)
                    )
                };
                // A side's cell and the unindexed one ran in the same round, seconds apart:
                // their ratio is the measure least moved by the machine's drift, and its
                // spread over the rounds says how far the median can be trusted.
                let ratios = |side: usize| -> Vec<f64> {
                    samples[side]
                        .iter()
                        .zip(&samples[0])
                        .map(|(c, base)| c.rate / base.rate)
                        .collect()
                };
                let spread = |side: usize| {
                    let r = ratios(side);
                    if r.is_empty() {
                        return "-".to_owned();
                    }
                    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    format!("{:.2} [{lo:.2}, {hi:.2}]", common::median(r))
                };
                println!(
                    "| {label:<28} | {in_flight:>9} | {:>22} | {:>22} | {:>22} | {:>22} | {:>22} |",
                    show(0),
                    show(1),
                    show(2),
                    spread(1),
                    spread(2)
                );
                let side_json = |side: usize| {
                    let mut v = json!({"rate": of(side, |c| c.rate),
                        "cpu_us": of(side, |c| c.cpu_us),
                        "writes": of(side, |c| c.writes), "kb": of(side, |c| c.kb)});
                    // Each round's ratio to the unindexed cell beside it.
                    if side != 0 {
                        v["ratios"] = json!(ratios(side));
                    }
                    v
                };
                cells.push(json!({"store": kind, "in_flight": in_flight,
                    "without": side_json(0), "journal": side_json(1), "direct": side_json(2)}));
            }
        }
        json.insert("creates".into(), Value::Array(cells));
    }
    println!("\nBENCH_JSON {}", Value::Object(json));
}

fn rows_json(n: usize, rows: &[Row]) -> Value {
    json!({"runs": n, "rows": rows.iter().map(|r| json!({
        "what": r.what, "index_ms": r.index_ms, "scan_ms": r.scan_ms, "lists_per_page": r.lists
    })).collect::<Vec<_>>()})
}
