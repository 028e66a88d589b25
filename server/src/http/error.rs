//! Where error kinds become HTTP statuses and OpenAI-style error bodies
//! (`{"error": {"message", "type", "param", "code"}}`): one table over
//! [`ErrorKind`], the same classification the gRPC statuses come from.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flywheel_router::{Classified, ControlError, ErrorKind, PipelineError};

use crate::auth::AuthError;

/// HTTP status for a request a rail refused (as Azure OpenAI answers
/// content-filtered prompts): `400` with code `content_filter`.
pub const BLOCKED_STATUS: StatusCode = StatusCode::BAD_REQUEST;

/// The HTTP status, OpenAI error `type` and `code` of each error kind.
pub fn classify(kind: ErrorKind) -> (StatusCode, &'static str, &'static str) {
    match kind {
        ErrorKind::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_argument"),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
        ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "invalid_request_error", "already_exists"),
        ErrorKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "overloaded"),
        ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "unavailable"),
        ErrorKind::Blocked => (BLOCKED_STATUS, "invalid_request_error", "content_filter"),
        // nginx's "client closed request": the client is gone and never reads it.
        ErrorKind::Cancelled => (
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            "cancelled",
        ),
        ErrorKind::DeadlineExceeded => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "timeout"),
        ErrorKind::FailedPrecondition => (StatusCode::BAD_REQUEST, "invalid_request_error", "failed_precondition"),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error"),
    }
}

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// Machine-readable `code`.
    pub code: &'static str,
    /// What went wrong and what to fix.
    pub message: String,
    /// The request parameter at fault, when there is one.
    pub param: Option<String>,
}

impl ApiError {
    /// A request parameter that cannot be used as given: `400`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_argument",
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A parameter this server does not support: `400`, naming it.
    pub fn unsupported(param: &str, why: &str) -> Self {
        Self {
            code: "unsupported_parameter",
            ..Self::invalid(param, format!("unsupported parameter `{param}`: {why}"))
        }
    }

    /// The OpenAI body of this error.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl ApiError {
    /// The error of `kind`, its message as a client may see it, naming `param`.
    fn classified(error: &(impl Classified + ?Sized), param: Option<&str>) -> Self {
        let (status, kind, code) = classify(error.kind());
        Self {
            status,
            kind,
            code,
            message: crate::errors::public_message(error),
            param: param.map(str::to_string),
        }
    }
}

impl From<&ControlError> for ApiError {
    fn from(error: &ControlError) -> Self {
        let param = match error {
            ControlError::InvalidRequest { field, .. } => Some(*field),
            _ => None,
        };
        Self::classified(error, param)
    }
}

impl From<&PipelineError> for ApiError {
    fn from(error: &PipelineError) -> Self {
        match error {
            // A forced expert is the request's `model`.
            PipelineError::UnknownExpert { .. } => Self {
                code: "model_not_found",
                ..Self::classified(error, Some("model"))
            },
            PipelineError::InvalidRequest { field, .. } => Self::classified(error, Some(field)),
            _ => Self::classified(error, None),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: "invalid_api_key",
            message: error.to_string(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use flywheel_router::engine::EngineError;

    use super::*;

    #[test]
    fn every_kind_has_a_status_and_client_errors_are_4xx() {
        for kind in ErrorKind::ALL {
            let (status, _, code) = classify(kind);
            let client = !matches!(kind, ErrorKind::Internal | ErrorKind::Unavailable);
            assert_eq!(status.is_client_error(), client, "{kind:?}");
            assert!(!code.is_empty());
        }
        // The transports agree: what gRPC calls INVALID_ARGUMENT is 400 here.
        for kind in ErrorKind::ALL {
            let grpc = crate::grpc::status::code(kind);
            let (http, _, _) = classify(kind);
            if grpc == tonic::Code::InvalidArgument {
                assert_eq!(http, StatusCode::BAD_REQUEST);
            }
        }
    }

    #[test]
    fn internal_errors_hide_their_cause_and_client_errors_name_their_parameter() {
        let e = ApiError::from(&PipelineError::Engine(EngineError::Backend(anyhow::anyhow!(
            "secret /path"
        ))));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("secret"));
        let e = ApiError::from(&PipelineError::UnknownExpert {
            name: "gpt-4".into(),
            known: "hr, it".into(),
        });
        assert_eq!(
            (e.status, e.code, e.param.as_deref()),
            (StatusCode::NOT_FOUND, "model_not_found", Some("model"))
        );
        let e = ApiError::from(&PipelineError::Overloaded { max: 4 });
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let body = ApiError::unsupported("tools", "tool calls are not supported").body();
        assert_eq!(body["error"]["param"], "tools");
        assert_eq!(body["error"]["code"], "unsupported_parameter");
        assert!(body["error"]["message"].as_str().unwrap().contains("`tools`"));
    }
}
