//! What a finished request is counted as: one record per request, closed when its response
//! body ends, feeding the request metrics, `/stats`, the access log line and the SERVER span.

use super::*;

/// What a finished request is counted as.
pub(super) struct Record {
    pub(super) metrics: Arc<Metrics>,
    /// Labels for the generic path; `None` is counted as "none" (answered by the sidecar).
    pub(super) route: Option<Arc<str>>,
    pub(super) provider: Option<Arc<str>>,
    pub(super) path: &'static str,
    /// The answering target's metric handles: a successful request needs no label lookup.
    pub(super) target: Option<Arc<TargetMetrics>>,
    pub(super) status: u16,
    pub(super) start: Instant,
    /// The upstream connection, returned to the pool only when the body was read to the end.
    pub(super) lease: Option<Lease>,
    /// Counted in the `/stats` totals: model calls and pass-through calls.
    pub(super) counted: bool,
    /// What the exchange found out: attempts, failover, usage and cost.
    pub(super) outcome: Option<SharedOutcome>,
    /// The SERVER span (disabled without tracing); it ends with the response body.
    pub(super) span: tracing::Span,
    pub(super) trace_id: Option<String>,
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

impl OnFinish for Record {
    fn finish(mut self: Box<Self>, completed: bool) {
        let elapsed = self.start.elapsed();
        if let Some(lease) = self.lease.take().filter(|_| completed) {
            lease.release();
        }
        if !completed {
            tracing::debug!(status = self.status, "response body ended early");
        }
        let Record {
            metrics,
            route,
            provider,
            path,
            status,
            target,
            counted,
            outcome,
            span,
            trace_id,
            ..
        } = *self;
        let mut out = execute::Outcome::default();
        if let Some(shared) = &outcome {
            std::mem::swap(&mut *execute::lock(shared), &mut out);
        }
        let success = (200..300).contains(&status);
        let result = if success && out.interrupted {
            RequestOutcome::Interrupted
        } else if success && !completed && !out.complete {
            RequestOutcome::Cancelled
        } else if success && out.fell_back {
            RequestOutcome::Fallback
        } else if success {
            RequestOutcome::Success
        } else if (outcome.is_some() && out.attempts > 0) || route.is_some() {
            // Every target failed, or a pass-through call the provider refused.
            RequestOutcome::UpstreamError
        } else {
            RequestOutcome::Rejected
        };
        let label = result.label();
        let seconds = elapsed.as_secs_f64();
        let answered_by = target.as_ref().filter(|_| success);
        if let Some(t) = answered_by {
            t.stats.tally.latency.record(elapsed);
            if let Some(ttft) = out.ttft {
                t.ttft.observe(ttft.as_secs_f64());
            }
        }
        match (answered_by, status, result) {
            (Some(t), 200, RequestOutcome::Success) => {
                t.duration.observe(seconds);
                t.requests_ok.inc();
            }
            (Some(t), 200, RequestOutcome::Fallback) => {
                t.duration.observe(seconds);
                t.requests_fallback.inc();
            }
            _ => {
                let who = target.as_ref().or(out.last.as_ref());
                let (route, provider, model, path) = match who {
                    Some(t) => (t.route.clone(), t.provider.clone(), t.model.clone(), t.path),
                    None => (
                        route.unwrap_or_else(|| metrics.none_label.clone()),
                        provider.unwrap_or_else(|| metrics.none_label.clone()),
                        metrics.none_label.clone(),
                        path,
                    ),
                };
                let duration = DurationLabels {
                    route,
                    provider,
                    model,
                };
                metrics
                    .request_duration
                    .get_or_create(&duration)
                    .observe(seconds);
                let DurationLabels {
                    route,
                    provider,
                    model,
                } = duration;
                metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        route,
                        provider,
                        model,
                        path,
                        status,
                        outcome: label,
                    })
                    .inc();
            }
        }
        if counted {
            let total = &metrics.stats.total;
            total.sent();
            match result {
                RequestOutcome::Success => total.answered(false),
                RequestOutcome::Fallback => total.answered(true),
                _ => total.failed(),
            }
            total.latency.record(elapsed);
            // Model answers without usage count as missing; pass-through calls have none.
            if out.usage.is_some() || (success && out.complete) {
                total.add_usage(out.usage, out.bill);
            }
        }
        let who = target.as_ref().or(out.last.as_ref());
        let savings = out.bill.savings();
        tracing::info!(
            target: ACCESS_TARGET,
            route = who.map(|t| t.route.as_ref()),
            path = who.map(|t| t.path),
            provider = who.map(|t| t.provider.as_ref()),
            model = who.map(|t| t.model.as_ref()),
            status,
            outcome = label,
            attempts = out.attempts,
            fallbacks = out.fallbacks,
            duration_ms = (seconds * 1000.0 * 1000.0).round() / 1000.0,
            input_tokens = out.usage.map(|u| u.input),
            output_tokens = out.usage.map(|u| u.output),
            cost_usd = out.bill.cost.map(round_usd),
            savings_usd = savings.map(round_usd),
            trace_id = trace_id.as_deref(),
            "request"
        );
        if !span.is_disabled() {
            let mut attributes = Vec::with_capacity(8);
            attributes.extend([
                KeyValue::new("http.response.status_code", i64::from(status)),
                KeyValue::new("llm_sidecar.outcome", label),
                KeyValue::new("llm_sidecar.attempts", i64::from(out.attempts)),
                KeyValue::new("llm_sidecar.fallbacks", i64::from(out.fallbacks)),
                KeyValue::new("llm_sidecar.fallback", out.fell_back),
            ]);
            if let Some(t) = who {
                attributes.push(KeyValue::new("llm_sidecar.path", t.path));
            }
            if let Some(cost) = out.bill.cost {
                attributes.push(KeyValue::new("llm_sidecar.cost_usd", cost));
            }
            let failed = !matches!(result, RequestOutcome::Success | RequestOutcome::Fallback);
            if failed {
                attributes.push(KeyValue::new("error.type", label));
            }
            otel::set_attributes(&span, attributes);
            if failed {
                span.set_status(opentelemetry::trace::Status::error(label));
            }
        }
        drop(span);
        metrics.in_flight.dec();
    }
}

