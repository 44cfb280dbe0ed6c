//! Sending a command the way a publisher does and waiting for its outcome: a JetStream publish
//! (or a core publish in core ingest mode), then the `stored` or `rejected` event that carries
//! the command's request id. The HTTP server uses this, so a command that arrives over HTTP
//! goes through the same stream, the same worker and the same exactly-once path as one from a
//! NATS publisher, whichever worker ends up applying it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

use super::{ACTOR_HEADER, MSG_ID_HEADER, REQUEST_ID_HEADER, Subjects};
use crate::domain::command::CommandKind;
use crate::domain::ids::{Actor, RequestId};

/// What became of a command.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Applied (or found already applied): the `stored` event's body.
    Stored(Bytes),
    /// Refused for good: the `rejected` event's body (`code`, `message`, ...).
    Rejected(Bytes),
}

/// Why no outcome is known.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The broker did not take the command (not connected, no stream, refused).
    #[error("the broker did not accept the command: {0}")]
    NotAccepted(String),
    /// Accepted, but no worker reported an outcome in time; it may still be applied.
    #[error(
        "accepted by the broker (request id {request_id}) but no outcome within {after:?}; \
         it will be applied when a worker takes it: look the run up before retrying, or retry \
         with the same request id"
    )]
    NoOutcome {
        /// The command's request id.
        request_id: RequestId,
        /// How long was waited.
        after: Duration,
    },
    /// Another command with this request id is waiting for its outcome in this process.
    #[error("request id {0} is already in use by a command waiting for its outcome")]
    RequestIdInUse(RequestId),
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Outcome>>>>;

/// Publishes commands and hands each its outcome; one per process, shared by all requests.
pub struct Commander {
    client: Client,
    subjects: Subjects,
    jetstream: bool,
    waiters: Waiters,
}

impl Commander {
    /// Subscribes to the outcome events and starts routing them to waiting commands.
    /// `jetstream`: publish through the stream (else core publishes, for core ingest mode).
    pub async fn start(
        client: Client,
        subjects: Subjects,
        jetstream: bool,
    ) -> Result<Arc<Self>, String> {
        let waiters: Waiters = Arc::default();
        for (subject, stored) in [(subjects.stored(), true), (subjects.rejected(), false)] {
            let mut sub = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| format!("subscribe {subject}: {e}"))?;
            let waiters = waiters.clone();
            tokio::spawn(async move {
                // async-nats re-subscribes after a reconnect; this ends only with the client.
                while let Some(m) = sub.next().await {
                    let Some(rid) = m.headers.as_ref().and_then(|h| h.get(REQUEST_ID_HEADER))
                    else {
                        continue;
                    };
                    let waiter = match waiters.lock() {
                        Ok(mut w) => w.remove(rid.as_str()),
                        Err(_) => None,
                    };
                    if let Some(tx) = waiter {
                        let _ = tx.send(if stored {
                            Outcome::Stored(m.payload)
                        } else {
                            Outcome::Rejected(m.payload)
                        });
                    }
                }
            });
        }
        Ok(Arc::new(Self {
            client,
            subjects,
            jetstream,
            waiters,
        }))
    }

    /// Publishes `payload` as a `kind` command with `request_id` (and `msg_id` as its
    /// `Nats-Msg-Id`, for the stream's de-duplication; `actor` as its `Rmos-Actor`) and waits
    /// up to `timeout` for its outcome.
    pub async fn send(
        &self,
        kind: CommandKind,
        payload: Bytes,
        request_id: &RequestId,
        msg_id: Option<&str>,
        actor: Option<&Actor>,
        timeout: Duration,
    ) -> Result<Outcome, SendError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self
                .waiters
                .lock()
                .map_err(|_| SendError::NotAccepted("outcome table poisoned".into()))?;
            if w.contains_key(request_id.as_str()) {
                return Err(SendError::RequestIdInUse(request_id.clone()));
            }
            w.insert(request_id.as_str().to_owned(), tx);
        }
        let _forget = Forget(&self.waiters, request_id.as_str());
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, request_id.as_str());
        if let Some(m) = msg_id {
            h.insert(MSG_ID_HEADER, m);
        }
        if let Some(a) = actor {
            h.insert(ACTOR_HEADER, a.as_str());
        }
        let subject = self.subjects.command(kind);
        let deadline = tokio::time::Instant::now() + timeout;
        if self.jetstream {
            let js = async_nats::jetstream::new(self.client.clone());
            let ack = js
                .publish_with_headers(subject.clone(), h, payload)
                .await
                .map_err(|e| SendError::NotAccepted(format!("publish {subject}: {e}")))?;
            tokio::time::timeout_at(deadline, ack)
                .await
                .map_err(|_| SendError::NotAccepted(format!("no PubAck for {subject}")))?
                .map_err(|e| SendError::NotAccepted(format!("publish {subject}: {e}")))?;
        } else {
            self.client
                .publish_with_headers(subject.clone(), h, payload)
                .await
                .map_err(|e| SendError::NotAccepted(format!("publish {subject}: {e}")))?;
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => Err(SendError::NoOutcome {
                request_id: request_id.clone(),
                after: timeout,
            }),
        }
    }
}

/// Removes a waiter however `send` ends (outcome, error, or the caller dropping the future).
struct Forget<'a>(&'a Waiters, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.lock() {
            w.remove(self.1);
        }
    }
}
