//! What went wrong with one upstream attempt, and what to do about it.

use std::time::Duration;

use http::StatusCode;

/// The result of one attempt that did not produce a usable answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made.
    Connect(String),
    /// The connection broke before response headers (reset, closed).
    ConnectionLost(String),
    /// No response headers within the header timeout.
    HeaderTimeout(Duration),
    /// Streaming: no first content chunk within the time-to-first-token deadline.
    FirstTokenTimeout(Duration),
    /// Streaming: the body failed before the first content chunk.
    StreamFailedEarly(String),
    /// The sidecar's own config cannot make this request (no key, no valid URI): nothing was
    /// sent. `code` is the machine-readable reason, `message` says what is missing.
    LocalConfig { code: &'static str, message: String },
    /// The provider answered with an error status.
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        error: UpstreamErrorBody,
    },
}

/// The OpenAI-style error a provider sent, as far as it could be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamErrorBody {
    pub message: Option<String>,
    pub kind: Option<String>,
    pub code: Option<String>,
}

impl UpstreamErrorBody {
    pub fn parse(body: &[u8]) -> UpstreamErrorBody {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            let text = String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(500)
                .collect::<String>();
            return UpstreamErrorBody {
                message: (!text.is_empty()).then_some(text),
                ..Default::default()
            };
        };
        let error = value.get("error").unwrap_or(&value);
        let field = |name: &str| match error.get(name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        UpstreamErrorBody {
            message: field("message").or_else(|| error.as_str().map(str::to_string)),
            kind: field("type"),
            code: field("code"),
        }
    }

    fn mentions(&self, needles: &[&str]) -> bool {
        [&self.code, &self.kind, &self.message]
            .into_iter()
            .flatten()
            .any(|text| {
                let text = text.to_ascii_lowercase();
                needles.iter().any(|n| text.contains(n))
            })
    }
}

/// How a failure is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Connection trouble before headers: retry the same target, then fail over.
    Transient,
    /// 429: wait for `Retry-After` when it fits, else back off; then fail over.
    RateLimited(Option<Duration>),
    /// 500/502/503/504: retry once with backoff, then fail over.
    ServerError,
    /// Silent target (no headers / no first token in time): fail over at once, no retry.
    Silent,
    /// The prompt is too long for this model: never retry it; fail over to a larger window.
    ContextTooLong,
    /// The request itself is refused (content policy, bad parameters): return it to the client.
    ClientError,
    /// 401/403/404 from a provider: the target is misconfigured; fail over and say so loudly.
    Misconfigured,
    /// The sidecar cannot build the request for this target (a missing key, a bad URI): nothing
    /// was sent, so the target's health is not in question. Fail over and say so loudly.
    LocalConfig,
}

impl Class {
    /// Whether this failure counts against the target's circuit breaker.
    pub fn counts_against_target(self) -> bool {
        !matches!(
            self,
            Class::ContextTooLong | Class::ClientError | Class::LocalConfig
        )
    }

    /// A short label for headers, metrics and the attempt list.
    pub fn label(self) -> &'static str {
        match self {
            Class::Transient => "connection_error",
            Class::RateLimited(_) => "rate_limited",
            Class::ServerError => "server_error",
            Class::Silent => "timeout",
            Class::ContextTooLong => "context_length_exceeded",
            Class::ClientError => "client_error",
            Class::Misconfigured => "misconfigured",
            Class::LocalConfig => "sidecar_config",
        }
    }

    /// How telling this failure is for the client when every target failed: the highest wins,
    /// so a later, less relevant error never masks the real one.
    pub fn weight(self) -> u8 {
        match self {
            Class::ClientError => 7,
            Class::ContextTooLong => 6,
            Class::RateLimited(_) => 5,
            Class::ServerError => 4,
            Class::Silent => 3,
            Class::Misconfigured | Class::LocalConfig => 2,
            Class::Transient => 1,
        }
    }
}

pub fn classify(failure: &Failure) -> Class {
    match failure {
        Failure::Connect(_) | Failure::ConnectionLost(_) => Class::Transient,
        Failure::HeaderTimeout(_) | Failure::FirstTokenTimeout(_) => Class::Silent,
        Failure::StreamFailedEarly(_) => Class::Transient,
        Failure::LocalConfig { .. } => Class::LocalConfig,
        Failure::Status {
            status,
            retry_after,
            error,
        } => match status.as_u16() {
            429 => Class::RateLimited(*retry_after),
            401 | 403 | 404 => Class::Misconfigured,
            408 => Class::Transient,
            400 | 413 | 422
                if error.mentions(&[
                    "context_length",
                    "context length",
                    "maximum context",
                    "too many tokens",
                ]) =>
            {
                Class::ContextTooLong
            }
            400..=499 => Class::ClientError,
            500 | 502 | 503 | 504 => Class::ServerError,
            _ => Class::ServerError,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, body: &str) -> Failure {
        Failure::Status {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: None,
            error: UpstreamErrorBody::parse(body.as_bytes()),
        }
    }

    #[test]
    fn every_failure_kind_has_its_action() {
        assert_eq!(
            classify(&Failure::Connect("refused".into())),
            Class::Transient
        );
        assert_eq!(
            classify(&Failure::ConnectionLost("reset".into())),
            Class::Transient
        );
        assert_eq!(
            classify(&Failure::HeaderTimeout(Duration::from_secs(15))),
            Class::Silent
        );
        assert_eq!(
            classify(&Failure::FirstTokenTimeout(Duration::from_secs(10))),
            Class::Silent
        );
        let limited = Failure::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::from_secs(2)),
            error: UpstreamErrorBody::default(),
        };
        assert_eq!(
            classify(&limited),
            Class::RateLimited(Some(Duration::from_secs(2)))
        );
        for code in [500, 502, 503, 504] {
            assert_eq!(classify(&status(code, "")), Class::ServerError, "{code}");
        }
        for code in [401, 403] {
            assert_eq!(classify(&status(code, "")), Class::Misconfigured);
        }
        let context = r#"{"error":{"message":"This model's maximum context length is 8 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert_eq!(classify(&status(400, context)), Class::ContextTooLong);
        let policy = r#"{"error":{"message":"filtered","type":"invalid_request_error","code":"content_policy_violation"}}"#;
        assert_eq!(classify(&status(400, policy)), Class::ClientError);
        assert_eq!(classify(&status(422, "{}")), Class::ClientError);
    }

    #[test]
    fn client_and_context_errors_do_not_count_against_the_target() {
        assert!(!Class::ClientError.counts_against_target());
        assert!(!Class::ContextTooLong.counts_against_target());
        assert!(Class::Misconfigured.counts_against_target());
        assert!(Class::Silent.counts_against_target());
    }

    #[test]
    fn error_bodies_are_read_leniently() {
        let e = UpstreamErrorBody::parse(br#"{"error":{"message":"m","type":"t","code":429}}"#);
        assert_eq!(
            (e.message.as_deref(), e.kind.as_deref(), e.code.as_deref()),
            (Some("m"), Some("t"), Some("429"))
        );
        let e = UpstreamErrorBody::parse(b"upstream exploded");
        assert_eq!(e.message.as_deref(), Some("upstream exploded"));
        let e = UpstreamErrorBody::parse(br#"{"error":"plain"}"#);
        assert_eq!(e.message.as_deref(), Some("plain"));
    }
}
