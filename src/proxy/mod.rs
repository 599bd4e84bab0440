//! The data plane: reads an OpenAI-compatible request once, picks the target from one config
//! snapshot, swaps the app's credentials for the provider's, and streams the answer back.

mod cached;
pub mod execute;

mod headers;
mod observe;
pub mod prober;
pub mod server;
pub mod sse;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use opentelemetry::KeyValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{unix_seconds, Route, Snapshot};
use crate::errors::SidecarError;
use crate::openai::{self, BodyError, RequestBody};
use crate::path::Normalized;
use crate::routing::rollout::{self, Decision};
use crate::store::ConfigStore;

use crate::body::{full, Observed, OnFinish, ProxyBody};
use crate::telemetry::metrics::{DurationLabels, Metrics, RequestLabels, TargetMetrics};
use crate::telemetry::ACCESS_TARGET;
use crate::upstream::{Lease, UpstreamError};
use execute::{Core, Exchange};

use crate::telemetry::trace::TraceIds;
use cached::Looked;
pub use cached::HEADER_CACHE;
pub(crate) use headers::{add_route_headers, decide_side, strip_hop_by_hop};
pub use headers::{HEADER_ROLLOUT_BUCKET, HEADER_ROLLOUT_KEY};
use observe::{incoming_trace_id, Record, Served, ServerTrace};

/// A request's answer (or the error it gets) and what serving it found out.
type Handled = (Result<Response<ProxyBody>, SidecarError>, Served);

pub use crate::config::{HEADER_PATH, HEADER_PROVIDER, HEADER_ROUTE, HEADER_UPSTREAM_MODEL};
pub const HEADER_REASON: HeaderName = HeaderName::from_static("x-llm-sidecar-reason");
pub const HEADER_GENERATION: HeaderName =
    HeaderName::from_static("x-llm-sidecar-config-generation");
