//! Maintenance without the broker: retention (gc), backup / restore between stores (local and
//! S3), and the import of a seed data directory. The last tests drive the binary.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use rmos_runs::domain::artifact::{Sha256Hex, StoredRecord};
use rmos_runs::domain::command::create::OutputsPayload;
use rmos_runs::domain::command::{Command, CommandKind, Context, Limits};
use rmos_runs::domain::hashing::{sha256_json, sha256_text};
use rmos_runs::domain::ids::RunId;
use rmos_runs::store::maintenance::{
    self, GcOptions, ImportOutcome, ObjectKind, ProblemKind, RetentionSchedule, TransferOptions,
};
use rmos_runs::store::{OpenOptions, RunStore, StoreError, StoreUrl};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn local(dir: &Path) -> RunStore {
    RunStore::open(&StoreUrl::Local(dir.to_path_buf()), &OpenOptions::default()).unwrap()
}

async fn s3_store() -> RunStore {
    let server = support::S3Server::shared();
    let bucket = support::unique_bucket();
    server.create_bucket(&bucket).await;
    let opts = support::s3_options(&server.endpoint());
    let url = StoreUrl::S3 {
        bucket,
        prefix: "runs".to_owned(),
    };
    RunStore::open(&url, &opts).unwrap()
}

fn run_id(n: u32) -> RunId {
    RunId::parse(&format!("run_{n:012x}")).unwrap()
}

/// A context whose blob threshold is tiny, so every G-code body becomes a blob.
fn blob_ctx() -> Context {
    Context {
        limits: Limits {
            blob_threshold: 8,
            ..Limits::default()
        },
        ..Context::now()
    }
}

async fn create(store: &RunStore, id: &RunId, created: Option<&str>, gcode: &str) {
    let mut body = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id.as_str(),
        "feasibility": {"ok": true}, "outputs": {"gcode_text": gcode}});
    if let Some(c) = created {
        body["created_at_utc"] = json!(c);
    }
    let cmd = Command::decode(CommandKind::Create, body.to_string().as_bytes(), None).unwrap();
    let out = store.execute(&cmd, &blob_ctx()).await.unwrap();
    assert!(out.changed);
}

async fn patch(store: &RunStore, id: &RunId, meta: Value) {
    let body = json!({"run_id": id.as_str(), "meta_updates": meta});
    let cmd = Command::decode(CommandKind::PatchMeta, body.to_string().as_bytes(), None).unwrap();
    store.execute(&cmd, &Context::now()).await.unwrap();
}

fn gcode_sha(store_gcode: &str) -> Sha256Hex {
    Sha256Hex::parse(&sha256_text(store_gcode)).unwrap()
}

const OLD: Option<&str> = Some("2020-01-01T00:00:00Z");

