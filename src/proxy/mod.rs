//! The data plane: reads an OpenAI-compatible request once, picks the target from one config
//! snapshot, swaps the app's credentials for the provider's, and streams the answer back.

pub mod body;
pub mod execute;
pub mod prober;
pub mod server;
pub mod sse;
pub mod upstream;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use opentelemetry::KeyValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{unix_seconds, ConfigStore, Route, Snapshot};
use crate::errors::SidecarError;
use crate::openai::{self, BodyError, RequestBody};
use crate::path::Normalized;
use crate::routing::rollout::{self, Decision};

use crate::telemetry::metrics::{DurationLabels, Metrics, RequestLabels, TargetMetrics};
use crate::telemetry::{otel, ACCESS_TARGET};
use body::{full, Observed, OnFinish, ProxyBody};
use execute::{Core, Exchange, SharedOutcome};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use upstream::{Lease, UpstreamError};

pub use crate::config::{HEADER_PATH, HEADER_PROVIDER, HEADER_ROUTE, HEADER_UPSTREAM_MODEL};
pub const HEADER_REASON: HeaderName = HeaderName::from_static("x-llm-sidecar-reason");
pub const HEADER_GENERATION: HeaderName =
    HeaderName::from_static("x-llm-sidecar-config-generation");
/// The id of the request's trace, when it is exported: paste it into Jaeger's search.
pub const HEADER_TRACE_ID: HeaderName = HeaderName::from_static("x-llm-sidecar-trace-id");
const OWN_HEADER_PREFIX: &str = "x-llm-sidecar-";

/// Limits the proxy enforces on every request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    pub max_concurrency: usize,
}

pub struct Proxy {
    store: Arc<ConfigStore>,
    core: Arc<Core>,
    metrics: Arc<Metrics>,
    limits: Limits,
    in_flight: Arc<Semaphore>,
}

