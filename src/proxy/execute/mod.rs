//! One model request end to end: walk the plan, retry and fail over by failure class, honour
//! rate limits inside the deadline, and commit the answer only once it is usable: response
//! headers for a plain answer, the first content chunk for a stream. After a stream is committed,
//! a cut, stall or broken chunk is never passed off as success: the answer is continued on a
//! prefill-capable target or the stream ends with an explicit error event and no `[DONE]`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::sse::{inspect, Chunk, RawEvent, SseParser};
use crate::body::{full, BoxError, ChannelBody, ProxyBody};
use crate::config::budgets::{OnExhausted, TargetRef};
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
use crate::spend::Reservation;
use crate::telemetry::cost::{format_usd, Bill, Usage};
use crate::telemetry::metrics::{Metrics, TargetMetrics};
use crate::telemetry::trace::TraceIds;
use crate::telemetry::{otel, Operation};
use crate::upstream::{Lease, Upstream, UpstreamError};
use opentelemetry::KeyValue;

mod attempt;
mod report;
mod settle;
mod stream;
mod trace;

use attempt::{Answer, AttemptError, PlainBody, OVERSIZED_EVENT};
use settle::{cut, Reported};
use trace::RequestTrace;

pub use report::{Report, StreamEnd};
pub use trace::{AttemptTrace, Traced};

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

/// What every request shares: connections, target health, the retry budget, metrics.
pub struct Core {
    pub upstream: Arc<Upstream>,
    pub health: Health,
    pub budget: RetryBudget,
    pub metrics: Arc<Metrics>,
    pub guard: crate::routing::guard::Guard,
    pub shadows: Arc<crate::shadow::Shadows>,
    /// The response cache and its flights.
    pub cache: crate::cache::Shared,
    /// The daily spend budgets' counts.
    pub spend: Arc<crate::spend::Spend>,
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Answered,
    /// Not sent: the target's breaker turned it away.
    BreakerOpen,
    /// Not sent: a daily budget matching the target has no room for it.
    BudgetExhausted,
    Failed(Class),
}

impl AttemptOutcome {
    /// The attempt reached the provider (a breaker or a budget stops it before).
    pub fn was_sent(self) -> bool {
        !matches!(
            self,
            AttemptOutcome::BreakerOpen | AttemptOutcome::BudgetExhausted
        )
    }

    /// The label of the attempt log, the attempts metric and the error's attempt list.
    pub fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Answered => "ok",
            AttemptOutcome::BreakerOpen => "breaker_open",
            AttemptOutcome::BudgetExhausted => "budget_exhausted",
            AttemptOutcome::Failed(class) => class.label(),
        }
    }
}

/// One attempt, for the attempt log and the final error.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    pub step: Step,
    pub outcome: AttemptOutcome,
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
            "outcome": self.outcome.label(),
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
    /// The committed target's metric handles.
    pub handles: Arc<crate::telemetry::metrics::TargetMetrics>,
    /// What the exchange found out up to the commit.
    pub report: Report,
    /// A stream's usage, cost and ending, sent by its pump before the client gets the last
    /// bytes; `None` for a plain answer, whose report is whole already.
    pub stream_end: Option<oneshot::Receiver<StreamEnd>>,
}

/// Every target failed: the one error the client gets, and what the exchange found out.
pub struct GaveUp {
    pub error: SidecarError,
    pub report: Report,
}

/// Where the exchange stores its answer once it is complete, and who waits for it.
pub struct Capture {
    pub cache: Arc<crate::cache::Cache>,
    pub key: crate::cache::Key,
    pub policy: crate::cache::Policy,
    /// Identical requests wait for this one's answer; dropped unlanded, they go on their own.
    pub leader: Option<crate::cache::Leader>,
    /// The shared tier in Redis and its per-entry cap, when there is one.
    pub shared: Option<(Arc<crate::cache::SharedTier>, u64)>,
}

