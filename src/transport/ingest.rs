//! Command ingestion: a durable JetStream pull consumer (or core queue subscriptions),
//! decode → store → event → ack, with bounded concurrency and per-run serialization.
//!
//! A message is acked only after its effect is stored and its `stored` event published; from
//! the moment it is pulled (also while it waits for a free slot), the broker is told every
//! third of `ack_wait` that it is being worked on.
//! Store trouble is never turned into a rejection: the message is negatively acked with a
//! growing delay and comes back. A command that can never succeed is kept as a dead letter,
//! announced on `rejected`, and acked, so a poison message never stalls the consumer.
//!
//! JetStream and core deliveries go through the same steps ([`Ingest::process`]) and are
//! settled by one function ([`Ingest::settle`]); only the last step differs (ack or nak a
//! JetStream message, reply to a core request). When the stream or the durable consumer
//! disappears from the broker (its store lost, `nats stream rm`), ingest re-creates both as at
//! start-up, logs a warning and counts it in `rmos_broker_state_recreated_total`.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{Client, HeaderMap};
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore, watch};
use tracing::Instrument;

use super::events::{self, RejectedEvent, Source};
use super::metrics::{CommandOutcome, Metrics};
use super::{Subjects, WireError, msg_id, request_id};
use crate::domain::artifact::Timestamp;
use crate::domain::command::{Command, CommandKind, Context, Limits, StagedClaim, StreamPosition};
use crate::domain::error::{RejectCode, RejectKind, Rejection};
use crate::domain::ids::{CommandId, RequestId, RunId};
use crate::store::{Outcome, RunStore, StoreError};

/// Runs `work` while telling the broker, every third of `ack_wait`, that the message is still
/// being worked on, so that a slow store (or a wait for a free slot) does not get it
/// redelivered to another worker meanwhile (which would do the work twice, and let a late
/// first ack pass the copy).
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

/// How often the consumer's ack floor (and pending count) is read.
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
    /// The staging bucket of claim-checked bodies (`None`: commands naming one are rejected).
    pub staging: Option<super::claim_check::Staging>,
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
    /// The subscriptions ended while the worker was not stopping (connection closed).
    #[error("command subscriptions ended")]
    Ended,
}

/// Whether ingest is consuming: what `/readyz` reads to tell "idle" from "stuck".
///
/// A worker is stuck when the consumer has had undelivered messages for a while and this
/// worker received or settled none meanwhile.
#[derive(Debug)]
pub struct IngestProgress {
    origin: Instant,
    /// Milliseconds after `origin` of the last message received or settled.
    last_activity_ms: AtomicU64,
    /// The consumer's undelivered messages at the last poll (`u64::MAX`: unknown).
    pending: AtomicU64,
    /// Milliseconds after `origin` since when `pending` has been above zero (`u64::MAX`: it
    /// is not).
    pending_since_ms: AtomicU64,
}