/// What a finished request is counted as.
struct Record {
    metrics: Arc<Metrics>,
    /// Labels for the generic path; `None` is counted as "none" (answered by the sidecar).
    route: Option<Arc<str>>,
    provider: Option<Arc<str>>,
    path: &'static str,
    /// The answering target's metric handles: a successful request needs no label lookup.
    target: Option<Arc<TargetMetrics>>,
    status: u16,
    start: Instant,
    /// The upstream connection, returned to the pool only when the body was read to the end.
    lease: Option<Lease>,
    /// Counted in the `/stats` totals: model calls and pass-through calls.
    counted: bool,
    /// What the exchange found out: attempts, failover, usage and cost.
    outcome: Option<SharedOutcome>,
    /// The SERVER span (disabled without tracing); it ends with the response body.
    span: tracing::Span,
    trace_id: Option<String>,
    _permit: Option<OwnedSemaphorePermit>,
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
        let label = if success && out.interrupted {
            "interrupted"
        } else if success && !completed && !out.complete {
            "cancelled"
        } else if success && out.fell_back {
            "fallback"
        } else if success {
            "success"
        } else if outcome.is_some() && out.attempts > 0 {
            "upstream_error"
        } else if route.is_some() {
            // A pass-through call the provider refused.
            "upstream_error"
        } else {
            "rejected"
        };
        let seconds = elapsed.as_secs_f64();
        let answered_by = target.as_ref().filter(|_| success);
        if let Some(t) = answered_by {
            t.stats.tally.latency.record(elapsed);
            if let Some(ttft) = out.ttft {
                t.ttft.observe(ttft.as_secs_f64());
            }
        }
        match (answered_by, status, label) {
            (Some(t), 200, "success") => {
                t.duration.observe(seconds);
                t.requests_ok.inc();
            }
            (Some(t), 200, "fallback") => {
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
            match label {
                "success" | "fallback" => total.answered(label == "fallback"),
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
            let failed = !matches!(label, "success" | "fallback");
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

/// USD to the nano-dollar, so a log line shows 0.00001433 rather than float noise.
fn round_usd(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

/// The trace id of an incoming W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn incoming_trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let id = value.get(3..35)?;
    (value.len() >= 55 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != ZERO_TRACE_ID)
        .then(|| id.to_ascii_lowercase())
}

const ZERO_TRACE_ID: &str = "00000000000000000000000000000000";

/// The SERVER span of a request: a child of the app's span when it sent `traceparent`.
fn server_span(req: &Request<Incoming>) -> tracing::Span {
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

impl Proxy {
    pub fn new(store: Arc<ConfigStore>, core: Arc<Core>, limits: Limits) -> Proxy {
        Proxy {
            store,
            metrics: core.metrics.clone(),
            core,
            in_flight: Arc::new(Semaphore::new(limits.max_concurrency)),
            limits,
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        self.metrics.in_flight.inc();
        let (span, trace_id) = if otel::sampled(req.headers()) {
            let span = server_span(&req);
            let id = otel::trace_id(&span);
            (span, id)
        } else {
            (tracing::Span::none(), incoming_trace_id(req.headers()))
        };
        let mut record = Record {
            metrics: self.metrics.clone(),
            route: None,
            provider: None,
            target: None,
            path: "none",
            status: 0,
            start: Instant::now(),
            lease: None,
            counted: false,
            outcome: None,
            span,
            trace_id,
            _permit: None,
        };
        let response = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                record._permit = Some(permit);
                self.dispatch(req, &mut record).await
            }
            Err(_) => Err(SidecarError::Overloaded(self.limits.max_concurrency)),
        }
        .unwrap_or_else(|err| {
            tracing::debug!(error = %err, "request answered with a sidecar error");
            err.into_response()
        });
        record.status = response.status().as_u16();
        let mut response = response;
        // The answer speaks the protocol of the client's connection, whatever the provider's
        // was (an HTTP/1.0 upstream must not make an HTTP/1.1 client read a 1.0 status line).
        *response.version_mut() = http::Version::default();
        if !record.span.is_disabled() {
            if let Some(value) = record
                .trace_id
                .as_deref()
                .and_then(|id| HeaderValue::from_str(id).ok())
            {
                response.headers_mut().insert(HEADER_TRACE_ID, value);
            }
        }
        Ok(response.map(|body| Observed::new(body, Box::new(record)).boxed_unsync()))
    }

    async fn dispatch(
        &self,
        mut req: Request<Incoming>,
        record: &mut Record,
    ) -> Result<Response<ProxyBody>, SidecarError> {
        normalize_path(&mut req)?;
        let path = req.uri().path();
        let is_get = req.method() == Method::GET;
        match path {
            "/v1/models" if is_get => Ok(self.list_models()),
            "/v1/models" => Err(method_not_allowed(&req)),
            p if is_get && p.starts_with("/v1/models/") => {
                let id = p.trim_start_matches("/v1/models/").to_string();
                self.retrieve_model(&id)
            }
            "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => {
                if req.method() != Method::POST {
                    return Err(method_not_allowed(&req));
                }
                record.counted = true;
                self.forward(req, record, true).await
            }
            _ => {
                let passthrough = &self.store.load().passthrough;
                if !passthrough.allows(path) {
                    return Err(SidecarError::PathNotAllowed {
                        path: path.to_string(),
                        allowed: passthrough.describe().unwrap_or_default().join(", "),
                    });
                }
                record.counted = true;
                self.forward(req, record, false).await
            }
        }
    }

    fn list_models(&self) -> Response<ProxyBody> {
        let snapshot = self.store.load();
        let created = unix_seconds(snapshot.loaded_at);
        json_response(
            StatusCode::OK,
            &openai::model_list(&snapshot.model_ids(), created),
        )
    }

    fn retrieve_model(&self, id: &str) -> Result<Response<ProxyBody>, SidecarError> {
        let snapshot = self.store.load();
        match snapshot.route(id) {
            Some(_) => Ok(json_response(
                StatusCode::OK,
                &openai::model_object(id, unix_seconds(snapshot.loaded_at)),
            )),
            None => Err(SidecarError::UnknownModel {
                model: id.to_string(),
                available: snapshot.model_ids(),
            }),
        }
    }

    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, SidecarError> {
        let limit = self.limits.max_body_bytes;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(SidecarError::BodyTooLarge { limit });
        }
        let mut collect = Limited::new(body, limit).collect();
        // A small body usually came with the request's head: then no timer is needed.
        let collected = match futures_util::FutureExt::now_or_never(&mut collect) {
            Some(collected) => collected,
            None => tokio::time::timeout(self.limits.body_read_timeout, collect)
                .await
                .map_err(|_| SidecarError::BodyTimeout(self.limits.body_read_timeout))?,
        };
        match collected {
            Ok(c) => Ok(c.to_bytes()),
            Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
                Err(SidecarError::BodyTooLarge { limit })
            }
            Err(err) => Err(SidecarError::BodyRead(err.to_string())),
        }
    }

    /// Pass-through paths: the route named by the body's `model` when it has one (and the
    /// body is rewritten for it), else the default route with the body as it is.
    fn resolve(
        snapshot: &Snapshot,
        guard_tripped: bool,
        headers: &HeaderMap,
        bytes: Bytes,
    ) -> Result<(Arc<Route>, Bytes, Decision), SidecarError> {
        // Multipart uploads and bodiless calls name no model and are passed through as they are;
        // a JSON object is read as on the model endpoints, so a duplicate `model` cannot pass.
        let parsed = match RequestBody::parse(&bytes) {
            Ok(parsed) => Some(parsed),
            Err(BodyError::NotAnObject(_)) => None,
            Err(err) => return Err(SidecarError::MalformedRequest(err.to_string())),
        };
        let decision = decide_side(snapshot, guard_tripped, headers, parsed.as_ref());
        let Some((parsed, model)) = parsed
            .as_ref()
            .and_then(|p| p.model.as_deref().map(|m| (p, m)))
        else {
            return match &snapshot.default_route {
                Some(route) => Ok((route.clone(), bytes, decision)),
                None => Err(SidecarError::NoRoute {
                    path: "this path".into(),
                }),
            };
        };
        let Some(route) = snapshot.route(model) else {
            return Err(SidecarError::UnknownModel {
                model: model.to_string(),
                available: snapshot.model_ids(),
            });
        };
        let (target, _) = route.choose(&decision);
        let body = if target.model.as_str() == model {
            bytes.clone()
        } else {
            parsed.with_model(&target.model)
        };
        Ok((route.clone(), body, decision))
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        record: &mut Record,
        model_required: bool,
    ) -> Result<Response<ProxyBody>, SidecarError> {
        // One snapshot for the whole request, even if a new config is swapped in meanwhile.
        let snapshot = self.store.load();
        let (mut parts, body) = req.into_parts();
        let bytes = self.read_body(&parts.headers, body).await?;
        if model_required {
            return self.exchange(snapshot, parts, bytes, record).await;
        }
        let tripped = self
            .core
            .guard
            .is_tripped(&snapshot, tokio::time::Instant::now());
        let (route, upstream_body, decision) =
            Self::resolve(&snapshot, tripped, &parts.headers, bytes).map_err(|err| match err {
                SidecarError::NoRoute { .. } => SidecarError::NoRoute {
                    path: parts.uri.path().to_string(),
                },
                other => other,
            })?;
        let (target, reason) = route.choose(&decision);
        let provider = &target.provider;
        record.route = Some(target.tags.route.clone());
        record.provider = Some(target.tags.provider.clone());
        record.path = target.path().as_str();

        let uri = provider
            .upstream_uri(parts.uri.path(), parts.uri.query())
            .map_err(|reason| {
                SidecarError::MalformedRequest(format!("bad request path: {reason}"))
            })?;
        let mut upstream = Request::new(Full::new(upstream_body));
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        strip_request_headers(&mut parts.headers);
        provider.authorize(&mut parts.headers).map_err(|hint| {
            SidecarError::ProviderKeyMissing {
                provider: provider.name.clone(),
                hint,
            }
        })?;
        let span = if record.span.is_disabled() {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                target: otel::SPAN_TARGET,
                parent: &record.span,
                "passthrough",
                otel.name = %upstream.method(),
                otel.kind = "client",
            );
            span.set_attribute("server.address", provider.host().to_string());
            span.set_attribute("server.port", i64::from(provider.port()));
            span.set_attribute("llm_sidecar.provider", provider.name.clone());
            span.set_attribute("llm_sidecar.path", target.path().as_str());
            span.set_attribute("llm_sidecar.attempt", 1);
            otel::inject(&span, &mut parts.headers);
            span
        };
        *upstream.headers_mut() = parts.headers;
        // One attempt record, so the log line and `/stats` show the call.
        let outcome: SharedOutcome = Default::default();
        execute::lock(&outcome).attempts = 1;
        record.outcome = Some(outcome);

        let timeout = snapshot.timeouts.response_headers;
        let sent = tokio::time::timeout(timeout, self.core.upstream.send(upstream)).await;
        if !span.is_disabled() {
            match &sent {
                Ok(Ok((response, _))) => {
                    span.set_attribute(
                        "http.response.status_code",
                        i64::from(response.status().as_u16()),
                    );
                }
                Ok(Err(_)) => span.set_attribute("error.type", "connection_error"),
                Err(_) => span.set_attribute("error.type", "timeout"),
            }
        }
        drop(span);
        let response = match sent {
            Err(_) => {
                return Err(SidecarError::UpstreamTimeout {
                    provider: provider.name.clone(),
                    after: timeout,
                })
            }
            Ok(Err(err)) => {
                let reason = err.to_string();
                tracing::warn!(provider = %provider.name, %reason, connect = matches!(err, UpstreamError::Connect(_)), "upstream request failed");
                return Err(SidecarError::UpstreamUnreachable {
                    provider: provider.name.clone(),
                    reason,
                });
            }
            Ok(Ok((response, lease))) => {
                record.lease = lease;
                response
            }
        };

        let mut out = response.map(|b| b.map_err(body::BoxError::from).boxed_unsync());
        let headers = out.headers_mut();
        strip_hop_by_hop(headers);
        headers.reserve(6);
        add_route_headers(headers, target, reason, decision.bucket, &snapshot);
        Ok(out)
    }
}

