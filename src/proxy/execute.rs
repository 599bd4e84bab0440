//! One model request end to end: walk the plan, retry and fail over by failure class, honour
//! rate limits inside the deadline, and commit the answer only once it is usable: response
//! headers for a plain answer, the first content chunk for a stream. After a stream is committed,
//! a cut, stall or broken chunk is never passed off as success: the answer is continued on a
//! prefill-capable target or the stream ends with an explicit error event and no `[DONE]`.

use std::sync::Arc;
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
use super::{HEADER_GENERATION, HEADER_REASON};
use crate::config::{Route, Snapshot, Target, FALLBACK, ONLY_TARGET};
use crate::errors::SidecarError;
use crate::openai::RequestBody;
use crate::providers::ProviderKind;
use crate::routing::backoff::{full_jitter, parse_retry_after, unit_sample};
use crate::routing::breaker::Admission;
use crate::routing::budget::RetryBudget;
use crate::routing::classify::{classify, Class, Failure, UpstreamErrorBody};
use crate::routing::health::Health;
use crate::routing::plan::{plan, PlanRequest, Step};
use crate::routing::rollout::Decision;
use crate::routing::tokens;
use crate::telemetry::metrics::Metrics;

pub const HEADER_ATTEMPTS: HeaderName = HeaderName::from_static("x-llm-sidecar-attempts");
pub const HEADER_FALLBACKS: HeaderName = HeaderName::from_static("x-llm-sidecar-fallbacks");
pub const HEADER_ATTEMPT_LOG: HeaderName = HeaderName::from_static("x-llm-sidecar-attempt-log");
pub const HEADER_TRUNCATED: HeaderName =
    HeaderName::from_static("x-llm-sidecar-truncated-messages");
