//! Request-reply handlers (`get`, `list`, `verify`), registered with the NATS services API so
//! `nats micro ls/info/stats` discover the worker, and served on a queue group so any number
//! of workers answer.

use std::sync::Arc;

use async_nats::service::{Request, Service, ServiceExt};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use super::claim_check::Staging;
use super::events::{error_reply, ok_headers};
use super::metrics::Metrics;
use super::reads::{GetRequest, OutputName, Reads};
use super::{Subjects, WireError, request_id};
use crate::domain::artifact::{RunArtifact, Sha256Hex};
use crate::domain::command::create::StagedBody;
use crate::domain::error::Rejection;
use crate::domain::ids::{RequestId, RunId};
use crate::store::{RunStore, StoreError};

/// The service name in `nats micro ls`.
pub const SERVICE_NAME: &str = "rmos-runs";
/// Queue group of the request-reply endpoints.
pub const QUEUE_GROUP: &str = "rmos-runs";

/// The request-reply API.
pub struct Api {
    client: Client,
    reads: Reads,
    concurrency: usize,
    metrics: Arc<Metrics>,
    staging: Option<Staging>,
}

impl Api {
    /// An API over `store`.
    pub fn new(
        client: Client,
        store: RunStore,
        concurrency: usize,
        metrics: Arc<Metrics>,
        staging: Option<Staging>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            reads: Reads::new(store, metrics.clone()),
            concurrency,
            metrics,
            staging,
        })
    }

    /// Registers the service and serves its endpoints until `shutdown` turns true. `Err` when
    /// the service cannot be registered, or an endpoint's subscription ends while the worker
    /// is not stopping (the supervisor then starts this again).
    pub async fn run(
        self: Arc<Self>,
        subjects: Subjects,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let service = self
            .client
            .service_builder()
            .description("Persistent record of CNC manufacturing runs")
            .queue_group(QUEUE_GROUP)
            // `nats micro stats` counts errors per endpoint; this adds them by protocol code.
            .stats_handler({
                let metrics = self.metrics.clone();
                move |endpoint, _| {
                    serde_json::json!({ "errors_by_code": metrics.request_errors(&endpoint) })
                }
            })
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| format!("service: {e}"))?;
        // Stops the service's own handler (PING/INFO/STATS) however this returns, so a
        // restarted run does not leave a stale instance answering discovery.
        let service = StopOnDrop(Some(service));
        let mut served = Vec::new();
        for name in ["get", "list", "verify", "history", "diff"] {
            let endpoint = service
                .get()
                .endpoint_builder()
                .name(name)
                .add(subjects.sub(name))
                .await
                .map_err(|e| format!("endpoint {name}: {e}"))?;
            let this = self.clone();
            let subjects = subjects.clone();
            let mut stop = shutdown.clone();
            served.push(Box::pin(async move {
                let stop = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                endpoint
                    .take_until(stop)
                    .for_each_concurrent(this.concurrency, |req| {
                        let this = this.clone();
                        let refused = req
                            .message
                            .reply
                            .as_ref()
                            .and_then(|r| subjects.refused_reply(r.as_str()));
                        async move {
                            match refused {
                                Some(why) => this.refuse_reply_subject(name, &req, why),
                                None => this.answer(name, req).await,
                            }
                        }
                    })
                    .await;
                name
            }));
        }
        let (ended, _, rest) = futures::future::select_all(served).await;
        if *shutdown.borrow() {
            futures::future::join_all(rest).await;
            return Ok(());
        }
        Err(format!("endpoint {ended}: subscription ended"))
    }

    /// A request whose reply subject the worker must not publish to: not served, logged with
    /// the subject and counted as `invalid_request` (there is nowhere safe to say so).
    fn refuse_reply_subject(&self, name: &'static str, req: &Request, why: &'static str) {
        let rid = request_id(req.message.headers.as_ref());
        let reply = req.message.reply.as_ref().map(|r| r.as_str()).unwrap_or("");
        tracing::warn!(endpoint = name, request_id = %rid, reply, reason = why,
            "request refused: not answered");
        self.metrics
            .request(name, Some("invalid_request"), std::time::Duration::ZERO);
    }

    async fn answer(&self, name: &'static str, req: Request) {
        let rid = request_id(req.message.headers.as_ref());
        // A span costs a few percent of a get, and nothing below `get` logs: its events carry
        // the ids themselves. `list` and `verify` reach store code that may log, so they get
        // one, and what is logged there carries the request id too.
        let span = if name == "get" {
            tracing::Span::none()
        } else {
            tracing::error_span!("request", endpoint = name, request_id = %rid)
        };
        async {
            let started = std::time::Instant::now();
            let result = match name {
                "get" => self.get(&req.message.payload).await,
                "list" => self.reads.list(&req.message.payload).await,
                "history" => self.reads.history(&req.message.payload).await,
                "diff" => self.reads.diff(&req.message.payload).await,
                _ => self.reads.verify(&req.message.payload).await,
            };
            let (sent, code) = match result {
                Ok(body) => (
                    req.respond_with_headers(Ok(body), ok_headers(&rid)).await,
                    None,
                ),
                Err(err) => {
                    let sent = self.reply_error(&req, &err, &rid).await;
                    count_in_service_stats(req, &err).await;
                    (sent, Some(err))
                }
            };
            if let Err(e) = sent {
                tracing::warn!(endpoint = name, request_id = %rid, error = %e, "reply not sent");
            }
            let elapsed = started.elapsed();
            self.metrics
                .request(name, code.as_ref().map(|e| e.code), elapsed);
            let us = elapsed.as_micros() as u64;
            match code {
                None => {
                    tracing::debug!(endpoint = name, request_id = %rid, code = "ok", us, "answered")
                }
                Some(err) => tracing::info!(endpoint = name, request_id = %rid, code = err.code,
                    reason = %err.message, us, "request refused"),
            }
        }
        .instrument(span)
        .await
    }

    async fn reply_error(
        &self,
        req: &Request,
        err: &WireError,
        rid: &RequestId,
    ) -> Result<(), async_nats::PublishError> {
        // The services helper sends error replies with an empty body; ours carry a JSON body
        // too, so publish the reply directly.
        let (h, body) = error_reply(err, rid);
        match &req.message.reply {
            Some(reply) => {
                self.client
                    .publish_with_headers(reply.clone(), h, body)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Counts a store failure in the metrics, then maps it to the wire.
    fn store_err(&self, e: StoreError) -> WireError {
        self.metrics.store_error(&e);
        WireError::from(&e)
    }

    /// `get`: bodies that cannot fit one reply are staged in the staging bucket and the reply
    /// says where to fetch them; anything else over `max_payload` is refused `too_large`.
    async fn get(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let q = GetRequest::parse(body)?;
        let max = self.client.server_info().max_payload;
        if let Some(which) = q.output {
            return self.get_output(&q.run_id, which, max).await;
        }
        let bytes = match &self.staging {
            Some(staging) if q.include_outputs && q.revision.is_none() => {
                let artifact = self
                    .reads
                    .store()
                    .get(&q.run_id)
                    .await
                    .map_err(|e| self.store_err(e))?;
                // Escaped, a body can take up to twice its size in the reply.
                let bodies: u64 = artifact.blob_refs().iter().map(|r| r.size_bytes).sum();
                if bodies.saturating_mul(2) > max as u64 {
                    return self.with_fetch(staging, artifact).await;
                }
                // The record just read, not a second read of it.
                self.reads.with_outputs(artifact).await?
            }
            _ => self.reads.get_parsed(&q).await?,
        };
        if bytes.len() > max {
            return Err(WireError::from(&Rejection::too_large(format!(
                "run {} is {} bytes with its outputs, over the broker's max_payload {max}; \
                 ask without include_outputs, or for one output alone",
                q.run_id,
                bytes.len()
            ))));
        }
        Ok(bytes)
    }

    /// `get` with `output`: the body inline (`{"run_id", "output", "inline"}`) when the reply
    /// fits `max`, else staged (`{"run_id", "output", "staged": {bucket, name, sha256,
    /// size_bytes}}`) for the reader to fetch from the staging bucket.
    async fn get_output(
        &self,
        run_id: &RunId,
        which: OutputName,
        max: usize,
    ) -> Result<Bytes, WireError> {
        let a = self
            .reads
            .store()
            .get(run_id)
            .await
            .map_err(|e| self.store_err(e))?;
        let (inline, blob) = match which {
            OutputName::Gcode => (
                a.outputs.gcode_text.clone().map(serde_json::Value::String),
                a.outputs.gcode_blob.clone(),
            ),
            OutputName::Opplan => (
                a.outputs.opplan_json.clone().map(serde_json::Value::Object),
                a.outputs.opplan_blob.clone(),
            ),
        };
        let reply = |field: &str, v: serde_json::Value| {
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "run_id": run_id, "output": which, field: v
                }))
                .unwrap_or_default(),
            )
        };
        if let Some(v) = inline {
            let bytes = reply("inline", v);
            if bytes.len() <= max {
                return Ok(bytes);
            }
        }
        let Some(blob) = blob else {
            return Err(WireError::from(&Rejection::not_found(format!(
                "run {run_id} has no {} output",
                serde_json::to_value(which).unwrap_or_default()
            ))));
        };
        let staging = self.staging.as_ref().ok_or_else(|| {
            WireError::from(&Rejection::too_large(format!(
                "run {run_id}: the body is {} bytes and this worker has no staging bucket",
                blob.size_bytes
            )))
        })?;
        let staged = self.stage(staging, run_id, &blob.sha256).await?;
        Ok(reply(
            "staged",
            serde_json::to_value(staged).unwrap_or_default(),
        ))
    }

    async fn stage(
        &self,
        staging: &Staging,
        run_id: &RunId,
        sha: &Sha256Hex,
    ) -> Result<StagedBody, WireError> {
        let store = self.reads.store();
        staging
            .stage_blob(store, sha)
            .await
            .map_err(|e| self.store_err(e))?
            .ok_or_else(|| {
                self.store_err(StoreError::Corrupt {
                    key: store.blob_key(sha).to_string(),
                    reason: format!("run {run_id}: its blob {sha} is missing"),
                })
            })
    }

    /// The artifact as stored plus `"fetch": {"gcode"?, "opplan"?}`: where its large bodies
    /// were staged (`include_outputs` on bodies over the broker's `max_payload`).
    async fn with_fetch(&self, staging: &Staging, a: RunArtifact) -> Result<Bytes, WireError> {
        let mut fetch = serde_json::Map::new();
        if let Some(b) = &a.outputs.gcode_blob {
            let s = self.stage(staging, &a.run_id, &b.sha256).await?;
            fetch.insert("gcode".into(), serde_json::to_value(s).unwrap_or_default());
        }
        if let Some(b) = &a.outputs.opplan_blob {
            let s = self.stage(staging, &a.run_id, &b.sha256).await?;
            fetch.insert("opplan".into(), serde_json::to_value(s).unwrap_or_default());
        }
        let mut v = serde_json::to_value(&a).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("fetch".into(), serde_json::Value::Object(fetch));
        }
        Ok(Bytes::from(
            serde_json::to_vec_pretty(&v).unwrap_or_default(),
        ))
    }
}