impl Proxy {
    /// Model endpoints: the plan, retries, failover and the streaming contract.
    async fn exchange(
        &self,
        snapshot: Arc<Snapshot>,
        parts: http::request::Parts,
        bytes: Bytes,
        record: &mut Record,
    ) -> Result<Response<ProxyBody>, SidecarError> {
        let outcome: SharedOutcome = Default::default();
        record.outcome = Some(outcome.clone());
        let (core, span, body) = (self.core.clone(), record.span.clone(), bytes.clone());
        let prepare = move || prepare(core, snapshot, parts, body, span, outcome);
        // Reading a large body (parse, prompt estimate, rendering) takes milliseconds: off the
        // worker, so the other connections it serves are not held up meanwhile.
        let (exchange, shadow) = if bytes.len() < OFFLOAD_BODY_BYTES {
            prepare()?
        } else {
            tokio::task::spawn_blocking(prepare).await.map_err(|err| {
                SidecarError::BodyRead(format!("reading the body failed: {err}"))
            })??
        };
        let committed = exchange.run().await?;
        let target = committed.route.target(committed.side);
        if let Some(target) = target {
            record.target = Some(target.metrics(&self.metrics).clone());
            record.path = target.path().as_str();
        }
        record.lease = committed.lease;
        match shadow {
            Some((snapshot, method, path_and_query, stream, started))
                if committed.response.status().is_success() =>
            {
                let request = crate::shadow::ShadowRequest {
                    snapshot,
                    route: committed.route.clone(),
                    primary_side: committed.side,
                    method,
                    path_and_query,
                    body: bytes,
                    stream,
                    started,
                    trace: record.span.clone(),
                };
                Ok(self.core.shadows.launch(
                    self.core.upstream.clone(),
                    request,
                    committed.response,
                ))
            }
            _ => Ok(committed.response),
        }
    }
}

