//! The `rmos-runs serve` worker as a real OS process, and client helpers for driving it over
//! a real broker: shared by the worker test files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};

use super::NatsServer;

/// The default subject prefix.
pub const PREFIX: &str = "rmos.runs";
/// How long a worker may take to answer its first request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test waits for one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The worker process
// ---------------------------------------------------------------------------------------------

/// `rmos-runs serve` as a child process; SIGKILLed on drop.
pub struct Worker {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Worker {
    /// Starts a worker on `nats` storing under `dir` and waits until it answers `get`.
    pub async fn start(nats: &NatsServer, dir: &Path, name: &str) -> Worker {
        Self::start_with(nats, dir, name, &[]).await
    }

    /// Like [`Worker::start`], with extra environment (`RMOS_INGEST=core`, an S3 store, ...).
    pub async fn start_with(
        nats: &NatsServer,
        dir: &Path,
        name: &str,
        extra_env: &[(String, String)],
    ) -> Worker {
        Self::start_at(&nats.url(), dir, name, extra_env).await
    }

    /// Spawns `rmos-runs serve` on the broker(s) at `nats_url` storing under `dir`, with no
    /// inherited rmos or broker settings plus `extra_env`, without waiting for it.
    pub fn spawn(nats_url: &str, dir: &Path, name: &str, extra_env: &[(String, String)]) -> Worker {
        let log = dir
            .parent()
            .unwrap_or(dir)
            .join(format!("worker-{name}-{}.log", rand::random::<u32>()));
        let out = std::fs::File::create(&log).expect("create worker log");
        let err = out.try_clone().expect("clone worker log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rmos-runs"));
        cmd.arg("serve")
            .env("NATS_URL", nats_url)
            .env("RMOS_RUNS_DIR", dir)
            .env("RUST_LOG", "warn")
            // The HTTP API's default port is one per machine: tests that want it say so.
            .env("RMOS_HTTP_ADDR", "off");
        for var in [
            "RMOS_STORE_URL",
            "RMOS_CONFIG",
            "RMOS_SUBJECT_PREFIX",
            "RMOS_INBOX_PREFIX",
            "RMOS_INGEST",
            "RMOS_STREAM",
            "RMOS_CONSUMER",
            "NATS_USER",
            "NATS_PASSWORD",
            "NATS_TOKEN",
            "NATS_CREDS",
            "NATS_NKEY",
            "NATS_CA",
            "NATS_CERT",
            "NATS_KEY",
        ] {
            cmd.env_remove(var);
        }
        let child = cmd
            .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn rmos-runs serve");
        Worker {
            child: Some(child),
            log,
        }
    }

    pub async fn wait_ready(&mut self, nats: &NatsServer) {
        self.wait_ready_at(&nats.url()).await;
    }

    /// Waits until the worker answers `get` to `client` (which may carry credentials);
    /// panics with the worker's log if it exits or takes longer than [`READY_TIMEOUT`].
    pub async fn wait_ready_with(&mut self, client: &Client) {
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

    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("worker running").id() as libc::pid_t
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) on the pid of a child we have not reaped.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
    }

    /// SIGKILL, no chance to finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (panics after `timeout`).
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
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

    pub fn log(&self) -> String {
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
pub struct Env {
    pub nats: NatsServer,
    pub tmp: tempfile::TempDir,
    pub client: Client,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn new() -> Env {
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

    pub fn runs_dir(&self) -> PathBuf {
        self.tmp.path().join("runs")
    }

    pub async fn worker(&self, name: &str) -> Worker {
        Worker::start(&self.nats, &self.runs_dir(), name).await
    }

    /// A worker reading `toml` as its configuration file (`RMOS_CONFIG`).
    pub async fn worker_with_config(&self, name: &str, toml: &str) -> Worker {
        let config = self.tmp.path().join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write config");
        let vars = [("RMOS_CONFIG".to_owned(), config.display().to_string())];
        Worker::start_with(&self.nats, &self.runs_dir(), name, &vars).await
    }

    /// Subscribes to `stored` and `rejected` (before anything is published).
    pub async fn events(&self) -> Events {
        Events::subscribe(&self.client).await
    }

    /// Publishes a command through JetStream and waits for the PubAck.
    pub async fn publish(&self, kind: &str, rid: &str, payload: impl Into<Bytes>) {
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
    pub async fn request(
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

    pub async fn get_ok(&self, run_id: &str) -> Value {
        let (status, body) = self.request("get", &rid("get"), run_id.to_owned()).await;
        assert_eq!(status, None, "get {run_id}: {body}");
        body
    }

    /// The default durable consumer's info.
    pub async fn consumer_info(&self) -> jetstream::consumer::Info {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream("rmos-runs-worker", "RMOS_RUNS")
            .await
            .expect("consumer");
        consumer.info().await.expect("consumer info").clone()
    }

    /// Waits until every message of the stream was delivered and settled (nothing pending,
    /// nothing awaiting an ack): no outcome can still be on its way.
    pub async fn consumer_settled(&self, timeout: Duration) {
        super::eventually(timeout, async || {
            let info = self.consumer_info().await;
            super::ensure(info.num_pending == 0 && info.num_ack_pending == 0, || {
                format!(
                    "consumer: {} pending, {} awaiting ack",
                    info.num_pending, info.num_ack_pending
                )
            })
        })
        .await;
    }

    /// The number of `run_*.json` files at the top of the store directory.
    pub fn run_files(&self) -> usize {
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
pub struct Event {
    pub kind: &'static str,
    pub rid: String,
    pub body: Value,
}

/// Every `stored` / `rejected` event seen since subscribing, keyed by `X-Request-Id`.
pub struct Events {
    pub seen: Arc<Mutex<Vec<Event>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Events {
    pub async fn subscribe(client: &Client) -> Events {
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

    pub fn snapshot(&self) -> Vec<Event> {
        self.seen.lock().unwrap().clone()
    }

    /// The first event for `rid`, waiting up to `timeout`.
    pub async fn one(&self, rid: &str, timeout: Duration, worker: &Worker) -> Event {
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
    pub async fn stored(
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

pub fn rid(tag: &str) -> String {
    format!("test-{tag}-{:016x}", rand::random::<u64>())
}

pub fn create_payload(run_id: Option<&str>, tool_id: &str) -> Value {
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

pub fn bytes_of(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap())
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
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

// ---------------------------------------------------------------------------------------------
// Workers on any broker URL (clusters, proxies)
// ---------------------------------------------------------------------------------------------

impl Worker {
    /// Like [`Worker::start_with`], for a broker given by URL(s) (`NATS_URL`, comma-separated)
    /// instead of a [`NatsServer`]: a cluster, or a server behind a proxy.
    pub async fn start_at(
        nats_url: &str,
        dir: &Path,
        name: &str,
        extra_env: &[(String, String)],
    ) -> Worker {
        let mut w = Self::spawn(nats_url, dir, name, extra_env);
        w.wait_ready_at(nats_url).await;
        w
    }

    /// [`Worker::wait_ready`] for a broker given by URL(s).
    pub async fn wait_ready_at(&mut self, nats_url: &str) {
        let urls: Vec<&str> = nats_url.split(',').map(str::trim).collect();
        let client = async_nats::ConnectOptions::new()
            .connect(urls.as_slice())
            .await
            .expect("connect");
        self.wait_ready_with(&client).await;
    }

    /// True while the process has not exited (it is not reaped here).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The whole log so far (not just the tail).
    pub fn full_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
