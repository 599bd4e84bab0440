//! One model request end to end: walk the plan, retry and fail over by failure class, honour
//! rate limits inside the deadline, and commit the answer only once it is usable: response
//! headers for a plain answer, the first content chunk for a stream. After a stream is committed,
//! a cut, stall or broken chunk is never passed off as success: the answer is continued on a
//! prefill-capable target or the stream ends with an explicit error event and no `[DONE]`.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::body::{full, BoxError, ChannelBody, ProxyBody};
use super::sse::{inspect, Chunk, RawEvent, SseParser};
use super::upstream::{Lease, Upstream, UpstreamError};
use crate::config::{Route, Snapshot, Target, FALLBACK, ONLY_TARGET};
use crate::errors::SidecarError;
use crate::openai::RequestBody;
use crate::providers::ProviderKind;
use crate::routing::backoff::parse_retry_after;
use crate::routing::breaker::Admission;
use crate::routing::budget::RetryBudget;
use crate::routing::classify::{classify, Class, Failure, UpstreamErrorBody};
use crate::routing::health::Health;
use crate::routing::plan::{plan, PlanRequest, Step};
use crate::routing::policy::{self, AtEnd, Failed, Next};
use crate::routing::rollout::Decision;
use crate::routing::tokens;
use crate::telemetry::cost::{format_usd, Bill, Usage};
use crate::telemetry::metrics::{Metrics, TargetMetrics};
use crate::telemetry::{otel, Operation};
use opentelemetry::KeyValue;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const HEADER_ATTEMPTS: HeaderName = HeaderName::from_static("x-llm-sidecar-attempts");
pub const HEADER_FALLBACKS: HeaderName = HeaderName::from_static("x-llm-sidecar-fallbacks");
pub const HEADER_ATTEMPT_LOG: HeaderName = HeaderName::from_static("x-llm-sidecar-attempt-log");
pub const HEADER_TRUNCATED: HeaderName =
    HeaderName::from_static("x-llm-sidecar-truncated-messages");
pub const HEADER_PREFER: HeaderName = HeaderName::from_static("x-llm-sidecar-prefer");
pub const HEADER_LOW_LATENCY: HeaderName = HeaderName::from_static("x-llm-sidecar-low-latency");
pub const HEADER_COST: HeaderName = HeaderName::from_static("x-llm-sidecar-cost-usd");

/// A plain answer is read whole before it is sent, up to this size, so a cut body is retried
/// and its cost is known for the response header. Larger answers stream through unpriced.
const MAX_BUFFERED_ANSWER: usize = 8 * 1024 * 1024;
/// Message content recorded on a span (when enabled) is cut to this many bytes.
const MAX_CONTENT_ATTRIBUTE: usize = 16 * 1024;

/// What the request's answer was, for its log line, metrics, `/stats` and server span. The
/// exchange fills it; a committed stream keeps filling it until its end.
#[derive(Default)]
pub struct Outcome {
    /// Upstream attempts, the attempt header's number.
    pub attempts: u32,
    /// Moves from one target to another.
    pub fallbacks: u32,
    /// The answer came after at least one failed attempt.
    pub fell_back: bool,
    /// The last target tried, for a request that got no answer.
    pub last: Option<Arc<TargetMetrics>>,
    /// Reported usage of the answer, summed over a continued stream's parts.
    pub usage: Option<Usage>,
    pub bill: Bill,
    pub ttft: Option<Duration>,
    /// A committed stream broke and ended with an error event.
    pub interrupted: bool,
    /// The whole answer was handed over: a client that closes right after a stream's `[DONE]`
    /// did not cancel anything.
    pub complete: bool,
}

pub type SharedOutcome = Arc<Mutex<Outcome>>;

pub fn lock(outcome: &SharedOutcome) -> MutexGuard<'_, Outcome> {
    outcome.lock().unwrap_or_else(|p| p.into_inner())
}

/// The request fields attempt spans show.
#[derive(Default)]
struct RequestMeta {
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    /// The request's messages (or prompt/input), only when content recording is on.
    content: Option<String>,
}

impl RequestMeta {
    fn read(parsed: &RequestBody<'_>) -> RequestMeta {
        let number = |key: &str| parsed.field(key).and_then(|v| v.get().parse::<f64>().ok());
        RequestMeta {
            max_tokens: number("max_tokens")
                .or_else(|| number("max_completion_tokens"))
                .map(|v| v as i64),
            temperature: number("temperature"),
            content: otel::record_content()
                .then(|| {
                    parsed
                        .field("messages")
                        .or_else(|| parsed.field("prompt"))
                        .or_else(|| parsed.field("input"))
                        .map(|raw| cut(raw.get()))
                })
                .flatten(),
        }
    }
}

fn cut(text: &str) -> String {
    if text.len() <= MAX_CONTENT_ATTRIBUTE {
        return text.to_string();
    }
    let mut end = MAX_CONTENT_ATTRIBUTE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Why an attempt is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttemptKind {
    Initial,
    Retry,
    Fallback,
    RateLimitWait,
    Continuation,
}

impl AttemptKind {
    fn as_str(self) -> &'static str {
        match self {
            AttemptKind::Initial => "initial",
            AttemptKind::Retry => "retry",
            AttemptKind::Fallback => "fallback",
            AttemptKind::RateLimitWait => "rate_limit_wait",
            AttemptKind::Continuation => "continuation",
        }
    }
}

/// What a plain answer's body says about itself, for the attempt span.
#[derive(Default, serde::Deserialize)]
struct PlainAnswer<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Vec<PlainChoice<'a>>,
}

/// A plain answer's usage, read on its own so an odd field elsewhere cannot lose it.
#[derive(Default, serde::Deserialize)]
struct PlainUsage {
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(serde::Deserialize)]
struct PlainChoice<'a> {
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

/// What one answer (or one part of a continued stream) reported.
#[derive(Default)]
struct Reported {
    usage: Option<Usage>,
    model: Option<String>,
    finish_reasons: Vec<String>,
    /// The answer text, only when content recording is on.
    content: Option<String>,
}

impl Reported {
    /// Reads a plain answer: its usage always, the rest only for a `traced` request.
    fn from_plain(bytes: &[u8], traced: bool) -> Reported {
        let read: PlainUsage = serde_json::from_slice(bytes).unwrap_or_default();
        let usage = read.usage.as_ref().and_then(Usage::from_json);
        if !traced {
            return Reported {
                usage,
                ..Reported::default()
            };
        }
        let answer: PlainAnswer = serde_json::from_slice(bytes).unwrap_or_default();
        Reported {
            usage,
            model: answer.model.map(Cow::into_owned),
            finish_reasons: answer
                .choices
                .into_iter()
                .filter_map(|c| c.finish_reason.map(Cow::into_owned))
                .collect(),
            content: otel::record_content().then(|| cut(&String::from_utf8_lossy(bytes))),
        }
    }
}

