//! Prometheus metrics, served by the HTTP transport at `/metrics`.
//!
//! Built on `prometheus-client`: one [`Registry`] encoded as OpenMetrics text. Every series of
//! the NATS side has a fixed label set known at compile time (command kinds, endpoints,
//! protocol error codes, store error kinds, tasks), so those series are created up front (a
//! scrape shows them at zero from the start) and their handles kept in arrays: the hot path is
//! an atomic add (a histogram's own short mutex for durations), without a `Family` lookup. The
//! HTTP series are looked up in their `Family` per request; their labels are bounded (route
//! patterns, a fixed method list, status codes).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

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

/// `subject` label values of the command kinds (always exposed).
const SUBJECTS: [&str; 4] = ["create", "patch_meta", "advisory", "delete"];
/// `subject` of a message on a subject that is not a command subject; its series are created
/// (and so exposed) only when it happens.
const UNKNOWN_SUBJECT: &str = "unknown";
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
pub const TASKS: [&str; 5] = ["ingest", "requests", "retention", "scrub", "index-fold"];
/// `body` label values of the claim-check series: which staged body (`outputs.gcode_ref`,
/// `outputs.opplan_ref`, an advisory's `body_ref`).
const CLAIM_BODIES: [&str; 3] = ["gcode", "opplan", "advisory"];
/// `outcome` label values of `rmos_claims_total`.
const CLAIM_OUTCOMES: [&str; 2] = ["claimed", "rejected"];
/// Upper bounds (seconds) of the duration histograms' buckets (`+Inf` is implicit).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// `method` label values of the HTTP series; any other method counts as `other`, so a client
/// cannot grow the label set.
const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

fn subject_index(kind: CommandKind) -> usize {
    match kind {
        CommandKind::Create => 0,
        CommandKind::PatchMeta => 1,
        CommandKind::Advisory => 2,
        CommandKind::Delete => 3,
    }
}

