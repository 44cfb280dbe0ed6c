//! Store and hashing benchmark: a plain binary (no criterion), run with
//!
//! ```text
//! cargo bench --bench store
//! ```
//!
//! Prints two tables and, last, one `BENCH_JSON {...}` line with every figure:
//!
//! * hashing throughput: `sha256_text` over 1 MiB of G-code-like text, `sha256_json`
//!   (RFC 8785 canonicalization + SHA-256) over a ~4 KB run-like object and a ~1 MB object,
//!   plus the 1 MB case split into canonicalization and hashing;
//! * the local store: `RunStore::execute` creates/s and updates/s (`create` / `patch_meta`
//!   of 2–5 KB run records), fsync on and off, at concurrency 1 and 32 (tokio tasks).
//!
//! Every store cell runs in a FRESH directory under `target/bench-tmp/<stamp>/` (a real disk,
//! never tmpfs). The directories are kept: on an ext4 without a journal, file creation slows
//! down ~10x for a while after a mass delete, so the bench never deletes anything itself.
//! Remove `target/bench-tmp` when no benchmark is about to run.
//!
//! * a patch-heavy run (`BENCH_ONLY=history`): one run patched `BENCH_REVISIONS` times (10,000
//!   by default, fsync off: what is measured is whether a change slows as its history grows;
//!   each patch carries a stream position whose ack floor trails it by 64, as JetStream
//!   ingest's do, so the run forgets long-acknowledged patch ids as a worker's would),
//!   the rate of the first and the last 500 patches, the record's size, a history page at
//!   the start and at the end, and `verify_chain` over the whole chain.
//!
//! * what history costs a command (`BENCH_ONLY=history_cost`): creates and patches with
//!   revisions kept and without (`RunStore::without_history`), cells alternated, and the bytes
//!   of revision kept per command.
//!
//! `BENCH_ONLY=hashing,store,history_cost,history` runs only the named parts (all when unset).
//!
//! Each store cell is bounded by [`MAX_OPS`] operations or [`MAX_CELL`], whichever comes first.

mod common;
use common::cpu_secs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmos_runs::domain::command::{Command, CommandKind, Context, StreamPosition};
use rmos_runs::domain::hashing::{canonical_json, sha256_bytes, sha256_json, sha256_text};
use rmos_runs::domain::ids::{CommandId, RunId};
use rmos_runs::store::{OpenOptions, RunStore, StoreUrl};
use serde_json::{Value, json};

const COMMAND: &str = "cargo bench --bench store";
/// Operations per store cell, at most.
const MAX_OPS: u64 = 2000;
/// Wall time per store cell, at most (the running operations finish).
const MAX_CELL: Duration = Duration::from_secs(10);
/// Wall time per hashing row (after one warm-up call).
const HASH_TIME: Duration = Duration::from_millis(1500);
/// Runs created (untimed) before an update cell; updates go round-robin over them.
const UPDATE_RUNS: u64 = 256;
const CONCURRENCY: [usize; 2] = [1, 32];
/// Pairs (with history, without) per cell of the history cost part.
const COST_REPS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*), so inputs are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [lo, hi), three decimals.
    fn coord(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo + unit * (hi - lo)) * 1000.0).round() / 1000.0
    }
}

/// G-code-like text of at least `bytes` bytes (cut at a line end).
fn gcode(bytes: usize, seed: u64) -> String {
    let mut rng = Rng(seed | 1);
    let mut out = String::with_capacity(bytes + 64);
    out.push_str("G21\nG90\nG17\nM3 S18000\n");
    let mut n = 10u64;
    while out.len() < bytes {
        let line = match rng.next() % 8 {
            0 => format!(
                "N{n} G0 X{:.3} Y{:.3} Z5.000\n",
                rng.coord(0.0, 300.0),
                rng.coord(0.0, 200.0)
            ),
            1 => format!(
                "N{n} G2 X{:.3} Y{:.3} I{:.3} J{:.3} F900\n",
                rng.coord(0.0, 300.0),
                rng.coord(0.0, 200.0),
                rng.coord(-5.0, 5.0),
                rng.coord(-5.0, 5.0)
            ),
            _ => format!(
                "N{n} G1 X{:.3} Y{:.3} Z{:.3} F1200\n",
                rng.coord(0.0, 300.0),
                rng.coord(0.0, 200.0),
                rng.coord(-6.0, 0.0)
            ),
        };
        out.push_str(&line);
        n += 10;
    }
    out
}