impl Capture {
    /// Stores a complete answer, hands it to the waiters, and sends it to the shared tier in
    /// the background (the answer never waits for Redis).
    fn store(mut self, answer: crate::cache::Stored, cost: Option<f64>) {
        let entry = self
            .cache
            .put(self.key, answer, cost, &self.policy, Instant::now());
        if let Some((tier, max_entry_bytes)) = &self.shared {
            tier.put(self.key, entry.clone(), &self.policy, *max_entry_bytes);
        }
        if let Some(leader) = self.leader.take() {
            leader.landed(entry);
        }
    }
}

/// A model request as the client sent it.
pub struct Call {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub bytes: Bytes,
}

pub struct Exchange {
    core: Arc<Core>,
    snapshot: Arc<Snapshot>,
    /// The side order and its reason (flags, guard, rollout bucket).
    decision: Decision,
    /// The client's request as it came (`outbound::request` leaves out what is not forwarded).
    call: Call,
    route: Arc<Route>,
    stream: bool,
    /// The client did not ask for usage in its stream; the sidecar asked, and strips it.
    usage_added: bool,
    prompt_tokens: u64,
    /// The request's `max_tokens` (or `max_completion_tokens`), for a budget's worst case.
    max_tokens: Option<u64>,
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
    /// Where a complete answer is stored, when the route caches this request.
    capture: Option<Capture>,
    /// The request's trace ids, while tracing is on: attempts are recorded for their spans.
    ids: Option<TraceIds>,
    operation: Operation,
    /// What every attempt span shows of the request (read only while tracing is on).
    request_trace: Option<Arc<RequestTrace>>,
    /// The attempts that ended before the answer was committed.
    traces: Vec<AttemptTrace>,
}

