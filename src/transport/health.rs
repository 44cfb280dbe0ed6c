//! Readiness (`/readyz`): the supervised tasks, the broker connection, the stream and the
//! durable consumer, ingest progress, and a store write, each check cached briefly so a probe
//! storm costs the broker and the store nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::connection::State;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStoreExt, PutPayload};
use tokio::sync::Mutex;

use super::ingest::IngestProgress;
use crate::domain::ids::RunId;
use crate::store::{RunStore, StoreError};
use crate::supervisor::TaskBoard;

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

/// What `/readyz` checks: the supervised tasks, the broker connection, the stream and the
/// durable consumer (JetStream mode), that ingest consumes while commands wait, and the store.
pub struct Health {
    client: Client,
    store: RunStore,
    jetstream: Option<JetStreamCheck>,
    tasks: Arc<TaskBoard>,
    stream_check: Cached,
    store_check: Cached,
}

/// What `/readyz` checks in JetStream mode.
pub struct JetStreamCheck {
    /// The stream.
    pub stream: String,
    /// The durable consumer.
    pub consumer: String,
    /// Ingest's progress (the pending count is also recorded there by this check).
    pub progress: Arc<IngestProgress>,
    /// Not ready when nothing was consumed for this long while commands waited.
    pub stall_after: Duration,
}

impl Health {
    /// Checks over `client` and `store`; `jetstream` in JetStream mode; `tasks` is the
    /// supervisor's board.
    pub fn new(
        client: Client,
        store: RunStore,
        jetstream: Option<JetStreamCheck>,
        tasks: Arc<TaskBoard>,
    ) -> Self {
        Self {
            client,
            store,
            jetstream,
            tasks,
            stream_check: Cached::default(),
            store_check: Cached::default(),
        }
    }

    /// One line per failing check; empty when ready.
    pub async fn not_ready(&self) -> Vec<String> {
        let state = self.client.connection_state();
        let connected = state == State::Connected;
        let stream = async {
            match &self.jetstream {
                None => Ok(()),
                Some(js) if connected => {
                    self.stream_check
                        .get(|| consumer_reachable(&self.client, js))
                        .await
                }
                Some(js) => Err(format!(
                    "stream {}: not checked, broker not connected",
                    js.stream
                )),
            }
        };
        let store = self.store_check.get(|| store_writable(&self.store));
        let (stream, store) = tokio::join!(stream, store);
        let mut reasons = self.tasks.not_ready();
        if !connected {
            let state = match state {
                State::Pending => "connecting",
                _ => "disconnected",
            };
            reasons.push(format!("broker: {state}"));
        }
        reasons.extend(stream.err());
        if let Some(js) = &self.jetstream {
            reasons.extend(js.progress.stalled(js.stall_after));
        }
        reasons.extend(store.err());
        reasons.into_iter().map(|r| one_line(&r)).collect()
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Reads the durable consumer's info: proves the stream and the consumer exist, and records
/// its undelivered count for the stall check.
async fn consumer_reachable(client: &Client, js: &JetStreamCheck) -> Result<(), String> {
    let ctx = async_nats::jetstream::new(client.clone());
    let (stream, consumer) = (&js.stream, &js.consumer);
    let info = async {
        ctx.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            consumer, stream,
        )
        .await
        .map(|c| c.cached_info().clone())
        .map_err(async_nats::Error::from)
    };
    let result: Result<async_nats::jetstream::consumer::Info, async_nats::Error> =
        match tokio::time::timeout(STREAM_TIMEOUT, info).await {
            Ok(r) => r,
            Err(_) => {
                js.progress.set_pending(None);
                return Err(format!(
                    "stream {stream}: no answer within {STREAM_TIMEOUT:?}"
                ));
            }
        };
    match result {
        Ok(info) => {
            js.progress.set_pending(Some(info.num_pending));
            Ok(())
        }
        Err(e) => {
            js.progress.set_pending(None);
            Err(format!("stream {stream} / consumer {consumer}: {e}"))
        }
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
