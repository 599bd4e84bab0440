//! Shadow traffic: `shadow_percent` of successful chat/completion requests is also sent, in a
//! spawned task, to the other side of the same route (relay ↔ official) with the same body.
//! The client never waits for it and never sees it.
//!
//! Shadows are bounded: at most `shadow.max_concurrency` run at once (more are dropped and
//! counted, never queued), and they stop for the rest of the UTC day once their spend reaches
//! `shadow.daily_budget_usd`. They are sent once (no retries) and stay out of the primary's
//! health, breakers, retry budget, guard and request metrics.
//!
//! Each pair is compared: status, latency, time to first token, tokens in and out, cost, finish
//! reason, and an equivalence score of the two answers (normalised token overlap, see
//! [`equivalence`]); `shadow.equivalence_threshold` decides "equivalent". Results go to
//! Prometheus and, when `shadow.log` is set, one JSON line per pair to stdout or a file, without
//! prompts or answers unless `shadow.log_content` is on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

mod log;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::body::{Observed, OnFinish, ProxyBody};
use crate::config::{unix_seconds, Route, Snapshot, Target};
use crate::openai::RequestBody;
use crate::providers::ProviderKind;
use crate::routing::tokens;
use crate::telemetry::metrics::{Metrics, OutcomeLabels};
use crate::telemetry::otel;
use crate::upstream::Upstream;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// At most this much of each answer is kept for the comparison.
const MAX_CAPTURE: usize = 2 * 1024 * 1024;

pub struct Shadows {
    in_flight: AtomicUsize,
    /// (equivalent, compared) pairs since start.
    compared: Mutex<(u64, u64)>,
    /// (UTC day number, USD spent that day)
    spend: Mutex<(u64, f64)>,
    log: log::ShadowLog,
    metrics: Arc<Metrics>,
}

/// What one side answered, as the comparison sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub latency: Duration,
    pub first_byte: Option<Duration>,
    /// The body arrived whole (not cut, not timed out).
    pub complete: bool,
}

/// The request a shadow replays.
pub struct ShadowRequest {
    pub snapshot: Arc<Snapshot>,
    pub route: Arc<Route>,
    /// The side that answered the client.
    pub primary_side: ProviderKind,
    pub method: Method,
    pub path_and_query: String,
    pub body: Bytes,
    pub stream: bool,
    pub started: Instant,
    /// The request's trace: the shadow's span links to its SERVER span (`None` without tracing).
    pub trace: Option<crate::telemetry::trace::TraceIds>,
}

