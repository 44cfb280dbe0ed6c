//! The domain's rejection: a command that can never succeed as sent, with the protocol code
//! that names why.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a command or request is refused. The string forms are the codes of PROTOCOL.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Malformed JSON, schema violation, bad id, bad hash.
    InvalidRequest,
    /// The run does not exist (or was deleted).
    NotFound,
    /// The change contradicts what is stored (different create content, stale revision).
    Conflict,
    /// A size or depth limit was exceeded.
    TooLarge,
    /// A stored artifact cannot be decoded.
    CorruptArtifact,
}

impl RejectCode {
    /// The protocol's code string.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidRequest => "invalid_request",
            RejectCode::NotFound => "not_found",
            RejectCode::Conflict => "conflict",
            RejectCode::TooLarge => "too_large",
            RejectCode::CorruptArtifact => "corrupt_artifact",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which refusal of a code this is, where the transport decides differently on them. The
/// protocol code alone does not say it: both a run that does not exist yet and a run that was
/// deleted are `not_found`, but only the first may still appear (its create on its way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// Nothing more to say than the code.
    #[default]
    Plain,
    /// The run has no record at all (it may be created later).
    Missing,
    /// The run existed and was deleted: it never comes back.
    Deleted,
}

/// A permanent refusal: retrying the same command can never succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// The protocol code.
    pub code: RejectCode,
    /// The refusal's kind within its code (decisions are made on this, never on the message).
    pub kind: RejectKind,
    /// A human-readable reason naming the field or value at fault.
    pub message: String,
}

impl Rejection {
    /// A rejection with the given code and message.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            kind: RejectKind::Plain,
            message: message.into(),
        }
    }
    /// The same rejection with `kind`.
    pub fn with_kind(mut self, kind: RejectKind) -> Self {
        self.kind = kind;
        self
    }
    /// `not_found` for a run that has no record.
    pub fn missing(message: impl Into<String>) -> Self {
        Self::not_found(message).with_kind(RejectKind::Missing)
    }
    /// `not_found` for a run that was deleted.
    pub fn deleted(message: impl Into<String>) -> Self {
        Self::not_found(message).with_kind(RejectKind::Deleted)
    }
    /// `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(RejectCode::InvalidRequest, message)
    }
    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(RejectCode::NotFound, message)
    }
    /// `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(RejectCode::Conflict, message)
    }
    /// `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(RejectCode::TooLarge, message)
    }
}
