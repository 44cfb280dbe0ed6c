//! HTTP errors: the protocol's error body (`{"error": {"code", "message", "request_id"}}`)
//! with its status, plus the few codes only HTTP has (401, 403, 404 for an unknown path, 405,
//! 504).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::super::{REQUEST_ID_HEADER, WireError};
use crate::domain::ids::RequestId;

/// An error answer.
#[derive(Debug)]
pub struct HttpError {
    /// Protocol code (`not_found`, ...) or HTTP-only code (`unauthorized`, `forbidden`,
    /// `method_not_allowed`, `unavailable`, `timeout`).
    pub code: &'static str,
    /// Status.
    pub status: StatusCode,
    /// Why.
    pub message: String,
    /// Correlation id.
    pub request_id: RequestId,
}

impl HttpError {
    /// An error with an explicit status and code.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        request_id: &RequestId,
    ) -> Self {
        Self {
            code,
            status,
            message: message.into(),
            request_id: request_id.clone(),
        }
    }

    /// A protocol error.
    pub fn wire(e: WireError, request_id: &RequestId) -> Self {
        Self {
            code: e.code,
            status: StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: e.message,
            request_id: request_id.clone(),
        }
    }

    /// `400 invalid_request`.
    pub fn invalid(message: impl Into<String>, request_id: &RequestId) -> Self {
        Self::wire(WireError::invalid(message), request_id)
    }
}

/// The status of a protocol code found in a `rejected` event.
pub fn status_of_code(code: &str) -> (&'static str, StatusCode) {
    match code {
        "invalid_request" => ("invalid_request", StatusCode::BAD_REQUEST),
        "not_found" => ("not_found", StatusCode::NOT_FOUND),
        "conflict" => ("conflict", StatusCode::CONFLICT),
        "too_large" => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
        "corrupt_artifact" => ("corrupt_artifact", StatusCode::UNPROCESSABLE_ENTITY),
        "storage_unavailable" => ("storage_unavailable", StatusCode::SERVICE_UNAVAILABLE),
        "insufficient_storage" => ("insufficient_storage", StatusCode::INSUFFICIENT_STORAGE),
        _ => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {
            "code": self.code, "message": self.message, "request_id": self.request_id.as_str()}});
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(self.request_id.as_str()) {
            r.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rmos-runs\", charset=\"UTF-8\""),
            );
        }
        r
    }
}