/// Every file of a local store except lock files and probe objects: relative path -> bytes.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            // The blob reference flag is each store's own: a copy is marked by its first
            // reindex, not by the transfer. So are the lock files and the empty file that empty
            // objects are hard links to.
            if rel.starts_with(".locks")
                || rel.starts_with(".links")
                || rel.starts_with("_probe")
                || rel == "blobrefs/_complete"
            {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A source store with: two live runs with blobs (one patched), one tombstone, one dead letter.
async fn populated(dir: &Path) -> RunStore {
    let store = local(dir);
    create(&store, &run_id(1), OLD, "G21 run one").await;
    create(&store, &run_id(2), None, "G21 run two").await;
    patch(&store, &run_id(2), json!({"operator": "ann"})).await;
    create(&store, &run_id(3), None, "G21 run three").await;
    let del = Command::decode(
        CommandKind::Delete,
        br#"{"run_id":"run_000000000003","reason":"operator"}"#,
        None,
    )
    .unwrap();
    store.execute(&del, &Context::now()).await.unwrap();
    store
        .put_dead_letter(
            &rmos_runs::domain::artifact::Timestamp::now(),
            "dl_1",
            br#"{"reason":"bad json","payload":"{"}"#.to_vec(),
        )
        .await
        .unwrap();
    store
}

/// Objects in `populated`: 2 blobs, 2 markers, 5 revisions (1 + 2 + 2), 3 records, 1 dead
/// letter. (The destination indexes what it receives: index entries are not copied.)
const POPULATED_OBJECTS: usize = 13;

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn gc_dry_run_changes_nothing_and_real_run_deletes_through_the_delete_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    create(&store, &run_id(1), OLD, "G21 a").await;
    create(&store, &run_id(2), Some("2021-06-01T00:00:00Z"), "G21 b").await;
    create(&store, &run_id(3), None, "G21 c").await;
    // A corrupt record is reported, never deleted.
    std::fs::write(dir.path().join("run_00000000000f.json"), b"{ not json").unwrap();
    let before = tree(dir.path());

    let opts = GcOptions::older_than(Duration::from_secs(30 * 86_400), true);
    let r = maintenance::gc(&store, &opts, None).await.unwrap();
    assert_eq!(r.examined, 4);
    assert_eq!(r.would_delete, vec![run_id(1), run_id(2)]);
    assert!(r.deleted.is_empty());
    assert_eq!(r.errors.len(), 1, "{r}");
    assert_eq!(r.errors[0].key, "run_00000000000f.json");
    assert!(r.errors[0].reason.contains("corrupt"), "{r}");
    assert_eq!(tree(dir.path()), before, "a dry run changes nothing");

    let opts = GcOptions::older_than(Duration::from_secs(30 * 86_400), false);
    let r = maintenance::gc(&store, &opts, None).await.unwrap();
    assert_eq!(r.deleted, vec![run_id(1), run_id(2)], "{r}");
    assert!(!r.ok());
    for id in [run_id(1), run_id(2)] {
        assert!(matches!(store.get(&id).await, Err(StoreError::NotFound(_))));
        match store.load(&id).await.unwrap().unwrap().value {
            StoredRecord::Deleted(t) => {
                assert_eq!(t.reason, "retention");
                assert_eq!(t.revision, 2);
            }
            other => panic!("expected a tombstone, got {other:?}"),
        }
    }
    assert!(store.get(&run_id(3)).await.is_ok());
    assert!(dir.path().join("run_00000000000f.json").exists());

    // Again: nothing left to do, the tombstones are counted.
    let r = maintenance::gc(&store, &opts, None).await.unwrap();
    assert!(r.deleted.is_empty());
    assert_eq!(r.tombstones, 2);
}

#[tokio::test]
async fn gc_takes_its_candidates_from_a_complete_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    create(&store, &run_id(1), OLD, "G21 a").await;
    create(&store, &run_id(2), Some("2021-06-01T00:00:00Z"), "G21 b").await;
    create(&store, &run_id(3), None, "G21 c").await;
    store.reindex(false).await.unwrap();
    assert!(store.index_complete().await.unwrap());
    // A record the index does not know: not the index pass's to find.
    std::fs::write(dir.path().join("run_00000000000f.json"), b"{ not json").unwrap();

    let opts = GcOptions::older_than(Duration::from_secs(30 * 86_400), false);
    let r = maintenance::gc(&store, &opts, None).await.unwrap();
    assert!(r.from_index, "{r}");
    assert_eq!(
        r.examined, 2,
        "only the expired runs' records are read: {r}"
    );
    assert_eq!(r.deleted, vec![run_id(1), run_id(2)], "{r}");
    assert!(r.ok(), "{r}");
    assert!(r.to_string().contains("from the index"), "{r}");
    assert!(store.get(&run_id(3)).await.is_ok());

    // Again: the deleted runs left the index, nothing is read.
    let r = maintenance::gc(&store, &opts, None).await.unwrap();
    assert_eq!((r.examined, r.deleted.len()), (0, 0), "{r}");

    // A full scan reads every record: it counts the tombstones and reports the corrupt one.
    let full = GcOptions {
        full_scan: true,
        ..opts
    };
    let r = maintenance::gc(&store, &full, None).await.unwrap();
    assert!(!r.from_index, "{r}");
    assert_eq!((r.examined, r.tombstones), (4, 2), "{r}");
    assert_eq!(r.errors.len(), 1, "{r}");
    assert_eq!(r.errors[0].key, "run_00000000000f.json");
    assert!(dir.path().join("run_00000000000f.json").exists());
}

