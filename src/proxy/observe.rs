//! What a finished request is counted as: one record per request, closed when its response
//! body ends, feeding the request metrics, `/stats`, the access log line and the SERVER span.

use super::*;
use crate::telemetry::cache::CacheStatus;
use crate::telemetry::cost::{Bill, Usage};
use crate::telemetry::trace::{self, Draft, TraceIds};
use execute::{Report, StreamEnd, Traced};
use tokio::sync::oneshot;

/// What serving a request found out, returned by the path that served it with its response.
#[derive(Default)]
pub(super) struct Served {
    /// Counted in the `/stats` totals: model calls and pass-through calls.
    pub(super) counted: bool,
    /// Labels for the generic path; `None` is counted as "none" (answered by the sidecar).
    pub(super) route: Option<Arc<str>>,
    pub(super) provider: Option<Arc<str>>,
    pub(super) path: Option<&'static str>,
    /// The answering target's metric handles: a successful request needs no label lookup.
    pub(super) target: Option<Arc<TargetMetrics>>,
    /// The upstream connection, returned to the pool only when the body was read to the end.
    pub(super) lease: Option<Lease>,
    /// What the exchange (or the one pass-through call) found out; `None` when nothing was sent.
    pub(super) report: Option<Report>,
    /// A committed stream's ending, sent by its pump.
    pub(super) stream_end: Option<oneshot::Receiver<StreamEnd>>,
    /// How the answer was found, on model requests.
    pub(super) cache: Option<CacheStatus>,
    /// The route's static fallback answered: every target failed, and nothing was cached.
    pub(super) static_answer: bool,
}

impl Served {
    /// A model or pass-through call, counted in `/stats` however it ends.
    pub(super) fn counted() -> Served {
        Served {
            counted: true,
            ..Served::default()
        }
    }
}

/// A request being answered: opened when it arrives, closed when its response body ends.
pub(super) struct Record {
    pub(super) metrics: Arc<Metrics>,
    pub(super) start: Instant,
    pub(super) status: u16,
    pub(super) served: Served,
    /// The request's trace ids and what its SERVER span shows of it, while tracing is on.
    pub(super) trace: Option<(TraceIds, ServerTrace)>,
    /// The app's trace id (from its `traceparent`), for the log line of a request not exported.
    pub(super) incoming_trace_id: Option<String>,
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

/// What the SERVER span shows of the request as it arrived.
pub(super) struct ServerTrace {
    start: std::time::SystemTime,
    method: Method,
    route: &'static str,
    path: String,
}

impl ServerTrace {
    pub(super) fn of<B>(req: &Request<B>) -> ServerTrace {
        ServerTrace {
            start: std::time::SystemTime::now(),
            method: req.method().clone(),
            route: route_template(req.uri().path()),
            path: req.uri().path().to_string(),
        }
    }
}

/// A request once its response body has ended: what it came to and what it cost.
struct Finished {
    outcome: RequestOutcome,
    status: u16,
    elapsed: Duration,
    /// Who the request is counted against: the answering target, else the last one tried.
    who: Option<Arc<TargetMetrics>>,
    /// The answering target, for a success.
    answered_by: Option<Arc<TargetMetrics>>,
    report: Report,
    usage: Option<Usage>,
    bill: Bill,
    /// The whole answer was handed over.
    complete: bool,
    /// The attempts, for their spans (while tracing is on).
    traced: Option<execute::Traced>,
    /// A stream whose pump had not ended when the client left: its attempts come later.
    pending: Option<oneshot::Receiver<StreamEnd>>,
}

impl OnFinish for Record {
    fn finish(mut self: Box<Self>, completed: bool) {
        let elapsed = self.start.elapsed();
        if let Some(lease) = self.served.lease.take().filter(|_| completed) {
            lease.release();
        }
        if !completed {
            tracing::debug!(status = self.status, "response body ended early");
        }
        let finished = self.conclude(completed, elapsed);
        self.observe(finished);
        // The SERVER span ends before the request stops counting as in flight.
        let metrics = self.metrics.clone();
        drop(self);
        metrics.in_flight.dec();
    }
}

impl Record {
    /// What the request came to, from its status, what serving it found out, and whether the
    /// client read the body to its end.
    fn conclude(&mut self, completed: bool, elapsed: Duration) -> Finished {
        let served = &mut self.served;
        let ran = served.report.is_some();
        let mut report = served.report.take().unwrap_or_default();
        let mut traced = report.trace.take();
        let mut pending = None;
        let end = served.stream_end.take().map(|mut rx| match rx.try_recv() {
            Ok(end) => Some(end),
            Err(oneshot::error::TryRecvError::Empty) => {
                pending = Some(rx);
                None
            }
            Err(oneshot::error::TryRecvError::Closed) => None,
        });
        let (usage, bill, interrupted, complete) = match end {
            // A stream: its pump's ending, if it got to one before the client left.
            Some(Some(mut end)) => {
                if let Some(traced) = &mut traced {
                    traced.attempts.append(&mut end.attempts);
                }
                if end.cancelled {
                    (None, Bill::default(), false, false)
                } else {
                    (end.usage, end.bill, end.interrupted, !end.interrupted)
                }
            }
            Some(None) => (None, Bill::default(), false, false),
            None => (report.usage, report.bill, false, report.complete),
        };
        let success = (200..300).contains(&self.status);
        let outcome = if success && served.static_answer {
            RequestOutcome::Static
        } else if success && served.cache == Some(CacheStatus::Stale) {
            RequestOutcome::Stale
        } else if success && interrupted {
            RequestOutcome::Interrupted
        } else if success && !completed && !complete {
            RequestOutcome::Cancelled
        } else if success && report.fell_back {
            RequestOutcome::Fallback
        } else if success {
            RequestOutcome::Success
        } else if (ran && report.attempts > 0) || served.route.is_some() {
            // Every target failed, or a pass-through call the provider refused.
            RequestOutcome::UpstreamError
        } else {
            RequestOutcome::Rejected
        };
        let answered_by = served.target.clone().filter(|_| success);
        let who = served.target.clone().or_else(|| report.last.clone());
        Finished {
            outcome,
            status: self.status,
            elapsed,
            who,
            answered_by,
            report,
            usage,
            bill,
            complete,
            traced,
            pending,
        }
    }

