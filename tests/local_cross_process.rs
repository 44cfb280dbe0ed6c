//! The local backend's update-if-unchanged holds across OS **processes**, not just tasks.
//!
//! The parent tests re-execute this very test binary (`std::env::current_exe()`) with a libtest
//! filter selecting one `child_*` test and `RMOS_CHILD_*` variables. Run normally (no
//! `RMOS_CHILD_DIR`), the `child_*` tests return at once. Children wait on a start barrier (a
//! `go` file) so that they really write at the same time, not one after another.

use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command as Process, Output, Stdio};
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use rmos_runs::domain::command::{Command, CommandKind, Context};
use rmos_runs::domain::ids::{CommandId, RunId};
use rmos_runs::store::local::LocalStore;
use rmos_runs::store::{OpenOptions, RunStore, StoreUrl};
use serde_json::json;

const ENV_DIR: &str = "RMOS_CHILD_DIR";
const ENV_N: &str = "RMOS_CHILD_N";
const ENV_INDEX: &str = "RMOS_CHILD_INDEX";
const ENV_RUN: &str = "RMOS_CHILD_RUN";

const PROCESSES: usize = 4;
const INCREMENTS: u64 = 200;
const PATCHES: u64 = 50;

/// How long children may wait for the start signal, and the parent for the children.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(60);
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

fn counter_key() -> Path {
    Path::from("counter")
}

fn run_id() -> RunId {
    RunId::parse("run_00000000c0de").unwrap()
}

// ---------------------------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------------------------

/// What a child was asked to do, or `None` when this is not a child process.
struct ChildArgs {
    dir: PathBuf,
    n: u64,
    index: usize,
}

fn child_args() -> Option<ChildArgs> {
    let dir = std::env::var_os(ENV_DIR)?;
    let n = std::env::var(ENV_N)
        .expect("RMOS_CHILD_N")
        .parse()
        .expect("RMOS_CHILD_N is a number");
    let index = std::env::var(ENV_INDEX)
        .ok()
        .map(|s| s.parse().expect("RMOS_CHILD_INDEX is a number"))
        .unwrap_or(0);
    Some(ChildArgs {
        dir: PathBuf::from(dir),
        n,
        index,
    })
}