const OVERSIZED_EVENT: &str = "the provider sent more than 1 MiB without ending an event";

/// Error bodies are read to classify them, up to this size.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What every request shares: connections, target health, the retry budget, metrics.
pub struct Core {
    pub upstream: Arc<Upstream>,
    pub health: Health,
    pub budget: RetryBudget,
    pub metrics: Arc<Metrics>,
    pub guard: crate::routing::guard::Guard,
    pub shadows: Arc<crate::shadow::Shadows>,
}

/// One attempt, for the attempt log and the final error.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    pub step: Step,
    pub outcome: &'static str,
    pub status: Option<u16>,
    pub duration: Duration,
}

impl AttemptRecord {
    fn json(&self) -> Value {
        let target = self.step.target();
        json!({
            "route": self.step.route.name,
            "provider": target.provider.name,
            "model": target.model,
            "outcome": self.outcome,
            "status": self.status,
            "duration_ms": self.duration.as_millis() as u64,
        })
    }
}

/// The most meaningful failure so far: what the client is told when every target fails.
struct Worst {
    class: Class,
    failure: Failure,
    target: String,
}

/// A usable answer, ready to be sent to the client.
pub struct Committed {
    pub response: Response<ProxyBody>,
    pub route: Arc<Route>,
    pub side: ProviderKind,
    pub lease: Option<Lease>,
}

/// What an attempt produced before anything was sent to the client.
enum Answer {
    Plain {
        head: http::response::Parts,
        body: PlainBody,
        lease: Option<Lease>,
    },
    Stream {
        head: http::response::Parts,
        body: Incoming,
        parser: SseParser,
        prefix: Vec<RawEvent>,
        lease: Option<Lease>,
        /// From the request to the upstream to its first content chunk.
        ttft: Duration,
    },
}

enum PlainBody {
    /// Read to the end: the connection is free again.
    Whole(Bytes),
    /// Too large to hold: what was read, then the rest as it comes.
    Large { read: Vec<Bytes>, rest: Incoming },
}

