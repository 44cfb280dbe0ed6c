//! The `rmos-runs` CLI as an operator uses it: human and `--json` output, and exit codes that
//! tell not found (2), rejected (3) and unreachable (4) apart.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::worker::*;

fn cli(env: &Env, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(args)
        .env("NATS_URL", env.nats.url())
        .env_remove("RMOS_CONFIG")
        .env_remove("RMOS_SUBJECT_PREFIX")
        .env_remove("RMOS_INGEST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("cli output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip_and_exit_codes() {
    let env = Env::new().await;
    let _worker = env.worker("a").await;

    let create = r#"{"mode":"cam","tool_id":"T102","status":"OK","run_id":"run_00000000c11a",
                    "outputs":{"gcode_text":"G21\n"}}"#;
    let out = cli(&env, &["create", "--json"], Some(create));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: Value = serde_json::from_slice(&out.stdout).expect("json event");
    assert_eq!(ev["event"], "created");

    let out = cli(&env, &["get", "run_00000000c11a", "--json"], None);
    assert!(out.status.success());
    let a: Value = serde_json::from_slice(&out.stdout).expect("json artifact");
    assert_eq!(a["tool_id"], "T102");

    let out = cli(&env, &["verify", "run_00000000c11a", "--json"], None);
    let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["ok"], true);

    let patch = r#"{"run_id":"run_00000000c11a","meta_updates":{"operator":"ann"}}"#;
    let out = cli(&env, &["patch-meta"], Some(patch));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cli(&env, &["list", "--json", "--tool-id", "T102"], None);
    let page: Value = serde_json::from_slice(&out.stdout).expect("json page");
    assert_eq!(page["runs"].as_array().map(Vec::len), Some(1));

    let out = cli(&env, &["get", "run_000000000000"], None);
    assert_eq!(out.status.code(), Some(2), "not found");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let out = cli(&env, &["create"], Some(r#"{"mode":"cam"}"#));
    assert_eq!(out.status.code(), Some(3), "rejected");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_request"));

    let out = cli(
        &env,
        &["delete", "run_00000000c11a", "--reason", "test"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&env, &["get", "run_00000000c11a"], None);
    assert_eq!(out.status.code(), Some(2), "deleted run is not found");
}

#[test]
fn unreachable_broker_is_exit_4() {
    let port = support::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(["get", "run_000000000000"])
        .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
        .output()
        .expect("run cli");
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
}

#[test]
fn bad_configuration_is_one_line_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(["config"])
        .env("RMOS_INGEST", "kafka")
        .output()
        .expect("run cli");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("ingest") && err.contains("jetstream, core"),
        "{err}"
    );
}

/// `list --all` streams every page as JSON lines, `--oldest` reverses `--newest`, and
/// `reindex --check` / `reindex` find and repair drift between the index and the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_all_orders_and_reindex() {
    use rmos_runs::domain::command::{Command as Cmd, CommandKind, Context};
    use rmos_runs::store::{OpenOptions, RunStore, StoreUrl};
    let env = Env::new().await;
    let dir = env.runs_dir();
    let store = RunStore::open(&StoreUrl::Local(dir.clone()), &OpenOptions::default()).unwrap();
    for i in 0..30u32 {
        let body = serde_json::json!({"mode": "cam", "tool_id": format!("T{}", i % 3),
            "status": "OK", "run_id": format!("run_00000000{i:04x}")});
        let ctx = Context {
            now: format!("2026-05-01T00:00:{i:02}Z").parse().unwrap(),
            ..Context::now()
        };
        let cmd = Cmd::decode(CommandKind::Create, body.to_string().as_bytes(), None).unwrap();
        store.execute(&cmd, &ctx).await.unwrap();
    }
    store.mark_index_complete().await.unwrap();
    let _worker = env.worker("a").await;

    let out = cli(&env, &["list", "--all", "--limit", "7"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON summary per line"))
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|v| v["run_id"].as_str().unwrap())
        .collect();
    let newest: Vec<String> = (0..30u32)
        .rev()
        .map(|i| format!("run_00000000{i:04x}"))
        .collect();
    assert_eq!(ids, newest, "--all lists every run once, newest first");

    let out = cli(&env, &["list", "--oldest", "--json", "--limit", "30"], None);
    let page: Value = serde_json::from_slice(&out.stdout).expect("json page");
    let oldest: Vec<&str> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        oldest,
        newest.iter().rev().map(String::as_str).collect::<Vec<_>>()
    );

    let out = cli(&env, &["list", "--risk-level", "PURPLE"], None);
    assert_eq!(out.status.code(), Some(3), "a bad filter is rejected");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("risk"),
        "{out:?}"
    );

    let reindex = |args: &[&str]| on_store(&dir, args);
    let out = reindex(&["reindex", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("index consistent"));
    // Lose one run's time entry, as a crash or a hand edit could.
    let entry = walkdir(&dir.join("index/time"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains("run_000000000005"))
        .expect("entry of run 5");
    std::fs::remove_file(&entry).unwrap();
    let out = reindex(&["reindex", "--check", "--json"]);
    assert_eq!(out.status.code(), Some(1), "drift is exit 1");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["missing"], 1, "{r}");
    let out = reindex(&["reindex"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(entry.exists(), "reindex wrote the entry back");
    // The repair's journal folded and removed, not left behind: every file there is held
    // by the running worker.
    for e in std::fs::read_dir(dir.join("index/journal")).unwrap() {
        let path = e.unwrap().path();
        let Ok(f) = std::fs::File::open(&path) else {
            continue; // folded meanwhile
        };
        let held = matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock));
        // Free because the worker folded and removed it between our open and our lock?
        assert!(
            held || !path.exists(),
            "{} is held by no process",
            path.display()
        );
    }
    assert_eq!(reindex(&["reindex", "--check"]).status.code(), Some(0));
}

