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

/// A permanent refusal: retrying the same command can never succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// The protocol code.
    pub code: RejectCode,
    /// A human-readable reason naming the field or value at fault.
    pub message: String,
}

impl Rejection {
    /// A rejection with the given code and message.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
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