/// Reads a plain answer; every frame must come within `idle` (providers that keep the
/// connection alive with blank lines while they generate pass), all of it before `deadline`.
async fn read_answer(
    mut body: Incoming,
    idle: Duration,
    deadline: Instant,
) -> Result<PlainBody, Failure> {
    // Most answers come in one frame: it is kept apart, without a list to hold it.
    let mut first: Option<Bytes> = None;
    let mut read: Vec<Bytes> = Vec::new();
    let mut size = 0;
    loop {
        // A frame already read from the connection needs no timer.
        let next = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(frame) => Ok(frame),
            None => {
                let until = (Instant::now() + idle).min(deadline);
                tokio::time::timeout_at(until, body.frame()).await
            }
        };
        match next {
            Err(_) => {
                return Err(Failure::ConnectionLost(format!(
                    "the answer body stalled (no data for {idle:?}, or the deadline passed)"
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(Failure::ConnectionLost(format!(
                    "the answer body broke: {}",
                    super::upstream::describe(&err)
                )))
            }
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                size += data.len();
                if first.is_none() && read.is_empty() {
                    first = Some(data);
                } else {
                    read.extend(first.take());
                    read.push(data);
                }
                if size > MAX_BUFFERED_ANSWER {
                    read.extend(first);
                    return Ok(PlainBody::Large { read, rest: body });
                }
            }
        }
    }
    Ok(PlainBody::Whole(match first {
        Some(only) => only,
        None => read.concat().into(),
    }))
}

/// A failed attempt; `passthrough` keeps a provider's own error to return as it is.
struct AttemptError {
    failure: Failure,
    passthrough: Option<(StatusCode, HeaderMap, Bytes)>,
}

impl From<Failure> for AttemptError {
    fn from(failure: Failure) -> Self {
        AttemptError {
            failure,
            passthrough: None,
        }
    }
}

pub struct Exchange {
    core: Arc<Core>,
    snapshot: Arc<Snapshot>,
    /// The side order and its reason (flags, guard, rollout bucket).
    decision: Decision,
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    bytes: Bytes,
    route: Arc<Route>,
    stream: bool,
    /// The client did not ask for usage in its stream; the sidecar asked, and strips it.
    usage_added: bool,
    prompt_tokens: u64,
    /// Messages after truncation to fit, as raw JSON.
    messages_override: Option<String>,
    truncated: usize,
    prefer: Option<String>,
    low_latency: bool,
    deadline: Instant,
    attempts: Vec<AttemptRecord>,
    steps: Vec<Step>,
    skipped: Vec<crate::routing::plan::Skipped>,
    /// The body for the first planned target, rendered while the request was parsed anyway.
    first_body: Option<Bytes>,
    /// The request's server span, parent of the attempt spans (disabled without tracing).
    trace: tracing::Span,
    operation: Operation,
    meta: RequestMeta,
    outcome: SharedOutcome,
}

impl Exchange {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: Arc<Core>,
        snapshot: Arc<Snapshot>,
        decision: Decision,
        method: Method,
        path_and_query: String,
        headers: HeaderMap,
        bytes: Bytes,
        parsed: &RequestBody<'_>,
        route: Arc<Route>,
        trace: tracing::Span,
        outcome: SharedOutcome,
    ) -> Exchange {
        let prefer = headers
            .get(HEADER_PREFER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let low_latency = headers
            .get(HEADER_LOW_LATENCY)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes")
            });
        // The sidecar's own request headers are read here and never forwarded.
        let mut headers = headers;
        super::strip_request_headers(&mut headers);
        let stream = parsed.stream;
        let usage_added = stream
            && !parsed
                .field("stream_options")
                .and_then(|o| serde_json::from_str::<Value>(o.get()).ok())
                .is_some_and(|o| o["include_usage"] == Value::Bool(true));
        let prompt_tokens = estimate_prompt(&snapshot, &route, parsed);
        let deadline = Instant::now() + snapshot.resilience.deadline;
        let operation = Operation::from_path(&path_and_query);
        let meta = if !trace.is_disabled() {
            RequestMeta::read(parsed)
        } else {
            RequestMeta::default()
        };
        let mut exchange = Exchange {
            trace,
            operation,
            meta,
            outcome,
            core,
            snapshot,
            decision,
            method,
            path_and_query,
            headers,
            bytes,
            route,
            stream,
            usage_added,
            prompt_tokens,
            messages_override: None,
            truncated: 0,
            prefer,
            low_latency,
            deadline,
            attempts: Vec::new(),
            steps: Vec::new(),
            skipped: Vec::new(),
            first_body: None,
        };
        exchange.truncate_if_needed();
        let (steps, skipped) = exchange.plan_steps();
        if let Some(first) = steps.first() {
            let target = first.target();
            exchange.first_body = Some(exchange.render_body(parsed, target, None));
        }
        exchange.steps = steps;
        exchange.skipped = skipped;
        exchange
    }

    fn plan_steps(&self) -> (Vec<Step>, Vec<crate::routing::plan::Skipped>) {
        let request = PlanRequest {
            prefer: self.prefer.as_deref(),
            low_latency: self.low_latency,
            prompt_tokens: self.prompt_tokens,
            order: self.decision.order,
        };
        let plan = plan(
            &self.snapshot,
            &self.route,
            &request,
            &self.core.health.lookup(Instant::now()),
        );
        (plan.steps, plan.skipped)
    }

    /// When no target's window fits and the route allows it, drops the oldest non-system
    /// messages to fit the largest window of the chain.
    fn truncate_if_needed(&mut self) {
        if !self.route.truncate_to_fit {
            return;
        }
        let chain =
            crate::routing::plan::chain(&self.snapshot, &self.route, self.prefer.as_deref());
        let Some(largest) = chain.iter().filter_map(|r| r.context_window).max() else {
            return;
        };
        if self.prompt_tokens <= largest {
            return;
        }
        let Ok(parsed) = RequestBody::parse(&self.bytes) else {
            return;
        };
        let Some(mut messages) = parsed
            .field("messages")
            .and_then(|m| serde_json::from_str::<Vec<Value>>(m.get()).ok())
        else {
            return;
        };
        // Room for the answer: the request's max_tokens, if it set one.
        let reserve = parsed
            .field("max_tokens")
            .or_else(|| parsed.field("max_completion_tokens"))
            .and_then(|v| v.get().parse::<u64>().ok())
            .unwrap_or(0);
        if let Some(dropped) =
            tokens::truncate_to_fit(&mut messages, largest.saturating_sub(reserve))
        {
            self.prompt_tokens = messages.iter().map(tokens::estimate_message).sum();
            self.truncated = dropped;
            self.messages_override = serde_json::to_string(&messages).ok();
        }
    }

    /// The body for `target`; `first` marks the plan's first step, whose body is ready.
    fn body_for(&self, target: &Target, prefill: Option<&str>, first: bool) -> Bytes {
        if let (Some(body), None, true) = (&self.first_body, prefill, first) {
            return body.clone();
        }
        match RequestBody::parse(&self.bytes) {
            Ok(parsed) => self.render_body(&parsed, target, prefill),
            Err(_) => self.bytes.clone(),
        }
    }

    fn render_body(
        &self,
        parsed: &RequestBody<'_>,
        target: &Target,
        prefill: Option<&str>,
    ) -> Bytes {
        let mut overrides: Vec<(&str, String)> = Vec::new();
        if self.usage_added {
            overrides.push(("stream_options", parsed.stream_options_with_usage()));
        }
        let messages = match (&self.messages_override, prefill) {
            (_, Some(text)) => {
                let mut messages: Vec<Value> = self
                    .messages_override
                    .as_deref()
                    .or_else(|| parsed.field("messages").map(|m| m.get()))
                    .and_then(|m| serde_json::from_str(m).ok())
                    .unwrap_or_default();
                messages.push(json!({ "role": "assistant", "content": text }));
                Some(Value::Array(messages).to_string())
            }
            (Some(m), None) => Some(m.clone()),
            (None, None) => None,
        };
        if let Some(m) = messages {
            overrides.push(("messages", m));
        }
        if overrides.is_empty() && parsed.model.as_deref() == Some(target.model.as_str()) {
            return self.bytes.clone();
        }
        let borrowed: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
        parsed.render(&target.model, &borrowed)
    }

    fn header_timeout(&self) -> Duration {
        let r = &self.snapshot.resilience;
        let scale = r
            .header_timeout_per_10k_tokens
            .mul_f64(self.prompt_tokens as f64 / 10_000.0);
        self.snapshot.timeouts.response_headers + scale
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// One attempt on one target, until the answer is usable or has failed.
    async fn attempt(
        &self,
        target: &Target,
        prefill: Option<&str>,
        first: bool,
        span: &tracing::Span,
    ) -> Result<Answer, AttemptError> {
        let provider = &target.provider;
        let uri = provider
            .upstream_uri_from(&self.path_and_query)
            .map_err(|why| Failure::LocalConfig {
                code: "bad_upstream_uri",
                message: format!(
                    "cannot build the URI of {}/{} for {}: {why}",
                    provider.name, target.model, self.path_and_query
                ),
            })?;
        let body = self.body_for(target, prefill, first);
        let mut headers = self.headers.clone();
        if !body.is_empty() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        if let Err(hint) = provider.authorize(&mut headers) {
            return Err(Failure::LocalConfig {
                code: "provider_key_missing",
                message: format!("no API key for provider `{}`: {hint}", provider.name),
            }
            .into());
        }
        if !span.is_disabled() {
            otel::inject(span, &mut headers);
        }
        *request.headers_mut() = headers;

        let sent = Instant::now();
        let header_timeout = self.header_timeout().min(self.remaining());
        let (response, lease) =
            match tokio::time::timeout(header_timeout, self.core.upstream.send(request)).await {
                Err(_) => return Err(Failure::HeaderTimeout(header_timeout).into()),
                Ok(Err(UpstreamError::Connect(why))) => return Err(Failure::Connect(why).into()),
                Ok(Err(UpstreamError::Exchange(why))) => {
                    return Err(Failure::ConnectionLost(why).into())
                }
                Ok(Ok(pair)) => pair,
            };

        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            let (parts, body) = response.into_parts();
            let read = tokio::time::timeout(
                Duration::from_secs(5).min(self.remaining()),
                http_body_util::Limited::new(body, MAX_ERROR_BODY).collect(),
            )
            .await;
            let raw = match read {
                Ok(Ok(collected)) => collected.to_bytes(),
                _ => Bytes::new(),
            };
            return Err(AttemptError {
                failure: Failure::Status {
                    status,
                    retry_after,
                    error: UpstreamErrorBody::parse(&raw),
                },
                passthrough: Some((status, parts.headers, raw)),
            });
        }
        if !self.stream {
            let (head, body) = response.into_parts();
            let idle = self.snapshot.resilience.stream_idle_timeout;
            let body = read_answer(body, idle, self.deadline).await?;
            return Ok(Answer::Plain { head, body, lease });
        }

        // Streams are committed on the first content chunk: until then everything is retryable.
        let ttft_deadline =
            (sent + self.snapshot.resilience.first_token_timeout).min(self.deadline);
        let (head, mut body) = response.into_parts();
        let mut parser = SseParser::default();
        let mut prefix = Vec::new();
        loop {
            let frame = match tokio::time::timeout_at(ttft_deadline, body.frame()).await {
                Err(_) => {
                    return Err(Failure::FirstTokenTimeout(
                        ttft_deadline.saturating_duration_since(sent),
                    )
                    .into())
                }
                Ok(None) => {
                    return Err(Failure::StreamFailedEarly(
                        "the stream ended before the first token".into(),
                    )
                    .into())
                }
                Ok(Some(Err(err))) => {
                    return Err(Failure::StreamFailedEarly(super::upstream::describe(&err)).into())
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let mut first = false;
            for event in parser.push(&data) {
                if let Some(d) = &event.data {
                    match inspect(d) {
                        Chunk::Content {
                            substantive: true, ..
                        } => first = true,
                        Chunk::Error(e) => {
                            return Err(Failure::StreamFailedEarly(format!(
                                "the provider sent an error in the stream: {e}"
                            ))
                            .into())
                        }
                        _ => {}
                    }
                }
                prefix.push(event);
            }
            if parser.overflowed() {
                return Err(Failure::StreamFailedEarly(OVERSIZED_EVENT.into()).into());
            }
            if first {
                let ttft = sent.elapsed();
                if !span.is_disabled() {
                    span.set_attribute("llm_sidecar.time_to_first_token", ttft.as_secs_f64());
                }
                return Ok(Answer::Stream {
                    head,
                    body,
                    parser,
                    prefix,
                    lease,
                    ttft,
                });
            }
        }
    }

    fn record(
        &mut self,
        step: &Step,
        outcome: &'static str,
        status: Option<u16>,
        started: Instant,
    ) {
        let target = step.target();
        let duration = started.elapsed();
        self.attempts.push(AttemptRecord {
            step: step.clone(),
            outcome,
            status,
            duration,
        });
        let metrics = &self.core.metrics;
        metrics.record_attempt(&target.tags.provider, outcome);
        if outcome != "ok" && outcome != "breaker_open" {
            let handles = target.metrics(metrics);
            handles.stats.tally.sent();
            handles.stats.tally.failed();
            metrics
                .gen_ai_duration
                .get_or_create(&crate::telemetry::metrics::GenAiLabels {
                    gen_ai_operation_name: self.operation.name(),
                    gen_ai_provider_name: handles.gen_ai_provider.clone(),
                    gen_ai_request_model: handles.model.clone(),
                    error_type: Some(outcome),
                })
                .observe(duration.as_secs_f64());
        }
    }

    /// The CLIENT span of one attempt, child of the request's span; disabled without tracing.
    fn attempt_span(
        &self,
        step: &Step,
        kind: AttemptKind,
        after: Option<&'static str>,
        admission: Admission,
    ) -> tracing::Span {
        if self.trace.is_disabled() {
            return tracing::Span::none();
        }
        let target = step.target();
        let provider = &target.provider;
        let number = self
            .attempts
            .iter()
            .filter(|a| a.outcome != "breaker_open")
            .count()
            + 1;
        // Attributes known now are span fields, recorded in one pass when the span is created.
        let span = tracing::info_span!(
            target: otel::SPAN_TARGET,
            parent: &self.trace,
            "attempt",
            otel.name = %format_args!("{} {}", self.operation.name(), target.model),
            otel.kind = "client",
            gen_ai.operation.name = self.operation.name(),
            gen_ai.provider.name = crate::telemetry::gen_ai_provider_name(&provider.name),
            gen_ai.request.model = target.model.as_str(),
            gen_ai.request.stream = self.stream,
            gen_ai.request.max_tokens = self.meta.max_tokens,
            gen_ai.request.temperature = self.meta.temperature,
            gen_ai.input.messages = self.meta.content.as_deref(),
            server.address = provider.host(),
            server.port = i64::from(provider.port()),
            llm_sidecar.route = step.route.name.as_str(),
            llm_sidecar.provider = provider.name.as_str(),
            llm_sidecar.path = target.path().as_str(),
            llm_sidecar.attempt = number as i64,
            llm_sidecar.attempt.kind = kind.as_str(),
            llm_sidecar.attempt.reason = after,
            llm_sidecar.breaker_state = match admission {
                Admission::Probe => "half_open",
                _ => "closed",
            },
        );
        span
    }

    /// Prices what one answer (or one part of a continued stream) reported, counts it, and
    /// puts it on the attempt span.
    fn settle(
        &self,
        target: &Target,
        route: &Route,
        span: &tracing::Span,
        started: Instant,
        reported: Reported,
    ) -> Bill {
        let metrics = &self.core.metrics;
        let handles = target.metrics(metrics);
        let gen_ai = metrics.gen_ai(handles, self.operation);
        gen_ai.duration.observe(started.elapsed().as_secs_f64());
        let official = route.official.as_ref().and_then(|t| t.price.as_ref());
        let bill = match reported.usage {
            Some(usage) => {
                let bill = Bill::new(usage, target.price.as_ref(), official);
                handles.input_tokens.inc_by(usage.input);
                handles.output_tokens.inc_by(usage.output);
                handles.cached_input_tokens.inc_by(usage.cached_input);
                if let Some(cost) = bill.cost {
                    handles.cost.inc_by(cost);
                }
                if let Some(official) = bill.official {
                    handles.official_cost.inc_by(official);
                }
                if let Some(savings) = bill.savings().filter(|s| *s > 0.0) {
                    handles.savings.inc_by(savings);
                }
                gen_ai.input_tokens.observe(usage.input as f64);
                gen_ai.output_tokens.observe(usage.output as f64);
                bill
            }
            None => {
                metrics.usage_missing.inc();
                Bill::default()
            }
        };
        handles.stats.tally.add_usage(reported.usage, bill);
        {
            let mut outcome = lock(&self.outcome);
            if let Some(usage) = reported.usage {
                outcome.usage.get_or_insert_with(Usage::default).add(usage);
            }
            outcome.bill.add(bill);
        }
        if !span.is_disabled() {
            let mut attributes = Vec::with_capacity(8);
            if let Some(model) = reported.model {
                attributes.push(KeyValue::new("gen_ai.response.model", model));
            }
            if !reported.finish_reasons.is_empty() {
                attributes.push(KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    opentelemetry::Value::Array(
                        reported
                            .finish_reasons
                            .into_iter()
                            .map(opentelemetry::StringValue::from)
                            .collect::<Vec<_>>()
                            .into(),
                    ),
                ));
            }
            if let Some(usage) = reported.usage {
                attributes.push(KeyValue::new(
                    "gen_ai.usage.input_tokens",
                    usage.input as i64,
                ));
                attributes.push(KeyValue::new(
                    "gen_ai.usage.output_tokens",
                    usage.output as i64,
                ));
                if usage.cached_input > 0 {
                    attributes.push(KeyValue::new(
                        "gen_ai.usage.cache_read.input_tokens",
                        usage.cached_input as i64,
                    ));
                }
            }
            if let Some(cost) = bill.cost {
                attributes.push(KeyValue::new("llm_sidecar.cost_usd", cost));
            }
            if let Some(savings) = bill.savings() {
                attributes.push(KeyValue::new("llm_sidecar.savings_usd", savings));
            }
            if let Some(content) = reported.content {
                attributes.push(KeyValue::new("gen_ai.output.messages", content));
            }
            otel::set_attributes(span, attributes);
        }
        bill
    }

    /// Runs the request to a committed answer, or to one error that keeps the most meaningful
    /// upstream failure and lists every attempt.
    pub async fn run(mut self) -> Result<Committed, SidecarError> {
        self.core.budget.record_request(Instant::now());
        let mut steps = std::mem::take(&mut self.steps);
        let skipped = std::mem::take(&mut self.skipped);
        let r = self.snapshot.resilience;
        let mut worst: Option<Worst> = None;
        let mut context_limit: Option<u64> = None;
        let mut limited: Vec<(usize, Instant)> = Vec::new();
        let mut waits = 0;
        let mut index = 0;
        let mut requeued: Option<usize> = None;
        // The target of the last failed attempt, and why it failed.
        let mut last_failed: Option<(Arc<TargetMetrics>, Arc<str>, &'static str)> = None;

        loop {
            let was_requeued = requeued.is_some();
            let step_index = match requeued.take() {
                Some(i) => i,
                None if index < steps.len() => {
                    index += 1;
                    index - 1
                }
                None => match policy::at_end_of_plan(&limited, waits, &r, self.deadline) {
                    AtEnd::WaitFor { step, at } => {
                        waits += 1;
                        limited.retain(|(j, _)| *j != step);
                        tokio::time::sleep_until(at).await;
                        requeued = Some(step);
                        continue;
                    }
                    AtEnd::GiveUp => break,
                },
            };
            let step = &steps[step_index];
            let target = step.target();
            if context_limit
                .is_some_and(|limit| step.route.context_window.is_some_and(|w| w <= limit))
            {
                continue;
            }
            // A target retried after waiting out its rate limit gets one more attempt, not a
            // fresh set.
            let mut tries = if was_requeued {
                r.attempts_per_target.saturating_sub(1)
            } else {
                0
            };
            loop {
                if Instant::now() >= self.deadline {
                    break;
                }
                let first_try = tries == 0 || was_requeued;
                // A breaker the plan saw closed needs no second look for the first attempt.
                let admission = if first_try && step.closed {
                    Admission::Allowed
                } else {
                    self.core
                        .health
                        .admit(target, Instant::now(), step.forced_probe && first_try)
                };
                if admission == Admission::Rejected {
                    self.record(step, "breaker_open", None, Instant::now());
                    break;
                }
                tries += 1;
                let kind = match &last_failed {
                    _ if was_requeued && first_try => AttemptKind::RateLimitWait,
                    None => AttemptKind::Initial,
                    Some((_, key, _)) if *key == target.health_key => AttemptKind::Retry,
                    Some(_) => AttemptKind::Fallback,
                };
                if let (AttemptKind::Fallback, Some((left, _, reason))) = (kind, &last_failed) {
                    self.core
                        .metrics
                        .fallbacks
                        .get_or_create(&crate::telemetry::metrics::FallbackLabels {
                            provider: left.provider.clone(),
                            model: left.model.clone(),
                            reason,
                        })
                        .inc();
                }
                let span =
                    self.attempt_span(step, kind, last_failed.as_ref().map(|l| l.2), admission);
                let started = Instant::now();
                match self.attempt(target, None, step_index == 0, &span).await {
                    Ok(answer) => {
                        let latency = started.elapsed();
                        if self.stream {
                            // Healthy only once it ends well (`finish_segment`).
                            self.core
                                .health
                                .record_latency(target, latency, Some(latency));
                        } else {
                            self.core.health.record_success(target, latency, None);
                        }
                        if step.side == ProviderKind::Relay {
                            self.core
                                .guard
                                .record(&self.snapshot, false, latency, Instant::now());
                        }
                        if self.attempts.is_empty() {
                            // A clean first-try answer needs no attempt log: count it only.
                            target.metrics(&self.core.metrics).ok_attempts.inc();
                        } else {
                            self.record(step, "ok", Some(200), started);
                        }
                        let rest = if self.stream {
                            // A committed stream may need the rest of the plan to continue.
                            steps.split_off(step_index + 1)
                        } else {
                            Vec::new()
                        };
                        return Ok(self.commit(&steps[step_index], answer, rest, span, started));
                    }
                    Err(AttemptError {
                        failure,
                        passthrough,
                    }) => {
                        let class = classify(&failure);
                        let status = match &failure {
                            Failure::Status { status, .. } => Some(status.as_u16()),
                            _ => None,
                        };
                        self.record(step, class.label(), status, started);
                        fail_span(&span, class.label(), status);
                        drop(span);
                        last_failed = Some((
                            target.metrics(&self.core.metrics).clone(),
                            target.health_key.clone(),
                            class.label(),
                        ));
                        if step.side == ProviderKind::Relay && class.counts_against_target() {
                            self.core.guard.record(
                                &self.snapshot,
                                true,
                                started.elapsed(),
                                Instant::now(),
                            );
                        }
                        if class.counts_against_target() {
                            self.core
                                .health
                                .record_failure(target, Instant::now(), &r.breaker);
                        } else {
                            self.core.health.record_inconclusive(target);
                        }
                        let describe = format!("{}/{}", target.provider.name, target.model);
                        if let Failure::LocalConfig { message, .. } = &failure {
                            tracing::error!(provider = %target.provider.name, model = %target.model, reason = %message, "the sidecar's config cannot serve this target; nothing was sent to it");
                        } else if class == Class::Misconfigured {
                            tracing::error!(provider = %target.provider.name, model = %target.model, status, "provider rejected the sidecar's credentials or model: check the target's key and model name");
                        } else {
                            tracing::warn!(provider = %target.provider.name, model = %target.model, outcome = class.label(), status, "upstream attempt failed");
                        }
                        if worst
                            .as_ref()
                            .is_none_or(|w| class.weight() > w.class.weight())
                        {
                            worst = Some(Worst {
                                class,
                                failure: failure.clone(),
                                target: describe,
                            });
                        }
                        let failed = Failed {
                            class,
                            tries,
                            route_window: step.route.context_window,
                            prompt_tokens: self.prompt_tokens,
                            answer_kept: passthrough.is_some(),
                        };
                        let wait = match policy::after_failure(
                            failed,
                            &r,
                            self.remaining(),
                            fastrand::f64(),
                        ) {
                            Next::Retry { after } => after,
                            Next::MoveOn {
                                context_limit: limit,
                                rate_limited_for,
                            } => {
                                if limit.is_some() {
                                    context_limit = limit;
                                }
                                if let Some(after) = rate_limited_for {
                                    limited.push((step_index, Instant::now() + after));
                                }
                                break;
                            }
                            Next::ReturnAnswer => {
                                if let Some((status, headers, body)) = passthrough {
                                    return Ok(self.passthrough_error(step, status, headers, body));
                                }
                                break;
                            }
                        };
                        if !self.core.budget.try_retry(
                            Instant::now(),
                            r.retry_budget_ratio,
                            r.retry_budget_min_per_second,
                        ) {
                            self.core.metrics.retry_budget_exhausted.inc();
                            break;
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Err(self.give_up(worst, &skipped))
    }

    /// Fallbacks: how many times the request moved on to another target.
    fn moves(&self) -> usize {
        self.attempts
            .windows(2)
            .filter(|w| w[0].step.target().health_key != w[1].step.target().health_key)
            .count()
    }

    fn add_headers(&self, headers: &mut HeaderMap, step: &Step) {
        let target = step.target();
        headers.reserve(10);
        let reason = if self.attempts.iter().any(|a| a.outcome != "ok") {
            FALLBACK
        } else if step.side != self.decision.order.first_side() {
            // Either the route lacks that side, or the plan skipped it (an open breaker).
            if step
                .route
                .target(self.decision.order.first_side())
                .is_none()
            {
                ONLY_TARGET
            } else {
                FALLBACK
            }
        } else {
            self.decision.why.as_str()
        };
        super::add_route_headers(
            headers,
            target,
            reason,
            self.decision.bucket,
            &self.snapshot,
        );
        headers.insert(
            HEADER_ATTEMPTS,
            HeaderValue::from(self.attempts.len().max(1)),
        );
        headers.insert(HEADER_FALLBACKS, HeaderValue::from(self.moves()));
        if self.attempts.len() > 1 {
            let log: Vec<String> = self
                .attempts
                .iter()
                .map(|a| format!("{}={}", a.step.target().health_key, a.outcome))
                .collect();
            if let Ok(value) = HeaderValue::from_str(&log.join(",")) {
                headers.insert(HEADER_ATTEMPT_LOG, value);
            }
        }
        if self.truncated > 0 {
            headers.insert(HEADER_TRUNCATED, HeaderValue::from(self.truncated));
        }
    }

    fn passthrough_error(
        &self,
        step: &Step,
        status: StatusCode,
        upstream: HeaderMap,
        body: Bytes,
    ) -> Committed {
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        if let Some(ct) = upstream.get(header::CONTENT_TYPE) {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, ct.clone());
        }
        self.add_headers(response.headers_mut(), step);
        self.close_outcome();
        Committed {
            response,
            route: step.route.clone(),
            side: step.side,
            lease: None,
        }
    }

    fn give_up(
        &self,
        worst: Option<Worst>,
        skipped: &[crate::routing::plan::Skipped],
    ) -> SidecarError {
        self.close_outcome();
        let attempts: Vec<Value> = self.attempts.iter().map(AttemptRecord::json).collect();
        let skipped: Vec<Value> = skipped
            .iter()
            .map(|s| {
                let t = s.target();
                json!({ "route": s.route.name, "provider": t.provider.name, "model": t.model, "reason": s.reason.label() })
            })
            .collect();
        let Some(Worst {
            class,
            failure,
            target,
        }) = worst
        else {
            return SidecarError::AllTargetsFailed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "no target could be tried: every target was skipped or its circuit breaker is open".into(),
                upstream_type: None,
                upstream_code: Some("no_target_available".into()),
                attempts: json!({ "attempts": attempts, "skipped": skipped }),
            };
        };
        let (status, detail, kind, code) = match &failure {
            Failure::Status { status, error, .. } => (
                match class {
                    Class::ContextTooLong => StatusCode::BAD_REQUEST,
                    Class::Misconfigured => StatusCode::BAD_GATEWAY,
                    _ => *status,
                },
                format!(
                    "{} {}",
                    status.as_u16(),
                    error.message.clone().unwrap_or_default()
                ),
                error.kind.clone(),
                error.code.clone(),
            ),
            Failure::HeaderTimeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("no response headers within {d:?}"),
                None,
                None,
            ),
            Failure::FirstTokenTimeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("no first token within {d:?}"),
                None,
                None,
            ),
            Failure::Connect(why) => (
                StatusCode::BAD_GATEWAY,
                format!("cannot connect: {why}"),
                None,
                None,
            ),
            Failure::ConnectionLost(why) | Failure::StreamFailedEarly(why) => {
                (StatusCode::BAD_GATEWAY, why.clone(), None, None)
            }
            Failure::LocalConfig { code, message } => (
                StatusCode::BAD_GATEWAY,
                message.clone(),
                Some("sidecar_config".to_string()),
                Some(code.to_string()),
            ),
        };
        SidecarError::AllTargetsFailed {
            status,
            message: format!(
                "every target failed ({} attempts); the most relevant failure, {} from {target}: {}",
                self.attempts.len(),
                class.label(),
                detail.trim()
            ),
            upstream_type: kind,
            upstream_code: code.or_else(|| Some(class.label().to_string())),
            attempts: json!({ "attempts": attempts, "skipped": skipped }),
        }
    }

    /// Fills the request's outcome with the attempt count and failover.
    fn close_outcome(&self) -> bool {
        let fell_back = self.attempts.iter().any(|a| a.outcome != "ok");
        let last = self
            .attempts
            .last()
            .map(|a| a.step.target().metrics(&self.core.metrics).clone());
        let mut outcome = lock(&self.outcome);
        outcome.last = last;
        outcome.attempts = self.attempts.len().max(1) as u32;
        outcome.fallbacks = self.moves() as u32;
        outcome.fell_back = fell_back;
        fell_back
    }

    fn commit(
        self,
        step: &Step,
        answer: Answer,
        rest: Vec<Step>,
        span: tracing::Span,
        started: Instant,
    ) -> Committed {
        let fell_back = self.close_outcome();
        let target = step.target();
        let tally = &target.metrics(&self.core.metrics).stats.tally;
        tally.sent();
        match answer {
            Answer::Plain { head, body, lease } => {
                tally.answered(fell_back);
                lock(&self.outcome).complete = matches!(body, PlainBody::Whole(_));
                let mut response = Response::from_parts(head, ());
                super::strip_hop_by_hop(response.headers_mut());
                self.add_headers(response.headers_mut(), step);
                let (body, lease) = match body {
                    PlainBody::Whole(bytes) => {
                        if let Some(lease) = lease {
                            lease.release();
                        }
                        let reported = Reported::from_plain(&bytes, !span.is_disabled());
                        let bill = self.settle(target, &step.route, &span, started, reported);
                        if let Some(cost) = bill.cost {
                            if let Ok(value) = HeaderValue::from_str(&format_usd(cost)) {
                                response.headers_mut().insert(HEADER_COST, value);
                            }
                        }
                        (full(bytes), None)
                    }
                    PlainBody::Large { read, rest } => {
                        self.settle(target, &step.route, &span, started, Reported::default());
                        let read = futures_util::stream::iter(
                            read.into_iter().map(|b| Ok::<_, BoxError>(Frame::data(b))),
                        );
                        let rest = http_body_util::BodyStream::new(rest.map_err(BoxError::from));
                        let stream = futures_util::StreamExt::chain(read, rest);
                        (
                            http_body_util::StreamBody::new(stream).boxed_unsync(),
                            lease,
                        )
                    }
                };
                Committed {
                    response: response.map(|()| body),
                    route: step.route.clone(),
                    side: step.side,
                    lease,
                }
            }
            Answer::Stream {
                mut head,
                body,
                parser,
                prefix,
                lease,
                ttft,
            } => {
                lock(&self.outcome).ttft = Some(ttft);
                super::strip_hop_by_hop(&mut head.headers);
                head.headers.remove(header::CONTENT_LENGTH);
                self.add_headers(&mut head.headers, step);
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
                let route = step.route.clone();
                let side = step.side;
                let current = step.clone();
                tokio::spawn(async move {
                    let mut pump = Pump {
                        tx,
                        state: StreamState::default(),
                        usage_added: self.usage_added,
                        metrics: self.core.metrics.clone(),
                    };
                    let mut segment = Segment {
                        step: current,
                        span,
                        started,
                        fell_back,
                        settled: false,
                    };
                    for event in prefix {
                        if !self.relay(&mut pump, &mut segment, event).await {
                            self.client_left(&segment);
                            return;
                        }
                    }
                    self.pump(pump, segment, body, parser, lease, rest).await;
                });
                let body = ChannelBody::new(rx).boxed_unsync();
                Committed {
                    response: Response::from_parts(head, body),
                    route,
                    side,
                    lease: None,
                }
            }
        }
    }

    /// The client went away mid-stream: that says nothing about the target's health (a probe
    /// it carried is given back).
    fn client_left(&self, segment: &Segment) {
        if !segment.settled {
            fail_span(&segment.span, "client_cancelled", None);
            self.core.health.record_inconclusive(segment.step.target());
        }
    }

    /// A stream part ended well: its target answered, its usage is billed.
    fn finish_segment(&self, segment: &mut Segment, pump: &mut Pump) {
        if std::mem::replace(&mut segment.settled, true) {
            return;
        }
        lock(&self.outcome).complete = true;
        let target = segment.step.target();
        self.core.health.record_answered(target);
        let tally = &target.metrics(&self.core.metrics).stats.tally;
        tally.answered(segment.fell_back);
        let mut reported = std::mem::take(&mut pump.state.reported);
        if otel::record_content() {
            reported.content = Some(cut(&pump.state.text[pump.state.segment_start..]));
        }
        self.settle(
            target,
            &segment.step.route,
            &segment.span,
            segment.started,
            reported,
        );
    }

    /// Forwards one event; a `[DONE]` settles the part first, so the answer is billed before
    /// the client can see its end.
    async fn relay(&self, pump: &mut Pump, segment: &mut Segment, event: RawEvent) -> bool {
        if !segment.settled && event.data.as_deref().is_some_and(|d| d.trim() == "[DONE]") {
            self.finish_segment(segment, pump);
        }
        pump.forward(event).await
    }

    /// A stream part broke: its target failed this request.
    fn break_segment(&self, segment: Segment, why: &'static str) {
        let tally = &segment
            .step
            .target()
            .metrics(&self.core.metrics)
            .stats
            .tally;
        tally.failed();
        fail_span(&segment.span, why, None);
    }

    /// Streams the committed answer to its end; continues it elsewhere or ends it with an error
    /// event when the upstream stream breaks.
    async fn pump(
        self,
        mut pump: Pump,
        mut segment: Segment,
        mut body: Incoming,
        mut parser: SseParser,
        mut lease: Option<Lease>,
        mut rest: Vec<Step>,
    ) {
        let idle = self.snapshot.resilience.stream_idle_timeout;
        loop {
            let broken: String = loop {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => break format!("the stream stalled for {idle:?}"),
                    Ok(Some(Err(err))) => {
                        break format!("the stream broke: {}", super::upstream::describe(&err))
                    }
                    Ok(Some(Ok(frame))) => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        for event in parser.push(&data) {
                            if !self.relay(&mut pump, &mut segment, event).await {
                                self.client_left(&segment);
                                return;
                            }
                        }
                        if pump.state.failed.is_some() {
                            break pump.state.failed.take().unwrap_or_default();
                        }
                        if parser.overflowed() {
                            break OVERSIZED_EVENT.to_string();
                        }
                    }
                    Ok(None) => {
                        if let Some(event) = parser.finish() {
                            let _ = self.relay(&mut pump, &mut segment, event).await;
                        }
                        if pump.state.done || pump.state.finished {
                            if let Some(lease) = lease.take() {
                                lease.release();
                            }
                            // Billed before the last bytes go out: the request's log line and
                            // metrics are written when the client has read them.
                            self.finish_segment(&mut segment, &mut pump);
                            if !pump.state.done {
                                // Complete but for the terminator: finalise it.
                                pump.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                            }
                            return;
                        }
                        break "the stream ended before the answer was finished".to_string();
                    }
                }
            };
            drop(lease.take());
            let t = segment.step.target();
            tracing::warn!(provider = %t.provider.name, model = %t.model, reason = %broken, sent_chars = pump.state.text.len(), "committed stream broke");
            self.core
                .health
                .record_failure(t, Instant::now(), &self.snapshot.resilience.breaker);
            let original = format!("{}/{}: {broken}", t.provider.name, t.model);
            self.break_segment(segment, "stream_interrupted");
            pump.state.reported = Reported::default();

            // Continue the answer on the next target that accepts an assistant prefill.
            let mut continued = None;
            while !rest.is_empty() {
                let step = rest.remove(0);
                if !step.target().supports_prefill || Instant::now() >= self.deadline {
                    continue;
                }
                let admission = self.core.health.admit(step.target(), Instant::now(), false);
                if admission == Admission::Rejected {
                    continue;
                }
                let span = self.attempt_span(
                    &step,
                    AttemptKind::Continuation,
                    Some("stream_interrupted"),
                    admission,
                );
                let started = Instant::now();
                match self
                    .attempt(step.target(), Some(&pump.state.text), false, &span)
                    .await
                {
                    Ok(Answer::Stream {
                        body,
                        parser,
                        prefix,
                        lease: l,
                        ..
                    }) => {
                        self.core.health.record_latency(
                            step.target(),
                            started.elapsed(),
                            Some(started.elapsed()),
                        );
                        step.target().metrics(&self.core.metrics).stats.tally.sent();
                        let next = Segment {
                            step,
                            span,
                            started,
                            fell_back: true,
                            settled: false,
                        };
                        continued = Some((next, body, parser, prefix, l));
                        break;
                    }
                    Ok(Answer::Plain { .. }) => {}
                    Err(err) => {
                        let class = classify(&err.failure);
                        fail_span(&span, class.label(), None);
                        if class.counts_against_target() {
                            self.core.health.record_failure(
                                step.target(),
                                Instant::now(),
                                &self.snapshot.resilience.breaker,
                            );
                        }
                        tracing::warn!(provider = %step.target().provider.name, outcome = class.label(), "continuation attempt failed");
                    }
                }
            }
            let Some((next, next_body, next_parser, prefix, next_lease)) = continued else {
                self.core.metrics.record_stream_interruption("error_event");
                lock(&self.outcome).interrupted = true;
                let error = json!({
                    "error": {
                        "message": format!("the answer was interrupted and could not be continued: {original}"),
                        "type": "server_error",
                        "param": null,
                        "code": "stream_interrupted",
                    }
                });
                pump.send(Bytes::from(format!("data: {error}\n\n"))).await;
                return;
            };
            self.core.metrics.record_stream_interruption("continued");
            pump.state.continuing = true;
            pump.state.segment_start = pump.state.text.len();
            segment = next;
            for event in prefix {
                if !self.relay(&mut pump, &mut segment, event).await {
                    self.client_left(&segment);
                    return;
                }
            }
            body = next_body;
            parser = next_parser;
            lease = next_lease;
        }
    }
}

