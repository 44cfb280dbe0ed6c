//! One conformance suite for `RunStore`, run against every backend: in-memory, the local
//! filesystem, and a real S3-compatible server (moto, served single-threaded; see README).

mod support;

use std::sync::Arc;

use object_store::{ObjectStoreExt, PutPayload};
use rmos_runs::domain::artifact::StoredRecord;
use rmos_runs::domain::command::{Command, CommandKind, Context, Limits};
use rmos_runs::domain::error::RejectCode;
use rmos_runs::domain::ids::{CommandId, RunId};
use rmos_runs::domain::verify::CheckStatus;
use rmos_runs::store::RunSummary;
use rmos_runs::store::{ListQuery, OpenOptions, Order, Outcome, RunStore, StoreError, StoreUrl};
use serde_json::{Value, json};

/// Keeps whatever backs a store (temp dir, S3 server) alive for the test's duration.
#[allow(dead_code)]
enum Guard {
    None,
    Dir(tempfile::TempDir),
    S3(support::S3Server),
    /// A local store journaling its index, folded in the background as `serve` does (but
    /// every 5 ms, so that folds land in the middle of everything the cases do).
    Journal(tempfile::TempDir, tokio::task::JoinHandle<()>),
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Guard::Journal(_, folder) = self {
            folder.abort();
        }
    }
}

/// Folds the journal (of the journaling backend; nothing elsewhere) before a case edits the
/// index trees behind the store's back.
async fn settle(store: &RunStore) {
    store.fold_index_journal().await.unwrap();
}

async fn open(kind: &str) -> (RunStore, Guard) {
    match kind {
        "memory" => (
            RunStore::open(&StoreUrl::Memory, &OpenOptions::default()).unwrap(),
            Guard::None,
        ),
        "local" => {
            let dir = tempfile::tempdir().unwrap();
            let url = StoreUrl::Local(dir.path().to_path_buf());
            (
                RunStore::open(&url, &OpenOptions::default()).unwrap(),
                Guard::Dir(dir),
            )
        }
        "journal" => {
            let dir = tempfile::tempdir().unwrap();
            let url = StoreUrl::Local(dir.path().to_path_buf());
            let store = RunStore::open(&url, &OpenOptions::default())
                .unwrap()
                .with_index_journal()
                .unwrap();
            let folder = tokio::spawn({
                let store = store.clone();
                async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        store.fold_index_journal().await.unwrap();
                    }
                }
            });
            (store, Guard::Journal(dir, folder))
        }
        "s3" => {
            let server = support::S3Server::start().await;
            let bucket = support::unique_bucket();
            server.create_bucket(&bucket).await;
            let opts = support::s3_options(&server.endpoint());
            let url = StoreUrl::S3 {
                bucket,
                prefix: "runs".to_owned(),
            };
            (RunStore::open(&url, &opts).unwrap(), Guard::S3(server))
        }
        other => panic!("unknown backend {other}"),
    }
}

fn ctx() -> Context {
    Context::now()
}

fn ctx_with_id(id: &str) -> Context {
    Context {
        command_id: Some(CommandId::parse(id).unwrap()),
        ..Context::now()
    }
}

fn cmd(kind: CommandKind, body: Value) -> Command {
    Command::decode(kind, body.to_string().as_bytes(), None).unwrap()
}

fn create_body(run: &str, tool: &str) -> Value {
    json!({"mode": "cam", "tool_id": tool, "status": "OK", "run_id": run,
           "feasibility": {"ok": true}, "decision": {"risk_level": "GREEN", "score": 87.5},
           "outputs": {"gcode_text": "G21\nG90\n"}})
}

/// Creates run `id` (with `create_body`) and returns the outcome.
async fn create(store: &RunStore, id: &RunId, tool: &str) -> Outcome {
    store
        .execute(
            &cmd(CommandKind::Create, create_body(id.as_str(), tool)),
            &ctx(),
        )
        .await
        .unwrap()
}

/// The bytes stored under `key`, read past `RunStore`.
async fn raw(store: &RunStore, key: &object_store::path::Path) -> bytes::Bytes {
    store
        .object_store()
        .get(key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

/// The key of `rel` (a path relative to the store prefix) in `store`'s object store: the S3
/// backend of this suite keeps its store under `runs/`.
fn prefixed(store: &RunStore, rel: &str) -> object_store::path::Path {
    if store.url().starts_with("s3") {
        object_store::path::Path::from(format!("runs/{rel}").as_str())
    } else {
        object_store::path::Path::from(rel)
    }
}

fn run_id(n: u32) -> RunId {
    RunId::parse(&format!("run_{n:012x}")).unwrap()
}

async fn create_then_get(store: RunStore) {
    let id = run_id(1);
    let out = create(&store, &id, "T102").await;
    assert!(out.changed);
    assert_eq!(out.revision, 1);
    let a = store.get(&id).await.unwrap();
    assert_eq!(a.tool_id.as_str(), "T102");
    assert_eq!(a.revision, 1);
    assert!(a.hashes.gcode_sha256.is_some());
    assert!(store.verify(&id).await.unwrap().ok);
}

async fn create_is_idempotent(store: RunStore) {
    let id = run_id(2);
    let c = cmd(CommandKind::Create, create_body(id.as_str(), "T1"));
    store.execute(&c, &ctx()).await.unwrap();
    let again = store.execute(&c, &ctx()).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.revision, 1);
    let other = cmd(CommandKind::Create, create_body(id.as_str(), "T2"));
    match store.execute(&other, &ctx()).await {
        Err(StoreError::Rejected(r)) => assert_eq!(r.code, RejectCode::Conflict),
        other => panic!("expected conflict, got {other:?}"),
    }
}

async fn missing_run(store: RunStore) {
    let id = run_id(3);
    assert!(matches!(store.get(&id).await, Err(StoreError::NotFound(_))));
    assert!(store.load(&id).await.unwrap().is_none());
    let patch = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"a": 1}}),
    );
    match store.execute(&patch, &ctx()).await {
        Err(StoreError::Rejected(r)) => assert_eq!(r.code, RejectCode::NotFound),
        other => panic!("expected not_found, got {other:?}"),
    }
}

async fn corrupt_object_is_reported_never_overwritten(store: RunStore) {
    let id = run_id(4);
    let key = store.artifact_key(&id);
    store
        .object_store()
        .put(
            &key,
            PutPayload::from_static(b"{\"run_id\": \"run_000000000004\", trunc"),
        )
        .await
        .unwrap();
    assert!(matches!(
        store.get(&id).await,
        Err(StoreError::Corrupt { .. })
    ));
    let patch = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"a": 1}}),
    );
    assert!(matches!(
        store.execute(&patch, &ctx()).await,
        Err(StoreError::Corrupt { .. })
    ));
    let create = cmd(CommandKind::Create, create_body(id.as_str(), "T1"));
    assert!(matches!(
        store.execute(&create, &ctx()).await,
        Err(StoreError::Corrupt { .. })
    ));
    let bytes = raw(&store, &key).await;
    assert!(bytes.ends_with(b"trunc"), "corrupt object was overwritten");
}

