//! Every error the sidecar itself answers with, and the one place that turns them into
//! OpenAI-shaped JSON responses with an `x-llm-sidecar-error` header.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

/// Header naming the sidecar error code, so a client can tell a sidecar-made error from a provider's.
pub const ERROR_HEADER: &str = "x-llm-sidecar-error";

/// Errors produced by the sidecar (not passed through from a provider).
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("{0}")]
    MalformedRequest(String),
    #[error("the model `{model}` does not exist; available models: {}", .available.join(", "))]
    UnknownModel {
        model: String,
        available: Vec<String>,
    },
    #[error("no route serves {path}: the request names no known model and no default_route is configured")]
    NoRoute { path: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request body was not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("failed to read the request body: {0}")]
    BodyRead(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("unknown path {0}")]
    NotFound(String),
    #[error("refused path {path}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("{path} is not passed through to providers; the routing config allows {allowed}")]
    PathNotAllowed { path: String, allowed: String },
    #[error("the sidecar is at its limit of {0} concurrent requests")]
    Overloaded(usize),
    #[error("provider `{provider}` has no API key: {hint}")]
    ProviderKeyMissing { provider: String, hint: String },
    #[error("provider `{provider}` is unreachable: {reason}")]
    UpstreamUnreachable { provider: String, reason: String },
    #[error("provider `{provider}` sent no response headers within {after:?}")]
    UpstreamTimeout { provider: String, after: Duration },
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    /// A daily spend budget refused the request (`on_exhausted: reject`, or no target left).
    #[error("{message}")]
    BudgetExceeded {
        budget: String,
        message: String,
        /// Until the budget's day resets (its local midnight).
        retry_after: Duration,
    },
    /// Every target of the plan failed; keeps the most meaningful upstream error.
    #[error("{message}")]
    AllTargetsFailed {
        status: StatusCode,
        message: String,
        upstream_type: Option<String>,
        upstream_code: Option<String>,
        /// `{"attempts": [...], "skipped": [...]}`
        attempts: serde_json::Value,
    },
}

impl SidecarError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnknownModel { .. } | Self::NoRoute { .. } | Self::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead(_) | Self::InvalidPath { .. } => StatusCode::BAD_REQUEST,
            Self::PathNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Overloaded(_) | Self::ProviderKeyMissing { .. } | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::AllTargetsFailed { status, .. } => *status,
            Self::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The stable machine-readable code: the `error.code` field and the error header value.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedRequest(_) => "invalid_request",
            Self::UnknownModel { .. } => "model_not_found",
            Self::NoRoute { .. } => "no_route",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyTimeout(_) => "request_body_timeout",
            Self::BodyRead(_) => "request_body_error",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NotFound(_) => "not_found",
            Self::InvalidPath { .. } => "invalid_path",
            Self::PathNotAllowed { .. } => "path_not_allowed",
            Self::Overloaded(_) => "sidecar_overloaded",
            Self::ProviderKeyMissing { .. } => "provider_key_missing",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::ShuttingDown => "sidecar_shutting_down",
            Self::AllTargetsFailed { .. } => "all_targets_failed",
            Self::BudgetExceeded { .. } => "budget_exceeded",
        }
    }

    /// The OpenAI `error.type`: client mistakes are `invalid_request_error`, the rest are ours or the
    /// upstream's fault.
    fn kind(&self) -> &'static str {
        if let Self::BudgetExceeded { .. } = self {
            return "insufficient_quota";
        }
        match self.status().as_u16() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::UnknownModel { .. } => Some("model"),
            _ => None,
        }
    }

    /// The JSON body a client receives.
    pub fn body_json(&self) -> serde_json::Value {
        if let Self::AllTargetsFailed {
            message,
            upstream_type,
            upstream_code,
            attempts,
            ..
        } = self
        {
            return json!({
                "error": {
                    "message": message,
                    "type": upstream_type.clone().unwrap_or_else(|| self.kind().to_string()),
                    "param": null,
                    "code": upstream_code,
                    "attempts": attempts["attempts"],
                    "skipped": attempts["skipped"],
                }
            });
        }
        let mut body = json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        if let Self::BudgetExceeded { budget, .. } = self {
            body["error"]["budget"] = json!(budget);
        }
        body
    }

    /// The response a client gets: the OpenAI error JSON, its status and the error header.
    pub fn into_response(self) -> Response<Bytes> {
        let body = Bytes::from(self.body_json().to_string());
        let mut response = Response::new(body);
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if let Self::BudgetExceeded { retry_after, .. } = &self {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_lists_aliases_and_names_the_param() {
        let err = SidecarError::UnknownModel {
            model: "gpt-9".into(),
            available: vec!["a".into(), "b".into()],
        };
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let body = err.body_json();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("gpt-9") && message.contains("a, b"),
            "{message}"
        );
    }

    #[test]
    fn a_spent_budget_is_a_429_naming_it_with_retry_after_until_the_reset() {
        let err = SidecarError::BudgetExceeded {
            budget: "relay-deepseek".into(),
            message: "daily budget `relay-deepseek` is spent; it resets in 3600 s".into(),
            retry_after: Duration::from_secs(3600),
        };
        let body = err.body_json();
        assert_eq!(body["error"]["code"], "budget_exceeded");
        assert_eq!(body["error"]["budget"], "relay-deepseek");
        assert_eq!(body["error"]["type"], "insufficient_quota");
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[ERROR_HEADER], "budget_exceeded");
        assert_eq!(response.headers()[header::RETRY_AFTER], "3600");
    }

    #[test]
    fn upstream_errors_are_server_errors_with_header() {
        let response = SidecarError::UpstreamTimeout {
            provider: "deepseek".into(),
            after: Duration::from_secs(15),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers()[ERROR_HEADER], "upstream_timeout");
    }
}