/// Announce readiness, then wait until the parent says go (all children are up).
fn start_barrier(dir: &FsPath) {
    let me = std::process::id();
    std::fs::write(dir.join(format!("ready-{me}")), b"").expect("write ready file");
    let deadline = Instant::now() + BARRIER_TIMEOUT;
    while !dir.join("go").exists() {
        assert!(
            Instant::now() < deadline,
            "child {me}: no start signal within {BARRIER_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// N read-modify-write increments of the `counter` object; prints `CHILD_RETRIES=<n>`.
#[tokio::test(flavor = "current_thread")]
async fn child_increment_worker() {
    let Some(args) = child_args() else { return };
    let store = LocalStore::new(args.dir.join("store"), true).expect("open local store");
    start_barrier(&args.dir);
    let key = counter_key();
    let mut retries = 0u64;
    for _ in 0..args.n {
        loop {
            let got = store.get(&key).await.expect("get counter");
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got.bytes().await.expect("read counter");
            let value: u64 = std::str::from_utf8(&bytes)
                .expect("counter is UTF-8")
                .trim()
                .parse()
                .expect("counter is an integer");
            let next = PutPayload::from((value + 1).to_string());
            match store
                .put_opts(&key, next, PutOptions::from(PutMode::Update(version)))
                .await
            {
                Ok(_) => break,
                Err(object_store::Error::Precondition { .. }) => retries += 1,
                Err(e) => panic!("unexpected error updating the counter: {e}"),
            }
        }
    }
    // Own line: libtest prints "test NAME ... " without a newline before the output.
    println!("\nCHILD_RETRIES={retries}");
}

/// N PatchMeta commands on one run through `RunStore::execute`, each with its own meta key
/// and command id; prints `CHILD_RETRIES=<lost races>`.
#[tokio::test(flavor = "current_thread")]
async fn child_patch_worker() {
    let Some(args) = child_args() else { return };
    let run = RunId::parse(&std::env::var(ENV_RUN).expect("RMOS_CHILD_RUN")).unwrap();
    let store = RunStore::open(
        &StoreUrl::Local(args.dir.join("store")),
        &OpenOptions::default(),
    )
    .expect("open run store");
    start_barrier(&args.dir);
    let mut conflicts = 0u64;
    for i in 0..args.n {
        let body = json!({"run_id": run.as_str(), "meta_updates": {key(args.index, i): i}});
        let cmd = Command::decode(CommandKind::PatchMeta, body.to_string().as_bytes(), None)
            .expect("valid patch");
        let ctx = Context {
            command_id: Some(CommandId::parse(&format!("p{}-{i}", args.index)).unwrap()),
            ..Context::now()
        };
        let out = store.execute(&cmd, &ctx).await.expect("patch applies");
        assert!(
            out.changed,
            "patch {i} of child {} reported as a redelivery",
            args.index
        );
        conflicts += u64::from(out.conflicts);
    }
    println!("\nCHILD_RETRIES={conflicts}");
}

fn key(child: usize, i: u64) -> String {
    format!("k{child}_{i:03}")
}

// ---------------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------------

/// Kills (and reaps) children still running when the parent fails.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Spawns `PROCESSES` copies of this test binary running only `test_name`, releases them
/// together, waits for all, checks each passed and returns the sum of their reported retries.
fn run_children(test_name: &str, dir: &FsPath, n: u64, extra_env: &[(&str, String)]) -> u64 {
    let exe = std::env::current_exe().expect("current_exe");
    let mut children = Children(Vec::new());
    for index in 0..PROCESSES {
        let mut cmd = Process::new(&exe);
        cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV_DIR, dir)
            .env(ENV_N, n.to_string())
            .env(ENV_INDEX, index.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        children
            .0
            .push(cmd.spawn().expect("spawn child test process"));
    }

    // Start barrier: every child has opened its store and is waiting.
    let deadline = Instant::now() + BARRIER_TIMEOUT;
    loop {
        let ready = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("ready-"))
            .count();
        if ready == PROCESSES {
            break;
        }
        for c in &mut children.0 {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("a child exited before the start signal: {status}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {ready}/{PROCESSES} children ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(dir.join("go"), b"").unwrap();

    // Wait for all, with a deadline (std has no wait_timeout).
    let deadline = Instant::now() + CHILD_TIMEOUT;
    while children
        .0
        .iter_mut()
        .any(|c| c.try_wait().unwrap().is_none())
    {
        assert!(
            Instant::now() < deadline,
            "children still running after {CHILD_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut total = 0u64;
    for (index, child) in std::mem::take(&mut children.0).into_iter().enumerate() {
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&stdout);
        let stderr = String::from_utf8_lossy(&stderr);
        assert!(
            status.success(),
            "child {index} failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        // Guard against a filter that selected nothing (exit 0, "0 passed").
        assert!(
            stdout.contains("1 passed"),
            "child {index} did not run {test_name}:\n{stdout}"
        );
        let retries: u64 = stdout
            .lines()
            .find_map(|l| l.split_once("CHILD_RETRIES=").map(|(_, n)| n.trim()))
            .unwrap_or_else(|| panic!("child {index} printed no CHILD_RETRIES:\n{stdout}"))
            .parse()
            .unwrap();
        println!("child {index}: {retries} lost races");
        total += retries;
    }
    total
}

#[tokio::test(flavor = "current_thread")]
async fn four_processes_increment_one_key_without_losing_an_update() {
    if child_args().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().join("store"), true).unwrap();
    store
        .put_opts(
            &counter_key(),
            PutPayload::from_static(b"0"),
            PutOptions::from(PutMode::Create),
        )
        .await
        .unwrap();

    let started = Instant::now();
    let path = dir.path().to_path_buf();
    let retries = tokio::task::spawn_blocking(move || {
        run_children("child_increment_worker", &path, INCREMENTS, &[])
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();

    let bytes = store
        .get(&counter_key())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let value: u64 = std::str::from_utf8(&bytes).unwrap().parse().unwrap();
    println!(
        "{PROCESSES} processes x {INCREMENTS} increments: final {value}, {retries} lost races \
         (retried), {elapsed:.2?}"
    );
    assert_eq!(
        value,
        PROCESSES as u64 * INCREMENTS,
        "lost updates across processes"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn four_processes_patch_one_run_without_losing_a_patch() {
    if child_args().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = RunStore::open(
        &StoreUrl::Local(dir.path().join("store")),
        &OpenOptions::default(),
    )
    .unwrap();
    let id = run_id();
    let create = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id.as_str(),
                        "outputs": {"gcode_text": "G21\nG90\n"}});
    let create = Command::decode(CommandKind::Create, create.to_string().as_bytes(), None).unwrap();
    assert_eq!(
        store
            .execute(&create, &Context::now())
            .await
            .unwrap()
            .revision,
        1
    );

    let started = Instant::now();
    let path = dir.path().to_path_buf();
    let run = id.as_str().to_owned();
    let conflicts = tokio::task::spawn_blocking(move || {
        run_children("child_patch_worker", &path, PATCHES, &[(ENV_RUN, run)])
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();

    let a = store.get(&id).await.unwrap();
    let total = PROCESSES as u64 * PATCHES;
    println!(
        "{PROCESSES} processes x {PATCHES} patches: revision {}, {conflicts} lost races \
         (retried), {elapsed:.2?}",
        a.revision
    );
    assert_eq!(a.revision, 1 + total, "lost patches across processes");
    for child in 0..PROCESSES {
        for i in 0..PATCHES {
            assert_eq!(
                a.meta.get(&key(child, i)),
                Some(&json!(i)),
                "patch {i} of child {child} missing"
            );
        }
    }
    // `create` adds `request_id`; every other key is one of ours.
    let patched = a.meta.keys().filter(|k| k.starts_with('k')).count();
    assert_eq!(patched as u64, total);
    assert!(store.verify(&id).await.unwrap().ok);
}