async fn concurrent_patches_all_apply(store: RunStore, tasks: u32, per_task: u32) {
    let id = run_id(5);
    create(&store, &id, "T1").await;
    let store = Arc::new(store);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let c = cmd(
                    CommandKind::PatchMeta,
                    json!({"run_id": id.as_str(), "meta_updates": {format!("t{t}_{i}"): i}}),
                );
                store
                    .execute(&c, &ctx_with_id(&format!("c{t}-{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let a = store.get(&id).await.unwrap();
    let total = tasks * per_task;
    assert_eq!(a.revision, 1 + u64::from(total), "lost updates");
    let patched = a.meta.keys().filter(|k| k.starts_with('t')).count();
    assert_eq!(patched as u32, total);
    // Every one of those racing changes kept its revision: the history is gap-free, each
    // revision names its command, and the chain verifies end to end.
    let chain = store.verify_chain(&id).await.unwrap();
    assert!(chain.ok, "{chain:?}");
    assert_eq!(chain.revisions, 1 + u64::from(total));
    assert_eq!(chain.starts_at, Some(1));
    let page = store.history(&id, None, 1000).await.unwrap();
    let commands: std::collections::HashSet<String> = page
        .revisions
        .iter()
        .skip(1)
        .filter_map(|r| r.command_id.clone())
        .collect();
    assert_eq!(commands.len() as u32, total, "a revision per command");
}

async fn redelivered_patch_changes_nothing(store: RunStore) {
    let id = run_id(6);
    create(&store, &id, "T1").await;
    let p = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"n": 1}}),
    );
    let first = store.execute(&p, &ctx_with_id("m-1")).await.unwrap();
    let second = store.execute(&p, &ctx_with_id("m-1")).await.unwrap();
    assert!(first.changed && !second.changed);
    assert_eq!(second.revision, 2);
    let stale = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"n": 2}, "expected_revision": 1}),
    );
    match store.execute(&stale, &ctx_with_id("m-2")).await {
        Err(StoreError::Rejected(r)) => assert_eq!(r.code, RejectCode::Conflict),
        other => panic!("expected conflict, got {other:?}"),
    }
}

async fn blobs_are_stored_once_and_verified(store: RunStore) {
    let id = run_id(7);
    let gcode = "G1 X10 Y10 F1200\n".repeat(6000);
    let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id.as_str(),
                      "outputs": {"gcode_text": gcode}});
    let mut c = ctx();
    c.limits = Limits::default();
    store
        .execute(&cmd(CommandKind::Create, body), &c)
        .await
        .unwrap();
    let a = store.get(&id).await.unwrap();
    assert!(a.outputs.gcode_text.is_none(), "large G-code kept inline");
    let blob = a.outputs.gcode_blob.clone().unwrap();
    assert_eq!(
        store.get_blob(&blob.sha256).await.unwrap().unwrap().len() as u64,
        blob.size_bytes
    );
    let inlined = store.inline_outputs(a.clone()).await.unwrap();
    assert_eq!(inlined.outputs.gcode_text.as_deref(), Some(gcode.as_str()));
    assert!(store.verify(&id).await.unwrap().ok);

    // Advisory bodies are blobs too; attachment is idempotent by advisory id.
    let adv = cmd(
        CommandKind::Advisory,
        json!({"run_id": id.as_str(), "advisory_id": "adv_0000000000aa", "kind": "explanation",
               "body": {"text": "Feed rate reduced"}, "explanation_status": "READY"}),
    );
    assert!(store.execute(&adv, &ctx()).await.unwrap().changed);
    assert!(!store.execute(&adv, &ctx()).await.unwrap().changed);
    let a = store.get(&id).await.unwrap();
    assert_eq!(a.advisory_inputs.len(), 1);

    // A flipped byte in a stored body is caught.
    let key = store.blob_key(&blob.sha256);
    let mut bytes = raw(&store, &key).await.to_vec();
    bytes[10] ^= 0x01;
    store
        .object_store()
        .put(&key, PutPayload::from(bytes))
        .await
        .unwrap();
    let report = store.verify(&id).await.unwrap();
    assert!(!report.ok);
    let bad: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Mismatch)
        .collect();
    assert!(
        bad.iter().any(|c| c.name.starts_with("blob:")),
        "{report:?}"
    );
    assert!(
        bad.iter().any(|c| c.name == "hashes.gcode_sha256"),
        "{report:?}"
    );
}

/// `include_outputs` never leaves a body out or answers it as null: a missing blob, or an op
/// plan blob that is not JSON, is a corrupt run, named as such.
async fn inline_outputs_reports_missing_and_corrupt_blobs(store: RunStore) {
    let id = run_id(8);
    let gcode = "G1 X10 Y10 F1200\n".repeat(6000);
    let plan: serde_json::Map<String, Value> = (0..4000)
        .map(|i| (format!("op{i:05}"), json!("pocket 6mm")))
        .collect();
    let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id.as_str(),
                      "outputs": {"gcode_text": gcode, "opplan_json": plan}});
    store
        .execute(&cmd(CommandKind::Create, body), &ctx())
        .await
        .unwrap();
    let a = store.get(&id).await.unwrap();
    let gcode_blob = a.outputs.gcode_blob.clone().expect("G-code is a blob");
    let plan_blob = a.outputs.opplan_blob.clone().expect("op plan is a blob");
    let full = store.inline_outputs(a.clone()).await.unwrap();
    assert_eq!(full.outputs.opplan_json.as_ref(), Some(&plan));

    let os = store.object_store();
    os.put(
        &store.blob_key(&plan_blob.sha256),
        PutPayload::from_static(b"{not json"),
    )
    .await
    .unwrap();
    match store.inline_outputs(a.clone()).await {
        Err(StoreError::Corrupt { reason, .. }) => {
            assert!(reason.contains("op plan blob is not JSON"), "{reason}")
        }
        other => panic!("a corrupt op plan answered as {other:?}"),
    }
    os.delete(&store.blob_key(&gcode_blob.sha256))
        .await
        .unwrap();
    match store.inline_outputs(a).await {
        Err(StoreError::Corrupt { reason, .. }) => {
            assert!(reason.contains("G-code blob is missing"), "{reason}")
        }
        other => panic!("a missing G-code blob answered as {other:?}"),
    }
}