/// The id of the request's trace, when it is exported: paste it into Jaeger's search.
pub const HEADER_TRACE_ID: HeaderName = HeaderName::from_static("x-llm-sidecar-trace-id");

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
        let ids = TraceIds::start(req.headers());
        let mut record = Record {
            metrics: self.metrics.clone(),
            start: Instant::now(),
            status: 0,
            served: Served::default(),
            trace: ids.clone().map(|ids| (ids, ServerTrace::of(&req))),
            incoming_trace_id: incoming_trace_id(req.headers()),
            _permit: None,
        };
        let (response, served) = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                record._permit = Some(permit);
                self.dispatch(req, ids.as_ref()).await
            }
            Err(_) => (
                Err(SidecarError::Overloaded(self.limits.max_concurrency)),
                Served::default(),
            ),
        };
        let response = response.unwrap_or_else(|err| {
            tracing::debug!(error = %err, "request answered with a sidecar error");
            err.into_response().map(full)
        });
        let mut response = response;
        if let Some(status) = served.cache {
            // Every model answer says how it was found, errors included.
            response
                .headers_mut()
                .insert(HEADER_CACHE, HeaderValue::from_static(status.as_str()));
        }
        record.served = served;
        record.status = response.status().as_u16();
        // The answer speaks the protocol of the client's connection, whatever the provider's
        // was (an HTTP/1.0 upstream must not make an HTTP/1.1 client read a 1.0 status line).
        *response.version_mut() = http::Version::default();
        // The trace id, where the trace is known to be exported already: sampled at the head,
        // or an answer that came after a failure or is one.
        let exported = ids.as_ref().is_some_and(|ids| {
            ids.sampled
                || record.status >= 400
                || record
                    .served
                    .report
                    .as_ref()
                    .is_some_and(|r| r.attempts > 1 || r.fell_back)
        });
        if let (true, Some(ids)) = (exported, &ids) {
            if let Ok(value) = HeaderValue::from_str(&ids.trace_id_hex()) {
                response.headers_mut().insert(HEADER_TRACE_ID, value);
            }
        }
        Ok(response.map(|body| Observed::new(body, Box::new(record)).boxed_unsync()))
    }

    /// Serves one request by its path; returns the answer and what serving it found out.
    async fn dispatch(&self, mut req: Request<Incoming>, ids: Option<&TraceIds>) -> Handled {
        if let Err(err) = normalize_path(&mut req) {
            return (Err(err), Served::default());
        }
        let path = req.uri().path();
        let is_get = req.method() == Method::GET;
        let answered = match path {
            "/v1/models" if is_get => Ok(self.list_models()),
            "/v1/models" => Err(method_not_allowed(&req)),
            p if is_get && p.starts_with("/v1/models/") => {
                let id = p.trim_start_matches("/v1/models/").to_string();
                self.retrieve_model(&id)
            }
            "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => {
                if req.method() != Method::POST {
                    return (Err(method_not_allowed(&req)), Served::default());
                }
                return self.forward(req, ids, true).await;
            }
            _ => {
                let passthrough = &self.store.load().passthrough;
                if !passthrough.allows(path) {
                    return (
                        Err(SidecarError::PathNotAllowed {
                            path: path.to_string(),
                            allowed: passthrough.describe().unwrap_or_default().join(", "),
                        }),
                        Served::default(),
                    );
                }
                return self.forward(req, ids, false).await;
            }
        };
        (answered, Served::default())
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
        let (target, _) = rollout::choose(route, &decision);
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
        ids: Option<&TraceIds>,
        model_required: bool,
    ) -> Handled {
        // One snapshot for the whole request, even if a new config is swapped in meanwhile.
        let snapshot = self.store.load();
        let (parts, body) = req.into_parts();
        let bytes = match self.read_body(&parts.headers, body).await {
            Ok(bytes) => bytes,
            Err(err) => return (Err(err), Served::counted()),
        };
        if model_required {
            self.exchange(snapshot, parts, bytes, ids).await
        } else {
            self.passthrough(snapshot, parts, bytes, ids).await
        }
    }

    /// Any other `/v1/` path: one call to the route's chosen target, its answer as it is.
    async fn passthrough(
        &self,
        snapshot: Arc<Snapshot>,
        parts: http::request::Parts,
        bytes: Bytes,
        ids: Option<&TraceIds>,
    ) -> Handled {
        let tripped = self
            .core
            .guard
            .is_tripped(&snapshot, tokio::time::Instant::now());
        let resolved = Self::resolve(&snapshot, tripped, &parts.headers, bytes);
        let (route, upstream_body, decision) = match resolved {
            Ok(resolved) => resolved,
            Err(SidecarError::NoRoute { .. }) => {
                let path = parts.uri.path().to_string();
                return (Err(SidecarError::NoRoute { path }), Served::counted());
            }
            Err(err) => return (Err(err), Served::counted()),
        };
        let (target, reason) = rollout::choose(&route, &decision);
        let mut served = Served {
            route: Some(target.tags.route.clone()),
            provider: Some(target.tags.provider.clone()),
            path: Some(target.path().as_str()),
            ..Served::counted()
        };
        let provider = &target.provider;

        let step = crate::routing::plan::Step {
            route: route.clone(),
            side: target.path(),
            forced_probe: false,
            closed: false,
        };
        let mut trace =
            ids.map(|_| execute::AttemptTrace::passthrough(&step, parts.method.clone()));
        let traceparent = ids
            .zip(trace.as_ref())
            .map(|(ids, t)| ids.traceparent(t.span_id));
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let upstream = crate::outbound::request(
            provider,
            parts.method,
            path_and_query,
            &parts.headers,
            upstream_body,
            traceparent,
        )
        .map_err(|why| match why.code {
            "provider_key_missing" => SidecarError::ProviderKeyMissing {
                provider: why.provider,
                hint: why.detail,
            },
            _ => SidecarError::MalformedRequest(format!("bad request path: {}", why.detail)),
        });
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(err) => return (Err(err), served),
        };
        // One attempt, so the log line and `/stats` show the call.
        served.report = Some(execute::Report {
            attempts: 1,
            ..Default::default()
        });

        let timeout = snapshot.timeouts.response_headers;
        let sent = tokio::time::timeout(timeout, self.core.upstream.send(upstream)).await;
        if let Some(mut trace) = trace.take() {
            match &sent {
                Ok(Ok((response, _))) => {
                    trace.answered(response.status().as_u16());
                    trace.finish();
                }
                Ok(Err(_)) => trace.fail("connection_error", None),
                Err(_) => trace.fail("timeout", None),
            }
            if let Some(report) = &mut served.report {
                report.trace = Some(execute::Traced::single(trace));
            }
        }
        let response = match sent {
            Err(_) => {
                let err = SidecarError::UpstreamTimeout {
                    provider: provider.name.clone(),
                    after: timeout,
                };
                return (Err(err), served);
            }
            Ok(Err(err)) => {
                let reason = err.to_string();
                tracing::warn!(provider = %provider.name, %reason, connect = matches!(err, UpstreamError::Connect(_)), "upstream request failed");
                let err = SidecarError::UpstreamUnreachable {
                    provider: provider.name.clone(),
                    reason,
                };
                return (Err(err), served);
            }
            Ok(Ok((response, lease))) => {
                served.lease = lease;
                response
            }
        };

        let mut out = response.map(|b| b.map_err(crate::body::BoxError::from).boxed_unsync());
        let headers = out.headers_mut();
        strip_hop_by_hop(headers);
        headers.reserve(6);
        add_route_headers(headers, target, reason, decision.bucket, &snapshot);
        (Ok(out), served)
    }
}