pub const HEADER_PREFER: HeaderName = HeaderName::from_static("x-llm-sidecar-prefer");
pub const HEADER_LOW_LATENCY: HeaderName = HeaderName::from_static("x-llm-sidecar-low-latency");

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
    Plain(Response<Incoming>, Option<Lease>),
    Stream {
        head: http::response::Parts,
        body: Incoming,
        parser: SseParser,
        prefix: Vec<RawEvent>,
        lease: Option<Lease>,
    },
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
    /// Only the first step is planned so far.
    partial: bool,
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
        let mut exchange = Exchange {
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
            partial: false,
        };
        exchange.truncate_if_needed();
        // Most requests are answered by their first target: plan the rest only when needed.
        let first = {
            let request = PlanRequest {
                prefer: exchange.prefer.as_deref(),
                low_latency: exchange.low_latency,
                prompt_tokens: exchange.prompt_tokens,
                order: exchange.decision.order,
            };
            crate::routing::plan::first_step(
                &exchange.snapshot,
                &exchange.route,
                &request,
                &exchange.core.health.lookup(Instant::now()),
            )
        };
        let (steps, skipped) = match first {
            Some(step) => {
                exchange.partial = true;
                (vec![step], Vec::new())
            }
            None => exchange.plan_steps(),
        };
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
    ) -> Result<Answer, AttemptError> {
        let provider = &target.provider;
        let uri = provider
            .upstream_uri_from(&self.path_and_query)
            .map_err(Failure::Connect)?;
        let mut request = Request::new(Full::new(self.body_for(target, prefill, first)));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        let mut headers = self.headers.clone();
        if let Err(hint) = provider.authorize(&mut headers) {
            return Err(Failure::Status {
                status: StatusCode::UNAUTHORIZED,
                retry_after: None,
                error: UpstreamErrorBody {
                    message: Some(format!(
                        "no API key for provider `{}`: {hint}",
                        provider.name
                    )),
                    kind: Some("sidecar_config".into()),
                    code: Some("provider_key_missing".into()),
                },
            }
            .into());
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
            return Ok(Answer::Plain(response, lease));
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
            if first {
                return Ok(Answer::Stream {
                    head,
                    body,
                    parser,
                    prefix,
                    lease,
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
        self.attempts.push(AttemptRecord {
            step: step.clone(),
            outcome,
            status,
            duration: started.elapsed(),
        });
        self.core
            .metrics
            .record_attempt(&target.tags.provider, outcome);
    }

    /// Runs the request to a committed answer, or to one error that keeps the most meaningful
    /// upstream failure and lists every attempt.
    pub async fn run(mut self) -> Result<Committed, SidecarError> {
        self.core.budget.record_request(Instant::now());
        let mut steps = std::mem::take(&mut self.steps);
        let mut skipped = std::mem::take(&mut self.skipped);
        let r = self.snapshot.resilience;
        let mut worst: Option<Worst> = None;
        let mut context_limit: Option<u64> = None;
        let mut limited: Vec<(usize, Instant)> = Vec::new();
        let mut waits = 0;
        let mut index = 0;
        let mut requeued: Option<usize> = None;

        loop {
            let was_requeued = requeued.is_some();
            let step_index = match requeued.take() {
                Some(i) => i,
                None if index < steps.len() => {
                    index += 1;
                    index - 1
                }
                None if self.partial => {
                    self.expand_plan(&mut steps, &mut skipped);
                    continue;
                }
                None => {
                    // Everything failed: wait once for the soonest rate limit that clears in time.
                    let soonest = limited
                        .iter()
                        .filter(|(_, at)| *at < self.deadline)
                        .min_by_key(|(_, at)| *at)
                        .copied();
                    match soonest {
                        Some((i, at)) if waits < r.rate_limit_waits => {
                            waits += 1;
                            limited.retain(|(j, _)| *j != i);
                            tokio::time::sleep_until(at).await;
                            requeued = Some(i);
                            continue;
                        }
                        _ => break,
                    }
                }
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
                let started = Instant::now();
                match self.attempt(target, None, step_index == 0).await {
                    Ok(answer) => {
                        let latency = started.elapsed();
                        self.core.health.record_success(
                            target,
                            latency,
                            self.stream.then_some(latency),
                        );
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
                            let mut all = steps.clone();
                            self.expand_plan(&mut all, &mut skipped);
                            all.split_off(step_index + 1)
                        } else {
                            Vec::new()
                        };
                        return Ok(self.commit(&steps[step_index], answer, rest));
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
                        if class == Class::Misconfigured {
                            tracing::error!(provider = %target.provider.name, model = %target.model, ?status, "provider rejected the sidecar's credentials or model: check the target's key and model name");
                        } else {
                            tracing::warn!(provider = %target.provider.name, model = %target.model, outcome = class.label(), ?status, "upstream attempt failed");
                        }
                        if class == Class::ClientError {
                            if let Some((status, headers, body)) = passthrough {
                                return Ok(self.passthrough_error(step, status, headers, body));
                            }
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
                        let retry_wait = match class {
                            Class::ContextTooLong => {
                                context_limit = Some(
                                    step.route
                                        .context_window
                                        .unwrap_or(self.prompt_tokens.saturating_sub(1)),
                                );
                                None
                            }
                            Class::Silent | Class::Misconfigured | Class::ClientError => None,
                            Class::Transient | Class::ServerError => (tries
                                < self.max_tries(class))
                            .then(|| {
                                full_jitter(r.backoff_base, r.backoff_max, tries - 1, unit_sample())
                            }),
                            Class::RateLimited(Some(after)) => {
                                if after <= r.backoff_max && tries < r.attempts_per_target {
                                    Some(after)
                                } else {
                                    limited.push((step_index, Instant::now() + after));
                                    None
                                }
                            }
                            Class::RateLimited(None) => {
                                (tries < r.attempts_per_target).then(|| {
                                    full_jitter(
                                        r.backoff_base,
                                        r.backoff_max,
                                        tries - 1,
                                        unit_sample(),
                                    )
                                })
                            }
                        };
                        let Some(wait) = retry_wait else { break };
                        if wait >= self.remaining() {
                            break;
                        }
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

    /// Plans the rest of the chain after a partial plan, leaving out targets already in it.
    fn expand_plan(
        &mut self,
        steps: &mut Vec<Step>,
        skipped: &mut Vec<crate::routing::plan::Skipped>,
    ) {
        if !self.partial {
            return;
        }
        self.partial = false;
        let (all, more_skipped) = self.plan_steps();
        for step in all {
            let key = &step.target().health_key;
            if !steps.iter().any(|s| &s.target().health_key == key) {
                steps.push(step);
            }
        }
        skipped.extend(more_skipped);
    }

    fn max_tries(&self, class: Class) -> u32 {
        match class {
            // "Retry the same target once" for server errors.
            Class::ServerError => self.snapshot.resilience.attempts_per_target.min(2),
            _ => self.snapshot.resilience.attempts_per_target,
        }
    }

    fn add_headers(&self, headers: &mut HeaderMap, step: &Step) {
        let target = step.target();
        headers.reserve(10);
        for (name, value) in &target.tags.headers {
            headers.insert(name.clone(), value.clone());
        }
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
        headers.insert(HEADER_REASON, HeaderValue::from_static(reason));
        if let Some(bucket) = self.decision.bucket {
            headers.insert(super::HEADER_ROLLOUT_BUCKET, HeaderValue::from(bucket));
        }
        headers.insert(HEADER_GENERATION, self.snapshot.generation_header.clone());
        headers.insert(HEADER_ATTEMPTS, small_number(self.attempts.len().max(1)));
        // Fallbacks: how many times the request moved on to another target.
        let moves = self
            .attempts
            .windows(2)
            .filter(|w| w[0].step.target().health_key != w[1].step.target().health_key)
            .count();
        headers.insert(HEADER_FALLBACKS, small_number(moves));
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

    fn commit(self, step: &Step, answer: Answer, rest: Vec<Step>) -> Committed {
        match answer {
            Answer::Plain(response, lease) => {
                let mut response = response.map(|b| b.map_err(BoxError::from).boxed_unsync());
                super::strip_hop_by_hop(response.headers_mut());
                self.add_headers(response.headers_mut(), step);
                Committed {
                    response,
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
            } => {
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
                    for event in prefix {
                        if !pump.forward(event).await {
                            return;
                        }
                    }
                    self.pump(pump, current, body, parser, lease, rest).await;
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

    /// Streams the committed answer to its end; continues it elsewhere or ends it with an error
    /// event when the upstream stream breaks.
    async fn pump(
        self,
        mut pump: Pump,
        mut current: Step,
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
                            if !pump.forward(event).await {
                                return; // the client went away
                            }
                        }
                        if pump.state.failed.is_some() {
                            break pump.state.failed.take().unwrap_or_default();
                        }
                    }
                    Ok(None) => {
                        if let Some(event) = parser.finish() {
                            let _ = pump.forward(event).await;
                        }
                        if pump.state.done {
                            if let Some(lease) = lease.take() {
                                lease.release();
                            }
                            return;
                        }
                        if pump.state.finished {
                            // Complete but for the terminator: finalise it.
                            pump.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                            if let Some(lease) = lease.take() {
                                lease.release();
                            }
                            return;
                        }
                        break "the stream ended before the answer was finished".to_string();
                    }
                }
            };
            drop(lease.take());
            let t = current.target();
            tracing::warn!(provider = %t.provider.name, model = %t.model, reason = %broken, sent_chars = pump.state.text.len(), "committed stream broke");
            self.core
                .health
                .record_failure(t, Instant::now(), &self.snapshot.resilience.breaker);
            let original = format!("{}/{}: {broken}", t.provider.name, t.model);

            // Continue the answer on the next target that accepts an assistant prefill.
            let mut continued = None;
            while !rest.is_empty() {
                let step = rest.remove(0);
                if !step.target().supports_prefill || Instant::now() >= self.deadline {
                    continue;
                }
                if self.core.health.admit(step.target(), Instant::now(), false)
                    == Admission::Rejected
                {
                    continue;
                }
                let started = Instant::now();
                match self
                    .attempt(step.target(), Some(&pump.state.text), false)
                    .await
                {
                    Ok(Answer::Stream {
                        body,
                        parser,
                        prefix,
                        lease: l,
                        ..
                    }) => {
                        self.core.health.record_success(
                            step.target(),
                            started.elapsed(),
                            Some(started.elapsed()),
                        );
                        continued = Some((step, body, parser, prefix, l));
                        break;
                    }
                    Ok(Answer::Plain(..)) => {}
                    Err(err) => {
                        let class = classify(&err.failure);
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
            let Some((step, next_body, next_parser, prefix, next_lease)) = continued else {
                self.core.metrics.record_stream_interruption("error_event");
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
            for event in prefix {
                if !pump.forward(event).await {
                    return;
                }
            }
            current = step;
            body = next_body;
            parser = next_parser;
            lease = next_lease;
        }
    }
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
            Chunk::UsageOnly(_) if self.usage_added => true,
            Chunk::UsageOnly(_) => self.send(event.raw).await,
            Chunk::Content {
                text,
                finish_reason,
                substantive,
                ..
            } => {
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

/// Small counts as ready header values, so the common answer allocates nothing for them.
fn small_number(n: usize) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DIGITS.get(n) {
        Some(d) => HeaderValue::from_static(d),
        None => HeaderValue::from(n),
    }
}

/// Estimated prompt tokens, parsed only when a window could matter.
fn estimate_prompt(snapshot: &Snapshot, route: &Route, parsed: &RequestBody<'_>) -> u64 {
    let messages = parsed.field("messages");
    let prompt = parsed.field("prompt").or_else(|| parsed.field("input"));
    let raw_len =
        messages.map(|m| m.get().len()).unwrap_or(0) + prompt.map(|p| p.get().len()).unwrap_or(0);
    let smallest = std::iter::once(route)
        .chain(
            route
                .fallbacks
                .iter()
                .filter_map(|f| snapshot.route(f).map(|r| r.as_ref())),
        )
        .filter_map(|r| r.context_window)
        .min();
    // No more tokens than bytes: a short prompt fits every window without parsing it.
    if smallest.is_none_or(|w| (raw_len as u64) < w) && !route.truncate_to_fit {
        return (raw_len as u64).div_ceil(4);
    }
    let messages = messages.and_then(|m| serde_json::from_str::<Value>(m.get()).ok());
    let prompt = prompt.and_then(|p| serde_json::from_str::<Value>(p.get()).ok());
    tokens::estimate_prompt(messages.as_ref(), prompt.as_ref())
}