#[tokio::test]
async fn gc_releases_blobs_only_the_expired_runs_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    create(&store, &run_id(1), OLD, "G21 only old").await;
    create(&store, &run_id(2), OLD, "G21 shared").await;
    create(&store, &run_id(3), None, "G21 shared").await;
    let only_old = gcode_sha("G21 only old");
    let shared = gcode_sha("G21 shared");
    assert!(store.blob_exists(&only_old).await.unwrap());

    let r = maintenance::gc(
        &store,
        &GcOptions::older_than(Duration::from_secs(86_400), false),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.deleted, vec![run_id(1), run_id(2)], "{r}");
    assert!(!store.blob_exists(&only_old).await.unwrap(), "released");
    assert!(
        store.blob_exists(&shared).await.unwrap(),
        "still referenced"
    );
    assert!(store.verify(&run_id(3)).await.unwrap().ok);
    assert!(
        !dir.path()
            .join(format!("blobrefs/{shared}/{}", run_id(2)))
            .exists()
    );
}

#[tokio::test]
async fn retention_loop_deletes_then_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    create(&store, &run_id(1), OLD, "G21 a").await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let schedule = RetentionSchedule {
        max_age: Duration::from_secs(86_400),
        first_after: Duration::from_millis(10),
        every: Duration::from_secs(3600),
    };
    let task = tokio::spawn(maintenance::retention_loop(
        store.clone(),
        schedule,
        stop_rx,
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.get(&run_id(1)).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the loop stops promptly")
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Backup / restore
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn backup_file_to_file_is_complete_then_incremental() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = populated(a.path()).await;
    let dst = local(b.path());

    let r = maintenance::transfer(&src, &dst, &TransferOptions::default())
        .await
        .unwrap();
    assert!(r.ok(), "{r}");
    assert_eq!(r.total.copied, POPULATED_OBJECTS, "{r}");
    assert_eq!(r.by_kind[&ObjectKind::Blob].copied, 2);
    assert_eq!(r.by_kind[&ObjectKind::BlobRef].copied, 2);
    assert_eq!(r.by_kind[&ObjectKind::History].copied, 5);
    assert_eq!(r.by_kind[&ObjectKind::Record].copied, 3);
    assert_eq!(r.by_kind[&ObjectKind::DeadLetter].copied, 1);
    assert!(r.problems.is_empty(), "{r}");
    assert_eq!(tree(a.path()), tree(b.path()));
    assert!(dst.verify(&run_id(2)).await.unwrap().ok);

    let again = maintenance::transfer(&src, &dst, &TransferOptions::default())
        .await
        .unwrap();
    assert!(again.ok(), "{again}");
    assert_eq!(again.total.copied, 0);
    assert_eq!(again.total.skipped, POPULATED_OBJECTS);

    // A change at the source (a newer revision) moves the destination forward.
    patch(&src, &run_id(1), json!({"checked": true})).await;
    let r = maintenance::transfer(&src, &dst, &TransferOptions::default())
        .await
        .unwrap();
    assert!(r.ok(), "{r}");
    assert_eq!(r.total.updated, 1, "{r}");
    assert_eq!(dst.get(&run_id(1)).await.unwrap().revision, 2);
}

#[tokio::test]
async fn a_different_destination_object_is_a_conflict_unless_overwrite() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = populated(a.path()).await;
    let dst = local(b.path());
    maintenance::transfer(&src, &dst, &TransferOptions::default())
        .await
        .unwrap();
    // The destination moves ahead of the source.
    patch(&dst, &run_id(2), json!({"operator": "bob"})).await;
    let moved = tree(b.path());

    let r = maintenance::transfer(&src, &dst, &TransferOptions::default())
        .await
        .unwrap();
    assert!(!r.ok());
    assert_eq!(r.total.conflicts, 1, "{r}");
    assert_eq!(r.problems[0].key, "run_000000000002.json");
    assert_eq!(r.problems[0].kind, ProblemKind::Conflict);
    assert!(
        r.problems[0]
            .reason
            .contains("revision 3 (source revision 2)"),
        "{r}"
    );
    assert_eq!(tree(b.path()), moved, "nothing overwritten");

    let r = maintenance::transfer(&src, &dst, &TransferOptions { overwrite: true })
        .await
        .unwrap();
    assert!(r.ok(), "{r}");
    assert_eq!(r.total.overwritten, 1);
    assert_eq!(dst.get(&run_id(2)).await.unwrap().revision, 2);
}