/// The `body` label of a staged body's field (`outputs.gcode_ref`, ...).
fn claim_body_index(field: &str) -> usize {
    match field {
        "outputs.gcode_ref" => 0,
        "outputs.opplan_ref" => 1,
        _ => 2,
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

fn http_method(method: &str) -> &'static str {
    HTTP_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A family of duration histograms with [`BUCKETS`].
type Durations<L> = Family<L, Histogram, fn() -> Histogram>;

fn durations<L: Clone + std::hash::Hash + Eq>() -> Durations<L> {
    Family::new_with_constructor(duration_histogram)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    subject: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubjectLabels {
    subject: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimLabels {
    body: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BodyLabels {
    body: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The metrics registry: one per process, shared by ingest, the API, the supervisor and the
/// HTTP server.
pub struct Metrics {
    registry: Registry,
    /// The families behind `commands` and `command_duration`, for the `unknown` subject.
    command_family: Family<CommandLabels, Counter>,
    command_duration_family: Durations<SubjectLabels>,
    /// Per command subject ([`SUBJECTS`]), per [`CommandOutcome`].
    commands: [[Counter; CommandOutcome::ALL.len()]; SUBJECTS.len()],
    command_duration: [Histogram; SUBJECTS.len()],
    /// Per endpoint: `ok`, then one per entry of [`CODES`].
    requests: [[Counter; CODES.len() + 1]; ENDPOINTS.len()],
    request_duration: [Histogram; ENDPOINTS.len()],
    conflict_retries: Counter,
    redeliveries: Counter,
    dead_letters: [Counter; CODES.len()],
    store_errors: [Counter; STORE_KINDS.len()],
    in_flight: Gauge,
    broker_state_recreated: Counter,
    /// Per [`CLAIM_BODIES`], per [`CLAIM_OUTCOMES`].
    claims: [[Counter; CLAIM_OUTCOMES.len()]; CLAIM_BODIES.len()],
    claimed_bytes: [Counter; CLAIM_BODIES.len()],
    task_restarts: [Counter; TASKS.len()],
    scrub_checked: Counter,
    scrub_broken_found: Counter,
    scrub_broken: Gauge,
    scrub_passes: Counter,
    /// Broken runs found so far in the pass under way.
    scrub_pass_broken: std::sync::Mutex<i64>,
    http_requests: Family<HttpLabels, Counter>,
    http_request_duration: Durations<RouteLabels>,
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
        self.0.in_flight.dec();
    }
}

/// Creates the series of `labels` in `family` and returns its handle (sharing its value).
fn series<L, M, C>(family: &Family<L, M, C>, labels: L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create_owned(&labels)
}

/// Registers `metric` under `name` and returns its handle (sharing its value).
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        // Help texts carry no final full stop: the registry appends one.
        let mut registry = Registry::default();

        let command_family = Family::<CommandLabels, Counter>::default();
        let commands = std::array::from_fn(|s| {
            CommandOutcome::ALL.map(|o| {
                series(
                    &command_family,
                    CommandLabels {
                        subject: SUBJECTS[s],
                        outcome: o.as_str(),
                    },
                )
            })
        });
        registry.register(
            "rmos_commands",
            "Commands processed, by command and outcome (stored, unchanged, rejected, retried, failed)",
            command_family.clone(),
        );

        let command_duration_family = durations::<SubjectLabels>();
        let command_duration =
            SUBJECTS.map(|subject| series(&command_duration_family, SubjectLabels { subject }));
        registry.register(
            "rmos_command_duration_seconds",
            "Time from receiving a command to acking (or negatively acking) it",
            command_duration_family.clone(),
        );

        let request_family = Family::<RequestLabels, Counter>::default();
        let requests = ENDPOINTS.map(|endpoint| {
            std::array::from_fn(|c| {
                let code = if c == 0 { "ok" } else { CODES[c - 1] };
                series(&request_family, RequestLabels { endpoint, code })
            })
        });
        registry.register(
            "rmos_requests",
            "Requests answered, by endpoint and code (ok or the protocol error code)",
            request_family,
        );

        let request_duration_family = durations::<EndpointLabels>();
        let request_duration =
            ENDPOINTS.map(|endpoint| series(&request_duration_family, EndpointLabels { endpoint }));
        registry.register(
            "rmos_request_duration_seconds",
            "Time to answer a request",
            request_duration_family,
        );

        let conflict_retries = registered(
            &mut registry,
            "rmos_conflict_retries",
            "Conditional writes that lost a race to another writer and were retried",
            Counter::default(),
        );

        let redeliveries = registered(
            &mut registry,
            "rmos_redeliveries",
            "JetStream commands received more than once (delivered > 1)",
            Counter::default(),
        );

        let dead_letter_family = Family::<CodeLabels, Counter>::default();
        let dead_letters = CODES.map(|code| series(&dead_letter_family, CodeLabels { code }));
        registry.register(
            "rmos_dead_letters",
            "Commands kept as dead letters, by protocol error code",
            dead_letter_family,
        );

        let store_error_family = Family::<KindLabels, Counter>::default();
        let store_errors = STORE_KINDS.map(|kind| series(&store_error_family, KindLabels { kind }));
        registry.register(
            "rmos_store_errors",
            "Failed store operations, by kind",
            store_error_family,
        );

        let broker_state_recreated = registered(
            &mut registry,
            "rmos_broker_state_recreated",
            "Times the stream or the durable consumer was found missing on the broker and re-created",
            Counter::default(),
        );

        let claim_family = Family::<ClaimLabels, Counter>::default();
        let claims = CLAIM_BODIES.map(|body| {
            CLAIM_OUTCOMES.map(|outcome| series(&claim_family, ClaimLabels { body, outcome }))
        });
        registry.register(
            "rmos_claims",
            "Staged bodies (claim checks) the worker streamed into the store, by body (gcode, opplan, advisory) and outcome (claimed, rejected: hash, size or canonical form not as claimed, or no such object)",
            claim_family,
        );
        let claimed_bytes_family = Family::<BodyLabels, Counter>::default();
        let claimed_bytes =
            CLAIM_BODIES.map(|body| series(&claimed_bytes_family, BodyLabels { body }));
        registry.register(
            "rmos_claimed_bytes",
            "Bytes of staged bodies read from the staging bucket into the store, by body",
            claimed_bytes_family,
        );

        let task_family = Family::<TaskLabels, Counter>::default();
        let task_restarts = TASKS.map(|task| series(&task_family, TaskLabels { task }));
        registry.register(
            "rmos_task_restarts",
            "Supervised tasks (ingest, requests, retention, scrub) that ended or panicked and were restarted",
            task_family,
        );

        let scrub_checked = registered(
            &mut registry,
            "rmos_scrub_runs_checked",
            "Runs the background scrub checked (content hashes, blobs, hash chain, signatures)",
            Counter::default(),
        );
        let scrub_broken_found = registered(
            &mut registry,
            "rmos_scrub_runs_failed",
            "Checks of the background scrub that found a run failing verification (a run broken for two passes counts twice)",
            Counter::default(),
        );
        let scrub_broken = registered(
            &mut registry,
            "rmos_scrub_broken_runs",
            "Runs failing verification: as many as the last complete scrub pass found, or the pass under way once it has found more",
            Gauge::default(),
        );
        let scrub_passes = registered(
            &mut registry,
            "rmos_scrub_passes",
            "Background scrub passes completed",
            Counter::default(),
        );

        let in_flight = registered(
            &mut registry,
            "rmos_in_flight_commands",
            "Commands being processed now",
            Gauge::default(),
        );

        registry.register(
            "rmos_build",
            "The build; the version is in the label",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );

        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "rmos_http_requests",
            "HTTP requests answered, by route (the matched path pattern, or unmatched), method and status",
            http_requests.clone(),
        );

        let http_request_duration = durations::<RouteLabels>();
        registry.register(
            "rmos_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            http_request_duration.clone(),
        );

        Arc::new(Self {
            registry,
            command_family,
            command_duration_family,
            commands,
            command_duration,
            requests,
            request_duration,
            conflict_retries,
            redeliveries,
            dead_letters,
            store_errors,
            in_flight,
            broker_state_recreated,
            claims,
            claimed_bytes,
            task_restarts,
            scrub_checked,
            scrub_broken_found,
            scrub_broken,
            scrub_passes,
            scrub_pass_broken: std::sync::Mutex::new(0),
            http_requests,
            http_request_duration,
        })
    }

    /// A command starts; it counts as in flight until the guard is dropped.
    pub fn command_started(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(self)
    }

    /// Commands being processed now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// A command (`None`: not on a command subject) ended with `outcome` after `elapsed`.
    pub fn command_finished(
        &self,
        kind: Option<CommandKind>,
        outcome: CommandOutcome,
        elapsed: Duration,
    ) {
        let secs = elapsed.as_secs_f64();
        match kind {
            Some(kind) => {
                let s = subject_index(kind);
                self.commands[s][outcome.index()].inc();
                self.command_duration[s].observe(secs);
            }
            None => {
                // Rare (a stray subject): the family lookup creates the series on first use.
                self.command_family
                    .get_or_create(&CommandLabels {
                        subject: UNKNOWN_SUBJECT,
                        outcome: outcome.as_str(),
                    })
                    .inc();
                self.command_duration_family
                    .get_or_create(&SubjectLabels {
                        subject: UNKNOWN_SUBJECT,
                    })
                    .observe(secs);
            }
        }
    }

    /// A JetStream message arrived with `delivered > 1`.
    pub fn redelivered(&self) {
        self.redeliveries.inc();
    }

    /// Conditional writes that lost a race and were retried (`Outcome::conflicts`).
    pub fn conflicts(&self, n: u32) {
        if n > 0 {
            self.conflict_retries.inc_by(u64::from(n));
        }
    }

    /// A command was kept as a dead letter with protocol code `code`.
    pub fn dead_letter(&self, code: &str) {
        self.dead_letters[code_index(code)].inc();
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
        self.store_errors[kind].inc();
    }

    /// The stream or the durable consumer was missing on the broker and was re-created.
    pub fn broker_state_recreated(&self) {
        self.broker_state_recreated.inc();
    }

    /// The staged body named by `field` (`outputs.gcode_ref`, `outputs.opplan_ref`,
    /// `body_ref`) was claimed, `bytes` read from the bucket (0: it was already stored).
    pub fn claimed(&self, field: &str, bytes: u64) {
        let b = claim_body_index(field);
        self.claims[b][0].inc();
        self.claimed_bytes[b].inc_by(bytes);
    }

    /// The staged body named by `field` was rejected (the command with it).
    pub fn claim_rejected(&self, field: &str) {
        self.claims[claim_body_index(field)][1].inc();
    }

    /// A supervised task (one of [`TASKS`]) ended or panicked and is restarted.
    pub fn task_restarted(&self, task: &str) {
        if let Some(i) = TASKS.iter().position(|t| *t == task) {
            self.task_restarts[i].inc();
        }
    }

    /// A request on `endpoint` was answered: `error` is the protocol code, `None` for success.
    pub fn request(&self, endpoint: &str, error: Option<&str>, elapsed: Duration) {
        let Some(e) = endpoint_index(endpoint) else {
            return;
        };
        let c = error.map_or(0, |code| code_index(code) + 1);
        self.requests[e][c].inc();
        self.request_duration[e].observe(elapsed.as_secs_f64());
    }

    /// An HTTP request on `route` (the matched path pattern, or `unmatched`) was answered with
    /// `status` after `elapsed`. `route` must come from a bounded set (never the raw path):
    /// each value is a series of its own. Methods outside the standard ones count as `other`.
    pub fn http_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                method: http_method(method),
                status,
            })
            .inc();
        self.http_request_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Error replies of `endpoint` by protocol code (non-zero only), for `$SRV.STATS` data.
    pub fn request_errors(&self, endpoint: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        if let Some(e) = endpoint_index(endpoint) {
            for (i, code) in CODES.iter().enumerate() {
                let n = self.requests[e][i + 1].get();
                if n > 0 {
                    out.insert((*code).to_owned(), n.into());
                }
            }
        }
        out
    }

    /// The exposition in the OpenMetrics text format (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail; an encoder refusal would be a bug here, and a
        // truncated exposition (no `# EOF`) makes the scrape fail visibly.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics: encoding the exposition failed");
        }
        out
    }
}