/// A create payload whose stored record is a few KB (inline G-code of `gcode_bytes`).
fn create_body(run_id: &str, gcode_bytes: usize, seed: u64) -> Value {
    json!({
        "run_id": run_id,
        "mode": "cam",
        "tool_id": format!("T{}", 100 + seed % 20),
        "status": "OK",
        "created_at_utc": "2026-03-14T09:26:53.589Z",
        "request": {
            "part_number": format!("PN-{:06}", seed % 1_000_000),
            "material": {"name": "AL6061-T6", "hardness_hb": 95, "stock_mm": [310.0, 210.0, 25.4]},
            "machine": {"id": "haas-vf2-03", "controller": "NGC", "max_rpm": 12000, "max_feed_mm_min": 16500},
            "tooling": [
                {"slot": 1, "type": "flat_endmill", "diameter_mm": 6.0, "flutes": 3, "stickout_mm": 22.5},
                {"slot": 2, "type": "ball_endmill", "diameter_mm": 3.0, "flutes": 2, "stickout_mm": 15.0},
                {"slot": 7, "type": "drill", "diameter_mm": 4.2, "point_angle_deg": 118}
            ],
            "strategy": {"roughing": "adaptive", "stepover_pct": 12.5, "stepdown_mm": 2.0, "finishing": "parallel"},
            "tolerance_mm": 0.01,
            "api_token": "secret-will-be-redacted",
            "notes": "customer drawing rev C; deburr all edges; anodize after machining"
        },
        "feasibility": {
            "ok": true,
            "checks": [
                {"name": "spindle_power", "ok": true, "margin_pct": 31.2},
                {"name": "tool_reach", "ok": true, "margin_mm": 4.5},
                {"name": "fixture_clearance", "ok": true, "margin_mm": 12.0},
                {"name": "chip_load", "ok": true, "value_mm": 0.042}
            ],
            "estimated_cycle_time_s": 1843.5
        },
        "decision": {
            "risk_level": "GREEN",
            "score": 87.5,
            "warnings": ["thin wall near pocket 3 (1.2 mm)", "long stickout on T2"],
            "details": {"model": "risk-v4.2", "features": {"min_wall_mm": 1.2, "max_depth_mm": 18.0, "tool_changes": 3}}
        },
        "outputs": {
            "gcode_text": gcode(gcode_bytes, seed),
            "gcode_path": format!("/var/lib/cam/jobs/{run_id}/program.nc"),
            "preview_svg_path": format!("/var/lib/cam/jobs/{run_id}/preview.svg")
        },
        "explanation_status": "NONE",
        "meta": {"operator": "ann", "cell": "B2", "shift": "early", "source": "bench"}
    })
}

/// A run-like JSON object of about `target` canonical bytes (without the big G-code).
fn run_like_json(target: usize) -> Value {
    let mut v = create_body("run_0000000000aa", 64, 7);
    let mut n = 0u64;
    while canonical_json(&v).len() < target {
        v["meta"][format!("tag_{n:03}")] =
            json!({"at": "2026-03-14T09:30:00Z", "by": "qa", "value": n as f64 * 0.25});
        n += 1;
    }
    v
}

