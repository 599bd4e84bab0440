//! One benchmark request, sent the way the sidecar sends an attempt: built by
//! `outbound::request` (the provider's URI, `Host` and key), sent by the sidecar's `Upstream`
//! under the config's header timeout, a stream read event by event with the SSE parser under
//! the first-token and idle timeouts, and a failure classified by `routing::classify`. One
//! attempt, no retry and no fallback: the target is measured on its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use tokio::time::{timeout_at, Instant};

use super::stats::{Answered, Outcome};
use crate::config::Snapshot;
use crate::providers::Provider;
use crate::proxy::sse::{inspect, Chunk, SseParser};
use crate::routing::backoff::parse_retry_after;
use crate::routing::classify::{classify, Failure, UpstreamErrorBody};
use crate::routing::tokens;
use crate::telemetry::cost::Usage;
use crate::upstream::{Upstream, UpstreamError};

/// The most of an error body that is read to classify it.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of an answer that is kept (for the agreement score and a plain answer's JSON).
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// The timeouts of one request, from the config's `timeouts` and `resilience`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub response_headers: Duration,
    pub first_token: Duration,
    pub stream_idle: Duration,
    pub deadline: Duration,
}

impl Limits {
    pub fn of(snapshot: &Snapshot) -> Limits {
        Limits {
            response_headers: snapshot.timeouts.response_headers,
            first_token: snapshot.resilience.first_token_timeout,
            stream_idle: snapshot.resilience.stream_idle_timeout,
            deadline: snapshot.resilience.deadline,
        }
    }
}

fn failed(failure: Failure) -> Outcome {
    let detail = match &failure {
        Failure::Connect(e) | Failure::ConnectionLost(e) | Failure::StreamFailedEarly(e) => {
            e.clone()
        }
        Failure::HeaderTimeout(d) => format!("no response headers within {d:?}"),
        Failure::FirstTokenTimeout(d) => format!("no first token within {d:?}"),
        Failure::LocalConfig { message, .. } => message.clone(),
        Failure::Status { status, error, .. } => match &error.message {
            Some(m) => format!("{status}: {m}"),
            None => status.to_string(),
        },
    };
    Outcome::Failed {
        class: classify(&failure).label(),
        detail,
    }
}

fn broken(class: &'static str, detail: impl Into<String>) -> Outcome {
    Outcome::Failed {
        class,
        detail: detail.into(),
    }
}

/// Sends `body` (a chat request already naming the target's model) to `provider` and measures
/// the answer.
pub async fn measure(
    upstream: &Arc<Upstream>,
    provider: &Provider,
    body: Bytes,
    stream: bool,
    limits: Limits,
) -> Outcome {
    let prompt_estimate = serde_json::from_slice::<Value>(&body)
        .map(|v| tokens::estimate_prompt(v.get("messages"), v.get("prompt")))
        .unwrap_or(0);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let request = match crate::outbound::request(
        provider,
        Method::POST,
        "/v1/chat/completions",
        &headers,
        body,
        None,
    ) {
        Ok(r) => r,
        Err(m) => {
            return failed(Failure::LocalConfig {
                code: m.code,
                message: m.to_string(),
            })
        }
    };
    let started = Instant::now();
    let deadline = started + limits.deadline;
    let headers_by = (started + limits.response_headers).min(deadline);
    let (response, lease) = match timeout_at(headers_by, upstream.send(request)).await {
        Err(_) => return failed(Failure::HeaderTimeout(limits.response_headers)),
        Ok(Err(UpstreamError::Connect(e))) => return failed(Failure::Connect(e)),
        Ok(Err(UpstreamError::Exchange(e))) => return failed(Failure::ConnectionLost(e)),
        Ok(Ok(pair)) => pair,
    };
    let status = response.status();
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let (bytes, _) = read_all(response.into_body(), deadline, MAX_ERROR_BODY).await;
        return failed(Failure::Status {
            status,
            retry_after,
            error: UpstreamErrorBody::parse(&bytes),
        });
    }
    let body = response.into_body();
    let read = if stream {
        read_stream(body, started, deadline, limits).await
    } else {
        read_plain(body, started, deadline).await
    };
    match read {
        Ok(mut answered) => {
            if let Some(lease) = lease {
                lease.release();
            }
            if !answered.usage_reported {
                answered.usage = Usage {
                    input: prompt_estimate,
                    output: tokens::estimate_text(&answered.text),
                    cached_input: 0,
                };
            }
            Outcome::Answered(answered)
        }
        Err(outcome) => outcome,
    }
}