#[tokio::test]
async fn a_corrupt_source_blob_is_reported_and_not_copied() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = populated(a.path()).await;
    let sha = gcode_sha("G21 run one");
    let blob = a.path().join(format!("blobs/{sha}"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();

    let dst = local(b.path());
    let r = maintenance::transfer(&src, &dst, &TransferOptions::default())
        .await
        .unwrap();
    assert!(!r.ok());
    assert_eq!(r.total.failed, 2, "the blob and the run that needs it: {r}");
    let failed: Vec<&str> = r
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::Failed)
        .map(|p| p.key.as_str())
        .collect();
    assert_eq!(
        failed,
        vec![format!("blobs/{sha}").as_str(), "run_000000000001.json"]
    );
    assert!(r.problems.iter().any(|p| p.reason.contains("hashes to")));
    assert!(!b.path().join(format!("blobs/{sha}")).exists());
    assert!(!b.path().join("run_000000000001.json").exists());
    assert_eq!(r.total.copied, POPULATED_OBJECTS - 2);
    assert!(dst.verify(&run_id(2)).await.unwrap().ok);
}

#[tokio::test]
async fn an_interrupted_backup_resumes_where_it_stopped() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let src = populated(a.path()).await;
    // The full copy, to know what a finished backup looks like.
    maintenance::transfer(&src, &local(b.path()), &TransferOptions::default())
        .await
        .unwrap();
    // "Interrupted": only the first half of the objects, in copy order (blobs, markers...).
    let full = tree(b.path());
    let mut order: Vec<&String> = full.keys().collect();
    order.sort_by_key(|k| {
        (
            !k.starts_with("blobs/"),
            !k.starts_with("blobrefs/"),
            k.starts_with("dead_letters/"),
        )
    });
    let half = &order[..POPULATED_OBJECTS / 2];
    for k in half {
        let p = c.path().join(k);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &full[*k]).unwrap();
    }
    let r = maintenance::transfer(&src, &local(c.path()), &TransferOptions::default())
        .await
        .unwrap();
    assert!(r.ok(), "{r}");
    assert_eq!(r.total.skipped, half.len());
    assert_eq!(r.total.copied, POPULATED_OBJECTS - half.len());
    assert_eq!(tree(c.path()), full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_s3_and_restore_to_file_round_trips() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = populated(a.path()).await;
    let s3 = s3_store().await;

    let r = maintenance::transfer(&src, &s3, &TransferOptions::default())
        .await
        .unwrap();
    assert!(r.ok(), "{r}");
    assert_eq!(r.total.copied, POPULATED_OBJECTS, "{r}");
    assert!(s3.verify(&run_id(1)).await.unwrap().ok);
    assert!(matches!(
        s3.load(&run_id(3)).await.unwrap().unwrap().value,
        StoredRecord::Deleted(_)
    ));

    let again = maintenance::transfer(&src, &s3, &TransferOptions::default())
        .await
        .unwrap();
    assert_eq!(again.total.skipped, POPULATED_OBJECTS, "{again}");

    let restored = local(b.path());
    let r = maintenance::transfer(&s3, &restored, &TransferOptions::default())
        .await
        .unwrap();
    assert!(r.ok(), "{r}");
    assert_eq!(r.total.copied, POPULATED_OBJECTS, "{r}");
    assert_eq!(
        tree(a.path()),
        tree(b.path()),
        "file -> s3 -> file is exact"
    );
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// A seed-format artifact (no schema_version, revision, updated_at_utc).
fn seed_artifact(run: &str, hashes: Value) -> Value {
    json!({
        "run_id": run, "created_at_utc": "2025-01-02T03:04:05.678901",
        "mode": "cam", "tool_id": "T102", "status": "OK",
        "request_summary": {"a": 1}, "feasibility": {"x": 1.5},
        "decision": {"risk_level": "GREEN", "score": 87.5, "block_reason": null, "warnings": [], "details": {}},
        "hashes": hashes,
        "outputs": {"gcode_text": "G21", "opplan_json": null, "gcode_path": null, "opplan_path": null, "preview_svg_path": null},
        "advisory_inputs": [], "explanation_status": "NONE", "explanation_summary": null, "meta": {}
    })
}

fn good_hashes() -> Value {
    let outputs = OutputsPayload {
        gcode_text: Some("G21".into()),
        ..OutputsPayload::default()
    };
    json!({"feasibility_sha256": sha256_json(&json!({"x": 1.5})),
           "toolpaths_sha256": outputs.toolpaths_sha256().unwrap().to_string(),
           "gcode_sha256": sha256_text("G21"), "opplan_sha256": null})
}

fn seed_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let w = |name: &str, v: &[u8]| std::fs::write(d.path().join(name), v).unwrap();
    let pretty = |v: Value| serde_json::to_vec_pretty(&v).unwrap();
    w(
        "run_00000000000a.json",
        &pretty(seed_artifact("run_00000000000a", good_hashes())),
    );
    w(
        "run_00000000000b.json",
        &pretty(seed_artifact(
            "run_00000000000b",
            json!({"feasibility_sha256": null, "toolpaths_sha256": null, "gcode_sha256": null, "opplan_sha256": null}),
        )),
    );
    let mut tampered = good_hashes();
    tampered["gcode_sha256"] = json!("0".repeat(64));
    w(
        "run_00000000000c.json",
        &pretty(seed_artifact("run_00000000000c", tampered)),
    );
    w(
        "run_0000000000d1.json",
        b"{\"run_id\": \"run_0000000000d1\",",
    );
    w(
        "notes.json",
        &pretty(seed_artifact("run_00000000000e", good_hashes())),
    );
    w(
        "run_0000000000f0.json",
        &pretty(seed_artifact("run_0000000000f1", good_hashes())),
    );
    w(
        "run_0000000000e0.json",
        br#"{"run_id": "run_0000000000e0", "mode": "cam"}"#,
    );
    w("README.txt", b"seed data");
    d
}