impl IngestProgress {
    /// Nothing known yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            pending: AtomicU64::new(u64::MAX),
            pending_since_ms: AtomicU64::new(u64::MAX),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// A message was received or settled (or ingest (re)started).
    pub fn touch(&self) {
        self.last_activity_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// The consumer's undelivered count, `None` when it could not be read.
    pub fn set_pending(&self, pending: Option<u64>) {
        let n = pending.unwrap_or(u64::MAX);
        self.pending.store(n, Ordering::Relaxed);
        if pending.is_some_and(|n| n > 0) {
            let _ = self.pending_since_ms.compare_exchange(
                u64::MAX,
                self.now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.pending_since_ms.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// Why ingest counts as stuck, if it has consumed nothing for `after` while the consumer
    /// had messages waiting all that time.
    pub fn stalled(&self, after: Duration) -> Option<String> {
        let pending = self.pending.load(Ordering::Relaxed);
        let since = self.pending_since_ms.load(Ordering::Relaxed);
        if pending == u64::MAX || pending == 0 || since == u64::MAX {
            return None;
        }
        let last = self.last_activity_ms.load(Ordering::Relaxed).max(since);
        let idle = Duration::from_millis(self.now_ms().saturating_sub(last));
        (idle >= after).then(|| {
            format!(
                "ingest: nothing consumed for {}s while {pending} commands wait on the consumer",
                idle.as_secs()
            )
        })
    }
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

/// A command message as it arrived.
// One per message, moved once: boxing the larger variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Delivery {
    /// From the durable consumer: acked or negatively acked, redelivered by the broker.
    JetStream(jetstream::Message),
    /// From a core queue subscription: answered on its reply subject, never redelivered.
    Core(async_nats::Message),
}

impl Delivery {
    fn message(&self) -> &async_nats::Message {
        match self {
            Delivery::JetStream(m) => &m.message,
            Delivery::Core(m) => m,
        }
    }
}

/// How a command was settled: what to count, how to ack (JetStream), what to reply (core).
struct Settled {
    outcome: CommandOutcome,
    ack: AckKind,
    reply: Result<Bytes, WireError>,
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
    /// When the stream was created (Unix ms; 0: unknown). Part of the command id of a message
    /// without `Nats-Msg-Id`, so that a stream re-created after the broker lost its state
    /// (sequences start again at 1) never maps a new command onto an old one's id.
    stream_epoch: AtomicU64,
    /// Set when the consumer or the stream is found missing on the broker.
    state_lost: AtomicBool,
    /// Store work in flight at once (`concurrency`); pulled messages wait for a permit.
    slots: Semaphore,
    progress: Arc<IngestProgress>,
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
            slots: Semaphore::new(settings.concurrency.max(1)),
            settings,
            locks: RunLocks::new(),
            not_found: std::sync::Mutex::new(std::collections::HashMap::new()),
            acked_through: AtomicU64::new(0),
            stream_epoch: AtomicU64::new(0),
            state_lost: AtomicBool::new(false),
            metrics,
            progress: IngestProgress::new(),
        })
    }

    /// What `/readyz` reads to tell whether ingest is consuming.
    pub fn progress(&self) -> Arc<IngestProgress> {
        self.progress.clone()
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
        // The create (or get) response carries the stream's creation time.
        let created = stream.cached_info().created.unix_timestamp_nanos() / 1_000_000;
        self.stream_epoch
            .store(u64::try_from(created).unwrap_or(0), Ordering::Relaxed);
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

    /// Re-creates the stream and the consumer after the broker lost them, retrying with
    /// backoff for about a minute (the broker may still be coming back).
    async fn recover(&self) -> Result<consumer::PullConsumer, IngestError> {
        let consumer = (|| self.ensure_stream())
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(10),
            )
            .notify(|e, delay| tracing::warn!(error = %e, ?delay, "re-creating the stream and consumer failed; retrying"))
            .await?;
        // The staging bucket is a stream of the same broker (`OBJ_<bucket>`): lost with it.
        if let Some(staging) = &self.settings.staging {
            match staging.recreate_if_missing().await {
                Ok(true) => tracing::warn!(
                    bucket = staging.bucket(),
                    "the broker lost the staging bucket; re-created it as at start-up"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e,
                    "the staging bucket could not be re-created; claim checks wait for it"),
            }
        }
        self.acked_through.store(0, Ordering::Relaxed);
        self.metrics.broker_state_recreated();
        tracing::warn!(stream = %self.settings.stream, consumer = %self.settings.consumer,
            "the broker lost the stream or the durable consumer; re-created them as at start-up");
        Ok(consumer)
    }

    /// Follows the consumer's ack floor (every message up to it is acknowledged, so never
    /// delivered again) and publishes it as `acked_through` once it is `forget_acked_after`
    /// old: a copy of a message redelivered just before its first delivery's late ack may
    /// still be in another worker's hands for a while. Runs forget the commands at or below
    /// it (`command::remember`), so their records stay small however often they are patched.
    ///
    /// The same poll records the consumer's pending count (for `/readyz`) and notices a
    /// consumer or stream that no longer exists on the broker.
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
                Ok(info) => {
                    self.progress.set_pending(Some(info.num_pending));
                    seen.push_back((Instant::now(), info.ack_floor.stream_sequence));
                }
                Err(e) => {
                    self.progress.set_pending(None);
                    if matches!(
                        e.kind(),
                        ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                    ) {
                        tracing::warn!(error = %e, "consumer or stream missing on the broker");
                        self.state_lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    tracing::debug!(error = %e, "consumer info unavailable; ack floor kept");
                }
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
    /// Ensures the stream and consumer first (the supervisor restarts this after a failure).
    /// Messages are pulled in batches (one pull request of up to twice the concurrency,
    /// expiring after 2 s); every message of a batch is taken at once, told in progress while
    /// it waits for one of `concurrency` slots, and processed. On shutdown no new batch is
    /// requested and the current one is finished, so every message delivered to this worker is
    /// acked or negatively acked before it exits: none waits for `ack_wait`.
    pub async fn run_jetstream(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let mut consumer = self.ensure_stream().await?;
        self.progress.touch();
        let follow = |c: &consumer::PullConsumer| {
            AbortOnDrop(tokio::spawn(
                self.clone().follow_ack_floor(c.clone(), shutdown.clone()),
            ))
        };
        let mut follower = follow(&consumer);
        let batch_size = self.settings.concurrency * 2;
        let pull_backoff = || {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(16))
                .without_max_times()
                .build()
        };
        let mut delays = pull_backoff();
        while !*shutdown.borrow() {
            if self.state_lost.swap(false, Ordering::Relaxed) {
                consumer = self.recover().await?;
                follower = follow(&consumer);
            }
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
                    delays = pull_backoff();
                    b
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(16));
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
                .for_each_concurrent(batch_size, |m| {
                    let this = self.clone();
                    async move {
                        match m {
                            Ok(msg) => this.process(Delivery::JetStream(msg)).await,
                            Err(e) => tracing::debug!(error = %e, "pull batch ended early"),
                        }
                    }
                })
                .await;
        }
        drop(follower);
        Ok(())
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
        self.progress.touch();
        let mut stopping = shutdown.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        futures::stream::select_all(subs)
            .take_until(stop)
            .for_each_concurrent(self.settings.concurrency, |msg| {
                let this = self.clone();
                async move { this.process(Delivery::Core(msg)).await }
            })
            .await;
        if *stopping.borrow_and_update() {
            Ok(())
        } else {
            Err(IngestError::Ended)
        }
    }