/// Bodies from this size on are read on the blocking pool rather than on a data-port worker.
const OFFLOAD_BODY_BYTES: usize = 256 * 1024;

/// What an exchange's shadow needs, decided before the exchange runs.
type ShadowPlan = (Arc<Snapshot>, Method, String, bool, tokio::time::Instant);

/// Reads a model request's body and sets up its exchange: the route, the side, the plan, the
/// shadow decision. Synchronous, so a large body can be read off the worker.
fn prepare(
    core: Arc<Core>,
    snapshot: Arc<Snapshot>,
    parts: http::request::Parts,
    bytes: Bytes,
    span: tracing::Span,
    outcome: SharedOutcome,
) -> Result<(Exchange, Option<ShadowPlan>), SidecarError> {
    let parsed =
        RequestBody::parse(&bytes).map_err(|e| SidecarError::MalformedRequest(e.to_string()))?;
    let Some(model) = parsed.model.as_deref() else {
        return Err(SidecarError::MalformedRequest(
            "the request body has no `model` field".into(),
        ));
    };
    let Some(route) = snapshot.route(model).cloned() else {
        return Err(SidecarError::UnknownModel {
            model: model.to_string(),
            available: snapshot.model_ids(),
        });
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    let tripped = core
        .guard
        .is_tripped(&snapshot, tokio::time::Instant::now());
    let decision = decide_side(&snapshot, tripped, &parts.headers, Some(&parsed));
    // Shadow: decided now, launched only if the primary answer is a success.
    let shadow = crate::shadow::Shadows::picked(&snapshot, parts.uri.path()).then(|| {
        (
            snapshot.clone(),
            parts.method.clone(),
            path_and_query.clone(),
            parsed.stream,
            tokio::time::Instant::now(),
        )
    });
    let exchange = Exchange::new(
        core,
        snapshot,
        decision,
        parts.method,
        path_and_query,
        parts.headers,
        bytes.clone(),
        &parsed,
        route,
        span,
        outcome,
    );
    Ok((exchange, shadow))
}

/// Puts the request's path in the form it is served and forwarded in ([`crate::path`]), or
/// refuses it: nothing outside `/v1/` reaches a provider.
fn normalize_path<B>(req: &mut Request<B>) -> Result<(), SidecarError> {
    let uri = req.uri();
    let refused = |reason| SidecarError::InvalidPath {
        path: uri.path().to_string(),
        reason,
    };
    let normalized = match crate::path::normalize(uri.path()).map_err(refused)? {
        Normalized::Api(Cow::Borrowed(_)) => return Ok(()),
        Normalized::Api(Cow::Owned(path)) => path,
        Normalized::Elsewhere => return Err(SidecarError::NotFound(uri.path().to_string())),
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    // The normalised path holds only characters the client's URI already had.
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| refused(crate::path::PathError::BadEscape))?,
    );
    let uri =
        http::Uri::from_parts(parts).map_err(|_| refused(crate::path::PathError::BadEscape))?;
    *req.uri_mut() = uri;
    Ok(())
}