impl Shadows {
    pub fn new(metrics: Arc<Metrics>) -> Shadows {
        Shadows {
            in_flight: AtomicUsize::new(0),
            compared: Mutex::new((0, 0)),
            spend: Mutex::new((0, 0.0)),
            log: log::ShadowLog::new(metrics.shadow_log_dropped.clone()),
            metrics,
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .shadow_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Whether this request is picked for shadowing (`shadow_percent` of them, at random).
    pub fn picked(snapshot: &Snapshot, path: &str) -> bool {
        let percent = u64::from(snapshot.flags.shadow_percent);
        percent > 0
            && matches!(path, "/v1/chat/completions" | "/v1/completions")
            && fastrand::u64(..100) < percent
    }

    /// Starts the shadow of a successful primary answer and returns the primary response with
    /// its body observed for the comparison. Everything that stops a shadow is counted.
    pub fn launch(
        self: &Arc<Self>,
        upstream: Arc<Upstream>,
        request: ShadowRequest,
        primary: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let cfg = &request.snapshot.shadow;
        let other = request.primary_side.other();
        if request.route.target(other).is_none() {
            self.count("no_target");
            return primary;
        }
        let today = unix_seconds(SystemTime::now()) / 86_400;
        {
            let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
            if spend.0 != today {
                *spend = (today, 0.0);
            }
            if spend.1 >= cfg.daily_budget_usd {
                drop(spend);
                self.count("dropped_budget");
                return primary;
            }
        }
        let max = cfg.max_concurrency as usize;
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.count("dropped_concurrency");
            return primary;
        }
        self.metrics.shadow_in_flight.inc();

        let (tx, rx) = oneshot::channel();
        let (parts, body) = primary.into_parts();
        let capture = Capture {
            captured: Vec::new(),
            started: request.started,
            first_byte: None,
            status: parts.status.as_u16(),
            tx,
        };
        let shadows = self.clone();
        tokio::spawn(async move {
            shadows.run(upstream, request, other, rx).await;
            shadows.in_flight.fetch_sub(1, Ordering::AcqRel);
            shadows.metrics.shadow_in_flight.dec();
        });
        Response::from_parts(parts, Observed::new(body, Box::new(capture)).boxed_unsync())
    }

    async fn run(
        &self,
        upstream: Arc<Upstream>,
        request: ShadowRequest,
        side: ProviderKind,
        primary: oneshot::Receiver<Answer>,
    ) {
        let Some(target) = request.route.target(side) else {
            return;
        };
        let primary_target = request.route.target(request.primary_side);
        let span = shadow_span(&request, target);
        let outcome = self
            .compare(upstream, &request, target, primary_target, primary, &span)
            .await;
        if !span.is_disabled() {
            span.set_attribute("llm_sidecar.shadow.outcome", outcome);
            if !matches!(outcome, "equivalent" | "different") {
                span.set_attribute("error.type", outcome);
                span.set_status(opentelemetry::trace::Status::error(outcome));
            }
        }
    }

    /// Calls the shadow side, waits for the primary answer and compares them; returns the
    /// outcome counted.
    async fn compare(
        &self,
        upstream: Arc<Upstream>,
        request: &ShadowRequest,
        target: &Target,
        primary_target: Option<&Target>,
        primary: oneshot::Receiver<Answer>,
        span: &tracing::Span,
    ) -> &'static str {
        let cfg = request.snapshot.shadow.clone();
        let shadow = tokio::time::timeout(cfg.timeout, call(&upstream, request, target, span))
            .await
            .unwrap_or_else(|_| Answer {
                latency: cfg.timeout,
                ..Default::default()
            });
        // The client's body may still be streaming; wait for it, as long as the shadow may.
        let primary = tokio::time::timeout(cfg.timeout, primary)
            .await
            .ok()
            .and_then(Result::ok);
        let shadow_cost = cost(target, &shadow);
        if !span.is_disabled() {
            span.set_attribute("http.response.status_code", i64::from(shadow.status));
            if let Some(tokens) = shadow.prompt_tokens {
                span.set_attribute("gen_ai.usage.input_tokens", tokens as i64);
            }
            if let Some(tokens) = shadow.completion_tokens {
                span.set_attribute("gen_ai.usage.output_tokens", tokens as i64);
            }
            if let Some(c) = shadow_cost {
                span.set_attribute("llm_sidecar.cost_usd", c);
            }
        }
        if let Some(c) = shadow_cost {
            self.metrics.shadow_spend.inc_by(c);
            let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
            spend.1 += c;
        }
        let Some(primary) = primary.filter(|p| p.complete) else {
            self.count("primary_incomplete");
            return "primary_incomplete";
        };
        // The prompt is estimated once, and only when a side reported no usage.
        let estimated_prompt = (primary.prompt_tokens.is_none() || shadow.prompt_tokens.is_none())
            .then(|| estimate_prompt_tokens(&request.body));
        let primary = with_estimates(primary, estimated_prompt);
        let shadow = with_estimates(shadow, estimated_prompt);
        let (outcome, score) = if !(200..300).contains(&shadow.status) || !shadow.complete {
            ("shadow_error", None)
        } else {
            let score = equivalence(&primary.text, &shadow.text);
            let equivalent = score >= cfg.equivalence_threshold;
            {
                let mut c = self.compared.lock().unwrap_or_else(|p| p.into_inner());
                c.0 += u64::from(equivalent);
                c.1 += 1;
                self.metrics
                    .shadow_equivalence_rate
                    .set(c.0 as f64 / c.1 as f64);
            }
            let latency_delta = shadow.latency.as_secs_f64() - primary.latency.as_secs_f64();
            self.metrics.shadow_equivalence.observe(score);
            self.metrics.shadow_latency_delta.observe(latency_delta);
            if !span.is_disabled() {
                span.set_attribute("llm_sidecar.shadow.equivalence_score", score);
                span.set_attribute("llm_sidecar.shadow.latency_delta", latency_delta);
            }
            let outcome = if equivalent {
                "equivalent"
            } else {
                "different"
            };
            (outcome, Some(score))
        };
        self.count(outcome);
        self.log(
            request,
            target,
            primary_target,
            &primary,
            &shadow,
            score,
            outcome,
        );
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        request: &ShadowRequest,
        shadow_target: &Target,
        primary_target: Option<&Target>,
        primary: &Answer,
        shadow: &Answer,
        score: Option<f64>,
        outcome: &str,
    ) {
        let cfg = &request.snapshot.shadow;
        let Some(destination) = cfg.log.as_deref() else {
            return;
        };
        let side = |side: ProviderKind, target: Option<&Target>, a: &Answer| {
            let mut v = json!({
                "side": side.as_str(),
                "provider": target.map(|t| t.provider.name.clone()),
                "model": target.map(|t| t.model.clone()),
                "status": a.status,
                "latency_ms": a.latency.as_millis() as u64,
                "first_byte_ms": a.first_byte.map(|d| d.as_millis() as u64),
                "prompt_tokens": a.prompt_tokens,
                "completion_tokens": a.completion_tokens,
                "cost_usd": target.and_then(|t| cost(t, a)),
                "finish_reason": a.finish_reason,
            });
            if cfg.log_content {
                v["text"] = Value::String(a.text.clone());
            }
            v
        };
        let mut line = json!({
            "at_unix": unix_seconds(SystemTime::now()),
            "route": request.route.name,
            "stream": request.stream,
            "outcome": outcome,
            "equivalence": score,
            "equivalence_threshold": cfg.equivalence_threshold,
            "primary": side(request.primary_side, primary_target, primary),
            "shadow": side(request.primary_side.other(), Some(shadow_target), shadow),
        });
        if cfg.log_content {
            line["request"] = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        }
        let mut text = line.to_string();
        text.push('\n');
        self.log.write(destination, text);
    }
}

