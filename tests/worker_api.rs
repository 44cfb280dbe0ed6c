//! End-to-end tests of the `rmos-runs serve` worker as a real OS process, driven over NATS
//! (a real `nats-server -js`) with `async_nats` as the client: commands on the JetStream
//! stream, `stored` / `rejected` events, and the `get` / `list` / `verify` request-reply API.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use support::NatsServer;

const PREFIX: &str = "rmos.runs";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The worker process
// ---------------------------------------------------------------------------------------------

/// `rmos-runs serve` as a child process; SIGKILLed on drop.
struct Worker {
    child: Option<Child>,
    log: PathBuf,
}

impl Worker {
    /// Starts a worker on `nats` storing under `dir` and waits until it answers `get`.
    async fn start(nats: &NatsServer, dir: &Path, name: &str) -> Worker {
        let log = dir
            .parent()
            .unwrap_or(dir)
            .join(format!("worker-{name}-{}.log", rand::random::<u32>()));
        let out = std::fs::File::create(&log).expect("create worker log");
        let err = out.try_clone().expect("clone worker log");
        let child = Command::new(env!("CARGO_BIN_EXE_rmos-runs"))
            .arg("serve")
            .env("NATS_URL", nats.url())
            .env("RMOS_RUNS_DIR", dir)
            .env("RUST_LOG", "warn")
            .env_remove("RMOS_STORE_URL")
            .env_remove("RMOS_CONFIG")
            .env_remove("RMOS_SUBJECT_PREFIX")
            .env_remove("RMOS_INGEST")
            .env_remove("RMOS_STREAM")
            .env_remove("RMOS_CONSUMER")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn rmos-runs serve");
        let mut w = Worker {
            child: Some(child),
            log,
        };
        w.wait_ready(nats).await;
        w
    }

    async fn wait_ready(&mut self, nats: &NatsServer) {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "worker exited during start-up ({status}); log:\n{}",
                    self.log()
                );
            }
            let req = async_nats::Request::new()
                .payload(Bytes::from_static(b"run_000000000000"))
                .timeout(Some(Duration::from_millis(500)));
            if client
                .send_request(format!("{PREFIX}.get"), req)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready after {READY_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("worker running").id() as libc::pid_t
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on the pid of a child we have not reaped.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
    }

    /// Waits for the process to exit (panics after `timeout`).
    async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("worker running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "worker did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------------------------

/// A test environment: broker, store directory (inside a tempdir that also holds worker logs).
struct Env {
    nats: NatsServer,
    tmp: tempfile::TempDir,
    client: Client,
    js: jetstream::Context,
}

impl Env {
    async fn new() -> Env {
        let nats = NatsServer::start().await;
        let tmp = tempfile::Builder::new()
            .prefix("rmos-worker-api-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(tmp.path().join("runs")).expect("runs dir");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client.clone());
        Env {
            nats,
            tmp,
            client,
            js,
        }
    }

    fn runs_dir(&self) -> PathBuf {
        self.tmp.path().join("runs")
    }

    async fn worker(&self, name: &str) -> Worker {
        Worker::start(&self.nats, &self.runs_dir(), name).await
    }

    /// Subscribes to `stored` and `rejected` (before anything is published).
    async fn events(&self) -> Events {
        Events::subscribe(&self.client).await
    }

    /// Publishes a command through JetStream and waits for the PubAck.
    async fn publish(&self, kind: &str, rid: &str, payload: impl Into<Bytes>) {
        let mut h = HeaderMap::new();
        h.insert("X-Request-Id", rid);
        self.js
            .publish_with_headers(format!("{PREFIX}.{kind}"), h, payload.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }

    /// Request-reply; returns (error status header if any, JSON body).
    async fn request(
        &self,
        endpoint: &str,
        rid: &str,
        body: impl Into<Bytes>,
    ) -> (Option<String>, Value) {
        let mut h = HeaderMap::new();
        h.insert("X-Request-Id", rid);
        let req = async_nats::Request::new()
            .payload(body.into())
            .headers(h)
            .timeout(Some(Duration::from_secs(10)));
        let reply = self
            .client
            .send_request(format!("{PREFIX}.{endpoint}"), req)
            .await
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        let status = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.to_string());
        let body: Value = serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
            panic!(
                "{endpoint}: reply is not JSON ({e}): {}",
                String::from_utf8_lossy(&reply.payload)
            )
        });
        (status, body)
    }

    async fn get_ok(&self, run_id: &str) -> Value {
        let (status, body) = self.request("get", &rid("get"), run_id.to_owned()).await;
        assert_eq!(status, None, "get {run_id}: {body}");
        body
    }

    /// The number of `run_*.json` files at the top of the store directory.
    fn run_files(&self) -> usize {
        std::fs::read_dir(self.runs_dir())
            .expect("read runs dir")
            .filter_map(Result::ok)
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("run_") && n.ends_with(".json")
            })
            .count()
    }
}

