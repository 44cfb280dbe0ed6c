//! Prometheus metrics, liveness and readiness, served over a deliberately tiny HTTP/1.1
//! endpoint (`/metrics`, `/healthz`, `/readyz`; GET or HEAD only, one request per
//! connection, `Connection: close`).
//!
//! Every series has a fixed label set known at compile time (command kinds, endpoints,
//! protocol error codes, store error kinds), so the registry is plain atomics: no locks on the
//! hot path, no unbounded label cardinality, and the exposition is written by hand in the
//! Prometheus text format 0.0.4.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::connection::State;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::domain::command::CommandKind;
use crate::domain::ids::RunId;
use crate::store::{RunStore, StoreError};

/// What became of one command (the `outcome` label of `rmos_commands_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Stored: the record changed.
    Stored,
    /// Already applied (a redelivery): acked, nothing changed.
    Unchanged,
    /// Refused for good: dead-lettered, announced on `rejected`, acked.
    Rejected,
    /// Negatively acked: the broker delivers it again later.
    Retried,
    /// Core mode only: still failing after the in-process retries; answered with an error and
    /// gone (core NATS has no redelivery).
    Failed,
}

impl CommandOutcome {
    const ALL: [CommandOutcome; 5] = [
        CommandOutcome::Stored,
        CommandOutcome::Unchanged,
        CommandOutcome::Rejected,
        CommandOutcome::Retried,
        CommandOutcome::Failed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Stored => "stored",
            CommandOutcome::Unchanged => "unchanged",
            CommandOutcome::Rejected => "rejected",
            CommandOutcome::Retried => "retried",
            CommandOutcome::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `subject` label values: the four command kinds, then `unknown` (a message on a subject
/// that is not a command subject; exposed only when it happens).
const SUBJECTS: [&str; 5] = ["create", "patch_meta", "advisory", "delete", "unknown"];
/// `endpoint` label values.
const ENDPOINTS: [&str; 5] = ["get", "list", "verify", "history", "diff"];
/// Protocol error codes (`code` label); anything else is counted as `internal`.
const CODES: [&str; 8] = [
    "invalid_request",
    "not_found",
    "conflict",
    "too_large",
    "corrupt_artifact",
    "storage_unavailable",
    "insufficient_storage",
    "internal",
];
/// `kind` label values of `rmos_store_errors_total`.
const STORE_KINDS: [&str; 6] = [
    "unavailable",
    "insufficient_storage",
    "corrupt",
    "contention",
    "too_large",
    "unusable",
];
/// Upper bounds (seconds) of the duration histograms' buckets (`+Inf` is implicit).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn subject_index(kind: Option<CommandKind>) -> usize {
    match kind {
        Some(CommandKind::Create) => 0,
        Some(CommandKind::PatchMeta) => 1,
        Some(CommandKind::Advisory) => 2,
        Some(CommandKind::Delete) => 3,
        None => 4,
    }
}

fn code_index(code: &str) -> usize {
    CODES
        .iter()
        .position(|c| *c == code)
        .unwrap_or(CODES.len() - 1)
}

fn endpoint_index(endpoint: &str) -> Option<usize> {
    ENDPOINTS.iter().position(|e| *e == endpoint)
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// A fixed-bucket histogram of durations.
struct Histogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: counters(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Writes `_bucket`, `_sum` and `_count` lines; `labels` is `key="value"` (no braces).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match BUCKETS.get(i) {
                Some(le) => le.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        // The count is the +Inf bucket as rendered, so the two always agree.
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// The metrics registry: one per process, shared by ingest, the API and the HTTP endpoint.
pub struct Metrics {
    commands: [[AtomicU64; CommandOutcome::ALL.len()]; SUBJECTS.len()],
    command_duration: [Histogram; SUBJECTS.len()],
    /// Per endpoint: `ok`, then one per entry of [`CODES`].
    requests: [[AtomicU64; CODES.len() + 1]; ENDPOINTS.len()],
    request_duration: [Histogram; ENDPOINTS.len()],
    conflict_retries: AtomicU64,
    redeliveries: AtomicU64,
    dead_letters: [AtomicU64; CODES.len()],
    store_errors: [AtomicU64; STORE_KINDS.len()],
    in_flight: AtomicI64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Counts a command in `rmos_in_flight_commands` until dropped.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            commands: std::array::from_fn(|_| counters()),
            command_duration: std::array::from_fn(|_| Histogram::new()),
            requests: std::array::from_fn(|_| counters()),
            request_duration: std::array::from_fn(|_| Histogram::new()),
            conflict_retries: AtomicU64::new(0),
            redeliveries: AtomicU64::new(0),
            dead_letters: counters(),
            store_errors: counters(),
            in_flight: AtomicI64::new(0),
        })
    }

    /// A command starts; it counts as in flight until the guard is dropped.
    pub fn command_started(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// A command (`None`: not on a command subject) ended with `outcome` after `elapsed`.
    pub fn command_finished(
        &self,
        kind: Option<CommandKind>,
        outcome: CommandOutcome,
        elapsed: Duration,
    ) {
        let s = subject_index(kind);
        self.commands[s][outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.command_duration[s].observe(elapsed);
    }

    /// A JetStream message arrived with `delivered > 1`.
    pub fn redelivered(&self) {
        self.redeliveries.fetch_add(1, Ordering::Relaxed);
    }

    /// Conditional writes that lost a race and were retried (`Outcome::conflicts`).
    pub fn conflicts(&self, n: u32) {
        if n > 0 {
            self.conflict_retries
                .fetch_add(u64::from(n), Ordering::Relaxed);
        }
    }

    /// A command was kept as a dead letter with protocol code `code`.
    pub fn dead_letter(&self, code: &str) {
        self.dead_letters[code_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    /// A store operation failed. Domain refusals and missing runs are answers, not store
    /// errors, and are not counted. `Contention` also adds its lost races to
    /// `rmos_conflict_retries_total`.
    pub fn store_error(&self, e: &StoreError) {
        let kind = match e {
            StoreError::Rejected(_) | StoreError::NotFound(_) => return,
            StoreError::Unavailable(_) => 0,
            StoreError::InsufficientStorage(_) => 1,
            StoreError::Corrupt { .. } => 2,
            StoreError::Contention { attempts, .. } => {
                self.conflicts(*attempts);
                3
            }
            StoreError::TooLarge(_) => 4,
            StoreError::Unusable(_) => 5,
        };
        self.store_errors[kind].fetch_add(1, Ordering::Relaxed);
    }

    /// A request on `endpoint` was answered: `error` is the protocol code, `None` for success.
    pub fn request(&self, endpoint: &str, error: Option<&str>, elapsed: Duration) {
        let Some(e) = endpoint_index(endpoint) else {
            return;
        };
        let c = error.map_or(0, |code| code_index(code) + 1);
        self.requests[e][c].fetch_add(1, Ordering::Relaxed);
        self.request_duration[e].observe(elapsed);
    }

    /// Error replies of `endpoint` by protocol code (non-zero only), for `$SRV.STATS` data.
    pub fn request_errors(&self, endpoint: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        if let Some(e) = endpoint_index(endpoint) {
            for (i, code) in CODES.iter().enumerate() {
                let n = self.requests[e][i + 1].load(Ordering::Relaxed);
                if n > 0 {
                    out.insert((*code).to_owned(), n.into());
                }
            }
        }
        out
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        // The `unknown` subject only appears once something arrived on it.
        let subject_shown = |s: usize| s < 4 || self.commands[s].iter().any(|c| load(c) > 0);

        header(
            &mut out,
            "rmos_commands_total",
            "counter",
            "Commands processed, by command and outcome (stored, unchanged, rejected, retried, failed).",
        );
        for (s, subject) in SUBJECTS
            .iter()
            .enumerate()
            .filter(|(s, _)| subject_shown(*s))
        {
            for o in CommandOutcome::ALL {
                let _ = writeln!(
                    out,
                    "rmos_commands_total{{subject=\"{subject}\",outcome=\"{}\"}} {}",
                    o.as_str(),
                    load(&self.commands[s][o.index()])
                );
            }
        }
        header(
            &mut out,
            "rmos_command_duration_seconds",
            "histogram",
            "Time from receiving a command to acking (or negatively acking) it.",
        );
        for (s, subject) in SUBJECTS
            .iter()
            .enumerate()
            .filter(|(s, _)| subject_shown(*s))
        {
            self.command_duration[s].render(
                &mut out,
                "rmos_command_duration_seconds",
                &format!("subject=\"{subject}\""),
            );
        }
        header(
            &mut out,
            "rmos_requests_total",
            "counter",
            "Requests answered, by endpoint and code (ok or the protocol error code).",
        );
        for (e, endpoint) in ENDPOINTS.iter().enumerate() {
            for (c, code) in std::iter::once(&"ok").chain(CODES.iter()).enumerate() {
                let _ = writeln!(
                    out,
                    "rmos_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {}",
                    load(&self.requests[e][c])
                );
            }
        }
        header(
            &mut out,
            "rmos_request_duration_seconds",
            "histogram",
            "Time to answer a request.",
        );
        for (e, endpoint) in ENDPOINTS.iter().enumerate() {
            self.request_duration[e].render(
                &mut out,
                "rmos_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        header(
            &mut out,
            "rmos_conflict_retries_total",
            "counter",
            "Conditional writes that lost a race to another writer and were retried.",
        );
        let _ = writeln!(
            out,
            "rmos_conflict_retries_total {}",
            load(&self.conflict_retries)
        );
        header(
            &mut out,
            "rmos_redeliveries_total",
            "counter",
            "JetStream commands received more than once (delivered > 1).",
        );
        let _ = writeln!(out, "rmos_redeliveries_total {}", load(&self.redeliveries));
        header(
            &mut out,
            "rmos_dead_letters_total",
            "counter",
            "Commands kept as dead letters, by protocol error code.",
        );
        for (c, code) in CODES.iter().enumerate() {
            let _ = writeln!(
                out,
                "rmos_dead_letters_total{{code=\"{code}\"}} {}",
                load(&self.dead_letters[c])
            );
        }
        header(
            &mut out,
            "rmos_store_errors_total",
            "counter",
            "Failed store operations, by kind.",
        );
        for (k, kind) in STORE_KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "rmos_store_errors_total{{kind=\"{kind}\"}} {}",
                load(&self.store_errors[k])
            );
        }
        header(
            &mut out,
            "rmos_in_flight_commands",
            "gauge",
            "Commands being processed now.",
        );
        let _ = writeln!(
            out,
            "rmos_in_flight_commands {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "rmos_build_info",
            "gauge",
            "Always 1; the version is in the label.",
        );
        let _ = writeln!(
            out,
            "rmos_build_info{{version=\"{}\"}} 1",
            escape_label(env!("CARGO_PKG_VERSION"))
        );
        out
    }
}

/// Escapes a label value (backslash, double quote, line feed).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// ---------------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------------

/// How long a passing stream / store check is trusted.
const CACHE_OK: Duration = Duration::from_secs(5);
/// How long a failing one is (short, so recovery shows quickly).
const CACHE_FAILED: Duration = Duration::from_secs(1);
/// Budget of one `stream info`.
const STREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Budget of one store write + delete.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// A check result remembered for a while; one check runs at a time, later callers reuse it.
#[derive(Default)]
struct Cached(Mutex<Option<(Instant, Result<(), String>)>>);

impl Cached {
    async fn get<F: Future<Output = Result<(), String>>>(
        &self,
        check: impl FnOnce() -> F,
    ) -> Result<(), String> {
        let mut slot = self.0.lock().await;
        if let Some((at, result)) = slot.as_ref() {
            let ttl = if result.is_ok() {
                CACHE_OK
            } else {
                CACHE_FAILED
            };
            if at.elapsed() < ttl {
                return result.clone();
            }
        }
        let result = check().await;
        *slot = Some((Instant::now(), result.clone()));
        result
    }
}

/// What `/readyz` checks: the broker connection, the stream (JetStream mode) and the store.
pub struct Health {
    client: Client,
    store: RunStore,
    stream: Option<String>,
    stream_check: Cached,
    store_check: Cached,
}

impl Health {
    /// Checks over `client` and `store`; `stream` is the stream to look up (JetStream mode).
    pub fn new(client: Client, store: RunStore, stream: Option<String>) -> Self {
        Self {
            client,
            store,
            stream,
            stream_check: Cached::default(),
            store_check: Cached::default(),
        }
    }

    /// One line per failing check; empty when ready.
    pub async fn not_ready(&self) -> Vec<String> {
        let state = self.client.connection_state();
        let connected = state == State::Connected;
        let stream = async {
            match &self.stream {
                None => Ok(()),
                Some(name) if connected => {
                    self.stream_check
                        .get(|| stream_reachable(&self.client, name))
                        .await
                }
                Some(name) => Err(format!("stream {name}: not checked, broker not connected")),
            }
        };
        let store = self.store_check.get(|| store_writable(&self.store));
        let (stream, store) = tokio::join!(stream, store);
        let mut reasons = Vec::new();
        if !connected {
            let state = match state {
                State::Pending => "connecting",
                _ => "disconnected",
            };
            reasons.push(format!("broker: {state}"));
        }
        reasons.extend(stream.err());
        reasons.extend(store.err());
        reasons.into_iter().map(|r| one_line(&r)).collect()
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

async fn stream_reachable(client: &Client, name: &str) -> Result<(), String> {
    let js = async_nats::jetstream::new(client.clone());
    match tokio::time::timeout(STREAM_TIMEOUT, js.get_stream(name)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("stream {name}: {e}")),
        Err(_) => Err(format!(
            "stream {name}: no answer within {STREAM_TIMEOUT:?}"
        )),
    }
}

/// `<prefix>/_probe/ready-<random>`: the store's prefix is the parent of any run's key.
fn probe_key(store: &RunStore) -> Option<Path> {
    let any = RunId::parse("run_000000000000").ok()?;
    let mut parts: Vec<PathPart<'static>> = store
        .artifact_key(&any)
        .parts()
        .map(|p| PathPart::from(p.as_ref().to_owned()))
        .collect();
    parts.pop();
    parts.push(PathPart::from("_probe"));
    parts.push(PathPart::from(format!(
        "ready-{:016x}",
        rand::random::<u64>()
    )));
    Some(Path::from_iter(parts))
}

/// Writes and deletes a small object.
async fn store_writable(store: &RunStore) -> Result<(), String> {
    let Some(key) = probe_key(store) else {
        return Err("store: no probe key".to_owned());
    };
    let os = store.object_store();
    let work = async {
        os.put(&key, PutPayload::from_static(b"ready"))
            .await
            .map_err(|e| StoreError::from_object_store(e, &format!("write {key}")))?;
        match os.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::from_object_store(e, &format!("delete {key}"))),
        }
    };
    match tokio::time::timeout(STORE_TIMEOUT, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("store {}: {e}", store.url())),
        Err(_) => Err(format!(
            "store {}: probe write not done within {STORE_TIMEOUT:?}",
            store.url()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Connections handled at once; more are closed straight away.
const MAX_CONNECTIONS: usize = 32;
/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The exposition format's content type.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Where the endpoint should listen, as configured.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// `host:port`; `None`: disabled.
    pub addr: Option<String>,
    /// Set explicitly (a bind failure then stops start-up; for the default address it only
    /// disables the endpoint with a warning).
    pub required: bool,
}

/// Binds the endpoint and serves it until `shutdown` turns true. `Ok(None)` when disabled, or
/// when the default address is taken.
pub async fn start(
    settings: &HttpSettings,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<()>>, String> {
    let Some(addr) = settings.addr.as_deref() else {
        tracing::info!("metrics endpoint disabled");
        return Ok(None);
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if settings.required => return Err(format!("metrics_addr {addr}: {e}")),
        Err(e) => {
            tracing::warn!(addr, error = %e, "metrics endpoint not started (set RMOS_METRICS_ADDR to another address, or off)");
            return Ok(None);
        }
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_owned());
    tracing::info!(addr = %local, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    Ok(Some(tokio::spawn(serve_http(
        listener,
        metrics,
        Arc::new(health),
        shutdown,
    ))))
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((sock, _)) => {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    continue; // dropping the socket closes it
                };
                let metrics = metrics.clone();
                let health = health.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = connection(sock, &metrics, &health).await {
                        tracing::debug!(error = %e, "metrics connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!("metrics endpoint stopped");
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra_headers: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            content_type: TEXT,
            extra_headers: "",
            body: body.into(),
        }
    }
}

async fn connection(
    mut sock: TcpStream,
    metrics: &Metrics,
    health: &Health,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&chunk[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(true);
            }
        }
    })
    .await;
    let complete = match read {
        Ok(r) => r?,
        Err(_) => return Ok(()), // too slow: just close
    };
    let (response, head_only) = if !complete {
        return Ok(());
    } else if head.len() > MAX_HEAD {
        (
            Response::text(
                431,
                "Request Header Fields Too Large",
                "request head too large\n",
            ),
            false,
        )
    } else {
        let text = String::from_utf8_lossy(&head);
        let mut words = text.lines().next().unwrap_or("").split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        (route(method, path, metrics, health).await, method == "HEAD")
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
        response.status,
        response.reason,
        response.content_type,
        response.body.len(),
        response.extra_headers,
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    sock.write_all(&out).await?;
    sock.shutdown().await
}

async fn route(method: &str, path: &str, metrics: &Metrics, health: &Health) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response {
            extra_headers: "Allow: GET, HEAD\r\n",
            ..Response::text(405, "Method Not Allowed", "only GET\n")
        };
    }
    match path {
        "/metrics" => Response {
            content_type: METRICS_CONTENT_TYPE,
            ..Response::text(200, "OK", metrics.render())
        },
        "/healthz" => Response::text(200, "OK", "ok\n"),
        "/readyz" => {
            let reasons = health.not_ready().await;
            if reasons.is_empty() {
                Response::text(200, "OK", "ok\n")
            } else {
                let mut body = reasons.join("\n");
                body.push('\n');
                Response::text(503, "Service Unavailable", body)
            }
        }
        _ => Response::text(
            404,
            "Not Found",
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn counters_and_labels() {
        let m = Metrics::new();
        m.command_finished(
            Some(CommandKind::Create),
            CommandOutcome::Stored,
            Duration::from_millis(3),
        );
        m.command_finished(
            Some(CommandKind::PatchMeta),
            CommandOutcome::Rejected,
            Duration::from_millis(1),
        );
        m.dead_letter("invalid_request");
        m.dead_letter("something_else");
        m.request("get", None, Duration::from_micros(200));
        m.request("get", Some("not_found"), Duration::from_micros(300));
        m.request("nope", None, Duration::ZERO);
        m.conflicts(2);
        m.store_error(&StoreError::Unavailable("x".into()));
        m.store_error(&StoreError::NotFound(
            RunId::parse("run_000000000000").unwrap(),
        ));
        let _g = m.command_started();
        let t = m.render();
        let v = |s: &str| value(&t, s).unwrap_or_else(|| panic!("{s} missing:\n{t}"));
        assert_eq!(
            v(r#"rmos_commands_total{subject="create",outcome="stored"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_commands_total{subject="patch_meta",outcome="rejected"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_commands_total{subject="delete",outcome="retried"}"#),
            "0"
        );
        assert!(!t.contains(r#"subject="unknown""#));
        assert_eq!(v(r#"rmos_requests_total{endpoint="get",code="ok"}"#), "1");
        assert_eq!(
            v(r#"rmos_requests_total{endpoint="get",code="not_found"}"#),
            "1"
        );
        assert_eq!(v(r#"rmos_dead_letters_total{code="invalid_request"}"#), "1");
        assert_eq!(v(r#"rmos_dead_letters_total{code="internal"}"#), "1");
        assert_eq!(v("rmos_conflict_retries_total"), "2");
        assert_eq!(v(r#"rmos_store_errors_total{kind="unavailable"}"#), "1");
        assert_eq!(v("rmos_in_flight_commands"), "1");
        assert!(t.contains(&format!(
            "rmos_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert_eq!(
            v(r#"rmos_command_duration_seconds_bucket{subject="create",le="0.0025"}"#),
            "0"
        );
        assert_eq!(
            v(r#"rmos_command_duration_seconds_bucket{subject="create",le="0.005"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_command_duration_seconds_bucket{subject="create",le="+Inf"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_command_duration_seconds_count{subject="create"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_command_duration_seconds_sum{subject="create"}"#),
            "0.003"
        );
        assert_eq!(
            serde_json::Value::Object(m.request_errors("get")),
            serde_json::json!({"not_found": 1})
        );
        drop(_g);
        assert_eq!(value(&m.render(), "rmos_in_flight_commands").unwrap(), "0");
    }

    #[test]
    fn exposition_is_well_formed() {
        let t = Metrics::new().render();
        let mut typed = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_owned()), "{name} typed twice");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            value.parse::<f64>().expect(line);
            let name = series.split('{').next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
                .unwrap_or(name);
            assert!(typed.contains(base), "{name} has no TYPE line");
        }
    }
}