    /// Takes one delivery from arrival to its settlement.
    async fn process(&self, delivery: Delivery) {
        let msg = delivery.message();
        let (seq, delivered) = match &delivery {
            Delivery::JetStream(m) => match m.info() {
                Ok(i) => (Some(i.stream_sequence), Some(i.delivered)),
                Err(_) => (None, Some(1)),
            },
            Delivery::Core(_) => (None, None),
        };
        self.progress.touch();
        let mid = msg_id(msg.headers.as_ref());
        let command_id = command_id(
            mid.as_deref(),
            seq.map(|seq| {
                (
                    self.settings.stream.as_str(),
                    self.stream_epoch.load(Ordering::Relaxed),
                    seq,
                )
            }),
        );
        let source = Source {
            subject: msg.subject.to_string(),
            stream_seq: seq,
            msg_id: mid,
            delivered,
        };
        let rid = request_id(msg.headers.as_ref());
        let kind = self.subjects.kind_of(&msg.subject);
        if delivered.is_some_and(|d| d > 1) {
            self.metrics.redelivered();
        }
        let span = tracing::error_span!("command", request_id = %rid, subject = %msg.subject,
            stream_seq = seq, delivered, run_id = tracing::field::Empty,
            outcome = tracing::field::Empty, ms = tracing::field::Empty);
        async {
            let started = Instant::now();
            let verdict = match &delivery {
                Delivery::JetStream(m) => {
                    let attempt = delivered.unwrap_or(1);
                    in_progress(m, self.settings.ack_wait, async {
                        let _slot = self.slots.acquire().await;
                        let _in_flight = self.metrics.command_started();
                        self.handle(msg, &command_id, &rid, attempt, seq).await
                    })
                    .await
                }
                Delivery::Core(_) => {
                    let _slot = self.slots.acquire().await;
                    let _in_flight = self.metrics.command_started();
                    self.handle_with_retries(msg, &command_id, &rid).await
                }
            };
            let redeliverable = matches!(delivery, Delivery::JetStream(_));
            let settled = self
                .settle(
                    verdict,
                    msg,
                    &rid,
                    &source,
                    started,
                    delivered,
                    redeliverable,
                )
                .await;
            match &delivery {
                Delivery::JetStream(m) => {
                    if matches!(settled.ack, AckKind::Ack) {
                        self.settled(seq);
                    }
                    if let Err(e) = m.ack_with(settled.ack).await {
                        // The broker redelivers after ack_wait; the effect is idempotent.
                        tracing::warn!(error = %e, "ack failed; the command will be redelivered");
                    }
                }
                Delivery::Core(m) => self.reply(m, &rid, settled.reply).await,
            }
            self.progress.touch();
            self.metrics
                .command_finished(kind, settled.outcome, started.elapsed());
        }
        .instrument(span)
        .await
    }