impl Proxy {
    /// Model endpoints: the plan, retries, failover and the streaming contract.
    async fn exchange(
        &self,
        snapshot: Arc<Snapshot>,
        parts: http::request::Parts,
        bytes: Bytes,
        ids: Option<&TraceIds>,
    ) -> Handled {
        let (core, trace, body) = (self.core.clone(), ids.cloned(), bytes.clone());
        let path = parts.uri.path().to_string();
        let max_bytes = snapshot.cache_max_bytes;
        let prepare = move || prepare(core, snapshot, parts, body, trace);
        // Reading a large body (parse, prompt estimate, rendering) takes milliseconds: off the
        // worker, so the other connections it serves are not held up meanwhile.
        let prepared = if bytes.len() < OFFLOAD_BODY_BYTES {
            prepare()
        } else {
            tokio::task::spawn_blocking(prepare)
                .await
                .unwrap_or_else(|err| {
                    Err(SidecarError::BodyRead(format!(
                        "reading the body failed: {err}"
                    )))
                })
        };
        let Prepared {
            mut exchange,
            shadow,
            cache,
        } = match prepared {
            Ok(prepared) => prepared,
            Err(err) => return (Err(err), Served::counted()),
        };
        let ctx = cached::Context::new(cache, &exchange, &self.core.cache, max_bytes, path);
        match self.look_up(&ctx).await {
            Looked::Served(handled) => return *handled,
            Looked::Lead(leader) => {
                if let Some(capture) = ctx.capture(leader) {
                    exchange.capture(capture);
                }
            }
        }
        let committed = match exchange.run().await {
            Ok(committed) => committed,
            Err(gave_up) => return self.last_resort(&ctx, gave_up).await,
        };
        self.answered(&ctx);
        let mut served = Served {
            cache: Some(ctx.status()),
            ..Served::counted()
        };
        served.path = committed
            .route
            .target(committed.side)
            .map(|target| target.path().as_str());
        served.target = Some(committed.handles);
        served.lease = committed.lease;
        served.report = Some(committed.report);
        served.stream_end = committed.stream_end;
        let response = match shadow {
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
                    trace: ids.cloned(),
                };
                self.core
                    .shadows
                    .launch(self.core.upstream.clone(), request, committed.response)
            }
            _ => committed.response,
        };
        (Ok(response), served)
    }
}

/// Bodies from this size on are read on the blocking pool rather than on a data-port worker.
const OFFLOAD_BODY_BYTES: usize = 256 * 1024;

/// A model request ready to run: its exchange, and what was decided for its shadow and its
/// cache use while its body was read.
struct Prepared {
    /// Boxed: the exchange moves from here into `run` and, for a stream, into its pump task;
    /// by value it would be copied at each move and held in every future on the way.
    exchange: Box<Exchange>,
    shadow: Option<ShadowPlan>,
    cache: cached::Use,
}

/// What an exchange's shadow needs, decided before the exchange runs.
type ShadowPlan = (Arc<Snapshot>, Method, String, bool, tokio::time::Instant);

/// Reads a model request's body and sets up its exchange: the route, the side, the plan, the
/// shadow decision. Synchronous, so a large body can be read off the worker.
fn prepare(
    core: Arc<Core>,
    snapshot: Arc<Snapshot>,
    parts: http::request::Parts,
    bytes: Bytes,
    ids: Option<TraceIds>,
) -> Result<Prepared, SidecarError> {
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
    let cache = cached::Use::decide(&route, parts.uri.path(), &parts.headers, &parsed);
    let exchange = Box::new(Exchange::new(
        core,
        snapshot,
        decision,
        execute::Call {
            method: parts.method,
            path_and_query,
            headers: parts.headers,
            bytes: bytes.clone(),
        },
        &parsed,
        route,
        ids,
    ));
    Ok(Prepared {
        exchange,
        shadow,
        cache,
    })
}

/// Puts the request's path in the form it is served and forwarded in ([`crate::path`]), or
/// refuses it: nothing outside `/v1/` reaches a provider.
fn normalize_path<B>(req: &mut Request<B>) -> Result<(), SidecarError> {
    let uri = req.uri();
    let refused = |reason: crate::path::PathError| SidecarError::InvalidPath {
        path: uri.path().to_string(),
        reason: reason.to_string(),
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

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
