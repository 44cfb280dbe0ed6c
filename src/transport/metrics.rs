//! Prometheus metrics, served by the HTTP transport at `/metrics`.
//!
//! Every series has a fixed label set known at compile time (command kinds, endpoints,
//! protocol error codes, store error kinds), so the registry is plain atomics: no locks on the
//! hot path, no unbounded label cardinality, and the exposition is written by hand in the
//! Prometheus text format 0.0.4.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::domain::command::CommandKind;
use crate::store::StoreError;

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
/// `task` label values of `rmos_task_restarts_total`: the supervised tasks.
pub const TASKS: [&str; 3] = ["ingest", "requests", "retention"];
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
    broker_state_recreated: AtomicU64,
    task_restarts: [AtomicU64; TASKS.len()],
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
            broker_state_recreated: AtomicU64::new(0),
            task_restarts: counters(),
        })
    }

    /// A command starts; it counts as in flight until the guard is dropped.
    pub fn command_started(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Commands being processed now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
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

    /// The stream or the durable consumer was missing on the broker and was re-created.
    pub fn broker_state_recreated(&self) {
        self.broker_state_recreated.fetch_add(1, Ordering::Relaxed);
    }

    /// A supervised task (one of [`TASKS`]) ended or panicked and is restarted.
    pub fn task_restarted(&self, task: &str) {
        if let Some(i) = TASKS.iter().position(|t| *t == task) {
            self.task_restarts[i].fetch_add(1, Ordering::Relaxed);
        }
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

    /// An HTTP request on `route` (the matched path pattern, or `unmatched`) was answered with
    /// `status` after `elapsed`.
    pub fn http_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let _ = (route, method, status, elapsed);
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
            "rmos_broker_state_recreated_total",
            "counter",
            "Times the stream or the durable consumer was found missing on the broker and re-created.",
        );
        let _ = writeln!(
            out,
            "rmos_broker_state_recreated_total {}",
            load(&self.broker_state_recreated)
        );
        header(
            &mut out,
            "rmos_task_restarts_total",
            "counter",
            "Supervised tasks (ingest, requests, retention) that ended or panicked and were restarted.",
        );
        for (i, task) in TASKS.iter().enumerate() {
            let _ = writeln!(
                out,
                "rmos_task_restarts_total{{task=\"{task}\"}} {}",
                load(&self.task_restarts[i])
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::RunId;

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