    /// Core mode has no redelivery: a transient failure is retried here, with backoff, five
    /// more times before the command is answered with the error.
    async fn handle_with_retries(
        &self,
        msg: &async_nats::Message,
        command_id: &CommandId,
        rid: &RequestId,
    ) -> Verdict {
        let attempt = AtomicU64::new(0);
        let once = || async {
            let n = attempt.fetch_add(1, Ordering::Relaxed) + 1;
            match self
                .handle(
                    msg,
                    command_id,
                    rid,
                    i64::try_from(n).unwrap_or(i64::MAX),
                    None,
                )
                .await
            {
                Verdict::Retry(e) => Err(e),
                other => Ok(other),
            }
        };
        once.retry(redelivery_backoff().with_max_times(5))
            .await
            .unwrap_or_else(Verdict::Retry)
    }

    /// Settles a verdict: announces it (`stored` event, or dead letter and `rejected` event)
    /// and decides the ack and the reply. `redeliverable` is false in core mode, where a step
    /// that fails cannot be tried again by a redelivery and is only logged.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        verdict: Verdict,
        msg: &async_nats::Message,
        rid: &RequestId,
        source: &Source,
        started: Instant,
        delivered: Option<i64>,
        redeliverable: bool,
    ) -> Settled {
        let retry_delay = redelivery_delay(delivered.unwrap_or(1));
        match verdict {
            Verdict::Done(outcome) => {
                self.metrics.conflicts(outcome.conflicts);
                let published =
                    events::publish_stored(&self.client, &self.subjects, &outcome, rid, source)
                        .await;
                if let Err(e) = &published {
                    if redeliverable {
                        mark(CommandOutcome::Retried, started);
                        tracing::warn!(error = %e, "stored event not published; redelivering");
                        return Settled {
                            outcome: CommandOutcome::Retried,
                            ack: AckKind::Nak(Some(Duration::from_secs(1))),
                            reply: Err(WireError::from(&StoreError::Unavailable(e.to_string()))),
                        };
                    }
                    tracing::warn!(error = %e, "stored event not published (core mode: answered anyway)");
                }
                let result = mark_stored(&outcome, started);
                tracing::info!(
                    revision = outcome.revision,
                    changed = outcome.changed,
                    conflicts = outcome.conflicts,
                    "stored"
                );
                Settled {
                    outcome: result,
                    ack: AckKind::Ack,
                    reply: Ok(events::stored_body(&outcome, rid, source)),
                }
            }
            Verdict::Reject(err, run_id) => {
                let kept = self
                    .reject(
                        &msg.subject,
                        msg.headers.as_ref(),
                        &msg.payload,
                        rid,
                        &err,
                        run_id.as_ref(),
                        source,
                    )
                    .await;
                match kept {
                    Ok(key) => {
                        mark(CommandOutcome::Rejected, started);
                        tracing::warn!(code = err.code, reason = %err.message, dead_letter = %key, "command rejected");
                        Settled {
                            outcome: CommandOutcome::Rejected,
                            ack: AckKind::Ack,
                            reply: Err(err),
                        }
                    }
                    Err(e) if redeliverable => {
                        mark(CommandOutcome::Retried, started);
                        tracing::warn!(code = err.code, reason = %err.message, error = %e,
                            "dead letter not stored; redelivering");
                        Settled {
                            outcome: CommandOutcome::Retried,
                            ack: AckKind::Nak(Some(retry_delay)),
                            reply: Err(err),
                        }
                    }
                    Err(e) => {
                        mark(CommandOutcome::Rejected, started);
                        tracing::error!(code = err.code, reason = %err.message, error = %e,
                            "command rejected; dead letter not stored");
                        Settled {
                            outcome: CommandOutcome::Rejected,
                            ack: AckKind::Ack,
                            reply: Err(err),
                        }
                    }
                }
            }
            Verdict::Retry(err) if redeliverable => {
                mark(CommandOutcome::Retried, started);
                tracing::warn!(code = err.code, error = %err.message, delay = ?retry_delay,
                    "transient failure; redelivering");
                Settled {
                    outcome: CommandOutcome::Retried,
                    ack: AckKind::Nak(Some(retry_delay)),
                    reply: Err(err),
                }
            }
            Verdict::Retry(err) => {
                mark(CommandOutcome::Failed, started);
                tracing::warn!(code = err.code, error = %err.message,
                    "transient failure; giving up (core mode has no redelivery)");
                Settled {
                    outcome: CommandOutcome::Failed,
                    ack: AckKind::Ack,
                    reply: Err(err),
                }
            }
        }
    }

    /// Core mode: answers on the request's reply subject, if it has one and it is an inbox (a
    /// reply aimed at `$JS.API...` or the service's own subjects would be sent with the
    /// worker's rights: the command is handled and announced as usual, only not answered).
    async fn reply(
        &self,
        msg: &async_nats::Message,
        rid: &RequestId,
        reply: Result<Bytes, WireError>,
    ) {
        let Some(reply_to) = msg.reply.clone() else {
            return;
        };
        if let Some(why) = self.subjects.refused_reply(reply_to.as_str()) {
            tracing::warn!(reply = %reply_to, reason = why, "outcome not sent as a reply");
            return;
        }
        let sent = match reply {
            Ok(body) => {
                self.client
                    .publish_with_headers(reply_to, events::ok_headers(rid), body)
                    .await
            }
            Err(err) => {
                let (h, body) = events::error_reply(&err, rid);
                self.client.publish_with_headers(reply_to, h, body).await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "reply not sent");
        }
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
        command_id: &CommandId,
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
        let actor = match super::actor(headers) {
            Ok(a) => a,
            Err(m) => return Verdict::Reject(WireError::invalid(m), Some(cmd.run_id().clone())),
        };
        let ctx = Context {
            actor,
            now: Timestamp::now(),
            request_id: rid.clone(),
            command_id: Some(command_id.clone()),
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
            self.execute_claiming(&cmd, &ctx).await
        };
        if let Err(e) = &result {
            self.metrics.store_error(e);
        }
        match result {
            Ok(outcome) => Verdict::Done(outcome),
            Err(StoreError::Rejected(r))
                if r.code == RejectCode::NotFound
                    && r.kind == RejectKind::Missing
                    && matches!(kind, CommandKind::PatchMeta | CommandKind::Advisory)
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

    /// Executes a command, first claiming the staged bodies it names (streamed into the store,
    /// checked); once the run is stored the staged objects are removed.
    async fn execute_claiming(&self, cmd: &Command, ctx: &Context) -> Result<Outcome, StoreError> {
        let staged = cmd.staged_bodies();
        let Some(first) = staged.first() else {
            return self.store.execute(cmd, ctx).await;
        };
        let Some(staging) = &self.settings.staging else {
            return Err(Rejection::invalid(format!(
                "{}: this worker has no staging bucket (core ingest)",
                first.field
            ))
            .into());
        };
        let run = cmd.run_id();
        // An advisory for a run that is not there (yet, or any more) is decided without its
        // body: a patch-like wait for the run's create must not stream the body each time.
        if matches!(cmd, Command::Advisory(_))
            && !matches!(
                self.store.load(run).await?,
                Some(v) if matches!(v.value, crate::domain::artifact::StoredRecord::Live(_))
            )
        {
            return self.store.execute(cmd, ctx).await;
        }
        for claim in &staged {
            self.claim(staging, run, claim).await?;
        }
        let outcome = self.store.execute(cmd, ctx).await?;
        for claim in &staged {
            // A release that raced the claim may have removed the blob before the record
            // referenced it (see store::blobs): put it back from the staged object.
            if !self.store.blob_exists(&claim.body.sha256).await? {
                self.claim(staging, run, claim).await?;
            }
        }
        for claim in &staged {
            if let Err(e) = staging.remove(&claim.body.name).await {
                tracing::warn!(error = %e, "staged object not removed; it expires with the bucket's max_age");
            }
        }
        Ok(outcome)
    }

    /// Claims one staged body, counting it in the claim metrics.
    async fn claim(
        &self,
        staging: &super::claim_check::Staging,
        run: &RunId,
        claim: &StagedClaim<'_>,
    ) -> Result<u64, StoreError> {
        let depth = self.settings.limits.max_json_depth;
        let got = staging.claim(&self.store, run, claim, depth).await;
        match &got {
            Ok(bytes) => self.metrics.claimed(claim.field, *bytes),
            Err(StoreError::Rejected(r)) => {
                tracing::info!(field = claim.field, reason = %r.message, "staged body rejected");
                self.metrics.claim_rejected(claim.field);
            }
            Err(_) => {}
        }
        got
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
}

/// Aborts a spawned task when dropped (the ack-floor follower of one consumer, so that it
/// never outlives the ingest loop that started it, even when that loop is restarted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The identity of a command message for "already applied": its `Nats-Msg-Id` (hashed when
/// it is not a valid id, so de-duplication still holds), else its stream position (stream
/// name, the stream's creation time in Unix ms, sequence), else (core NATS, which has
/// neither) an id of this message alone, so that two publishes of the same payload are two
/// commands.
fn command_id(mid: Option<&str>, position: Option<(&str, u64, u64)>) -> CommandId {
    let text = match (mid, position) {
        (Some(m), _) => match CommandId::parse(m) {
            Ok(id) => return id,
            Err(_) => format!(
                "msg-sha256:{}",
                crate::domain::hashing::sha256_bytes(m.as_bytes())
            ),
        },
        (None, Some((stream, epoch, seq))) => format!("js:{stream}@{epoch}:{seq}"),
        (None, None) => format!("core:{:032x}", rand::random::<u128>()),
    };
    // Every form above is printable ASCII well under the length limit.
    CommandId::parse(&text).unwrap_or_else(|_| unreachable_id())
}

/// A command id that cannot be formed (never reached: every id built above is valid).
#[cold]
fn unreachable_id() -> CommandId {
    CommandId::parse("invalid").unwrap_or_else(|_| unreachable!("a constant valid id"))
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

/// Redelivery delays: 500 ms doubling, capped at 60 s.
fn redelivery_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(60))
        .with_factor(2.0)
}

/// The delay before redelivering a message delivered `delivered` times.
fn redelivery_delay(delivered: i64) -> Duration {
    let n = usize::try_from(delivered.clamp(1, 64) - 1).unwrap_or(0);
    redelivery_backoff()
        .without_max_times()
        .build()
        .nth(n)
        .unwrap_or(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_delays_double_to_a_cap() {
        let d: Vec<u64> = [1, 2, 3, 8, 9, 1000]
            .iter()
            .map(|n| redelivery_delay(*n).as_millis() as u64)
            .collect();
        assert_eq!(d, [500, 1000, 2000, 60_000, 60_000, 60_000]);
    }

    #[test]
    fn command_ids() {
        let id = |mid, pos| command_id(mid, pos).as_str().to_owned();
        assert_eq!(id(Some("order-7"), Some(("S", 1, 2))), "order-7");
        // An id the type refuses still de-duplicates, through its hash.
        let long = "x".repeat(300);
        let hashed = id(Some(&long), None);
        assert!(hashed.starts_with("msg-sha256:"), "{hashed}");
        assert_eq!(hashed, id(Some(&long), Some(("S", 1, 2))));
        let other = "y".repeat(300);
        assert_ne!(hashed, id(Some(&other), None));
        assert_eq!(id(None, Some(("RMOS_RUNS", 17, 5))), "js:RMOS_RUNS@17:5");
        // A re-created stream (another creation time) never repeats an old id.
        assert_ne!(
            id(None, Some(("RMOS_RUNS", 17, 5))),
            id(None, Some(("RMOS_RUNS", 18, 5)))
        );
        // Core NATS: every message is its own command.
        assert_ne!(id(None, None), id(None, None));
    }

    #[test]
    fn stalled_only_after_pending_waited() {
        let p = IngestProgress::new();
        assert!(p.stalled(Duration::ZERO).is_none(), "nothing known");
        p.set_pending(Some(0));
        assert!(p.stalled(Duration::ZERO).is_none(), "nothing pending");
        p.set_pending(Some(3));
        assert!(p.stalled(Duration::ZERO).is_some());
        assert!(
            p.stalled(Duration::from_secs(60)).is_none(),
            "not for long yet"
        );
        p.set_pending(None);
        assert!(p.stalled(Duration::ZERO).is_none(), "unknown again");
    }
}