/// One target's part of a committed stream: its span, and when its attempt started.
struct Segment {
    step: Step,
    span: tracing::Span,
    started: Instant,
    /// This part answers after another target failed.
    fell_back: bool,
    /// Billed and counted already.
    settled: bool,
}

/// Marks an attempt span failed; `why` is a failure class, never provider text.
fn fail_span(span: &tracing::Span, why: &'static str, status: Option<u16>) {
    if span.is_disabled() {
        return;
    }
    span.set_attribute("error.type", why);
    if let Some(status) = status {
        span.set_attribute("http.response.status_code", i64::from(status));
    }
    span.set_status(opentelemetry::trace::Status::error(why));
}

/// What the sidecar has seen of a committed stream.
#[derive(Default)]
struct StreamState {
    text: String,
    finished: bool,
    done: bool,
    /// Set by a provider error event: the stream is broken.
    failed: Option<String>,
    /// Forwarding a continuation: its role chunk is not repeated to the client.
    continuing: bool,
    /// Where the current part's text starts in `text`.
    segment_start: usize,
    /// What the current part reported: usage, model, finish reasons.
    reported: Reported,
}

struct Pump {
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    state: StreamState,
    usage_added: bool,
    metrics: Arc<Metrics>,
}

impl Pump {
    async fn send(&mut self, bytes: Bytes) -> bool {
        self.tx.send(Ok(Frame::data(bytes))).await.is_ok()
    }