/// The shadow call: sent once, read to the end (a stream too), timed.
/// The shadow call's own span: a new trace linked to the request it mirrors, so shadow traffic
/// never inflates the request's trace.
fn shadow_span(request: &ShadowRequest, target: &Target) -> tracing::Span {
    // Shadows of a request not sampled at the head are not traced either.
    let Some(ids) = request.trace.as_ref().filter(|ids| ids.sampled) else {
        return tracing::Span::none();
    };
    let operation = crate::telemetry::Operation::from_path(&request.path_and_query);
    let span = tracing::info_span!(
        target: otel::SPAN_TARGET,
        parent: None,
        "shadow",
        otel.name = %format_args!("shadow {} {}", operation.name(), target.model),
        otel.kind = "client",
    );
    otel::link(&span, ids.context());
    let provider = &target.provider;
    span.set_attribute("gen_ai.operation.name", operation.name());
    span.set_attribute(
        "gen_ai.provider.name",
        crate::telemetry::gen_ai_provider_name(&provider.name).to_string(),
    );
    span.set_attribute("gen_ai.request.model", target.model.clone());
    span.set_attribute("gen_ai.request.stream", request.stream);
    span.set_attribute("server.address", provider.host().to_string());
    span.set_attribute("server.port", i64::from(provider.port()));
    span.set_attribute("llm_sidecar.route", request.route.name.clone());
    span.set_attribute("llm_sidecar.provider", provider.name.clone());
    span.set_attribute("llm_sidecar.path", target.path().as_str());
    span.set_attribute("llm_sidecar.shadow", true);
    span
}

async fn call(
    upstream: &Arc<Upstream>,
    request: &ShadowRequest,
    target: &Target,
    span: &tracing::Span,
) -> Answer {
    let started = Instant::now();
    let failed = |status: u16| Answer {
        status,
        latency: started.elapsed(),
        ..Default::default()
    };
    let body = match RequestBody::parse(&request.body) {
        Ok(parsed) if request.stream => {
            // Usage is part of the comparison: ask for it in the stream.
            let options = parsed.stream_options_with_usage();
            parsed.render(&target.model, &[("stream_options", options.as_str())])
        }
        Ok(parsed) => parsed.with_model(&target.model),
        Err(_) => return failed(0),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let Ok(req) = crate::outbound::request(
        &target.provider,
        request.method.clone(),
        &request.path_and_query,
        &headers,
        body,
        otel::traceparent(span),
    ) else {
        return failed(0);
    };
    let Ok((response, lease)) = upstream.send(req).await else {
        return failed(0);
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut captured = Vec::new();
    let mut first_byte = None;
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Err(_)) => break false,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    first_byte.get_or_insert_with(|| started.elapsed());
                    let room = MAX_CAPTURE.saturating_sub(captured.len());
                    captured.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    };
    if complete {
        if let Some(lease) = lease {
            lease.release();
        }
    }
    let mut answer = parse_answer(&captured);
    answer.status = status;
    answer.latency = started.elapsed();
    answer.first_byte = first_byte;
    answer.complete = complete;
    answer
}