/// An op-plan-like JSON object (operations with toolpath points) of about `target` bytes.
fn opplan_json(target: usize) -> Value {
    let mut rng = Rng(0x5eed);
    let mut ops = Vec::new();
    let mut size = 0usize;
    let mut i = 0u64;
    while size < target {
        let points: Vec<Value> = (0..200)
            .map(|_| {
                json!([
                    rng.coord(0.0, 300.0),
                    rng.coord(0.0, 200.0),
                    rng.coord(-6.0, 0.0)
                ])
            })
            .collect();
        let op = json!({
            "id": format!("op_{i:04}"),
            "kind": if i.is_multiple_of(3) { "pocket" } else { "contour" },
            "tool_slot": 1 + i % 7,
            "feed_mm_min": 900.0 + (i % 5) as f64 * 150.0,
            "spindle_rpm": 10000 + (i % 4) * 500,
            "points": points,
        });
        size += canonical_json(&op).len() + 1;
        ops.push(op);
        i += 1;
    }
    json!({"version": 3, "units": "mm", "operations": ops})
}

// ---------------------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------------------

struct HashRow {
    name: &'static str,
    bytes: usize,
    iters: u64,
    secs: f64,
}

impl HashRow {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 * self.iters as f64 / self.secs / 1e6
    }
    fn us_per_op(&self) -> f64 {
        self.secs * 1e6 / self.iters as f64
    }
}