    /// Forwards one upstream event to the client, or drops it; false when the client is gone.
    async fn forward(&mut self, event: RawEvent) -> bool {
        let Some(data) = &event.data else {
            return self.send(event.raw).await;
        };
        match inspect(data) {
            Chunk::Done => {
                self.state.done = true;
                self.send(event.raw).await
            }
            Chunk::Malformed => {
                tracing::debug!("dropped a malformed stream chunk");
                self.metrics.malformed_chunks.inc();
                true
            }
            Chunk::Error(e) => {
                self.state.failed = Some(format!("the provider sent an error in the stream: {e}"));
                true
            }
            Chunk::UsageOnly { usage, model } => {
                self.state.reported.usage = Usage::from_json(&usage);
                if let Some(model) = model {
                    self.state.reported.model = Some(model.into_owned());
                }
                if self.usage_added {
                    return true;
                }
                self.send(event.raw).await
            }
            Chunk::Content {
                text,
                finish_reason,
                substantive,
                usage,
                model,
            } => {
                if let Some(usage) = usage.as_ref().and_then(Usage::from_json) {
                    self.state.reported.usage = Some(usage);
                }
                if let Some(model) = model {
                    self.state.reported.model = Some(model.into_owned());
                }
                if let Some(reason) = &finish_reason {
                    self.state.reported.finish_reasons.push(reason.to_string());
                }
                if self.state.continuing && !substantive {
                    return true;
                }
                self.state.text.push_str(&text);
                if finish_reason.is_some() {
                    self.state.finished = true;
                }
                self.send(event.raw).await
            }
        }
    }
}

