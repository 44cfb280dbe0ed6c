//! Command ingestion: a durable JetStream pull consumer (or core queue subscriptions),
//! decode → store → event → ack, with bounded concurrency and per-run serialization.
//!
//! A message is acked only after its effect is stored and its `stored` event published; while
//! a command is being worked on, the broker is told so every third of `ack_wait`.
//! Store trouble is never turned into a rejection: the message is negatively acked with a
//! growing delay and comes back. A command that can never succeed is kept as a dead letter,
//! announced on `rejected`, and acked, so a poison message never stalls the consumer.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{Mutex, watch};
use tracing::Instrument;

use super::events::{self, RejectedEvent, Source};
use super::metrics::{CommandOutcome, Metrics};
use super::{Subjects, WireError, msg_id, request_id};
use crate::domain::artifact::Timestamp;
use crate::domain::command::{Command, CommandKind, Context, Limits, StreamPosition};
use crate::domain::error::RejectCode;
use crate::domain::ids::{CommandId, RequestId, RunId};
use crate::store::{Outcome, RunStore, StoreError};

/// Runs `work` while telling the broker, every third of `ack_wait`, that the message is still
/// being worked on, so that a slow store does not get it redelivered to another worker
/// meanwhile (which would do the work twice, and let a late first ack pass the copy).
async fn in_progress<T>(
    msg: &jetstream::Message,
    ack_wait: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = beat.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "in-progress signal not sent");
                }
            }
        }
    }
}

/// How often the consumer's ack floor is read.
const ACK_FLOOR_POLL: Duration = Duration::from_secs(1);

/// Ingestion settings.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// Stream name.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Commands in flight at once.
    pub concurrency: usize,
    /// Stream replicas.
    pub replicas: usize,
    /// Stream max age (zero: until acked).
    pub max_age: Duration,
    /// Ack wait.
    pub ack_wait: Duration,
    /// Max deliveries (-1: unlimited).
    pub max_deliver: i64,
    /// How long after the consumer's ack floor passed a command its id is still remembered.
    pub forget_acked_after: Duration,
    /// Domain limits.
    pub limits: Limits,
    /// Deliveries a patch/advisory for an unknown run is retried before it is rejected.
    pub not_found_retries: i64,
}

/// Why ingestion could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The stream or consumer could not be set up.
    #[error("jetstream setup: {0}")]
    Setup(String),
    /// A subscription failed.
    #[error("subscribe: {0}")]
    Subscribe(String),
}

/// Serializes commands for the same run inside one process, so a worker does not race itself
/// (other processes are handled by the store's conditional writes).
struct RunLocks {
    stripes: Vec<Mutex<()>>,
}

impl RunLocks {
    fn new() -> Self {
        Self {
            stripes: (0..1024).map(|_| Mutex::new(())).collect(),
        }
    }
    fn for_run(&self, id: &RunId) -> &Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        &self.stripes[(h.finish() as usize) % self.stripes.len()]
    }
}

/// What became of a command.
enum Verdict {
    /// Stored (or already stored): announce and ack.
    Done(Outcome),
    /// Can never succeed: dead-letter, announce and ack.
    Reject(WireError, Option<RunId>),
    /// May succeed later: redeliver.
    Retry(WireError),
}

#[derive(Serialize)]
struct DeadLetter<'a> {
    received_at: Timestamp,
    subject: &'a str,
    request_id: &'a RequestId,
    code: &'static str,
    message: &'a str,
    headers: Vec<(String, String)>,
    /// The payload as UTF-8 text when it is, else hex.
    payload_text: Option<String>,
    payload_hex: Option<String>,
    source: &'a Source,
}

/// The command-processing worker.
pub struct Ingest {
    client: Client,
    store: RunStore,
    subjects: Subjects,
    settings: IngestSettings,
    locks: RunLocks,
    metrics: Arc<Metrics>,
    /// "Run not found yet" results per stream sequence: only these use up a patch's or an
    /// advisory's waiting budget, not deliveries that failed for other reasons (store down).
    not_found: std::sync::Mutex<std::collections::HashMap<u64, i64>>,
    /// The consumer's ack floor as it was `forget_acked_after` ago (0: not known yet).
    acked_through: AtomicU64,
}