/// The answer in a chat/completion body: a JSON object, or an SSE stream of chunks.
pub fn parse_answer(body: &[u8]) -> Answer {
    let mut answer = Answer::default();
    let mut take = |v: &Value, stream: bool| {
        if let Some(choice) = v["choices"].get(0) {
            let piece = if stream {
                choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
            } else {
                choice["message"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
            };
            if let Some(p) = piece {
                answer.text.push_str(p);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                answer.finish_reason = Some(f.to_string());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            answer.prompt_tokens = u["prompt_tokens"].as_u64().or(answer.prompt_tokens);
            answer.completion_tokens = u["completion_tokens"].as_u64().or(answer.completion_tokens);
        }
    };
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        take(&v, false);
        return answer;
    }
    for line in String::from_utf8_lossy(body).lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
            take(&v, true);
        }
    }
    answer
}

/// Fills missing token counts with estimates (a stream whose usage chunk the client did not ask
/// for has none on the primary side).
fn with_estimates(mut a: Answer, estimated_prompt: Option<u64>) -> Answer {
    if a.completion_tokens.is_none() {
        a.completion_tokens = Some(tokens::estimate_text(&a.text));
    }
    if a.prompt_tokens.is_none() {
        a.prompt_tokens = estimated_prompt;
    }
    a
}

fn estimate_prompt_tokens(request: &Bytes) -> u64 {
    let body: Value = serde_json::from_slice(request).unwrap_or(Value::Null);
    tokens::estimate_prompt(body.get("messages"), body.get("prompt"))
}

fn cost(target: &Target, a: &Answer) -> Option<f64> {
    let price = target.price?;
    Some(price.cost(crate::telemetry::cost::Usage {
        input: a.prompt_tokens.unwrap_or(0),
        output: a.completion_tokens.unwrap_or(0),
        cached_input: 0,
    }))
}

/// How alike two answers are, from 0 to 1: the F1 score of their word multisets. Words are
/// maximal runs of letters and digits, lower-cased; punctuation, spacing and case do not count,
/// word order does not either. Two empty answers score 1; one empty answer scores 0.
pub fn equivalence(a: &str, b: &str) -> f64 {
    fn words(text: &str) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for w in text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            *counts.entry(w.to_lowercase()).or_insert(0) += 1;
        }
        counts
    }
    let (wa, wb) = (words(a), words(b));
    let (na, nb): (usize, usize) = (wa.values().sum(), wb.values().sum());
    if na == 0 && nb == 0 {
        return 1.0;
    }
    if na == 0 || nb == 0 {
        return 0.0;
    }
    let overlap: usize = wa
        .iter()
        .map(|(w, n)| (*n).min(wb.get(w).copied().unwrap_or(0)))
        .sum();
    2.0 * overlap as f64 / (na + nb) as f64
}

/// A copy (up to a cap) of the primary's response body as it passes to the client untouched,
/// handed to the comparison when the body ends or is dropped.
struct Capture {
    captured: Vec<u8>,
    started: Instant,
    first_byte: Option<Duration>,
    status: u16,
    tx: oneshot::Sender<Answer>,
}

impl OnFinish for Capture {
    fn data(&mut self, data: &Bytes) {
        self.first_byte.get_or_insert(self.started.elapsed());
        let room = MAX_CAPTURE.saturating_sub(self.captured.len());
        self.captured
            .extend_from_slice(&data[..data.len().min(room)]);
    }

    fn finish(self: Box<Self>, complete: bool) {
        let mut answer = parse_answer(&self.captured);
        answer.status = self.status;
        answer.latency = self.started.elapsed();
        answer.first_byte = self.first_byte;
        answer.complete = complete;
        let _ = self.tx.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalence_is_word_overlap_ignoring_case_punctuation_and_order() {
        assert_eq!(equivalence("", ""), 1.0);
        assert_eq!(equivalence("Paris.", ""), 0.0);
        assert_eq!(
            equivalence("The capital is Paris.", "the capital is PARIS"),
            1.0
        );
        assert_eq!(
            equivalence("Paris is the capital", "The capital is Paris"),
            1.0
        );
        // 3 shared words of 4 and 4: 2*3/8.
        assert!((equivalence("a b c d", "a b c x") - 0.75).abs() < 1e-9);
        assert!(equivalence("yes", "no") < 0.01);
    }

    #[test]
    fn answers_are_read_from_json_and_from_streams() {
        let json = br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let a = parse_answer(json);
        assert_eq!(a.text, "Hi there");
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
        assert_eq!((a.prompt_tokens, a.completion_tokens), (Some(5), Some(2)));

        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let s = parse_answer(sse);
        assert_eq!(s.text, "Hi there");
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert_eq!(s.completion_tokens, Some(2));
    }
}