    /// The one place a finished request is seen: the request metrics, `/stats`, the access
    /// log line and, when it is exported, its spans.
    fn observe(&mut self, f: Finished) {
        let exported = self
            .trace
            .as_ref()
            .is_some_and(|(ids, _)| exported(ids, &f));
        self.count(&f);
        self.log(&f, exported);
        if exported {
            if let Some((ids, server)) = self.trace.take() {
                self.export(ids, server, f);
            }
        }
    }

    fn count(&self, f: &Finished) {
        let metrics = &self.metrics;
        let seconds = f.elapsed.as_secs_f64();
        if let Some(t) = &f.answered_by {
            t.stats.tally.latency.record(f.elapsed);
            if let Some(ttft) = f.report.ttft {
                t.ttft.observe(ttft.as_secs_f64());
            }
        }
        match (&f.answered_by, f.status, f.outcome) {
            (Some(t), 200, RequestOutcome::Success) => {
                t.duration.observe(seconds);
                t.requests_ok.inc();
            }
            (Some(t), 200, RequestOutcome::Fallback) => {
                t.duration.observe(seconds);
                t.requests_fallback.inc();
            }
            _ => {
                let (route, provider, model, path) = match &f.who {
                    Some(t) => (t.route.clone(), t.provider.clone(), t.model.clone(), t.path),
                    None => {
                        let none = || metrics.none_label.clone();
                        let served = &self.served;
                        (
                            served.route.clone().unwrap_or_else(none),
                            served.provider.clone().unwrap_or_else(none),
                            none(),
                            served.path.unwrap_or("none"),
                        )
                    }
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
                        status: f.status,
                        outcome: f.outcome.label(),
                    })
                    .inc();
            }
        }
        if self.served.counted {
            let total = &metrics.stats.total;
            total.sent();
            match f.outcome {
                RequestOutcome::Success => total.answered(false),
                RequestOutcome::Fallback | RequestOutcome::Stale | RequestOutcome::Static => {
                    total.answered(true)
                }
                _ => total.failed(),
            }
            total.latency.record(f.elapsed);
            // Model answers without usage count as missing; pass-through calls have none.
            let success = (200..300).contains(&f.status);
            if f.usage.is_some() || (success && f.complete) {
                total.add_usage(f.usage, f.bill);
            }
        }
    }