fn method_not_allowed<B>(req: &Request<B>) -> SidecarError {
    SidecarError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
    }
}

/// The headers every answer from a provider gets: the route, provider, upstream model and path
/// of the target that answered, why its side was chosen, the rollout bucket when the rollout
/// decided, and the config generation that served it.
pub(crate) fn add_route_headers(
    headers: &mut HeaderMap,
    target: &crate::config::Target,
    reason: &'static str,
    bucket: Option<u16>,
    snapshot: &Snapshot,
) {
    for (name, value) in &target.tags.headers {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(HEADER_REASON, HeaderValue::from_static(reason));
    if let Some(bucket) = bucket {
        headers.insert(HEADER_ROLLOUT_BUCKET, HeaderValue::from(bucket));
    }
    headers.insert(HEADER_GENERATION, snapshot.generation_header.clone());
}

/// Removes the headers that belong to one hop only.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |name| is_hop_by_hop(name.as_str()));
}

/// Removes every header whose name `doomed` picks. A message has a few headers: finding each
/// one to drop by a scan is cheaper than a lookup for every name that might be there.
fn remove_where(headers: &mut HeaderMap, mut doomed: impl FnMut(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|name| doomed(name)).cloned() {
        headers.remove(&name);
    }
}

/// Headers that belong to one hop only.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The app's rollout key header: the same key always lands on the same side.
pub const HEADER_ROLLOUT_KEY: HeaderName = HeaderName::from_static("x-llm-sidecar-rollout-key");
/// The request's rollout bucket (0..10000), when the rollout decided its side.
pub const HEADER_ROLLOUT_BUCKET: HeaderName =
    HeaderName::from_static("x-llm-sidecar-rollout-bucket");