/// One `stored` or `rejected` event.
#[derive(Clone, Debug)]
struct Event {
    kind: &'static str,
    rid: String,
    body: Value,
}

/// Every `stored` / `rejected` event seen since subscribing, keyed by `X-Request-Id`.
struct Events {
    seen: Arc<Mutex<Vec<Event>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Events {
    async fn subscribe(client: &Client) -> Events {
        let stored = client
            .subscribe(format!("{PREFIX}.stored"))
            .await
            .expect("sub");
        let rejected = client
            .subscribe(format!("{PREFIX}.rejected"))
            .await
            .expect("sub");
        client.flush().await.expect("flush");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tagged = futures::stream::select(
            stored.map(|m| ("stored", m)),
            rejected.map(|m| ("rejected", m)),
        );
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut tagged = std::pin::pin!(tagged);
            while let Some((kind, m)) = tagged.next().await {
                let rid = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("X-Request-Id"))
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                sink.lock().unwrap().push(Event { kind, rid, body });
            }
        });
        Events { seen, task }
    }

    fn snapshot(&self) -> Vec<Event> {
        self.seen.lock().unwrap().clone()
    }

    /// The first event for `rid`, waiting up to `timeout`.
    async fn one(&self, rid: &str, timeout: Duration, worker: &Worker) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.snapshot().into_iter().find(|e| e.rid == rid) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no event for request {rid} within {timeout:?}; worker log:\n{}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` distinct request ids have a `stored` event; returns them by request id.
    async fn stored(
        &self,
        n: usize,
        timeout: Duration,
        log: impl Fn() -> String,
    ) -> HashMap<String, Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let snap = self.snapshot();
            let rejected: Vec<&Event> = snap.iter().filter(|e| e.kind == "rejected").collect();
            assert!(rejected.is_empty(), "unexpected rejections: {rejected:?}");
            let stored: HashMap<String, Value> = snap
                .into_iter()
                .filter(|e| e.kind == "stored")
                .map(|e| (e.rid, e.body))
                .collect();
            if stored.len() >= n {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} stored events within {timeout:?}; log:\n{}",
                stored.len(),
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rid(tag: &str) -> String {
    format!("test-{tag}-{:016x}", rand::random::<u64>())
}

fn create_payload(run_id: Option<&str>, tool_id: &str) -> Value {
    let mut v = json!({
        "mode": "cam", "tool_id": tool_id, "status": "OK",
        "request_summary": {"material": "maple"},
        "feasibility": {"ok": true},
        "decision": {"risk_level": "GREEN", "score": 87.5, "warnings": []},
        "outputs": {"gcode_text": "G21\nG90\nG0 X0 Y0\n", "opplan_json": {"ops": [1, 2]}},
        "meta": {}
    });
    if let Some(id) = run_id {
        v["run_id"] = json!(id);
    }
    v
}

fn bytes_of(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap())
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_verify() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    let run_id = "run_0123456789ab";
    let r = rid("create");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some(run_id), "T102")),
    )
    .await;
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    assert_eq!(ev.body["event"], "created");
    assert_eq!(ev.body["run_id"], run_id);
    assert_eq!(ev.body["revision"], 1);
    assert_eq!(ev.body["request_id"], r.as_str());

    // get: plain-text id and JSON body.
    for body in [
        Bytes::from(run_id),
        bytes_of(&json!({"run_id": run_id})),
        bytes_of(&json!({"run_id": run_id, "include_outputs": true})),
    ] {
        let (status, a) = env.request("get", &rid("get"), body).await;
        assert_eq!(status, None, "{a}");
        assert_eq!(a["run_id"], run_id);
        assert_eq!(a["revision"], 1);
        assert_eq!(a["tool_id"], "T102");
        assert_eq!(a["status"], "OK");
        assert_eq!(a["meta"]["request_id"], r.as_str(), "{a}");
    }

    // list sees it.
    let (status, page) = env.request("list", &rid("list"), "{}").await;
    assert_eq!(status, None, "{page}");
    assert_eq!(page["runs"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["runs"][0]["run_id"], run_id);

    // verify: all ok.
    let (status, rep) = env
        .request(
            "verify",
            &rid("verify"),
            bytes_of(&json!({"run_id": run_id})),
        )
        .await;
    assert_eq!(status, None, "{rep}");
    assert_eq!(rep["ok"], true, "{rep}");

    // unknown run → 404 not_found.
    let r404 = rid("get404");
    let (status, body) = env.request("get", &r404, "run_ffffffffffff").await;
    assert_eq!(status.as_deref(), Some("404"), "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert_eq!(body["error"]["request_id"], r404.as_str(), "{body}");

    // malformed id → 400 invalid_request.
    for bad in [
        bytes_of(&json!({"run_id": "nope"})),
        Bytes::from_static(b"nope"),
        Bytes::from_static(b"{\"run_id\": \"run_0123456789ab\", \"extra\": 1}"),
    ] {
        let (status, body) = env.request("get", &rid("get400"), bad).await;
        assert_eq!(status.as_deref(), Some("400"), "{body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_over_120_runs() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    const N: usize = 120;
    let mut acks = Vec::new();
    let mut expected = HashSet::new();
    for i in 0..N {
        let run_id = format!("run_{:012x}", 0xa000 + i);
        let tool = if i % 3 == 0 { "T3" } else { "T1" };
        expected.insert(run_id.clone());
        let mut h = HeaderMap::new();
        h.insert("X-Request-Id", rid(&format!("c{i}")).as_str());
        acks.push(
            env.js
                .publish_with_headers(
                    format!("{PREFIX}.create"),
                    h,
                    bytes_of(&create_payload(Some(&run_id), tool)),
                )
                .await
                .expect("publish"),
        );
    }
    for ack in
        futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
    {
        ack.expect("PubAck");
    }
    events
        .stored(N, Duration::from_secs(60), || worker.log())
        .await;

    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    let mut pages = 0;
    loop {
        let (status, page) = env
            .request(
                "list",
                &rid("list"),
                bytes_of(&json!({"limit": 25, "cursor": cursor})),
            )
            .await;
        assert_eq!(status, None, "{page}");
        let runs = page["runs"].as_array().unwrap();
        assert!(runs.len() <= 25, "{page}");
        seen.extend(
            runs.iter()
                .map(|r| r["run_id"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        assert!(pages <= 10, "too many pages");
        cursor = page["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    let distinct: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), N, "duplicates across pages");
    assert_eq!(distinct, expected);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "list is in run id order");

    // Filter by tool: every third run is T3.
    let (status, page) = env
        .request(
            "list",
            &rid("list"),
            bytes_of(&json!({"limit": 1000, "tool_id": "T3"})),
        )
        .await;
    assert_eq!(status, None, "{page}");
    let runs = page["runs"].as_array().unwrap();
    assert_eq!(runs.len(), N / 3, "{page}");
    assert!(runs.iter().all(|r| r["tool_id"] == "T3"));
    assert!(page["next_cursor"].is_null());

    // A bad list query is a 400.
    let (status, body) = env
        .request("list", &rid("list"), bytes_of(&json!({"limit": 0})))
        .await;
    assert_eq!(status.as_deref(), Some("400"), "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_flipped_byte() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    let run_id = "run_00000000b10b";
    let gcode: String = (0..9000).map(|i| format!("G1 X{i} Y1\n")).collect();
    assert!(gcode.len() > 64 * 1024);
    let mut payload = create_payload(Some(run_id), "T102");
    payload["outputs"] = json!({"gcode_text": gcode});
    let r = rid("big");
    env.publish("create", &r, bytes_of(&payload)).await;
    let ev = events.one(&r, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);

    let blobs = files_under(&env.runs_dir().join("blobs"));
    assert_eq!(blobs.len(), 1, "one blob expected: {blobs:?}");
    let blob = &blobs[0];
    assert_eq!(std::fs::metadata(blob).unwrap().len() as usize, gcode.len());

    let verify = || async {
        env.request(
            "verify",
            &rid("verify"),
            bytes_of(&json!({"run_id": run_id})),
        )
        .await
    };
    let (status, rep) = verify().await;
    assert_eq!(status, None, "{rep}");
    assert_eq!(rep["ok"], true, "{rep}");

    // Flip one byte of the blob on disk.
    let mut bytes = std::fs::read(blob).unwrap();
    bytes[1000] ^= 0x01;
    let mut perms = std::fs::metadata(blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(blob, perms).unwrap();
    std::fs::write(blob, &bytes).unwrap();

    let (status, rep) = verify().await;
    assert_eq!(status, None, "{rep}");
    assert_eq!(rep["ok"], false, "{rep}");
    let checks = rep["checks"].as_array().unwrap();
    assert!(
        checks.iter().any(|c| c["status"] == "mismatch"),
        "no mismatch check: {rep}"
    );
    assert!(
        checks
            .iter()
            .filter(|c| c["status"] != "ok")
            .all(|c| c["status"] == "mismatch"),
        "{rep}"
    );

    // get without outputs still works (refers to the blob), unknown verify is 404.
    let a = env.get_ok(run_id).await;
    assert!(
        a["outputs"]["gcode_text"].is_null(),
        "gcode should be a blob ref"
    );
    let (status, body) = env
        .request("verify", &rid("v404"), "run_ffffffffffff")
        .await;
    assert_eq!(status.as_deref(), Some("404"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_worker_keeps_serving() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    // A run that exists, for the conflict cases.
    let existing = "run_0000000000e1";
    let r = rid("setup");
    env.publish(
        "create",
        &r,
        bytes_of(&create_payload(Some(existing), "T1")),
    )
    .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &worker).await.kind, "stored");

    // Published first: retried with backoff before its rejection (~15 s).
    let slow = rid("patch-unknown");
    env.publish(
        "patch_meta",
        &slow,
        bytes_of(&json!({"run_id": "run_00000000dead", "meta_updates": {"a": 1}})),
    )
    .await;

    let mut extra_field = create_payload(None, "T1");
    extra_field["colour"] = json!("red");
    let mut bad_status = create_payload(None, "T1");
    bad_status["status"] = json!("MAYBE");
    let mut bad_hash = create_payload(None, "T1");
    bad_hash["hashes"] = json!({"gcode_sha256": "0".repeat(64)});
    let cases: Vec<(&str, &str, Bytes, &str)> = vec![
        (
            "invalid-json",
            "create",
            Bytes::from_static(b"{not json"),
            "invalid_request",
        ),
        (
            "array",
            "create",
            Bytes::from_static(b"[1, 2, 3]"),
            "invalid_request",
        ),
        (
            "unknown-field",
            "create",
            bytes_of(&extra_field),
            "invalid_request",
        ),
        (
            "bad-run-id",
            "create",
            bytes_of(&create_payload(Some("run_NOTHEX"), "T1")),
            "invalid_request",
        ),
        (
            "bad-status",
            "create",
            bytes_of(&bad_status),
            "invalid_request",
        ),
        ("bad-hash", "create", bytes_of(&bad_hash), "invalid_request"),
        (
            "conflict",
            "create",
            bytes_of(&create_payload(Some(existing), "T2")),
            "conflict",
        ),
        (
            "stale-revision",
            "patch_meta",
            bytes_of(
                &json!({"run_id": existing, "meta_updates": {"x": 1}, "expected_revision": 7}),
            ),
            "conflict",
        ),
        (
            "delete-unknown",
            "delete",
            bytes_of(&json!({"run_id": "run_00000000beef", "reason": "test"})),
            "not_found",
        ),
    ];
    let mut rids = Vec::new();
    for (tag, kind, payload, code) in &cases {
        let r = rid(tag);
        env.publish(kind, &r, payload.clone()).await;
        rids.push((tag, r, *code));
    }
    for (tag, r, code) in &rids {
        let ev = events.one(r, EVENT_TIMEOUT, &worker).await;
        assert_eq!(ev.kind, "rejected", "{tag}: {:?}", ev.body);
        assert_eq!(ev.body["code"], *code, "{tag}: {:?}", ev.body);
        assert_eq!(ev.body["request_id"], r.as_str(), "{tag}");
        let dl = ev.body["dead_letter"].as_str().unwrap_or_default();
        assert!(!dl.is_empty(), "{tag}: no dead_letter in {:?}", ev.body);
    }

    // The worker still serves: a valid create succeeds, the run is unchanged by the rejects.
    let ok = rid("ok");
    env.publish(
        "create",
        &ok,
        bytes_of(&create_payload(Some("run_0000000000f2"), "T9")),
    )
    .await;
    let ev = events.one(&ok, EVENT_TIMEOUT, &worker).await;
    assert_eq!(ev.kind, "stored", "{:?}", ev.body);
    let a = env.get_ok(existing).await;
    assert_eq!(a["revision"], 1);
    assert_eq!(a["tool_id"], "T1");

    // The patch for an unknown run is rejected after its retries.
    let ev = events.one(&slow, Duration::from_secs(45), &worker).await;
    assert_eq!(ev.kind, "rejected", "{:?}", ev.body);
    assert_eq!(ev.body["code"], "not_found", "{:?}", ev.body);

    // One dead letter per rejected command, each holding its request id.
    let letters = files_under(&env.runs_dir().join("dead_letters"));
    assert_eq!(letters.len(), cases.len() + 1, "{letters:?}");
    let texts: Vec<String> = letters
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for (tag, r, _) in &rids {
        assert!(
            texts.iter().any(|t| t.contains(r.as_str())),
            "{tag}: no dead letter mentions {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_create_is_not_stored_twice() {
    let env = Env::new().await;
    let worker = env.worker("a").await;
    let events = env.events().await;

    let payload = bytes_of(&create_payload(None, "T7"));
    let first = rid("first");
    env.publish("create", &first, payload.clone()).await;
    let e1 = events.one(&first, EVENT_TIMEOUT, &worker).await;
    assert_eq!(e1.kind, "stored", "{:?}", e1.body);
    assert_eq!(e1.body["changed"], true, "{:?}", e1.body);
    let second = rid("second");
    env.publish("create", &second, payload).await;
    let e2 = events.one(&second, EVENT_TIMEOUT, &worker).await;
    assert_eq!(e2.kind, "stored", "{:?}", e2.body);
    assert_eq!(e1.body["run_id"], e2.body["run_id"]);
    assert_eq!(e2.body["changed"], false, "{:?}", e2.body);
    assert_eq!(e2.body["revision"], 1);
    assert_eq!(env.run_files(), 1);
    let a = env.get_ok(e1.body["run_id"].as_str().unwrap()).await;
    assert_eq!(a["revision"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_concurrent_patches_all_apply() {
    let env = Env::new().await;
    let w1 = env.worker("a").await;
    let w2 = env.worker("b").await;
    let events = env.events().await;

    let run_id = "run_000000000c0c";
    let r = rid("create");
    env.publish("create", &r, bytes_of(&create_payload(Some(run_id), "T1")))
        .await;
    assert_eq!(events.one(&r, EVENT_TIMEOUT, &w1).await.kind, "stored");

    const TASKS: usize = 32;
    const PER_TASK: usize = 20;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let js = env.js.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let mut h = HeaderMap::new();
                h.insert("X-Request-Id", format!("patch-{t}-{i}").as_str());
                let body = json!({"run_id": run_id, "meta_updates": {format!("p{t}_{i}"): i}});
                js.publish_with_headers(format!("{PREFIX}.patch_meta"), h, bytes_of(&body))
                    .await
                    .expect("publish")
                    .await
                    .expect("PubAck");
            }
        }));
    }
    for h in handles {
        h.await.expect("publisher task");
    }
    let stored = events
        .stored(TASKS * PER_TASK + 1, Duration::from_secs(120), || {
            format!("--- a ---\n{}\n--- b ---\n{}", w1.log(), w2.log())
        })
        .await;
    let revisions: HashSet<u64> = stored
        .values()
        .map(|v| v["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(
        revisions.len(),
        TASKS * PER_TASK + 1,
        "each change its own revision"
    );

    let a = env.get_ok(run_id).await;
    assert_eq!(a["revision"], (TASKS * PER_TASK + 1) as u64);
    let meta = a["meta"].as_object().unwrap();
    let missing: Vec<String> = (0..TASKS)
        .flat_map(|t| (0..PER_TASK).map(move |i| format!("p{t}_{i}")))
        .filter(|k| !meta.contains_key(k))
        .collect();
    assert!(missing.is_empty(), "lost patches: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_loses_nothing() {
    let env = Env::new().await;
    let mut worker = env.worker("a").await;

    const N: usize = 300;
    let publisher = {
        let js = env.js.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let run_id = format!("run_{:012x}", 0x5000 + i);
                let mut h = HeaderMap::new();
                h.insert("X-Request-Id", format!("term-{i}").as_str());
                js.publish_with_headers(
                    format!("{PREFIX}.create"),
                    h,
                    bytes_of(&create_payload(Some(&run_id), "T1")),
                )
                .await
                .expect("publish")
                .await
                .expect("PubAck");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = env.run_files();
    worker.sigterm();
    let status = worker.wait(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        worker.log()
    );
    publisher.await.expect("every create PubAck'd");
    let at_stop = env.run_files();
    let pending = ack_pending(&env).await;
    eprintln!(
        "run files: {before} at SIGTERM, {at_stop} after exit; ack pending after exit: {pending}"
    );

    let started = Instant::now();
    let w2 = env.worker("b").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = env.run_files();
        if n == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {N} runs stored after 60 s; log:\n{}",
            w2.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "second worker finished the backlog in {:?}",
        started.elapsed()
    );
    // The stream (work queue) drains: nothing left behind.
    let mut stream = env.js.get_stream("RMOS_RUNS").await.expect("stream");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = stream.info().await.expect("stream info");
        if info.state.messages == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stream still holds {} messages",
            info.state.messages
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.run_files(), N);
}

/// Messages delivered to the durable consumer and not yet acked.
async fn ack_pending(env: &Env) -> usize {
    let stream = env.js.get_stream("RMOS_RUNS").await.expect("stream");
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer("rmos-runs-worker")
        .await
        .expect("consumer");
    consumer
        .info()
        .await
        .expect("consumer info")
        .num_ack_pending
}

/// The protocol: on SIGTERM the worker "finishes and acks what it holds". Messages it pulled
/// but never started must not stay pending until `ack_wait` (30 s) expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn sigterm_leaves_nothing_pending_ack() {
    let env = Env::new().await;
    let mut worker = env.worker("a").await;
    let mut acks = Vec::new();
    for i in 0..300 {
        let run_id = format!("run_{:012x}", 0x6000 + i);
        acks.push(
            env.js
                .publish(
                    format!("{PREFIX}.create"),
                    bytes_of(&create_payload(Some(&run_id), "T1")),
                )
                .await
                .expect("publish"),
        );
    }
    for ack in
        futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
    {
        ack.expect("PubAck");
    }
    worker.sigterm();
    let status = worker.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    let stored = env.run_files();
    assert!(
        stored < 300,
        "worker finished everything before SIGTERM; test proves nothing"
    );
    assert_eq!(
        ack_pending(&env).await,
        0,
        "messages left pending ack after a graceful stop ({stored} of 300 stored): {}",
        worker.log()
    );
}