/// `rmos-runs reindex` repairs while a worker holds, unfolded in its journal, the add of an
/// entry no record backs: the repair's removal must outlive the worker's later fold of that
/// add (the repair journals it, and across journals a removal wins), not be undone by it.
#[tokio::test]
async fn a_repair_s_removal_outlives_a_live_writer_s_unfolded_add() {
    use rmos_runs::store::{OpenOptions, RunStore, StoreUrl};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keys = support::ghost_entry_keys("run_00000000beef", "T1");
    // A live worker's journal file: locked (here, by the test) while the repair runs.
    let live = support::plant_journal(dir, "00000000feedface-00000000.log", &keys);
    let journal_dir = live.parent().unwrap().to_path_buf();
    let held = std::fs::File::open(&live).unwrap();
    held.lock().unwrap();
    let out = on_store(dir, &["reindex", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["stale"], 3, "{r}");
    assert!(live.exists(), "the repair left the live file alone");
    let left: Vec<_> = std::fs::read_dir(&journal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        left.len(),
        2,
        "the live file, and the repair's with its carried removals: {left:?}"
    );
    // The worker folds its file (the repair's carried removals are folded with it).
    drop(held);
    let store =
        RunStore::open(&StoreUrl::Local(dir.to_path_buf()), &OpenOptions::default()).unwrap();
    store.fold_index_journal().await.unwrap();
    for k in &keys {
        assert!(
            !dir.join(k).exists(),
            "{k} came back with the worker's fold"
        );
    }
    let check = store.reindex(true).await.unwrap();
    assert!(check.consistent(), "{check:?}");
    assert_eq!(check.journaled, 0, "{check:?}");
}

/// The CLI run directly on the local store `dir` (maintenance commands), no broker.
fn on_store(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(args)
        .env("RMOS_RUNS_DIR", dir)
        .env_remove("RMOS_STORE_URL")
        .env_remove("RMOS_CONFIG")
        .output()
        .expect("run cli")
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `verify --all` sweeps the store: every failing run with its reason, legacy records apart,
/// exit 5; `--after` resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_all_sweeps_and_exits_non_zero() {
    use rmos_runs::domain::command::{Command as Cmd, CommandKind, Context};
    use rmos_runs::store::{OpenOptions, RunStore, StoreUrl};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("runs");
    let store = RunStore::open(&StoreUrl::Local(dir.clone()), &OpenOptions::default()).unwrap();
    for i in 1..=5u32 {
        let body = serde_json::json!({"mode": "cam", "tool_id": "T1", "status": "OK",
            "run_id": format!("run_00000000000{i}"), "outputs": {"gcode_text": format!("G1 X{i}\n")}});
        let cmd = Cmd::decode(CommandKind::Create, body.to_string().as_bytes(), None).unwrap();
        store.execute(&cmd, &Context::now()).await.unwrap();
    }
    store.mark_index_complete().await.unwrap();
    let sweep = |args: &[&str]| on_store(&dir, args);
    let out = sweep(&["verify", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5 runs checked, 0 failed"),
        "{out:?}"
    );

    // Run 3's G-code edited on disk: a mismatch; its hash chain holds (the record is intact).
    let path = dir.join("run_000000000003.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["outputs"]["gcode_text"] = "G1 X999\n".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let out = sweep(&["verify", "--all", "--json"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["checked"], 5);
    let failed = r["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["run_id"], "run_000000000003");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("content_changed"),
        "{r}"
    );
    // Resumed after run 3: runs 4 and 5 only, both fine.
    let out = sweep(&["verify", "--all", "--after", "run_000000000003", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["checked"], 2, "{r}");
}