fn time_hash(name: &'static str, bytes: usize, mut f: impl FnMut() -> String) -> HashRow {
    std::hint::black_box(f());
    let start = Instant::now();
    let mut iters = 0u64;
    while iters < 3 || start.elapsed() < HASH_TIME {
        std::hint::black_box(f());
        iters += 1;
    }
    HashRow {
        name,
        bytes,
        iters,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn hashing() -> Vec<HashRow> {
    let text = gcode(1 << 20, 42);
    let text = &text[..text[..1 << 20].rfind('\n').map_or(1 << 20, |i| i + 1)];
    let small = run_like_json(4096);
    let big = opplan_json(1_000_000);
    let small_len = canonical_json(&small).len();
    let big_canonical = canonical_json(&big);
    vec![
        time_hash("sha256_text  G-code ~1 MiB", text.len(), || {
            sha256_text(text)
        }),
        time_hash("sha256_json  run-like ~4 KB", small_len, || {
            sha256_json(&small)
        }),
        time_hash("sha256_json  op plan ~1 MB", big_canonical.len(), || {
            sha256_json(&big)
        }),
        time_hash("  of which canonical_json", big_canonical.len(), || {
            canonical_json(&big).len().to_string()
        }),
        time_hash("  of which sha256_bytes", big_canonical.len(), || {
            sha256_bytes(&big_canonical)
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Create,
    Update,
    /// `RunStore::get` of runs written beforehand (reads only: fsync does not apply).
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Get => "get",
        }
    }
}

struct StoreRow {
    op: Op,
    fsync: bool,
    concurrency: usize,
    ops: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    conflicts: u64,
    /// Smallest and largest run record in the directory after the cell.
    record_bytes: (u64, u64),
    /// Revisions kept under `history/` after the cell, and their bytes.
    history: (u64, u64),
    /// CPU seconds (user + system) this process spent in the timed part.
    cpu: f64,
    dir: PathBuf,
}

impl StoreRow {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

fn run_id(i: u64) -> RunId {
    RunId::parse(&format!("run_{i:012x}")).unwrap()
}

fn create_cmd(i: u64) -> Command {
    // G-code 0.2–1.4 KB inline: stored records of ~3.2–4.5 KB (~5 KB after the patches).
    let body = create_body(run_id(i).as_str(), 200 + (i as usize % 6) * 240, i);
    Command::decode(CommandKind::Create, body.to_string().as_bytes(), None).unwrap()
}

fn patch_cmd(i: u64) -> (Command, Context) {
    let run = run_id(i % UPDATE_RUNS);
    let body = json!({"run_id": run.as_str(),
                      "meta_updates": {format!("b{i:05}"): {"step": i, "ok": true}}});
    let cmd = Command::decode(CommandKind::PatchMeta, body.to_string().as_bytes(), None).unwrap();
    let ctx = Context {
        command_id: Some(CommandId::parse(&format!("u{i}")).unwrap()),
        ..Context::now()
    };
    (cmd, ctx)
}

fn open_local(dir: &Path, fsync: bool) -> RunStore {
    RunStore::open(
        &StoreUrl::Local(dir.to_path_buf()),
        &OpenOptions {
            fsync,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn sync_disk() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

fn only(part: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p.trim() == part))
}

/// One run patched `n` times. The early window is patches 500-999 (the record has reached its
/// steady size: the remembered ids trail by 64), the late one the last 500; each is reported
/// as patches/s and median latency, so the comparison is of history length alone. Also: record
/// bytes at revision 1 and at the end, a history page at the start and at the end, and
/// `verify_chain` over the whole chain.
async fn patch_heavy(root: &Path, n: u64) -> Value {
    let dir = root.join("history-heavy");
    let store = open_local(&dir, false);
    let id = run_id(0xabc);
    store
        .execute(&create_cmd(0xabc), &Context::now())
        .await
        .unwrap();
    let size = |store: &RunStore| {
        let store = store.clone();
        let id = id.clone();
        async move { store.get_bytes(&id).await.unwrap().len() }
    };
    let first_size = size(&store).await;
    let window = 500.min(n / 4).max(1);
    let early = window..2 * window;
    let late = n - window..n;
    let mut latencies = Vec::with_capacity(n as usize);
    for i in 0..n {
        let body = json!({"run_id": id.as_str(), "meta_updates": {"step": i}});
        let cmd =
            Command::decode(CommandKind::PatchMeta, body.to_string().as_bytes(), None).unwrap();
        let ctx = Context {
            command_id: Some(CommandId::parse(&format!("h{i}")).unwrap()),
            // As JetStream ingest sees it: the consumer's ack floor trails the message by
            // a few, so the run forgets the ids of long-acknowledged patches
            // (`forget_acked_after`) and its record stays small.
            stream: Some(StreamPosition {
                seq: i + 1,
                acked_through: i.saturating_sub(64),
            }),
            ..Context::now()
        };
        let t = Instant::now();
        store.execute(&cmd, &ctx).await.unwrap();
        latencies.push(t.elapsed());
    }
    let stats = |r: std::ops::Range<u64>| {
        let mut l: Vec<Duration> = latencies[r.start as usize..r.end as usize].to_vec();
        let total: f64 = l.iter().map(Duration::as_secs_f64).sum();
        l.sort();
        (l.len() as f64 / total, percentile(&l, 0.5))
    };
    let (early_rate, early_p50) = stats(early.clone());
    let (late_rate, late_p50) = stats(late.clone());
    let last_size = size(&store).await;
    let t = Instant::now();
    let page = store.history(&id, None, 100).await.unwrap();
    let first_page_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(page.revisions.len(), 100);
    let t = Instant::now();
    let page = store.history(&id, Some(n + 1 - 100), 100).await.unwrap();
    let last_page_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(page.revisions.len(), 100);
    let t = Instant::now();
    let chain = store.verify_chain(&id).await.unwrap();
    let verify_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(chain.ok, "{chain:?}");
    println!(
        "\n## patch-heavy run: {n} patches of one run (fsync off), {}",
        dir.display()
    );
    println!(
        "patches {}-{}: {early_rate:.0}/s, p50 {early_p50:.3} ms; patches {}-{}: {late_rate:.0}/s, \
         p50 {late_p50:.3} ms (rate ratio late/early {:.2}, p50 ratio {:.2})",
        early.start + 1,
        early.end,
        late.start + 1,
        late.end,
        late_rate / early_rate,
        late_p50 / early_p50
    );
    println!(
        "record bytes: {first_size} at revision 1, {last_size} at revision {}",
        n + 1
    );
    println!(
        "history page of 100: {first_page_ms:.1} ms at the start, {last_page_ms:.1} ms at the end"
    );
    println!(
        "verify_chain over {} revisions: {verify_ms:.0} ms ({:.1} us per revision)",
        n + 1,
        verify_ms * 1e3 / (n + 1) as f64
    );
    json!({"revisions": n + 1, "early_patches_per_s": early_rate, "late_patches_per_s": late_rate,
           "early_p50_ms": early_p50, "late_p50_ms": late_p50,
           "record_bytes_first": first_size, "record_bytes_last": last_size,
           "history_first_page_ms": first_page_ms, "history_last_page_ms": last_page_ms,
           "verify_chain_ms": verify_ms})
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

/// Files and bytes under `dir`, recursively.
fn tree_size(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .filter_map(Result::ok)
        .fold((0, 0), |(n, b), e| match e.file_type() {
            Ok(t) if t.is_dir() => {
                let (n2, b2) = tree_size(&e.path());
                (n + n2, b + b2)
            }
            _ => (n + 1, b + e.metadata().map_or(0, |m| m.len())),
        })
}

fn open_variant(dir: &Path, fsync: bool, history: bool) -> RunStore {
    let store = open_local(dir, fsync);
    if history {
        store
    } else {
        store.without_history()
    }
}

async fn store_cell(
    root: &Path,
    op: Op,
    fsync: bool,
    concurrency: usize,
    history: bool,
) -> StoreRow {
    let dir = root.join(format!(
        "{}-fsync_{}-c{concurrency}{}",
        op.name(),
        if fsync { "on" } else { "off" },
        if history { "" } else { "-no_history" }
    ));
    assert!(
        !dir.exists(),
        "{} exists: every cell needs a fresh directory",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap();

    if op == Op::Update || op == Op::Get {
        // Untimed set-up (fsync off, then one sync so its dirty pages are not timed).
        let setup = Arc::new(open_variant(&dir, false, history));
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8 {
            let setup = setup.clone();
            tasks.spawn(async move {
                for i in (t..UPDATE_RUNS).step_by(8) {
                    setup
                        .execute(&create_cmd(i), &Context::now())
                        .await
                        .unwrap();
                }
            });
        }
        tasks.join_all().await;
    }
    let cmds: Arc<Vec<(Command, Context)>> = Arc::new(
        (0..MAX_OPS)
            .map(|i| match op {
                Op::Create | Op::Get => (create_cmd(i), Context::now()),
                Op::Update => patch_cmd(i),
            })
            .collect(),
    );
    sync_disk();

    let store = Arc::new(open_variant(&dir, fsync, history));
    let next = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_secs();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (store, next, conflicts, cmds) =
            (store.clone(), next.clone(), conflicts.clone(), cmds.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= MAX_OPS || start.elapsed() >= MAX_CELL {
                    break;
                }
                let (cmd, ctx) = &cmds[i as usize];
                let t = Instant::now();
                if op == Op::Get {
                    let a = store.get(&run_id(i % UPDATE_RUNS)).await.unwrap();
                    latencies.push(t.elapsed());
                    assert_eq!(a.revision, 1);
                    continue;
                }
                let out = store.execute(cmd, ctx).await.unwrap();
                latencies.push(t.elapsed());
                assert!(out.changed);
                conflicts.fetch_add(u64::from(out.conflicts), Ordering::Relaxed);
            }
            latencies
        });
    }
    let mut latencies: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu_before;
    latencies.sort();

    let sizes: Vec<u64> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect();
    let record_bytes = (
        sizes.iter().copied().min().unwrap_or(0),
        sizes.iter().copied().max().unwrap_or(0),
    );
    StoreRow {
        op,
        fsync,
        concurrency,
        ops: latencies.len() as u64,
        secs,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        conflicts: conflicts.load(Ordering::Relaxed),
        record_bytes,
        history: tree_size(&dir.join("history")),
        cpu,
        dir,
    }
}

/// `(name, magic)` of the filesystem holding `path`.
fn fs_type(path: &Path) -> (String, i64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid C string and `st` a properly sized out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return ("unknown".into(), 0);
    }
    let magic = st.f_type as i64;
    let name = match magic {
        0xEF53 => "ext2/3/4",
        0x0102_1994 => "tmpfs",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlayfs",
        _ => "other",
    };
    (name.into(), magic)
}

/// `/proc/loadavg`'s first three fields: this machine may be shared, so say how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn bench_root() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    target
        .join("bench-tmp")
        .join(format!("{stamp}-{}", std::process::id()))
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let started = Instant::now();
    let root = bench_root();
    std::fs::create_dir_all(&root).unwrap();
    let (fs_name, fs_magic) = fs_type(&root);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# {COMMAND}");
    println!(
        "# {} CPUs; store dirs under {} ({fs_name}, statfs magic {fs_magic:#x})",
        cpus,
        root.display()
    );
    let load_before = loadavg();
    println!("# load average before: {load_before}");
    if fs_name == "tmpfs" {
        println!("# WARNING: tmpfs: fsync is free here, the store figures do not describe a disk");
    }
    for note in common::fs_notes(&root) {
        println!("{note}");
    }

    println!("\n## hashing (MB = 10^6 bytes; single thread)");
    println!(
        "{:<30} {:>10} {:>8} {:>8} {:>10} {:>10}",
        "case", "bytes", "iters", "secs", "MB/s", "us/op"
    );
    let hash_rows = if only("hashing") {
        hashing()
    } else {
        Vec::new()
    };
    for r in &hash_rows {
        println!(
            "{:<30} {:>10} {:>8} {:>8.2} {:>10.1} {:>10.1}",
            r.name,
            r.bytes,
            r.iters,
            r.secs,
            r.mb_per_s(),
            r.us_per_op()
        );
    }

    println!(
        "\n## local store: RunStore::execute, fresh dir per cell, \
         <= {MAX_OPS} ops or {}s per cell (updates: patch_meta round-robin over {UPDATE_RUNS} runs)",
        MAX_CELL.as_secs()
    );
    println!(
        "{:<7} {:>5} {:>5} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>11}",
        "op", "fsync", "conc", "ops", "secs", "ops/s", "p50 ms", "p99 ms", "conflicts", "record B"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut store_rows = Vec::new();
    for fsync in [true, false].into_iter().filter(|_| only("store")) {
        for op in [Op::Create, Op::Update, Op::Get] {
            for concurrency in CONCURRENCY {
                let r = rt.block_on(store_cell(&root, op, fsync, concurrency, true));
                println!(
                    "{:<7} {:>5} {:>5} {:>7} {:>7.2} {:>9.1} {:>8.2} {:>8.2} {:>9} {:>11}",
                    r.op.name(),
                    if r.fsync { "on" } else { "off" },
                    r.concurrency,
                    r.ops,
                    r.secs,
                    r.ops_per_s(),
                    r.p50_ms,
                    r.p99_ms,
                    r.conflicts,
                    format!("{}-{}", r.record_bytes.0, r.record_bytes.1)
                );
                store_rows.push(r);
            }
        }
    }
    let mut cost_rows = Vec::new();
    if only("history_cost") {
        println!(
            "\n## what history costs a command: the same cell with revisions kept and without \
             (RunStore::without_history), alternated {COST_REPS} times, fresh dir per cell; \
             medians; CPU is this process's user + system time per command"
        );
        println!(
            "{:<7} {:>5} {:>5} {:>11} {:>11} {:>6} {:>11} {:>11} {:>8} {:>14}",
            "op",
            "fsync",
            "conc",
            "with op/s",
            "w/o op/s",
            "ratio",
            "with CPU us",
            "w/o CPU us",
            "CPU +us",
            "revision B/cmd"
        );
        for fsync in [true, false] {
            for op in [Op::Create, Op::Update] {
                for concurrency in CONCURRENCY {
                    let (mut with, mut without) = (Vec::new(), Vec::new());
                    for rep in 0..COST_REPS {
                        // Alternate which goes first, so neither always follows the other.
                        let pair = |h: bool| {
                            rt.block_on(store_cell(
                                &root.join(format!("cost{rep}")),
                                op,
                                fsync,
                                concurrency,
                                h,
                            ))
                        };
                        if rep % 2 == 0 {
                            with.push(pair(true));
                            without.push(pair(false));
                        } else {
                            without.push(pair(false));
                            with.push(pair(true));
                        }
                    }
                    let rate = |rows: &[StoreRow]| {
                        common::median(rows.iter().map(StoreRow::ops_per_s).collect())
                    };
                    let cpu_us = |rows: &[StoreRow]| {
                        common::median(
                            rows.iter()
                                .map(|r| r.cpu * 1e6 / r.ops.max(1) as f64)
                                .collect(),
                        )
                    };
                    let (revs, rev_bytes) = with[0].history;
                    let per_cmd = rev_bytes as f64 / revs.max(1) as f64;
                    let (rw, ro) = (rate(&with), rate(&without));
                    let (cw, co) = (cpu_us(&with), cpu_us(&without));
                    println!(
                        "{:<7} {:>5} {:>5} {:>11.1} {:>11.1} {:>6.2} {:>11.0} {:>11.0} {:>8.0} {:>14.0}",
                        op.name(),
                        if fsync { "on" } else { "off" },
                        concurrency,
                        rw,
                        ro,
                        rw / ro,
                        cw,
                        co,
                        cw - co,
                        per_cmd,
                    );
                    cost_rows.push(json!({
                        "op": op.name(), "fsync": fsync, "concurrency": concurrency,
                        "with_ops_per_s": rw, "without_ops_per_s": ro,
                        "with_cpu_us_per_op": cw, "without_cpu_us_per_op": co,
                        "revision_bytes_per_command": per_cmd, "reps": COST_REPS,
                    }));
                }
            }
        }
    }
    let heavy = only("history").then(|| {
        let n = std::env::var("BENCH_REVISIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000u64);
        rt.block_on(patch_heavy(&root, n))
    });
    sync_disk();
    let total = started.elapsed().as_secs_f64();
    let load_after = loadavg();
    println!("\n# load average after: {load_after}");
    println!(
        "\n# total {total:.1}s; store dirs kept in {} (deleting them slows file creation on this \
         disk for a while: do it when no benchmark follows)",
        root.display()
    );

    let json = json!({
        "command": COMMAND,
        "cpus": cpus,
        "fs": fs_name,
        "root": root.display().to_string(),
        "total_secs": total,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "hashing": hash_rows.iter().map(|r| json!({
            "case": r.name.trim(), "bytes": r.bytes, "iters": r.iters, "secs": r.secs,
            "mb_per_s": r.mb_per_s(), "us_per_op": r.us_per_op(),
        })).collect::<Vec<_>>(),
        "store": store_rows.iter().map(|r| json!({
            "op": r.op.name(), "fsync": r.fsync, "concurrency": r.concurrency, "ops": r.ops,
            "secs": r.secs, "ops_per_s": r.ops_per_s(), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "conflicts": r.conflicts,
            "record_bytes_min": r.record_bytes.0, "record_bytes_max": r.record_bytes.1,
            "dir": r.dir.display().to_string(),
        })).collect::<Vec<_>>(),
        "history_cost": cost_rows,
        "patch_heavy": heavy,
    });
    println!("BENCH_JSON {json}");
}