    fn log(&self, f: &Finished, exported: bool) {
        let trace_id = match &self.trace {
            Some((ids, _)) if exported => Some(ids.trace_id_hex()),
            _ => self.incoming_trace_id.clone(),
        };
        let who = f.who.as_ref();
        let seconds = f.elapsed.as_secs_f64();
        tracing::info!(
            target: ACCESS_TARGET,
            route = who.map(|t| t.route.as_ref()),
            path = who.map(|t| t.path),
            provider = who.map(|t| t.provider.as_ref()),
            model = who.map(|t| t.model.as_ref()),
            status = f.status,
            outcome = f.outcome.label(),
            attempts = f.report.attempts,
            fallbacks = f.report.fallbacks,
            duration_ms = (seconds * 1000.0 * 1000.0).round() / 1000.0,
            input_tokens = f.usage.map(|u| u.input),
            output_tokens = f.usage.map(|u| u.output),
            cost_usd = f.bill.cost.map(round_usd),
            savings_usd = f.bill.savings().map(round_usd),
            cache = self.served.cache.map(CacheStatus::as_str),
            trace_id = trace_id.as_deref(),
            "request"
        );
    }

    /// Builds the SERVER span and the attempt spans, with their real times, and exports them;
    /// for a stream still winding down after its client left, once its pump has ended.
    fn export(&self, ids: TraceIds, server: ServerTrace, mut f: Finished) {
        let label = f.outcome.label();
        let mut attributes = Vec::with_capacity(14);
        attributes.extend([
            KeyValue::new("http.request.method", server.method.to_string()),
            KeyValue::new("url.path", server.path),
            KeyValue::new("http.response.status_code", i64::from(f.status)),
            KeyValue::new("llm_sidecar.outcome", label),
            KeyValue::new("llm_sidecar.attempts", i64::from(f.report.attempts)),
            KeyValue::new("llm_sidecar.fallbacks", i64::from(f.report.fallbacks)),
            KeyValue::new("llm_sidecar.fallback", f.report.fell_back),
        ]);
        if !server.route.is_empty() {
            attributes.push(KeyValue::new("http.route", server.route));
        }
        if let Some(t) = &f.who {
            attributes.push(KeyValue::new("llm_sidecar.path", t.path));
        }
        if let Some(cost) = f.bill.cost {
            attributes.push(KeyValue::new("llm_sidecar.cost_usd", cost));
        }
        if let Some(cache) = self.served.cache {
            attributes.push(KeyValue::new("llm_sidecar.cache", cache.as_str()));
        }
        let failed = !matches!(
            f.outcome,
            RequestOutcome::Success | RequestOutcome::Fallback
        );
        let name = if server.route.is_empty() {
            server.method.to_string()
        } else {
            format!("{} {}", server.method, server.route)
        };
        let draft = Draft {
            name: name.into(),
            kind: opentelemetry::trace::SpanKind::Server,
            span_id: ids.span_id,
            start: server.start,
            end: std::time::SystemTime::now(),
            attributes,
            error: failed.then_some(label),
            links: Vec::new(),
        };
        let traced = f.traced.take();
        match f.pending.take() {
            None => trace::export(&ids, draft, traced.into_iter().flat_map(Traced::drafts)),
            Some(pending) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                runtime.spawn(async move {
                    let end = tokio::time::timeout(Duration::from_secs(10), pending).await;
                    let mut traced = traced;
                    if let (Some(traced), Ok(Ok(mut end))) = (&mut traced, end) {
                        traced.attempts.append(&mut end.attempts);
                    }
                    trace::export(&ids, draft, traced.into_iter().flat_map(Traced::drafts));
                });
            }
        }
    }
}

/// Whether a finished request's trace is exported: the head sampler kept it, or it is one an
/// operator looks for: a retry or failover, a continued stream, anything but a plain success,
/// or a slow request.
fn exported(ids: &TraceIds, f: &Finished) -> bool {
    let continued = f.traced.as_ref().is_some_and(|t| t.attempts.len() > 1);
    ids.sampled
        || f.report.attempts > 1
        || f.report.fallbacks > 0
        || continued
        || f.outcome != RequestOutcome::Success
        || f.elapsed >= crate::telemetry::otel::slow_threshold()
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
    /// Every target failed; an older answer from the cache was served, marked stale.
    Stale,
    /// Every target failed and nothing was cached; the route's static fallback was served.
    Static,
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
            RequestOutcome::Stale => "stale",
            RequestOutcome::Static => "static",
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
    let value = headers
        .get(crate::telemetry::otel::TRACEPARENT)?
        .to_str()
        .ok()?;
    let id = value.get(3..35)?;
    (value.len() >= 55 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != ZERO_TRACE_ID)
        .then(|| id.to_ascii_lowercase())
}

pub(super) const ZERO_TRACE_ID: &str = "00000000000000000000000000000000";

/// The SERVER span's `http.route`: the endpoint's template, or nothing for other paths.
fn route_template(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{model}",
        _ => "",
    }
}