#[tokio::test]
async fn import_reports_every_file_with_its_reason() {
    let seed = seed_dir();
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    let r = maintenance::import_dir(&store, seed.path()).await.unwrap();
    let by_file: BTreeMap<&str, _> = r.files.iter().map(|e| (e.file.as_str(), e)).collect();
    let outcome = |f: &str| by_file[f].outcome;
    let reason = |f: &str| by_file[f].reason.clone().unwrap_or_default();

    assert_eq!(outcome("run_00000000000a.json"), ImportOutcome::Imported);
    assert_eq!(
        by_file["run_00000000000a.json"].verify.as_deref(),
        Some("ok")
    );
    assert_eq!(outcome("run_00000000000b.json"), ImportOutcome::Imported);
    assert_eq!(
        by_file["run_00000000000b.json"].verify.as_deref(),
        Some("unverified")
    );
    assert_eq!(outcome("run_00000000000c.json"), ImportOutcome::Imported);
    assert_eq!(
        by_file["run_00000000000c.json"].verify.as_deref(),
        Some("mismatch")
    );
    assert_eq!(outcome("run_0000000000d1.json"), ImportOutcome::Rejected);
    assert!(
        reason("run_0000000000d1.json").starts_with("corrupt JSON"),
        "{r}"
    );
    assert_eq!(outcome("notes.json"), ImportOutcome::Rejected);
    assert!(reason("notes.json").starts_with("bad file name"), "{r}");
    assert_eq!(outcome("run_0000000000f0.json"), ImportOutcome::Rejected);
    assert!(
        reason("run_0000000000f0.json").contains("run_id mismatch"),
        "{r}"
    );
    assert_eq!(outcome("run_0000000000e0.json"), ImportOutcome::Rejected);
    assert!(
        reason("run_0000000000e0.json").starts_with("does not decode"),
        "{r}"
    );
    assert_eq!(outcome("README.txt"), ImportOutcome::Ignored);
    assert_eq!(
        (r.imported, r.rejected, r.ignored, r.not_verified),
        (3, 4, 1, 2)
    );
    assert!(!r.ok());

    // Written as they were (the historical record), and readable through the store.
    assert_eq!(
        std::fs::read(dir.path().join("run_00000000000b.json")).unwrap(),
        std::fs::read(seed.path().join("run_00000000000b.json")).unwrap()
    );
    let a = store
        .get(&RunId::parse("run_00000000000a").unwrap())
        .await
        .unwrap();
    assert_eq!((a.schema_version, a.revision), (0, 1));
    assert!(
        store
            .verify(&RunId::parse("run_00000000000a").unwrap())
            .await
            .unwrap()
            .ok
    );

    // Again: identical files are skipped; a file that now differs is a conflict.
    std::fs::write(
        seed.path().join("run_00000000000b.json"),
        serde_json::to_vec(&seed_artifact("run_00000000000b", good_hashes())).unwrap(),
    )
    .unwrap();
    let r = maintenance::import_dir(&store, seed.path()).await.unwrap();
    assert_eq!((r.imported, r.skipped, r.conflicts), (0, 2, 1), "{r}");
    let b = r
        .files
        .iter()
        .find(|e| e.file == "run_00000000000b.json")
        .unwrap();
    assert_eq!(b.outcome, ImportOutcome::Conflict);
    assert!(b.reason.as_deref().unwrap().contains("different record"));
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

fn bin(store: &Path, args: &[&str]) -> std::process::Output {
    Process::new(env!("CARGO_BIN_EXE_rmos-runs"))
        .args(args)
        .env("RMOS_STORE_URL", format!("file://{}", store.display()))
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env_remove("RMOS_CONFIG")
        .env_remove("RMOS_RUNS_DIR")
        .output()
        .expect("run rmos-runs")
}

#[tokio::test]
async fn cli_gc_dry_run_json_and_import_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    create(&store, &run_id(1), OLD, "G21 a").await;
    create(&store, &run_id(2), None, "G21 b").await;

    let out = bin(
        dir.path(),
        &["gc", "--older-than", "30d", "--dry-run", "--json"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["from_index"], false, "this store's index was never built");
    assert_eq!(r["examined"], 2);
    assert_eq!(r["would_delete"], json!([run_id(1).as_str()]));
    assert!(
        store.get(&run_id(1)).await.is_ok(),
        "dry run deletes nothing"
    );
    // Once the index is complete, a pass reads only the expired runs, unless told to scan.
    store.reindex(false).await.unwrap();
    for (flags, from_index, examined) in [(&[][..], true, 1), (&["--full-scan"][..], false, 2)] {
        let mut args = vec!["gc", "--older-than", "30d", "--dry-run", "--json"];
        args.extend(flags);
        let out = bin(dir.path(), &args);
        assert_eq!(out.status.code(), Some(0));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (&r["from_index"], &r["examined"]),
            (&json!(from_index), &json!(examined)),
            "{flags:?}"
        );
        assert_eq!(r["would_delete"], json!([run_id(1).as_str()]));
    }

    let out = bin(dir.path(), &["gc", "--older-than", "90", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1h minimum"));

    let out = bin(dir.path(), &["gc", "--older-than", "30d"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted run_000000000001"));
    assert!(store.get(&run_id(1)).await.is_err());

    let seed = seed_dir();
    let into = tempfile::tempdir().unwrap();
    let seed_path = seed.path().to_string_lossy().into_owned();
    let out = bin(into.path(), &["import", "--from-dir", &seed_path, "--json"]);
    assert_eq!(out.status.code(), Some(1), "rejected files fail the import");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["imported"], 3);
    assert_eq!(r["rejected"], 4);

    let clean = tempfile::tempdir().unwrap();
    std::fs::copy(
        seed.path().join("run_00000000000a.json"),
        clean.path().join("run_00000000000a.json"),
    )
    .unwrap();
    let clean_path = clean.path().to_string_lossy().into_owned();
    let out = bin(into.path(), &["import", "--from-dir", &clean_path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped 1"));
}

#[test]
fn cli_backup_and_restore_between_directories() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(populated(a.path()));
    let to = format!("file://{}", b.path().display());
    let out = bin(a.path(), &["backup", "--to", &to, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["total"]["copied"], POPULATED_OBJECTS);
    let out = bin(c.path(), &["restore", "--from", &to]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(tree(a.path()), tree(c.path()));
}

#[test]
fn retention_config_is_off_by_default_and_refuses_tiny_values() {
    let dir = tempfile::tempdir().unwrap();
    let config = |text: &str| {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let p = p.to_string_lossy().into_owned();
        bin(dir.path(), &["--config", &p, "config", "--json"])
    };
    let out = config("");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["retention_s"], Value::Null, "off by default");

    let out = config("retention = \"90d\"\n");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["retention_s"], 90 * 86_400);

    let out = config("retention = \"90\"\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("retention") && err.contains("1h minimum"),
        "{err}"
    );

    // `gc` without --older-than uses the configured retention.
    let out = bin(dir.path(), &["gc", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"));
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "retention = \"30d\"\n").unwrap();
    let p = p.to_string_lossy().into_owned();
    let out = bin(dir.path(), &["--config", &p, "gc", "--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["examined"], 0);
}
