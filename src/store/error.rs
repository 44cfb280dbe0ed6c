//! The store layer's error type. `is_transient` tells the transport whether to redeliver.

use object_store::Error as OsError;

use crate::domain::error::Rejection;
use crate::domain::ids::RunId;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The command was refused by the domain (permanent).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The run does not exist, or was deleted.
    #[error("run {0} not found")]
    NotFound(RunId),
    /// A stored object cannot be decoded; it is reported, never overwritten.
    #[error("corrupt artifact {key}: {reason}")]
    Corrupt {
        /// The object's key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
    /// Too many concurrent writers won the race, even after the bounded retries.
    #[error("run {run_id}: update lost the race {attempts} times; giving up")]
    Contention {
        /// The run.
        run_id: RunId,
        /// Attempts made.
        attempts: u32,
    },
    /// The store is full (ENOSPC, EDQUOT, S3 quota / 507). Transient: retry later.
    #[error("insufficient storage: {0}")]
    InsufficientStorage(String),
    /// The store refused an object as too large.
    #[error("object too large: {0}")]
    TooLarge(String),
    /// The store could not be reached or failed (transient).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The store cannot be used at all (bad URL, ignores conditional writes, not writable).
    #[error("store unusable: {0}")]
    Unusable(String),
}

impl StoreError {
    /// True when the same operation may succeed later (redeliver, do not reject).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::InsufficientStorage(_)
        )
    }

    /// Classifies an `object_store` error that is not an expected outcome
    /// (not-found and precondition failures are handled by the callers).
    pub fn from_object_store(e: OsError, context: &str) -> StoreError {
        let text = format!("{context}: {e}");
        if let Some(code) = io_code(&e)
            && (code == libc::ENOSPC || code == libc::EDQUOT)
        {
            return StoreError::InsufficientStorage(text);
        }
        let chain = error_chain_text(&e);
        if chain.contains("EntityTooLarge") || chain.contains("413 Payload Too Large") {
            return StoreError::TooLarge(text);
        }
        // Named markers only: a bare "507" also matches durations and ids in the message
        // ("after 1.913838507s").
        if [
            "XMinioStorageFull",
            "507 Insufficient Storage",
            "QuotaExceeded",
            "InsufficientStorage",
            "No space left",
        ]
        .iter()
        .any(|s| chain.contains(s))
        {
            return StoreError::InsufficientStorage(text);
        }
        StoreError::Unavailable(text)
    }
}

fn io_code(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        cur = err.source();
    }
    None
}

fn error_chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        out.push_str(&err.to_string());
        out.push_str(" | ");
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(msg: &str) -> OsError {
        OsError::Generic {
            store: "S3",
            source: Box::new(std::io::Error::other(msg.to_owned())),
        }
    }

    #[test]
    fn classification_uses_named_markers_not_digits() {
        let e = StoreError::from_object_store(
            generic("GET http://h/b/k in 1.913838507s, after 10 retries - HTTP error"),
            "read k",
        );
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        let e = StoreError::from_object_store(
            generic("Server returned non-2xx status code: 507 Insufficient Storage"),
            "write k",
        );
        assert!(matches!(e, StoreError::InsufficientStorage(_)), "{e}");
        let e = StoreError::from_object_store(generic("<Code>XMinioStorageFull</Code>"), "write k");
        assert!(matches!(e, StoreError::InsufficientStorage(_)), "{e}");
    }
}
