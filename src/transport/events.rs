//! `stored` and `rejected` events, and the error replies of request-reply handlers.

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::Serialize;

use super::{MSG_ID_HEADER, REQUEST_ID_HEADER, Subjects, WireError};
use crate::domain::artifact::Timestamp;
use crate::domain::ids::{RequestId, RunId};
use crate::store::Outcome;

/// Where a command came from, echoed in its events.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    /// The subject it was published on.
    pub subject: String,
    /// Its stream sequence (JetStream ingest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
    /// Its `Nats-Msg-Id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// How many times it has been delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<i64>,
}

#[derive(Serialize)]
struct StoredEvent<'a> {
    event: &'static str,
    run_id: &'a RunId,
    revision: u64,
    request_id: &'a RequestId,
    artifact_sha256: &'a str,
    changed: bool,
    at: Timestamp,
    source: &'a Source,
}

/// The body of a `rejected` event.
#[derive(Serialize)]
pub struct RejectedEvent<'a> {
    /// Protocol code.
    pub code: &'static str,
    /// Why.
    pub message: &'a str,
    /// The command's subject.
    pub subject: &'a str,
    /// Correlation id.
    pub request_id: &'a RequestId,
    /// The run, when the command named a valid one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<&'a RunId>,
    /// Where the rejected message is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<&'a str>,
    /// Where it came from.
    pub source: &'a Source,
}

fn headers(request_id: &RequestId) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(REQUEST_ID_HEADER, request_id.as_str());
    h
}

/// The JSON body of a `stored` event.
pub fn stored_body(outcome: &Outcome, request_id: &RequestId, source: &Source) -> Bytes {
    let ev = StoredEvent {
        event: outcome.event.as_str(),
        run_id: &outcome.run_id,
        revision: outcome.revision,
        request_id,
        artifact_sha256: &outcome.artifact_sha256,
        changed: outcome.changed,
        at: Timestamp::now(),
        source,
    };
    Bytes::from(serde_json::to_vec(&ev).unwrap_or_default())
}

/// Publishes `stored` with `Nats-Msg-Id: <run_id>:<revision>` so duplicates collapse.
pub async fn publish_stored(
    client: &Client,
    subjects: &Subjects,
    outcome: &Outcome,
    request_id: &RequestId,
    source: &Source,
) -> Result<(), async_nats::PublishError> {
    let mut h = headers(request_id);
    h.insert(
        MSG_ID_HEADER,
        format!("{}:{}", outcome.run_id, outcome.revision).as_str(),
    );
    client
        .publish_with_headers(
            subjects.stored(),
            h,
            stored_body(outcome, request_id, source),
        )
        .await
}

/// Publishes `rejected`.
pub async fn publish_rejected(
    client: &Client,
    subjects: &Subjects,
    event: &RejectedEvent<'_>,
) -> Result<(), async_nats::PublishError> {
    let body = Bytes::from(serde_json::to_vec(event).unwrap_or_default());
    client
        .publish_with_headers(subjects.rejected(), headers(event.request_id), body)
        .await
}

/// Headers and body of an error reply (NATS services convention plus a JSON body).
pub fn error_reply(err: &WireError, request_id: &RequestId) -> (HeaderMap, Bytes) {
    let mut h = headers(request_id);
    let one_line: String = err
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    h.insert("Nats-Service-Error", one_line.as_str());
    h.insert("Nats-Service-Error-Code", err.status.to_string().as_str());
    let body = serde_json::json!({"error": {
        "code": err.code, "message": err.message, "request_id": request_id.as_str()}});
    (h, Bytes::from(body.to_string()))
}

/// Headers of a successful reply.
pub fn ok_headers(request_id: &RequestId) -> HeaderMap {
    headers(request_id)
}