/// The side a request starts on. The rollout key is `x-llm-sidecar-rollout-key`, else the
/// body's OpenAI `user` field; without either the bucket is random.
pub(crate) fn decide_side(
    snapshot: &Snapshot,
    guard_tripped: bool,
    headers: &HeaderMap,
    parsed: Option<&RequestBody<'_>>,
) -> Decision {
    rollout::decide(&snapshot.flags, guard_tripped, || {
        if let Some(key) = headers
            .get(HEADER_ROLLOUT_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.is_empty())
        {
            return rollout::bucket_for_key(key);
        }
        parsed
            .and_then(|p| p.field("user"))
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
            .filter(|k| !k.is_empty())
            .map_or_else(rollout::random_bucket, |k| rollout::bucket_for_key(&k))
    })
}

/// Removes, in place, what must not reach the provider: the app's credentials, hop-by-hop
/// headers (including those the `Connection` header names) and the sidecar's own controls.
pub(crate) fn strip_request_headers(headers: &mut HeaderMap) {
    // Every `Connection` header's list counts (empty, and not allocated, without one).
    let listed: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    let doomed = |name: &HeaderName| {
        let name = name.as_str();
        is_hop_by_hop(name)
            // The app's own credentials, and what is recomputed for the upstream.
            || matches!(
                name,
                "authorization"
                    | "api-key"
                    | "x-api-key"
                    | "openai-organization"
                    | "openai-project"
                    | "proxy-authorization"
                    | "host"
                    | "content-length"
            )
            || name.starts_with(OWN_HEADER_PREFIX)
            || listed.iter().any(|value| connection_lists(value, name))
    };
    remove_where(headers, doomed);
}

/// Whether a `Connection` header value names the header `name` (lower case).
fn connection_lists(value: &HeaderValue, name: &str) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|listed| listed.trim().eq_ignore_ascii_case(name))
    })
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_credentials_and_hop_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-app"),
            ("x-api-key", "sk-app"),
            ("openai-organization", "org-app"),
            ("openai-project", "proj-app"),
            ("api-key", "sk-app"),
            ("proxy-authorization", "Basic app"),
            ("host", "127.0.0.1:4000"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("connection", "keep-alive, X-Hop"),
            ("connection", "x-hop-two"),
            ("x-hop", "1"),
            ("x-hop-two", "1"),
            ("x-llm-sidecar-prefer", "a"),
            ("content-type", "application/json"),
            ("traceparent", "00-abc-def-01"),
        ] {
            from.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_request_headers(&mut from);
        let mut names: Vec<&str> = from.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "traceparent"]);
    }
}