/// Estimated prompt tokens, parsed only when a window could matter.
fn estimate_prompt(snapshot: &Snapshot, route: &Route, parsed: &RequestBody<'_>) -> u64 {
    let messages = parsed.field("messages");
    let prompt = parsed.field("prompt").or_else(|| parsed.field("input"));
    let raw_len =
        messages.map(|m| m.get().len()).unwrap_or(0) + prompt.map(|p| p.get().len()).unwrap_or(0);
    let smallest = route.smallest_window(snapshot);
    // No more tokens than bytes: a short prompt fits every window without parsing it.
    if smallest.is_none_or(|w| (raw_len as u64) < w) && !route.truncate_to_fit {
        return (raw_len as u64).div_ceil(4);
    }
    let messages = messages.and_then(|m| serde_json::from_str::<Value>(m.get()).ok());
    let prompt = prompt.and_then(|p| serde_json::from_str::<Value>(p.get()).ok());
    tokens::estimate_prompt(messages.as_ref(), prompt.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The body of one HTTP/1.1 answer sent with the given chunks (chunked encoding: each
    /// chunk reaches the reader as its own frame), read by a real hyper client.
    async fn answer_body(chunks: Vec<Vec<u8>>) -> Incoming {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            let mut reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for chunk in &chunks {
                reply.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                reply.extend_from_slice(chunk);
                reply.extend_from_slice(b"\r\n");
            }
            reply.extend_from_slice(b"0\r\n\r\n");
            stream.write_all(&reply).await.unwrap();
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = Request::builder()
            .uri("/")
            .header(header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(request).await.unwrap().into_body()
    }

    async fn read(chunks: Vec<Vec<u8>>) -> PlainBody {
        let body = answer_body(chunks).await;
        let far = Instant::now() + Duration::from_secs(30);
        match read_answer(body, Duration::from_secs(10), far).await {
            Ok(body) => body,
            Err(failure) => panic!("the answer was not read: {failure:?}"),
        }
    }

    #[tokio::test]
    async fn a_plain_answer_in_one_or_several_frames_is_read_whole_and_in_order() {
        for chunks in [
            vec![],
            vec![b"{\"id\":1}".to_vec()],
            vec![b"{\"id\"".to_vec(), b":".to_vec(), b"1}".to_vec()],
        ] {
            let expected = chunks.concat();
            match read(chunks).await {
                PlainBody::Whole(bytes) => assert_eq!(&bytes[..], &expected[..]),
                PlainBody::Large { .. } => panic!("a small answer was not held whole"),
            }
        }
    }

    #[tokio::test]
    async fn an_answer_over_the_cap_keeps_what_was_read_and_the_rest_follows() {
        let chunks: Vec<Vec<u8>> = (0..9u8).map(|i| vec![b'a' + i; 1024 * 1024]).collect();
        let expected = chunks.concat();
        match read(chunks).await {
            PlainBody::Whole(_) => panic!("an answer over the cap was held whole"),
            PlainBody::Large { read, rest } => {
                let mut all = read.concat();
                all.extend_from_slice(&rest.collect().await.unwrap().to_bytes());
                assert_eq!(all.len(), expected.len());
                assert!(all == expected, "the answer's bytes were reordered or lost");
            }
        }
    }
}