impl Ingest {
    /// A worker over `client` and `store`.
    pub fn new(
        client: Client,
        store: RunStore,
        subjects: Subjects,
        settings: IngestSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            store,
            subjects,
            settings,
            locks: RunLocks::new(),
            not_found: std::sync::Mutex::new(std::collections::HashMap::new()),
            acked_through: AtomicU64::new(0),
            metrics,
        })
    }

    /// Ensures the stream and the durable consumer exist.
    pub async fn ensure_stream(&self) -> Result<consumer::PullConsumer, IngestError> {
        let js = jetstream::new(self.client.clone());
        let s = &self.settings;
        let stream = js
            .get_or_create_stream(stream::Config {
                name: s.stream.clone(),
                subjects: self.subjects.commands(),
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::WorkQueue,
                num_replicas: s.replicas,
                max_age: s.max_age,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| IngestError::Setup(format!("stream {}: {e}", s.stream)))?;
        stream
            .get_or_create_consumer(
                &s.consumer,
                consumer::pull::Config {
                    durable_name: Some(s.consumer.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: s.ack_wait,
                    max_deliver: s.max_deliver,
                    max_ack_pending: (s.concurrency * 4) as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| IngestError::Setup(format!("consumer {}: {e}", s.consumer)))
    }

    /// Follows the consumer's ack floor (every message up to it is acknowledged, so never
    /// delivered again) and publishes it as `acked_through` once it is `forget_acked_after`
    /// old: a copy of a message redelivered just before its first delivery's late ack may
    /// still be in another worker's hands for a while. Runs forget the commands at or below
    /// it (`command::remember`), so their records stay small however often they are patched.
    async fn follow_ack_floor(
        self: Arc<Self>,
        consumer: consumer::PullConsumer,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut seen: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut tick = tokio::time::interval(ACK_FLOOR_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match consumer.get_info().await {
                Ok(info) => seen.push_back((Instant::now(), info.ack_floor.stream_sequence)),
                Err(e) => tracing::debug!(error = %e, "consumer info unavailable; ack floor kept"),
            }
            // Stored, not maxed: a floor that goes down means the stream was recreated and
            // its sequences start again.
            while let Some(&(at, floor)) = seen.front()
                && at.elapsed() >= self.settings.forget_acked_after
            {
                self.acked_through.store(floor, Ordering::Relaxed);
                seen.pop_front();
            }
        }
    }

    /// Consumes the stream until `shutdown` turns true, then finishes what it holds.
    ///
    /// Messages are pulled in batches (one pull request of up to twice the concurrency,
    /// expiring after 2 s) and processed as they arrive. On shutdown no new batch is
    /// requested and the current one is finished, so every message delivered to this worker is
    /// acked or negatively acked before it exits: none waits for `ack_wait`.
    pub async fn run_jetstream(
        self: Arc<Self>,
        consumer: consumer::PullConsumer,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        tokio::spawn(
            self.clone()
                .follow_ack_floor(consumer.clone(), shutdown.clone()),
        );
        let batch_size = self.settings.concurrency * 2;
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            let batch = consumer
                .batch()
                .max_messages(batch_size)
                .expires(Duration::from_secs(2))
                // No idle heartbeat: async-nats 0.51's batch stream returns Pending after a
                // heartbeat without a wake-up, stalls until its own timer and then drops what
                // arrived meanwhile (redelivered only after ack_wait).
                .messages()
                .await;
            let batch = match batch {
                Ok(b) => {
                    failures = 0;
                    b
                }
                Err(e) => {
                    failures += 1;
                    let delay = backoff(i64::from(failures.min(6)));
                    tracing::warn!(error = %e, ?delay, "pull request failed; retrying");
                    let mut stop = shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    continue;
                }
            };
            batch
                .for_each_concurrent(self.settings.concurrency, |m| {
                    let this = self.clone();
                    async move {
                        match m {
                            Ok(msg) => this.process_jetstream(msg).await,
                            Err(e) => tracing::debug!(error = %e, "pull batch ended early"),
                        }
                    }
                })
                .await;
        }
        Ok(())
    }

    async fn process_jetstream(&self, msg: jetstream::Message) {
        let (seq, delivered) = match msg.info() {
            Ok(i) => (Some(i.stream_sequence), i.delivered),
            Err(_) => (None, 1),
        };
        let mid = msg_id(msg.headers.as_ref());
        let command_id = mid
            .clone()
            .or_else(|| seq.map(|s| format!("js:{}:{s}", self.settings.stream)));
        let source = Source {
            subject: msg.subject.to_string(),
            stream_seq: seq,
            msg_id: mid,
            delivered: Some(delivered),
        };
        let rid = request_id(msg.headers.as_ref());
        let kind = self.subjects.kind_of(&msg.subject);
        let _in_flight = self.metrics.command_started();
        if delivered > 1 {
            self.metrics.redelivered();
        }
        let span = tracing::error_span!("command", request_id = %rid, subject = %msg.subject,
            stream_seq = seq, delivered, run_id = tracing::field::Empty,
            outcome = tracing::field::Empty, ms = tracing::field::Empty);
        async {
            let started = std::time::Instant::now();
            let verdict = in_progress(
                &msg,
                self.settings.ack_wait,
                self.handle(&msg.message, command_id, &rid, delivered, seq),
            )
            .await;
            let (ack, result) = match verdict {
                Verdict::Done(outcome) => {
                    self.metrics.conflicts(outcome.conflicts);
                    match events::publish_stored(&self.client, &self.subjects, &outcome, &rid, &source).await {
                        Ok(()) => {
                            let result = mark_stored(&outcome, started);
                            tracing::info!(revision = outcome.revision, changed = outcome.changed,
                                conflicts = outcome.conflicts, "stored");
                            (AckKind::Ack, result)
                        }
                        Err(e) => {
                            mark(CommandOutcome::Retried, started);
                            tracing::warn!(error = %e, "stored event not published; redelivering");
                            (AckKind::Nak(Some(Duration::from_secs(1))), CommandOutcome::Retried)
                        }
                    }
                }
                Verdict::Reject(err, run_id) => {
                    match self.reject(&msg.subject, msg.headers.as_ref(), &msg.payload, &rid, &err, run_id.as_ref(), &source).await {
                        Ok(key) => {
                            mark(CommandOutcome::Rejected, started);
                            tracing::warn!(code = err.code, reason = %err.message, dead_letter = %key, "command rejected");
                            (AckKind::Ack, CommandOutcome::Rejected)
                        }
                        Err(e) => {
                            mark(CommandOutcome::Retried, started);
                            tracing::warn!(code = err.code, reason = %err.message, error = %e,
                                "dead letter not stored; redelivering");
                            (AckKind::Nak(Some(backoff(delivered))), CommandOutcome::Retried)
                        }
                    }
                }
                Verdict::Retry(err) => {
                    mark(CommandOutcome::Retried, started);
                    let delay = backoff(delivered);
                    tracing::warn!(code = err.code, error = %err.message, ?delay, "transient failure; redelivering");
                    (AckKind::Nak(Some(delay)), CommandOutcome::Retried)
                }
            };
            if matches!(ack, AckKind::Ack) {
                self.settled(seq);
            }
            if let Err(e) = msg.ack_with(ack).await {
                // The broker redelivers after ack_wait; the effect is idempotent.
                tracing::warn!(error = %e, "ack failed; the command will be redelivered");
            }
            self.metrics.command_finished(kind, result, started.elapsed());
        }
        .instrument(span)
        .await
    }

    /// Counts one more "run not found yet" for the message and returns the count so far.
    /// Without a stream sequence (core mode) the caller's attempt number is the count.
    fn not_found_attempts(&self, seq: Option<u64>, attempt: i64) -> i64 {
        let Some(seq) = seq else { return attempt };
        let Ok(mut map) = self.not_found.lock() else {
            return attempt;
        };
        if map.len() > 100_000 {
            // Entries of messages that never came back (max_age, another worker): forget them;
            // this only makes waiting more lenient.
            map.clear();
        }
        let n = map.entry(seq).or_insert(0);
        *n += 1;
        *n
    }

    /// Forgets the not-found count of a message that reached an outcome.
    fn settled(&self, seq: Option<u64>) {
        if let (Some(seq), Ok(mut map)) = (seq, self.not_found.lock()) {
            map.remove(&seq);
        }
    }

    /// Decodes and applies one command.
    async fn handle(
        &self,
        msg: &async_nats::Message,
        command_id: Option<String>,
        rid: &RequestId,
        delivered: i64,
        seq: Option<u64>,
    ) -> Verdict {
        let (subject, headers, payload) =
            (msg.subject.as_str(), msg.headers.as_ref(), &msg.payload);
        let Some(kind) = self.subjects.kind_of(subject) else {
            return Verdict::Reject(
                WireError::invalid(format!("{subject} is not a command subject")),
                None,
            );
        };
        let mid = msg_id(headers);
        let cmd = match Command::decode_with(kind, payload, mid.as_deref(), &self.settings.limits) {
            Ok(c) => c,
            Err(r) => return Verdict::Reject(WireError::from(&r), None),
        };
        let ctx = Context {
            now: Timestamp::now(),
            request_id: rid.clone(),
            command_id: command_id.and_then(|c| CommandId::parse(&c).ok()),
            stream: seq.map(|seq| StreamPosition {
                seq,
                acked_through: self.acked_through.load(Ordering::Relaxed),
            }),
            limits: self.settings.limits.clone(),
            redelivered: delivered > 1,
        };
        let run_id = cmd.run_id().clone();
        tracing::Span::current().record("run_id", tracing::field::display(&run_id));
        let result = {
            let _guard = self.locks.for_run(&run_id).lock().await;
            self.store.execute(&cmd, &ctx).await
        };
        if let Err(e) = &result {
            self.metrics.store_error(e);
        }
        match result {
            Ok(outcome) => Verdict::Done(outcome),
            Err(StoreError::Rejected(r))
                if r.code == RejectCode::NotFound
                    && matches!(kind, CommandKind::PatchMeta | CommandKind::Advisory)
                    && !r.message.contains("deleted")
                    && self.not_found_attempts(seq, delivered)
                        < self.settings.not_found_retries =>
            {
                // The run's create may still be on its way.
                Verdict::Retry(WireError::from(&r))
            }
            Err(e @ StoreError::Contention { .. }) => Verdict::Retry(WireError::from(&e)),
            Err(e) if e.is_transient() || matches!(e, StoreError::Unusable(_)) => {
                Verdict::Retry(WireError::from(&e))
            }
            Err(e) => Verdict::Reject(WireError::from(&e), Some(run_id)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn reject(
        &self,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        rid: &RequestId,
        err: &WireError,
        run_id: Option<&RunId>,
        source: &Source,
    ) -> Result<String, String> {
        let now = Timestamp::now();
        let letter = DeadLetter {
            received_at: now,
            subject,
            request_id: rid,
            code: err.code,
            message: &err.message,
            headers: headers
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            payload_text: std::str::from_utf8(payload).ok().map(str::to_owned),
            payload_hex: std::str::from_utf8(payload)
                .is_err()
                .then(|| hex::encode(payload)),
            source,
        };
        let name = match source.stream_seq {
            Some(seq) => format!("{}-seq{seq}", now.0.format("%H%M%S%3f")),
            None => format!("{}-{}", now.0.format("%H%M%S%3f"), rid),
        };
        let body = serde_json::to_vec_pretty(&letter).map_err(|e| e.to_string())?;
        let key = self
            .store
            .put_dead_letter(&now, &name, body)
            .await
            .map_err(|e| {
                self.metrics.store_error(&e);
                e.to_string()
            })?;
        self.metrics.dead_letter(err.code);
        let ev = RejectedEvent {
            code: err.code,
            message: &err.message,
            subject,
            request_id: rid,
            run_id,
            dead_letter: Some(&key),
            source,
        };
        events::publish_rejected(&self.client, &self.subjects, &ev)
            .await
            .map_err(|e| e.to_string())?;
        Ok(key.to_string())
    }

    /// Core mode: queue subscriptions on the command subjects; replies with the outcome.
    pub async fn run_core(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let mut subs = Vec::new();
        for subject in self.subjects.commands() {
            subs.push(
                self.client
                    .queue_subscribe(subject.clone(), "rmos-runs".to_owned())
                    .await
                    .map_err(|e| IngestError::Subscribe(format!("{subject}: {e}")))?,
            );
        }
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        futures::stream::select_all(subs)
            .take_until(stop)
            .for_each_concurrent(self.settings.concurrency, |msg| {
                let this = self.clone();
                async move { this.process_core(msg).await }
            })
            .await;
        Ok(())
    }

    async fn process_core(&self, msg: async_nats::Message) {
        let rid = request_id(msg.headers.as_ref());
        let mid = msg_id(msg.headers.as_ref());
        let command_id = mid.clone().or_else(|| {
            Some(format!(
                "sha:{}",
                crate::domain::hashing::sha256_bytes(&msg.payload)
            ))
        });
        let source = Source {
            subject: msg.subject.to_string(),
            stream_seq: None,
            msg_id: mid,
            delivered: None,
        };
        let kind = self.subjects.kind_of(&msg.subject);
        let _in_flight = self.metrics.command_started();
        let span = tracing::error_span!("command", request_id = %rid, subject = %msg.subject,
            run_id = tracing::field::Empty, outcome = tracing::field::Empty,
            ms = tracing::field::Empty);
        async {
            let started = std::time::Instant::now();
            let mut attempt = 1;
            let verdict = loop {
                let v = self
                    .handle(&msg, command_id.clone(), &rid, attempt, None)
                    .await;
                match v {
                    Verdict::Retry(_) if attempt < 6 => {
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                    }
                    other => break other,
                }
            };
            let (reply, result): (Result<Bytes, WireError>, _) = match verdict {
                Verdict::Done(outcome) => {
                    self.metrics.conflicts(outcome.conflicts);
                    if let Err(e) = events::publish_stored(
                        &self.client,
                        &self.subjects,
                        &outcome,
                        &rid,
                        &source,
                    )
                    .await
                    {
                        tracing::warn!(error = %e, "stored event not published");
                    }
                    let result = mark_stored(&outcome, started);
                    tracing::info!(
                        revision = outcome.revision,
                        changed = outcome.changed,
                        conflicts = outcome.conflicts,
                        "stored"
                    );
                    (Ok(events::stored_body(&outcome, &rid, &source)), result)
                }
                Verdict::Reject(err, run_id) => {
                    let kept = self
                        .reject(
                            &msg.subject,
                            msg.headers.as_ref(),
                            &msg.payload,
                            &rid,
                            &err,
                            run_id.as_ref(),
                            &source,
                        )
                        .await;
                    mark(CommandOutcome::Rejected, started);
                    match kept {
                        Ok(key) => {
                            tracing::warn!(code = err.code, reason = %err.message, dead_letter = %key, "command rejected")
                        }
                        Err(e) => {
                            tracing::error!(code = err.code, reason = %err.message, error = %e,
                                "command rejected; dead letter not stored")
                        }
                    }
                    (Err(err), CommandOutcome::Rejected)
                }
                Verdict::Retry(err) => {
                    mark(CommandOutcome::Failed, started);
                    tracing::warn!(code = err.code, error = %err.message, attempts = attempt,
                        "transient failure; giving up (core mode has no redelivery)");
                    (Err(err), CommandOutcome::Failed)
                }
            };
            let refused = msg
                .reply
                .as_ref()
                .and_then(|r| self.subjects.refused_reply(r.as_str()));
            if let (Some(reply_to), Some(why)) = (&msg.reply, refused) {
                // Handled and announced by its event as usual; only the direct reply is not sent.
                tracing::warn!(reply = %reply_to, reason = why, "outcome not sent as a reply");
            } else if let Some(reply_to) = msg.reply.clone() {
                let sent = match reply {
                    Ok(body) => {
                        self.client
                            .publish_with_headers(reply_to, events::ok_headers(&rid), body)
                            .await
                    }
                    Err(err) => {
                        let (h, body) = events::error_reply(&err, &rid);
                        self.client.publish_with_headers(reply_to, h, body).await
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "reply not sent");
                }
            }
            self.metrics.command_finished(kind, result, started.elapsed());
        }
        .instrument(span)
        .await
    }
}

/// Records a command's outcome and elapsed milliseconds on its span (so the line logged next,
/// and every later one, carries them).
fn mark(outcome: CommandOutcome, started: std::time::Instant) {
    let span = tracing::Span::current();
    span.record("outcome", outcome.as_str());
    span.record("ms", started.elapsed().as_millis() as u64);
}

/// [`mark`] for a stored command: `stored`, or `unchanged` for a redelivery.
fn mark_stored(outcome: &Outcome, started: std::time::Instant) -> CommandOutcome {
    let result = if outcome.changed {
        CommandOutcome::Stored
    } else {
        CommandOutcome::Unchanged
    };
    mark(result, started);
    result
}

/// Redelivery delay after `delivered` attempts: 500 ms doubling, capped at 60 s.
fn backoff(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 8) as u32 - 1;
    Duration::from_millis(500u64 << exp).min(Duration::from_secs(60))
}