impl Exchange {
    pub fn new(
        core: Arc<Core>,
        snapshot: Arc<Snapshot>,
        decision: Decision,
        call: Call,
        parsed: &RequestBody<'_>,
        route: Arc<Route>,
        ids: Option<TraceIds>,
    ) -> Exchange {
        let headers = &call.headers;
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
        // The sidecar's own request headers are read here; `outbound::request` leaves them out.
        let stream = parsed.stream;
        let usage_added = stream
            && !parsed
                .field("stream_options")
                .and_then(|o| serde_json::from_str::<Value>(o.get()).ok())
                .is_some_and(|o| o["include_usage"] == Value::Bool(true));
        let prompt_tokens = estimate_prompt(&snapshot, &route, parsed);
        let max_tokens = parsed
            .field("max_tokens")
            .or_else(|| parsed.field("max_completion_tokens"))
            .and_then(|v| v.get().parse::<u64>().ok());
        let deadline = Instant::now() + snapshot.resilience.deadline;
        let operation = Operation::from_path(&call.path_and_query);
        let request_trace = ids
            .as_ref()
            .map(|_| Arc::new(RequestTrace::read(parsed, operation)));
        let mut exchange = Exchange {
            ids,
            operation,
            request_trace,
            traces: Vec::new(),
            core,
            snapshot,
            decision,
            call,
            route,
            stream,
            usage_added,
            prompt_tokens,
            max_tokens,
            messages_override: None,
            truncated: 0,
            prefer,
            low_latency,
            deadline,
            attempts: Vec::new(),
            steps: Vec::new(),
            skipped: Vec::new(),
            first_body: None,
            capture: None,
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

    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The client asked for a stream.
    pub fn streams(&self) -> bool {
        self.stream
    }

    /// A streaming client asked for the usage chunk itself.
    pub fn client_asked_usage(&self) -> bool {
        self.stream && !self.usage_added
    }

    /// Stores the answer in the cache once it is complete (a plain success, or a stream that
    /// finished on its first target).
    pub fn capture(&mut self, capture: Capture) {
        self.capture = Some(capture);
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
        let Ok(parsed) = RequestBody::parse(&self.call.bytes) else {
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
        match RequestBody::parse(&self.call.bytes) {
            Ok(parsed) => self.render_body(&parsed, target, prefill),
            Err(_) => self.call.bytes.clone(),
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
            return self.call.bytes.clone();
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

    /// Runs the request to a committed answer, or to one error that keeps the most meaningful
    /// upstream failure and lists every attempt.
    pub async fn run(mut self: Box<Self>) -> Result<Committed, GaveUp> {
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
        // The first daily budget that turned a target away.
        let mut refused: Option<crate::spend::Exhausted> = None;
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
                let reservation = match self.reserve(step).await {
                    Ok(reservation) => reservation,
                    Err(exhausted) => {
                        self.record(step, AttemptOutcome::BudgetExhausted, None, Instant::now());
                        tracing::info!(provider = %target.provider.name, model = %target.model, budget = %exhausted.budget, reason = exhausted.reason.as_str(), "a daily budget turned the target away: {exhausted}");
                        if exhausted.on_exhausted == OnExhausted::Reject {
                            return Err(GaveUp {
                                error: exhausted.error(),
                                report: self.final_report(),
                            });
                        }
                        refused.get_or_insert(exhausted);
                        break;
                    }
                };
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
                    self.record(step, AttemptOutcome::BreakerOpen, None, Instant::now());
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
                let trace =
                    self.attempt_trace(step, kind, last_failed.as_ref().map(|l| l.2), admission);
                let started = Instant::now();
                let traceparent = self.traceparent(&trace);
                match self
                    .attempt(target, None, step_index == 0, traceparent)
                    .await
                {
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
                        if !self.attempts.is_empty() {
                            // A clean first-try answer needs no attempt log: `commit` counts it.
                            self.record(step, AttemptOutcome::Answered, Some(200), started);
                        }
                        let rest = if self.stream {
                            // A committed stream may need the rest of the plan to continue.
                            steps.split_off(step_index + 1)
                        } else {
                            Vec::new()
                        };
                        return Ok(self.commit(
                            &steps[step_index],
                            answer,
                            rest,
                            trace,
                            started,
                            reservation,
                        ));
                    }
                    Err(AttemptError {
                        failure,
                        passthrough,
                    }) => {
                        // A failed attempt costs nothing: what it held is released.
                        drop(reservation);
                        let class = classify(&failure);
                        let status = match &failure {
                            Failure::Status { status, .. } => Some(status.as_u16()),
                            _ => None,
                        };
                        self.record(step, AttemptOutcome::Failed(class), status, started);
                        if let Some(mut trace) = trace {
                            trace.fail(class.label(), status);
                            self.traces.push(trace);
                        }
                        last_failed = Some((
                            self.core.metrics.target(target),
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
        let error = match (&worst, refused) {
            // Nothing was sent: the budgets left no target to try.
            (None, Some(exhausted)) => exhausted.error(),
            _ => self.give_up(worst, &skipped),
        };
        Err(GaveUp {
            error,
            report: self.final_report(),
        })
    }
}

impl Exchange {
    /// Holds the worst case of an attempt on `step`'s target on every budget matching it:
    /// the prompt at the input price plus `max_tokens` (the request's, else the route's) at
    /// the output price. `None` when no budget matches.
    async fn reserve(&self, step: &Step) -> Result<Option<Reservation>, crate::spend::Exhausted> {
        let budgets = &self.snapshot.budgets;
        if budgets.list.is_empty() {
            return Ok(None);
        }
        let target = step.target();
        let output = self.max_tokens.unwrap_or(step.route.max_tokens);
        let worst = target.price.as_ref().map_or(0.0, |price| {
            crate::spend::worst_case_usd(price, self.prompt_tokens, output)
        });
        let reservation = self
            .core
            .spend
            .reserve(budgets, TargetRef::of(target), worst)
            .await?;
        Ok((!reservation.is_empty()).then_some(reservation))
    }
}

/// Settles a reservation on what the answer cost, off the request's way (with Redis it is a
/// round trip).
fn settle_reservation(reservation: Option<Reservation>, usd: f64) {
    if let Some(reservation) = reservation {
        tokio::spawn(reservation.settle(usd));
    }
}

/// What the part of an answer a target streamed cost, when it reported no usage: the prompt
/// and the streamed text, estimated.
fn streamed_cost(target: &Target, prompt_tokens: u64, text: &str) -> f64 {
    target.price.as_ref().map_or(0.0, |price| {
        price.cost(Usage {
            input: prompt_tokens,
            output: tokens::estimate_text(text),
            cached_input: 0,
        })
    })
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
