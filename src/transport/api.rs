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

use super::events::{error_reply, ok_headers};
use super::metrics::Metrics;
use super::reads::Reads;
use super::{Subjects, WireError, request_id};
use crate::domain::error::Rejection;
use crate::domain::ids::RequestId;
use crate::store::RunStore;

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
}

impl Api {
    /// An API over `store`.
    pub fn new(
        client: Client,
        store: RunStore,
        concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            reads: Reads::new(store, metrics.clone()),
            concurrency,
            metrics,
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

    /// `get`, refused when the answer would not fit in one message.
    async fn get(&self, body: &[u8]) -> Result<Bytes, WireError> {
        let bytes = self.reads.get(body).await?;
        let max = self.client.server_info().max_payload;
        if bytes.len() > max {
            return Err(WireError::from(&Rejection::too_large(format!(
                "the answer is {} bytes, over the broker's max_payload {max}; ask without \
                 include_outputs, or fetch the outputs over HTTP",
                bytes.len()
            ))));
        }
        Ok(bytes)
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