/// The scrub's findings as metrics. The gauge rises as soon as a pass finds more broken runs
/// than the last complete one, and is set to the pass's count when it ends (a repaired run
/// stops counting then).
impl crate::store::scrub::ScrubObserver for Metrics {
    fn checked(&self, check: &crate::store::history::RunCheck) {
        self.scrub_checked.inc();
        if !check.ok {
            self.scrub_broken_found.inc();
            if let Ok(mut pass) = self.scrub_pass_broken.lock() {
                *pass += 1;
                if *pass > self.scrub_broken.get() {
                    self.scrub_broken.set(*pass);
                }
            }
        }
    }

    fn pass_done(&self, _checked: u64, broken: u64) {
        self.scrub_passes.inc();
        self.scrub_broken
            .set(i64::try_from(broken).unwrap_or(i64::MAX));
        if let Ok(mut pass) = self.scrub_pass_broken.lock() {
            *pass = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::RunId;
    use std::collections::{HashMap, HashSet};

    /// `name{labels}` with its labels sorted, so that a lookup does not depend on the order
    /// the encoder writes them in (it puts `le` first). Label values may hold `,` and braces.
    fn canonical(series: &str) -> String {
        let Some((name, rest)) = series.split_once('{') else {
            return series.to_owned();
        };
        let body = rest.strip_suffix('}').expect(series);
        let (mut labels, mut current) = (Vec::new(), String::new());
        let (mut quoted, mut escaped) = (false, false);
        for c in body.chars() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    labels.push(std::mem::take(&mut current));
                    continue;
                }
                _ => {}
            }
            current.push(c);
        }
        if !current.is_empty() {
            labels.push(current);
        }
        labels.sort();
        format!("{name}{{{}}}", labels.join(","))
    }

    /// Series (labels sorted) -> value as written, of every sample line.
    fn samples(text: &str) -> HashMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, v) = l.rsplit_once(' ').expect(l);
                (canonical(series), v.to_owned())
            })
            .collect()
    }

    fn value(text: &str, series: &str) -> Option<String> {
        samples(text).remove(&canonical(series))
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
        m.task_restarted("retention");
        m.task_restarted("nope");
        m.broker_state_recreated();
        m.redelivered();
        m.claimed("outputs.gcode_ref", 3_000_000);
        m.claimed("body_ref", 10);
        m.claim_rejected("body_ref");
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
        assert_eq!(
            v(r#"rmos_request_duration_seconds_count{endpoint="get"}"#),
            "2"
        );
        assert_eq!(v(r#"rmos_dead_letters_total{code="invalid_request"}"#), "1");
        assert_eq!(v(r#"rmos_dead_letters_total{code="internal"}"#), "1");
        assert_eq!(v("rmos_conflict_retries_total"), "2");
        assert_eq!(v("rmos_redeliveries_total"), "1");
        assert_eq!(v("rmos_broker_state_recreated_total"), "1");
        assert_eq!(v(r#"rmos_task_restarts_total{task="retention"}"#), "1");
        assert_eq!(v(r#"rmos_task_restarts_total{task="ingest"}"#), "0");
        assert_eq!(v(r#"rmos_store_errors_total{kind="unavailable"}"#), "1");
        assert_eq!(v(r#"rmos_store_errors_total{kind="corrupt"}"#), "0");
        assert_eq!(v("rmos_in_flight_commands"), "1");
        assert_eq!(
            v(r#"rmos_claims_total{body="gcode",outcome="claimed"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_claims_total{body="advisory",outcome="rejected"}"#),
            "1"
        );
        assert_eq!(
            v(r#"rmos_claims_total{body="opplan",outcome="claimed"}"#),
            "0"
        );
        assert_eq!(v(r#"rmos_claimed_bytes_total{body="gcode"}"#), "3000000");
        assert_eq!(v(r#"rmos_claimed_bytes_total{body="advisory"}"#), "10");
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
        assert_eq!(m.in_flight(), 1);
        drop(_g);
        assert_eq!(m.in_flight(), 0);
        assert_eq!(value(&m.render(), "rmos_in_flight_commands").unwrap(), "0");
    }

    #[test]
    fn fixed_series_are_present_at_zero_from_the_start() {
        let s = samples(&Metrics::new().render());
        let count = |prefix: &str| s.keys().filter(|k| k.starts_with(prefix)).count();
        // 4 subjects x 5 outcomes; 5 endpoints x (ok + 8 codes); one per code, kind, task.
        assert_eq!(count("rmos_commands_total{"), 20);
        assert_eq!(count("rmos_requests_total{"), 45);
        assert_eq!(count("rmos_dead_letters_total{"), 8);
        assert_eq!(count("rmos_store_errors_total{"), 6);
        assert_eq!(count("rmos_task_restarts_total{"), TASKS.len());
        // 3 bodies x 2 outcomes; bytes per body.
        assert_eq!(count("rmos_claims_total{"), 6);
        assert_eq!(count("rmos_claimed_bytes_total{"), 3);
        // 14 bounds + `+Inf`, per subject and per endpoint.
        assert_eq!(count("rmos_command_duration_seconds_bucket{"), 4 * 15);
        assert_eq!(count("rmos_request_duration_seconds_bucket{"), 5 * 15);
        for name in [
            "rmos_conflict_retries_total",
            "rmos_redeliveries_total",
            "rmos_broker_state_recreated_total",
            "rmos_in_flight_commands",
        ] {
            assert_eq!(s.get(name).map(String::as_str), Some("0"), "{name}");
        }
        let nonzero: Vec<_> = s
            .iter()
            .filter(|(k, v)| v.parse::<f64>() != Ok(0.0) && !k.starts_with("rmos_build_info{"))
            .collect();
        assert!(nonzero.is_empty(), "{nonzero:?}");
        // The HTTP series appear with the first request.
        assert_eq!(count("rmos_http_"), 0);
    }

    #[test]
    fn bucket_bounds() {
        let t = Metrics::new().render();
        let bounds: Vec<f64> = t
            .lines()
            .filter(|l| {
                l.starts_with("rmos_request_duration_seconds_bucket{")
                    && l.contains(r#"endpoint="get""#)
            })
            .map(|l| {
                let (_, rest) = l.split_once(r#"le=""#).expect(l);
                let (le, _) = rest.split_once('"').expect(l);
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect(le)
                }
            })
            .collect();
        let mut expected = BUCKETS.to_vec();
        expected.push(f64::INFINITY);
        assert_eq!(bounds, expected);
    }

    #[test]
    fn unknown_subject_appears_once_used() {
        let m = Metrics::new();
        m.command_finished(None, CommandOutcome::Rejected, Duration::from_millis(2));
        let t = m.render();
        assert_eq!(
            value(
                &t,
                r#"rmos_commands_total{subject="unknown",outcome="rejected"}"#
            )
            .as_deref(),
            Some("1"),
            "{t}"
        );
        assert_eq!(
            value(
                &t,
                r#"rmos_command_duration_seconds_count{subject="unknown"}"#
            )
            .as_deref(),
            Some("1"),
            "{t}"
        );
        // The known subjects are untouched.
        assert_eq!(
            value(
                &t,
                r#"rmos_commands_total{subject="create",outcome="rejected"}"#
            )
            .as_deref(),
            Some("0")
        );
    }

    #[test]
    fn http_requests_by_route_method_and_status() {
        let m = Metrics::new();
        let route = "/api/rmos/runs/{run_id}";
        m.http_request(route, "GET", 200, Duration::from_millis(2));
        m.http_request(route, "GET", 200, Duration::from_millis(20));
        m.http_request(route, "PATCH", 404, Duration::from_millis(1));
        m.http_request("unmatched", "BREW", 404, Duration::from_micros(100));
        let t = m.render();
        let v = |s: &str| value(&t, s).unwrap_or_else(|| panic!("{s} missing:\n{t}"));
        assert_eq!(
            v(
                r#"rmos_http_requests_total{route="/api/rmos/runs/{run_id}",method="GET",status="200"}"#
            ),
            "2"
        );
        assert_eq!(
            v(
                r#"rmos_http_requests_total{route="/api/rmos/runs/{run_id}",method="PATCH",status="404"}"#
            ),
            "1"
        );
        // A made-up method does not become a label value of its own.
        assert_eq!(
            v(r#"rmos_http_requests_total{route="unmatched",method="other",status="404"}"#),
            "1"
        );
        assert!(!t.contains("BREW"));
        assert_eq!(
            v(r#"rmos_http_request_duration_seconds_count{route="/api/rmos/runs/{run_id}"}"#),
            "3"
        );
        assert_eq!(
            v(
                r#"rmos_http_request_duration_seconds_bucket{route="/api/rmos/runs/{run_id}",le="0.005"}"#
            ),
            "2"
        );
        assert_eq!(
            v(r#"rmos_http_request_duration_seconds_bucket{route="unmatched",le="0.0005"}"#),
            "1"
        );
    }

    /// The OpenMetrics shape: `# EOF` last, one HELP and TYPE per family before its samples,
    /// each sample named as its type requires.
    #[test]
    fn exposition_is_well_formed_openmetrics() {
        let m = Metrics::new();
        m.http_request("/healthz", "GET", 200, Duration::ZERO);
        m.command_finished(None, CommandOutcome::Failed, Duration::ZERO);
        let t = m.render();
        let body = t.strip_suffix("# EOF\n").expect("ends with # EOF");
        let mut typed: HashMap<String, String> = HashMap::new();
        let mut helped = HashSet::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect(line);
                assert!(helped.insert(name.to_owned()), "{name} has two HELP lines");
                assert!(help.ends_with('.') && !help.ends_with(".."), "{line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert!(helped.contains(name), "{name}: TYPE before HELP");
                let previous = typed.insert(name.to_owned(), kind.to_owned());
                assert!(previous.is_none(), "{name} typed twice");
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect(line);
            value.parse::<f64>().expect(line);
            let name = series.split('{').next().unwrap();
            let suffixes: &[&str] = &["_total", "_info", "_bucket", "_sum", "_count", ""];
            let (base, kind) = suffixes
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    Some((base, typed.get(base)?))
                })
                .unwrap_or_else(|| panic!("{name} has no TYPE line before it"));
            let suffix = &name[base.len()..];
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "gauge" => &[""],
                "info" => &["_info"],
                "histogram" => &["_bucket", "_sum", "_count"],
                other => panic!("{name}: unexpected type {other}"),
            };
            assert!(allowed.contains(&suffix), "{name} is not a {kind} sample");
        }
        let kinds: Vec<(&str, &str)> = vec![
            ("rmos_commands", "counter"),
            ("rmos_command_duration_seconds", "histogram"),
            ("rmos_requests", "counter"),
            ("rmos_request_duration_seconds", "histogram"),
            ("rmos_conflict_retries", "counter"),
            ("rmos_redeliveries", "counter"),
            ("rmos_dead_letters", "counter"),
            ("rmos_store_errors", "counter"),
            ("rmos_broker_state_recreated", "counter"),
            ("rmos_claims", "counter"),
            ("rmos_claimed_bytes", "counter"),
            ("rmos_task_restarts", "counter"),
            ("rmos_scrub_runs_checked", "counter"),
            ("rmos_scrub_runs_failed", "counter"),
            ("rmos_scrub_broken_runs", "gauge"),
            ("rmos_scrub_passes", "counter"),
            ("rmos_in_flight_commands", "gauge"),
            ("rmos_build", "info"),
            ("rmos_http_requests", "counter"),
            ("rmos_http_request_duration_seconds", "histogram"),
        ];
        for (name, kind) in &kinds {
            assert_eq!(typed.get(*name).map(String::as_str), Some(*kind), "{name}");
        }
        assert_eq!(typed.len(), kinds.len(), "{typed:?}");
    }
}
