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
    /// (not-found and precondition failures are handled by the callers), on types and codes
    /// only: the error variant, the OS error number, the HTTP transport error kind and the
    /// HTTP status and S3 error code of the response ([`StoreFault`]).
    pub fn from_object_store(e: OsError, context: &str) -> StoreError {
        let text = format!("{context}: {e}");
        if matches!(
            e,
            OsError::PermissionDenied { .. } | OsError::Unauthenticated { .. }
        ) {
            return StoreError::Unusable(text);
        }
        match StoreFault::of(&e) {
            StoreFault::Io(code) if code == libc::ENOSPC || code == libc::EDQUOT => {
                StoreError::InsufficientStorage(text)
            }
            StoreFault::Io(code) if code == libc::EFBIG => StoreError::TooLarge(text),
            StoreFault::Http { status, s3_code } => match (status, s3_code.as_deref()) {
                (413, _) | (_, Some("EntityTooLarge")) => StoreError::TooLarge(text),
                (507, _)
                | (_, Some("XMinioStorageFull" | "QuotaExceeded" | "InsufficientStorage")) => {
                    StoreError::InsufficientStorage(text)
                }
                _ => StoreError::Unavailable(text),
            },
            _ => StoreError::Unavailable(text),
        }
    }
}

/// What an `object_store` error says about its cause, read from types and codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreFault {
    /// An OS error number (local filesystem).
    Io(i32),
    /// An HTTP response that was not a success: its status, and the S3 `<Code>` of its body.
    Http {
        /// The HTTP status.
        status: u16,
        /// The S3 error code (`EntityTooLarge`, `XMinioStorageFull`, ...), when the body has one.
        s3_code: Option<String>,
    },
    /// Nothing more specific.
    Other,
}

/// How object_store 0.14 renders the response of a failed HTTP request. Its `RetryError`
/// (which has `status()`) is crate-private, so the status is read from this one field of the
/// one error in the chain that renders it, never searched for in the whole message.
const STATUS_PREFIX: &str = "Server returned non-2xx status code: ";
/// How it renders an error in the body of a successful response.
const ERROR_BODY_PREFIX: &str = "Server returned error response: ";

impl StoreFault {
    /// Walks `e`'s source chain for the innermost cause it can name.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> StoreFault {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && let Some(code) = io.raw_os_error()
            {
                return StoreFault::Io(code);
            }
            // The innermost source of a RetryError is the request error itself: it has no
            // source of its own when it carries a status.
            if err.source().is_none()
                && let Some(fault) = Self::from_request_error(&err.to_string())
            {
                return fault;
            }
            cur = err.source();
        }
        StoreFault::Other
    }

    /// `Server returned non-2xx status code: 507 Insufficient Storage: <body>`, or an error
    /// body in a successful response (`Server returned error response: <body>`).
    fn from_request_error(rendered: &str) -> Option<StoreFault> {
        if let Some(body) = rendered.strip_prefix(ERROR_BODY_PREFIX) {
            return Some(StoreFault::Http {
                status: 200,
                s3_code: s3_code(body),
            });
        }
        let rest = rendered.strip_prefix(STATUS_PREFIX)?;
        let status: u16 = rest.get(..3)?.parse().ok()?;
        Some(StoreFault::Http {
            status,
            s3_code: s3_code(rest),
        })
    }
}

/// The `<Code>` element of an S3 error body.
fn s3_code(body: &str) -> Option<String> {
    let start = body.find("<Code>")? + "<Code>".len();
    let len = body[start..].find("</Code>")?;
    let code = body[start..start + len].trim();
    (!code.is_empty()).then(|| code.to_owned())
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

    /// An error whose chain ends in a request error rendered as object_store renders it.
    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner(String);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "Error performing PUT http://h/b/k in 1.913838507s - {}",
                self.0
            )
        }
    }
    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    fn http(status: &str, body: &str) -> OsError {
        OsError::Generic {
            store: "S3",
            source: Box::new(Outer(Inner(format!("{STATUS_PREFIX}{status}: {body}")))),
        }
    }

    #[test]
    fn classification_uses_status_and_code_not_text() {
        // Digits and words in a message decide nothing.
        let e = StoreError::from_object_store(
            generic("GET http://h/b/k in 1.913838507s, 507 Insufficient Storage, EntityTooLarge"),
            "read k",
        );
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        let e = StoreError::from_object_store(http("507 Insufficient Storage", ""), "write k");
        assert!(matches!(e, StoreError::InsufficientStorage(_)), "{e}");
        let e = StoreError::from_object_store(
            http(
                "400 Bad Request",
                "<Error><Code>EntityTooLarge</Code></Error>",
            ),
            "write k",
        );
        assert!(matches!(e, StoreError::TooLarge(_)), "{e}");
        let e = StoreError::from_object_store(http("413 Payload Too Large", ""), "write k");
        assert!(matches!(e, StoreError::TooLarge(_)), "{e}");
        let e = StoreError::from_object_store(
            http(
                "503 Service Unavailable",
                "<Error><Code>XMinioStorageFull</Code></Error>",
            ),
            "write k",
        );
        assert!(matches!(e, StoreError::InsufficientStorage(_)), "{e}");
        let e = StoreError::from_object_store(
            http("503 Service Unavailable", "<Code>SlowDown</Code>"),
            "write k",
        );
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    }

    #[test]
    fn os_error_numbers() {
        let io = |code| OsError::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from_raw_os_error(code)),
        };
        assert!(matches!(
            StoreError::from_object_store(io(libc::ENOSPC), "w"),
            StoreError::InsufficientStorage(_)
        ));
        assert!(matches!(
            StoreError::from_object_store(io(libc::EFBIG), "w"),
            StoreError::TooLarge(_)
        ));
        assert!(matches!(
            StoreError::from_object_store(io(libc::EIO), "w"),
            StoreError::Unavailable(_)
        ));
    }
}