async fn listing_pages_and_filters(store: RunStore) {
    for n in 0..23u32 {
        let tool = if n % 3 == 0 { "T3" } else { "T1" };
        let mut body = create_body(&format!("run_{:012x}", 0x100 + n), tool);
        if n % 2 == 0 {
            body["status"] = json!("BLOCKED");
        }
        store
            .execute(&cmd(CommandKind::Create, body), &ctx())
            .await
            .unwrap();
    }
    // A non-run object and a deleted run must not show up.
    store
        .execute(
            &cmd(
                CommandKind::Delete,
                json!({"run_id": "run_000000000100", "reason": "test"}),
            ),
            &ctx(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut q = ListQuery {
        limit: Some(5),
        order: Some(Order::Id),
        ..Default::default()
    };
    loop {
        let page = store.list(&q).await.unwrap();
        assert!(page.runs.len() <= 5);
        seen.extend(page.runs.iter().map(|r| r.run_id.clone()));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 22);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages overlap or are out of order");

    let t3 = store
        .list(&ListQuery {
            limit: Some(100),
            tool_id: Some("T3".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(t3.runs.len(), 7); // n = 3,6,...,21 (0 deleted)
    assert!(t3.runs.iter().all(|r| r.tool_id.as_str() == "T3"));
    let blocked = store
        .list(&ListQuery {
            limit: Some(100),
            status: Some("BLOCKED".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(blocked.runs.len(), 11);
    let future = store
        .list(&ListQuery {
            limit: Some(100),
            since: Some("2999-01-01T00:00:00Z".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(future.runs.is_empty());
}

async fn delete_leaves_tombstone_and_releases_blobs(store: RunStore) {
    let id = run_id(9);
    let gcode = "G0 X0\n".repeat(20_000);
    let body = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id.as_str(),
                      "outputs": {"gcode_text": gcode}});
    let create = cmd(CommandKind::Create, body);
    store.execute(&create, &ctx()).await.unwrap();
    // A second run shares the same G-code body.
    let id2 = run_id(10);
    let body2 = json!({"mode": "cam", "tool_id": "T1", "status": "OK", "run_id": id2.as_str(),
                       "outputs": {"gcode_text": "G0 X0\n".repeat(20_000)}});
    store
        .execute(&cmd(CommandKind::Create, body2), &ctx())
        .await
        .unwrap();
    let sha = store
        .get(&id)
        .await
        .unwrap()
        .outputs
        .gcode_blob
        .unwrap()
        .sha256;

    let del = cmd(
        CommandKind::Delete,
        json!({"run_id": id.as_str(), "reason": "retention"}),
    );
    let out = store.execute(&del, &ctx()).await.unwrap();
    assert_eq!(out.revision, 2);
    assert!(matches!(store.get(&id).await, Err(StoreError::NotFound(_))));
    assert!(matches!(
        store.load(&id).await.unwrap().unwrap().value,
        StoredRecord::Deleted(_)
    ));
    assert!(
        store.blob_exists(&sha).await.unwrap(),
        "blob still referenced by another run was removed"
    );
    // A late redelivery of the create does not bring the run back.
    assert!(!store.execute(&create, &ctx()).await.unwrap().changed);
    assert!(matches!(store.get(&id).await, Err(StoreError::NotFound(_))));
    // Deleting the last referencing run removes the blob.
    let del2 = cmd(
        CommandKind::Delete,
        json!({"run_id": id2.as_str(), "reason": "retention"}),
    );
    store.execute(&del2, &ctx()).await.unwrap();
    assert!(
        !store.blob_exists(&sha).await.unwrap(),
        "unreferenced blob left behind"
    );
    // Deleting again is a no-op.
    assert!(!store.execute(&del2, &ctx()).await.unwrap().changed);
}

async fn probe_accepts_a_conditional_store(store: RunStore) {
    store.probe().await.unwrap();
}

async fn get_bytes_serves_what_is_stored(store: RunStore) {
    // Written at the current schema: the stored bytes, as they are.
    let id = run_id(20);
    create(&store, &id, "T7").await;
    let key = store.artifact_key(&id);
    let stored = raw(&store, &key).await;
    assert_eq!(store.get_bytes(&id).await.unwrap(), stored);

    // A seed file (no schema_version, no revision) is served decoded, with the defaults.
    let seed_id = run_id(21);
    let seed = json!({"run_id": seed_id.as_str(), "created_at_utc": "2025-01-02T03:04:05Z",
                      "mode": "cam", "tool_id": "T1", "status": "OK", "meta": {"k": "v"}});
    store
        .object_store()
        .put(
            &store.artifact_key(&seed_id),
            PutPayload::from(seed.to_string()),
        )
        .await
        .unwrap();
    let got: Value = serde_json::from_slice(&store.get_bytes(&seed_id).await.unwrap()).unwrap();
    assert_eq!(got["schema_version"], 0);
    assert_eq!(got["revision"], 1);
    assert_eq!(got["explanation_status"], "NONE");
    assert_eq!(got["meta"]["k"], "v");

    // Deleted: not found. Missing: not found. Another run's bytes under this key: corrupt.
    let del = cmd(
        CommandKind::Delete,
        json!({"run_id": id.as_str(), "reason": "test"}),
    );
    store.execute(&del, &ctx()).await.unwrap();
    assert!(matches!(
        store.get_bytes(&id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_bytes(&run_id(22)).await,
        Err(StoreError::NotFound(_))
    ));
    let wrong = run_id(23);
    store
        .object_store()
        .put(&store.artifact_key(&wrong), PutPayload::from(stored))
        .await
        .unwrap();
    match store.get_bytes(&wrong).await {
        Err(StoreError::Corrupt { reason, .. }) => {
            assert!(reason.contains("instead of"), "{reason}")
        }
        other => panic!("expected corrupt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The listing index
// ---------------------------------------------------------------------------------------------

/// A create stamped at `at` (the worker stamps the time it applies a command).
async fn create_at(store: &RunStore, body: Value, at: &str) {
    let ctx = Context {
        now: at.parse().unwrap(),
        ..Context::now()
    };
    store
        .execute(&cmd(CommandKind::Create, body), &ctx)
        .await
        .unwrap();
}

/// Deletes run `id` (reason `t`).
async fn delete(store: &RunStore, id: &RunId) {
    let c = cmd(
        CommandKind::Delete,
        json!({"run_id": id.as_str(), "reason": "t"}),
    );
    store.execute(&c, &ctx()).await.unwrap();
}

/// Every page of `q`, concatenated; panics on a repeated run.
async fn walk(store: &RunStore, mut q: ListQuery) -> Vec<RunSummary> {
    let mut out: Vec<RunSummary> = Vec::new();
    for _ in 0..10_000 {
        let page = store.list(&q).await.unwrap();
        assert!(page.runs.len() <= q.limit.unwrap_or(50));
        out.extend(page.runs);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
    panic!("listing did not end");
}

/// The order a listing must have, computed from the runs themselves.
fn model_order(order: Order, runs: &mut [RunSummary]) {
    let ms = |r: &RunSummary| r.created_at_utc.0.timestamp_millis();
    match order {
        Order::Newest => runs.sort_by(|a, b| ms(b).cmp(&ms(a)).then(a.run_id.cmp(&b.run_id))),
        Order::Oldest => runs.sort_by(|a, b| ms(a).cmp(&ms(b)).then(b.run_id.cmp(&a.run_id))),
        Order::Id => runs.sort_by(|a, b| a.run_id.cmp(&b.run_id)),
    }
}

fn model_matches(r: &RunSummary, q: &ListQuery) -> bool {
    q.mode.as_ref().is_none_or(|m| *m == r.mode)
        && q.tool_id.as_ref().is_none_or(|t| *t == r.tool_id)
        && q.status.is_none_or(|s| s == r.status)
        && q.risk_level.is_none_or(|s| Some(s) == r.risk_level)
        && q.explanation_status
            .is_none_or(|s| s == r.explanation_status)
        && q.since.is_none_or(|s| r.created_at_utc >= s)
        && q.until.is_none_or(|u| r.created_at_utc < u)
}

/// Random runs (times spread over days, with collisions to the millisecond and below),
/// patched, explained and deleted at random; then random queries in every order, paged with
/// random page sizes, against the same runs read back one by one.
async fn index_matches_a_model(store: RunStore) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1d3a);
    let n = if store.url().starts_with("s3") {
        80
    } else {
        240
    };
    let modes = ["cam", "saw", "drill"];
    let tools = ["T1", "T2", "T3.a", "T4:b/c", "T5"];
    let statuses = ["OK", "BLOCKED", "ERROR"];
    let risks = [Some("GREEN"), Some("YELLOW"), Some("RED"), None];
    let mut ids = Vec::new();
    for i in 0..n {
        let id = run_id(0x1000 + i);
        let mut body = json!({"mode": modes[rng.random_range(0..3)],
            "tool_id": tools[rng.random_range(0..5)],
            "status": statuses[rng.random_range(0..3)], "run_id": id.as_str()});
        if let Some(r) = risks[rng.random_range(0..4)] {
            body["decision"] = json!({"risk_level": r});
        }
        // A few distinct instants, so that many runs share a millisecond.
        let secs = rng.random_range(0..5) * 86_400 + rng.random_range(0..3) * 3_600;
        let frac = ["", ".5", ".500001", ".999"][rng.random_range(0..4)];
        let at = chrono::DateTime::from_timestamp(1_790_000_000 + secs, 0).unwrap();
        create_at(
            &store,
            body,
            &format!("{}{frac}Z", at.format("%Y-%m-%dT%H:%M:%S")),
        )
        .await;
        ids.push(id);
    }
    let mut live: Vec<RunId> = Vec::new();
    for id in &ids {
        match rng.random_range(0..6) {
            0 => {
                delete(&store, id).await;
                continue;
            }
            1 => {
                let body = json!({"run_id": id.as_str(), "meta_updates": {"k": 1}});
                store
                    .execute(&cmd(CommandKind::PatchMeta, body), &ctx())
                    .await
                    .unwrap();
            }
            2 => {
                let status = ["PENDING", "READY", "ERROR"][rng.random_range(0..3)];
                let body = json!({"run_id": id.as_str(), "kind": "explanation",
                    "engine_id": "e", "engine_version": "1", "body": {"text": "x"},
                    "explanation_status": status});
                store
                    .execute(&cmd(CommandKind::Advisory, body), &ctx())
                    .await
                    .unwrap();
            }
            _ => {}
        }
        live.push(id.clone());
    }
    let mut all: Vec<RunSummary> = Vec::new();
    for id in &live {
        all.push(RunSummary::from(&store.get(id).await.unwrap()));
    }
    let pick = |rng: &mut rand::rngs::StdRng, p: f64| rng.random_bool(p);
    for round in 0..40 {
        let order = [Order::Newest, Order::Oldest, Order::Id][round % 3];
        let mut q = ListQuery {
            limit: Some(rng.random_range(1..=25)),
            order: Some(order),
            ..Default::default()
        };
        if pick(&mut rng, 0.3) {
            q.mode = Some(modes[rng.random_range(0..3)].parse().unwrap());
        }
        if pick(&mut rng, 0.4) {
            q.tool_id = Some(tools[rng.random_range(0..5)].parse().unwrap());
        }
        if pick(&mut rng, 0.3) {
            q.status = Some(statuses[rng.random_range(0..3)].parse().unwrap());
        }
        if pick(&mut rng, 0.2) {
            q.risk_level = Some(
                ["GREEN", "YELLOW", "RED"][rng.random_range(0..3)]
                    .parse()
                    .unwrap(),
            );
        }
        if pick(&mut rng, 0.2) {
            q.explanation_status = Some(
                ["NONE", "PENDING", "READY"][rng.random_range(0..3)]
                    .parse()
                    .unwrap(),
            );
        }
        let t = |rng: &mut rand::rngs::StdRng| {
            let at =
                1_790_000_000 + rng.random_range(0..6) * 86_400 + rng.random_range(0..3) * 3_600;
            chrono::DateTime::from_timestamp(at, 500_000_000).unwrap()
        };
        if pick(&mut rng, 0.3) {
            q.since = Some(rmos_runs::domain::artifact::Timestamp(t(&mut rng)));
        }
        if pick(&mut rng, 0.3) {
            q.until = Some(rmos_runs::domain::artifact::Timestamp(t(&mut rng)));
        }
        if let (Some(s), Some(u)) = (q.since, q.until)
            && s >= u
        {
            assert!(store.list(&q).await.is_err(), "since >= until accepted");
            q.since = None;
        }
        let mut want: Vec<RunSummary> = all
            .iter()
            .filter(|r| model_matches(r, &q))
            .cloned()
            .collect();
        model_order(order, &mut want);
        let got = walk(&store, q.clone()).await;
        assert_eq!(got, want, "round {round}: {q:?}");
    }
    // A cursor continues only its own listing.
    let first = store
        .list(&ListQuery {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let other = ListQuery {
        limit: Some(2),
        cursor: first.next_cursor.clone(),
        status: Some("OK".parse().unwrap()),
        ..Default::default()
    };
    match store.list(&other).await {
        Err(StoreError::Rejected(r)) => assert!(r.message.contains("cursor"), "{r}"),
        other => panic!("cursor of another listing accepted: {other:?}"),
    }
    // A version 1 cursor (a run id) continues in run id order.
    let after = store
        .list(&ListQuery {
            limit: Some(3),
            cursor: Some(live[0].to_string()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(after.runs.iter().all(|r| r.run_id > live[0]));
    let report = store.reindex(true).await.unwrap();
    assert!(report.consistent(), "{report:?}");
    assert_eq!(report.live, live.len());
}

/// Runs created and deleted while a client pages through the rest: every run that exists
/// throughout is listed exactly once, in every order.
async fn index_pages_hold_under_concurrent_changes(store: RunStore) {
    let n = if store.url().starts_with("s3") {
        30
    } else {
        120
    };
    let stable: Vec<RunId> = (0..n).map(|i| run_id(0x2000 + i)).collect();
    for (i, id) in stable.iter().enumerate() {
        let at = format!("2026-03-01T00:00:{:02}.{:03}Z", i % 60, i % 7);
        create_at(&store, create_body(id.as_str(), "T9"), &at).await;
    }
    // Runs that come and go meanwhile, at times inside and around the stable ones'.
    let churn: Vec<RunId> = (0..n).map(|i| run_id(0x3000 + i)).collect();
    for (i, id) in churn.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let at = format!("2026-03-01T00:00:{:02}.{:03}Z", i % 60, 3);
        create_at(&store, create_body(id.as_str(), "T9"), &at).await;
    }
    for order in [Order::Newest, Order::Oldest, Order::Id] {
        let changer = {
            let store = store.clone();
            let churn = churn.clone();
            let stable = stable.clone();
            tokio::spawn(async move {
                for (i, id) in churn.iter().enumerate() {
                    let exists = store.get(id).await.is_ok();
                    if exists {
                        let body = json!({"run_id": id.as_str(), "reason": "churn"});
                        store
                            .execute(&cmd(CommandKind::Delete, body), &ctx())
                            .await
                            .unwrap();
                    } else if store.load(id).await.unwrap().is_none() {
                        let at = format!("2026-03-01T00:00:{:02}.{:03}Z", i % 60, 5);
                        create_at(&store, create_body(id.as_str(), "T9"), &at).await;
                    }
                    // Patches move a run's entries: they must neither hide nor repeat it.
                    let body = json!({"run_id": stable[i % stable.len()].as_str(),
                                      "meta_updates": {"i": i}});
                    store
                        .execute(&cmd(CommandKind::PatchMeta, body), &ctx())
                        .await
                        .unwrap();
                }
            })
        };
        let mut seen: Vec<RunId> = Vec::new();
        let mut q = ListQuery {
            limit: Some(7),
            order: Some(order),
            ..Default::default()
        };
        loop {
            let page = store.list(&q).await.unwrap();
            seen.extend(page.runs.iter().map(|r| r.run_id.clone()));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
            tokio::task::yield_now().await;
        }
        changer.await.unwrap();
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "{order}: a run was listed twice");
        for id in &stable {
            assert!(seen.contains(id), "{order}: {id} skipped");
        }
    }
    let report = store.reindex(true).await.unwrap();
    assert!(report.consistent(), "{report:?}");
}

/// The states a crash can leave between a command's index entries and its record, and what
/// brings the index back in line: the redelivery of the command, or `reindex`.
async fn index_recovers_from_a_crash_between_entries_and_record(store: RunStore) {
    use rmos_runs::store::index::entry_keys;
    let put_raw = |key: object_store::path::Path| {
        let store = store.clone();
        async move {
            store
                .object_store()
                .put(&key, PutPayload::new())
                .await
                .unwrap();
        }
    };
    let prefixed = |rel: &str| prefixed(&store, rel);
    // 1. A create died after its entries, before its record: the redelivered create (stamped
    //    later) must leave one entry set, the record's.
    let id = run_id(0x4001);
    let body = create_body(id.as_str(), "T1");
    let ghost_ctx = Context {
        now: "2026-04-01T00:00:00Z".parse().unwrap(),
        ..Context::now()
    };
    let ghost = match cmd(CommandKind::Create, body.clone())
        .decide(None, &ghost_ctx)
        .unwrap()
    {
        rmos_runs::domain::command::Decision::Write { record, .. } => record,
        other => panic!("{other:?}"),
    };
    let StoredRecord::Live(ghost) = ghost else {
        panic!("tombstone")
    };
    for k in entry_keys(&RunSummary::from(ghost.as_ref())) {
        put_raw(prefixed(&k)).await;
    }
    let redelivery = Context {
        now: "2026-04-01T00:00:31Z".parse().unwrap(),
        redelivered: true,
        ..Context::now()
    };
    store
        .execute(&cmd(CommandKind::Create, body), &redelivery)
        .await
        .unwrap();
    let all = walk(
        &store,
        ListQuery {
            limit: Some(10),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].created_at_utc.to_string(), "2026-04-01T00:00:31Z");
    assert!(store.reindex(true).await.unwrap().consistent());

    // 2. A patch died after its record, before removing its old entries: the redelivery finds
    //    the patch applied and drops them.
    let a = store.get(&id).await.unwrap();
    let old = entry_keys(&RunSummary::from(&a));
    let patch = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"x": 1}}),
    );
    store.execute(&patch, &ctx_with_id("p-1")).await.unwrap();
    settle(&store).await;
    for k in &old {
        put_raw(prefixed(k)).await;
    }
    assert!(
        !store.reindex(true).await.unwrap().consistent(),
        "stale entries not reported"
    );
    let again = Context {
        redelivered: true,
        ..ctx_with_id("p-1")
    };
    assert!(!store.execute(&patch, &again).await.unwrap().changed);
    assert!(store.reindex(true).await.unwrap().consistent());
    let page = store.list(&ListQuery::default()).await.unwrap();
    assert_eq!(page.runs.len(), 1);
    assert_eq!(page.runs[0].revision, 2);

    // 3. Entries lost (or a store from before the index): reindex writes them, and says so;
    //    a second pass has nothing to do.
    settle(&store).await;
    for k in entry_keys(&page.runs[0]) {
        store.object_store().delete(&prefixed(&k)).await.unwrap();
    }
    assert!(
        store
            .list(&ListQuery::default())
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    let fixed = store.reindex(false).await.unwrap();
    assert_eq!(fixed.missing, 3, "{fixed:?}");
    assert!(store.reindex(true).await.unwrap().consistent());
    assert_eq!(
        store.list(&ListQuery::default()).await.unwrap().runs.len(),
        1
    );

    // 4. Deleted: no entry left.
    delete(&store, &id).await;
    assert!(
        store
            .list(&ListQuery::default())
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    assert!(store.reindex(true).await.unwrap().consistent());
}

/// A store whose index was built with layout 1 (four-level tool trees under `index/tool/`, a
/// two-level id tree under `index/id/`, `index/_built` holding `1`): it is not complete, a
/// check reports the old entries as drift, and `reindex` builds the current layout, removes
/// the old trees and records the current version.
async fn an_index_of_an_earlier_layout_is_rebuilt(store: RunStore) {
    let prefixed = |rel: &str| prefixed(&store, rel);
    let id = run_id(0x5001);
    create(&store, &id, "T1").await;
    let a = store.get(&id).await.unwrap();
    let name = rmos_runs::store::index::entry_keys(&RunSummary::from(&a))[2]
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let old_keys = [
        format!(
            "index/id/{}/{}/{name}",
            &id.as_str()[4..6],
            &id.as_str()[6..8]
        ),
        format!("index/tool/T1/0f0f0/0f/0f/0f/{name}"),
    ];
    for k in &old_keys {
        store
            .object_store()
            .put(&prefixed(k), PutPayload::new())
            .await
            .unwrap();
    }
    store
        .object_store()
        .put(&prefixed("index/_built"), PutPayload::from_static(b"1\n"))
        .await
        .unwrap();
    // Nothing has marked this store's index complete yet, so nothing is cached.
    let fresh = &store;
    assert!(
        !fresh.index_complete().await.unwrap(),
        "a layout-1 index is not complete"
    );
    let check = fresh.reindex(true).await.unwrap();
    assert_eq!(check.legacy, 2, "{check:?}");
    assert!(!check.consistent());
    let fixed = fresh.reindex(false).await.unwrap();
    assert_eq!(fixed.legacy, 2, "{fixed:?}");
    assert!(fresh.index_complete().await.unwrap());
    for k in &old_keys {
        assert!(
            fresh.object_store().head(&prefixed(k)).await.is_err(),
            "{k} removed"
        );
    }
    let again = fresh.reindex(true).await.unwrap();
    assert!(again.consistent(), "{again:?}");
    let page = fresh.list(&ListQuery::default()).await.unwrap();
    assert_eq!(page.runs.len(), 1);
    assert!(page.index_complete);
}

/// `holds_runs` (what `serve` asks before warning of an index build) counts records only:
/// not the index, blobs or history, and a tombstone is a record.
async fn holds_runs_counts_records_only(store: RunStore) {
    let prefixed = |rel: &str| prefixed(&store, rel);
    assert!(!store.holds_runs().await.unwrap(), "a new store");
    for k in [
        "index/_built",
        "blobs/00ff",
        "history/run_00000000ffff/1.json",
        "zz.json",
    ] {
        store
            .object_store()
            .put(&prefixed(k), PutPayload::from_static(b"1\n"))
            .await
            .unwrap();
    }
    assert!(
        !store.holds_runs().await.unwrap(),
        "other objects are not runs"
    );
    let id = run_id(0x6001);
    create(&store, &id, "T1").await;
    assert!(store.holds_runs().await.unwrap(), "one run");
    delete(&store, &id).await;
    assert!(store.holds_runs().await.unwrap(), "a tombstone");
}

// ---------------------------------------------------------------------------------------------
// History: every revision kept, a hash chain
// ---------------------------------------------------------------------------------------------

/// The revision numbers of a history page, in order.
fn revision_numbers(page: &rmos_runs::store::history::HistoryPage) -> Vec<u64> {
    page.revisions.iter().map(|r| r.revision).collect()
}

async fn patch_n(store: &RunStore, id: &RunId, n: u32) {
    let c = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"n": n}}),
    );
    store
        .execute(&c, &ctx_with_id(&format!("{id}-p{n}")))
        .await
        .unwrap();
}

/// The history of a run: every revision, in order, chained; any past revision readable as it
/// was; a delete keeps the chain's head.
async fn history_keeps_every_revision_chained(store: RunStore) {
    let id = run_id(0x5001);
    let created = create(&store, &id, "T1").await;
    for n in 1..=3 {
        patch_n(&store, &id, n).await;
    }
    let page1 = store.history(&id, None, 2).await.unwrap();
    assert_eq!(page1.revisions.len(), 2);
    let after: u64 = page1.next_cursor.as_deref().unwrap().parse().unwrap();
    let page2 = store.history(&id, Some(after), 2).await.unwrap();
    assert_eq!(page2.next_cursor, None);
    let revs: Vec<_> = page1.revisions.iter().chain(&page2.revisions).collect();
    assert_eq!(
        revs.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(revs[0].event, "created");
    assert_eq!(revs[0].prev_sha256, None);
    assert_eq!(
        revs[0].artifact_sha256, created.artifact_sha256,
        "the stored event's hash"
    );
    for w in revs.windows(2) {
        assert_eq!(
            w[1].prev_sha256.as_deref(),
            Some(w[0].artifact_sha256.as_str())
        );
        assert_eq!(w[1].event, "meta_patched");
    }
    // A page from the middle holds exactly the revisions after its cursor.
    let mid = store.history(&id, Some(1), 2).await.unwrap();
    assert_eq!(revision_numbers(&mid), [2, 3]);
    assert_eq!(mid.next_cursor.as_deref(), Some("3"));
    // A run whose first revisions were written before history was kept: its history starts
    // at the first revision kept, and its chain from there.
    let old = run_id(0x5002);
    let before_history = store.clone().without_history();
    create(&before_history, &old, "T1").await;
    patch_n(&before_history, &old, 1).await;
    patch_n(&store, &old, 2).await;
    patch_n(&store, &old, 3).await;
    let first = store.history(&old, None, 1).await.unwrap();
    assert_eq!(first.revisions.len(), 1);
    assert_eq!(first.revisions[0].revision, 3);
    assert_eq!(first.next_cursor.as_deref(), Some("3"));
    let rest = store.history(&old, Some(3), 1).await.unwrap();
    assert_eq!(rest.revisions.len(), 1);
    assert_eq!(rest.revisions[0].revision, 4);
    assert_eq!(rest.next_cursor, None);
    let chain = store.verify_chain(&old).await.unwrap();
    assert!(chain.ok && chain.starts_at == Some(3), "{chain:?}");
    // A past revision as it was.
    let r2 = store.get_revision(&id, 2).await.unwrap();
    assert_eq!(r2["meta"]["n"], json!(1));
    assert_eq!(r2["revision"], json!(2));
    let current = store.get(&id).await.unwrap();
    assert_eq!(
        current.prev_sha256.as_ref().map(|s| s.as_str()),
        Some(revs[2].artifact_sha256.as_str())
    );
    let d = rmos_runs::domain::diff::diff(
        &store.get_revision(&id, 3).await.unwrap(),
        &store.get_revision(&id, 4).await.unwrap(),
    );
    let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
    assert!(
        paths.contains(&"/meta/n") && paths.contains(&"/revision"),
        "{paths:?}"
    );
    assert!(store.verify_chain(&id).await.unwrap().ok);

    let del = cmd(
        CommandKind::Delete,
        json!({"run_id": id.as_str(), "reason": "t"}),
    );
    let out = store.execute(&del, &ctx()).await.unwrap();
    let chain = store.verify_chain(&id).await.unwrap();
    assert!(chain.ok, "{chain:?}");
    assert_eq!(chain.revisions, 5);
    let last = store.history(&id, Some(4), 10).await.unwrap();
    assert_eq!(last.revisions[0].event, "deleted");
    assert_eq!(last.revisions[0].artifact_sha256, out.artifact_sha256);
    assert_eq!(
        last.revisions[0].prev_sha256.as_deref(),
        Some(revs[3].artifact_sha256.as_str())
    );
    match store.remove_history(&id).await {
        Ok(n) => assert_eq!(n, 5),
        Err(e) => panic!("{e}"),
    }
}

/// An object's JSON, read past `RunStore`.
async fn read_json(store: &RunStore, key: &object_store::path::Path) -> Value {
    serde_json::from_slice(&raw(store, key).await).unwrap()
}

/// Writes JSON under `key` past `RunStore`, as someone with write access to the bucket could.
async fn write_json(store: &RunStore, key: &object_store::path::Path, v: &Value) {
    store
        .object_store()
        .put(key, PutPayload::from(serde_json::to_vec(v).unwrap()))
        .await
        .unwrap();
}

/// Someone with write access to the store edits the trail: each kind of tampering is found,
/// with its reason.
async fn tampering_with_the_history_is_reported(store: RunStore) {
    use rmos_runs::store::history::ChainFault;
    let os = store.object_store().clone();
    let history_key = |id: &RunId, r: u64| store.history_key(id, r);
    let fresh = |n: u32| {
        let store = store.clone();
        async move {
            let id = run_id(0x6000 + n);
            create(&store, &id, "T1").await;
            for p in 1..=3 {
                patch_n(&store, &id, p).await;
            }
            assert!(store.verify_chain(&id).await.unwrap().ok);
            id
        }
    };
    let broken = |id: RunId| {
        let store = store.clone();
        async move {
            let c = store.verify_chain(&id).await.unwrap();
            assert!(!c.ok, "{c:?}");
            let b = c.broken.unwrap();
            (b.revision, b.reason)
        }
    };
    // A past revision's content changed (its recorded hash left as it was).
    let id = fresh(1).await;
    let mut v = read_json(&store, &history_key(&id, 2)).await;
    v["record"]["meta"]["n"] = json!(99);
    write_json(&store, &history_key(&id, 2), &v).await;
    assert_eq!(broken(id).await, (2, ChainFault::ContentChanged));
    // ... and rehashed too: then the next revision no longer points at it.
    let id = fresh(2).await;
    let mut v = read_json(&store, &history_key(&id, 2)).await;
    v["record"]["meta"]["n"] = json!(99);
    v["artifact_sha256"] = json!(rmos_runs::domain::hashing::sha256_json(&v["record"]));
    write_json(&store, &history_key(&id, 2), &v).await;
    assert_eq!(broken(id).await, (3, ChainFault::ChainBroken));
    // The current record edited in place.
    let id = fresh(3).await;
    let mut v = read_json(&store, &store.artifact_key(&id)).await;
    v["meta"]["n"] = json!(42);
    write_json(&store, &store.artifact_key(&id), &v).await;
    assert_eq!(broken(id).await, (4, ChainFault::ContentChanged));
    // The current record made unreadable: verify says so, and the history stays readable.
    let id = fresh(6).await;
    os.put(
        &store.artifact_key(&id),
        PutPayload::from_static(b"{\"not a record"),
    )
    .await
    .unwrap();
    let page = store.history(&id, None, 10).await.unwrap();
    assert_eq!(revision_numbers(&page), [1, 2, 3, 4]);
    assert!(matches!(
        store.verify_chain(&id).await,
        Err(StoreError::Corrupt { .. })
    ));
    // A revision removed.
    let id = fresh(4).await;
    os.delete(&history_key(&id, 3)).await.unwrap();
    // The history page says so too, naming the revision, rather than skip it.
    match store.history(&id, None, 10).await {
        Err(StoreError::Corrupt { reason, .. }) => {
            assert!(reason.contains("revision 3 is missing"), "{reason}")
        }
        other => panic!("a page over a removed revision: {other:?}"),
    }
    assert_eq!(broken(id).await, (3, ChainFault::RevisionMissing));
    // Two revisions swapped.
    let id = fresh(5).await;
    let (two, three) = (
        raw(&store, &history_key(&id, 2)).await,
        raw(&store, &history_key(&id, 3)).await,
    );
    os.put(&history_key(&id, 2), PutPayload::from(three))
        .await
        .unwrap();
    os.put(&history_key(&id, 3), PutPayload::from(two))
        .await
        .unwrap();
    assert_eq!(broken(id).await, (2, ChainFault::ChainBroken));
}

/// A change that died after claiming its revision and before writing its record: the next
/// change of the run applies it first (no gap, no orphan), and its redelivery is a no-op.
async fn a_claimed_revision_is_rolled_forward(store: RunStore) {
    use rmos_runs::domain::command::Decision;
    use rmos_runs::store::history::Revision;
    let id = run_id(0x7001);
    create(&store, &id, "T1").await;
    // What the dead writer had decided and claimed: revision 2.
    let dead = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"dead": 1}}),
    );
    let dead_ctx = ctx_with_id("dead-1");
    let current = store.load(&id).await.unwrap().unwrap();
    let Decision::Write { mut record, .. } = dead.decide(Some(&current.value), &dead_ctx).unwrap()
    else {
        panic!("not a write")
    };
    record.set_prev_sha256(Some(
        rmos_runs::domain::artifact::Sha256Hex::parse(&rmos_runs::store::record_sha256(
            &current.value,
        ))
        .unwrap(),
    ));
    let rev = Revision::new(
        &record,
        "meta_patched",
        dead_ctx.now,
        None,
        Some("dead-1".into()),
        None,
    );
    store.put_revision(&rev).await.unwrap();
    let chain = store.verify_chain(&id).await.unwrap();
    assert!(chain.ok && chain.pending == Some(2), "{chain:?}");
    let page = store.history(&id, None, 10).await.unwrap();
    assert_eq!(
        revision_numbers(&page),
        [1, 2],
        "the claimed revision is in the history"
    );
    // Another change arrives: revision 2 is applied first, the change becomes revision 3.
    let next = cmd(
        CommandKind::PatchMeta,
        json!({"run_id": id.as_str(), "meta_updates": {"next": 1}}),
    );
    let out = store.execute(&next, &ctx_with_id("next-1")).await.unwrap();
    assert_eq!(out.revision, 3);
    let a = store.get(&id).await.unwrap();
    assert_eq!(a.meta["dead"], json!(1));
    assert_eq!(a.meta["next"], json!(1));
    // The dead writer's command, redelivered, finds itself applied.
    let again = store
        .execute(
            &dead,
            &Context {
                redelivered: true,
                ..ctx_with_id("dead-1")
            },
        )
        .await
        .unwrap();
    assert!(!again.changed);
    let chain = store.verify_chain(&id).await.unwrap();
    assert!(chain.ok && chain.pending.is_none(), "{chain:?}");
    assert_eq!(chain.revisions, 3);
    assert!(store.reindex(true).await.unwrap().consistent());
}

/// Someone who can write the bucket but does not hold the worker's key rewrites a past
/// revision and recomputes the whole chain after it: the hashes then agree, and only the
/// signatures tell. Unsigned and foreign-signed revisions are refused too.
async fn signatures_hold_against_a_writer_without_the_key(store: RunStore) {
    use rmos_runs::domain::hashing::sha256_json;
    use rmos_runs::store::history::{ChainFault, Signing};
    let worker_key = nkeys::KeyPair::new_user();
    let signed = store
        .clone()
        .with_signing(Signing::new(Some(worker_key), Vec::new()));
    let id = run_id(0x8001);
    signed
        .execute(
            &cmd(CommandKind::Create, create_body(id.as_str(), "T1")),
            &ctx(),
        )
        .await
        .unwrap();
    for n in 1..=3 {
        patch_n(&signed, &id, n).await;
    }
    let chain = signed.verify_chain(&id).await.unwrap();
    assert!(chain.ok && chain.signatures_checked, "{chain:?}");

    // Rewrite revision 2 and re-chain 3, 4 and the current record, as a careful forger would.
    let mut prev = read_json(&store, &store.history_key(&id, 1)).await["artifact_sha256"].clone();
    for r in 2..=4u64 {
        let mut v = read_json(&store, &store.history_key(&id, r)).await;
        if r == 2 {
            v["record"]["meta"]["n"] = json!(1000);
        }
        v["record"]["prev_sha256"] = prev.clone();
        v["prev_sha256"] = prev.clone();
        v["artifact_sha256"] = json!(sha256_json(&v["record"]));
        prev = v["artifact_sha256"].clone();
        write_json(&store, &store.history_key(&id, r), &v).await;
        if r == 4 {
            write_json(&store, &store.artifact_key(&id), &v["record"]).await;
        }
    }
    let unsigned_view = store.verify_chain(&id).await.unwrap();
    assert!(
        unsigned_view.ok,
        "the forgery is consistent by hashes alone: {unsigned_view:?}"
    );
    let c = signed.verify_chain(&id).await.unwrap();
    let b = c.broken.expect("forgery found");
    assert_eq!(
        (b.revision, b.reason),
        (2, ChainFault::SignatureInvalid),
        "{}",
        b.detail
    );
    assert!(b.detail.contains("does not match"), "{}", b.detail);

    // Re-signed with the forger's own key: not a trusted key.
    let forger = nkeys::KeyPair::new_user();
    let mut v = read_json(&store, &store.history_key(&id, 2)).await;
    let rev: rmos_runs::store::history::Revision = serde_json::from_value(v.clone()).unwrap();
    v["signature"] = json!({"key": forger.public_key(),
                            "sig": hex::encode(forger.sign(rev.signed_text().as_bytes()).unwrap())});
    write_json(&store, &store.history_key(&id, 2), &v).await;
    let b = signed.verify_chain(&id).await.unwrap().broken.unwrap();
    assert!(
        b.reason == ChainFault::SignatureInvalid && b.detail.contains("not a trusted key"),
        "{b:?}"
    );
    // Signature removed.
    v.as_object_mut().unwrap().remove("signature");
    write_json(&store, &store.history_key(&id, 2), &v).await;
    let b = signed.verify_chain(&id).await.unwrap().broken.unwrap();
    assert!(
        b.reason == ChainFault::SignatureInvalid && b.detail.contains("unsigned"),
        "{b:?}"
    );
}

/// One `#[tokio::test]` per listed case, each on a fresh store of `$backend`.
macro_rules! cases {
    ($backend:ident: $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (s, _g) = open(stringify!($backend)).await;
                super::$case(s).await;
            }
        )+
    };
}

/// The whole suite for one backend (`$tasks` x `$per_task` concurrent patches).
macro_rules! suite {
    ($backend:ident, $tasks:expr, $per_task:expr) => {
        mod $backend {
            use super::*;

            cases!($backend:
                create_then_get,
                create_is_idempotent,
                missing_run,
                corrupt_object_is_reported_never_overwritten,
                redelivered_patch_changes_nothing,
                blobs_are_stored_once_and_verified,
                inline_outputs_reports_missing_and_corrupt_blobs,
                listing_pages_and_filters,
                delete_leaves_tombstone_and_releases_blobs,
                probe_accepts_a_conditional_store,
                get_bytes_serves_what_is_stored,
                index_matches_a_model,
                index_pages_hold_under_concurrent_changes,
                index_recovers_from_a_crash_between_entries_and_record,
                an_index_of_an_earlier_layout_is_rebuilt,
                holds_runs_counts_records_only,
                history_keeps_every_revision_chained,
                tampering_with_the_history_is_reported,
                a_claimed_revision_is_rolled_forward,
                signatures_hold_against_a_writer_without_the_key,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_patches_all_apply() {
                let (s, _g) = open(stringify!($backend)).await;
                super::concurrent_patches_all_apply(s, $tasks, $per_task).await;
            }
        }
    };
}

suite!(memory, 16, 20);
suite!(local, 16, 20);
suite!(journal, 16, 20);
suite!(s3, 16, 5);

/// A journaling writer that dies (its store dropped without a fold, as kill -9 leaves it,
/// with its last line cut short) leaves nothing unlisted: readers merge its journal, the next
/// fold (any process's) moves it into the trees, and a live writer's journal is never folded
/// by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_writer_s_journal_is_listed_then_folded() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::Local(dir.path().to_path_buf());
    let journal_dir = dir.path().join(rmos_runs::store::journal::JOURNAL_DIR);
    let files = || {
        let mut v: Vec<_> = std::fs::read_dir(&journal_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let ids: Vec<RunId> = (0..20).map(|i| run_id(0x6000 + i)).collect();
    {
        let dead = RunStore::open(&url, &OpenOptions::default())
            .unwrap()
            .with_index_journal()
            .unwrap();
        for id in &ids {
            create(&dead, id, "T1").await;
        }
        delete(&dead, &ids[0]).await;
        // Its last write cut short by the crash.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&files()[0])
            .unwrap();
        std::io::Write::write_all(&mut f, b"+index/by-id/0").unwrap();
    }
    assert!(
        std::fs::read_dir(dir.path().join("index/by-id")).is_err(),
        "nothing folded yet"
    );
    let live = RunStore::open(&url, &OpenOptions::default())
        .unwrap()
        .with_index_journal()
        .unwrap();
    let listed = walk(
        &live,
        ListQuery {
            limit: Some(7),
            order: Some(Order::Id),
            ..Default::default()
        },
    )
    .await;
    let ids_listed: Vec<RunId> = listed.iter().map(|r| r.run_id.clone()).collect();
    assert_eq!(ids_listed, ids[1..].to_vec(), "from the journal alone");
    assert!(live.reindex(true).await.unwrap().consistent());
    // The live writer journals a change of its own; another process's fold leaves it alone.
    let extra = run_id(0x6100);
    create(&live, &extra, "T2").await;
    let other = RunStore::open(&url, &OpenOptions::default()).unwrap();
    let folded = other.fold_index_journal().await.unwrap();
    assert_eq!(folded.files, 1, "the dead writer's file only: {folded:?}");
    assert_eq!(
        files().len(),
        1,
        "the live writer's file stays: {:?}",
        files()
    );
    assert!(
        dir.path().join("index/by-id").is_dir(),
        "folded into the trees"
    );
    let all = walk(&other, ListQuery::default()).await;
    assert_eq!(all.len(), ids.len(), "19 folded + 1 journaled");
    // The live writer folds its own; then the trees alone hold everything.
    assert_eq!(live.fold_index_journal().await.unwrap().files, 1);
    let pending = files();
    assert_eq!(pending.len(), 1);
    let left = std::fs::read_to_string(&pending[0]).unwrap();
    assert!(
        left.lines().all(|l| l.starts_with('#')),
        "only its header: {left:?}"
    );
    assert_eq!(walk(&other, ListQuery::default()).await, all);
    let check = other.reindex(true).await.unwrap();
    assert!(check.consistent(), "{check:?}");
    assert_eq!(check.live, ids.len());
}

/// Two live workers change one run one after the other, each journaling into its own file,
/// and the later one folds first: the earlier one's entry, folded after the later one's
/// removal of it, must stay removed (a removal wins, and a fold carries forward a removal
/// whose entry it did not find). What `tests/faults_worker.rs` once caught after a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_wins_over_an_older_writer_s_later_fold() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::Local(dir.path().to_path_buf());
    let journaling = || {
        RunStore::open(&url, &OpenOptions::default())
            .unwrap()
            .with_index_journal()
            .unwrap()
    };
    let (a, b) = (journaling(), journaling());
    let reader = RunStore::open(&url, &OpenOptions::default()).unwrap();
    let id = run_id(0x7001);
    create(&a, &id, "T1").await;
    let body = json!({"run_id": id.as_str(), "meta_updates": {"k": 1}});
    b.execute(&cmd(CommandKind::PatchMeta, body), &ctx())
        .await
        .unwrap();
    let listed = |store: RunStore| async move {
        walk(&store, ListQuery::default())
            .await
            .iter()
            .map(|r| (r.run_id.clone(), r.revision))
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(reader.clone()).await, vec![(id.clone(), 2)]);
    // B folds first: revision 1's entries are not in the trees yet, so B keeps their removal.
    b.fold_index_journal().await.unwrap();
    assert_eq!(listed(reader.clone()).await, vec![(id.clone(), 2)]);
    // A folds revision 1's entries into the trees afterwards.
    a.fold_index_journal().await.unwrap();
    assert_eq!(
        listed(reader.clone()).await,
        vec![(id.clone(), 2)],
        "the carried removal hides them"
    );
    // B's next fold removes them from the trees.
    b.fold_index_journal().await.unwrap();
    a.fold_index_journal().await.unwrap();
    let check = reader.reindex(true).await.unwrap();
    assert!(check.consistent(), "{check:?}");
    assert_eq!(check.journaled, 0, "{check:?}");
    assert_eq!(listed(reader).await, vec![(id, 2)]);
}

/// A writer frozen (or found dead) longer than a carried removal lives: its journal file
/// still adds an entry that another writer's later change removed, and the removal has since
/// expired. The fold checks such an old file's adds against the records: the superseded
/// revision's entries are dropped, an add whose record is not written yet is kept, and the
/// same adds in a fresh file are folded as they are (no record read).
#[tokio::test]
async fn an_old_journal_file_s_superseded_adds_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::Local(dir.path().to_path_buf());
    let store = RunStore::open(&url, &OpenOptions::default()).unwrap();
    let id = run_id(0x7201);
    create(&store, &id, "T1").await;
    let body = json!({"run_id": id.as_str(), "meta_updates": {"k": 1}});
    store
        .execute(&cmd(CommandKind::PatchMeta, body), &ctx())
        .await
        .unwrap();
    // Revision 1's entries (its removal long expired) and a run whose record is in flight.
    let superseded = support::ghost_entry_keys(id.as_str(), "T1");
    let in_flight = support::ghost_entry_keys(run_id(0x7202).as_str(), "T1");
    let old_ms = chrono::Utc::now().timestamp_millis()
        - i64::try_from(rmos_runs::store::journal::CARRY_FOR_MS).unwrap()
        - 60_000;
    let plant = |name: &str, started_ms: i64| {
        support::plant_journal_started(
            dir.path(),
            name,
            started_ms,
            &[superseded.clone(), in_flight.clone()].concat(),
        );
    };
    plant("00000000f0f0f0f0-00000000.log", old_ms);
    let folded = store.fold_index_journal().await.unwrap();
    assert_eq!((folded.superseded, folded.added), (3, 3), "{folded:?}");
    for key in &superseded {
        assert!(!dir.path().join(key).exists(), "{key} was folded");
    }
    for key in &in_flight {
        assert!(dir.path().join(key).exists(), "{key} was dropped");
    }
    let mut listed: Vec<_> = walk(&store, ListQuery::default())
        .await
        .iter()
        .map(|r| (r.run_id.clone(), r.revision))
        .collect();
    listed.sort();
    assert_eq!(listed, vec![(id.clone(), 2), (run_id(0x7202), 1)]);
    // A fresh file is trusted: what the check prevents would happen without it.
    plant(
        "00000000f0f0f0f0-00000001.log",
        chrono::Utc::now().timestamp_millis(),
    );
    let folded = store.fold_index_journal().await.unwrap();
    assert_eq!(folded.superseded, 0, "{folded:?}");
    assert!(dir.path().join(&superseded[0]).exists());
}

/// A dead writer's journal holds the only entries of a tool (its tree is made at the next
/// fold), and they are stale: no record backs them. `reindex --check` must walk that tool's
/// tree from the journal too, and the repair remove them.
#[tokio::test]
async fn reindex_walks_a_tool_tree_that_is_only_in_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::Local(dir.path().to_path_buf());
    let store = RunStore::open(&url, &OpenOptions::default()).unwrap();
    create(&store, &run_id(0x7101), "T1").await;
    let keys = support::ghost_entry_keys(run_id(0x7102).as_str(), "T_ONLY_JOURNALED");
    assert!(
        keys[1].starts_with("index/by-tool/T_ONLY_JOURNALED/"),
        "{keys:?}"
    );
    support::plant_journal(dir.path(), "00000000deadbeef-00000000.log", &keys);
    let check = store.reindex(true).await.unwrap();
    assert_eq!(
        check.stale, 3,
        "time, id and the journal-only tool tree: {check:?}"
    );
    assert_eq!(check.journaled, 3);
    let repair = store.reindex(false).await.unwrap();
    assert_eq!(repair.stale, 3, "{repair:?}");
    let check = store.reindex(true).await.unwrap();
    assert!(check.consistent(), "{check:?}");
    assert_eq!(check.journaled, 0);
    assert!(
        !dir.path().join(&keys[1]).exists(),
        "the folded entry was removed again"
    );
}