/// Stops a service when dropped.
struct StopOnDrop(Option<Service>);

impl StopOnDrop {
    fn get(&self) -> &Service {
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            tokio::spawn(async move {
                let _ = s.stop().await;
            });
        }
    }
}

/// Counts an error reply (already published with its JSON body by `reply_error`) in the
/// service's own statistics, so `$SRV.STATS` / `nats micro stats` agree with
/// `rmos_requests_total`.
///
/// `Request::respond_with_headers(Err(..))` is the only way to bump an endpoint's
/// `num_errors` / `last_error` (and, for an error, `num_requests` and the processing time), but
/// it publishes an empty-bodied reply of its own. Pointing the request at an empty reply subject
/// keeps that reply off the wire: async-nats 0.51 updates the stats first, then refuses to
/// publish to an empty subject inside the client (`PublishErrorKind::InvalidSubject`, whatever
/// `skip_subject_validation` says), so nothing is sent and no permission is needed.
/// `tests/metrics.rs` pins this behaviour; re-check it when upgrading async-nats.
async fn count_in_service_stats(mut req: Request, err: &WireError) {
    req.message.reply = Some(async_nats::Subject::from(""));
    let stats_error = async_nats::service::error::Error {
        status: err.code.to_owned(),
        code: usize::from(err.status),
    };
    // The publish is refused by design (see above); the stats are already updated.
    let _ = req
        .respond_with_headers(Err(stats_error), HeaderMap::new())
        .await;
}