/// The body up to `cap` bytes and whether it ended cleanly before `deadline`.
async fn read_all(
    mut body: Incoming,
    deadline: Instant,
    cap: usize,
) -> (Vec<u8>, Result<(), String>) {
    let mut bytes = Vec::new();
    loop {
        match timeout_at(deadline, body.frame()).await {
            Err(_) => return (bytes, Err("the request deadline passed".into())),
            Ok(None) => return (bytes, Ok(())),
            Ok(Some(Err(e))) => return (bytes, Err(crate::upstream::describe(&e))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let room = cap.saturating_sub(bytes.len());
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    }
}

async fn read_plain(
    body: Incoming,
    started: Instant,
    deadline: Instant,
) -> Result<Answered, Outcome> {
    let (bytes, ended) = read_all(body, deadline, MAX_ANSWER).await;
    if let Err(why) = ended {
        return Err(failed(Failure::ConnectionLost(why)));
    }
    let latency = started.elapsed();
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| broken("malformed_answer", format!("not JSON: {e}")))?;
    let Some(choice) = value.pointer("/choices/0") else {
        return Err(broken("malformed_answer", "no choices in the answer"));
    };
    let text = choice
        .pointer("/message/content")
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let usage = value
        .get("usage")
        .and_then(|u| serde_json::from_value::<crate::telemetry::cost::UsageMember>(u.clone()).ok())
        .and_then(|member| member.usage);
    Ok(Answered {
        latency,
        first_token: None,
        usage: usage.unwrap_or_default(),
        usage_reported: usage.is_some(),
        text,
    })
}

async fn read_stream(
    mut body: Incoming,
    started: Instant,
    deadline: Instant,
    limits: Limits,
) -> Result<Answered, Outcome> {
    let mut parser = SseParser::default();
    let mut text = String::new();
    let mut first_token = None;
    let mut usage = None;
    let mut done = false;
    let first_token_by = (started + limits.first_token).min(deadline);
    while !done {
        let by = match first_token {
            None => first_token_by,
            Some(_) => (Instant::now() + limits.stream_idle).min(deadline),
        };
        let frame = match timeout_at(by, body.frame()).await {
            Err(_) if first_token.is_none() => {
                return Err(failed(Failure::FirstTokenTimeout(limits.first_token)))
            }
            Err(_) if Instant::now() >= deadline => {
                return Err(broken("stream_interrupted", "the request deadline passed"))
            }
            Err(_) => {
                return Err(broken(
                    "stream_interrupted",
                    format!("no event for {:?}", limits.stream_idle),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) if first_token.is_none() => {
                return Err(failed(Failure::StreamFailedEarly(
                    crate::upstream::describe(&e),
                )))
            }
            Ok(Some(Err(e))) => {
                return Err(broken("stream_interrupted", crate::upstream::describe(&e)))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for event in parser.push(&data) {
            let Some(data) = event.data else { continue };
            match inspect(&data) {
                Chunk::Done => done = true,
                Chunk::Malformed => {}
                Chunk::Error(error) => {
                    return Err(broken(
                        "stream_error",
                        error.chars().take(300).collect::<String>(),
                    ))
                }
                Chunk::UsageOnly { usage: u, .. } => usage = u.or(usage),
                Chunk::Content {
                    text: piece,
                    substantive,
                    usage: u,
                    ..
                } => {
                    if substantive && first_token.is_none() {
                        first_token = Some(started.elapsed());
                    }
                    if text.len() < MAX_ANSWER {
                        text.push_str(&piece);
                    }
                    if u.is_some() {
                        usage = u;
                    }
                }
            }
        }
        if parser.overflowed() {
            return Err(broken("stream_interrupted", "an event larger than 1 MiB"));
        }
    }
    if !done {
        return Err(match first_token {
            None => failed(Failure::StreamFailedEarly(
                "the stream ended before any content".into(),
            )),
            Some(_) => broken("stream_interrupted", "the stream ended without [DONE]"),
        });
    }
    Ok(Answered {
        latency: started.elapsed(),
        first_token,
        usage: usage.unwrap_or_default(),
        usage_reported: usage.is_some(),
        text,
    })
}