/// What a request came to, as its metrics, log line and span label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestOutcome {
    Success,
    /// Answered by a target after an earlier one failed.
    Fallback,
    /// A committed stream that broke and ended with an error event.
    Interrupted,
    /// The client went away before the answer was whole.
    Cancelled,
    /// Every target failed, or the provider refused a pass-through call.
    UpstreamError,
    /// Answered by the sidecar itself (a bad request, an unknown model, a limit).
    Rejected,
}

impl RequestOutcome {
    pub(super) fn label(self) -> &'static str {
        match self {
            RequestOutcome::Success => "success",
            RequestOutcome::Fallback => "fallback",
            RequestOutcome::Interrupted => "interrupted",
            RequestOutcome::Cancelled => "cancelled",
            RequestOutcome::UpstreamError => "upstream_error",
            RequestOutcome::Rejected => "rejected",
        }
    }
}

/// USD to the nano-dollar, so a log line shows 0.00001433 rather than float noise.
pub(super) fn round_usd(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

/// The trace id of an incoming W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub(super) fn incoming_trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let id = value.get(3..35)?;
    (value.len() >= 55 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != ZERO_TRACE_ID)
        .then(|| id.to_ascii_lowercase())
}

pub(super) const ZERO_TRACE_ID: &str = "00000000000000000000000000000000";

/// The SERVER span of a request: a child of the app's span when it sent `traceparent`.
pub(super) fn server_span(req: &Request<Incoming>) -> tracing::Span {
    let route: &'static str = match req.uri().path() {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{model}",
        _ => "",
    };
    let method = req.method().as_str();
    let span = tracing::info_span!(
        target: otel::SPAN_TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = (!route.is_empty()).then_some(route),
        url.path = req.uri().path(),
    );
    otel::adopt_remote_parent(&span, req.headers());
    span
}
