//! The NATS transport: JetStream (or core) ingestion of commands, request-reply handlers and
//! events. It decodes messages into domain commands and encodes results; it holds no rules.

pub mod api;
pub mod claim_check;
pub mod connect;
pub mod events;
pub mod health;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod outcomes;
pub mod reads;

use serde::Serialize;

use crate::domain::command::CommandKind;
use crate::domain::error::{RejectCode, Rejection};
use crate::domain::ids::RequestId;
use crate::store::StoreError;

/// Header carrying the correlation id.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";
/// Header carrying the publisher's idempotency key.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Every subject, derived from one prefix.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (`rmos.runs`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `<prefix>.<suffix>`.
    pub fn sub(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }
    /// A command's subject.
    pub fn command(&self, kind: CommandKind) -> String {
        self.sub(kind.suffix())
    }
    /// All command subjects (what the stream captures).
    pub fn commands(&self) -> Vec<String> {
        CommandKind::ALL.iter().map(|k| self.command(*k)).collect()
    }
    /// The command a subject carries.
    pub fn kind_of(&self, subject: &str) -> Option<CommandKind> {
        subject
            .strip_prefix(&self.prefix)?
            .strip_prefix('.')
            .and_then(CommandKind::from_suffix)
    }
    /// `<prefix>.stored`.
    pub fn stored(&self) -> String {
        self.sub("stored")
    }
    /// `<prefix>.rejected`.
    pub fn rejected(&self) -> String {
        self.sub("rejected")
    }
    /// Why the worker must not send a reply to `reply`, if it must not.
    ///
    /// The broker lets the worker answer a request on whatever reply subject the requester
    /// named (`allow_responses`), with the worker's own rights. A reply subject in a system
    /// namespace or among this service's subjects would turn a reader's request into a
    /// worker-signed JetStream API call (`$JS.API.STREAM.PURGE...` accepts any JSON body) or a
    /// command; real inboxes never look like that, so such requests are refused.
    pub fn refused_reply(&self, reply: &str) -> Option<&'static str> {
        if reply.starts_with('$') {
            Some("reply subject in a system namespace ($JS, $SRV, $SYS, ...)")
        } else if reply
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        {
            Some("reply subject among the service's own subjects")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod reply_tests {
    use super::Subjects;

    #[test]
    fn replies_go_to_inboxes_only() {
        let s = Subjects::new("rmos.runs");
        assert_eq!(s.refused_reply("_INBOX.reader.abc.1"), None);
        assert_eq!(s.refused_reply("rmos.runsx.y"), None);
        assert!(s.refused_reply("$JS.API.STREAM.PURGE.RMOS_RUNS").is_some());
        assert!(s.refused_reply("$SRV.PING").is_some());
        assert!(s.refused_reply("rmos.runs.create").is_some());
        assert!(s.refused_reply("rmos.runs").is_some());
    }
}

/// An error as it goes on the wire: protocol code, NATS-services status, message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireError {
    /// `not_found`, `conflict`, ...
    pub code: &'static str,
    /// 400, 404, 409, 413, 422, 503, 507 or 500.
    #[serde(skip)]
    pub status: u16,
    /// Why.
    pub message: String,
}

impl WireError {
    /// An `invalid_request` (400).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::from(&Rejection::invalid(message))
    }
    /// Whether redelivering may succeed (store trouble), as opposed to a permanent refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self.status, 503 | 507)
    }
}

impl From<&Rejection> for WireError {
    fn from(r: &Rejection) -> Self {
        let (code, status) = match r.code {
            RejectCode::InvalidRequest => ("invalid_request", 400),
            RejectCode::NotFound => ("not_found", 404),
            RejectCode::Conflict => ("conflict", 409),
            RejectCode::TooLarge => ("too_large", 413),
            RejectCode::CorruptArtifact => ("corrupt_artifact", 422),
        };
        Self {
            code,
            status,
            message: r.message.clone(),
        }
    }
}

impl From<&StoreError> for WireError {
    fn from(e: &StoreError) -> Self {
        let (code, status) = match e {
            StoreError::Rejected(r) => return WireError::from(r),
            StoreError::NotFound(_) => ("not_found", 404),
            StoreError::Corrupt { .. } => ("corrupt_artifact", 422),
            StoreError::Contention { .. } => ("conflict", 409),
            StoreError::TooLarge(_) => ("too_large", 413),
            StoreError::Unavailable(_) | StoreError::Unusable(_) => ("storage_unavailable", 503),
            StoreError::InsufficientStorage(_) => ("insufficient_storage", 507),
        };
        Self {
            code,
            status,
            message: e.to_string(),
        }
    }
}

/// Header naming who sent a command, as the publisher says; kept in the revision.
pub const ACTOR_HEADER: &str = "Rmos-Actor";

/// The message's `Rmos-Actor`: `Ok(None)` when absent, `Err` naming why when it is not a
/// valid actor (the command is then rejected, not stored without it).
pub fn actor(
    headers: Option<&async_nats::HeaderMap>,
) -> Result<Option<crate::domain::ids::Actor>, String> {
    match headers.and_then(|h| h.get(ACTOR_HEADER)) {
        None => Ok(None),
        Some(v) => crate::domain::ids::Actor::parse(v.as_str())
            .map(Some)
            .map_err(|e| format!("{ACTOR_HEADER}: {e}")),
    }
}

/// The request id of a message: its `X-Request-Id` when valid, else a fresh one.
pub fn request_id(headers: Option<&async_nats::HeaderMap>) -> RequestId {
    headers
        .and_then(|h| h.get(REQUEST_ID_HEADER))
        .and_then(|v| RequestId::parse(v.as_str()).ok())
        .unwrap_or_else(RequestId::generate)
}

/// The message's `Nats-Msg-Id`, if any.
pub fn msg_id(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get(MSG_ID_HEADER))
        .map(|v| v.as_str().to_owned())
        .filter(|s| !s.is_empty())
}
